// Channel over shared-memory queues (Channel::makeSharedPair): the promises
// of channel.hpp, tried where the queues differ from a socket — frames
// larger than a queue, descriptors beside the queue, the doorbell's level,
// the peer's end, a full queue, one sender and one receiver thread.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <sstream>
#include <string>
#include <vector>
#include <thread>

#include "forklift/channel.hpp"
#include "forklift/error.hpp"
#include "doorbell.hpp"
#include "posix.hpp"
#include "shm_pipe.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using test::contains;
using test::thrown;
using namespace std::chrono_literals;

constexpr std::size_t kQueue = 4096;  // the smallest queue: big frames must stream through

bool readable(int fd) { return detail::waitFor(fd, POLLIN, Deadline(Timeout::zero())); }

TEST(ShmChannel, SendAndReceiveBothWaysInOneProcess) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  EXPECT_EQ(a.transport(), Transport::SharedMemory);
  a.send(Message("ping", {{"n", 1}}));
  auto m = b.recv(test::slow(1s));
  ASSERT_TRUE(m);
  EXPECT_EQ(m->command(), "ping");
  EXPECT_EQ(m->get<int>("n"), 1);
  b.send(Message("pong", {{"n", 2}}));
  m = a.recv(test::slow(1s));
  ASSERT_TRUE(m);
  EXPECT_EQ(m->get<int>("n"), 2);
  EXPECT_FALSE(a.recv(Timeout(20)));  // nothing more: a timeout, not a hang
}

TEST(ShmChannel, FramesLargerThanTheQueueStreamThroughWholeAndInOrderAcrossFork) {
  auto [parent, child] = Channel::makeSharedPair({}, kQueue, kQueue);
  const pid_t pid = test::forkChild([&parent = parent, &child = child] {
    parent.close();
    for (int i = 0; i < 50; ++i) {
      auto m = child.recv(test::slow(5s));
      if (!m) return 2;
      child.send(*m);  // echo
    }
    return 0;
  });
  child.close();
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  ASSERT_GE(fd, 0);
  detail::UniqueFd death(fd);
  parent.watchPeer(death.get());
  for (int i = 0; i < 50; ++i) {
    const std::string blob(static_cast<std::size_t>(i) * 7919 + 1, static_cast<char>('a' + i % 26));
    parent.send(Message("echo", {{"i", i}, {"blob", blob}}), test::slow(5s));
    auto m = parent.recv(test::slow(5s));
    ASSERT_TRUE(m) << i;
    EXPECT_EQ(m->get<int>("i"), i);
    EXPECT_EQ(m->get<std::string>("blob"), blob);
  }
  EXPECT_EQ(test::exitCodeOf(test::waitChild(pid, 5s)), 0);
}

TEST(ShmChannel, FdIsReadableExactlyWhileAMessageWaitsInOneFrameMode) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  b.setReadMode(ReadMode::OneFrame);
  EXPECT_FALSE(readable(b.fd()));
  a.send(Message("one"));
  a.send(Message("two"));
  EXPECT_TRUE(readable(b.fd()));
  ASSERT_EQ(b.recv(test::slow(1s))->command(), "one");
  EXPECT_TRUE(readable(b.fd()));  // "two" still waits
  ASSERT_EQ(b.recv(test::slow(1s))->command(), "two");
  EXPECT_FALSE(readable(b.fd()));
  a.send(Message("three"));
  EXPECT_TRUE(readable(b.fd()));
  EXPECT_EQ(b.tryRecv()->command(), "three");
  EXPECT_FALSE(b.tryRecv());
  EXPECT_FALSE(readable(b.fd()));
}

