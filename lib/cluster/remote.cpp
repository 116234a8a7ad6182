// forklift::cluster: remote backends (see remote.hpp): the class registry and
// the fork server's recipe that makes a class from it, and the driver's
// RemoteProcess. The agent's side is remote_host.cpp.
#include "forklift/cluster/remote.hpp"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "fork_server.hpp"
#include "forklift/cluster/world.hpp"
#include "forklift/fork_server.hpp"
#include "forklift/log.hpp"
#include "remote_wire.hpp"

namespace forklift::cluster {

using namespace wire;

std::shared_ptr<spdlog::logger> wire::remoteLog() {
  static auto log = makeLogger("cluster.remote");
  return log;
}

wire::Registry& wire::registry() {
  static Registry* r = new Registry;  // never destroyed: served children use it until _exit
  return *r;
}

ExitStatus wire::statusFrom(const Message& m) {
  ExitStatus s;
  s.how = static_cast<ExitStatus::How>(m.get<std::int64_t>("how", static_cast<std::int64_t>(ExitStatus::How::Unknown)));
  s.code = static_cast<int>(m.get<std::int64_t>("code", 0));
  s.signal = static_cast<int>(m.get<std::int64_t>("signal", 0));
  s.escalation = static_cast<int>(m.get<std::int64_t>("escalation", 0));
  s.serverLost = m.get<bool>("server_lost", false);
  return s;
}

void wire::putStatus(Message& m, const ExitStatus& s) {
  m.set("how", static_cast<std::int64_t>(s.how));
  m.set("code", std::int64_t{s.code});
  m.set("signal", std::int64_t{s.signal});
  m.set("escalation", std::int64_t{s.escalation});
  m.set("server_lost", s.serverLost);
}

namespace {

// What the served child runs when the class cannot be made: its preRun__
// fails the start with the reason (the frontend's start() throws it).
class FailedStart final : public MessageProcess {
 public:
  FailedStart(std::string name, std::string why) : MessageProcess(std::move(name)), why_(std::move(why)) {}

 private:
  void preRun__() override { throw Error(why_); }
  std::string why_;
};

// In the fork server's child: the payload names the class and carries its
// constructor's arguments (see remote.hpp, "How an agent starts one").
int makeAndRun(forklift::detail::ServedCall& c) {
  std::unique_ptr<MessageProcess> p;
  std::string name = "remote";
  try {
    const Message d = decode(c.payload.data(), c.payload.size());
    name = d.get<std::string>("name");
    const auto cls = d.get<std::string>("class");
    detail::MakeProcess make;
    {
      std::lock_guard lock(registry().mu);
      auto it = registry().classes.find(cls);
      if (it == registry().classes.end()) throw Error("no process class '" + cls + "' in the fork server");
      make = it->second.make;
    }
    p = make(name, Message(cls, d.get<Map>("args")));
  } catch (const std::exception& e) {
    p = std::make_unique<FailedStart>(name, std::string("its constructor failed: ") + e.what());
  }
  // Leaves with _exit: the object lives until then.
  return forklift::detail::runServed(*p.release(), c);
}

}  // namespace

// ---- defining ---------------------------------------------------------------

void detail::defineProcess(const std::string& className, std::type_index type, CheckArgs check, MakeProcess make) {
  if (World::exists())
    throw Error("cluster::defineProcess('" + className +
                "'): define every class before the World (its fork server must hold the registry)");
  if (ForkServer::running())
    throw Error("cluster::defineProcess('" + className +
                "'): a fork server runs already and would not know the class; define it before any fork server");
  if (className.empty()) throw Error("cluster::defineProcess: an empty class name");
  Registry& g = registry();
  std::lock_guard lock(g.mu);
  if (g.classes.count(className)) throw Error("cluster::defineProcess: '" + className + "' is defined already");
  if (g.recipe == 0) g.recipe = forklift::detail::recipes::add(makeAndRun);
  g.classes.emplace(className, ClassEntry{std::move(check), std::move(make)});
  g.names[type] = className;
}

std::string detail::classNameOf(std::type_index type) {
  Registry& g = registry();
  std::lock_guard lock(g.mu);
  auto it = g.names.find(type);
  if (it == g.names.end())
    throw Error(std::string("cluster::start: the class ") + type.name() + " was not defined (cluster::defineProcess)");
  return it->second;
}

int agentOn(const World& world, const std::string& host) {
  for (int r = 1; r < world.size(); ++r)
    if (world.host(r) == host) return r;
  throw Error("cluster: no agent runs on host '" + host + "'");
}

// ---- the driver's side ------------------------------------------------------

namespace detail {

struct RemoteCall {
  std::int64_t id = 0;
  std::string command;
  Timeout timeout{0};
  Deadline deadline{kForever};
  bool done = false;
  CallResult result;
};

struct RemoteCore {
  World& world;
  int rank;
  std::string host;
  std::string fullName;
  std::uint64_t id;
  RemoteOptions options;
  std::shared_ptr<Mailbox> replies;
  std::shared_ptr<Mailbox> outs;

