#include "forklift/pool.hpp"

#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <thread>
#include <unordered_map>

#include "forklift/log.hpp"
#include "forklift/manager.hpp"
#include "fork_server.hpp"
#include "timeout_text.hpp"

namespace forklift {
namespace detail {

namespace {

std::shared_ptr<spdlog::logger> poolLog() {
  static auto log = makeLogger("WorkerPool");
  return log;
}

// Resident memory of a forked worker (0 in-process, or when unknown).
std::size_t residentBytes(const MessageProcess& p) {
  if (p.pid() <= 0 || p.pid() == ::getpid()) return 0;
  const std::string path = "/proc/" + std::to_string(p.pid()) + "/statm";
  std::FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return 0;
  unsigned long size = 0, resident = 0;
  const int n = std::fscanf(f, "%lu %lu", &size, &resident);
  std::fclose(f);
  return n == 2 ? resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) : 0;
}

}  // namespace

// ---------------------------------------------------------------- the core

class PoolCore : public std::enable_shared_from_this<PoolCore> {
 public:
  // On `manager`'s loop, or (null) on a loop of its own.
  PoolCore(Manager* manager, WorkerPool::Factory factory, PoolOptions options);
  ~PoolCore();

  struct Task {
    std::uint64_t id = 0;
    std::string command;
    Map args;
    Timeout timeout{kForever};
    int retriesLeft = 0;
    int attempts = 0;
    std::uint64_t token = 0;  // the dispatch a reply must match (see send)
    std::uint64_t sends = 0;  // dispatches so far
    std::size_t slot = kNoSlot;
    std::size_t lastSlot = 0;
    std::shared_ptr<TaskState> state;
  };
  struct Slot {
    std::size_t index = 0;
    MessageProcess* process = nullptr;
    std::deque<Task*> inFlight;  // in send order; the front one runs
    std::uint64_t timer = 0;     // the front task's deadline (0: none)
    bool ready = false;          // takes tasks
    bool recycle = false;        // replace once idle
    bool replacing = false;      // its exit is ours: not a death
    int startFailures = 0;       // replacements that did not start, in a row
    bool restartCounted = false; // the replacement under way counts in restarts()
    bool refilling = false;      // takes tasks up to queueDepth (see hasRoom)
    std::uint64_t timedOut = 0;  // killed for this task's timeout (its id)
    std::size_t tasksDone = 0;
  };
  static constexpr std::size_t kNoSlot = static_cast<std::size_t>(-1);

  void start();
  void checkOwner(const char* method) const;
  TaskFuture<Value> submit(const std::string& command, Map args, const TaskOptions& o);
  bool waitFor(const std::function<bool()>& done, Timeout timeout, const char* method);
  bool finished() const { return completed_ == submitted_; }
  void stopAll(const std::string& why);
  void finalize();
  void callAll(const std::string& command, const Map& args);
  void restartAll();
  void factoryChanged();
  bool taskDone(const TaskState& s) const { return s.done; }
  bool taskQueued(std::uint64_t id) const;

  WorkerPool::Factory factory_;
  std::uint64_t recipe_ = 0;  // the factory, for a fork server (fork_server.hpp)
  PoolOptions options_;
  std::thread::id owner_;
  std::unique_ptr<Manager> own_;  // the pool's own loop (none on a user's manager)
  Manager* loop_;                 // the loop the workers are on: own_ or the user's
  std::vector<Slot> slots_;
  std::unordered_map<const MessageProcess*, std::size_t> slotOf_;
  std::unordered_map<std::uint64_t, std::unique_ptr<Task>> tasks_;  // not done
  std::deque<Task*> queue_;
  // Workers that died on their own (not killed by the pool), within
  // restartWindow: when and how. The restart limit counts these.
  std::deque<std::pair<Deadline::Clock::time_point, std::string>> deaths_;
  std::uint64_t nextId_ = 0;
  std::size_t submitted_ = 0;  // this batch
  std::size_t completed_ = 0;  // this batch
  std::size_t failed_ = 0;
  std::size_t restarts_ = 0;
  bool suspended_ = false;
  bool finalized_ = false;
  bool stopping_ = false;
  std::string broken_;  // why the pool broke ("" while it works)

  std::function<void(const TaskInfo&, const CallResult&)> onResult_;
  std::function<void(double)> onProgress_;
  std::function<void()> onFinished_;
  std::function<void(const WorkerEvent&)> onEvent_;
  std::function<void(std::size_t, Message&)> onMessage_;

