// The shared-memory ring: slots in order with their metadata, each overflow
// policy under a slow and a fast reader across a fork, checksummed payloads
// under stress, either side killed mid-stream and a successor attached, the
// doorbell protocol under every interleaving of its steps, and the ring
// handed to a backend as a descriptor.
#include "forklift/ring_buffer.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "forklift/process.hpp"
#include "posix.hpp"
#include "ring_layout.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

using test::checksum;
using test::fillPayload;

// A pipe the child reports through; closed on both sides by RAII.
struct Pipe {
  detail::UniqueFd r, w;
  Pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw SystemError(errno, "cannot create a pipe");
    r.reset(fds[0]);
    w.reset(fds[1]);
  }
  template <class T>
  void put(const T& v) {
    if (::write(w.get(), &v, sizeof v) != static_cast<ssize_t>(sizeof v)) std::abort();
  }
  template <class T>
  bool get(T& v, Timeout t) {
    if (!detail::waitFor(r.get(), POLLIN, Deadline(t))) return false;
    return ::read(r.get(), &v, sizeof v) == static_cast<ssize_t>(sizeof v);
  }
};

// ---------------------------------------------------------------- one process

TEST(RingBuffer, SlotsArriveInOrderWithTheirMetadata) {
  auto ring = RingBuffer::create("ring-order", 4, 100);
  EXPECT_EQ(ring.format().describe(), "4 slots of 100 bytes, block");
  auto w = ring.writer();
  auto r = ring.reader();
  for (int i = 0; i < 3; ++i) {
    WriteSlot s = w.reserve(test::slow(1s));
    ASSERT_TRUE(s);
    EXPECT_EQ(s.capacity(), 100u);
    EXPECT_EQ(s.sequence(), static_cast<std::uint64_t>(i + 1));
    std::memset(s.data(), 'a' + i, 10);
    s.setBytes(10);
    s.setUser(0, 100 + i);
    s.setUser(3, -i);
    if (i == 2) s.setTimestampNs(12345);
    s.commit();
    EXPECT_FALSE(s);
  }
  const auto before = detail::monotonicNs();
  for (int i = 0; i < 3; ++i) {
    auto s = r.next(test::slow(1s));
    ASSERT_TRUE(s);
    EXPECT_EQ(s->sequence(), static_cast<std::uint64_t>(i + 1));
    EXPECT_EQ(s->bytes(), 10u);
    EXPECT_EQ(static_cast<char>(s->data()[9]), 'a' + i);
    EXPECT_EQ(s->user(0), 100 + i);
    EXPECT_EQ(s->user(3), -i);
    if (i == 2) EXPECT_EQ(s->timestampNs(), 12345);
    else EXPECT_GT(s->timestampNs(), before - 10'000'000'000);
    EXPECT_TRUE(s->intact());
  }
  EXPECT_FALSE(r.tryNext());
  EXPECT_FALSE(r.next(20ms));  // a bounded wait that finds nothing
  const RingStats st = ring.stats();
  EXPECT_EQ(st.committed, 3u);
  EXPECT_EQ(st.consumed, 3u);
  EXPECT_EQ(st.drops, 0u);
  EXPECT_EQ(st.torn, 0u);
}

TEST(RingBuffer, PushAndPullCopy) {
  auto ring = RingBuffer::create("ring-copy", 2, 16);
  auto w = ring.writer();
  auto r = ring.reader();
  const std::vector<std::byte> data{std::byte{1}, std::byte{2}, std::byte{3}};
  const std::int64_t user[] = {7, 8};
  w.push(data, test::slow(1s), user);
  Bytes out;
  const auto info = r.pull(out, test::slow(1s));
  ASSERT_TRUE(info);
  EXPECT_EQ(out, (Bytes{1, 2, 3}));
  EXPECT_EQ(info->user[1], 8);
  const std::vector<std::byte> big(17);
  EXPECT_TRUE(test::contains(test::thrown<LimitError>([&] { w.push(big, test::slow(1s)); }),
                             "17 bytes do not fit a slot of 16"));
}

TEST(RingBuffer, AbandonedSlotGoesBackAndBlockTimesOut) {
  auto ring = RingBuffer::create("ring-full", 2, 8);
  auto w = ring.writer();
  { WriteSlot s = w.reserve(test::slow(1s)); }  // dropped unpublished
  w.push({}, test::slow(1s));
  w.push({}, test::slow(1s));
  EXPECT_FALSE(w.tryReserve());
  const auto t0 = Clock::now();
  EXPECT_TRUE(test::contains(test::thrown<TimeoutError>([&] { w.reserve(30ms); }), "stayed full for 30 ms"));
  EXPECT_GE(Clock::now() - t0, 25ms);
  EXPECT_EQ(ring.stats().committed, 2u);
}

// Runs f on a thread pinned to `cpu`, and waits for it.
void onCpu(int cpu, const std::function<void()>& f) {
  std::thread t([&] {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    ASSERT_EQ(::sched_setaffinity(0, sizeof set, &set), 0);
    f();
  });
  t.join();
}

// The writer's choice of free slot (ring_buffer.hpp): the one the reader
// released last when the reader shares the writer's CPU, the oldest free one
// when it does not.
TEST(RingBuffer, TheWriterReusesTheWarmestSlotForWhereTheReaderRuns) {
  if (std::thread::hardware_concurrency() < 2) GTEST_SKIP() << "needs two CPUs";
  auto ring = RingBuffer::create("ring-warm", 4, 64);
  auto w = ring.writer();
  auto r = ring.reader();
  // Fills all four slots, the reader takes the first two back; returns the
  // data pointers in commit order and the pointer of the next reserve.
  auto round = [&](int readerCpu) {
    std::vector<const std::byte*> committed;
    onCpu(0, [&] {
      for (int i = 0; i < 4; ++i) {
        WriteSlot s = w.reserve(test::slow(1s));
        committed.push_back(s.data());
        s.commit();
      }
    });
    onCpu(readerCpu, [&] {
      for (int i = 0; i < 2; ++i) ASSERT_TRUE(r.next(test::slow(1s)));  // released at once
    });
    const std::byte* next = nullptr;
    onCpu(0, [&] {
      WriteSlot s = w.reserve(test::slow(1s));
      next = s.data();
      s.commit();
      for (int i = 0; i < 3; ++i) ASSERT_TRUE(r.next(test::slow(1s)));  // empties the ring for the next round
    });
    committed.push_back(next);
    return committed;
  };
  const auto same = round(0);
  EXPECT_EQ(same[4], same[1]) << "same CPU: the slot released last";
  const auto other = round(1);
  // The reader released other[0] then other[1]; slots freed by the
  // previous round may come first, but never the one released last.
  EXPECT_NE(other[4], other[1]) << "another CPU: not the slot still in the reader's cache";
  EXPECT_EQ(ring.stats().consumed, ring.stats().committed);
}

TEST(RingBuffer, BadSizesAndMisuseAreNamed) {
  EXPECT_TRUE(test::contains(test::thrown<LimitError>([] { RingBuffer::create("ring-bad", 1, 8); }),
                             "2 to 65535 slots, not 1"));
  EXPECT_TRUE(test::contains(test::thrown<LimitError>([] { RingBuffer::create("ring-bad", 4, 0); }),
                             "1 byte to 1 TiB, not 0 bytes"));
  EXPECT_TRUE(test::contains(
      test::thrown<LimitError>([] { RingBuffer::createArray<float>("ring-bad", 4, {2, 0}); }), "not 2x0"));
  auto ring = RingBuffer::create("ring-misuse", 4, 8);
  auto w = ring.writer();
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { ring.writer(); }), "this process is its writer already"));
  WriteSlot s = w.reserve(test::slow(1s));
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { w.reserve(test::slow(1s)); }), "holds a reserved slot already"));
  EXPECT_TRUE(test::contains(test::thrown<LimitError>([&] { s.setUser(4, 1); }), "index 4 is out of range"));
  s.commit();
  auto r = ring.reader();
  auto got = r.tryNext();
  ASSERT_TRUE(got);
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { r.tryNext(); }), "holds a slot already"));
}

