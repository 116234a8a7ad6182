// forklift - WorkerPool: tasks over N workers, with futures, timeouts that kill, and supervision
//
// A `WorkerPool` keeps N workers of a user's MessageProcess subclass (made
// by a factory, so a dead worker can be replaced by a fresh one) and runs
// tasks on them: a task is a command with arguments, run as a call on one
// worker; its result (what the handler returned) or its error comes back
// in a `TaskFuture`, to a callback per (task, result), and into the pool's
// progress. `FunctionPool<R(A...)>` is the simple case: a function with
// typed arguments and result, no class to write.
//
//   forklift::FunctionPool<double(double)> pool([](double x) { return x * x; });
//   auto f = pool.submit(3.0);              // TaskFuture<double>
//   std::vector<double> r = pool.map({1.0, 2.0, 3.0});
//   pool.finalize();
//
// Scheduling: a task goes to the least busy worker that has room (an idle
// one first); each worker holds at most `queueDepth` tasks sent and not
// answered. The default (32) pipelines: a worker finds its next tasks
// waiting when it ends one, instead of idling for a round trip each (a
// cross-CPU wake-up costs more than a short task), and the pool handles
// replies and sends in batches (a worker whose queue filled up is sent
// tasks again once half of them are answered, so it wakes once for many
// tasks, not once for each). A task sent to a worker waits behind the
// ones sent before it there, even if another worker becomes idle: for long
// or uneven tasks set `queueDepth` to 1 (a task goes only to an idle
// worker) or 2 (the next task waits in the worker while one runs).
// Tasks wait in the pool's queue, at most
// `maxQueued` of them: submit() on a full queue waits for room
// (backpressure). suspend() stops sending tasks (those sent run on);
// resume() goes on. finalize() takes no more tasks, waits for all, stops
// the workers.
//
// Supervision: a task that runs longer than its timeout (counted from the
// moment it reaches the front of its worker's queue) gets its worker killed
// (SIGKILL) and replaced; a worker that dies (crash, SIGKILL, OOM kill) is
// replaced too. The task that was running fails with TaskTimeout or
// WorkerDied (how the worker ended, as an ExitStatus), or runs again when
// it has retries left (`retries`, 1 by default); the tasks queued behind it
// go back to the queue untouched. A handler that throws fails its task with
// RemoteError and is never retried. A timeout is decided by the reply:
// when its timer runs, the replies the worker already sent are read first,
// so a task that answered in time (or whose answer waits unread because the
// owner was busy) is never reported as timed out, and its worker is not
// killed. More than `restartLimit` workers that die on their own (crash,
// a signal from outside, OOM kill; not those the pool killed for a timeout)
// within `restartWindow` is a crash loop: the pool breaks, every task left
// fails with PoolBroken saying how many died and how, and later submits
// throw it. A replacement that cannot start breaks the pool at once with
// the reason, unless the system was short of processes, memory or
// descriptors for a moment (EAGAIN, ENOMEM, EMFILE, ENFILE), or the new
// worker died while it started (ProcessDied: a crash, the OOM killer, a
// preRun__ that throws): that start is
// tried again 50 ms, 100 ms, ... up to 1 s later, and more than
// `restartLimit` failures in a row break the pool. Workers may
// be recycled (replaced by fresh ones) after `recycleAfter` tasks or above a
// resident memory size (`recycleAboveRss`). The pool
// never hangs on a dead worker: every wait also watches every worker's death.
//
// Transport and scheduling: FunctionPool's workers use the shared-memory
// message transport by default (`PoolOptions::process.transport`, see
// forklift/process.hpp; a worker started by a fork server uses the socket),
// and run under the normal policy, SCHED_OTHER: a task's latency is what
// latency pipelines (a detector on every 5th frame) need, and a woken
// worker runs at once. `batchScheduling` puts them under SCHED_BATCH
// (sched(7)) instead, for batch jobs of tiny tasks: a worker woken by its
// first task does not preempt the owner that is still sending it the rest
// of the batch (on a CPU they share, every task would otherwise cost two
// context switches), which raised empty-task throughput 1.6-2.5x in
// bench/pool_bench.cpp (BM_PoolThroughputScheduling) on a loaded 2-CPU
// machine; but a woken worker then waits for the running process's time
// slice to end, which in a pipeline beside CPU-bound processes raised a
// detector's p99 latency from about 110 ms to about 200 ms (issue 21;
// BM_PoolLatencyScheduling). Tasks of a millisecond or more do not gain
// from it. The nice value stays, and processes a worker forks inherit the
// policy. A
// WorkerPool's workers use the ProcessOptions their factory gives them
// (the shared-memory transport unless the factory's class chooses the
// socket); their preRun__ may call sched_setscheduler(0, SCHED_BATCH, ...)
// likewise.
//
// Threads: the pool has no thread of its own. It is driven by its owner,
// the thread that made it: its loop runs inside the pool's waits (submit on
// a full queue, wait, map, finalize, TaskFuture::get/wait/ready, poll), and
// all callbacks run there too. So a replacement is forked by the owner's
// thread, and a program without other threads forks safely. A program that
// runs threads of its own makes a forklift::ForkServer after the pool and
// before its threads: replacements are then made by the server's copy of the
// factory (forklift/fork_server.hpp; FunctionPool::setFunction and setFixed
// change the factory, so later replacements fork from this process again),
// or it sets ProcessOptions::allowThreads, knowing what its threads do. Calling the pool from another thread,
// or waiting on it from one of its own callbacks, throws Error. Between
// waits nothing happens: tasks sent run in the workers, but results,
// deaths and timeouts are seen at the next wait (poll() handles what is
// ready without waiting). A program with a loop of its own puts the pool on
// it instead of polling: see "A pool on a Manager" below.
//
// A pool on a Manager: `WorkerPool(manager, factory, options)` (and
// `FunctionPool(manager, fn, options)`) puts the workers on that manager's
// loop, beside its own workers, rings and timers: a reply, a death and a
// timeout are handled in the turn of the loop that sees them, and result
// callbacks (onResult, onWorkerEvent, ...) run there, with no timer that
// polls the pool. Inside the manager's callbacks, results come by those
// callbacks (or `TaskFuture::ready()`, which looks without waiting);
// waiting there (get, wait, map, a submit on a full queue) throws, since
// loops do not nest. Outside the loop, the pool's waits drive the manager
// with runUntil (which begins it: a manager meant for run() is not waited
// on before). The pool's workers are the manager's too (its size() counts
// them), but their messages and exits go to the pool, not to the
// manager's handlers. When the manager shuts down (requestStop, SIGINT,
// SIGTERM), it stops the pool's workers with its own; the pool replaces
// none of them (a shutdown never forks), and its tasks left fail with
// PoolBroken("the manager stopped"). A broken or stopped pool stops its
// workers and leaves the manager running; a destroyed one removes them.
// The manager must outlive the pool, and the pool belongs to the thread
// that runs the manager's loop (run() or runUntil; not runAsThread, whose
// loop thread would race the pool's owner): make and use it there.
//
// In-process mode (ProcessOptions::inProcess, FORKLIFT_IN_PROCESS=1) works
// too: a timed-out worker thread cannot be killed; it is abandoned (its
// object leaked, logged) and replaced.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "forklift/call_future.hpp"
#include "forklift/error.hpp"
#include "forklift/exit_status.hpp"
#include "forklift/process.hpp"
#include "forklift/timeout.hpp"
#include "forklift/value.hpp"