  std::unique_ptr<MessageProcess> make(std::size_t index);
  bool hasRoom(const Slot& s) const;
  void pump();
  void send(Slot& s, Task& t);
  void onReply(std::uint64_t token, CallResult r);
  void finishTask(Task& t, CallResult r);
  void detachTask(Slot& s, Task& t);
  void armTimer(Slot& s);
  void checkTimeout(std::size_t slot, std::uint64_t id, std::uint64_t token);
  void onTimeout(std::size_t slot, std::uint64_t id, std::uint64_t token);
  void onExit(MessageProcess& w, const ExitStatus& status);
  void onMessage(MessageProcess& w, Message& m);
  void onDeath(std::size_t slot, const MessageProcess* process, ExitStatus status);
  // Why a worker is replaced: the restart limit counts only deaths.
  enum class Cause : std::uint8_t { Recycle, Timeout, Death };
  void replace(Slot& s, Cause cause, const std::string& how = {});
  void startReplacement(Slot& s);
  void breakPool(const std::string& why);
  void failAll(const std::string& why);
  void stopWorkers();
  void route(MessageProcess& p);
  // A job for the loop that runs only while the pool lives.
  template <class Fn>
  std::function<void()> alive(Fn fn) {
    return [w = weak_from_this(), fn = std::move(fn)] {
      if (auto c = w.lock()) fn(*c);
    };
  }
  void killBusy();
  void event(WorkerEvent e);
  template <class Fn>
  void user(const char* what, Fn&& fn);
};

namespace {
Manager::Options loopOptions(const PoolOptions& o) {
  Manager::Options m;
  m.stopTimeout = o.stopTimeout;
  m.handleSignals = false;  // the pool is a part of a program, not its main loop
  return m;
}
}  // namespace

PoolCore::PoolCore(Manager* manager, WorkerPool::Factory factory, PoolOptions options)
    : factory_(std::move(factory)),
      options_(std::move(options)),
      owner_(std::this_thread::get_id()),
      own_(manager ? nullptr : std::make_unique<Manager>(loopOptions(options_))),
      loop_(manager ? manager : own_.get()) {
  if (!factory_) throw Error("WorkerPool: no factory");
  factoryChanged();
  if (options_.workers == 0) throw Error("WorkerPool: PoolOptions::workers is 0; a pool needs a worker");
  if (options_.queueDepth == 0) throw Error("WorkerPool: PoolOptions::queueDepth is 0; a worker must take a task");
  if (options_.maxQueued == 0) throw Error("WorkerPool: PoolOptions::maxQueued is 0; the queue must hold a task");
  if (options_.retries < 0) throw Error("WorkerPool: PoolOptions::retries is negative");
}

PoolCore::~PoolCore() {
  recipes::remove(recipe_);
  try {
    stopAll("the pool was destroyed");
    if (!own_)  // the user's manager goes on without them (deferred inside its callbacks)
      for (auto& s : slots_) loop_->remove(*s.process);
  } catch (const std::exception& e) {
    poolLog()->error("stopping the pool failed: {}", e.what());
  }
}

std::unique_ptr<MessageProcess> PoolCore::make(std::size_t index) {
  auto p = factory_(index);
  if (!p) throw Error("WorkerPool: the factory made no worker (null) for place " + std::to_string(index));
  recipes::bind(p.get(), recipe_, index);  // a fork server makes it with its copy of the factory
  return p;
}

// A fork server started before this holds the old factory; a new key is
// one it does not know, so later workers are forked from here.
void PoolCore::factoryChanged() {
  if (recipe_) recipes::remove(recipe_);
  recipe_ = recipes::add([f = factory_](ServedCall& c) {
    // Never destroyed: the backend leaves with _exit, and a frontend
    // destructor must not run on this side.
    MessageProcess* p = f(c.arg).release();
    if (!p) throw Error("WorkerPool: the factory made no worker (null) for place " + std::to_string(c.arg));
    return runServed(*p, c);
  });
}

void PoolCore::start() {
  slots_.resize(options_.workers);
  for (std::size_t i = 0; i < options_.workers; ++i) {
    slots_[i].index = i;
    slots_[i].process = &loop_->add(make(i));  // started at once on a running manager
    route(*slots_[i].process);
    slotOf_[slots_[i].process] = i;
  }
  if (own_)
    loop_->runUntil([] { return true; }, Timeout::zero());  // starts them all
  else if (!loop_->running())
    loop_->startProcesses();  // forked now, as the pool's constructor promises
  for (auto& s : slots_) {
    s.ready = true;
    event({WorkerEvent::Kind::Started, s.index, s.process->pid(), {}, s.process->fullName() + " started"});
  }
}

// The workers' messages and exits come to the pool, on whichever loop.
void PoolCore::route(MessageProcess& p) {
  std::weak_ptr<PoolCore> w = weak_from_this();
  loop_->route(
      p,
      [w](MessageProcess& proc, Message& m) {
        if (auto c = w.lock()) c->onMessage(proc, m);
      },
      [w](MessageProcess& proc, const ExitStatus& st) {
        if (auto c = w.lock()) c->onExit(proc, st);
      });
}

void PoolCore::checkOwner(const char* method) const {
  if (std::this_thread::get_id() != owner_)
    throw Error(std::string("WorkerPool::") + method +
                ": called from another thread than the one that made the pool (the pool runs on its owner's "
                "thread; post the work there)");
}

template <class Fn>
void PoolCore::user(const char* what, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    poolLog()->error("the {} callback threw: {}", what, e.what());
  } catch (...) {
    poolLog()->error("the {} callback threw a non-standard exception", what);
  }
}

