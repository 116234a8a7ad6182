// forklift - MessageProcess: a forked backend that runs c__ commands
//
// Subclass `MessageProcess`, register each backend command once in the
// constructor, and write frontend methods that send it:
//
//   class MyProcess : public forklift::MessageProcess {
//    public:
//     explicit MyProcess(std::string name) : MessageProcess(std::move(name)) {
//       command("ping", &MyProcess::c__ping, {"parameter"});
//     }
//     void ping(const std::string& p) { send("ping", {{"parameter", p}}); }  // frontend
//    private:
//     void c__ping(std::string parameter) { /* backend */ }
//   };
//
// Two sides, one object. The *frontend* is the process that constructed the
// object and calls `start()`; the *backend* is the child forked by
// `start()`, running an event loop (libuv) that reads commands and calls
// their `c__` handlers. Which side a method runs on is in its name:
//   - backend only: `c__<command>` handlers, methods ending in `__`
//     (`preRun__`, `postRun__`, `sendOut__`, `watch__`, `after__`, ...).
//   - frontend only: everything else that is public.
// After the fork the two sides share no memory: a member changed by a
// handler changes only in the backend. Bulk data goes through shared memory
// (forklift/shm_array.hpp), results through `sendOut__` or `call` replies.
//
// Order matters (the tutorial's first rule): create IPC resources (events,
// shared memory) in the constructor, then start(), and only then start
// threads. `start()` refuses to fork a process that already runs other
// threads unless `ProcessOptions::allowThreads` is set, or a fork server
// that has a copy of the object runs (forklift/fork_server.hpp): then the
// server forks it, from the state the object had when the server started. Heavy libraries and
// threads of the backend belong in `preRun__`, which runs after the fork.
//
// Lifetime: `stop()` asks the backend to finish the handler in progress, run
// `postRun__` and exit; past the timeout it escalates to SIGTERM, then
// SIGKILL, and reports how the child ended. The destructor stops a running
// backend. The backend dies with the frontend (PR_SET_PDEATHSIG and EOF on
// its channel) and always leaves with `_exit`, never returning into main.
//
// Debugging: with `ProcessOptions::inProcess` or the environment variable
// FORKLIFT_IN_PROCESS=1 the backend loop runs in a thread of the frontend
// process instead of a forked child, so one debugger sees both sides. Then
// the two sides do share memory, and a stuck handler cannot be killed (it
// is abandoned past the stop timeout). The object is shared by both sides,
// so a subclass must call stop() in its own destructor. If it leaves that
// to this class's destructor, its members are destroyed while the backend
// thread may still be inside one of its handlers or timers, a race that no
// base class can prevent (undefined behaviour, as ThreadSanitizer reports);
// what forklift guarantees is that from the moment this class's destructor
// starts, the backend begins no more user code (no queued command, timer,
// watch or postRun__; one whose dispatch had begun just before may still
// be entered, the same race), and it logs an error saying stop() is missing.
//
// Sides: every frontend method called on the backend side (from a handler,
// preRun__, a timer, any thread of the backend) throws Error at once,
// naming the method and the side; so does a backend method called on the
// frontend.
//
// Threads: the frontend methods may be called from several threads at once.
// Calls are pipelined (each waits for its own reply, matched by id; none
// waits behind another's reply), recv() is serialised, and no frontend lock
// is held while a call waits, so stop() is never delayed by calls: calls
// still waiting when the backend ends fail at once with ProcessDied.
// Backend methods run on the backend loop's thread only.
//
// Waiting: every frontend wait (start, send, call, recv, stop) also watches
// the backend's death (its pidfd), so it ends at once when the backend dies,
// even if a process the backend forked keeps the channel open. Each ends at
// its own timeout whatever the backend does (stopped, slow, gone, or alive
// with its channel closed): none adds a bound of its own. Every Timeout
// here reads as timeout.hpp says: zero or negative does not wait (stop:
// SIGTERM at once), the largest finite values wait as kForever does.
//
// Logging: the library logs the lifecycle of each backend at debug level
// under its full name (started, ready, stop requested, escalation, ended
// with its status). A backend's title in `ps -o args` (and htop) reads
// "forklift: MyProcess.name"; /proc/pid/comm holds the first 15 characters
// of the name.
#pragma once

#include <sys/types.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include "forklift/call_future.hpp"
#include "forklift/channel.hpp"
#include "forklift/error.hpp"
#include "forklift/exit_status.hpp"
#include "forklift/message.hpp"
#include "forklift/reply.hpp"
#include "forklift/timeout.hpp"

