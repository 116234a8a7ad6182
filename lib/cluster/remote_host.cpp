// forklift::cluster: the agent's side of remote backends, RemoteHost (see
// remote.hpp, "Hosting").
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "child.hpp"
#include "fork_server.hpp"
#include "forklift/cluster/remote.hpp"
#include "forklift/cluster/world.hpp"
#include "forklift/detail/fd.hpp"
#include "forklift/log.hpp"
#include "remote_wire.hpp"

namespace forklift::cluster {

using namespace wire;

namespace {

// The agent's handle of one backend: no commands of its own (they run in the
// child, on the object made there).
class RemoteBackend final : public MessageProcess {
 public:
  RemoteBackend(std::string name, ProcessOptions o) : MessageProcess(std::move(name), std::move(o)) {}
  ~RemoteBackend() override { stop(); }
};

}  // namespace

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

}  // namespace forklift::cluster