void PoolCore::event(WorkerEvent e) {
  if (e.kind == WorkerEvent::Kind::Died || e.kind == WorkerEvent::Kind::TimedOut ||
      e.kind == WorkerEvent::Kind::StartFailed)
    poolLog()->warn("{}", e.what);
  if (onEvent_) user("worker event", [&] { onEvent_(e); });
}

// ---------------------------------------------------------------- tasks

TaskFuture<Value> PoolCore::submit(const std::string& command, Map args, const TaskOptions& o) {
  checkOwner("submit");
  if (!broken_.empty()) throw PoolBroken("WorkerPool::submit '" + command + "': " + broken_);
  if (finalized_) throw Error("WorkerPool::submit '" + command + "': the pool is finalized and takes no more tasks");
  if (queue_.size() >= options_.maxQueued) {
    if (suspended_)
      throw Error("WorkerPool::submit '" + command + "': the queue is full (" + std::to_string(options_.maxQueued) +
                  " tasks) and the pool is suspended; resume() it first");
    if (loop_->running() && !loop_->stopping() && tasks_.size() > 0) {
      // Backpressure: the caller waits for room, driving the pool.
      waitFor([&] { return queue_.size() < options_.maxQueued || !broken_.empty(); }, kForever, "submit");
      if (!broken_.empty()) throw PoolBroken("WorkerPool::submit '" + command + "': " + broken_);
    }
  }
  if (finished()) {  // a new batch
    submitted_ = 0;
    completed_ = 0;
  }
  auto t = std::make_unique<Task>();
  t->id = ++nextId_;
  t->command = command;
  t->args = std::move(args);
  t->timeout = o.timeout.value_or(options_.taskTimeout);
  t->retriesLeft = o.retries.value_or(options_.retries);
  t->state = std::make_shared<TaskState>();
  t->state->id = t->id;
  t->state->core = weak_from_this();
  TaskFuture<Value> f(t->state);
  queue_.push_back(t.get());
  tasks_.emplace(t->id, std::move(t));
  ++submitted_;
  pump();
  return f;
}

bool PoolCore::taskQueued(std::uint64_t id) const {
  auto it = tasks_.find(id);
  return it != tasks_.end() && it->second->slot == kNoSlot;
}

// A worker whose queue was full takes tasks again once half of them are
// answered, and then up to full: it is sent tasks in batches, so it wakes
// once for many of them instead of once for each task that trickles in as
// replies come (with a queue depth of 1 or 2 this is every free place).
bool PoolCore::hasRoom(const Slot& s) const {
  const std::size_t n = s.inFlight.size();
  // A worker runs recycleAfter tasks, not the ones queued on it beyond.
  if (options_.recycleAfter && s.tasksDone + n >= options_.recycleAfter) return false;
  return s.ready && !s.recycle && n < options_.queueDepth && (s.refilling || n <= options_.queueDepth / 2);
}

void PoolCore::pump() {
  if (suspended_ || !broken_.empty() || stopping_) return;
  while (!queue_.empty()) {
    Slot* best = nullptr;  // the least busy worker with room: an idle one first
    for (auto& s : slots_)
      if (hasRoom(s) && (!best || s.inFlight.size() < best->inFlight.size())) best = &s;
    if (!best) return;
    Task* t = queue_.front();
    queue_.pop_front();
    send(*best, *t);
  }
}

void PoolCore::send(Slot& s, Task& t) {
  t.slot = s.index;
  t.lastSlot = s.index;
  // The task's id and its dispatch count: a reply finds its task from the
  // token alone, and the callback ({this, token}) fits std::function's
  // inline storage, so no allocation per task. Ids stay below 2^48.
  t.token = (t.id << 16) | (++t.sends & 0xffff);
  ++t.attempts;
  s.inFlight.push_back(&t);
  s.refilling = s.inFlight.size() < options_.queueDepth;
  if (s.inFlight.size() == 1) armTimer(s);
  // The pool's own timer ends a task that runs too long; the call's deadline
  // is only a backstop for one that never reached the front.
  const Timeout backstop =
      scaledTimeout(t.timeout, static_cast<Timeout::rep>(options_.queueDepth + 1), std::chrono::seconds(5));
  const std::uint64_t token = t.token;
  try {
    if (own_)  // {this, token} fits std::function's inline storage: no allocation per task
      s.process->callAsync(t.command, t.args, backstop, [this, token](CallResult r) { onReply(token, std::move(r)); });
    else  // the user's manager may run a callback after the pool is gone
      s.process->callAsync(t.command, t.args, backstop, [w = weak_from_this(), token](CallResult r) {
        if (auto c = w.lock()) c->onReply(token, std::move(r));
      });
  } catch (const PeerClosed&) {
    // The worker is gone: its exit puts the task back in the queue.
  } catch (const std::exception& e) {
    // Refused before it left (too large, say): the task fails, not the worker.
    detachTask(s, t);
    finishTask(t, CallResult(std::current_exception()));
  }
}