TEST(RingBuffer, ArraySlotsAreTensorViews) {
  auto ring = RingBuffer::createArray<std::uint8_t>("ring-frames", 3, {4, 5, 3}, RingPolicy::DropOldest);
  EXPECT_EQ(ring.format().describe(), "3 slots of uint8[4x5x3] row-major, drop-oldest");
  EXPECT_EQ(ring.format().slotBytes, 60u);
  auto w = ring.writer();
  auto r = ring.reader();
  WriteSlot s = w.reserve(test::slow(1s));
  auto t = s.tensor<std::uint8_t, 3>();
  EXPECT_EQ(t.dimension(0), 4);
  EXPECT_EQ(t.dimension(2), 3);
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 5; ++x)
      for (int c = 0; c < 3; ++c) t(y, x, c) = static_cast<std::uint8_t>(y * 50 + x * 10 + c);
  EXPECT_TRUE(test::contains(test::thrown<TypeError>([&] { s.tensor<float, 3>(); }),
                             "hold 3 slots of uint8[4x5x3] row-major, drop-oldest, not float32 of rank 3"));
  EXPECT_TRUE(test::contains(test::thrown<TypeError>([&] { s.tensor<std::uint8_t, 2>(); }), "not uint8 of rank 2"));
  s.commit();
  auto got = r.next(test::slow(1s));
  ASSERT_TRUE(got);
  const auto v = got->tensor<std::uint8_t, 3>();
  EXPECT_EQ(v(3, 4, 2), 192);
  EXPECT_EQ(static_cast<int>(std::to_integer<std::uint8_t>(got->data()[1 * 15 + 2 * 3 + 1])), 71);

  auto m = RingBuffer::createArray<double>("ring-matrix", 2, {2, 3});
  auto mw = m.writer();
  WriteSlot ms = mw.reserve(test::slow(1s));
  ms.matrix<double>() << 1, 2, 3, 4, 5, 6;
  ms.commit();
  auto mr = m.reader();
  auto mg = mr.next(test::slow(1s));
  ASSERT_TRUE(mg);
  EXPECT_EQ(mg->matrix<double>()(1, 0), 4.0);
}

