#include "forklift/manager.hpp"

#include <signal.h>

#include <algorithm>

#include "forklift/log.hpp"
#include "loop_sources.hpp"
#include "metrics.hpp"

namespace forklift {

// One worker and the two handles that watch it. Pinned on the heap: libuv
// handles do not move.
struct Manager::Worker {
  Manager* manager = nullptr;
  std::unique_ptr<MessageProcess> process;
  uv_poll_t outPoll{};
  uv_poll_t replyPoll{};
  uv_poll_t deathPoll{};
  bool attached = false;  // the three handles initialised
  bool outOpen = false;   // outPoll active
  bool alive = false;     // deathPoll active, exit not reported yet
};

namespace {

std::shared_ptr<spdlog::logger> managerLog() {
  static auto log = makeLogger("Manager");
  return log;
}

void closeHandle(uv_handle_t* h) {
  if (!uv_is_closing(h)) uv_close(h, nullptr);
}

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
  // Workers that run() did not stop stop below, in their destructors,
  // after their handles are gone.
  sources_->closeAll();
  for (auto& w : workers_) detach(*w);
  closeHandle(reinterpret_cast<uv_handle_t*>(&wake_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&sigint_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&sigterm_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&prepare_));
  closeHandle(reinterpret_cast<uv_handle_t*>(&callbackTimer_));
  uv_run(&loop_, UV_RUN_DEFAULT);
  uv_loop_close(&loop_);
  sources_.reset();
  workers_.clear();
}

// ---------------------------------------------------------------- setting up

void Manager::addWorker(std::unique_ptr<MessageProcess> p) {
  if (p->started()) throw Error("Manager::add: " + p->name() + " is already started; the manager starts its workers");
  p->ignoreSigint();
  auto w = std::make_unique<Worker>();
  w->manager = this;
  w->process = std::move(p);
  workers_.push_back(std::move(w));
  if (ran_ && !stopRequested_) {
    // Added while running: start and watch it now.
    workers_.back()->process->start();
    attach(*workers_.back());
  }
}

MessageProcess& Manager::worker(std::size_t i) { return *workers_.at(i)->process; }

void Manager::watch(int fd, std::function<void(int)> fn) { sources_->watch(fd, std::move(fn), false); }
void Manager::unwatch(int fd) { sources_->unwatch(fd); }
std::uint64_t Manager::after(Timeout delay, std::function<void()> fn) {
  return sources_->addTimer(delay, Timeout::zero(), std::move(fn));
}
std::uint64_t Manager::every(Timeout period, std::function<void()> fn) {
  return sources_->addTimer(period, period, std::move(fn));
}
void Manager::cancel(std::uint64_t id) { sources_->cancel(id); }

// ---------------------------------------------------------------- workers

void Manager::startProcesses() {
  for (auto& w : workers_)
    if (!w->process->started()) w->process->start();
}

void Manager::attach(Worker& w) {
  if (w.attached) return;
  MessageProcess& p = *w.process;
  Channel& ch = p.outChannel();
  // The manager drains each wake-up in full, so reading greedily is safe
  // and saves a system call per message.
  ch.setReadMode(ReadMode::Greedy);
  if (const int r = uv_poll_init(&loop_, &w.outPoll, ch.fd()); r < 0)
    throw Error("Manager: cannot watch " + p.fullName() + ": " + uv_strerror(r));
  ch.assumeNonBlocking();  // uv_poll_init set O_NONBLOCK
  if (const int r = uv_poll_init(&loop_, &w.replyPoll, p.replyFd()); r < 0) {
    closeHandle(reinterpret_cast<uv_handle_t*>(&w.outPoll));
    throw Error("Manager: cannot watch the replies of " + p.fullName() + ": " + uv_strerror(r));
  }
  if (const int r = uv_poll_init(&loop_, &w.deathPoll, p.deathFd()); r < 0) {
    closeHandle(reinterpret_cast<uv_handle_t*>(&w.outPoll));
    closeHandle(reinterpret_cast<uv_handle_t*>(&w.replyPoll));
    throw Error("Manager: cannot watch the exit of " + p.fullName() + ": " + uv_strerror(r));
  }
  w.outPoll.data = &w;
  w.replyPoll.data = &w;
  w.deathPoll.data = &w;
  // Callbacks of calls to this worker run on the loop, whoever read them.
  p.setCallbackDispatcher([this](std::function<void()> fn) { post(std::move(fn)); });
  w.attached = true;
  w.outOpen = true;
  w.alive = true;
  uv_poll_start(&w.outPoll, UV_READABLE | UV_DISCONNECT, &Manager::onWorkerReadable);
  uv_poll_start(&w.replyPoll, UV_READABLE, &Manager::onWorkerReplies);
  uv_poll_start(&w.deathPoll, UV_READABLE, &Manager::onWorkerDeath);
}

void Manager::detach(Worker& w) {
  if (!w.attached) return;
  w.attached = false;
  w.outOpen = false;
  closeHandle(reinterpret_cast<uv_handle_t*>(&w.outPoll));
  closeHandle(reinterpret_cast<uv_handle_t*>(&w.replyPoll));
  closeHandle(reinterpret_cast<uv_handle_t*>(&w.deathPoll));
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
      guarded("the error handler", w.process.get(), [&] { handleError(*w.process, e.command(), e.what()); });
      if (until == Drain::Buffered && !ch.buffered()) return;
      continue;
    } catch (const StreamCorrupt& e) {
      managerLog()->error("{}: {}; no more messages are read from it", w.process->fullName(), e.what());
      w.outOpen = false;
      uv_poll_stop(&w.outPoll);
      return;
    } catch (const PeerClosed&) {
      w.outOpen = false;
      uv_poll_stop(&w.outPoll);
      return;
    } catch (const Error& e) {  // a malformed message: reported, the next one still comes
      managerLog()->error("{}: {}", w.process->fullName(), e.what());
      continue;
    }
    if (!m) return;
    guarded("the message handler", w.process.get(), [&] { handleMessage(*w.process, *m); });
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
  w->manager->guarded("a reply", w->process.get(), [&] { w->process->pumpReplies(); });
}