  mutable std::mutex mu;
  std::condition_variable cv;
  std::mutex readMu;  // one reader of `replies` at a time
  std::unordered_map<std::int64_t, std::shared_ptr<RemoteCall>> calls;
  std::int64_t nextCall = 1;
  std::optional<Message> started;
  bool ended = false;
  bool stopAsked = false;
  ExitStatus status{ExitStatus::How::Running};
  pid_t pid = -1;

  std::mutex recvMu;
  std::optional<std::string> outEnd;  // set once the end was read: its error text
  bool outEndDied = false;

  RemoteCore(World& w, int r, std::string full, std::uint64_t i, RemoteOptions o)
      : world(w), rank(r), host(w.host(r)), fullName(std::move(full)), id(i), options(o) {}

  std::string endText() const {  // mu held
    return fullName + (stopAsked ? ": the backend stopped (" : ": the backend died (") + status.describe() + ")";
  }
  // Calls and sends after the end fail with ProcessDied, as local ones do.
  std::exception_ptr endError() const {  // mu held
    return std::make_exception_ptr(ProcessDied(endText()));
  }

  CallResult timedOut(const RemoteCall& c) const {
    return CallResult(std::make_exception_ptr(TimeoutError(fullName + ": call '" + c.command + "' timed out after " +
                                                           std::to_string(c.timeout.count()) + " ms")));
  }

  void complete(RemoteCall& c, CallResult r) {  // mu held
    if (c.done) return;
    c.done = true;
    c.result = std::move(r);
    calls.erase(c.id);
  }

  void dispatch(Message& m) {  // mu held
    const std::string& cmd = m.command();
    const std::string what = cmd.substr(replyPrefix(id).size());
    if (what == "started") {
      started = std::move(m);
    } else if (what == "reply") {
      auto it = calls.find(m.get<std::int64_t>("call"));
      if (it == calls.end()) return;  // timed out here already: nobody waits
      auto c = it->second;
      const auto kind = static_cast<CallResult::Kind>(m.get<std::int64_t>("kind"));
      const std::string text = m.get<std::string>("what", "");
      const std::string prefix = fullName + ": call '" + c->command + "': ";
      switch (kind) {
        case CallResult::Kind::Ok: {
          Value* v = m.find("value");
          complete(*c, CallResult(v ? std::move(*v) : Value()));
          break;
        }
        case CallResult::Kind::Remote:
          complete(*c, CallResult(std::make_exception_ptr(RemoteError(prefix + text))));
          break;
        case CallResult::Kind::Timeout:  // the agent's clock ran out just before ours
          complete(*c, timedOut(*c));
          break;
        case CallResult::Kind::ProcessDied:
          // The agent reports the end next, with the status: the call fails then.
          break;
        default:
          complete(*c, CallResult(std::make_exception_ptr(Error(prefix + text))));
      }
    } else if (what == "ended") {
      ended = true;
      status = statusFrom(m);
      const auto err = endError();
      std::vector<std::shared_ptr<RemoteCall>> waiting;
      for (auto& [k, c] : calls) waiting.push_back(c);
      for (auto& c : waiting) complete(*c, CallResult(err));
    }
  }

  // Reads what came for this backend, waiting up to `t`; only one thread
  // reads at a time, the others wait for it (cv).
  void pump(Timeout t) {
    std::unique_lock reader(readMu, std::try_to_lock);
    if (!reader.owns_lock()) {
      std::unique_lock lock(mu);
      cv.wait_for(lock, std::min<Timeout>(t, Timeout(5)));
      return;
    }
    auto r = replies->recv(t);
    while (r) {
      {
        std::lock_guard lock(mu);
        dispatch(r->message);
      }
      r = replies->tryRecv();
    }
    cv.notify_all();
  }

  // Drives the replies until `done()` (under mu) or `d` passed; true when done.
  bool waitUntil(const std::function<bool()>& done, const Deadline& d) {
    for (;;) {
      {
        std::lock_guard lock(mu);
        if (done()) return true;
      }
      if (d.expired()) {
        pump(Timeout::zero());  // what came already counts
        std::lock_guard lock(mu);
        return done();
      }
      const auto left = std::chrono::ceil<Timeout>(d.remaining());
      pump(std::min<Timeout>(left, Timeout(100)));
    }
  }