namespace forklift {

class Manager;

namespace detail {
// FunctionPool's workers: shared-memory queues instead of the socket.
inline ProcessOptions poolProcessOptions() {
  ProcessOptions o;
  o.transport = Transport::SharedMemory;
  return o;
}
}  // namespace detail

struct PoolOptions {
  std::size_t workers = 4;
  std::size_t queueDepth = 32;     // tasks on one worker at once (sent, not answered); see above
  std::size_t maxQueued = 4096;   // tasks waiting for a worker; submit() waits beyond
  Timeout taskTimeout = kForever; // per task, from when it runs; TaskOptions override it
  int retries = 1;                // runs again after a worker's death or a timeout
  int restartLimit = 5;           // workers dying on their own allowed within restartWindow (see above)
  Timeout restartWindow = std::chrono::seconds(10);
  std::size_t recycleAfter = 0;   // replace a worker after this many tasks (0: never)
  // Replace a worker whose resident memory is above this after a task (0:
  // never; forked workers only; costs a read of /proc/<pid>/statm per task).
  // The tasks already queued on it run first; recycleAfter sends a worker
  // no more tasks than it has left.
  std::size_t recycleAboveRss = 0;
  Timeout stopTimeout = std::chrono::seconds(5);
  // Of FunctionPool's workers (a WorkerPool's factory sets its own).
  ProcessOptions process = detail::poolProcessOptions();
  // FunctionPool's workers run under SCHED_BATCH instead of SCHED_OTHER:
  // for batch jobs of tiny tasks, not for latency (see "Transport and
  // scheduling" above).
  bool batchScheduling = false;
};

struct TaskOptions {
  std::optional<Timeout> timeout;  // default: PoolOptions::taskTimeout
  std::optional<int> retries;      // default: PoolOptions::retries
};

// A task ran longer than its timeout; its worker was killed and replaced.
class TaskTimeout : public TimeoutError {
 public:
  using TimeoutError::TimeoutError;
};

// The worker running a task died; `status()` says how.
class WorkerDied : public ProcessDied {
 public:
  WorkerDied(const std::string& what, ExitStatus status) : ProcessDied(what), status_(status) {}
  const ExitStatus& status() const noexcept { return status_; }

