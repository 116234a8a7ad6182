// A reader that holds several slots (RingReaderOptions::maxHeld): released
// in any order, never reused by the writer while held, under every
// overflow policy, counters true; recovered when its process dies; viewed
// in place from another process (RingBuffer::view).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "forklift/ring_buffer.hpp"
#include "posix.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;

void commitFrame(RingWriter& w, std::int64_t frame) {
  WriteSlot s = w.reserve(test::slow(1s));
  std::memset(s.data(), static_cast<int>(frame & 0xff), s.capacity());
  s.setUser(0, frame);
  s.commit();
}

// True when the slot still holds what commitFrame wrote for its frame.
bool asWritten(const ReadSlot& s) {
  for (std::size_t i = 0; i < s.bytes(); ++i)
    if (static_cast<unsigned char>(s.data()[i]) != static_cast<unsigned char>(s.user(0) & 0xff)) return false;
  return s.intact();
}

class RingHeld : public ::testing::TestWithParam<RingPolicy> {};

TEST_P(RingHeld, SlotsHeldAtOnceAreNeverReusedAndComeBackInAnyOrder) {
  const RingPolicy policy = GetParam();
  auto ring = RingBuffer::create("ring-held", 6, 256, policy);
  auto w = ring.writer();
  auto r = ring.reader({.maxHeld = 3});
  EXPECT_EQ(r.maxHeld(), 3u);
  std::int64_t frame = 0;
  std::vector<ReadSlot> held;
  for (int i = 0; i < 3; ++i) {
    commitFrame(w, ++frame);  // one at a time: KeepLatest hands out only the newest
    auto s = r.tryNext();
    ASSERT_TRUE(s);
    held.push_back(std::move(*s));
  }
  EXPECT_EQ(r.held(), 3u);
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { r.tryNext(); }),
                             "the reader holds 3 slots already, its maxHeld; release one before "
                             "taking the next"));
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { r.next(10ms); }), "holds 3 slots already"));

  // The writer churns through the other 3 slots: a Block ring fills them
  // and stops; the drop policies drop among them, never a held slot.
  const int more = policy == RingPolicy::Block ? 3 : 20;
  for (int i = 0; i < more; ++i) commitFrame(w, ++frame);
  if (policy == RingPolicy::Block) {
    EXPECT_FALSE(w.tryReserve());
  }
  for (const ReadSlot& s : held) EXPECT_TRUE(asWritten(s)) << "frame " << s.user(0);
  EXPECT_EQ(held[0].user(0), 1);
  EXPECT_EQ(held[2].user(0), 3);

  // Out of order: the middle one, the last, the first.
  held[1].release();
  EXPECT_EQ(r.held(), 2u);
  auto fourth = r.tryNext();  // room again
  ASSERT_TRUE(fourth);
  EXPECT_TRUE(asWritten(*fourth));
  std::int64_t last = fourth->user(0);
  held[2].release();
  held[0].release();
  fourth->release();
  EXPECT_EQ(r.held(), 0u);
  std::uint64_t read = 4;
  while (auto s = r.tryNext()) {
    EXPECT_GT(s->user(0), last);
    EXPECT_TRUE(asWritten(*s));
    last = s->user(0);
    ++read;
  }
  EXPECT_EQ(last, frame);  // the newest frame is never dropped
  const RingStats st = ring.stats();
  EXPECT_EQ(st.committed, static_cast<std::uint64_t>(frame));
  EXPECT_EQ(st.consumed, read);
  EXPECT_EQ(st.consumed + st.drops, st.committed);
  EXPECT_EQ(st.torn, 0u);
  if (policy == RingPolicy::Block) {
    EXPECT_EQ(st.drops, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(, RingHeld,
                         ::testing::Values(RingPolicy::Block, RingPolicy::DropOldest, RingPolicy::KeepLatest),
                         [](const auto& info) {
                           return info.param == RingPolicy::Block        ? std::string("Block")
                                  : info.param == RingPolicy::DropOldest ? std::string("DropOldest")
                                                                         : std::string("KeepLatest");
                         });

TEST(RingHeldLimits, MaxHeldIsOneToSlotsMinusOne) {
  auto ring = RingBuffer::create("ring-held-limits", 4, 8);
  EXPECT_TRUE(test::contains(test::thrown<LimitError>([&] { ring.reader({.maxHeld = 0}); }),
                             "ring-held-limits': a reader holds 1 to 3 of its 4 slots at once, not 0"));
  EXPECT_TRUE(test::contains(test::thrown<LimitError>([&] { ring.reader({.maxHeld = 4}); }), "not 4"));
  auto r = ring.reader({.maxHeld = 3});
  EXPECT_EQ(r.maxHeld(), 3u);
}

// A pipe the child reports through.
struct Pipe {
  detail::UniqueFd r, w;
  Pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw SystemError(errno, "cannot create a pipe");
    r.reset(fds[0]);
    w.reset(fds[1]);
  }
  void put(std::int64_t v) {
    if (::write(w.get(), &v, sizeof v) != static_cast<ssize_t>(sizeof v)) std::abort();
  }
  bool get(std::int64_t& v, Timeout t) {
    if (!detail::waitFor(r.get(), POLLIN, Deadline(t))) return false;
    return ::read(r.get(), &v, sizeof v) == static_cast<ssize_t>(sizeof v);
  }
};

// The zero-copy hand-over: this process holds the slot, another reads it in
// place by index and sequence; once released and reused, the view is refused.
TEST(RingHeldView, AnotherProcessReadsAHeldSlotInPlace) {
  auto ring = RingBuffer::createArray<std::uint8_t>("ring-view", 3, {4, 8, 3}, RingPolicy::DropOldest);
  auto w = ring.writer();
  auto r = ring.reader({.maxHeld = 2});
  commitFrame(w, 7);
  auto s = r.tryNext();
  ASSERT_TRUE(s);
  const std::uint32_t index = s->index();
  const std::uint64_t seq = s->sequence();
  Pipe p;
  const pid_t child = test::forkChild([&] {
    // A worker: it has the ring (inherited here; open(describe()) elsewhere).
    const RingSlotView v = ring.view(index, seq);
    const auto img = v.tensor<std::uint8_t, 3>();
    std::int64_t sum = 0;
    for (int y = 0; y < 4; ++y)
      for (int x = 0; x < 8; ++x)
        for (int c = 0; c < 3; ++c) sum += img(y, x, c);
    p.put(v.intact() && v.info().user[0] == 7 ? sum : -1);
    return 0;
  });
  std::int64_t sum = 0;
  ASSERT_TRUE(p.get(sum, test::slow(10s)));
  EXPECT_EQ(sum, 7 * 4 * 8 * 3);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), 0);

  EXPECT_TRUE(test::contains(test::thrown<LimitError>([&] { ring.view(3, seq); }), "has 3 slots, no slot 3"));
  s->release();
  for (int i = 0; i < 6; ++i) commitFrame(w, 8 + i);  // the slot is reused
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { ring.view(index, seq); }),
                             "slot " + std::to_string(index) + " no longer holds frame " + std::to_string(seq)));
}