// ---------------------------------------------------------------- policies across a fork

struct RunResult {
  std::uint64_t received = 0;
  std::uint64_t lastSeq = 0;
  std::uint64_t outOfOrder = 0;  // a sequence not above the one before
  std::uint64_t badChecksums = 0;
  RingStats stats;
  bool endedClosed = false;  // PeerClosed after the drain
};

// The child writes `frames` checksummed frames and detaches; the parent
// reads them, sleeping `readDelay` per slot, until the writer is gone.
RunResult runPolicy(RingPolicy policy, std::size_t slots, std::size_t bytes, std::uint64_t frames,
                    std::chrono::microseconds readDelay, std::chrono::nanoseconds spin = {}) {
  auto ring = RingBuffer::create("ring-policy", slots, bytes, policy);
  auto reader = ring.reader();
  reader.setSpin(spin);
  const pid_t child = test::forkChild([&] {
    auto w = ring.writer();
    w.setSpin(spin);
    for (std::uint64_t i = 1; i <= frames; ++i) {
      WriteSlot s = w.reserve(test::slow(10s));
      fillPayload(s.data(), bytes, s.sequence());
      s.setUser(0, checksum(s.data(), bytes));
      s.commit();
    }
    return 0;
  });
  RunResult res;
  for (;;) {
    std::optional<ReadSlot> s;
    try {
      s = reader.next(test::slow(10s));
    } catch (const PeerClosed&) {
      res.endedClosed = true;
      break;
    }
    if (!s) break;  // the timeout: a failure the caller sees in the counts
    if (s->sequence() <= res.lastSeq) ++res.outOfOrder;
    res.lastSeq = s->sequence();
    if (checksum(s->data(), s->bytes()) != s->user(0) || !s->intact()) ++res.badChecksums;
    ++res.received;
    if (readDelay.count() > 0) std::this_thread::sleep_for(readDelay);
  }
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 20s)), 0);
  res.stats = ring.stats();
  return res;
}

struct PolicyCase {
  RingPolicy policy;
  bool slowReader;
};

class RingPolicies : public ::testing::TestWithParam<PolicyCase> {};

TEST_P(RingPolicies, EveryFrameIsReadOrCountedAsDropped) {
  const auto [policy, slow] = GetParam();
  constexpr std::uint64_t kFrames = 300;
  const RunResult r = runPolicy(policy, 4, 4096, kFrames, slow ? 1000us : 0us);
  EXPECT_TRUE(r.endedClosed);
  EXPECT_EQ(r.outOfOrder, 0u);
  EXPECT_EQ(r.badChecksums, 0u);
  EXPECT_EQ(r.stats.torn, 0u);
  EXPECT_EQ(r.stats.committed, kFrames);
  EXPECT_EQ(r.received + r.stats.drops, kFrames);
  EXPECT_EQ(r.lastSeq, kFrames);  // the newest frame is never dropped
  if (policy == RingPolicy::Block) {
    EXPECT_EQ(r.stats.drops, 0u);
  } else if (slow) {
    // 300 frames written at memory speed into 4 slots, read at 1 ms each.
    EXPECT_GT(r.stats.drops, kFrames / 2);
  }
}