 private:
  ExitStatus status_;
};

// The pool stopped supervising (restart limit, a factory that throws) or
// was stopped; the message says why.
class PoolBroken : public Error {
 public:
  using Error::Error;
};

struct WorkerEvent {
  enum class Kind : std::uint8_t {
    Started,    // a worker is running (at the pool's start)
    Restarted,  // a new worker runs in the place of one that died, timed out or was recycled
    Died,       // a worker ended on its own (not stopped or killed by the pool): `status` says how
    TimedOut,   // the pool kills a worker for a task's timeout (no Died follows)
    Recycled,   // a worker is replaced after recycleAfter tasks, or by setFunction
    StartFailed // a replacement did not start and is tried again later: `what` says why
  };
  Kind kind;
  std::size_t index;  // the worker's place in the pool, 0..N-1
  pid_t pid = -1;     // -1 in-process
  ExitStatus status;  // Died, TimedOut
  std::string what;   // a sentence for logs
};

// What a result callback learns about its task.
struct TaskInfo {
  std::uint64_t id;         // 1, 2, ... in submission order
  const std::string& command;
  const Map& args;
  int attempts;             // runs started (2 after one retry)
  std::size_t worker;       // index of the worker that answered, or the last one tried
};

namespace detail {
class PoolCore;

struct TaskState {
  std::uint64_t id = 0;
  bool done = false;
  CallResult result;
  std::weak_ptr<PoolCore> core;
};

// Drives the pool until `s` is done or `timeout` passes; true when done.
bool waitTask(TaskState& s, Timeout timeout);
[[noreturn]] void throwResultType(std::uint64_t id, const std::exception& e);
}  // namespace detail

// The result of one task. `get()` waits (driving the pool, see above) and
// returns the result as a T or throws the task's error: RemoteError (the
// handler threw), TaskTimeout, WorkerDied, PoolBroken; TypeError when the
// result is not a T. Movable and copyable (copies share the result).
template <class T = Value>
class TaskFuture {
 public:
  TaskFuture() = default;
  bool valid() const noexcept { return s_ != nullptr; }
  std::uint64_t id() const noexcept { return s_ ? s_->id : 0; }
  // Handles what is ready, without waiting; true when the task is done.
  bool ready() { return check().done || detail::waitTask(*s_, Timeout::zero()); }
  bool wait(Timeout timeout) { return check().done || detail::waitTask(*s_, timeout); }
  T get() {
    wait(kForever);
    const Value& v = s_->result.get();
    if constexpr (std::is_void_v<T>) {
      (void)v;
    } else {
      try {
        return v.as<T>();
      } catch (const TypeError& e) {
        detail::throwResultType(s_->id, e);
      }
    }
  }
  CallResult result() {
    wait(kForever);
    return s_->result;
  }