void PoolCore::detachTask(Slot& s, Task& t) {
  const bool front = !s.inFlight.empty() && s.inFlight.front() == &t;
  std::erase(s.inFlight, &t);
  t.slot = kNoSlot;
  if (front) armTimer(s);
}

void PoolCore::onReply(std::uint64_t token, CallResult r) {
  auto it = tasks_.find(token >> 16);
  if (it == tasks_.end()) return;
  Task& t = *it->second;
  if (t.token != token || t.slot == kNoSlot) return;  // a dispatch that was taken back
  Slot& s = slots_[t.slot];
  if (!r.ok()) {
    try {
      std::rethrow_exception(r.error());
    } catch (const PeerClosed&) {
      return;  // the worker's exit decides what becomes of the task
    } catch (const TimeoutError&) {
      // The backstop: handled as the task's own timeout.
      onTimeout(s.index, t.id, t.token);
      return;
    } catch (...) {
    }
  }
  detachTask(s, t);
  ++s.tasksDone;
  finishTask(t, std::move(r));
  if (options_.recycleAfter && s.tasksDone >= options_.recycleAfter) s.recycle = true;
  if (options_.recycleAboveRss && !s.recycle && residentBytes(*s.process) > options_.recycleAboveRss) s.recycle = true;
  if (s.recycle && s.inFlight.empty() && s.ready && !stopping_ && broken_.empty()) {
    event({WorkerEvent::Kind::Recycled, s.index, s.process->pid(), {},
           s.process->fullName() + " is recycled after " + std::to_string(s.tasksDone) + " tasks"});
    replace(s, Cause::Recycle);
  }
  pump();
}

void PoolCore::finishTask(Task& t, CallResult r) {
  auto it = tasks_.find(t.id);
  std::unique_ptr<Task> owned = std::move(it->second);
  tasks_.erase(it);
  if (!r.ok()) ++failed_;
  ++completed_;
  owned->state->done = true;
  owned->state->result = std::move(r);
  if (onResult_) {
    const TaskInfo info{owned->id, owned->command, owned->args, owned->attempts, owned->lastSlot};
    user("result", [&] { onResult_(info, owned->state->result); });
  }
  if (onProgress_) {
    const double p = submitted_ ? static_cast<double>(completed_) / static_cast<double>(submitted_) : 1.0;
    user("progress", [&] { onProgress_(p); });
  }
  if (onFinished_ && finished()) user("finished", [&] { onFinished_(); });
}

// ---------------------------------------------------------------- timeouts

void PoolCore::armTimer(Slot& s) {
  if (s.timer) {
    loop_->cancel(s.timer);
    s.timer = 0;
  }
  if (s.inFlight.empty()) return;
  Task& t = *s.inFlight.front();
  if (t.timeout == kForever) return;
  const std::size_t index = s.index;
  const std::uint64_t id = t.id, token = t.token;
  s.timer = loop_->after(t.timeout, alive([index, id, token](PoolCore& c) {
    c.slots_[index].timer = 0;
    c.checkTimeout(index, id, token);
  }));
}

// libuv runs due timers before it reads the descriptors that became ready
// meanwhile: an owner busy past a deadline finds the timer due and the
// task's reply already waiting. So the replies waiting are read first (their
// callbacks are posted), and the timeout is decided after them, in a job
// posted behind them: a task that answered is done by then, and nothing
// (event, kill, restart) says it timed out.
void PoolCore::checkTimeout(std::size_t index, std::uint64_t id, std::uint64_t token) {
  auto it = tasks_.find(id);
  if (it == tasks_.end() || it->second->token != token || it->second->slot != index) return;
  try {
    slots_[index].process->pumpReplies();
  } catch (const std::exception& e) {
    poolLog()->debug("{}: reading replies before a timeout: {}", slots_[index].process->fullName(), e.what());
  }
  loop_->post(alive([index, id, token](PoolCore& c) { c.onTimeout(index, id, token); }));
}