  // A call's outcome once it is done or its deadline passed.
  bool settle(RemoteCall& c, Timeout wait) {
    const Deadline mine(wait);
    const Deadline& d = (!c.deadline.forever() && (mine.forever() || c.deadline.at() < mine.at())) ? c.deadline : mine;
    waitUntil([&] { return c.done; }, d);
    std::lock_guard lock(mu);
    if (!c.done && c.deadline.expired()) complete(c, timedOut(c));
    return c.done;
  }

  std::shared_ptr<RemoteCall> send(const std::string& command, Map args, Timeout timeout) {
    auto c = std::make_shared<RemoteCall>();
    c->command = command;
    c->timeout = timeout;
    c->deadline = Deadline(timeout);
    {
      std::lock_guard lock(mu);
      if (ended) std::rethrow_exception(endError());
      c->id = nextCall++;
      calls[c->id] = c;
    }
    try {
      world.send(rank, Message(kCall, {{"id", static_cast<std::int64_t>(id)},
                                       {"call", c->id},
                                       {"command", command},
                                       {"args", std::move(args)},
                                       {"timeout_ms", toMs(timeout)}}));
    } catch (...) {
      std::lock_guard lock(mu);
      calls.erase(c->id);
      throw;
    }
    return c;
  }
};

}  // namespace detail

namespace {
std::atomic<std::uint64_t> nextId{1};

detail::RemoteCore& need(const std::shared_ptr<detail::RemoteCore>& c) {
  if (!c) throw Error("cluster::RemoteProcess: used after it was moved from");
  return *c;
}
}  // namespace

RemoteProcess::RemoteProcess(World& world, int rank, const std::string& className, std::string name, Map args,
                             RemoteOptions options) {
  if (!world.isDriver()) throw Error("cluster::RemoteProcess: only the driver (rank 0) starts remote backends");
  if (rank <= 0 || rank >= world.size())
    throw Error("cluster::RemoteProcess: rank " + std::to_string(rank) + " is no agent (agents are 1 to " +
                std::to_string(world.size() - 1) + ")");
  const std::uint64_t id = nextId++;
  const std::string full =
      className + "." + name + " on " + world.host(rank) + " (rank " + std::to_string(rank) + ")";
  auto core = std::make_shared<detail::RemoteCore>(world, rank, full, id, options);
  core->replies = world.route(replyPrefix(id));
  core->outs = world.route(outPrefix(id));
  auto unroute = [&] {
    world.unroute(replyPrefix(id));
    world.unroute(outPrefix(id));
  };
  try {
    world.send(rank, Message(kStart, {{"id", static_cast<std::int64_t>(id)},
                                      {"class", className},
                                      {"name", name},
                                      {"args", std::move(args)},
                                      {"start_ms", toMs(options.startTimeout)},
                                      {"send_ms", toMs(options.sendTimeout)},
                                      {"stop_ms", toMs(options.stopTimeout)}}));
    // The agent's own start is bounded by startTimeout; the rest is travel.
    const Deadline d(options.startTimeout == kForever ? kForever : options.startTimeout + Timeout(2000));
    if (!core->waitUntil([&] { return core->started.has_value(); }, d)) {
      // Should it start later, the stop that follows it ends it.
      world.send(rank, Message(kStop, {{"id", static_cast<std::int64_t>(id)}, {"timeout_ms", std::int64_t{0}}}));
      throw TimeoutError("cluster: cannot start " + full + ": no answer within " +
                         std::to_string(d.forever() ? -1 : (options.startTimeout + Timeout(2000)).count()) + " ms");
    }
    const Message& s = *core->started;
    if (!s.get<bool>("ok")) throw Error("cluster: cannot start " + full + ": " + s.get<std::string>("what", "?"));
    core->pid = static_cast<pid_t>(s.get<std::int64_t>("pid"));
  } catch (...) {
    unroute();
    throw;
  }
  core_ = std::move(core);
}

RemoteProcess::~RemoteProcess() {
  if (!core_) return;
  try {
    stop(core_->options.stopTimeout);
  } catch (const std::exception& e) {
    remoteLog()->error("{}: stop failed: {}", core_->fullName, e.what());
  }
  // Nothing more comes once it ended; a backend that did not end in time
  // may still send: those messages go to the inbox.
  core_->world.unroute(replyPrefix(core_->id));
  core_->world.unroute(outPrefix(core_->id));
}

RemoteProcess::RemoteProcess(RemoteProcess&&) noexcept = default;
RemoteProcess& RemoteProcess::operator=(RemoteProcess&& o) noexcept {
  if (this != &o) {
    RemoteProcess gone(std::move(*this));
    core_ = std::move(o.core_);
  }
  return *this;
}

void RemoteProcess::send(const std::string& command, Map args) { send(Message(command, std::move(args))); }

void RemoteProcess::send(Message m) {
  auto& c = need(core_);
  {
    std::lock_guard lock(c.mu);
    if (c.ended) std::rethrow_exception(c.endError());
  }
  c.world.send(c.rank, Message(kSend, {{"id", static_cast<std::int64_t>(c.id)},
                                       {"command", m.command()},
                                       {"args", std::move(m.args())}}));
}

Value RemoteProcess::call(const std::string& command, Map args) {
  return call(command, std::move(args), need(core_).options.callTimeout);
}

Value RemoteProcess::call(const std::string& command, Map args, Timeout timeout) {
  auto& c = need(core_);
  auto slot = c.send(command, std::move(args), timeout);
  c.settle(*slot, kForever);
  return slot->result.take();
}

RemoteFuture RemoteProcess::callAsync(const std::string& command, Map args) {
  return callAsync(command, std::move(args), need(core_).options.callTimeout);
}

RemoteFuture RemoteProcess::callAsync(const std::string& command, Map args, Timeout timeout) {
  auto& c = need(core_);
  RemoteFuture f;
  f.call_ = c.send(command, std::move(args), timeout);
  f.core_ = core_;
  return f;
}

int RemoteProcess::fd() const noexcept { return core_ ? core_->outs->fd() : -1; }

std::optional<Message> RemoteProcess::recv(Timeout timeout) {
  auto& c = need(core_);
  std::lock_guard lock(c.recvMu);
  auto throwEnd = [&] {
    if (c.outEndDied) throw ProcessDied(*c.outEnd);
    throw PeerClosed(*c.outEnd);
  };
  if (c.outEnd) throwEnd();
  auto r = c.outs->recv(timeout);
  if (!r) return std::nullopt;
  Message& m = r->message;
  const std::string what = m.command().substr(outPrefix(c.id).size());
  if (what == "msg") return Message(m.get<std::string>("command"), m.get<Map>("args"));
  if (what == "error")
    throw CommandError(m.get<std::string>("command"),
                       c.fullName + ": '" + m.get<std::string>("command") + "' failed: " + m.get<std::string>("what"));
  c.outEndDied = !m.get<bool>("stopped", false);
  c.outEnd = c.fullName + (c.outEndDied ? ": the backend died (" : ": the backend stopped (") +
             m.get<std::string>("what", "?") + ")";
  throwEnd();
  return std::nullopt;  // not reached
}

ExitStatus RemoteProcess::stop() { return stop(need(core_).options.stopTimeout); }

ExitStatus RemoteProcess::stop(Timeout timeout) {
  auto& c = need(core_);
  bool ask = false;
  {
    std::lock_guard lock(c.mu);
    if (c.ended) return c.status;
    if (!c.stopAsked) ask = c.stopAsked = true;
  }
  if (ask)
    c.world.send(c.rank, Message(kStop, {{"id", static_cast<std::int64_t>(c.id)}, {"timeout_ms", toMs(timeout)}}));
  // The agent's ladder: `timeout`, SIGTERM and 500 ms, SIGKILL and the
  // status's relay; then the travel.
  const Deadline d(timeout == kForever ? kForever : timeout + Timeout(10000));
  c.waitUntil([&] { return c.ended; }, d);
  std::lock_guard lock(c.mu);
  if (!c.ended) remoteLog()->error("{}: no end reported within the stop's bound", c.fullName);
  return c.status;
}

bool RemoteProcess::isAlive() const {
  auto& c = need(core_);
  std::lock_guard lock(c.mu);
  return !c.ended;
}

ExitStatus RemoteProcess::exitStatus() const {
  auto& c = need(core_);
  std::lock_guard lock(c.mu);
  return c.status;
}

int RemoteProcess::rank() const noexcept { return core_ ? core_->rank : -1; }
const std::string& RemoteProcess::host() const noexcept {
  static const std::string none;
  return core_ ? core_->host : none;
}
pid_t RemoteProcess::pid() const noexcept { return core_ ? core_->pid : -1; }
const std::string& RemoteProcess::fullName() const noexcept {
  static const std::string none;
  return core_ ? core_->fullName : none;
}

// ---- futures ----------------------------------------------------------------

bool RemoteFuture::ready() {
  if (!call_) return false;
  return core_->settle(*call_, Timeout::zero());
}

bool RemoteFuture::wait(Timeout timeout) {
  if (!call_) return false;
  return core_->settle(*call_, timeout);
}

CallResult RemoteFuture::result() {
  if (!call_) return CallResult(std::make_exception_ptr(Error("RemoteFuture: no call (default-made or moved from)")));
  core_->settle(*call_, kForever);
  std::lock_guard lock(core_->mu);
  return call_->result;
}

Value RemoteFuture::get() { return result().get(); }

}  // namespace forklift::cluster