 private:
  friend class WorkerPool;
  friend class detail::PoolCore;
  template <class>
  friend class FunctionPool;
  template <class>
  friend class TaskFuture;
  explicit TaskFuture(std::shared_ptr<detail::TaskState> s) : s_(std::move(s)) {}
  template <class U>
  TaskFuture<U> as() const {
    return TaskFuture<U>(s_);
  }
  detail::TaskState& check() const {
    if (!s_) throw Error("TaskFuture: not valid (default-made)");
    return *s_;
  }
  std::shared_ptr<detail::TaskState> s_;
};

class WorkerPool {
 public:
  // Makes the worker of place `index` (at the start and for each
  // replacement); a new object each time, not started.
  using Factory = std::function<std::unique_ptr<MessageProcess>(std::size_t index)>;

  // Starts `options.workers` workers (Error when none, or when a worker
  // cannot start).
  explicit WorkerPool(Factory factory, PoolOptions options = {});
  // On `manager`'s loop (see "A pool on a Manager" above); the manager
  // outlives the pool.
  WorkerPool(Manager& manager, Factory factory, PoolOptions options = {});
  // Stops the workers; tasks not done fail with PoolBroken.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues a task (waits for room while the queue is full). Throws
  // PoolBroken when the pool broke or stopped, Error after finalize(), or
  // when the queue is full and the caller is one of the pool's callbacks.
  TaskFuture<Value> submit(const std::string& command, Map args = {}, TaskOptions options = {});
  // Runs every task and returns their results in input order; throws the
  // error of the first task (in input order) that failed, after all ended.
  std::vector<Value> map(const std::string& command, std::vector<Map> argsList, TaskOptions options = {});

  // Callbacks, on the owner's thread inside the pool's waits.
  void onResult(std::function<void(const TaskInfo&, const CallResult&)> fn);
  void onProgress(std::function<void(double progress)> fn);
  // The last task of a batch is done.
  void onFinished(std::function<void()> fn);
  void onWorkerEvent(std::function<void(const WorkerEvent&)> fn);
  // sendOut__ messages of the workers.
  void onMessage(std::function<void(std::size_t worker, Message&)> fn);

  // Done tasks / submitted tasks of the current batch, in [0, 1] (1 when
  // nothing was submitted). A batch starts with the first submit after the
  // pool was finished.
  double progress() const;
  // Every submitted task is done.
  bool finished() const;
  std::size_t submitted() const;  // in this batch
  std::size_t completed() const;  // ok or failed, in this batch
  std::size_t failedTasks() const;
  // Replacements started after a death or a timeout, in all (recycling
  // and restartAll are not counted; a replacement that failed to start is
  // counted once it starts).
  std::size_t restarts() const;

  // Waits until finished() (driving the pool); false when `timeout` passed
  // first. Error while suspended with tasks queued (they would never run).
  bool wait(Timeout timeout = kForever);
  // One turn of the pool's loop without waiting: replies, deaths and
  // timeouts that are ready are handled and their callbacks run.
  void poll();
  void suspend();
  void resume();
  bool suspended() const;
  // No more tasks: waits for the ones submitted, then stops the workers.
  void finalize();
  // Stops at once: tasks not done fail with PoolBroken("stopped"); workers
  // still inside a task are killed, the others stopped in order.
  void stop();

  std::size_t size() const;
  // The worker of place `index` now (changes when it is replaced).
  MessageProcess& worker(std::size_t index);
  // A call on every worker (e.g. new fixed arguments), between batches:
  // waits until the pool is finished first. Throws the first error.
  void callAll(const std::string& command, Map args = {});
  // Replaces every worker by a fresh one from the factory, between batches
  // (waits until finished first). Not counted as restarts.
  void restartAll();
  // The factory now makes other workers (something it captured changed).
  // A fork server started before holds the old factory: from now on the
  // pool's workers are forked from this process (forklift/fork_server.hpp).
  void factoryChanged();