TEST(ShmChannel, DescriptorsTravelWithTheirFramesThroughAFullQueue) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  const int before = test::openFdCount();
  std::thread reader;
  std::atomic<int> good{0};
  reader = std::thread([&, &b = b] {
    for (int i = 0; i < 200; ++i) {
      auto m = b.recv(test::slow(5s));
      if (!m) return;
      if (m->get<int>("i") != i) return;
      if (i % 3 == 0) {
        Fd f = m->get<Fd>("fd");
        char c = 0;
        if (::pread(f.get(), &c, 1, 0) != 1 || c != static_cast<char>('A' + i % 26)) return;
      }
      ++good;
    }
  });
  std::string failure;
  try {
    for (int i = 0; i < 200; ++i) {
      Map args{{"i", i}, {"pad", std::string(1500, 'x')}};
      if (i % 3 == 0) {
        detail::UniqueFd memfd(::memfd_create("shm-channel-test", MFD_CLOEXEC));
        const char c = static_cast<char>('A' + i % 26);
        if (::write(memfd.get(), &c, 1) != 1) throw std::runtime_error("cannot write the memfd");
        args.emplace_back("fd", Fd::dup(memfd.get()));  // the receiver gets its own
      }
      a.send(Message("m", std::move(args)), test::slow(5s));
    }
  } catch (const std::exception& e) {
    failure = e.what();
  }
  reader.join();
  EXPECT_EQ(failure, "");
  EXPECT_EQ(good.load(), 200);
  EXPECT_EQ(test::openFdCount(), before);
}

TEST(ShmChannel, SendTimesOutWhenNobodyReadsAndTheNextSendCompletesTheFrame) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  const std::string big(3 * kQueue, 'z');
  const std::string e = thrown<TimeoutError>([&, &a = a] { a.send(Message("big", {{"b", big}}), Timeout(50)); });
  EXPECT_TRUE(contains(e, "the peer is not reading")) << e;
  EXPECT_GT(a.unsentBytes(), 0u);
  std::thread reader([&, &b = b] {
    for (int i = 0; i < 2; ++i) b.recv(test::slow(5s));
  });
  a.send(Message("small"), test::slow(5s));  // completes "big" first
  reader.join();
  EXPECT_EQ(a.unsentBytes(), 0u);
}

TEST(ShmChannel, GarbageInTheQueueIsAFinalStreamCorruption) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  const char junk[] = "GET / HTTP/1.0\r\n\r\n";
  ASSERT_EQ(a.writeSome(junk, sizeof junk), sizeof junk);
  EXPECT_TRUE(contains(thrown<StreamCorrupt>([&, &b = b] { b.recv(test::slow(1s)); }), "bad magic bytes"));
  EXPECT_THROW(b.recv(test::slow(1s)), StreamCorrupt);
}

TEST(ShmChannel, ThePeersEndIsPeerClosedAfterWhatItLeft) {
  auto [parent, child] = Channel::makeSharedPair({}, kQueue, kQueue);
  const pid_t pid = test::forkChild([&parent = parent, &child = child] {
    parent.close();
    child.send(Message("last words"));
    return 0;  // exits: its end of the socket closes
  });
  child.close();
  EXPECT_EQ(test::exitCodeOf(test::waitChild(pid, 5s)), 0);
  auto m = parent.recv(test::slow(1s));
  ASSERT_TRUE(m);
  EXPECT_EQ(m->command(), "last words");
  EXPECT_THROW(parent.recv(test::slow(5s)), PeerClosed);
}

TEST(ShmChannel, AWatchedDeathEndsWaitsAndRefusesSends) {
  auto [parent, child] = Channel::makeSharedPair({}, kQueue, kQueue);
  const pid_t pid = test::forkChild([] {
    ::pause();
    return 0;
  });
  // The child holds its copy of the whole pair: the socket never hangs up,
  // so only the watched death can end the waits.
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  ASSERT_GE(fd, 0);
  detail::UniqueFd death(fd);
  parent.watchPeer(death.get());
  ::kill(pid, SIGKILL);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(parent.recv(test::slow(10s)), PeerClosed);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(2s));
  // A queue would take the bytes; the send must not pretend they went.
  EXPECT_THROW(parent.send(Message("anyone?"), test::slow(1s)), PeerClosed);
  test::waitChild(pid, 5s);
}