INSTANTIATE_TEST_SUITE_P(, RingPolicies,
                         ::testing::Values(PolicyCase{RingPolicy::Block, false}, PolicyCase{RingPolicy::Block, true},
                                           PolicyCase{RingPolicy::DropOldest, false},
                                           PolicyCase{RingPolicy::DropOldest, true},
                                           PolicyCase{RingPolicy::KeepLatest, false},
                                           PolicyCase{RingPolicy::KeepLatest, true}),
                         [](const auto& info) {
                           std::string n = info.param.policy == RingPolicy::Block        ? "Block"
                                           : info.param.policy == RingPolicy::DropOldest ? "DropOldest"
                                                                                         : "KeepLatest";
                           return n + (info.param.slowReader ? "SlowReader" : "FastReader");
                         });

// A ring larger than half the cache, both sides on one CPU: the writer
// yields to the reader it wakes (ring_buffer.hpp). Every frame still
// arrives, in order and whole, under each policy.
TEST(RingBufferStress, ABigRingOnOneCpuDeliversEveryFrame) {
  cpu_set_t saved;
  ASSERT_EQ(::sched_getaffinity(0, sizeof saved, &saved), 0);
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(::sched_getcpu(), &one);
  ASSERT_EQ(::sched_setaffinity(0, sizeof one, &one), 0);  // the child inherits it
  for (const RingPolicy p : {RingPolicy::Block, RingPolicy::DropOldest}) {
    constexpr std::uint64_t kFrames = 20;
    const RunResult r = runPolicy(p, 3, std::size_t{6} << 20, kFrames, 0us);
    EXPECT_TRUE(r.endedClosed);
    EXPECT_EQ(r.outOfOrder, 0u);
    EXPECT_EQ(r.badChecksums, 0u);
    EXPECT_EQ(r.received + r.stats.drops, kFrames);
    if (p == RingPolicy::Block) {
      EXPECT_EQ(r.received, kFrames);
    }
  }
  ASSERT_EQ(::sched_setaffinity(0, sizeof saved, &saved), 0);
}

TEST(RingBufferStress, ChecksummedFramesAcrossAForkAreNeverTorn) {
  // Slots smaller than a page and a reader as fast as the writer: the
  // writer's drops race with the reader's claims all the time.
  for (const RingPolicy p : {RingPolicy::DropOldest, RingPolicy::Block, RingPolicy::KeepLatest}) {
    const RunResult r = runPolicy(p, 3, 2000, 20000, 0us);
    EXPECT_TRUE(r.endedClosed) << ringPolicyName(p);
    EXPECT_EQ(r.badChecksums, 0u) << ringPolicyName(p);
    EXPECT_EQ(r.stats.torn, 0u) << ringPolicyName(p);
    EXPECT_EQ(r.outOfOrder, 0u) << ringPolicyName(p);
    EXPECT_EQ(r.received + r.stats.drops, 20000u) << ringPolicyName(p);
  }
}

TEST(RingBufferStress, SpinningSidesDeliverTheSameStream) {
  // Both sides poll the ring for up to 200 us before they sleep; the stream
  // is the same, and waits still end (the writer's last frame, its detach).
  for (const RingPolicy p : {RingPolicy::Block, RingPolicy::DropOldest}) {
    const RunResult r = runPolicy(p, 4, 4096, 1000, 0us, 200us);
    EXPECT_TRUE(r.endedClosed) << ringPolicyName(p);
    EXPECT_EQ(r.badChecksums, 0u) << ringPolicyName(p);
    EXPECT_EQ(r.outOfOrder, 0u) << ringPolicyName(p);
    EXPECT_EQ(r.received + r.stats.drops, 1000u) << ringPolicyName(p);
    EXPECT_EQ(r.lastSeq, 1000u) << ringPolicyName(p);
  }
}

// ---------------------------------------------------------------- deaths and successors

// Counts the slots a writer attached now can fill without a reader: every
// slot not held by the reader, if none was lost or duplicated.
std::size_t freeSlotsSeenByANewWriter(RingBuffer& ring) {
  Pipe p;
  const pid_t child = test::forkChild([&] {
    auto w = ring.writer();
    std::uint64_t n = 0;
    while (auto s = w.tryReserve()) {
      s->commit();
      ++n;
    }
    p.put(n);
    return 0;
  });
  std::uint64_t n = 0;
  EXPECT_TRUE(p.get(n, test::slow(10s)));
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), 0);
  return n;
}