 private:
  std::shared_ptr<detail::PoolCore> core_;
};

namespace detail {

using PoolInvoker = std::function<Value(const Value& fixed, const List& args)>;

// The worker of a FunctionPool: runs the function on the arguments of
// "call", keeps the fixed arguments set by "fixed".
class FunctionWorker final : public MessageProcess {
 public:
  // `batch`: the backend runs under SCHED_BATCH (PoolOptions::batchScheduling).
  FunctionWorker(std::string name, std::shared_ptr<const PoolInvoker> fn, Value fixed, ProcessOptions options,
                 bool batch = false);
  ~FunctionWorker() override;

 protected:
  void preRun__() override;

 private:
  std::shared_ptr<const PoolInvoker> fn_;
  Value fixed_;
  bool batch_;
};

// The type of a function's only argument (map's one-argument form).
template <class... A>
struct FirstOf {
  struct None {};
  using type = None;
};
template <class A0, class... A>
struct FirstOf<A0, A...> {
  using type = std::remove_cvref_t<A0>;
};

template <class T>
T poolArg(const List& a, std::size_t i) {
  try {
    return a[i].as<T>();
  } catch (const TypeError& e) {
    throw TypeError("argument " + std::to_string(i + 1) + ": " + e.what());
  }
}

template <class R, class... A, class F>
PoolInvoker makeInvoker(F fn) {
  return [fn = std::move(fn)](const Value& fixed, const List& a) -> Value {
    if (a.size() != sizeof...(A))
      throw TypeError("the function takes " + std::to_string(sizeof...(A)) + " arguments, " +
                      std::to_string(a.size()) + " given");
    return [&]<std::size_t... I>(std::index_sequence<I...>) -> Value {
      if constexpr (std::is_void_v<R>) {
        fn(fixed, poolArg<std::remove_cvref_t<A>>(a, I)...);
        return Value();
      } else {
        return Value(fn(fixed, poolArg<std::remove_cvref_t<A>>(a, I)...));
      }
    }(std::index_sequence_for<A...>{});
  };
}

}  // namespace detail

// The simple case: a function of typed arguments (anything a Value converts
// to: numbers, strings, vectors, Map, List, Array, Fd) and a result of the
// same kinds (or void). The function runs in the workers, forked from this
// process, so it may capture anything made before the pool; it may also
// take fixed arguments (a Value, first parameter) that change between
// batches without new workers. A new function needs new workers:
// setFunction() waits for the batch, then replaces every worker.
template <class Sig>
class FunctionPool;

template <class R, class... A>
class FunctionPool<R(A...)> {
 public:
  using Fn = std::function<R(A...)>;
  using FnFixed = std::function<R(const Value& fixed, A...)>;

  explicit FunctionPool(Fn fn, PoolOptions options = {})
      : shared_(std::make_shared<Shared>(wrap(std::move(fn)), Value(), options.process, options.batchScheduling)),
        pool_(factory(shared_), options) {}
  FunctionPool(FnFixed fn, Value fixed, PoolOptions options = {})
      : shared_(std::make_shared<Shared>(invoker(std::move(fn)), std::move(fixed), options.process,
                                         options.batchScheduling)),
        pool_(factory(shared_), options) {}
  // On `manager`'s loop (see "A pool on a Manager" above).
  FunctionPool(Manager& manager, Fn fn, PoolOptions options = {})
      : shared_(std::make_shared<Shared>(wrap(std::move(fn)), Value(), options.process, options.batchScheduling)),
        pool_(manager, factory(shared_), options) {}
  FunctionPool(Manager& manager, FnFixed fn, Value fixed, PoolOptions options = {})
      : shared_(std::make_shared<Shared>(invoker(std::move(fn)), std::move(fixed), options.process,
                                         options.batchScheduling)),
        pool_(manager, factory(shared_), options) {}