void PoolCore::onTimeout(std::size_t index, std::uint64_t id, std::uint64_t token) {
  Slot& s = slots_[index];
  auto it = tasks_.find(id);
  if (it == tasks_.end() || it->second->token != token || it->second->slot != index) return;
  if (s.timedOut || !s.ready) return;  // already ending
  Task& t = *it->second;
  s.timedOut = t.id;
  s.ready = false;
  t.token = 0;  // decided: a reply that comes now is not taken (the task times out)
  MessageProcess& p = *s.process;
  event({WorkerEvent::Kind::TimedOut, index, p.pid(), {},
         p.fullName() + ": task " + std::to_string(id) + " ('" + t.command + "') ran longer than " + ms(t.timeout) +
             "; killing the worker"});
  if (p.pid() > 0 && p.pid() != ::getpid()) {
    p.signal(SIGKILL);  // its exit comes through onExit
    return;
  }
  // In-process: a thread cannot be killed. Abandoned, and handled as a death.
  const ExitStatus st = p.stop(Timeout::zero());
  loop_->post(alive([index, proc = &p, st](PoolCore& c) { c.onDeath(index, proc, st); }));
}

// ---------------------------------------------------------------- deaths

void PoolCore::onMessage(MessageProcess& w, Message& m) {
  auto it = slotOf_.find(&w);
  if (onMessage_ && it != slotOf_.end()) user("message", [&] { onMessage_(it->second, m); });
}

void PoolCore::onExit(MessageProcess& w, const ExitStatus& status) {
  auto it = slotOf_.find(&w);
  if (it == slotOf_.end() || stopping_ || !broken_.empty()) return;  // the pool stopped it
  Slot& s = slots_[it->second];
  if (s.replacing || s.process != &w) return;
  s.ready = false;
  if (loop_->stopping()) {
    // The manager shuts down (its stop, SIGINT or SIGTERM): every worker
    // is being stopped, and a shutdown never forks. What is left fails.
    failAll("the manager stopped");
    return;
  }
  // After the replies it sent before dying: they were posted first.
  loop_->post(alive([index = s.index, proc = &w, status](PoolCore& c) { c.onDeath(index, proc, status); }));
}

void PoolCore::onDeath(std::size_t index, const MessageProcess* process, ExitStatus status) {
  Slot& s = slots_[index];
  if (s.process != process || stopping_ || !broken_.empty()) return;
  if (loop_->stopping()) {
    failAll("the manager stopped");
    return;
  }
  if (s.timer) {
    loop_->cancel(s.timer);
    s.timer = 0;
  }
  const std::string who = s.process->fullName();
  // What the TaskTimeout says happened to the worker, and only that.
  const bool inProcess = s.process->pid() == ::getpid();
  const std::string ended = inProcess ? " was abandoned (an in-process worker's thread cannot be killed)" : " was killed";
  const bool replaced = !stopping_ && broken_.empty() && !loop_->stopping();
  const std::string how = status.describe();
  const std::uint64_t killed = s.timedOut;  // a task that ended meanwhile is not here
  if (!killed)
    event({WorkerEvent::Kind::Died, index, s.process->pid(), status, who + " died: " + how});
  // The front task was running: it fails or runs again; the others go back
  // to the front of the queue as they were.
  std::deque<Task*> back;
  for (std::size_t i = 0; i < s.inFlight.size(); ++i) {
    Task* t = s.inFlight[i];
    t->slot = kNoSlot;
    if (i > 0 || (killed && t->id != killed)) {
      --t->attempts;  // it never ran
      back.push_back(t);
      continue;
    }
    if (t->retriesLeft > 0) {
      --t->retriesLeft;
      back.push_back(t);
      continue;
    }
    std::exception_ptr e;
    const std::string task = "task " + std::to_string(t->id) + " ('" + t->command + "')";
    if (killed == t->id)
      e = std::make_exception_ptr(TaskTimeout(task + " ran longer than its timeout of " + ms(t->timeout) +
                                              "; its worker " + who + ended + (replaced ? " and replaced" : "")));
    else
      e = std::make_exception_ptr(WorkerDied(task + ": its worker " + who + " died (" + how + ")", status));
    finishTask(*t, CallResult(e));
  }
  s.inFlight.clear();
  queue_.insert(queue_.begin(), back.begin(), back.end());
  s.timedOut = 0;
  if (killed)
    replace(s, Cause::Timeout);
  else
    replace(s, Cause::Death, how);
  pump();
}

