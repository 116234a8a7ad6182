// Manager::readRing: the library's own drain/arm loop over a ring's reader.
// A callback that throws does not silence the ring; slots a callback keeps
// pause the reading until they come back; the writer's death and its
// orderly detach end the reading with the error that says which.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "forklift/manager.hpp"
#include "forklift/ring_buffer.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// A child that writes frames 1..n (user(0) = the frame) into a Block ring,
// then detaches in order (or, with `die`, is killed as a writer).
pid_t writeFrames(RingBuffer& ring, int n, bool die) {
  return test::forkChild([&ring, n, die] {
    auto w = ring.writer();
    for (int i = 1; i <= n; ++i) {
      WriteSlot s = w.reserve(test::slow(10s));
      std::memset(s.data(), i, s.capacity());
      s.setUser(0, i);
      s.commit();
    }
    if (die) ::kill(::getpid(), SIGKILL);
    return 0;
  });
}

struct Ended {
  bool ended = false;
  bool died = false;
  std::string what;
};

std::function<void(const Error&)> recordEnd(Ended& e) {
  return [&e](const Error& err) {
    e.ended = true;
    e.died = dynamic_cast<const ProcessDied*>(&err) != nullptr;
    e.what = err.what();
  };
}

TEST(RingLoop, ACallbackThatThrowsDoesNotSilenceTheRing) {
  test::TempDir dir;
  test::CaptureStderr err(dir);
  constexpr int kFrames = 40, kThrowOn = 5;
  auto ring = RingBuffer::create("ring-loop-throw", 4, 64, RingPolicy::Block);
  auto reader = ring.reader();
  const pid_t child = writeFrames(ring, kFrames, false);
  Manager m;
  std::vector<std::int64_t> got;
  Ended end;
  m.readRing(
      reader,
      [&](ReadSlot& s) {
        got.push_back(s.user(0));
        if (s.user(0) == kThrowOn) throw std::runtime_error("frame five is bad");
      },
      recordEnd(end));
  const auto t0 = Clock::now();
  EXPECT_TRUE(m.runUntil([&] { return end.ended; }, test::slow(10s)));
  const auto took = Clock::now() - t0;
  EXPECT_EQ(m.finish(), 0);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), 0);
  ASSERT_EQ(got.size(), static_cast<std::size_t>(kFrames));
  for (int i = 0; i < kFrames; ++i) EXPECT_EQ(got[static_cast<std::size_t>(i)], i + 1);
  EXPECT_FALSE(end.died);
  EXPECT_TRUE(test::contains(end.what, "the writer detached"));
  EXPECT_LT(took, test::slow(5s));  // the end is seen at the detach, not at a timeout
  EXPECT_EQ(reader.stats().consumed, static_cast<std::uint64_t>(kFrames));  // the throwing frame's slot came back
  EXPECT_EQ(reader.held(), 0u);
  EXPECT_TRUE(test::contains(err.text(), "the callback threw on frame 5 of ring 'anon."));
  EXPECT_TRUE(test::contains(err.text(), "frame five is bad"));
}

TEST(RingLoop, AKilledWriterIsReportedAfterItsLastFrames) {
  constexpr int kFrames = 3;
  auto ring = RingBuffer::create("ring-loop-death", 4, 64, RingPolicy::Block);
  auto reader = ring.reader();
  const pid_t child = writeFrames(ring, kFrames, true);
  Manager m;
  std::vector<std::int64_t> got;
  Ended end;
  m.readRing(reader, [&](ReadSlot& s) { got.push_back(s.user(0)); }, recordEnd(end));
  const auto t0 = Clock::now();
  EXPECT_TRUE(m.runUntil([&] { return end.ended; }, test::slow(10s)));
  EXPECT_LT(Clock::now() - t0, test::slow(5s));  // the pidfd, not a timeout
  EXPECT_EQ(m.finish(), 0);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), -1);
  EXPECT_EQ(got, (std::vector<std::int64_t>{1, 2, 3}));
  EXPECT_TRUE(end.died);
  EXPECT_TRUE(test::contains(end.what, "the writer (pid " + std::to_string(child) + ") died"));
}

// The callback keeps every slot (moved out) and gives them back later, two
// at a time, out of order: reading pauses at maxHeld and goes on at the
// release, and every frame of a Block ring arrives.
TEST(RingLoop, KeptSlotsPauseTheReadingUntilTheyComeBack) {
  constexpr int kFrames = 30;
  auto ring = RingBuffer::create("ring-loop-held", 4, 64, RingPolicy::Block);
  auto reader = ring.reader({.maxHeld = 2});
  const pid_t child = writeFrames(ring, kFrames, false);
  Manager m;
  std::vector<std::int64_t> got;
  std::vector<ReadSlot> kept;
  std::size_t mostHeld = 0;
  Ended end;
  m.readRing(
      reader,
      [&](ReadSlot& s) {
        got.push_back(s.user(0));
        kept.push_back(std::move(s));
        mostHeld = std::max(mostHeld, reader.held());
        if (kept.size() == 2)
          m.after(1ms, [&] {
            kept[1].release();  // the newer first
            kept.clear();
          });
      },
      recordEnd(end));
  EXPECT_TRUE(m.runUntil([&] { return end.ended; }, test::slow(10s)));
  EXPECT_EQ(m.finish(), 0);
  EXPECT_EQ(test::exitCodeOf(test::waitChild(child, 10s)), 0);
  ASSERT_EQ(got.size(), static_cast<std::size_t>(kFrames));
  for (int i = 0; i < kFrames; ++i) EXPECT_EQ(got[static_cast<std::size_t>(i)], i + 1);
  EXPECT_EQ(mostHeld, 2u);
  EXPECT_FALSE(end.died);
}

TEST(RingLoop, AnEmptyReaderIsRefused) {
  Manager m;
  RingReader none;
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { m.readRing(none, [](ReadSlot&) {}); }),
                             "readRing: the RingReader is empty"));
}

}  // namespace
}  // namespace forklift
