// forklift - timeouts and deadlines
//
// Every blocking call in forklift takes a `Timeout`. `kForever` waits without
// a bound, but even then the wait ends when the peer process dies: forklift
// never waits on a process that is gone. A `Deadline` turns one timeout into
// the remaining time of each wait in a retry loop, so EINTR and partial reads
// never stretch the total.
//
// What a timeout means, at every value (every public Timeout parameter
// reads it so: call, callAsync, send, recv, stop, waitStop, the
// ProcessOptions durations, a pool task's timeout):
//   - zero or negative: do not wait; only what is there already counts
//     (a negative timeout is the same as zero);
//   - one tick (1 ms) and up: wait that long at most;
//   - the largest finite values below `kForever`: wait that long, which is
//     longer than any program runs: they never overflow into "expired at
//     once" (a deadline past the clock's range is the clock's last moment);
//   - `kForever`: no bound (the peer's death still ends the wait).
#pragma once

#include <chrono>

namespace forklift {

using Timeout = std::chrono::milliseconds;
inline constexpr Timeout kForever = Timeout::max();

// `t * n + extra` for n >= 1 and extra >= 0, saturated: kForever, and any
// product or sum that would pass it, is kForever (never an overflow into the
// past, which would mean "expired at once").
constexpr Timeout scaledTimeout(Timeout t, Timeout::rep n, Timeout extra) noexcept {
  const Timeout::rep max = kForever.count();
  if (t == kForever || extra == kForever || t.count() > (max - extra.count()) / n) return kForever;
  return Timeout(t.count() * n + extra.count());
}

class Deadline {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Deadline(Timeout t) noexcept
      : forever_(t == kForever), at_(forever_ ? Clock::time_point::max() : after(Clock::now(), t)) {}
  // The same, from a `now` the caller read already (one clock read less).
  Deadline(Timeout t, Clock::time_point now) noexcept
      : forever_(t == kForever), at_(forever_ ? Clock::time_point::max() : after(now, t)) {}

  // `now + t` without overflow: a negative `t` is `now`, and a moment past
  // the clock's range is its last one (Timeout's milliseconds reach
  // further than the clock's nanoseconds).
  static Clock::time_point after(Clock::time_point now, Timeout t) noexcept {
    if (t <= Timeout::zero()) return now;
    constexpr Timeout kMaxMs = std::chrono::duration_cast<Timeout>(Clock::duration::max());
    if (t >= kMaxMs) return Clock::time_point::max();
    const auto d = std::chrono::duration_cast<Clock::duration>(t);
    if (now.time_since_epoch() > Clock::duration::max() - d) return Clock::time_point::max();
    return now + d;
  }

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
