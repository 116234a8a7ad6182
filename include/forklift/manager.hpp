// forklift - Manager: one event loop for many workers
//
// The Manager is the main process of tutorial part II (valkka-multiprocess's
// `MainContext`): it starts N worker processes and listens to all of them at
// once, together with any other descriptor, timers and signals, in one
// libuv loop running in the frontend.
//
// It multiplexes:
//   - every worker's outgoing messages (sendOut__): `onMessage(worker, msg)`,
//     in the order each worker sent them;
//   - every worker's death, seen through its pidfd at once, not at the next
//     message: `onExit(worker, status)`; messages the worker sent before it
//     died are delivered first;
//   - every failure of a command sent to a worker with send() (unknown
//     command, bad argument, the handler threw, the message was refused):
//     `onError(worker, command, what)`, in order with the messages. Without
//     an error handler the failure is logged and run() returns 1: nothing
//     fails silently;
//   - replies of calls made with `callAsync(..., callback)` on a worker: the
//     callback runs on the loop, which never blocks on a worker;
//   - work posted from other threads (`post`), run on the loop;
//   - user descriptors (`watch`), e.g. a socket or a ring buffer's eventfd;
//   - timers (`after`, `every`);
//   - SIGINT and SIGTERM: an orderly shutdown. Every worker is asked to stop
//     at the same time, waited for up to `stopTimeout`, then sent SIGTERM,
//     then SIGKILL (the ladder MessageProcess::stop uses); the loop ends and
//     run() returns 0 unless a worker had to be killed or ended badly, or a
//     command failed with no error handler set. A WorkerPool on this
//     manager replaces no worker once a stop was requested.
//
// Callbacks (messages, exits, errors, timers, watches, posted work) may
// throw anything: it is logged and the loop goes on.
//
// Use it either way:
//   - composed: `add` workers, set `onMessage` / `onExit`, `run()`;
//   - subclassed, like MainContext: add workers in your constructor, override
//     `startThreads()` (runs after the workers started: the tutorial's order,
//     processes first, then threads), `handleMessage`, `handleExit`,
//     `handleError` and `close()`.
//
// Workers added to a Manager ignore SIGINT, and SIGTERM from anyone but
// their frontend (or the fork server that forked them): Ctrl-C and a
// SIGTERM to the whole process group (a service manager, a closing
// terminal) reach the manager too, and it is the manager that decides how
// workers stop (the stop ladder's own SIGTERM still ends them).
//
// Cost: each event is dispatched through its own handle, so the cost of one
// message does not grow with the number of workers.
//
// Threads: run() blocks the calling thread. `runAsThread()` runs the loop in
// a background thread (for tests and GUIs); then only `requestStop()`,
// `post()` and `stopThread()` may be called from other threads. `post()`
// keeps the order of the work one thread posts, and runs each item once.
// Instead of run(), an owner may drive the loop from its own waits with
// `runUntil()` (the WorkerPool does), and end it with `finish()`.
//
// Workers while running (from the loop's thread): `remove(w)` stops a worker
// (its exit is reported as any other), then releases its handles,
// descriptors and the object with whatever it owns (shared memory
// included); `restart(w)` stops and starts the same object again;
// `replace(w, fresh)` puts a new object in its place (same index). Called
// from a callback of that very worker (its message, error or exit handler),
// the operation is deferred until that callback returned; failures of a
// deferred start are logged. A reference to a removed or replaced worker is
// dangling once the operation ran. Indices of the workers after a removed
// one shift down by one. A restart or replacement forks while other
// threads may run (runAsThread's, the program's own): it is forked safely
// by a fork server (forklift/fork_server.hpp) that holds a copy of the
// worker, i.e. one started after the worker was made. runAsThread() starts
// one itself, before its thread exists (Options::forkServer); a program
// with threads of its own that drives the loop with run() or runUntil()
// makes a forklift::ForkServer after adding its workers and before its
// threads. A restart runs the server's copy of the worker: it starts from
// the state the object had when the server started. A worker the server
// has no copy of (made later, e.g. by replace) is forked from this process,
// which start() refuses while other threads run (the error says why)
// unless its ProcessOptions::allowThreads is set.
//
// Per-worker data without casts: `worker<P>(i)` and `as<P>(w)` return the
// worker as its own class (Error when it is not one), `data<T>(w)` is a T
// of the user's kept with the worker (made on first use, destroyed with it).
#pragma once

#include <uv.h>

#include <any>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#include "forklift/process.hpp"

namespace forklift {

class ForkServer;
class RingReader;
class ReadSlot;

namespace detail {
class LoopSources;
}

class Manager {
 public:
  struct Options {
    Timeout stopTimeout = std::chrono::seconds(5);
    bool handleSignals = true;  // SIGINT/SIGTERM end the loop in order
    // runAsThread() first starts a fork server (kept until stopThread())
    // unless one runs; where it cannot (other threads run
    // already), restarts need allowThreads, as the warning logged says.
    bool forkServer = true;
  };

  Manager();
  explicit Manager(Options options);
  virtual ~Manager();
  Manager(const Manager&) = delete;
  Manager& operator=(const Manager&) = delete;

