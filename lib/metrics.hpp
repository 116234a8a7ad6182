// forklift - this process's live counters, in a page that tools can read
//
// Every process that uses forklift publishes one small page of counters:
// messages in and out (frames decoded and encoded by a Channel, whatever
// the direction), calls made, errors (handlers that failed, error replies,
// refused frames), ring drops, and the time of the last message. The page
// is a memfd labelled "forklift-metrics" (close-on-exec, no name anywhere),
// made when the library loads (so a program's descriptor count does not
// change at its first message); `forklift-ps` finds it through
// /proc/<pid>/fd and reads it, so reading costs the process nothing.
//
// Counting is a relaxed atomic add on a page no other process writes (one
// cache line per process): a few nanoseconds, with nothing shared between
// the two sides of a channel. A forked child gets a page of its own at its
// first count: the inherited one is its parent's and is let go (the pid in
// the page tells them apart). The role and name say what the process is
// ("frontend", "backend", "manager", ...; the backend's title).
//
// If the page cannot be made (no memfd, no memory), counts go to a private
// page and nothing is published: metrics never fail a program.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <string_view>

namespace forklift::detail {

// "FKMETRIC" read as a little-endian 64-bit word.
inline constexpr std::uint64_t kMetricsMagic = 0x434952544d454b46ull;
inline constexpr std::uint32_t kMetricsVersion = 1;
inline constexpr const char* kMetricsLabel = "forklift-metrics";

struct MetricsPage {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t bytes;  // sizeof(MetricsPage)
  std::int64_t pid;
  char role[16];        // NUL-terminated
  char name[96];        // NUL-terminated
  alignas(64) std::atomic<std::uint64_t> messagesIn;
  std::atomic<std::uint64_t> messagesOut;
  std::atomic<std::uint64_t> calls;
  std::atomic<std::uint64_t> errors;
  std::atomic<std::uint64_t> ringDrops;
  std::atomic<std::int64_t> lastActivityMs;  // CLOCK_REALTIME, milliseconds
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

// This process's page (made or remade for this pid on first use).
MetricsPage& metrics() noexcept;

// Sets what tools show for this process; cut to fit.
void setMetricsIdentity(std::string_view role, std::string_view name) noexcept;

// The hot-path counts.
void countMessageIn() noexcept;
void countMessageOut() noexcept;
inline void countCall() noexcept { metrics().calls.fetch_add(1, std::memory_order_relaxed); }
inline void countError() noexcept { metrics().errors.fetch_add(1, std::memory_order_relaxed); }
inline void countRingDrops(std::uint64_t n) noexcept { metrics().ringDrops.fetch_add(n, std::memory_order_relaxed); }

}  // namespace forklift::detail