TEST(RingBufferDeath, AKilledWriterIsSeenAtOnceAndASuccessorAttaches) {
  auto ring = RingBuffer::create("ring-wdeath", 4, 256, RingPolicy::Block);
  auto reader = ring.reader();
  const pid_t child = test::forkChild([&] {
    auto w = ring.writer();
    for (;;) {
      WriteSlot s = w.reserve(test::slow(10s));  // also holds a reserved slot when killed
      s.setUser(0, 42);
      s.commit();
    }
    return 0;
  });
  for (int i = 0; i < 50; ++i) {
    auto s = reader.next(test::slow(10s));
    ASSERT_TRUE(s);
    EXPECT_EQ(s->user(0), 42);
  }
  ::kill(child, SIGKILL);
  // Drained: what it committed first, then the death, long before 10 s.
  const auto t0 = Clock::now();
  std::string what;
  for (int i = 0; i < 10 && what.empty(); ++i) {
    try {
      (void)reader.next(test::slow(10s));
    } catch (const ProcessDied& e) {
      what = e.what();
    }
  }
  EXPECT_LT(Clock::now() - t0, test::slow(2s));
  EXPECT_TRUE(test::contains(what, "the writer (pid " + std::to_string(child) + ") died"));
  EXPECT_TRUE(reader.writerGone());
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 5s)), -1);

  // A successor finds all 4 slots (the dead writer's reserved one included),
  // commits them, and the reader gets them in sequence order.
  const std::uint64_t before = ring.stats().committed;
  EXPECT_EQ(freeSlotsSeenByANewWriter(ring), 4u);
  for (std::uint64_t i = 1; i <= 4; ++i) {
    auto s = reader.next(test::slow(5s));
    ASSERT_TRUE(s);
    EXPECT_EQ(s->sequence(), before + i);
  }
  EXPECT_THROW(reader.next(test::slow(5s)), PeerClosed);  // the successor detached in order
}

TEST(RingBufferDeath, AKilledReaderIsSeenAtOnceByABlockedWriterAndASuccessorReads) {
  auto ring = RingBuffer::create("ring-rdeath", 4, 256, RingPolicy::Block);
  auto writer = ring.writer();
  Pipe p;
  const pid_t child = test::forkChild([&] {
    auto r = ring.reader();
    auto s = r.next(test::slow(10s));  // holds it until killed
    p.put(s ? s->sequence() : 0);
    ::pause();
    return 0;
  });
  for (int i = 0; i < 4; ++i) writer.push({}, test::slow(10s));
  std::uint64_t held = 0;
  ASSERT_TRUE(p.get(held, test::slow(10s)));
  EXPECT_EQ(held, 1u);  // the child holds sequence 1; 2, 3, 4 wait: the ring is full
  const auto t0 = Clock::now();
  std::thread killer([&] {
    std::this_thread::sleep_for(50ms);
    ::kill(child, SIGKILL);
  });
  const std::string what = test::thrown<ProcessDied>([&] { writer.push({}, test::slow(10s)); });
  killer.join();
  EXPECT_LT(Clock::now() - t0, 50ms + test::slow(1950ms));  // the kill's delay, then the bound
  EXPECT_TRUE(test::contains(what, "is full and its reader (pid " + std::to_string(child) + ") died"));
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 5s)), -1);

  // A successor reads on from sequence 2; the dead reader's slot comes back.
  Pipe q;
  const pid_t next = test::forkChild([&] {
    auto r = ring.reader();
    std::uint64_t seqs = 0;
    for (int i = 0; i < 3; ++i) {
      auto s = r.next(test::slow(5s));
      if (!s) return 3;
      seqs = seqs * 10 + s->sequence();
    }
    q.put(seqs);
    return 0;
  });
  std::uint64_t seqs = 0;
  ASSERT_TRUE(q.get(seqs, test::slow(10s)));
  EXPECT_EQ(seqs, 234u);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(next, 10s)), 0);
  // All four slots are free again, none lost with the killed reader, none twice.
  for (int i = 0; i < 4; ++i) {
    auto s = writer.tryReserve();
    ASSERT_TRUE(s.has_value()) << i;
    s->commit();
  }
  EXPECT_FALSE(writer.tryReserve().has_value());
}