  // ---- setting up (before run) --------------------------------------------

  // Takes a worker (not started yet; the manager starts it). Returns it.
  template <class P>
  P& add(std::unique_ptr<P> worker) {
    P& ref = *worker;
    addWorker(std::unique_ptr<MessageProcess>(std::move(worker)));
    return ref;
  }
  template <class P, class... Args>
  P& emplace(Args&&... args) {
    return add(std::make_unique<P>(std::forward<Args>(args)...));
  }
  std::size_t size() const noexcept { return workers_.size(); }
  MessageProcess& worker(std::size_t i);
  // The worker as its own class; Error naming both when it is not a P.
  template <class P>
  P& worker(std::size_t i) {
    return as<P>(worker(i));
  }
  template <class P>
  P& as(MessageProcess& w) {
    if (auto* p = dynamic_cast<P*>(&w)) return *p;
    throwNotA(w, typeid(P));
  }
  // A T kept with worker `w` (default-made on first use, destroyed with the
  // worker). Error when `w` is not a worker of this manager, or when its
  // data was made as another type.
  template <class T>
  T& data(MessageProcess& w) {
    std::any& a = dataOf(w);
    if (!a.has_value()) a.emplace<T>();
    if (T* t = std::any_cast<T>(&a)) return *t;
    throwDataType(w, a.type(), typeid(T));
  }

  // ---- workers while running (loop thread; see the header comment) -------

  // Stops `worker` (the stop ladder, Options::stopTimeout), reports its exit
  // if it had not ended, then releases it. Error when it is not ours.
  void remove(MessageProcess& worker);
  // Stops `worker` if it runs (its exit is reported), then starts it again.
  // Throws what start() throws (when not deferred).
  void restart(MessageProcess& worker);
  // remove(old), then `fresh` in its place, started at once when running.
  template <class P>
  P& replace(MessageProcess& old, std::unique_ptr<P> fresh) {
    P& ref = *fresh;
    replaceWorker(old, std::unique_ptr<MessageProcess>(std::move(fresh)));
    return ref;
  }
  // The manager's index of `worker`; Error when it is not ours.
  std::size_t indexOf(const MessageProcess& worker) const;
  // For a part of the program that keeps workers of its own on this loop (a
  // WorkerPool made on this manager): `worker`'s messages and exit go to
  // these instead of handleMessage/handleExit; its replacement keeps them.
  void route(MessageProcess& worker, std::function<void(MessageProcess&, Message&)> onMessage,
             std::function<void(MessageProcess&, const ExitStatus&)> onExit);

  void onMessage(std::function<void(MessageProcess&, Message&)> fn) { onMessage_ = std::move(fn); }
  void onExit(std::function<void(MessageProcess&, const ExitStatus&)> fn) { onExit_ = std::move(fn); }
  void onError(std::function<void(MessageProcess&, const std::string& command, const std::string& what)> fn) {
    onError_ = std::move(fn);
  }

  // ---- the loop's sources (from the loop's thread, or before run) ----------

  // `fn(events)` when `fd` is readable (UV_READABLE). libuv makes the fd
  // non-blocking. One watch per descriptor.
  void watch(int fd, std::function<void(int events)> fn);
  void unwatch(int fd);
  // Reads a ring on this loop: `onSlot(slot)` for every slot, in order, as
  // soon as it is committed (the drain/arm protocol of RingReader::fd(),
  // run here, so no user code sits between a drain and its arming). What
  // onSlot throws is logged and its slot released; the next slots come as
  // always. onSlot may keep a slot by moving it out (up to the reader's
  // maxHeld; reading pauses at that many and goes on when one is released).
  // When the writer is gone (after its last slots) or the ring is corrupt,
  // `onEnd(e)` (ProcessDied, PeerClosed, ShmFormatError; logged without
  // onEnd) and reading ends. The loop shares the reader's attachment until
  // then or the manager's end. Error for an empty reader.
  void readRing(const RingReader& reader, std::function<void(ReadSlot&)> onSlot,
                std::function<void(const Error& e)> onEnd = {});
  // `fn` once after `delay` (zero or negative: on the next turn; the largest
  // finite values: as good as never), or every `period` (1 ms or more; Error
  // otherwise). A timer's id for cancel().
  std::uint64_t after(Timeout delay, std::function<void()> fn);
  std::uint64_t every(Timeout period, std::function<void()> fn);
  void cancel(std::uint64_t timerId);

  // ---- running -----------------------------------------------------------

  // Starts the workers that are not running yet, in the order added.
  void startProcesses();
  // Starts the workers (if needed), calls startThreads(), runs the loop
  // until requestStop() or a signal, shuts the workers down, calls close().
  // Returns 0 when every worker still running at shutdown stopped cleanly.
  int run();
  // Ends the loop and shuts down. Safe from any thread and from callbacks.
  void requestStop();
  // Runs `fn` on the loop's thread, soon. Safe from any thread (a GUI's,
  // say); work posted before run() runs once it starts, work posted after
  // the loop ended does not run.
  void post(std::function<void()> fn);
  bool stopping() const noexcept { return stopRequested_; }
  // True while the loop runs (signals are handled from then on).
  bool running() const noexcept { return running_; }
  // True inside a callback of this loop, where a wait would nest.
  bool inLoop() const noexcept { return inLoop_; }