// spdlog stays out of this header (it is most of a small file's compile
// time): to log through logger(), include forklift/log.hpp.
namespace spdlog {
class logger;
}

namespace forklift {

class MessageProcess;

namespace detail {
class Backend;
class Child;
class Requests;
struct ServedCall;
int runServed(MessageProcess& p, ServedCall& c);  // the fork server's child (fork_server.hpp)
}  // namespace detail

// Every duration here reads as timeout.hpp says (zero or negative: no
// wait; the largest finite values: as kForever).
struct ProcessOptions {
  // Fork until ready (preRun__ included); through the fork server, its
  // answer and the backend's readiness share this one deadline.
  Timeout startTimeout = std::chrono::seconds(10);
  Timeout callTimeout = std::chrono::seconds(10);   // default of call() and callAsync()
  Timeout sendTimeout = std::chrono::seconds(10);   // send() waits this long for a busy backend
  Timeout stopTimeout = std::chrono::seconds(5);    // default of stop() and of the destructor
  // Backend side: bytes of sendOut__ messages and replies queued while the
  // frontend does not read; past it sendOut__ waits up to `outWait`, then
  // throws TimeoutError (the message is not sent). A message larger than
  // the bound goes once the queue is empty (0: nothing waits queued behind
  // another message). outWait reads as every Timeout (timeout.hpp).
  std::size_t outQueueBytes = 16u << 20;
  Timeout outWait = std::chrono::seconds(5);
  // How messages travel: shared-memory queues with eventfd doorbells (the
  // default: faster both when the two processes share a CPU and when each
  // has its own; bench/compare), or a socket pair. The socket pair is
  // there either way, for descriptors and the peer's end. The queues'
  // doorbells cost descriptors: a running backend holds 12 in the frontend
  // instead of 5 (its start needs 17 free at once instead of 9: the
  // frontend's set-up and the child's, which inherits the limit), so under
  // the usual limit of 1024 open files about 80 backends run at once; for
  // more, raise the limit (ulimit -n) or choose the socket. A start past
  // it fails with SystemError (EMFILE) in one text wherever it ran out:
  // the backend's name, the descriptors this process holds, its limit
  // (RLIMIT_NOFILE), these counts and the two remedies. The
  // environment variable FORKLIFT_TRANSPORT=shm|socket overrides it (any
  // other value fails start() with an Error naming the variable and the
  // values it takes; so does FORKLIFT_IN_PROCESS with a value other than
  // 1/true/yes/on or 0/false/no/off; empty is unset).
  // `queueBytes` is each shared-memory queue's size (per direction); a
  // message larger than it streams through in pieces. A backend started
  // by the fork server (forklift/fork_server.hpp) uses the socket.
  // It is rounded up to a power of two of at least 4 KiB (0 is 4 KiB);
  // more than kMaxQueueBytes fails start() with LimitError.
  Transport transport = Transport::SharedMemory;
  std::size_t queueBytes = 256u << 10;
  static constexpr std::size_t kMaxQueueBytes = std::size_t{1} << 30;
  // Shared-memory transport: how long a side that waits for a message (the
  // frontend for a reply, the backend for a command) polls the queue before
  // it sleeps. A call then costs no system call when the answer comes
  // within it. Worth it only when frontend and backend have a CPU each: on
  // a shared CPU the spinner holds the CPU its peer needs. 0 (or less):
  // never spin; more than kMaxSpin spins kMaxSpin.
  std::chrono::microseconds spin{0};
  static constexpr std::chrono::seconds kMaxSpin{1};
  bool inProcess = false;     // run the backend in a thread (see above)
  bool allowThreads = false;  // fork although other threads run (logs a warning)
  // The backend ignores SIGINT, and SIGTERM from any process but its
  // frontend: Ctrl-C or a SIGTERM to the whole process group goes to the
  // frontend, which stops it (Manager::add sets it).
  bool ignoreSigint = false;
  // The backend also logs to this file. start() fails with a clear Error
  // when it cannot be opened for appending.
  std::string logFile;
  Limits limits;  // message size limits, both directions
};

class MessageProcess {
 public:
  explicit MessageProcess(std::string name, ProcessOptions options = {});
  virtual ~MessageProcess();
  MessageProcess(const MessageProcess&) = delete;
  MessageProcess& operator=(const MessageProcess&) = delete;

  // ---- frontend ------------------------------------------------------------

