// forklift - timeouts and deadlines
//
// Every blocking call in forklift takes a `Timeout`. `kForever` waits without
// a bound, but even then the wait ends when the peer process dies: forklift
// never waits on a process that is gone. A `Deadline` turns one timeout into
// the remaining time of each wait in a retry loop, so EINTR and partial reads
// never stretch the total.
#pragma once

#include <chrono>

namespace forklift {

using Timeout = std::chrono::milliseconds;
inline constexpr Timeout kForever = Timeout::max();

class Deadline {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Deadline(Timeout t) noexcept
      : forever_(t == kForever), at_(forever_ ? Clock::time_point::max() : Clock::now() + t) {}
  // The same, from a `now` the caller read already (one clock read less).
  Deadline(Timeout t, Clock::time_point now) noexcept
      : forever_(t == kForever), at_(forever_ ? Clock::time_point::max() : now + t) {}

  bool forever() const noexcept { return forever_; }
  bool expired() const noexcept { return !forever_ && Clock::now() >= at_; }

  // Milliseconds left, rounded up, for poll(2); -1 when forever.
  int pollMillis() const noexcept {
    if (forever_) return -1;
    const auto left = at_ - Clock::now();
    if (left <= Clock::duration::zero()) return 0;
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
    return ms > 0x7fffffff ? 0x7fffffff : static_cast<int>(ms);
  }

  // The moment it passes (time_point::max() when forever).
  Clock::time_point at() const noexcept { return at_; }

  Clock::duration remaining() const noexcept {
    if (forever_) return Clock::duration::max();
    const auto left = at_ - Clock::now();
    return left < Clock::duration::zero() ? Clock::duration::zero() : left;
  }

 private:
  bool forever_;
  Clock::time_point at_;
};

}  // namespace forklift