void Manager::reapWorker(Worker& w) {
  // Everything the worker sent before it died comes before its exit: the
  // socket of a dead process holds its last messages, then EOF.
  drain(w, Drain::Socket);
  const ExitStatus s = w.process->waitStop(Timeout(1000));
  w.alive = false;
  w.process->pumpReplies();  // calls it outlived fail now (their callbacks are posted)
  detach(w);
  guarded("the exit handler", w.process.get(), [&] { handleExit(*w.process, s); });
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

int Manager::run() {
  if (ran_) throw Error("Manager::run: a manager runs once");
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
  runPosted();  // work posted before run()
  if (!stopRequested_) uv_run(&loop_, UV_RUN_DEFAULT);
  running_ = false;
  int code = shutdown();
  uv_prepare_stop(&prepare_);
  uv_timer_stop(&callbackTimer_);
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
  return code;
}

void Manager::post(std::function<void()> fn) {
  {
    std::lock_guard lock(postMutex_);
    posted_.push_back(std::move(fn));
  }
  uv_async_send(&wake_);
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
    if (!w->attached) continue;
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
          if (w->attached) self->guarded("a reply", w->process.get(), [&] { w->process->pumpReplies(); });
      },
      static_cast<std::uint64_t>(std::max<std::int64_t>(0, left)), 0);
}

void Manager::requestStop() {
  stopRequested_ = true;
  uv_async_send(&wake_);
}

int Manager::shutdown() {
  stopRequested_ = true;
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
  runPosted();  // callbacks of calls the shutdown ended
  return code;
}

void Manager::runAsThread() {
  if (thread_.joinable()) throw Error("Manager::runAsThread: already running");
  startProcesses();  // fork before the thread exists
  thread_ = std::thread([this] { threadResult_ = run(); });
}

int Manager::stopThread() {
  if (!thread_.joinable()) return threadResult_;
  requestStop();
  thread_.join();
  return threadResult_;
}

}  // namespace forklift