TEST(RingBufferDeath, WithoutPidfdsADeadWriterIsSeenOnceReaped) {
  struct NoPidfds {
    detail::RingPidfdOpenFn saved = detail::ringPidfdOpen;
    NoPidfds() {
      detail::ringPidfdOpen = [](int) {
        errno = ENOSYS;
        return -1;
      };
    }
    ~NoPidfds() { detail::ringPidfdOpen = saved; }
  } noPidfds;
  auto ring = RingBuffer::create("ring-nopidfd", 4, 64);
  auto reader = ring.reader();
  const pid_t child = test::forkChild([&] {
    auto w = ring.writer();
    w.push({}, test::slow(1s));
    ::pause();
    return 0;
  });
  EXPECT_TRUE(reader.next(test::slow(10s)).has_value());
  EXPECT_FALSE(reader.next(100ms).has_value());  // alive: the wait runs to its timeout
  ::kill(child, SIGKILL);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 5s)), -1);  // reaped: kill(pid, 0) says ESRCH
  const auto t0 = Clock::now();
  EXPECT_TRUE(test::contains(test::thrown<ProcessDied>([&] { reader.next(test::slow(10s)); }), "died"));
  EXPECT_LT(Clock::now() - t0, test::slow(2s));
  EXPECT_EQ(reader.writerFd(), -1);
}

TEST(RingBufferDeath, ALiveWriterCannotBeReplaced) {
  auto ring = RingBuffer::create("ring-two", 2, 8);
  auto w = ring.writer();
  const pid_t child = test::forkChild([&] {
    try {
      auto w2 = ring.writer();
    } catch (const Error& e) {
      return test::contains(e.what(), "has a writer already (pid " + std::to_string(::getppid()) + ")") ? 0 : 2;
    }
    return 1;
  });
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), 0);
}

// Slots a writer can fill before its first drop: every slot the reader
// does not hold, if none was lost or duplicated.
std::uint64_t slotsBeforeFirstDrop(RingWriter& w, std::size_t slots) {
  const std::uint64_t d0 = w.stats().drops;
  std::uint64_t n = 0;
  while (n < 2 * slots) {
    WriteSlot s = w.reserve(test::slow(1s));
    if (w.stats().drops != d0) break;
    s.commit();
    ++n;
  }
  return n;
}

class RingKills : public ::testing::TestWithParam<RingPolicy> {};

// Either side killed at a random moment of a stream that races drops
// against claims; the successor must find every slot exactly once.
TEST_P(RingKills, KilledAtAnyMomentNoSlotIsLostOrDuplicated) {
  constexpr std::size_t kSlots = 3;
  std::srand(12345);
  for (int round = 0; round < 15; ++round) {
    {  // the writer dies
      auto ring = RingBuffer::create("ring-kill-w", kSlots, 512, GetParam());
      auto reader = ring.reader();
      const pid_t child = test::forkChild([&] {
        auto w = ring.writer();
        for (;;) {
          WriteSlot s = w.reserve(test::slow(10s));
          fillPayload(s.data(), 512, s.sequence());
          s.setUser(0, checksum(s.data(), 512));
          s.commit();
        }
        return 0;
      });
      const auto until = Clock::now() + std::chrono::microseconds(200 + std::rand() % 3000);
      int bad = 0;
      while (Clock::now() < until)
        if (auto s = reader.next(test::slow(1s)); s && checksum(s->data(), 512) != s->user(0)) ++bad;
      ::kill(child, SIGKILL);
      EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 5s)), -1);
      for (;;) {  // drain up to the death
        try {
          if (auto s = reader.next(test::slow(5s)); s && checksum(s->data(), 512) != s->user(0)) ++bad;
        } catch (const ProcessDied&) {
          break;
        }
      }
      EXPECT_EQ(bad, 0);
      Pipe p;
      const pid_t next = test::forkChild([&] {
        auto w = ring.writer();
        p.put(slotsBeforeFirstDrop(w, kSlots));
        return 0;
      });
      std::uint64_t n = 0;
      ASSERT_TRUE(p.get(n, test::slow(10s)));
      EXPECT_EQ(n, kSlots) << "round " << round << ", writer killed";
      EXPECT_EQ(test::exitCodeOf(test::waitChild(next, 10s)), 0);
    }
    {  // the reader dies
      auto ring = RingBuffer::create("ring-kill-r", kSlots, 512, GetParam());
      auto writer = ring.writer();
      const pid_t child = test::forkChild([&] {
        auto r = ring.reader();
        for (;;) {
          auto s = r.next(test::slow(10s));
          const auto until = Clock::now() + 50us;  // hold it: killed holding one, often
          while (Clock::now() < until) {
          }
        }
        return 0;
      });
      const auto until = Clock::now() + std::chrono::microseconds(200 + std::rand() % 3000);
      while (Clock::now() < until) writer.push({}, test::slow(1s));
      ::kill(child, SIGKILL);
      EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 5s)), -1);
      auto reader = ring.reader();  // the successor, in this process
      while (reader.tryNext()) {
      }
      EXPECT_EQ(slotsBeforeFirstDrop(writer, kSlots), kSlots) << "round " << round << ", reader killed";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(, RingKills, ::testing::Values(RingPolicy::DropOldest, RingPolicy::KeepLatest),
                         [](const auto& info) {
                           return std::string(info.param == RingPolicy::DropOldest ? "DropOldest" : "KeepLatest");
                         });