namespace {

// "killed by SIGKILL (2), exited with code 3 (1)": how the workers in the
// window died, most frequent first.
std::string deathSummary(const std::deque<std::pair<Deadline::Clock::time_point, std::string>>& deaths) {
  std::vector<std::pair<std::string, int>> kinds;
  for (const auto& death : deaths) {
    const std::string& how = death.second;  // clang 14 cannot capture a structured binding
    auto k = std::find_if(kinds.begin(), kinds.end(), [&](const auto& p) { return p.first == how; });
    if (k == kinds.end())
      kinds.emplace_back(how, 1);
    else
      ++k->second;
  }
  std::stable_sort(kinds.begin(), kinds.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  std::string out;
  for (const auto& [how, n] : kinds) out += (out.empty() ? "" : ", ") + how + " (" + std::to_string(n) + ")";
  return out;
}

// A start that may work when tried again: the system was short of
// processes, memory or descriptors for a moment, or the new worker died
// while it started (a crash, the OOM killer: whether it happens again is
// not known, so it is tried again, and restartLimit failures in a row
// break the pool with the last one's text). Anything else (the refusal to
// fork while threads run, a fork server that is gone) fails the same way
// every time.
bool transientStartFailure(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const SystemError& se) {
    const int c = se.code().value();
    return c == EAGAIN || c == ENOMEM || c == EMFILE || c == ENFILE || c == EINTR;
  } catch (const ProcessDied&) {
    return true;
  } catch (...) {
    return false;
  }
}

}  // namespace

// A worker that died on its own counts toward the restart limit (a crash
// loop); one the pool killed for a timeout, or recycled, does not: a batch
// with a few slow tasks is not a crash loop.
void PoolCore::replace(Slot& s, Cause cause, const std::string& how) {
  if (stopping_ || !broken_.empty() || loop_->stopping()) return;  // a shutdown never forks
  if (cause == Cause::Death) {
    const auto now = Deadline::Clock::now();
    deaths_.emplace_back(now, how);
    while (!deaths_.empty() && now - deaths_.front().first > options_.restartWindow) deaths_.pop_front();
    if (deaths_.size() > static_cast<std::size_t>(options_.restartLimit)) {
      breakPool("restart limit reached: " + std::to_string(deaths_.size()) +
                (deaths_.size() == 1 ? " worker" : " workers") + " died on their own within " +
                ms(options_.restartWindow) + " (the limit is " + std::to_string(options_.restartLimit) +
                "): " + deathSummary(deaths_) + "; the pool stopped instead of forking forever");
      return;
    }
  }
  s.restartCounted = cause != Cause::Recycle;
  s.startFailures = 0;
  startReplacement(s);
}

void PoolCore::startReplacement(Slot& s) {
  if (stopping_ || !broken_.empty() || loop_->stopping()) return;
  s.ready = false;
  s.recycle = false;
  s.tasksDone = 0;
  std::unique_ptr<MessageProcess> fresh;
  try {
    fresh = make(s.index);
  } catch (const std::exception& e) {
    breakPool(std::string("the factory failed: ") + e.what());
    return;
  }
  MessageProcess* old = s.process;
  MessageProcess* raw = fresh.get();
  s.replacing = true;
  std::exception_ptr failure;
  try {
    loop_->replace(*old, std::move(fresh));
  } catch (const std::exception&) {
    failure = std::current_exception();
  }
  s.replacing = false;
  slotOf_.erase(old);
  s.process = raw;  // in the manager, started or not
  slotOf_[raw] = s.index;
  if (failure) {
    std::string what;
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& e) {
      what = e.what();
    }
    const std::string who = "worker " + std::to_string(s.index);
    if (!transientStartFailure(failure)) {
      // It would fail the same way every time: no retries, the cause said.
      breakPool(who + " cannot be replaced: " + what);
      return;
    }
    ++s.startFailures;
    event({WorkerEvent::Kind::StartFailed, s.index, -1, {}, who + " did not start (attempt " +
                                                               std::to_string(s.startFailures) + "): " + what});
    if (s.startFailures > options_.restartLimit) {
      breakPool(who + " did not start " + std::to_string(s.startFailures) + " times in a row; the last time: " + what);
      return;
    }
    // Tried again later, 50 ms, 100 ms, ... up to 1 s apart.
    const auto delay = std::chrono::milliseconds(std::min(1000, 50 << std::min(s.startFailures - 1, 5)));
    loop_->after(delay, alive([index = s.index](PoolCore& c) {
      Slot& sl = c.slots_[index];
      if (sl.ready || sl.replacing) return;
      c.startReplacement(sl);
      c.pump();  // the tasks that waited for it
    }));
    return;
  }
  s.startFailures = 0;
  s.ready = true;
  if (std::exchange(s.restartCounted, false)) ++restarts_;
  event({WorkerEvent::Kind::Restarted, s.index, raw->pid(), {}, raw->fullName() + " started in place of the last"});
}

void PoolCore::breakPool(const std::string& why) {
  if (!broken_.empty()) return;
  poolLog()->error("{}", why);
  killBusy();
  failAll(why);
  if (own_)
    loop_->requestStop();  // the workers left are stopped when the loop ends
  else
    stopWorkers();  // the user's loop goes on
}

