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
// threads unless `ProcessOptions::allowThreads` is set. Heavy libraries and
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
// the two sides do share memory, a stuck handler cannot be killed, and a
// subclass must call stop() in its own destructor.
//
// Threads: the frontend methods of one object may be called from several
// threads (a mutex serialises them); backend methods run on the loop's
// thread only.
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
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include <spdlog/logger.h>

#include "forklift/channel.hpp"
#include "forklift/detail/fd.hpp"
#include "forklift/error.hpp"
#include "forklift/message.hpp"
#include "forklift/timeout.hpp"

namespace forklift {

namespace detail {
class Backend;
}

// How a backend ended.
struct ExitStatus {
  enum class How : std::uint8_t {
    Running,    // not ended (yet): a wait timed out
    Exited,     // exit code in `code`
    Signaled,   // killed by `signal`
    Abandoned,  // in-process mode: a stuck backend thread was left behind
    NotStarted,
  };
  How how = How::NotStarted;
  int code = 0;
  int signal = 0;
  // The frontend had to send SIGTERM (1) or SIGKILL (2) to end it.
  int escalation = 0;

  bool ok() const noexcept { return how == How::Exited && code == 0; }
  std::string describe() const;  // "exited with code 0", "killed by SIGKILL (after SIGKILL)"
};

struct ProcessOptions {
  Timeout startTimeout = std::chrono::seconds(10);  // fork until ready (preRun__ included)
  Timeout callTimeout = std::chrono::seconds(10);   // default of call()
  Timeout sendTimeout = std::chrono::seconds(10);   // send() waits this long for a busy backend
  Timeout stopTimeout = std::chrono::seconds(5);    // default of stop() and of the destructor
  // Backend side: bytes of sendOut__ messages and replies queued while the
  // frontend does not read; past it sendOut__ waits up to `outWait`, then
  // throws TimeoutError (the message is not sent).
  std::size_t outQueueBytes = 16u << 20;
  Timeout outWait = std::chrono::seconds(5);
  bool inProcess = false;     // run the backend in a thread (see above)
  bool allowThreads = false;  // fork although other threads run (logs a warning)
  bool ignoreSigint = false;  // the backend ignores SIGINT (Ctrl-C goes to the frontend)
  std::string logFile;        // the backend also logs to this file
  Limits limits;              // message size limits, both directions
};

// A deferred reply (backend). A handler that takes a `Reply` as its last
// parameter answers when it likes: from a timer, a watched descriptor, or
// at once. A Reply destroyed unanswered answers the caller with an error,
// so no call() waits for a reply that cannot come. For a command that came
// with send(), `wanted()` is false and answering does nothing.
class Reply {
 public:
  Reply() = default;
  Reply(Reply&& o) noexcept : backend_(std::move(o.backend_)), id_(std::exchange(o.id_, 0)) {}
  Reply& operator=(Reply&& o) noexcept;
  Reply(const Reply&) = delete;
  Reply& operator=(const Reply&) = delete;
  ~Reply();

  bool wanted() const noexcept { return id_ != 0; }
  void resolve(Value v = {});
  void reject(const std::string& error);

 private:
  friend class detail::Backend;
  Reply(std::weak_ptr<detail::Backend> b, std::uint64_t id) : backend_(std::move(b)), id_(id) {}
  std::weak_ptr<detail::Backend> backend_;
  std::uint64_t id_ = 0;
};

class MessageProcess {
 public:
  explicit MessageProcess(std::string name, ProcessOptions options = {});
  virtual ~MessageProcess();
  MessageProcess(const MessageProcess&) = delete;
  MessageProcess& operator=(const MessageProcess&) = delete;

  // ---- frontend ------------------------------------------------------------

  // Forks the backend and returns once its loop is ready (after preRun__).
  // Throws Error when already started or when other threads run, Error with
  // the backend's message when preRun__ threw, ProcessDied when the child
  // died while starting, TimeoutError past `startTimeout`.
  void start();
  void go() { start(); }

  // Fire and forget: the backend runs c__<command>. Throws ProcessDied when
  // the backend is gone, TimeoutError when it does not read within
  // `sendTimeout`, LimitError for an oversize message.
  void send(const std::string& command, Map args = {});
  void send(Message m);

  // Request/reply: returns what the handler returned (nil for void). Throws
  // RemoteError carrying the backend's message (handler threw, unknown
  // command, bad arguments), TimeoutError, or ProcessDied when the backend
  // died meanwhile (at once, not at the timeout).
  Value call(const std::string& command, Map args = {});
  Value call(const std::string& command, Map args, Timeout timeout);