TEST(ShmChannel, OneSenderAndOneReceiverThreadShareEachEnd) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  constexpr int kN = 20000;
  std::atomic<int> aGot{0}, bGot{0};
  std::thread bReader([&, &b = b] {
    for (int i = 0; i < kN; ++i) {
      auto m = b.recv(test::slow(5s));
      if (!m || m->get<int>("i") != i) return;
      ++bGot;
    }
  });
  std::thread bWriter([&, &b = b] {
    for (int i = 0; i < kN; ++i) b.send(Message("back", {{"i", i}}), test::slow(5s));
  });
  std::thread aReader([&, &a = a] {
    for (int i = 0; i < kN; ++i) {
      auto m = a.recv(test::slow(5s));
      if (!m || m->get<int>("i") != i) return;
      ++aGot;
    }
  });
  for (int i = 0; i < kN; ++i) a.send(Message("forth", {{"i", i}}), test::slow(5s));
  bReader.join();
  bWriter.join();
  aReader.join();
  EXPECT_EQ(aGot.load(), kN);
  EXPECT_EQ(bGot.load(), kN);
}

TEST(ShmChannel, AOneWayEndRefusesTheOtherWay) {
  auto [reader, writer] = Channel::makeSharedPair({}, 0, kQueue);
  writer.send(Message("fine"));
  EXPECT_EQ(reader.recv(test::slow(1s))->command(), "fine");
  EXPECT_TRUE(contains(thrown<Error>([&, &reader = reader] { reader.send(Message("no")); }), "only receives"));
}

TEST(ShmChannel, ClosingBothEndsReleasesEveryDescriptor) {
  const int before = test::openFdCount();
  {
    auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
    a.send(Message("x"));
    EXPECT_GT(test::openFdCount(), before + 4);
  }
  EXPECT_EQ(test::openFdCount(), before);
}

// The mappings of this process that hold shared anonymous memory (the
// queues are "/dev/zero (deleted)" in /proc/self/maps).
int sharedAnonymousMappings() {
  std::istringstream maps(test::readFile("/proc/self/maps"));
  int n = 0;
  for (std::string line; std::getline(maps, line);)
    if (line.find("/dev/zero") != std::string::npos) ++n;
  return n;
}

// makeSharedPairs: two pairs, four queues, one mapping; each pair carries
// its own stream both ways, and the memory stays while any end is open.
TEST(ShmChannel, TwoPairsShareOneMappingAndKeepTheirStreamsApart) {
  const int before = sharedAnonymousMappings();
  auto [first, second] = Channel::makeSharedPairs({}, kQueue, kQueue, 0, kQueue);
  EXPECT_EQ(sharedAnonymousMappings(), before + 1);
  auto& [a, b] = first;
  auto& [c, d] = second;
  a.send(Message("a to b"));
  b.send(Message("b to a"));
  d.send(Message("d to c"));
  EXPECT_EQ(b.recv(test::slow(1s))->command(), "a to b");
  EXPECT_EQ(a.recv(test::slow(1s))->command(), "b to a");
  EXPECT_EQ(c.recv(test::slow(1s))->command(), "d to c");
  EXPECT_FALSE(b.recv(Timeout(20)));
  EXPECT_FALSE(c.recv(Timeout(20)));
  EXPECT_TRUE(contains(thrown<Error>([&c = c] { c.send(Message("no")); }), "only receives"));
  // The first pair closed, the second still works in the same memory.
  a.close();
  b.close();
  EXPECT_EQ(sharedAnonymousMappings(), before + 1);
  d.send(Message("still"));
  EXPECT_EQ(c.recv(test::slow(1s))->command(), "still");
  c.close();
  d.close();
  EXPECT_EQ(sharedAnonymousMappings(), before);
}

// --- waiting on the doorbell directly (watchInputIn, waitInput, holdRings)

int epollWaitMs(int ep, int ms) {
  epoll_event ev[4];
  return ::epoll_wait(ep, ev, 4, ms);
}