  // run() in a background thread; the workers are started first, in the
  // calling thread (fork before threads).
  void runAsThread();
  // requestStop() and join; returns run()'s result.
  int stopThread();

  // Drives the loop on the calling thread until `done()` holds, `timeout`
  // passes or a stop is requested; the first call starts the workers and
  // calls startThreads(). `done` is checked before each turn of the loop.
  // A zero timeout runs one turn that does not wait (UV_RUN_NOWAIT: what is
  // ready is handled, posted work and its callbacks run) unless done()
  // already holds: an owner with a loop of its own polls the manager so.
  // Returns done(). Once a stop was requested, the manager shuts down as
  // run() does (finish()) and further calls return at once. Error when
  // called from a callback of this loop (libuv loops do not nest) or while
  // run() runs.
  bool runUntil(const std::function<bool()>& done, Timeout timeout);
  // Ends a manager driven with runUntil (run()'s shutdown and close()) and
  // returns what run() would; again later, the same result.
  int finish();

 protected:
  virtual void startThreads() {}
  virtual void handleMessage(MessageProcess& worker, Message& m);
  virtual void handleExit(MessageProcess& worker, const ExitStatus& status);
  // A command sent to `worker` with send() failed there.
  virtual void handleError(MessageProcess& worker, const std::string& command, const std::string& what);
  virtual void close() {}

 private:
  struct Worker;
  struct Handles;
  enum class Pending : std::uint8_t { None, Remove, Restart, Replace };

  void addWorker(std::unique_ptr<MessageProcess> p);
  void attach(Worker& w);
  void detach(Worker& w);
  Worker& find(const MessageProcess& p, const char* method) const;
  std::any& dataOf(MessageProcess& w);
  [[noreturn]] static void throwNotA(const MessageProcess& w, const std::type_info& wanted);
  [[noreturn]] static void throwDataType(const MessageProcess& w, const std::type_info& has,
                                         const std::type_info& wanted);
  void replaceWorker(MessageProcess& old, std::unique_ptr<MessageProcess> fresh);
  // Runs `op` on `w` now, or marks it for later when a callback of `w` runs.
  void schedule(Worker& w, Pending op, std::unique_ptr<MessageProcess> fresh);
  void runPending();
  void operate(Worker& w);
  static void closeHandles(Handles* h);
  // Stops `w` if it runs and reports its exit; then its handles are closed.
  void stopWorker(Worker& w);
  void erase(Worker& w, std::unique_ptr<MessageProcess> fresh);
  void restartWorker(Worker& w);
  void begin();
  int end();
  // Buffered: the frames one read brought (the loop wakes us for more).
  // Socket: everything the socket holds, up to EOF for a dead worker.
  enum class Drain : std::uint8_t { Buffered, Socket };
  void drain(Worker& w, Drain until);
  void reapWorker(Worker& w);
  int shutdown();
  void runPosted();
  void armCallbackTimer();
  // Runs a user callback; what it throws is logged.
  template <class Fn>
  void guarded(const char* what, MessageProcess* worker, Fn&& fn);
  static void onWorkerReadable(uv_poll_t* h, int status, int events);
  static void onWorkerReplies(uv_poll_t* h, int status, int events);
  static void onWorkerDeath(uv_poll_t* h, int status, int events);

  Options options_;
  std::unique_ptr<ForkServer> forkServer_;  // runAsThread's, released last
  uv_loop_t loop_{};
  uv_async_t wake_{};
  uv_signal_t sigint_{};
  uv_signal_t sigterm_{};
  uv_prepare_t prepare_{};      // before each wait: arm the callback timer
  uv_timer_t callbackTimer_{};  // earliest deadline of a callAsync callback
  uv_timer_t stepTimer_{};      // runUntil's deadline
  std::vector<std::unique_ptr<Worker>> workers_;
  std::unordered_map<const MessageProcess*, Worker*> byProcess_;
  std::unique_ptr<detail::LoopSources> sources_;  // the user's descriptors and timers
  std::function<void(MessageProcess&, Message&)> onMessage_;
  std::function<void(MessageProcess&, const ExitStatus&)> onExit_;
  std::function<void(MessageProcess&, const std::string&, const std::string&)> onError_;
  std::mutex postMutex_;
  std::vector<std::function<void()>> posted_;  // guarded by postMutex_
  bool unhandledErrors_ = false;
  std::atomic<bool> stopRequested_{false};
  std::atomic<bool> running_{false};
  bool ran_ = false;       // begun (run() or runUntil)
  bool ended_ = false;     // shut down
  bool inLoop_ = false;    // uv_run is on the stack
  bool shuttingDown_ = false;
  bool operating_ = false;  // a remove/restart/replace is on the stack
  bool pendingPosted_ = false;
  int result_ = 0;
  std::thread thread_;
  int threadResult_ = 0;
};

}  // namespace forklift
