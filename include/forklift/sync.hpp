// forklift - events that synchronise the two sides of a fork
//
// `Event` is an eventfd: made before fork, it is the same kernel object on
// both sides. One side `set()`s it, the other `wait()`s for it. A wait takes
// a timeout and, given the peer's death descriptor
// (`MessageProcess::deathFd()`), also ends with `ProcessDied` when the peer
// exits first: no wait outlives the process it waits on.
//
// `EventGroup(n)` is n events made up front (before start), with a free list
// the frontend draws from: `reserve()` an index, send it in a message, the
// backend `set(i)`s it when done, the frontend waits and `release(i)`s it.
//
// `SyncIndex` is that round as one RAII guard (tutorial step 2):
//   {
//     forklift::SyncIndex sync(events_, *this);          // reserve
//     send("ping", {{"event_index", sync.index()}});
//   }                                                     // wait, release
//
// Memory ordering: everything the setter wrote before `set()` (to shared
// memory, say) is visible to the waiter after `wait()` returns true; the
// eventfd write and read are the synchronisation.
//
// Threads: an Event may be set from any thread or process, and waited on by
// one waiter at a time. An EventGroup's reserve/release belong to one side
// (the frontend) and one thread.
#pragma once

#include <cstddef>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/timeout.hpp"

namespace forklift {

class MessageProcess;

class Event {
 public:
  Event();  // throws SystemError
  Event(Event&&) noexcept = default;
  Event& operator=(Event&&) noexcept = default;

  int fd() const noexcept { return fd_.get(); }

  // Sets the event. Async-signal-safe. Setting a set event keeps it set.
  void set();
  // Waits until set, then clears it. Returns false on timeout. With a
  // `deathFd` (readable when the peer ended), throws ProcessDied when the
  // peer ends before the event is set.
  bool wait(Timeout timeout, int deathFd = -1);
  bool isSet() const;  // without clearing
  void clear();

 private:
  detail::UniqueFd fd_;
};

class EventGroup {
 public:
  explicit EventGroup(std::size_t n);

  std::size_t size() const noexcept { return events_.size(); }
  Event& operator[](std::size_t i) { return events_.at(i); }

  // Frontend: a free index, its event cleared. Throws Error when every
  // index is in use.
  std::size_t reserve();
  void release(std::size_t i);
  // Frontend: an index whose wait was abandoned (timeout, peer died) is
  // never handed out again, because a late set() could fire into the next
  // user's wait.
  void retire(std::size_t i);

  // Backend (or anyone): sets event i. Throws Error for a bad index.
  void set(std::size_t i);

 private:
  std::vector<Event> events_;
  std::vector<unsigned char> state_;  // 0 free, 1 reserved, 2 retired
};

class SyncIndex {
 public:
  // Reserves an index of `group`. With `peer`, the wait also ends when
  // the peer's backend dies.
  explicit SyncIndex(EventGroup& group, Timeout timeout = std::chrono::seconds(10));
  SyncIndex(EventGroup& group, const MessageProcess& peer, Timeout timeout = std::chrono::seconds(10));
  SyncIndex(const SyncIndex&) = delete;
  SyncIndex& operator=(const SyncIndex&) = delete;

  std::size_t index() const noexcept { return index_; }

  // Waits for the event and releases the index. Throws TimeoutError or
  // ProcessDied (the index is then retired). Idempotent.
  void wait();

  // Waits unless wait() ran. Throws like wait() when the scope ends
  // normally; while unwinding from another exception it only retires the
  // index and never throws.
  ~SyncIndex() noexcept(false);

 private:
  EventGroup& group_;
  std::size_t index_;
  int deathFd_;
  Timeout timeout_;
  int uncaught_;
  bool done_ = false;
};

}  // namespace forklift
