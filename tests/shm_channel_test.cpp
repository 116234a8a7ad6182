// Channel over shared-memory queues (Channel::makeSharedPair): the promises
// of channel.hpp, tried where the queues differ from a socket — frames
// larger than a queue, descriptors beside the queue, the doorbell's level,
// the peer's end, a full queue, one sender and one receiver thread.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>

#include "forklift/channel.hpp"
#include "forklift/error.hpp"
#include "posix.hpp"
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
  auto m = b.recv(1s);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->command(), "ping");
  EXPECT_EQ(m->get<int>("n"), 1);
  b.send(Message("pong", {{"n", 2}}));
  m = a.recv(1s);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->get<int>("n"), 2);
  EXPECT_FALSE(a.recv(Timeout(20)));  // nothing more: a timeout, not a hang
}

TEST(ShmChannel, FramesLargerThanTheQueueStreamThroughWholeAndInOrderAcrossFork) {
  auto [parent, child] = Channel::makeSharedPair({}, kQueue, kQueue);
  const pid_t pid = test::forkChild([&parent = parent, &child = child] {
    parent.close();
    for (int i = 0; i < 50; ++i) {
      auto m = child.recv(5s);
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
    parent.send(Message("echo", {{"i", i}, {"blob", blob}}), 5s);
    auto m = parent.recv(5s);
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
  ASSERT_EQ(b.recv(1s)->command(), "one");
  EXPECT_TRUE(readable(b.fd()));  // "two" still waits
  ASSERT_EQ(b.recv(1s)->command(), "two");
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
      auto m = b.recv(5s);
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
      a.send(Message("m", std::move(args)), 5s);
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
    for (int i = 0; i < 2; ++i) b.recv(5s);
  });
  a.send(Message("small"), 5s);  // completes "big" first
  reader.join();
  EXPECT_EQ(a.unsentBytes(), 0u);
}

TEST(ShmChannel, GarbageInTheQueueIsAFinalStreamCorruption) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  const char junk[] = "GET / HTTP/1.0\r\n\r\n";
  ASSERT_EQ(a.writeSome(junk, sizeof junk), sizeof junk);
  EXPECT_TRUE(contains(thrown<StreamCorrupt>([&, &b = b] { b.recv(1s); }), "bad magic bytes"));
  EXPECT_THROW(b.recv(1s), StreamCorrupt);
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
  auto m = parent.recv(1s);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->command(), "last words");
  EXPECT_THROW(parent.recv(5s), PeerClosed);
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
  EXPECT_THROW(parent.recv(10s), PeerClosed);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  // A queue would take the bytes; the send must not pretend they went.
  EXPECT_THROW(parent.send(Message("anyone?"), 1s), PeerClosed);
  test::waitChild(pid, 5s);
}

TEST(ShmChannel, OneSenderAndOneReceiverThreadShareEachEnd) {
  auto [a, b] = Channel::makeSharedPair({}, kQueue, kQueue);
  constexpr int kN = 20000;
  std::atomic<int> aGot{0}, bGot{0};
  std::thread bReader([&, &b = b] {
    for (int i = 0; i < kN; ++i) {
      auto m = b.recv(5s);
      if (!m || m->get<int>("i") != i) return;
      ++bGot;
    }
  });
  std::thread bWriter([&, &b = b] {
    for (int i = 0; i < kN; ++i) b.send(Message("back", {{"i", i}}), 5s);
  });
  std::thread aReader([&, &a = a] {
    for (int i = 0; i < kN; ++i) {
      auto m = a.recv(5s);
      if (!m || m->get<int>("i") != i) return;
      ++aGot;
    }
  });
  for (int i = 0; i < kN; ++i) a.send(Message("forth", {{"i", i}}), 5s);
  bReader.join();
  bWriter.join();
  aReader.join();
  EXPECT_EQ(aGot.load(), kN);
  EXPECT_EQ(bGot.load(), kN);
}

TEST(ShmChannel, AOneWayEndRefusesTheOtherWay) {
  auto [reader, writer] = Channel::makeSharedPair({}, 0, kQueue);
  writer.send(Message("fine"));
  EXPECT_EQ(reader.recv(1s)->command(), "fine");
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

}  // namespace
}  // namespace forklift