// A reader killed while it holds 3 slots: its successor gives all 3 back,
// and the writer gets every slot again.
TEST(RingHeldRecovery, ADeadReadersHeldSlotsComeBack) {
  auto ring = RingBuffer::create("ring-held-rdeath", 4, 64, RingPolicy::Block);
  auto w = ring.writer();
  for (int i = 1; i <= 3; ++i) commitFrame(w, i);
  Pipe p;
  const pid_t child = test::forkChild([&] {
    auto r = ring.reader({.maxHeld = 3});
    std::vector<ReadSlot> held;
    for (int i = 0; i < 3; ++i)
      if (auto s = r.tryNext()) held.push_back(std::move(*s));
    p.put(static_cast<std::int64_t>(held.size()));
    ::pause();
    return 0;
  });
  std::int64_t n = 0;
  const bool reported = p.get(n, test::slow(10s));
  ::kill(child, SIGKILL);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), -1);
  ASSERT_TRUE(reported);
  EXPECT_EQ(n, 3);
  // One free slot (the 4th) until a successor reader recovers the 3.
  commitFrame(w, 4);
  EXPECT_FALSE(w.tryReserve());
  auto r = ring.reader({.maxHeld = 2});
  int free = 0;
  while (auto s = w.tryReserve()) {
    s->commit();
    ++free;
  }
  EXPECT_EQ(free, 3);
  EXPECT_EQ(ring.stats().consumed, 0u);  // recovered, not read
}

