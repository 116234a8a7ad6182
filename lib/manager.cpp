#include "forklift/manager.hpp"

#include <cxxabi.h>
#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <span>
#include <utility>

#include "forklift/fork_server.hpp"
#include "forklift/log.hpp"
#include "loop_sources.hpp"
#include "metrics.hpp"
#include "ring_loop.hpp"

namespace forklift {

// One worker. Pinned on the heap: its handles point to it. The handles live
// apart, freed in their close callbacks (libuv handles do not move and are
// freed only there), so a worker can be restarted or destroyed at once.
struct Manager::Handles {
  uv_poll_t outPoll{};
  uv_poll_t replyPoll{};
  uv_poll_t deathPoll{};
  int open = 0;  // handles not closed yet
};

struct Manager::Worker {
  Manager* manager = nullptr;
  std::unique_ptr<MessageProcess> process;
  Handles* handles = nullptr;  // set while attached
  bool outOpen = false;        // outPoll active
  bool alive = false;          // deathPoll active, exit not reported yet
  int inCallback = 0;          // a callback of this worker is on the stack
  Pending pending = Pending::None;
  std::unique_ptr<MessageProcess> replacement;  // for Pending::Replace
  std::any data;
  // Set by route(): this worker's messages and exit go there.
  std::function<void(MessageProcess&, Message&)> routedMessage;
  std::function<void(MessageProcess&, const ExitStatus&)> routedExit;
};

namespace {

std::shared_ptr<spdlog::logger> managerLog() {
  static auto log = makeLogger("Manager");
  return log;
}

void closeHandle(uv_handle_t* h) {
  if (!uv_is_closing(h)) uv_close(h, nullptr);
}

std::string demangle(const std::type_info& t) {
  int status = 0;
  char* d = abi::__cxa_demangle(t.name(), nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : t.name();
  std::free(d);
  return out;
}

// The manager whose loop thread is reading replies: work it posts meanwhile
// runs when the reading ends, without ringing the loop's wake-up. A
// thread_local: a post from any other thread still rings.
thread_local const Manager* collectingPosts = nullptr;

class CollectPosts {
 public:
  explicit CollectPosts(const Manager* m) : before_(std::exchange(collectingPosts, m)) {}
  ~CollectPosts() { collectingPosts = before_; }
  CollectPosts(const CollectPosts&) = delete;
  CollectPosts& operator=(const CollectPosts&) = delete;

 private:
  const Manager* before_;
};

// Marks a worker's callback on the stack: what it asks for itself waits.
class InCallback {
 public:
  explicit InCallback(int& n) : n_(n) { ++n_; }
  ~InCallback() { --n_; }
  InCallback(const InCallback&) = delete;
  InCallback& operator=(const InCallback&) = delete;

 private:
  int& n_;
};

}  // namespace

Manager::Manager() : Manager(Options{}) {}

Manager::Manager(Options options) : options_(options) {
  if (const int r = uv_loop_init(&loop_); r < 0) throw Error(std::string("cannot create the manager loop: ") + uv_strerror(r));
  uv_async_init(&loop_, &wake_, [](uv_async_t* a) {
    auto* self = static_cast<Manager*>(a->data);
    self->runPosted();
    if (self->stopRequested_) uv_stop(&self->loop_);
  });
  wake_.data = this;
  uv_prepare_init(&loop_, &prepare_);
  prepare_.data = this;
  uv_timer_init(&loop_, &callbackTimer_);
  callbackTimer_.data = this;
  uv_timer_init(&loop_, &stepTimer_);
  stepTimer_.data = this;
  uv_signal_init(&loop_, &sigint_);
  uv_signal_init(&loop_, &sigterm_);
  sigint_.data = this;
  sigterm_.data = this;
  sources_ = std::make_unique<detail::LoopSources>(&loop_, [](const std::string& where, const std::string& what) {
    managerLog()->error("{} threw: {}", where, what);
  });
}

Manager::~Manager() {
  if (thread_.joinable()) stopThread();
  if (ran_ && !ended_) {
    try {
      finish();
    } catch (const std::exception& e) {
      managerLog()->error("the manager's shutdown failed: {}", e.what());
    }
  }
  // Workers that run() did not stop stop below, in their destructors,
  // after their handles are gone.
  sources_->closeAll();
  for (auto& w : workers_) detach(*w);
  closeHandle(reinterpret_cast<uv_handle_t*>(&wake_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&sigint_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&sigterm_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&prepare_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&callbackTimer_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&stepTimer_));
  uv_run(&loop_, UV_RUN_DEFAULT);
  uv_loop_close(&loop_);
  sources_.reset();
  byProcess_.clear();
  workers_.clear();
}

// ---------------------------------------------------------------- setting up

void Manager::addWorker(std::unique_ptr<MessageProcess> p) {
  if (!p) throw Error("Manager::add: no worker (null)");
  if (p->started()) throw Error("Manager::add: " + p->name() + " is already started; the manager starts its workers");
  p->ignoreSigint();
  auto w = std::make_unique<Worker>();
  w->manager = this;
  w->process = std::move(p);
  Worker& ref = *w;
  byProcess_[ref.process.get()] = &ref;
  workers_.push_back(std::move(w));
  if (ran_ && !stopRequested_) {
    // Added while running: start and watch it now.
    ref.process->start();
    attach(ref);
  }
}

MessageProcess& Manager::worker(std::size_t i) {
  if (i >= workers_.size())
    throw Error("Manager::worker: index " + std::to_string(i) + " out of range (" + std::to_string(workers_.size()) +
                " workers)");
  return *workers_[i]->process;
}

Manager::Worker& Manager::find(const MessageProcess& p, const char* method) const {
  auto it = byProcess_.find(&p);
  if (it == byProcess_.end())
    throw Error(std::string("Manager::") + method + ": " + p.fullName() + " is not a worker of this manager");
  return *it->second;
}

std::size_t Manager::indexOf(const MessageProcess& p) const {
  const Worker& w = find(p, "indexOf");
  for (std::size_t i = 0; i < workers_.size(); ++i)
    if (workers_[i].get() == &w) return i;
  return workers_.size();  // not reached: byProcess_ and workers_ agree
}

std::any& Manager::dataOf(MessageProcess& p) { return find(p, "data").data; }

void Manager::route(MessageProcess& p, std::function<void(MessageProcess&, Message&)> onMessage,
                    std::function<void(MessageProcess&, const ExitStatus&)> onExit) {
  Worker& w = find(p, "route");
  w.routedMessage = std::move(onMessage);
  w.routedExit = std::move(onExit);
}

void Manager::throwNotA(const MessageProcess& w, const std::type_info& wanted) {
  throw Error("Manager: worker " + w.fullName() + " is not a " + demangle(wanted));
}

void Manager::throwDataType(const MessageProcess& w, const std::type_info& has, const std::type_info& wanted) {
  throw Error("Manager::data: the data of " + w.fullName() + " is a " + demangle(has) + ", not a " +
              demangle(wanted));
}

// ---------------------------------------------------------------- remove, restart, replace

void Manager::remove(MessageProcess& worker) { schedule(find(worker, "remove"), Pending::Remove, nullptr); }

void Manager::restart(MessageProcess& worker) { schedule(find(worker, "restart"), Pending::Restart, nullptr); }

void Manager::replaceWorker(MessageProcess& old, std::unique_ptr<MessageProcess> fresh) {
  Worker& w = find(old, "replace");
  if (!fresh) throw Error("Manager::replace: no replacement (null) for " + old.fullName());
  if (fresh->started())
    throw Error("Manager::replace: " + fresh->name() + " is already started; the manager starts its workers");
  if (byProcess_.count(fresh.get())) throw Error("Manager::replace: " + fresh->fullName() + " is a worker already");
  fresh->ignoreSigint();
  schedule(w, Pending::Replace, std::move(fresh));
}

void Manager::schedule(Worker& w, Pending op, std::unique_ptr<MessageProcess> fresh) {
  // A replacement wins over what was asked before; a removal over a restart.
  if (w.pending == Pending::None || op == Pending::Replace || (op == Pending::Remove && w.pending == Pending::Restart)) {
    w.pending = op;
    w.replacement = std::move(fresh);
  }
  if (w.inCallback > 0 || shuttingDown_ || operating_) {
    // Later, off this worker's stack: a posted job runs between callbacks.
    if (!pendingPosted_) {
      pendingPosted_ = true;
      post([this] { runPending(); });
    }
    return;
  }
  operate(w);  // now; what start() throws reaches the caller
}

void Manager::operate(Worker& w) {
  const Pending op = std::exchange(w.pending, Pending::None);
  if (op == Pending::None) return;
  operating_ = true;
  struct Done {
    bool& flag;
    ~Done() { flag = false; }
  } done{operating_};
  if (op == Pending::Restart) {
    restartWorker(w);
  } else {
    erase(w, op == Pending::Replace ? std::move(w.replacement) : nullptr);
  }
}

void Manager::runPending() {
  pendingPosted_ = false;
  for (bool again = true; again;) {
    again = false;
    for (auto& up : workers_) {
      Worker& w = *up;
      if (w.pending == Pending::None || w.inCallback > 0) continue;
      const bool restart = w.pending == Pending::Restart;
      const std::string who = w.process->fullName();
      try {
        operate(w);
      } catch (const std::exception& e) {
        managerLog()->error("{} of {} failed: {}", restart ? "the restart" : "the replacement", who, e.what());
      }
      again = true;  // workers_ may have changed: look again from the start
      break;
    }
  }
}

void Manager::stopWorker(Worker& w) {
  if (w.alive) {
    // The one ladder; the exit is reported below like any other.
    MessageProcess* self = w.process.get();
    MessageProcess::stopAll(std::span<MessageProcess* const>(&self, 1), options_.stopTimeout);
    reapWorker(w);
  }
  detach(w);
}

void Manager::erase(Worker& w, std::unique_ptr<MessageProcess> fresh) {
  stopWorker(w);
  auto it = std::find_if(workers_.begin(), workers_.end(), [&](const auto& p) { return p.get() == &w; });
  std::unique_ptr<Worker> gone = std::move(*it);
  byProcess_.erase(gone->process.get());
  const bool abandoned = gone->process->started() &&
                         gone->process->waitStop(Timeout::zero()).how == ExitStatus::How::Abandoned;
  Worker* added = nullptr;
  if (fresh) {
    auto nw = std::make_unique<Worker>();
    nw->manager = this;
    nw->process = std::move(fresh);
    nw->routedMessage = gone->routedMessage;
    nw->routedExit = gone->routedExit;
    added = nw.get();
    byProcess_[added->process.get()] = added;
    *it = std::move(nw);  // the same index
  } else {
    workers_.erase(it);
  }
  if (abandoned) {
    // Its thread still runs inside the object: destroying it would pull the
    // object from under that thread. It is left to the end of the process.
    managerLog()->error("{}: its in-process backend thread is stuck and was abandoned; the object is leaked",
                        gone->process->fullName());
    static std::mutex abandonedMutex;
    static std::vector<std::unique_ptr<MessageProcess>>* abandoned = new std::vector<std::unique_ptr<MessageProcess>>;
    std::lock_guard lock(abandonedMutex);
    abandoned->push_back(std::move(gone->process));  // reachable, never destroyed
  }
  gone.reset();  // descriptors, shared memory and user data go with it
  if (added && ran_ && !stopRequested_) {
    added->process->start();
    attach(*added);
  }
}

void Manager::restartWorker(Worker& w) {
  stopWorker(w);
  if (!ran_ || stopRequested_) return;
  w.process->start();
  attach(w);
}

void Manager::watch(int fd, std::function<void(int)> fn) { sources_->watch(fd, std::move(fn), false); }
void Manager::unwatch(int fd) { sources_->unwatch(fd); }
void Manager::readRing(const RingReader& reader, std::function<void(ReadSlot&)> onSlot,
                       std::function<void(const Error&)> onEnd) {
  detail::readRingOn(*sources_, reader, std::move(onSlot), std::move(onEnd), managerLog());
}
// The loop's clock is read once per turn; a timer set long after the last
// turn (a loop driven with runUntil sleeps between waits) counts from now.
std::uint64_t Manager::after(Timeout delay, std::function<void()> fn) {
  uv_update_time(&loop_);
  return sources_->addTimer(delay, Timeout::zero(), std::move(fn));
}
std::uint64_t Manager::every(Timeout period, std::function<void()> fn) {
  // libuv takes a repeat of 0 for "once": a period under a tick would
  // silently become after().
  if (period < Timeout(1))
    throw Error("Manager::every: the period must be 1 ms or more, not " + std::to_string(period.count()) + " ms");
  uv_update_time(&loop_);
  return sources_->addTimer(period, period, std::move(fn));
}
void Manager::cancel(std::uint64_t id) { sources_->cancel(id); }

// ---------------------------------------------------------------- workers

void Manager::startProcesses() {
  for (auto& w : workers_)
    if (!w->process->started()) w->process->start();
}

void Manager::attach(Worker& w) {
  if (w.handles) return;
  MessageProcess& p = *w.process;
  Channel& ch = p.outChannel();
  // The manager drains each wake-up in full, so reading greedily is safe
  // and saves a system call per message.
  ch.setReadMode(ReadMode::Greedy);
  auto* h = new Handles;
  auto fail = [&](const std::string& what, int r) {
    h->outPoll.data = h;
    h->replyPoll.data = h;
    h->deathPoll.data = h;
    closeHandles(h);
    throw Error("Manager: cannot watch " + what + p.fullName() + ": " + uv_strerror(r));
  };
  if (const int r = uv_poll_init(&loop_, &h->outPoll, ch.fd()); r < 0) {
    delete h;
    throw Error("Manager: cannot watch " + p.fullName() + ": " + uv_strerror(r));
  }
  h->open = 1;
  ch.assumeNonBlocking();  // uv_poll_init set O_NONBLOCK
  if (const int r = uv_poll_init(&loop_, &h->replyPoll, p.replyFd()); r < 0) fail("the replies of ", r);
  h->open = 2;
  if (const int r = uv_poll_init(&loop_, &h->deathPoll, p.deathFd()); r < 0) fail("the exit of ", r);
  h->open = 3;
  h->outPoll.data = &w;
  h->replyPoll.data = &w;
  h->deathPoll.data = &w;
  // Callbacks of calls to this worker run on the loop, whoever read them.
  p.setCallbackDispatcher([this](std::function<void()> fn) { post(std::move(fn)); });
  w.handles = h;
  w.outOpen = true;
  w.alive = true;
  uv_poll_start(&h->outPoll, UV_READABLE | UV_DISCONNECT, &Manager::onWorkerReadable);
  uv_poll_start(&h->replyPoll, UV_READABLE, &Manager::onWorkerReplies);
  uv_poll_start(&h->deathPoll, UV_READABLE, &Manager::onWorkerDeath);
}

// Closes the first `h->open` handles; the last close callback frees them.
void Manager::closeHandles(Handles* h) {
  uv_poll_t* polls[] = {&h->outPoll, &h->replyPoll, &h->deathPoll};
  const int n = h->open;
  if (n == 0) {
    delete h;
    return;
  }
  for (int i = 0; i < n; ++i) {
    polls[i]->data = h;  // no poll callback comes after uv_close
    uv_close(reinterpret_cast<uv_handle_t*>(polls[i]), [](uv_handle_t* handle) {
      auto* hs = static_cast<Handles*>(handle->data);
      if (--hs->open == 0) delete hs;
    });
  }
}

void Manager::detach(Worker& w) {
  if (!w.handles) return;
  Handles* h = std::exchange(w.handles, nullptr);
  w.outOpen = false;
  closeHandles(h);
}

template <class Fn>
void Manager::guarded(const char* what, MessageProcess* worker, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    managerLog()->error("{} threw{}{}: {}", what, worker ? " for " : "", worker ? worker->fullName() : "", e.what());
  } catch (...) {
    managerLog()->error("{} threw{}{}: a non-standard exception", what, worker ? " for " : "",
                        worker ? worker->fullName() : "");
  }
}

void Manager::drain(Worker& w, Drain until) {
  Channel& ch = w.process->outChannel();
  while (w.outOpen) {
    std::optional<Message> m;
    try {
      // recv(), not the channel: it turns a failed command into CommandError.
      m = w.process->tryRecv();
    } catch (const CommandError& e) {
      {
        InCallback mark(w.inCallback);
        guarded("the error handler", w.process.get(), [&] { handleError(*w.process, e.command(), e.what()); });
      }
      if (until == Drain::Buffered && !ch.buffered()) return;
      continue;
    } catch (const StreamCorrupt& e) {
      managerLog()->error("{}: {}; no more messages are read from it", w.process->fullName(), e.what());
      w.outOpen = false;
      if (w.handles) uv_poll_stop(&w.handles->outPoll);
      return;
    } catch (const PeerClosed&) {
      w.outOpen = false;
      if (w.handles) uv_poll_stop(&w.handles->outPoll);
      return;
    } catch (const Error& e) {  // a malformed message: reported, the next one still comes
      managerLog()->error("{}: {}", w.process->fullName(), e.what());
      continue;
    }
    if (!m) return;
    {
      InCallback mark(w.inCallback);
      guarded("the message handler", w.process.get(), [&] {
        if (w.routedMessage)
          w.routedMessage(*w.process, *m);
        else
          handleMessage(*w.process, *m);
      });
    }
    // Whole frames already read are handled now; for more, the loop wakes
    // us again (level-triggered), so one wake-up costs one read.
    if (until == Drain::Buffered && !ch.buffered()) return;
  }
}

void Manager::onWorkerReadable(uv_poll_t* h, int, int) {
  auto* w = static_cast<Worker*>(h->data);
  w->manager->drain(*w, Drain::Buffered);
}

void Manager::onWorkerReplies(uv_poll_t* h, int, int) {
  auto* w = static_cast<Worker*>(h->data);
  Manager& self = *w->manager;
  {
    // The callbacks of these replies are kept for below, not rung through
    // the wake-up eventfd: that would cost a write, a read and a second
    // turn of the loop per wake-up.
    const CollectPosts collect(&self);
    self.guarded("a reply", w->process.get(), [&] { w->process->pumpReplies(); });
  }
  // Off the worker's stack (it may be replaced by them); w is not used after.
  self.runPosted();
}

void Manager::reapWorker(Worker& w) {
  // Everything the worker sent before it died comes before its exit: the
  // socket of a dead process holds its last messages, then EOF.
  drain(w, Drain::Socket);
  const ExitStatus s = w.process->waitStop(Timeout(1000));
  w.alive = false;
  w.process->pumpReplies();  // calls it outlived fail now (their callbacks are posted)
  detach(w);
  InCallback mark(w.inCallback);
  guarded("the exit handler", w.process.get(), [&] {
    if (w.routedExit)
      w.routedExit(*w.process, s);
    else
      handleExit(*w.process, s);
  });
}

void Manager::onWorkerDeath(uv_poll_t* h, int, int) {
  auto* w = static_cast<Worker*>(h->data);
  if (w->alive) w->manager->reapWorker(*w);
}

void Manager::handleMessage(MessageProcess& worker, Message& m) {
  if (onMessage_) onMessage_(worker, m);
}

void Manager::handleError(MessageProcess& worker, const std::string& command, const std::string& what) {
  if (onError_) {
    onError_(worker, command, what);
    return;
  }
  unhandledErrors_ = true;
  managerLog()->error("{}: command '{}' failed: {}", worker.fullName(), command, what);
}

void Manager::handleExit(MessageProcess& worker, const ExitStatus& status) {
  if (onExit_) {
    onExit_(worker, status);
  } else if (!stopRequested_ && !status.ok()) {
    managerLog()->warn("{} ended: {}", worker.fullName(), status.describe());
  }
}

// ---------------------------------------------------------------- running

void Manager::begin() {
  ran_ = true;
  detail::setMetricsIdentity("manager", "");
  startProcesses();
  for (auto& w : workers_) attach(*w);
  startThreads();
  if (options_.handleSignals) {
    auto onSignal = [](uv_signal_t* s, int sig) {
      auto* self = static_cast<Manager*>(s->data);
      managerLog()->info("{}: stopping the workers", sig == SIGINT ? "SIGINT" : "SIGTERM");
      self->requestStop();
    };
    uv_signal_start(&sigint_, onSignal, SIGINT);
    uv_signal_start(&sigterm_, onSignal, SIGTERM);
  }
  uv_prepare_start(&prepare_, [](uv_prepare_t* p) { static_cast<Manager*>(p->data)->armCallbackTimer(); });
  running_ = true;
  runPosted();  // work posted before the start
}

int Manager::end() {
  ended_ = true;
  running_ = false;
  int code = shutdown();
  uv_prepare_stop(&prepare_);
  uv_timer_stop(&callbackTimer_);
  uv_timer_stop(&stepTimer_);
  uv_signal_stop(&sigint_);
  uv_signal_stop(&sigterm_);
  {
    std::lock_guard lock(postMutex_);
    posted_.clear();  // the loop has ended: nobody will run them
  }
  bool closed = false;
  guarded("close()", nullptr, [&] {
    close();
    closed = true;
  });
  if (!closed || unhandledErrors_) code = 1;
  result_ = code;
  return code;
}

int Manager::run() {
  if (ran_) throw Error("Manager::run: a manager runs once");
  begin();
  if (!stopRequested_) {
    inLoop_ = true;
    uv_run(&loop_, UV_RUN_DEFAULT);
    inLoop_ = false;
  }
  return end();
}

bool Manager::runUntil(const std::function<bool()>& done, Timeout timeout) {
  if (inLoop_)
    throw Error("Manager::runUntil: called from a callback of this manager's loop (loops do not nest); "
                "wait outside the callback, or use the callback forms");
  if (thread_.joinable()) throw Error("Manager::runUntil: the manager runs in its own thread (runAsThread)");
  if (ended_) return done();
  if (!ran_) begin();
  const Deadline d(timeout);
  // A zero timeout is one turn that does not wait: a Deadline of zero has
  // passed before the first turn, so it is not asked.
  const bool once = timeout <= Timeout::zero();
  for (bool turned = false; !stopRequested_; turned = true) {
    if (done()) return true;
    if (once ? turned : d.expired()) return false;
    if (!once && !d.forever()) {
      uv_update_time(&loop_);
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(d.remaining()).count();
      uv_timer_start(&stepTimer_, [](uv_timer_t*) {}, static_cast<std::uint64_t>(ms), 0);
    }
    inLoop_ = true;
    uv_run(&loop_, once ? UV_RUN_NOWAIT : UV_RUN_ONCE);
    // Work the turn posted (an exit handler's follow-up, say) runs in it
    // too, not one wake-up later: a poll sees it. (Posted work is guarded.)
    if (once) runPosted();
    inLoop_ = false;
    uv_timer_stop(&stepTimer_);
  }
  end();
  return done();
}

int Manager::finish() {
  if (inLoop_) throw Error("Manager::finish: called from a callback of this manager's loop");
  if (thread_.joinable()) return stopThread();
  if (ended_ || !ran_) return result_;
  requestStop();
  return end();
}

void Manager::post(std::function<void()> fn) {
  {
    std::lock_guard lock(postMutex_);
    posted_.push_back(std::move(fn));
  }
  if (collectingPosts != this) uv_async_send(&wake_);
}

void Manager::runPosted() {
  std::vector<std::function<void()>> work;
  {
    std::lock_guard lock(postMutex_);
    work.swap(posted_);
  }
  for (auto& fn : work) guarded("posted work", nullptr, fn);
}

// Before the loop sleeps: wake it at the earliest deadline of a callback
// call, so an unanswered call's callback gets its TimeoutError in time.
void Manager::armCallbackTimer() {
  std::optional<Deadline::Clock::time_point> next;
  for (auto& w : workers_) {
    if (!w->handles) continue;
    auto d = w->process->nextCallbackDeadline();
    if (d && (!next || *d < *next)) next = d;
  }
  if (!next) {
    uv_timer_stop(&callbackTimer_);
    return;
  }
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(*next - Deadline::Clock::now()).count();
  uv_timer_start(
      &callbackTimer_,
      [](uv_timer_t* t) {
        auto* self = static_cast<Manager*>(t->data);
        for (auto& w : self->workers_)
          if (w->handles) self->guarded("a reply", w->process.get(), [&] { w->process->pumpReplies(); });
      },
      static_cast<std::uint64_t>(std::max<std::int64_t>(0, left)), 0);
}

void Manager::requestStop() {
  stopRequested_ = true;
  uv_async_send(&wake_);
}

int Manager::shutdown() {
  stopRequested_ = true;
  shuttingDown_ = true;
  std::vector<Worker*> live;
  std::vector<MessageProcess*> processes;
  for (auto& w : workers_)
    if (w->alive) {
      live.push_back(w.get());
      processes.push_back(w->process.get());
    }
  // All asked at once, waited for against one deadline: N workers stop in
  // the time of the slowest, not of their sum.
  MessageProcess::stopAll(processes, options_.stopTimeout);
  int code = 0;
  for (Worker* w : live) {
    const ExitStatus s = w->process->waitStop(Timeout::zero());
    if (!s.ok() || s.escalation) code = 1;
    reapWorker(*w);  // last messages, then the exit callback
  }
  shuttingDown_ = false;
  runPosted();  // callbacks of calls the shutdown ended, removals asked meanwhile
  return code;
}

void Manager::runAsThread() {
  if (thread_.joinable()) throw Error("Manager::runAsThread: already running");
  if (options_.forkServer && !forkServer_) {
    // Restarts from the loop's thread are forked by the server's copies of
    // the workers, made now, before any thread.
    try {
      forkServer_ = std::make_unique<ForkServer>();
    } catch (const Error& e) {
      managerLog()->warn("no fork server ({}): restarting a worker from the manager's thread needs allowThreads",
                         e.what());
    }
  }
  startProcesses();  // fork before the thread exists
  thread_ = std::thread([this] { threadResult_ = run(); });
}

int Manager::stopThread() {
  if (!thread_.joinable()) return threadResult_;
  requestStop();
  thread_.join();
  forkServer_.reset();  // its workers have ended: the server goes now
  return threadResult_;
}

}  // namespace forklift
