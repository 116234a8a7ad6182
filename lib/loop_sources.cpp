#include "loop_sources.hpp"

#include <algorithm>

#include "forklift/error.hpp"

namespace forklift::detail {

struct LoopSources::Watch {
  uv_poll_t handle{};
  LoopSources* owner = nullptr;
  int fd = -1;
  std::function<void(int)> fn;
};

struct LoopSources::Timer {
  uv_timer_t handle{};
  LoopSources* owner = nullptr;
  std::uint64_t id = 0;
  bool repeat = false;
  std::function<void()> fn;
};

namespace {

// Runs a user callback; whatever it throws is reported, never propagated
// into libuv (which is C and cannot unwind).
template <class Fn>
void guarded(const LoopSources::ErrorFn& onError, const std::string& where, Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    onError(where, e.what());
  } catch (...) {
    onError(where, "a non-standard exception");
  }
}

template <class T>
void closeAndDelete(T* owner, uv_handle_t* h) {
  h->data = owner;
  uv_close(h, [](uv_handle_t* hh) { delete static_cast<T*>(hh->data); });
}

}  // namespace

void LoopSources::watch(int fd, std::function<void(int)> fn, bool writable) {
  if (watches_.count(fd)) throw Error("watch: descriptor " + std::to_string(fd) + " is already watched");
  auto* w = new Watch;
  w->owner = this;
  w->fd = fd;
  w->fn = std::move(fn);
  if (const int r = uv_poll_init(loop_, &w->handle, fd); r < 0) {
    delete w;
    throw Error("cannot watch descriptor " + std::to_string(fd) + ": " + uv_strerror(r));
  }
  w->handle.data = w;
  uv_poll_start(&w->handle, UV_READABLE | (writable ? UV_WRITABLE : 0), [](uv_poll_t* h, int status, int events) {
    auto* ww = static_cast<Watch*>(h->data);
    // On a poll error, let the callback meet the error on its own read.
    if (status < 0) events = UV_READABLE;
    guarded(ww->owner->onError_, "callback of descriptor " + std::to_string(ww->fd), [&] { ww->fn(events); });
  });
  watches_[fd] = w;
}

void LoopSources::unwatch(int fd) {
  auto it = watches_.find(fd);
  if (it == watches_.end()) return;
  Watch* w = it->second;
  watches_.erase(it);
  uv_poll_stop(&w->handle);
  closeAndDelete(w, reinterpret_cast<uv_handle_t*>(&w->handle));
}

std::uint64_t LoopSources::addTimer(Timeout delay, Timeout period, std::function<void()> fn) {
  auto* t = new Timer;
  t->owner = this;
  t->id = ++nextTimer_;
  t->repeat = period.count() > 0;
  t->fn = std::move(fn);
  uv_timer_init(loop_, &t->handle);
  t->handle.data = t;
  timers_[t->id] = t;
  uv_timer_start(
      &t->handle,
      [](uv_timer_t* h) {
        auto* tt = static_cast<Timer*>(h->data);
        LoopSources* owner = tt->owner;
        const std::uint64_t id = tt->id;
        const bool repeat = tt->repeat;
        // fn may cancel this very timer: use nothing of tt after it.
        guarded(owner->onError_, "timer " + std::to_string(id), [&] { tt->fn(); });
        if (!repeat) owner->cancel(id);
      },
      // A negative delay is no delay (it wrapped into a timer that never
      // fired); libuv clamps one past its clock's range to its last moment.
      static_cast<std::uint64_t>(std::max<Timeout::rep>(delay.count(), 0)),
      static_cast<std::uint64_t>(std::max<Timeout::rep>(period.count(), 0)));
  return t->id;
}

void LoopSources::cancel(std::uint64_t id) {
  auto it = timers_.find(id);
  if (it == timers_.end()) return;
  Timer* t = it->second;
  timers_.erase(it);
  uv_timer_stop(&t->handle);
  closeAndDelete(t, reinterpret_cast<uv_handle_t*>(&t->handle));
}

void LoopSources::closeAll() {
  while (!watches_.empty()) unwatch(watches_.begin()->first);
  while (!timers_.empty()) cancel(timers_.begin()->first);
}

}  // namespace forklift::detail