  // Forks the backend and returns once its loop is ready (after preRun__).
  // A stopped process may be started again. Throws Error when already
  // started, when other threads run, or when the log file cannot be opened;
  // Error with the backend's message when preRun__ threw; ProcessDied when
  // the child died while starting; TimeoutError past `startTimeout`.
  void start();
  void go() { start(); }

  // Fire and forget: the backend runs c__<command>. If that fails in the
  // backend (unknown command, bad argument, the handler threw), recv()
  // throws a CommandError for it. Throws ProcessDied when the backend is
  // gone, TimeoutError when it does not read within `sendTimeout` (a
  // message cut half-way is completed by the next send), LimitError for an
  // oversize or too deeply nested message (nothing sent).
  void send(const std::string& command, Map args = {});
  void send(Message m);

  // Request/reply: returns what the handler returned (nil for void). Throws
  // RemoteError carrying the backend's message (handler threw, unknown
  // command, bad or refused arguments), TimeoutError, or ProcessDied when
  // the backend died or stopped meanwhile (at once, not at the timeout).
  Value call(const std::string& command, Map args = {});
  Value call(const std::string& command, Map args, Timeout timeout);

  // The same call without waiting (see forklift/call_future.hpp): a future,
  // or `onDone(result)` on the thread that reads the reply (a Manager's
  // loop for its workers). The timeout counts from now.
  CallFuture callAsync(const std::string& command, Map args = {});
  CallFuture callAsync(const std::string& command, Map args, Timeout timeout);
  void callAsync(const std::string& command, Map args, Timeout timeout, std::function<void(CallResult)> onDone);

  // Messages the backend sent with sendOut__. `fd()` is readable exactly
  // while one is waiting (the tutorial's getPipe()): poll it, then recv().
  // A command sent with send() that failed in the backend arrives here too,
  // in order, and recv() throws it as CommandError; the next recv() goes on
  // with the next message. After the backend ended, the messages it sent
  // before are still delivered, then recv() throws PeerClosed (ProcessDied
  // when it died without being asked to stop). recv() from several threads
  // is serialised.
  int fd() const noexcept;
  std::optional<Message> recv(Timeout timeout);
  std::optional<Message> tryRecv() { return recv(Timeout::zero()); }

  // Asks the backend to stop after the handler in progress (no wait).
  void requestStop();
  // Waits for the backend to end; How::Running when it did not in time.
  ExitStatus waitStop(Timeout timeout);
  // requestStop, then waits up to `timeout`, then SIGTERM and 500 ms, then
  // SIGKILL (in-process: the thread is abandoned). Returns how the backend
  // ended; idempotent, and safe from several threads at once (all get the
  // same status). Calls still waiting fail with ProcessDied.
  ExitStatus stop();
  ExitStatus stop(Timeout timeout);
  // Stops several backends at once: all are asked together and waited for
  // against one deadline, then the ladder escalates on those still running.
  // Each one's status is then in its waitStop(Timeout::zero()).
  static void stopAll(std::span<MessageProcess* const> processes, Timeout timeout);

  // Sends `sig` to the backend (no effect in in-process mode or once it
  // ended). SIGTERM and SIGKILL are recorded as escalation in the status.
  void signal(int sig);

  bool isAlive() const;
  bool started() const noexcept { return state_.load() != State::Idle; }
  pid_t pid() const noexcept { return pid_; }
  // Readable once the backend has ended (a pidfd, or an eventfd in
  // in-process mode); -1 before start.
  int deathFd() const noexcept;
  // Before start(): the backend will ignore SIGINT, and SIGTERM from any
  // process but its frontend (ProcessOptions::ignoreSigint).
  void ignoreSigint() { options_.ignoreSigint = true; }
  const std::string& name() const noexcept { return name_; }
  // "MyProcess.my-process" once started.
  const std::string& fullName() const noexcept { return fullName_; }
  const ProcessOptions& options() const noexcept { return options_; }
  // This side's logger (frontend or backend, whichever calls); its methods
  // need forklift/log.hpp.
  spdlog::logger& logger();

  // For event loops (the Manager): the command channel, readable when
  // replies wait, and `pumpReplies()` to route them without blocking.
  int replyFd() const noexcept;
  void pumpReplies();
  // The output channel, for loops that drain it greedily.
  Channel& outChannel() noexcept { return out_; }
  // Internal to loops: where callAsync callbacks run (see Manager).
  void setCallbackDispatcher(std::function<void(std::function<void()>)> dispatch);
  std::optional<Deadline::Clock::time_point> nextCallbackDeadline();

 protected:
  // ---- construction (frontend, before start) -------------------------------