  TaskFuture<R> submit(A... args) { return submitWith(TaskOptions{}, std::move(args)...); }
  TaskFuture<R> submitWith(TaskOptions options, A... args) {
    List a;
    a.reserve(sizeof...(A));
    (a.emplace_back(Value(std::move(args))), ...);
    Map m;  // not an initializer list: that would copy the arguments
    m.reserve(1);
    m.emplace_back("a", Value(std::move(a)));
    return pool_.submit("call", std::move(m), options).template as<R>();
  }

  // Results in input order; throws the first failed task's error (in input
  // order) once all ended. One argument per task (a function of one), or a
  // tuple of them.
  auto map(const std::vector<std::tuple<A...>>& many, TaskOptions options = {})
    requires(sizeof...(A) != 1)
  {
    std::vector<TaskFuture<R>> fs;
    fs.reserve(many.size());
    for (const auto& t : many)
      fs.push_back(std::apply([&](const auto&... args) { return submitWith(options, args...); }, t));
    return collect(fs);
  }
  auto map(const std::vector<typename detail::FirstOf<A...>::type>& many, TaskOptions options = {})
    requires(sizeof...(A) == 1)
  {
    std::vector<TaskFuture<R>> fs;
    fs.reserve(many.size());
    for (const auto& x : many) fs.push_back(submitWith(options, x));
    return collect(fs);
  }

  // Between batches (waits until finished): the new function runs in new
  // workers (every worker is replaced, not counted as restarts).
  void setFunction(Fn fn) { setInvoker(wrap(std::move(fn)), std::nullopt); }
  void setFunction(FnFixed fn, Value fixed) { setInvoker(invoker(std::move(fn)), std::move(fixed)); }
  // Between batches (waits until finished): the workers keep running.
  void setFixed(Value fixed) {
    shared_->fixed = fixed;  // first: a worker replaced meanwhile is forked with it
    pool_.factoryChanged();  // a fork server's copy has the old value
    pool_.callAll("fixed", {{"value", std::move(fixed)}});
  }

  WorkerPool& pool() noexcept { return pool_; }
  void finalize() { pool_.finalize(); }
  bool wait(Timeout timeout = kForever) { return pool_.wait(timeout); }

 private:
  struct Shared {
    Shared(detail::PoolInvoker f, Value x, ProcessOptions o, bool b)
        : fn(std::make_shared<const detail::PoolInvoker>(std::move(f))),
          fixed(std::move(x)),
          options(std::move(o)),
          batch(b) {}
    std::shared_ptr<const detail::PoolInvoker> fn;
    Value fixed;
    ProcessOptions options;
    bool batch;
  };
  static detail::PoolInvoker invoker(FnFixed fn) { return detail::makeInvoker<R, A...>(std::move(fn)); }
  static detail::PoolInvoker wrap(Fn fn) {
    return invoker([fn = std::move(fn)](const Value&, A... args) -> R { return fn(std::move(args)...); });
  }
  static WorkerPool::Factory factory(std::shared_ptr<Shared> sh) {
    return [sh](std::size_t index) -> std::unique_ptr<MessageProcess> {
      return std::make_unique<detail::FunctionWorker>("pool-" + std::to_string(index), sh->fn, sh->fixed,
                                                      sh->options, sh->batch);
    };
  }
  void setInvoker(detail::PoolInvoker fn, std::optional<Value> fixed) {
    pool_.wait();
    shared_->fn = std::make_shared<const detail::PoolInvoker>(std::move(fn));
    if (fixed) shared_->fixed = std::move(*fixed);
    pool_.factoryChanged();  // a fork server's copy has the old function
    pool_.restartAll();
  }
  static auto collect(std::vector<TaskFuture<R>>& fs) {
    for (auto& f : fs) f.wait(kForever);
    if constexpr (std::is_void_v<R>) {
      for (auto& f : fs) f.get();
    } else {
      std::vector<R> out;
      out.reserve(fs.size());
      for (auto& f : fs) out.push_back(f.get());
      return out;
    }
  }

  std::shared_ptr<Shared> shared_;
  WorkerPool pool_;
};

}  // namespace forklift
