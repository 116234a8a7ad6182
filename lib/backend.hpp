// forklift - the backend's event loop (internal)
//
// One `Backend` lives on the backend side of a MessageProcess (the forked
// child, or the thread in in-process mode). It owns a libuv loop that reads
// commands from the command channel and dispatches them, writes replies and
// sendOut__ messages through bounded queues, and runs the user's watches
// and timers. libuv handles are not movable and are freed only in their
// close callbacks, so every handle lives on the heap or inside this pinned
// object.
//
// It knows its MessageProcess only through `BackendConfig`: the command
// table (handlers bound to the object), the queue bounds, a name for
// messages, and a flag that forbids further user code.
//
// Nothing fails silently: a call's failure is its error reply; a sent
// command's failure (unknown, bad arguments, handler threw, message
// refused) goes to the frontend as a __command_error event on the output
// channel. A corrupt command stream ends the loop; the backend then exits
// with kExitCorruptStream after telling the frontend why.
#pragma once

#include <uv.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <spdlog/logger.h>

#include "forklift/channel.hpp"
#include "forklift/reply.hpp"
#include "forklift/timeout.hpp"
#include "loop_sources.hpp"

namespace forklift::detail {

// The level a logger made now by makeLogger gets (formatLogger's), in log.cpp.
spdlog::level::level_enum newLoggerLevel() noexcept;

using CommandFn = std::function<Value(const Message&, Reply&)>;
using CommandTable = std::unordered_map<std::string, CommandFn>;

struct BackendConfig {
  std::string who;  // "MyProcess.name"
  CommandTable commands;
  std::size_t outQueueBytes = 16u << 20;
  Timeout outWait = std::chrono::seconds(5);
  // The logger is made on first use: most backends never log, and making
  // one costs more than the rest of the start.
  std::function<std::shared_ptr<spdlog::logger>()> makeLog;
  // Set when the object is being destroyed (in-process mode): no handler,
  // timer or watch callback runs from then on.
  const std::atomic<bool>* userGone = nullptr;
  // The frontend's stop request: an eventfd (not owned). When it rings, the
  // commands already in the channel are handled, then the loop ends.
  int stopBell = -1;
};

class Backend : public std::enable_shared_from_this<Backend> {
 public:
  Backend(BackendConfig config, Channel cmd, Channel out);
  ~Backend();
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  spdlog::logger& log();
  // Whether a line at `level` would be written: asked before the lines of
  // an ordinary run (ready, stop, exit), so that a backend that never logs
  // never makes its logger (about 10,000 instructions, a terminal check and
  // the lazy binding of spdlog in each child).
  bool logs(spdlog::level::level_enum level) const noexcept;

  void sendReady();
  void sendFailed(const std::string& why);
  // Runs the loop until a stop request, stopLoop__ or the frontend's exit.
  void run();
  // The command stream was corrupt (the exit code says so).
  bool corrupt() const noexcept { return corrupt_; }
  bool userGone() const noexcept { return config_.userGone && config_.userGone->load(); }
  // Gives queued output up to `bound` to leave; logs what is dropped.
  void flush(Timeout bound);

  void sendOut(const Message& m);
  void answer(std::uint64_t id, bool ok, Value v, const std::string& error);
  // A failure of a command that came without a reply wanted.
  void reportFailure(const std::string& command, const std::string& error);

  void watch(int fd, std::function<void(int)> fn, bool writable);
  void unwatch(int fd);
  std::uint64_t addTimer(Timeout delay, Timeout period, std::function<void()> fn);
  void cancel(std::uint64_t id);
  void requestStop();

 private:
  // Output of one channel: frames go straight to the socket while it takes
  // them, and queue (up to a bound) when it does not. A queued frame's
  // descriptors are duplicates the queue owns (the sender may close its own
  // at once), sent with the frame's first byte and closed then.
  struct Writer {
    struct Attached {
      std::uint64_t at = 0;  // stream offset of the frame's first byte
      std::vector<UniqueFd> fds;
    };
    Channel* ch = nullptr;
    Buffer frame;             // scratch for one encoded frame
    std::vector<int> frameFds;  // scratch: its descriptors (not owned)
    Buffer pending;  // bytes the socket has not taken yet
    std::size_t off = 0;
    std::uint64_t sent = 0;   // stream offset of pending[off]
    std::deque<Attached> attached;
    std::size_t queued() const noexcept { return pending.size() - off; }
  };
  void enqueue(Writer& w, const Message& m);
  bool drain(Writer& w);  // true when empty
  void updatePoll(Writer& w);
  void onWritable(Writer& w, int status);  // its socket or doorbell says it may write
  // `waited`: the loop's own epoll_wait took the doorbell's edge.
  void onCommandReadable(bool waited = false);
  void onCommandInput(bool waited);  // onCommandReadable, its errors handled
  void runShared();                  // run() over shared memory
  void dispatch(Message& m);
  void refuse(const Error& e, const std::string& command, std::uint64_t id);
  static void onCmdPoll(uv_poll_t* h, int status, int events);
  static void onOutPoll(uv_poll_t* h, int status, int events);
  static void onCmdWritable(uv_poll_t* h, int status, int events);
  static void onStopBell(uv_poll_t* h, int status, int events);
  void closeAll();

  BackendConfig config_;
  std::shared_ptr<spdlog::logger> log_;
  Channel cmd_;
  Channel out_;
  Writer cmdWriter_;
  Writer outWriter_;
  uv_loop_t loop_{};  // declared before every handle that lives on it
  uv_poll_t cmdPoll_{};
  uv_poll_t cmdWritePoll_{};  // shared memory: the command queue's space doorbell
  uv_poll_t outPoll_{};
  uv_poll_t stopPoll_{};
  // Shared memory: the loop waits here, on the command queue's doorbell
  // (edge-triggered, never read), the channel's end and libuv's own epoll
  // descriptor; libuv runs one non-blocking turn when its descriptor or
  // its next timer says so. A message then costs the loop one system call.
  UniqueFd loopSet_;
  bool cmdWritePolled_ = false;
  bool cmdWritePolling_ = false;
  bool outPolling_ = false;
  bool stopping_ = false;
  bool frontendGone_ = false;
  bool corrupt_ = false;
  LoopSources sources_;
};

}  // namespace forklift::detail
