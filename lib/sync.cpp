#include "forklift/sync.hpp"

#include <poll.h>
#include <sys/eventfd.h>

#include <cerrno>
#include <cstdint>
#include <exception>
#include <string>

#include "forklift/error.hpp"
#include "forklift/process.hpp"
#include "posix.hpp"
#include "seams.hpp"

namespace forklift {

// ---------------------------------------------------------------- Event

Event::Event() : fd_(detail::syscalls.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (!fd_) detail::throwErrno("cannot create event (eventfd)");
}

void Event::set() {
  const std::uint64_t one = 1;
  // EAGAIN means the counter is at its maximum: the event is set already.
  if (detail::retryEintr([&] { return ::write(fd(), &one, sizeof one); }) < 0 && errno != EAGAIN)
    detail::throwErrno("cannot set event");
}

void Event::clear() {
  std::uint64_t v;
  if (detail::retryEintr([&] { return ::read(fd(), &v, sizeof v); }) < 0 && errno != EAGAIN)
    detail::throwErrno("cannot clear event");
}

bool Event::isSet() const {
  return detail::waitFor(fd(), POLLIN, Deadline(Timeout::zero()));
}

bool Event::wait(Timeout timeout, int deathFd) {
  const Deadline d(timeout);
  for (;;) {
    pollfd p[2] = {{fd(), POLLIN, 0}, {deathFd, POLLIN, 0}};
    const int r = ::poll(p, deathFd >= 0 ? 2 : 1, d.pollMillis());
    if (r < 0) {
      if (errno == EINTR) continue;
      detail::throwErrno("cannot wait for event");
    }
    if (p[0].revents & POLLIN) {
      std::uint64_t v;
      const ssize_t n = detail::retryEintr([&] { return ::read(fd(), &v, sizeof v); });
      if (n == sizeof v) return true;
      if (n < 0 && errno != EAGAIN) detail::throwErrno("cannot read event");
      continue;  // another waiter took it; keep waiting
    }
    if (deathFd >= 0 && p[1].revents) throw ProcessDied("event: the peer process ended before setting the event");
    if (r == 0) return false;
  }
}

// ---------------------------------------------------------------- EventGroup

EventGroup::EventGroup(std::size_t n) : events_(n), state_(n, 0) {}

std::size_t EventGroup::reserve() {
  for (std::size_t i = 0; i < state_.size(); ++i) {
    if (state_[i] == 0) {
      state_[i] = 1;
      events_[i].clear();
      return i;
    }
  }
  throw Error("event group: all " + std::to_string(state_.size()) + " events are in use or retired");
}

void EventGroup::release(std::size_t i) {
  if (i < state_.size() && state_[i] == 1) state_[i] = 0;
}

void EventGroup::retire(std::size_t i) {
  if (i < state_.size()) state_[i] = 2;
}

void EventGroup::set(std::size_t i) {
  if (i >= events_.size())
    throw Error("event group: index " + std::to_string(i) + " out of range (size " + std::to_string(events_.size()) + ")");
  events_[i].set();
}

// ---------------------------------------------------------------- SyncIndex

SyncIndex::SyncIndex(EventGroup& group, Timeout timeout)
    : group_(group), index_(group.reserve()), deathFd_(-1), timeout_(timeout), uncaught_(std::uncaught_exceptions()) {}

SyncIndex::SyncIndex(EventGroup& group, const MessageProcess& peer, Timeout timeout)
    : group_(group),
      index_(group.reserve()),
      deathFd_(peer.deathFd()),
      timeout_(timeout),
      uncaught_(std::uncaught_exceptions()) {}

void SyncIndex::wait() {
  if (done_) return;
  done_ = true;
  bool ok = false;
  try {
    ok = group_[index_].wait(timeout_, deathFd_);
  } catch (...) {
    group_.retire(index_);
    throw;
  }
  if (!ok) {
    group_.retire(index_);
    throw TimeoutError("sync index " + std::to_string(index_) + ": not set within " +
                       std::to_string(timeout_.count()) + " ms");
  }
  group_.release(index_);
}

SyncIndex::~SyncIndex() noexcept(false) {
  if (done_) return;
  if (std::uncaught_exceptions() > uncaught_) {
    done_ = true;
    group_.retire(index_);
    return;
  }
  wait();
}

}  // namespace forklift