// A writer killed while the reader holds 2 slots: its successor owns only
// the slots in none of D, the reader's hands and R.
TEST(RingHeldRecovery, ANewWriterDoesNotTakeHeldSlots) {
  auto ring = RingBuffer::create("ring-held-wdeath", 4, 64, RingPolicy::Block);
  auto r = ring.reader({.maxHeld = 2});
  Pipe p;
  const pid_t child = test::forkChild([&] {
    auto w = ring.writer();
    for (int i = 1; i <= 4; ++i) commitFrame(w, i);
    p.put(4);
    ::pause();
    return 0;
  });
  std::int64_t n = 0;
  const bool reported = p.get(n, test::slow(10s));
  auto a = r.tryNext();
  auto b = r.tryNext();
  ::kill(child, SIGKILL);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), -1);
  ASSERT_TRUE(reported);
  ASSERT_TRUE(a && b);
  auto w = ring.writer();
  EXPECT_FALSE(w.tryReserve());  // 2 in D, 2 held
  a->release();
  auto s = w.tryReserve();
  ASSERT_TRUE(s);
  EXPECT_NE(s->data(), b->data());
  std::memset(s->data(), 9, s->capacity());
  EXPECT_TRUE(asWritten(*b));
}


// ---------------------------------------------------------------- across processes

using Clock = std::chrono::steady_clock;

using test::checksum;
using test::fillPayload;

pid_t writeChecksummed(RingBuffer& ring, std::size_t bytes, std::uint64_t frames) {
  return test::forkChild([&ring, bytes, frames] {
    auto w = ring.writer();
    for (std::uint64_t i = 1; i <= frames; ++i) {
      WriteSlot s = w.reserve(test::slow(10s));
      fillPayload(s.data(), bytes, s.sequence());
      s.setUser(0, checksum(s.data(), bytes));
      s.commit();
    }
    return 0;
  });
}

class RingHeldStream : public ::testing::TestWithParam<RingPolicy> {};

