// forklift - the armed-doorbell protocol, one function per step (internal)
//
// A consumer that is about to sleep arms itself, fences, and re-checks its
// queue; a producer publishes, fences, and rings the consumer's eventfd
// only when it finds it armed (and disarms it: one arming, one ring). The
// two full fences forbid the interleaving in which the producer reads
// "not armed" while the consumer reads "empty": one of them sees the
// other's store, so no wake-up is lost, and a busy consumer costs its
// producer no system call. The argument is written out in
// include/forklift/ring_buffer.hpp; tests/ring_buffer_test.cpp replays
// every interleaving of these steps. Used by the ring (lib/ring_writer.cpp,
// lib/ring_reader.cpp) and by the message queues (lib/shm_pipe.cpp).
#pragma once

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <utility>

namespace forklift::detail {

// GCC's ThreadSanitizer build warns that it does not model fences
// (-Wtsan). The fences below only order atomics against atomics (and the
// seqlock re-check in ReadSlot::intact); the slot data is ordered by the
// release/acquire cursors, which TSan does see. So the warning is off here.
#if defined(__GNUC__) && !defined(__clang__)
#define FORKLIFT_FENCE_BEGIN _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wtsan\"")
#define FORKLIFT_FENCE_END _Pragma("GCC diagnostic pop")
#else
#define FORKLIFT_FENCE_BEGIN
#define FORKLIFT_FENCE_END
#endif

// Producer side of a queue: makes `n` published (the slots before it are
// filled). Release: the consumer that loads it sees them.
inline void bellPublish(std::atomic<std::uint64_t>& cursor, std::uint64_t n) noexcept {
  cursor.store(n, std::memory_order_release);
}
// Producer, after publishing: true when the consumer armed itself and
// `available` (what it may take now) reaches the count it armed for; the
// call then disarms it (so one arming gets one ring). The full fence orders
// the publish before the load of `armed`.
inline bool bellMustRing(std::atomic<std::uint32_t>& armed, std::uint64_t available) noexcept {
  FORKLIFT_FENCE_BEGIN
  std::atomic_thread_fence(std::memory_order_seq_cst);
  FORKLIFT_FENCE_END
  const std::uint32_t want = armed.load(std::memory_order_relaxed);
  if (want == 0 || available < want) return false;
  return armed.exchange(0, std::memory_order_relaxed) != 0;
}
// Consumer, before it sleeps: arms for `want` (>= 1) items, and the full
// fence orders the arming before the re-check of the queue that must
// follow. The re-check looks for one item: a consumer that finds one does
// not sleep. Arming for more than one is safe only when that many are
// bound to come (see RingWriter::reserve).
inline void bellArm(std::atomic<std::uint32_t>& armed, std::uint32_t want = 1) noexcept {
  armed.store(want, std::memory_order_relaxed);
  FORKLIFT_FENCE_BEGIN
  std::atomic_thread_fence(std::memory_order_seq_cst);
  FORKLIFT_FENCE_END
}
inline void bellDisarm(std::atomic<std::uint32_t>& armed) noexcept { armed.store(0, std::memory_order_relaxed); }

// The eventfd side of a doorbell. A ring adds one (EAGAIN, a full
// counter, means it is rung already); a clear reads the counter back to
// zero and returns what it held (0 when it was clear).
inline void ringBell(int fd) noexcept {
  const std::uint64_t one = 1;
  while (::write(fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}
inline std::uint64_t clearBell(int fd) noexcept {
  std::uint64_t n = 0;
  for (;;) {
    if (::read(fd, &n, sizeof n) == sizeof n) return n;
    if (errno != EINTR) return 0;
  }
}

// 1 + the CPU this thread runs on, 0 when unknown: what a consumer that
// goes to sleep records, so its producer can tell whether the wake-up it
// rings lands on its own CPU (and then give that CPU away at once).
inline std::int32_t cpuTag() noexcept {
  const int cpu = ::sched_getcpu();
  return cpu < 0 ? 0 : cpu + 1;
}

// The bounded spin a waiter may make before it arms and sleeps (the
// ring's and the message queues' `spin` options): polls `ready()` with a
// pause between looks, reading the clock every 64th look.
inline void cpuRelax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until `ready()` or `end`; true when it became ready.
template <class F>
bool spinUntil(std::chrono::steady_clock::time_point end, F&& ready) {
  for (int i = 0;; ++i) {
    if (ready()) return true;
    cpuRelax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= end) return false;
  }
}

// Spins up to `d` until `ready()`; true when it became ready.
template <class F>
bool spinFor(std::chrono::nanoseconds d, F&& ready) {
  if (d.count() <= 0) return false;
  return spinUntil(std::chrono::steady_clock::now() + d, std::forward<F>(ready));
}

}  // namespace forklift::detail