// ---------------------------------------------------------------- the doorbell protocol

// The wake-up protocol, step by step, on a real ring header: the consumer's
// wait (look, arm, re-check, sleep) and the producer's commits (publish,
// ring if armed), run under every interleaving of those steps by a
// deterministic scheduler. The steps are the functions the ring itself
// calls (lib/ring_layout.hpp); the full fences inside them are what make
// the interleavings of whole steps the executions to consider (sequential
// consistency). Both directions are checked: slots to the reader, and
// returned slots to a writer blocked on a full Block ring.
enum class Direction { ToReader, ToWriter };
enum class Protocol { Ring, CheckThenArm /* broken on purpose: no re-check after arming */ };

struct Model {
  std::unique_ptr<detail::RingHeader> h = std::make_unique<detail::RingHeader>();
  Direction dir;
  Protocol proto;
  int commits;
  int bells = 0;       // eventfd writes not yet consumed
  int rang = 0;        // eventfd writes in all
  // consumer
  int cpc = 0;
  bool cdone = false;
  // producer: even pc publishes, odd pc decides whether to ring
  int ppc = 0;

  std::uint32_t want;  // what the consumer arms for: the blocked writer waits for several slots

  Model(Direction d, Protocol p, int k, std::uint32_t w) : dir(d), proto(p), commits(k), want(w) {}
  std::atomic<std::uint32_t>& armed() { return dir == Direction::ToReader ? h->readerArmed : h->writerArmed; }
  std::atomic<std::uint64_t>& cursor() { return dir == Direction::ToReader ? h->head : h->rHead; }
  bool ready() { return dir == Direction::ToReader ? detail::deliverReady(*h) : detail::returnReady(*h); }
  bool producerDone() const { return ppc == 2 * commits; }
  std::uint64_t available() {
    return dir == Direction::ToReader ? h->head.load() - detail::tailPos(h->tail.load())
                                      : h->rHead.load() - h->rTail.load();
  }

  // One consumer step; false when it cannot run (done, or asleep and not rung).
  bool consumerStep() {
    if (cdone) return false;
    switch (cpc) {
      case 0:  // look
        if (ready()) cdone = true;
        else cpc = 1;
        return true;
      case 1:
        detail::bellArm(armed(), want);
        cpc = proto == Protocol::Ring ? 2 : 3;
        return true;
      case 2:  // re-check after the fence
        if (ready()) {
          detail::bellDisarm(armed());
          cdone = true;
        } else {
          cpc = 3;
        }
        return true;
      case 3:  // asleep in poll(fd) until the bell rings
        if (bells == 0) return false;
        bells = 0;
        cpc = 0;
        return true;
    }
    return false;
  }
  bool producerStep() {
    if (producerDone()) return false;
    if (ppc % 2 == 0) {
      detail::bellPublish(cursor(), cursor().load() + 1);
    } else if (detail::bellMustRing(armed(), available())) {
      ++bells;
      ++rang;
    }
    ++ppc;
    return true;
  }
};

struct Outcome {
  int schedules = 0;
  int lostWakeups = 0;  // the consumer asleep, not rung, with a slot waiting
  int maxRings = 0;
};

// Replays `schedule` (true: consumer step) on a fresh model; nullptr when a
// step of it could not run.
std::unique_ptr<Model> replay(Direction d, Protocol p, int commits, std::uint32_t want,
                              const std::vector<bool>& schedule) {
  auto m = std::make_unique<Model>(d, p, commits, want);
  for (const bool consumer : schedule)
    if (!(consumer ? m->consumerStep() : m->producerStep())) return nullptr;
  return m;
}