// Every task not done fails with PoolBroken(why); the pool takes no more.
void PoolCore::failAll(const std::string& why) {
  if (broken_.empty()) broken_ = why;
  std::vector<Task*> left;
  for (auto& [id, t] : tasks_) left.push_back(t.get());
  std::sort(left.begin(), left.end(), [](Task* a, Task* b) { return a->id < b->id; });
  queue_.clear();
  for (auto& s : slots_) {
    s.inFlight.clear();
    s.ready = false;
    if (s.timer) loop_->cancel(std::exchange(s.timer, 0));
  }
  for (Task* t : left) {
    t->slot = kNoSlot;
    finishTask(*t, CallResult(std::make_exception_ptr(PoolBroken("task " + std::to_string(t->id) + " ('" +
                                                                   t->command + "'): " + why))));
  }
}

// On a user's manager: the pool's workers are stopped (all at once, the
// stop ladder), and stay in the manager, ended, until the pool is gone.
void PoolCore::stopWorkers() {
  std::vector<MessageProcess*> live;
  for (auto& s : slots_)
    if (s.process->isAlive()) live.push_back(s.process);
  MessageProcess::stopAll(live, options_.stopTimeout);
}

// Workers still inside a task whose future has failed: nobody waits for
// them, so they are not waited for either.
void PoolCore::killBusy() {
  for (auto& s : slots_)
    if (!s.inFlight.empty() && s.process->started() && s.process->pid() != ::getpid()) s.process->signal(SIGKILL);
}

// ---------------------------------------------------------------- waiting

bool PoolCore::waitFor(const std::function<bool()>& done, Timeout timeout, const char* method) {
  checkOwner(method);
  if (done()) return true;
  if (!own_) {
    // The user's manager: inside its loop a look without waiting is all
    // there is (callbacks bring the rest); outside, its owner's wait drives it.
    if (loop_->stopping() || (loop_->inLoop() && timeout <= Timeout::zero())) return done();
    return loop_->runUntil(done, timeout);
  }
  if (loop_->stopping() || !loop_->running()) {
    loop_->finish();
    return done();
  }
  return loop_->runUntil(done, timeout);
}

void PoolCore::stopAll(const std::string& why) {
  stopping_ = true;  // exits from here on are the pool's own
  killBusy();
  if (own_)
    loop_->finish();
  else
    stopWorkers();
  failAll(why);
}

void PoolCore::finalize() {
  checkOwner("finalize");
  finalized_ = true;
  suspended_ = false;  // what was queued still runs
  pump();
  waitFor([this] { return finished() || !broken_.empty(); }, kForever, "finalize");
  stopAll("the pool was finalized");
}

void PoolCore::callAll(const std::string& command, const Map& args) {
  checkOwner("callAll");
  if (!broken_.empty()) throw PoolBroken("WorkerPool::callAll '" + command + "': " + broken_);
  waitFor([this] { return finished() || !broken_.empty(); }, kForever, "callAll");
  for (auto& s : slots_)
    if (s.ready) s.process->call(command, args);
}

void PoolCore::restartAll() {
  checkOwner("restartAll");
  if (!broken_.empty()) throw PoolBroken("WorkerPool::restartAll: " + broken_);
  waitFor([this] { return finished() || !broken_.empty(); }, kForever, "restartAll");
  for (auto& s : slots_) {
    event({WorkerEvent::Kind::Recycled, s.index, s.process->pid(), {}, s.process->fullName() + " is replaced"});
    replace(s, Cause::Recycle);
  }
}

bool waitTask(TaskState& s, Timeout timeout) {
  if (s.done) return true;
  auto core = s.core.lock();
  if (!core) return s.done;
  if (core->suspended_ && core->taskQueued(s.id))
    throw Error("TaskFuture: task " + std::to_string(s.id) + " is queued and the pool is suspended; resume() it first");
  return core->waitFor([&] { return s.done; }, timeout, "TaskFuture::wait");
}

void throwResultType(std::uint64_t id, const std::exception& e) {
  throw TypeError("task " + std::to_string(id) + ": the result is not of the type asked: " + e.what());
}

// ---------------------------------------------------------------- FunctionWorker

FunctionWorker::FunctionWorker(std::string name, std::shared_ptr<const PoolInvoker> fn, Value fixed,
                               ProcessOptions options, bool batch)
    : MessageProcess(std::move(name), std::move(options)), fn_(std::move(fn)), fixed_(std::move(fixed)), batch_(batch) {
  commandRaw("call", [this](const Message& m) {
    // The arguments in place, not copied; get() says what is wrong otherwise.
    const Value* a = m.find("a");
    if (const List* l = a ? a->getIf<List>() : nullptr) return (*fn_)(fixed_, *l);
    return (*fn_)(fixed_, m.get<List>("a"));
  });
  commandRaw("fixed", [this](const Message& m) {
    fixed_ = m.get<Value>("value");
    return Value();
  });
}