TEST(ShmChannel, AnEpollSetOfTheCallerGetsOneEdgePerRingAndNoBusyReadiness) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  detail::UniqueFd ep(::epoll_create1(EPOLL_CLOEXEC));
  b.watchInputIn(ep.get(), 7, 8);
  EXPECT_EQ(epollWaitMs(ep.get(), 0), 0);  // nothing yet
  a.send(Message("one"));
  epoll_event ev{};
  ASSERT_EQ(::epoll_wait(ep.get(), &ev, 1, 1000), 1);
  EXPECT_EQ(ev.data.u64, 7u);
  auto m = b.tryRecvWaited();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->command(), "one");
  // The edge was taken by the wait and the queue is drained: no readiness
  // left (a level-triggered eventfd never read would stay readable forever).
  EXPECT_EQ(epollWaitMs(ep.get(), 0), 0);
  EXPECT_FALSE(b.tryRecvWaited());
  // The next message rings again.
  a.send(Message("two"));
  ASSERT_EQ(epollWaitMs(ep.get(), 1000), 1);
  EXPECT_EQ(b.tryRecvWaited()->command(), "two");
  // The peer's end is the other tag, and stays readable.
  a.close();
  ASSERT_EQ(::epoll_wait(ep.get(), &ev, 1, 1000), 1);
  EXPECT_EQ(ev.data.u64, 8u);
  EXPECT_THROW(b.tryRecv(), PeerClosed);
}

TEST(ShmChannel, WaitInputSaysInputTimeoutAndTheEnd) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  EXPECT_EQ(b.waitInput(Deadline(Timeout(20))), Channel::Wake::Timeout);
  a.send(Message("x"));
  EXPECT_EQ(b.waitInput(Deadline(test::slow(1s))), Channel::Wake::Input);
  EXPECT_EQ(b.tryRecvWaited()->command(), "x");
  // That waitInput found the message without taking the ring's edge: a
  // stale edge costs at most one spurious wake-up, then it sleeps.
  int spurious = 0;
  while (b.waitInput(Deadline(Timeout(20))) == Channel::Wake::Input) {
    ASSERT_FALSE(b.tryRecvWaited());
    ASSERT_LE(++spurious, 1);
  }
  // wakeReader (another thread's way in) wakes it with nothing there.
  std::thread waker([&b = b] {
    std::this_thread::sleep_for(50ms);
    b.wakeReader();
  });
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(b.waitInput(Deadline(test::slow(10s))), Channel::Wake::Input);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 40ms);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(5s));
  waker.join();
  EXPECT_FALSE(b.tryRecvWaited());
  EXPECT_EQ(b.waitInput(Deadline(Timeout(20))), Channel::Wake::Timeout);
  a.close();
  EXPECT_EQ(b.waitInput(Deadline(test::slow(1s))), Channel::Wake::PeerEnd);
}

TEST(ShmChannel, MessagesSentWhileRingsAreHeldAreFoundWithoutARing) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  b.holdRings();
  a.send(Message("quiet"));
  // No ring: fd() is not readable although a message waits ...
  EXPECT_FALSE(readable(b.fd()));
  // ... and the reader that held the rings finds it by looking, or by
  // waiting (waitInput arms and looks before it sleeps).
  EXPECT_EQ(b.waitInput(Deadline(test::slow(1s))), Channel::Wake::Input);
  EXPECT_EQ(b.tryRecvWaited()->command(), "quiet");
  // Drained: armed again, so the next message makes fd() readable.
  a.send(Message("loud"));
  EXPECT_TRUE(readable(b.fd()));
  EXPECT_EQ(b.tryRecv()->command(), "loud");
  EXPECT_FALSE(readable(b.fd()));
  // resumeRings gives a reader that will not read after all its rings
  // back, and a message that came meanwhile makes fd() readable at once.
  b.holdRings();
  a.send(Message("meanwhile"));
  EXPECT_FALSE(readable(b.fd()));
  b.resumeRings();
  EXPECT_TRUE(readable(b.fd()));
  EXPECT_EQ(b.tryRecv()->command(), "meanwhile");
}