  // Registers c__<name>. `argNames` names the handler's parameters in
  // order; a last parameter of type Reply (not named) makes the reply
  // deferred. Parameter types are anything Message::get<T> reads, a
  // forklift::Fd among them (a descriptor that travels with the message).
  // Names starting with "__" are reserved (Error).
  template <class C, class R, class... A, std::size_t N>
  void command(std::string name, R (C::*handler)(A...), const char* const (&argNames)[N]) {
    registerCommand<C, R, A...>(std::move(name), handler, std::to_array(argNames));
  }
  template <class C, class R>
  void command(std::string name, R (C::*handler)()) {
    registerCommand<C, R>(std::move(name), handler, std::array<const char*, 0>{});
  }
  template <class C>
  void command(std::string name, void (C::*handler)(Reply)) {
    registerCommand<C, void, Reply>(std::move(name), handler, std::array<const char*, 0>{});
  }
  // The same for const member functions (handlers that change nothing).
  template <class C, class R, class... A, std::size_t N>
  void command(std::string name, R (C::*handler)(A...) const, const char* const (&argNames)[N]) {
    registerCommand<C, R, A...>(std::move(name), handler, std::to_array(argNames));
  }
  template <class C, class R>
  void command(std::string name, R (C::*handler)() const) {
    registerCommand<C, R>(std::move(name), handler, std::array<const char*, 0>{});
  }
  template <class C>
  void command(std::string name, void (C::*handler)(Reply) const) {
    registerCommand<C, void, Reply>(std::move(name), handler, std::array<const char*, 0>{});
  }
  // The whole message, for handlers that read their arguments themselves.
  void commandRaw(std::string name, std::function<Value(const Message&)> handler);

  // ---- backend ------------------------------------------------------------

  // After the fork, before the loop: open heavy libraries, start threads,
  // open shared memory. An exception here fails start() in the frontend.
  virtual void preRun__() {}
  // After the loop, before _exit: release what preRun__ acquired.
  virtual void postRun__() {}

  // Sends a message to the frontend (it reads it with recv / fd()). Never
  // blocks while the outgoing queue (ProcessOptions::outQueueBytes) has
  // room; when it is full, waits up to `outWait` for the frontend to read,
  // then throws TimeoutError and sends nothing.
  void sendOut__(const Message& m);

  // Calls `onReady(events)` (UV_READABLE / UV_WRITABLE bits) when `fd` is
  // ready; libuv sets the descriptor non-blocking. One watch per fd. An
  // exception of any type thrown by the callback is logged; the loop goes on.
  void watch__(int fd, std::function<void(int events)> onReady, bool writable = false);
  void unwatch__(int fd);
  // Timers on the backend loop; the id cancels them. Exceptions as above.
  // A delay of zero or less runs `fn` on the loop's next turn; a delay
  // past the clock's range never comes. A period below 1 ms is refused
  // (Error: it would run the timer in a loop).
  std::uint64_t after__(Timeout delay, std::function<void()> fn);
  std::uint64_t every__(Timeout period, std::function<void()> fn);
  void cancel__(std::uint64_t timerId);
  // Ends the loop after the current handler, as a stop request would.
  void stopLoop__();

 private:
  using Handler = std::function<Value(MessageProcess&, const Message&, Reply&)>;
  friend int detail::runServed(MessageProcess& p, detail::ServedCall& c);
  enum class State : std::uint8_t { Idle, Starting, Running };

  template <class C, class R, class... A, class F, std::size_t N>
  void registerCommand(std::string name, F handler, std::array<const char*, N> names);
  void addHandler(std::string name, Handler h);

  int runBackend(Channel cmd, Channel out, int stopBell);  // backend side; returns the exit code
  void awaitReady(Channel& cmd, const Deadline& d);
  [[noreturn]] void rethrowOutOfDescriptors();  // in a catch block of start()
  bool onBackendSide() const noexcept;
  // Throws Error when called on the wrong side (frontend-only `method`).
  void frontendOnly(const char* method) const;
  detail::Backend& backendSide(const char* method);
  // The running backend's calls; Error before start.
  detail::Requests& requests(const char* method, const std::string& command);
  [[noreturn]] void throwEnded(const std::string& during, const Deadline& d);
  std::string endedHow(const Deadline& d);
  // The longest an ended channel waits for the backend's status (less when
  // the caller's deadline is nearer).
  static constexpr Timeout kEndGrace = std::chrono::seconds(1);
  void finishRun(const ExitStatus& s);