FunctionWorker::~FunctionWorker() { stop(); }  // in-process: before the members go

// Backend side. In-process it sets the backend thread's policy only.
void FunctionWorker::preRun__() {
  if (!batch_) return;
  const sched_param none{};
  if (::sched_setscheduler(0, SCHED_BATCH, &none) != 0)
    poolLog()->warn("{}: cannot run under SCHED_BATCH: {}", fullName(), std::strerror(errno));
}

}  // namespace detail

// ---------------------------------------------------------------- WorkerPool

WorkerPool::WorkerPool(Factory factory, PoolOptions options)
    : core_(std::make_shared<detail::PoolCore>(nullptr, std::move(factory), std::move(options))) {
  core_->start();
}

WorkerPool::WorkerPool(Manager& manager, Factory factory, PoolOptions options)
    : core_(std::make_shared<detail::PoolCore>(&manager, std::move(factory), std::move(options))) {
  core_->start();
}

WorkerPool::~WorkerPool() = default;

TaskFuture<Value> WorkerPool::submit(const std::string& command, Map args, TaskOptions options) {
  return core_->submit(command, std::move(args), options);
}

std::vector<Value> WorkerPool::map(const std::string& command, std::vector<Map> argsList, TaskOptions options) {
  std::vector<TaskFuture<Value>> fs;
  fs.reserve(argsList.size());
  for (auto& a : argsList) fs.push_back(submit(command, std::move(a), options));
  for (auto& f : fs) f.wait(kForever);
  std::vector<Value> out;
  out.reserve(fs.size());
  for (auto& f : fs) out.push_back(f.get());
  return out;
}

void WorkerPool::onResult(std::function<void(const TaskInfo&, const CallResult&)> fn) { core_->onResult_ = std::move(fn); }
void WorkerPool::onProgress(std::function<void(double)> fn) { core_->onProgress_ = std::move(fn); }
void WorkerPool::onFinished(std::function<void()> fn) { core_->onFinished_ = std::move(fn); }
void WorkerPool::onWorkerEvent(std::function<void(const WorkerEvent&)> fn) { core_->onEvent_ = std::move(fn); }
void WorkerPool::onMessage(std::function<void(std::size_t, Message&)> fn) { core_->onMessage_ = std::move(fn); }

double WorkerPool::progress() const {
  return core_->submitted_ ? static_cast<double>(core_->completed_) / static_cast<double>(core_->submitted_) : 1.0;
}
bool WorkerPool::finished() const { return core_->finished(); }
std::size_t WorkerPool::submitted() const { return core_->submitted_; }
std::size_t WorkerPool::completed() const { return core_->completed_; }
std::size_t WorkerPool::failedTasks() const { return core_->failed_; }
std::size_t WorkerPool::restarts() const { return core_->restarts_; }

bool WorkerPool::wait(Timeout timeout) {
  detail::PoolCore& c = *core_;
  if (c.suspended_ && !c.queue_.empty())
    throw Error("WorkerPool::wait: the pool is suspended with " + std::to_string(c.queue_.size()) +
                " tasks queued; they would never run: resume() it first");
  return c.waitFor([&c] { return c.finished(); }, timeout, "wait");
}

void WorkerPool::poll() { core_->waitFor([] { return false; }, Timeout::zero(), "poll"); }

void WorkerPool::suspend() {
  core_->checkOwner("suspend");
  core_->suspended_ = true;
}

void WorkerPool::resume() {
  core_->checkOwner("resume");
  core_->suspended_ = false;
  core_->pump();
  core_->waitFor([] { return true; }, Timeout::zero(), "resume");
}

bool WorkerPool::suspended() const { return core_->suspended_; }
void WorkerPool::finalize() { core_->finalize(); }

void WorkerPool::stop() {
  core_->checkOwner("stop");
  core_->stopAll("the pool was stopped");
}

std::size_t WorkerPool::size() const { return core_->slots_.size(); }

MessageProcess& WorkerPool::worker(std::size_t index) {
  if (index >= core_->slots_.size())
    throw Error("WorkerPool::worker: index " + std::to_string(index) + " out of range (" +
                std::to_string(core_->slots_.size()) + " workers)");
  return *core_->slots_[index].process;
}

void WorkerPool::callAll(const std::string& command, Map args) { core_->callAll(command, args); }
void WorkerPool::restartAll() { core_->restartAll(); }
void WorkerPool::factoryChanged() { core_->factoryChanged(); }

}  // namespace forklift
