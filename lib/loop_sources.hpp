// forklift - user descriptors and timers on a libuv loop (internal)
//
// Both the backend loop and the Manager let users watch descriptors and run
// timers. `LoopSources` keeps those handles: each lives on the heap, is
// found by its descriptor or timer id, and is freed only in its close
// callback, as libuv requires. A callback that throws is reported through
// `onError` and the loop goes on.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>

#include "forklift/timeout.hpp"

namespace forklift::detail {

class LoopSources {
 public:
  using ErrorFn = std::function<void(const std::string& where, const std::string& what)>;

  LoopSources(uv_loop_t* loop, ErrorFn onError) : loop_(loop), onError_(std::move(onError)) {}
  ~LoopSources() { closeAll(); }
  LoopSources(const LoopSources&) = delete;
  LoopSources& operator=(const LoopSources&) = delete;

  // Throws Error when fd is already watched or cannot be polled.
  void watch(int fd, std::function<void(int events)> fn, bool writable);
  void unwatch(int fd);
  // period 0: once.
  std::uint64_t addTimer(Timeout delay, Timeout period, std::function<void()> fn);
  void cancel(std::uint64_t id);
  // Closes every handle; the loop must run once more to free them.
  void closeAll();

 private:
  struct Watch;
  struct Timer;

  uv_loop_t* loop_;
  ErrorFn onError_;
  std::uint64_t nextTimer_ = 0;
  std::unordered_map<int, Watch*> watches_;
  std::unordered_map<std::uint64_t, Timer*> timers_;
};

}  // namespace forklift::detail