  // Messages the backend sent with sendOut__. `fd()` is readable exactly
  // while one is waiting (the tutorial's getPipe()): poll it, then recv().
  int fd() const noexcept { return out_.fd(); }
  std::optional<Message> recv(Timeout timeout);
  std::optional<Message> tryRecv() { return recv(Timeout::zero()); }
  // The channel of those messages, for event loops that drain it greedily.
  Channel& outChannel() noexcept { return out_; }

  // Asks the backend to stop after the handler in progress (no wait).
  void requestStop();
  // Waits for the backend to end; How::Running when it did not in time.
  ExitStatus waitStop(Timeout timeout);
  // requestStop + waitStop, escalating to SIGTERM then SIGKILL past the
  // timeout. Returns how the backend ended; idempotent.
  ExitStatus stop();
  ExitStatus stop(Timeout timeout);

  // Sends `sig` to the backend (no effect in in-process mode). SIGTERM and
  // SIGKILL are recorded as escalation in the ExitStatus.
  void signal(int sig);

  bool isAlive() const;
  bool started() const noexcept { return started_; }
  pid_t pid() const noexcept { return pid_; }
  // Readable once the backend has ended (a pidfd, or an eventfd in
  // in-process mode); -1 before start.
  int deathFd() const noexcept { return death_.get(); }
  // Before start(): the backend will ignore SIGINT.
  void ignoreSigint() { options_.ignoreSigint = true; }
  const std::string& name() const noexcept { return name_; }
  // "MyProcess.my-process" once started.
  const std::string& fullName() const noexcept { return fullName_; }
  const ProcessOptions& options() const noexcept { return options_; }
  // This side's logger (frontend or backend, whichever calls).
  spdlog::logger& logger();

 protected:
  // ---- construction (frontend, before start) -------------------------------

  // Registers c__<name>. `argNames` names the handler's parameters in
  // order; a last parameter of type Reply (not named) makes the reply
  // deferred. Parameter types are anything Message::get<T> reads.
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
  // ready; libuv sets the descriptor non-blocking. One watch per fd.
  void watch__(int fd, std::function<void(int events)> onReady, bool writable = false);
  void unwatch__(int fd);
  // Timers on the backend loop; the id cancels them.
  std::uint64_t after__(Timeout delay, std::function<void()> fn);
  std::uint64_t every__(Timeout period, std::function<void()> fn);
  void cancel__(std::uint64_t timerId);
  // Ends the loop after the current handler, as a stop request would.
  void stopLoop__();

 private:
  friend class detail::Backend;
  using Handler = std::function<Value(MessageProcess&, const Message&, Reply&)>;

  template <class C, class R, class... A, std::size_t N>
  void registerCommand(std::string name, R (C::*handler)(A...), std::array<const char*, N> names);

  [[noreturn]] void runChild(Channel cmd, Channel out);
  int runBackend(Channel cmd, Channel out);  // returns the exit code
  [[noreturn]] void died(const std::string& during);
  ExitStatus reap(Timeout timeout);
  ExitStatus killNow();
  void closeFrontend();
  bool onBackendSide() const noexcept;
  // The backend loop, for a backend-only method; Error on the frontend.
  detail::Backend& backendSide(const char* method);
  std::string whoAmI() const;

  std::string name_;
  std::string fullName_;
  ProcessOptions options_;
  std::unordered_map<std::string, Handler> handlers_;
  std::shared_ptr<spdlog::logger> frontendLog_;
  std::shared_ptr<detail::Backend> backend_;  // set on the backend side only

  // frontend state
  std::mutex mutex_;
  Channel cmd_;   // commands out, replies in
  Channel out_;   // sendOut__ messages in
  detail::UniqueFd death_;
  pid_t pid_ = -1;
  std::thread thread_;  // in-process mode
  std::atomic<int> threadCode_{0};
  int escalation_ = 0;
  bool started_ = false;
  bool stopRequested_ = false;
  std::optional<ExitStatus> status_;
  std::uint64_t nextId_ = 0;
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
}  // namespace detail

template <class C, class R, class... A, std::size_t N>
void MessageProcess::registerCommand(std::string name, R (C::*handler)(A...), std::array<const char*, N> names) {
  static_assert(std::is_base_of_v<MessageProcess, C>, "a command handler must be a member of the process class");
  constexpr bool deferred = detail::lastIsReply<A...>();
  constexpr std::size_t named = sizeof...(A) - (deferred ? 1 : 0);
  static_assert(N == named, "command(): give one name per handler parameter (a trailing Reply is not named)");
  static_assert(!deferred || std::is_void_v<R>, "a handler that takes a Reply answers through it and returns void");
  handlers_[std::move(name)] = [handler, names](MessageProcess& self, const Message& m, Reply& reply) -> Value {
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
  };
}

}  // namespace forklift