// Two threads ping-pong over both queues, every reader waiting on the
// doorbell directly, holding rings before each send and (in the second
// round) spinning before it sleeps: a lost wake-up would leave one side
// in waitInput until its 5 s deadline and fail the test.
TEST(ShmChannel, APingPongThatHoldsRingsAndSpinsLosesNoWakeUp) {
  for (auto spin : {std::chrono::nanoseconds(0), std::chrono::nanoseconds(std::chrono::microseconds(20))}) {
    auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
    a.setSpin(spin);
    b.setSpin(spin);
    constexpr int kN = 20000;
    std::atomic<int> echoed{0};
    auto take = [](Channel& c) -> std::optional<Message> {
      for (;;) {
        if (auto m = c.tryRecvWaited()) return m;
        if (c.waitInput(Deadline(test::slow(5s))) != Channel::Wake::Input) return std::nullopt;
      }
    };
    std::thread echo([&, &b = b] {
      for (int i = 0; i < kN; ++i) {
        auto m = take(b);
        if (!m || m->get<int>("i") != i) return;
        b.send(*m, test::slow(5s));
        ++echoed;
      }
    });
    int got = 0;
    for (int i = 0; i < kN; ++i) {
      if (i % 3 != 0) a.holdRings();  // as a blocking call does
      a.send(Message("ping", {{"i", i}}), test::slow(5s));
      auto m = take(a);
      if (!m || m->get<int>("i") != i) break;
      ++got;
    }
    echo.join();
    EXPECT_EQ(got, kN) << "spin " << spin.count() << " ns";
    EXPECT_EQ(echoed.load(), kN);
  }
}

// ---------------------------------------------------------------- the queue's doorbell, every interleaving

// The message queues' wake-up protocol, step by step on a real queue header
// (the lib/doorbell.hpp steps the queues call), under every interleaving by
// a deterministic scheduler, as tests/ring_buffer_test.cpp does for the
// ring. What differs from the ring: the doorbell is an edge in an epoll set
// (one pending edge, consumed by the wait that returns), a reader may hold
// the rings (disarmed) while it is awake, and one that takes bytes arms
// again after draining, ringing itself (keepBell) when bytes came in
// between. Two readers: `Waiter` (Channel::waitInput: arms and looks again
// before it sleeps) and `Loop` (the backend's loop: sleeps on its epoll set
// at once, relying on the arming its last drain left).
enum class Reader { Waiter, Loop };
enum class KeepBell { Always, OnlyIfArmed /* broken on purpose: the writer's edge may be gone */ };

struct QueueModel {
  std::unique_ptr<detail::PipeHeader> h = std::make_unique<detail::PipeHeader>();
  Reader reader;
  KeepBell keep;
  int messages;
  bool edge = false;  // a pending edge in the reader's epoll set
  int rings = 0;
  int rpc = 0;        // reader's step
  int ppc = 0;        // producer: even publishes, odd rings if armed

  QueueModel(Reader r, KeepBell k, int n, bool held) : reader(r), keep(k), messages(n) {
    h->readerArmed.store(held ? 0 : 1);
    rpc = r == Reader::Loop ? kSleep : kLook;
  }
  std::uint64_t waiting() const { return h->tail.load() - h->head.load(); }
  bool done() const { return h->head.load() == static_cast<std::uint64_t>(messages); }
  void ring() {
    edge = true;
    ++rings;
  }
  void keepBell() {
    if (keep == KeepBell::Always) {
      detail::bellDisarm(h->readerArmed);
      ring();
    } else if (h->readerArmed.exchange(0) != 0) {
      ring();
    }
  }