// A writer at full speed in another process, a reader that keeps up to 3
// slots and gives a random one back when it has 3: every held slot still
// holds its frame when it is given back (the writer never reused it),
// frames come in order, and committed = read + dropped.
TEST_P(RingHeldStream, HeldSlotsSurviveAWriterAtFullSpeed) {
  constexpr std::size_t kBytes = 4096;
  constexpr std::uint64_t kFrames = 2000;
  auto ring = RingBuffer::create("ring-held-stream", 6, kBytes, GetParam());
  auto r = ring.reader({.maxHeld = 3});
  const pid_t child = writeChecksummed(ring, kBytes, kFrames);
  std::srand(4242);
  std::deque<ReadSlot> held;
  std::uint64_t received = 0, lastSeq = 0, outOfOrder = 0, bad = 0;
  bool closed = false;
  const auto giveBack = [&](std::size_t i) {
    ReadSlot& s = held[i];
    if (checksum(s.data(), s.bytes()) != s.user(0) || !s.intact()) ++bad;
    held.erase(held.begin() + static_cast<std::ptrdiff_t>(i));
  };
  while (!closed) {
    if (held.size() == 3) giveBack(static_cast<std::size_t>(std::rand()) % 3);
    try {
      auto s = r.next(test::slow(10s));
      if (!s) break;  // a timeout: the counts below fail
      if (s->sequence() <= lastSeq) ++outOfOrder;
      lastSeq = s->sequence();
      ++received;
      held.push_back(std::move(*s));
    } catch (const PeerClosed&) {
      closed = true;
    }
  }
  while (!held.empty()) giveBack(held.size() - 1);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 20s)), 0);
  EXPECT_TRUE(closed);
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(outOfOrder, 0u);
  EXPECT_EQ(lastSeq, kFrames);
  const RingStats st = ring.stats();
  EXPECT_EQ(st.committed, kFrames);
  EXPECT_EQ(st.torn, 0u);
  EXPECT_EQ(received + st.drops, kFrames);
  EXPECT_EQ(st.consumed, received);
  if (GetParam() == RingPolicy::Block) {
    EXPECT_EQ(st.drops, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(, RingHeldStream,
                         ::testing::Values(RingPolicy::Block, RingPolicy::DropOldest, RingPolicy::KeepLatest),
                         [](const auto& info) {
                           return info.param == RingPolicy::Block        ? std::string("Block")
                                  : info.param == RingPolicy::DropOldest ? std::string("DropOldest")
                                                                         : std::string("KeepLatest");
                         });

// Free slots a writer finds before its first drop: all the slots the reader
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

class RingHeldKills : public ::testing::TestWithParam<RingPolicy> {};

// Either side killed at a random moment while the reader holds up to 2
// slots: the successor finds every slot exactly once.
TEST_P(RingHeldKills, KilledAtAnyMomentNoHeldSlotIsLostOrDuplicated) {
  constexpr std::size_t kSlots = 4, kBytes = 512;
  std::srand(777);
  for (int round = 0; round < 10; ++round) {
    {  // the writer dies; this reader holds 2 slots through it (3 while it takes one)
      auto ring = RingBuffer::create("ring-hkill-w", kSlots, kBytes, GetParam());
      auto reader = ring.reader({.maxHeld = 3});
      const pid_t child = test::forkChild([&] {
        auto w = ring.writer();
        for (;;) {
          WriteSlot s = w.reserve(test::slow(10s));
          fillPayload(s.data(), kBytes, s.sequence());
          s.setUser(0, checksum(s.data(), kBytes));
          s.commit();
        }
        return 0;
      });
      std::deque<ReadSlot> held;
      int bad = 0;
      const auto take = [&](Timeout t) {
        if (auto s = reader.next(t)) {
          if (checksum(s->data(), kBytes) != s->user(0)) ++bad;
          held.push_back(std::move(*s));
          if (held.size() > 2) held.pop_front();
        }
      };
      const auto until = Clock::now() + std::chrono::microseconds(200 + std::rand() % 3000);
      while (Clock::now() < until || held.size() < 2) take(test::slow(1s));
      ::kill(child, SIGKILL);
      EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 5s)), -1);
      for (;;) {  // drain up to the death, holding 2
        try {
          take(test::slow(5s));
        } catch (const ProcessDied&) {
          break;
        }
      }
      EXPECT_EQ(bad, 0);
      ASSERT_EQ(held.size(), 2u);
      for (const ReadSlot& s : held) EXPECT_EQ(checksum(s.data(), kBytes), s.user(0));
      auto w = ring.writer();  // the successor, in this process
      EXPECT_EQ(slotsBeforeFirstDrop(w, kSlots), kSlots - 2) << "round " << round << ", writer killed";
      for (const ReadSlot& s : held) EXPECT_EQ(checksum(s.data(), kBytes), s.user(0)) << "a held slot was reused";
    }
    {  // the reader dies holding up to 2
      auto ring = RingBuffer::create("ring-hkill-r", kSlots, kBytes, GetParam());
      auto writer = ring.writer();
      const pid_t child = test::forkChild([&] {
        auto r = ring.reader({.maxHeld = 2});
        std::deque<ReadSlot> held;
        for (;;) {
          if (held.size() == 2) held.pop_front();
          if (auto s = r.next(test::slow(10s))) held.push_back(std::move(*s));
        }
        return 0;
      });
      const auto until = Clock::now() + std::chrono::microseconds(200 + std::rand() % 3000);
      while (Clock::now() < until) writer.push({}, test::slow(1s));
      ::kill(child, SIGKILL);
      EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 5s)), -1);
      auto reader = ring.reader();  // the successor gives the dead one's slots back
      while (reader.tryNext()) {
      }
      EXPECT_EQ(slotsBeforeFirstDrop(writer, kSlots), kSlots) << "round " << round << ", reader killed";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(, RingHeldKills, ::testing::Values(RingPolicy::DropOldest, RingPolicy::KeepLatest),
                         [](const auto& info) {
                           return std::string(info.param == RingPolicy::DropOldest ? "DropOldest" : "KeepLatest");
                         });

}  // namespace
}  // namespace forklift
