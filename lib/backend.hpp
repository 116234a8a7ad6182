// forklift - the backend's event loop (internal)
//
// One `Backend` lives on the backend side of a MessageProcess (the forked
// child, or the thread in in-process mode). It owns a libuv loop that reads
// commands from the command channel and dispatches them, writes replies and
// sendOut__ messages through bounded queues, and runs the user's watches
// and timers. libuv handles are not movable and are freed only in their
// close callbacks, so every handle lives on the heap or inside this pinned
// object.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>

#include "forklift/channel.hpp"
#include "forklift/process.hpp"
#include "loop_sources.hpp"

namespace forklift::detail {

class Backend : public std::enable_shared_from_this<Backend> {
 public:
  // The logger is made on first use (by `makeLog`): most backends never
  // log, and making one costs more than the rest of the start.
  Backend(MessageProcess& owner, Channel cmd, Channel out,
          std::function<std::shared_ptr<spdlog::logger>()> makeLog);
  ~Backend();
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  spdlog::logger& log();

  void sendReady();
  void sendFailed(const std::string& why);
  // Runs the loop until a stop request, stopLoop__ or the frontend's exit.
  void run();
  // Gives queued output up to `bound` to leave; logs what is dropped.
  void flush(Timeout bound);

  void sendOut(const Message& m);
  void answer(std::uint64_t id, bool ok, Value v, const std::string& error);

  void watch(int fd, std::function<void(int)> fn, bool writable);
  void unwatch(int fd);
  std::uint64_t addTimer(Timeout delay, Timeout period, std::function<void()> fn);
  void cancel(std::uint64_t id);
  void requestStop();

 private:
  // Output of one channel: frames go straight to the socket while it takes
  // them, and queue (up to a bound) when it does not.
  struct Writer {
    Channel* ch = nullptr;
    Buffer frame;    // scratch for one encoded frame
    Buffer pending;  // bytes the socket has not taken yet
    std::size_t off = 0;
    std::size_t queued() const noexcept { return pending.size() - off; }
  };
  void enqueue(Writer& w, const Message& m);
  bool drain(Writer& w);  // true when empty
  void updatePoll(Writer& w);
  void onCommandReadable();
  void dispatch(Message& m);
  static void onCmdPoll(uv_poll_t* h, int status, int events);
  static void onOutPoll(uv_poll_t* h, int status, int events);
  void closeAll();

  MessageProcess& owner_;
  std::function<std::shared_ptr<spdlog::logger>()> makeLog_;
  std::shared_ptr<spdlog::logger> log_;
  Channel cmd_;
  Channel out_;
  Writer cmdWriter_;
  Writer outWriter_;
  uv_loop_t loop_{};  // declared before every handle that lives on it
  uv_poll_t cmdPoll_{};
  uv_poll_t outPoll_{};
  bool outPolling_ = false;
  bool stopping_ = false;
  bool frontendGone_ = false;
  LoopSources sources_;
};

}  // namespace forklift::detail