  enum : int { kLook, kArm, kRecheck, kSleep, kDrainCheck, kDrainArm, kDrainRecheck, kNext };
  bool readerStep() {
    if (done()) return false;
    switch (rpc) {
      case kLook:  // waitInput's first look, or the read after a wake-up
        if (waiting() > 0) {
          h->head.store(h->tail.load());  // takes all there is
          rpc = kDrainCheck;
        } else {
          rpc = reader == Reader::Waiter ? kArm : kSleep;
        }
        return true;
      case kArm:
        detail::bellArm(h->readerArmed);
        rpc = kRecheck;
        return true;
      case kRecheck:
        rpc = waiting() > 0 ? kLook : kSleep;
        return true;
      case kSleep:  // epoll_wait: runs only when an edge is pending, and takes it
        if (!edge) return false;
        edge = false;
        rpc = kLook;
        return true;
      case kDrainCheck:  // fillShared after a read: bytes left?
        if (waiting() > 0) {
          keepBell();
          rpc = kNext;
        } else {
          rpc = kDrainArm;
        }
        return true;
      case kDrainArm:
        detail::bellArm(h->readerArmed);
        rpc = kDrainRecheck;
        return true;
      case kDrainRecheck:
        if (waiting() > 0) keepBell();
        rpc = kNext;
        return true;
      case kNext:  // the message is handled; back to waiting
        rpc = reader == Reader::Loop ? kSleep : kLook;
        return true;
    }
    return false;
  }
  bool producerStep() {
    if (ppc == 2 * messages) return false;
    if (ppc % 2 == 0)
      detail::bellPublish(h->tail, h->tail.load() + 1);
    else if (detail::bellMustRing(h->readerArmed, waiting()))
      ring();
    ++ppc;
    return true;
  }
};

struct QueueOutcome {
  int schedules = 0;
  int lost = 0;  // the reader asleep with no edge pending while a message waits
  int maxRings = 0;
};

std::unique_ptr<QueueModel> replayQueue(Reader r, KeepBell k, int n, bool held, const std::vector<bool>& schedule) {
  auto m = std::make_unique<QueueModel>(r, k, n, held);
  for (const bool reader : schedule)
    if (!(reader ? m->readerStep() : m->producerStep())) return nullptr;
  return m;
}

QueueOutcome exploreQueueAll(Reader r, KeepBell k, int n, bool held) {
  QueueOutcome out;
  test::everySchedule([&](const std::vector<bool>& s) { return replayQueue(r, k, n, held, s); },
                      [&](QueueModel& m) {
                        ++out.schedules;
                        out.maxRings = std::max(out.maxRings, m.rings);
                        if (!m.done()) ++out.lost;
                      });
  return out;
}

TEST(ShmQueueDoorbell, NoInterleavingLosesAWakeUp) {
  for (const Reader r : {Reader::Waiter, Reader::Loop})
    for (int n = 1; n <= 3; ++n)
      for (const bool held : {false, true}) {
        if (r == Reader::Loop && held) continue;  // the loop never holds rings across its sleep
        const QueueOutcome o = exploreQueueAll(r, KeepBell::Always, n, held);
        EXPECT_GE(o.schedules, r == Reader::Loop && n == 1 ? 1 : 3) << n;
        EXPECT_EQ(o.lost, 0) << (r == Reader::Loop ? "loop" : "waiter") << ", " << n << " messages"
                             << (held ? ", rings held" : "");
        // At most one ring per message from the writer (one arming, one
        // ring) and one per drain from the reader itself (keepBell).
        EXPECT_LE(o.maxRings, 2 * n);
      }
}

TEST(ShmQueueDoorbell, TheSchedulerFindsTheLostWakeUpOfABrokenKeepBell) {
  // Ringing for leftover bytes only when still armed (right for a level
  // doorbell): the writer's edge was taken by the wait that woke the loop,
  // so the loop sleeps on bytes that wait.
  EXPECT_GT(exploreQueueAll(Reader::Loop, KeepBell::OnlyIfArmed, 2, false).lost, 0);
}

}  // namespace
}  // namespace forklift