Outcome exploreAll(Direction d, Protocol p, int commits, std::uint32_t want = 1) {
  Outcome out;
  test::everySchedule([&](const std::vector<bool>& s) { return replay(d, p, commits, want, s); },
                      [&](Model& m) {
                        ++out.schedules;
                        out.maxRings = std::max(out.maxRings, m.rang);
                        if (!m.cdone && m.ready()) ++out.lostWakeups;
                      });
  return out;
}

TEST(RingDoorbell, NoInterleavingLosesAWakeUp) {
  for (const Direction d : {Direction::ToReader, Direction::ToWriter}) {
    for (int commits = 1; commits <= 3; ++commits) {
      // The blocked writer arms for several returned slots, up to as many
      // as are bound to come.
      for (std::uint32_t want = 1; want <= (d == Direction::ToWriter ? static_cast<std::uint32_t>(commits) : 1u);
           ++want) {
        const Outcome o = exploreAll(d, Protocol::Ring, commits, want);
        EXPECT_GE(o.schedules, commits == 1 ? 5 : 10) << commits;
        EXPECT_EQ(o.lostWakeups, 0) << "direction " << static_cast<int>(d) << ", " << commits << " commits, armed for "
                                    << want;
        // Many slots, one wake-up: a consumer arms once per wait.
        EXPECT_LE(o.maxRings, 1) << commits;
      }
    }
  }
}

TEST(RingDoorbell, TheSchedulerFindsTheLostWakeUpOfABrokenProtocol) {
  // Arming without re-checking: the writer may publish between the look
  // and the arming, see nobody armed, and the reader sleeps on a full ring.
  const Outcome o = exploreAll(Direction::ToReader, Protocol::CheckThenArm, 1);
  EXPECT_GT(o.lostWakeups, 0);
  // Arming for more than will come: the writer would wait for a slot that
  // came back but was not enough to ring.
  EXPECT_GT(exploreAll(Direction::ToWriter, Protocol::Ring, 1, 2).lostWakeups, 0);
}

TEST(RingDoorbell, AReaderAsleepInAnotherProcessWakesForOneCommit) {
  auto ring = RingBuffer::create("ring-bell", 4, 8);
  auto reader = ring.reader();
  const pid_t child = test::forkChild([&] {
    auto w = ring.writer();
    std::this_thread::sleep_for(100ms);  // the reader is asleep by now
    w.push({}, test::slow(1s));
    std::this_thread::sleep_for(200ms);
    return 0;
  });
  const auto t0 = Clock::now();
  auto s = reader.next(test::slow(10s));
  EXPECT_TRUE(s.has_value());
  EXPECT_LT(Clock::now() - t0, 100ms + test::slow(4900ms));  // the writer's 100 ms, then the bound
  s.reset();
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), 0);
}

// ---------------------------------------------------------------- as a descriptor

class RingProcess : public MessageProcess {
 public:
  RingProcess() : MessageProcess("ring") { command("produce", &RingProcess::c__produce, {"ring", "count"}); }
  ~RingProcess() override { stop(); }

 private:
  int c__produce(Value ring, int count) {
    auto rb = RingBuffer::open(ring);
    auto w = rb.writer();
    for (int i = 0; i < count; ++i) {
      WriteSlot s = w.reserve(test::slow(5s));
      s.tensor<float, 2>().setConstant(static_cast<float>(i));
      s.commit();
    }
    return static_cast<int>(rb.format().slots);
  }
};

TEST(RingBufferTransport, ARingMadeAfterStartTravelsAsADescriptor) {
  const int fdsBefore = test::openFdCount();
  {
    RingProcess p;
    p.start();
    auto ring = RingBuffer::createArray<float>("ring-later", 4, {3, 2});
    auto reader = ring.reader();
    EXPECT_EQ(p.call("produce", {{"ring", ring.describe()}, {"count", 3}}).as<int>(), 4);
    for (int i = 0; i < 3; ++i) {
      auto s = reader.next(test::slow(5s));
      ASSERT_TRUE(s);
      EXPECT_EQ((s->tensor<float, 2>()(2, 1)), static_cast<float>(i));
    }
    EXPECT_THROW(reader.next(test::slow(5s)), PeerClosed);  // the handler's writer went with it
    EXPECT_TRUE(test::contains(test::thrown<TypeError>([] { RingBuffer::open(Value(Map{{"kind", "ring"}})); }),
                               "no 'segment'"));
    EXPECT_TRUE(test::contains(test::thrown<TypeError>([] { RingBuffer::open(Value(3)); }), "is a map, int found"));
    p.stop();
  }
  EXPECT_EQ(test::openFdCount(), fdsBefore);
}

}  // namespace
}  // namespace forklift