  std::string name_;
  std::string fullName_;
  ProcessOptions options_;
  std::unordered_map<std::string, Handler> handlers_;
  std::shared_ptr<spdlog::logger> frontendLog_;
  std::shared_ptr<detail::Backend> backend_;  // set on the backend side only
  std::atomic<bool> destroying_{false};       // in-process: no more user code

  // frontend state; child_ and requests_ change only in start(), while no
  // other frontend method may run (state_ is Starting).
  std::atomic<State> state_{State::Idle};
  pid_t frontendPid_ = 0;
  pid_t pid_ = -1;
  std::unique_ptr<detail::Child> child_;
  std::shared_ptr<detail::Requests> requests_;
  std::atomic<bool> stopRequested_{false};
  std::mutex recvMutex_;  // one reader of the output channel
  Channel out_;           // sendOut__ messages in
  std::mutex logMutex_;   // frontendLog_ is made on first use
};

// ---------------------------------------------------------------- details

namespace detail {
template <class T>
using Arg = std::remove_cvref_t<T>;

template <class... A>
constexpr bool lastIsReply() {
  if constexpr (sizeof...(A) == 0) {
    return false;
  } else {
    return std::is_same_v<Arg<std::tuple_element_t<sizeof...(A) - 1, std::tuple<A...>>>, Reply>;
  }
}

// What Message::get<T> reads, so what a handler's parameter may be.
template <class T>
constexpr bool handlerArgType() {
  if constexpr (std::is_same_v<T, Value> || std::is_arithmetic_v<T> || std::is_same_v<T, std::string> ||
                std::is_same_v<T, Bytes> || std::is_same_v<T, List> || std::is_same_v<T, Map> ||
                std::is_same_v<T, Array> || std::is_same_v<T, Fd>) {
    return true;
  } else if constexpr (IsStdVector<T>::value) {
    return handlerArgType<typename T::value_type>();
  } else {
    return MatrixLike<T>;
  }
}

// One check per parameter, so that the compiler's message names it: the
// instantiation reads "checkHandlerParameter<Index, Param>" with the
// parameter's position (from 0) and type.
template <std::size_t Index, class Param>
constexpr void checkHandlerParameter() {
  static_assert(handlerArgType<Arg<Param>>(),
                "command(): the handler parameter at position Index has type Param, which a message cannot carry. "
                "Supported: bool, integers, float, double, std::string, forklift::Bytes, List, Map, Array, Fd, "
                "Value, std::vector of any of these, Eigen matrices (and a trailing Reply)");
}
}  // namespace detail

template <class C, class R, class... A, class F, std::size_t N>
void MessageProcess::registerCommand(std::string name, F handler, std::array<const char*, N> names) {
  static_assert(std::is_base_of_v<MessageProcess, C>, "a command handler must be a member of the process class");
  constexpr bool deferred = detail::lastIsReply<A...>();
  constexpr std::size_t named = sizeof...(A) - (deferred ? 1 : 0);
  static_assert(N == named, "command(): give one name per handler parameter (a trailing Reply is not named)");
  static_assert(!deferred || std::is_void_v<R>, "a handler that takes a Reply answers through it and returns void");
  constexpr bool argsOk = []<std::size_t... I>(std::index_sequence<I...>) {
    (detail::checkHandlerParameter<I, std::tuple_element_t<I, std::tuple<A...>>>(), ...);
    return (detail::handlerArgType<detail::Arg<std::tuple_element_t<I, std::tuple<A...>>>>() && ... && true);
  }(std::make_index_sequence<named>{});
  if constexpr (argsOk) {  // else the assertion above said why; nothing more to say
    addHandler(std::move(name), [handler, names](MessageProcess& self, const Message& m, Reply& reply) -> Value {
      C& obj = static_cast<C&>(self);
      auto invoke = [&]<std::size_t... I>(std::index_sequence<I...>) -> Value {
        // Arguments are read (and checked) before the handler runs; a bad one
        // throws TypeError naming the command and the argument.
        std::tuple<detail::Arg<std::tuple_element_t<I, std::tuple<A...>>>...> args{
            m.get<detail::Arg<std::tuple_element_t<I, std::tuple<A...>>>>(names[I])...};
        if constexpr (deferred) {
          (obj.*handler)(std::move(std::get<I>(args))..., std::move(reply));
          return Value();
        } else if constexpr (std::is_void_v<R>) {
          (obj.*handler)(std::move(std::get<I>(args))...);
          return Value();
        } else {
          return Value((obj.*handler)(std::move(std::get<I>(args))...));
        }
      };
      return invoke(std::make_index_sequence<named>{});
    });
  }
}

}  // namespace forklift
