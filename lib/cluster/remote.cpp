// forklift::cluster: remote backends (see remote.hpp): the class registry
// and the fork server's recipe that makes a class from it, the agent's
// RemoteHost, and the driver's RemoteProcess.
#include "forklift/cluster/remote.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "child.hpp"
#include "fork_server.hpp"
#include "forklift/cluster/world.hpp"
#include "forklift/detail/fd.hpp"
#include "forklift/fork_server.hpp"
#include "forklift/log.hpp"

namespace forklift::cluster {

namespace {

std::shared_ptr<spdlog::logger> remoteLog() {
  static auto log = makeLogger("cluster.remote");
  return log;
}

// Commands to an agent; replies and out-messages to the driver begin with
// kProc + the backend's id + ".r." or ".o." (World::route on each side).
constexpr const char* kProc = "__cluster_proc.";
const std::string kStart = std::string(kProc) + "start";
const std::string kSend = std::string(kProc) + "send";
const std::string kCall = std::string(kProc) + "call";
const std::string kStop = std::string(kProc) + "stop";

std::string replyPrefix(std::uint64_t id) { return kProc + std::to_string(id) + ".r."; }
std::string outPrefix(std::uint64_t id) { return kProc + std::to_string(id) + ".o."; }

std::int64_t toMs(Timeout t) { return static_cast<std::int64_t>(t.count()); }

// ---- the registry -------------------------------------------------------------

struct ClassEntry {
  detail::CheckArgs check;
  detail::MakeProcess make;
};

struct Registry {
  std::mutex mu;
  std::map<std::string, ClassEntry> classes;
  std::unordered_map<std::type_index, std::string> names;
  std::uint64_t recipe = 0;  // the fork server's recipe, made with the first class
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: served children use it until _exit
  return *r;
}

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

// The agent's handle of one backend: no commands of its own (they run in the
// child, on the object made there).
class RemoteBackend final : public MessageProcess {
 public:
  RemoteBackend(std::string name, ProcessOptions o) : MessageProcess(std::move(name), std::move(o)) {}
  ~RemoteBackend() override { stop(); }
};

ExitStatus statusFrom(const Message& m) {
  ExitStatus s;
  s.how = static_cast<ExitStatus::How>(m.get<std::int64_t>("how", static_cast<std::int64_t>(ExitStatus::How::Unknown)));
  s.code = static_cast<int>(m.get<std::int64_t>("code", 0));
  s.signal = static_cast<int>(m.get<std::int64_t>("signal", 0));
  s.escalation = static_cast<int>(m.get<std::int64_t>("escalation", 0));
  s.serverLost = m.get<bool>("server_lost", false);
  return s;
}

void putStatus(Message& m, const ExitStatus& s) {
  m.set("how", static_cast<std::int64_t>(s.how));
  m.set("code", std::int64_t{s.code});
  m.set("signal", std::int64_t{s.signal});
  m.set("escalation", std::int64_t{s.escalation});
  m.set("server_lost", s.serverLost);
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

// ---- the agent's side -------------------------------------------------------

struct RemoteHost::Impl {
  struct Hosted {
    std::unique_ptr<RemoteBackend> proc;
    bool outDone = false;  // its out channel reached its end
    bool stopAsked = false;
    std::thread stopper;   // the stop ladder, off the host's thread
    std::vector<std::pair<std::int64_t, CallFuture>> calls;  // the driver's call id, ours
  };

  struct Start {
    std::uint64_t id;
    std::unique_ptr<RemoteBackend> proc;
    std::string error;  // empty: it runs
  };

  World& world;
  std::shared_ptr<Mailbox> box;
  forklift::detail::UniqueFd wake;
  std::atomic<bool> quit{false};
  mutable std::mutex mu;  // backends' map (size() reads it from other threads)
  std::map<std::uint64_t, Hosted> backends;
  std::map<std::uint64_t, std::thread> starters;      // starts under way
  std::vector<Start> started;                          // starts ended, for startsDone
  std::map<std::uint64_t, Timeout> stopsWaiting;      // stops of starts under way
  std::string where;
  std::thread thread;

  explicit Impl(World& w) : world(w), where(" on " + w.host() + " (rank " + std::to_string(w.rank()) + ")") {}

  void send0(const Message& m) {
    try {
      world.send(0, m);
    } catch (const std::exception& e) {  // a message over the limits: say so instead
      remoteLog()->error("rank {}: cannot send '{}' to the driver: {}", world.rank(), m.command(), e.what());
      if (m.has("call")) {
        Message err(m.command(), {{"call", m.get<std::int64_t>("call")},
                                  {"kind", static_cast<std::int64_t>(CallResult::Kind::Other)},
                                  {"what", std::string("the reply cannot be sent: ") + e.what()}});
        world.send(0, err);
      }
    }
  }

  void onStart(const Message& m) {
    const auto id = static_cast<std::uint64_t>(m.get<std::int64_t>("id"));
    Message reply(replyPrefix(id) + "started", {{"ok", false}});
    try {
      const auto cls = m.get<std::string>("class");
      const auto name = m.get<std::string>("name");
      const Message args(cls, m.get<Map>("args"));
      std::uint64_t recipe = 0;
      {
        Registry& g = registry();
        std::lock_guard lock(g.mu);
        auto it = g.classes.find(cls);
        if (it == g.classes.end())
          throw Error("no process class '" + cls + "' is defined (cluster::defineProcess)" + where);
        it->second.check(args);  // TypeError naming the argument; nothing forked
        recipe = g.recipe;
      }
      if (!forklift::detail::Child::wouldServe(recipe))
        throw Error("the agent's fork server does not run or was started before the class was defined" + where);
      {
        std::lock_guard lock(mu);
        if (backends.count(id) || starters.count(id))
          throw Error("a backend with id " + std::to_string(id) + " runs already" + where);
      }
      ProcessOptions o;
      o.startTimeout = Timeout(m.get<std::int64_t>("start_ms"));
      o.sendTimeout = Timeout(m.get<std::int64_t>("send_ms"));
      o.stopTimeout = Timeout(m.get<std::int64_t>("stop_ms"));
      auto proc = std::make_unique<RemoteBackend>(name, o);
      Message description("remote", {{"class", cls}, {"name", name}, {"args", m.get<Map>("args")}});
      Buffer bytes;
      encode(description, bytes);
      forklift::detail::recipes::bind(proc.get(), recipe, 0, std::string(bytes.data(), bytes.size()));
      // The start waits for preRun__ (up to startTimeout): on a thread of its
      // own, so the other backends are served meanwhile (startsDone takes it).
      std::lock_guard lock(mu);
      starters[id] = std::thread([this, id, p = std::move(proc)]() mutable {
        std::string error;
        try {
          p->start();
        } catch (const std::exception& e) {
          error = e.what();
        }
        {
          std::lock_guard l(mu);
          started.push_back(Start{id, std::move(p), std::move(error)});
        }
        const std::uint64_t one = 1;
        (void)!::write(wake.get(), &one, sizeof one);
      });
      return;
    } catch (const std::exception& e) {
      reply.set("what", std::string(e.what()));
    }
    send0(reply);
  }

  // Starts that ended: their replies, and the backends into the poll set.
  void startsDone() {
    std::vector<Start> done;
    {
      std::lock_guard lock(mu);
      done.swap(started);
    }
    for (Start& st : done) {
      std::thread t;
      std::optional<Timeout> stopEarly;
      {
        std::lock_guard lock(mu);
        t = std::move(starters[st.id]);
        starters.erase(st.id);
        if (auto it = stopsWaiting.find(st.id); it != stopsWaiting.end()) {
          stopEarly = it->second;
          stopsWaiting.erase(it);
        }
      }
      if (t.joinable()) t.join();  // the destructor joined it already
      Message reply(replyPrefix(st.id) + "started", {{"ok", st.error.empty()}});
      if (!st.error.empty()) {
        reply.set("what", st.error);
        send0(reply);
        continue;
      }
      reply.set("pid", static_cast<std::int64_t>(st.proc->pid()));
      {
        std::lock_guard lock(mu);
        backends[st.id].proc = std::move(st.proc);
      }
      send0(reply);
      if (stopEarly)  // the driver gave up on the start meanwhile
        onStop(Message(kStop, {{"id", static_cast<std::int64_t>(st.id)}, {"timeout_ms", stopEarly->count()}}));
    }
  }

  Hosted* find(std::uint64_t id) {
    std::lock_guard lock(mu);
    auto it = backends.find(id);
    return it == backends.end() ? nullptr : &it->second;
  }

  void onSend(const Message& m) {
    const auto id = static_cast<std::uint64_t>(m.get<std::int64_t>("id"));
    const auto command = m.get<std::string>("command");
    Hosted* h = find(id);
    try {
      if (!h) throw ProcessDied("backend " + std::to_string(id) + " has ended" + where);
      h->proc->send(Message(command, m.get<Map>("args")));
    } catch (const std::exception& e) {
      send0(Message(outPrefix(id) + "error",
                    {{"command", command}, {"what", std::string("could not be delivered: ") + e.what()}}));
    }
  }

  void onCall(const Message& m) {
    const auto id = static_cast<std::uint64_t>(m.get<std::int64_t>("id"));
    const auto call = m.get<std::int64_t>("call");
    Hosted* h = find(id);
    try {
      if (!h) throw ProcessDied("backend " + std::to_string(id) + " has ended" + where);
      h->calls.emplace_back(call, h->proc->callAsync(m.get<std::string>("command"), m.get<Map>("args"),
                                                     Timeout(m.get<std::int64_t>("timeout_ms"))));
    } catch (const std::exception& e) {
      answer(id, call, CallResult(std::current_exception()));
    }
  }

  void onStop(const Message& m) {
    const auto id = static_cast<std::uint64_t>(m.get<std::int64_t>("id"));
    {
      std::lock_guard lock(mu);
      if (starters.count(id)) {  // stopped once it started (startsDone)
        stopsWaiting[id] = Timeout(m.get<std::int64_t>("timeout_ms"));
        return;
      }
    }
    Hosted* h = find(id);
    if (!h || h->stopAsked) return;  // it ended (its end was reported) or is stopping
    h->stopAsked = true;
    RemoteBackend* p = h->proc.get();
    const Timeout t(m.get<std::int64_t>("timeout_ms"));
    // The ladder waits up to t + the kill graces: not on the host's thread.
    h->stopper = std::thread([p, t] { p->stop(t); });
  }

  void answer(std::uint64_t id, std::int64_t call, const CallResult& r) {
    Message m(replyPrefix(id) + "reply", {{"call", call}, {"kind", static_cast<std::int64_t>(r.kind())}});
    if (r.ok()) {
      m.set("value", r.get());
    } else {
      m.set("what", r.what());
    }
    send0(m);
  }

  void onCommand(int source, Message& m) {
    if (source != 0) {
      remoteLog()->warn("rank {}: '{}' from rank {}, not the driver; dropped", world.rank(), m.command(), source);
      return;
    }
    try {
      if (m.command() == kStart) {
        onStart(m);
      } else if (m.command() == kSend) {
        onSend(m);
      } else if (m.command() == kCall) {
        onCall(m);
      } else if (m.command() == kStop) {
        onStop(m);
      } else {
        remoteLog()->warn("rank {}: unknown remote-backend command '{}'; dropped", world.rank(), m.command());
      }
    } catch (const std::exception& e) {  // a malformed command: the host goes on
      remoteLog()->warn("rank {}: '{}' refused: {}", world.rank(), m.command(), e.what());
    }
  }

  // Forwards every sendOut__ message and failed send waiting in `h`'s out
  // channel; marks its end.
  void drainOut(std::uint64_t id, Hosted& h) {
    while (!h.outDone) {
      try {
        auto m = h.proc->tryRecv();
        if (!m) return;
        send0(Message(outPrefix(id) + "msg", {{"command", m->command()}, {"args", std::move(m->args())}}));
      } catch (const CommandError& e) {
        send0(Message(outPrefix(id) + "error", {{"command", e.command()}, {"what", std::string(e.what())}}));
      } catch (const PeerClosed&) {
        h.outDone = true;
      } catch (const std::exception& e) {
        remoteLog()->warn("rank {}: backend {}: {}", world.rank(), id, e.what());
        h.outDone = true;
      }
    }
  }

  void finishCalls(std::uint64_t id, Hosted& h) {
    std::erase_if(h.calls, [&](auto& c) {
      if (!c.second.wait(Timeout::zero())) return false;
      answer(id, c.first, c.second.result());
      return true;
    });
  }

  // The backend ended: what it sent first, then its calls' ends, then its status.
  void ended(std::uint64_t id) {
    Hosted* h = find(id);
    drainOut(id, *h);
    const ExitStatus s = h->proc->waitStop(Timeout(10000));  // relayed by the fork server: at once
    finishCalls(id, *h);
    if (h->stopper.joinable()) h->stopper.join();
    Message end(outPrefix(id) + "end", {{"stopped", h->stopAsked}, {"what", s.describe()}});
    Message st(replyPrefix(id) + "ended", {{"stopped", h->stopAsked}});
    putStatus(st, s);
    send0(end);
    send0(st);
    std::unique_ptr<RemoteBackend> gone;
    {
      std::lock_guard lock(mu);
      gone = std::move(backends[id].proc);
      backends.erase(id);
    }
  }

  void run() {
    std::vector<pollfd> fds;
    std::vector<std::pair<std::uint64_t, int>> who;  // per pollfd past the first two: id, 0 out / 1 replies / 2 death
    while (!quit.load()) {
      fds.assign({{box->fd(), POLLIN, 0}, {wake.get(), POLLIN, 0}});
      who.clear();
      Deadline next(kForever);
      {
        std::lock_guard lock(mu);
        for (auto& [id, h] : backends) {
          if (!h.outDone) {
            fds.push_back({h.proc->fd(), POLLIN, 0});
            who.emplace_back(id, 0);
          }
          if (h.proc->replyFd() >= 0 && !h.calls.empty()) {
            fds.push_back({h.proc->replyFd(), POLLIN, 0});
            who.emplace_back(id, 1);
          }
          fds.push_back({h.proc->deathFd(), POLLIN, 0});
          who.emplace_back(id, 2);
          if (!h.calls.empty()) next = Deadline(Timeout(20));  // calls' own deadlines are checked so
        }
      }
      ::poll(fds.data(), fds.size(), next.pollMillis());
      if (fds[1].revents & POLLIN) {
        std::uint64_t n;
        (void)!::read(wake.get(), &n, sizeof n);
      }
      startsDone();
      while (auto r = box->tryRecv()) onCommand(r->source, r->message);
      std::vector<std::uint64_t> dead;
      for (std::size_t i = 0; i < who.size(); ++i) {
        const auto [id, kind] = who[i];
        if (!(fds[i + 2].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        Hosted* h = find(id);
        if (!h) continue;
        if (kind == 0) drainOut(id, *h);
        if (kind == 1) h->proc->pumpReplies();
        if (kind == 2) dead.push_back(id);
      }
      {
        std::vector<std::uint64_t> ids;
        {
          std::lock_guard lock(mu);
          for (auto& b : backends) ids.push_back(b.first);
        }
        for (auto id : ids)
          if (Hosted* h = find(id); h && !h->calls.empty()) finishCalls(id, *h);
      }
      for (auto id : dead) ended(id);
    }
  }
};

RemoteHost::RemoteHost(World& world) : impl_(std::make_unique<Impl>(world)) {
  if (world.isDriver()) throw Error("cluster::RemoteHost: the driver (rank 0) hosts no remote backends");
  impl_->wake.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl_->wake) throw SystemError(errno, "cluster::RemoteHost: cannot create its eventfd");
  impl_->box = world.route(kProc);  // Error when another RemoteHost serves
  impl_->thread = std::thread([this] { impl_->run(); });
}

RemoteHost::~RemoteHost() {
  impl_->quit = true;
  const std::uint64_t one = 1;
  (void)!::write(impl_->wake.get(), &one, sizeof one);
  impl_->thread.join();
  // Starts under way end within their startTimeout.
  for (;;) {
    std::thread t;
    {
      std::lock_guard lock(impl_->mu);
      if (impl_->starters.empty()) break;
      t = std::move(impl_->starters.begin()->second);
      impl_->starters.erase(impl_->starters.begin());
    }
    t.join();
  }
  impl_->startsDone();
  // Backends still running: stopped together, each end reported.
  std::vector<MessageProcess*> running;
  for (auto& [id, h] : impl_->backends) {
    if (h.stopper.joinable()) h.stopper.join();
    running.push_back(h.proc.get());
  }
  if (!running.empty()) MessageProcess::stopAll(running, RemoteOptions{}.stopTimeout);
  std::vector<std::uint64_t> ids;
  for (auto& b : impl_->backends) ids.push_back(b.first);
  for (auto id : ids) {
    try {
      impl_->backends[id].stopAsked = true;
      impl_->ended(id);
    } catch (const std::exception& e) {
      remoteLog()->error("rank {}: backend {}: {}", impl_->world.rank(), id, e.what());
    }
  }
  impl_->box->deliverToInbox();
  impl_->world.unroute(kProc);
}

std::size_t RemoteHost::size() const {
  std::lock_guard lock(impl_->mu);
  return impl_->backends.size();
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
