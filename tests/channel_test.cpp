#include "forklift/channel.hpp"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <thread>

#include "support.hpp"

#include "alloc_counter.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using test::forkChild;
using test::waitChild;
using test::exitCodeOf;

Message sized(std::size_t bytes, int seq) {
  std::string s(bytes, '\0');
  for (std::size_t i = 0; i < bytes; ++i) s[i] = static_cast<char>('a' + (i + static_cast<std::size_t>(seq)) % 26);
  return Message("blob", {{"seq", seq}, {"data", s}});
}

void writeRaw(int fd, const std::string& bytes) {
  ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
}

std::string frameHeader(std::uint32_t len) {
  std::string h = {'F', 'K', 1, 0};
  for (int i = 0; i < 4; ++i) h += static_cast<char>((len >> (8 * i)) & 0xff);
  return h;
}

TEST(Channel, SendAndReceiveInOneProcess) {
  auto [a, b] = Channel::makePair();
  a.send(Message("ping", {{"parameter", "gotcha!"}}));
  b.send(Message("pong"));
  const Message m = b.recv();
  EXPECT_EQ(m.command(), "ping");
  EXPECT_EQ(m.get<std::string>("parameter"), "gotcha!");
  EXPECT_EQ(a.recv().command(), "pong");
  EXPECT_FALSE(a.tryRecv());
}

TEST(Channel, DescriptorsAreCloseOnExec) {
  auto [a, b] = Channel::makePair();
  EXPECT_TRUE(::fcntl(a.fd(), F_GETFD) & FD_CLOEXEC);
  EXPECT_TRUE(::fcntl(b.fd(), F_GETFD) & FD_CLOEXEC);
}

// Sizes 0 bytes of arguments, 100 KiB and 8 MiB across a real fork: the
// child echoes, the parent checks every byte and the order.
TEST(Channel, MessagesOfAnySizeArriveWholeAndInOrderAcrossFork) {
  auto [parent, child] = Channel::makePair();
  const pid_t pid = forkChild([&, &child = child, &parent = parent] {
    parent.close();
    for (;;) {
      auto m = child.recv(5000ms);
      if (!m) return 2;
      if (m->command() == "done") return 0;
      child.send(*m);
    }
  });
  child.close();
  const std::vector<std::size_t> sizes = {0, 100 << 10, 8 << 20, 1, 100 << 10, 0, 8 << 20};
  // Send everything from a thread while this thread reads, so 8 MiB in both
  // directions cannot deadlock on full socket buffers.
  std::thread writer([&, &parent = parent] {
    parent.send(Message("empty"));
    for (std::size_t i = 0; i < sizes.size(); ++i) parent.send(sized(sizes[i], static_cast<int>(i)));
  });
  const Message first = *parent.recv(5000ms);
  EXPECT_EQ(first.command(), "empty");
  EXPECT_TRUE(first.args().empty());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    auto m = parent.recv(5000ms);
    ASSERT_TRUE(m);
    EXPECT_EQ(*m, sized(sizes[i], static_cast<int>(i))) << "message " << i;
  }
  writer.join();
  parent.send(Message("done"));
  EXPECT_EQ(exitCodeOf(waitChild(pid, 5000ms)), 0);
}

TEST(Channel, OverLimitIsRefusedBeforeSendingAnything) {
  Limits l;
  l.maxBytes = 1000;
  auto [a, b] = Channel::makePair(l);
  try {
    a.send(sized(2000, 0));
    FAIL() << "no error";
  } catch (const LimitError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot send 'blob': message of"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("exceeds the limit of 1000 bytes"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(b.tryRecv());  // nothing was written
  a.send(Message("next"));
  EXPECT_EQ(b.recv().command(), "next");
}

TEST(Channel, MalformedFrameIsReportedAndTheNextMessageArrives) {
  auto [a, b] = Channel::makePair();
  writeRaw(a.fd(), frameHeader(4) + "\xc1\xc1\xc1\xc1");  // 0xc1 is never valid msgpack
  a.send(Message("good", {{"n", 1}}));
  EXPECT_THROW(b.recv(1000ms), DecodeError);
  auto m = b.recv(1000ms);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->get<int>("n"), 1);
}

TEST(Channel, GarbageBetweenFramesResynchronises) {
  auto [a, b] = Channel::makePair();
  writeRaw(a.fd(), "this is not a frame at all");
  a.send(Message("good"));
  try {
    (void)b.recv(1000ms);
    FAIL() << "no error";
  } catch (const DecodeError& e) {
    EXPECT_NE(std::string(e.what()).find("channel: out of sync, skipped"), std::string::npos) << e.what();
  }
  std::optional<Message> m;
  for (int i = 0; i < 3 && !m; ++i) {
    try {
      m = b.recv(1000ms);
    } catch (const DecodeError&) {
    }
  }
  ASSERT_TRUE(m);
  EXPECT_EQ(m->command(), "good");
}

TEST(Channel, OversizeIncomingFrameIsSkippedWithoutStoringIt) {
  Limits l;
  l.maxBytes = 1 << 10;
  auto [a, b] = Channel::makePair(l);
  std::thread writer([&, &a = a] {
    writeRaw(a.fd(), frameHeader(300000) + std::string(300000, 'z'));
    Limits big;
    Channel raw(::dup(a.fd()), big);
    raw.send(Message("after"));
  });
  try {
    (void)b.recv(2000ms);
    FAIL() << "no error";
  } catch (const LimitError& e) {
    EXPECT_EQ(std::string(e.what()),
              "channel: incoming message of 300000 bytes exceeds the limit of 1024 bytes; skipped");
  }
  auto m = b.recv(2000ms);
  writer.join();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->command(), "after");
}

TEST(Channel, PeerExitIsPeerClosedNotAHang) {
  auto [parent, child] = Channel::makePair();
  const pid_t pid = forkChild([&, &parent = parent] {
    parent.close();
    return 0;  // exits without sending: the parent must see EOF
  });
  child.close();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(parent.recv(10000ms), PeerClosed);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5000ms);
  EXPECT_THROW(parent.send(Message("anyone?")), PeerClosed);
  EXPECT_EQ(exitCodeOf(waitChild(pid, 5000ms)), 0);
}

TEST(Channel, RecvTimeoutReturnsNothing) {
  auto [a, b] = Channel::makePair();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(b.recv(50ms));
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(took, 45ms);
  EXPECT_LT(took, 2000ms);
}

TEST(Channel, NonBlockingModeWorks) {
  auto [a, b] = Channel::makePair();
  a.setNonBlocking(true);
  b.setNonBlocking(true);
  EXPECT_FALSE(b.tryRecv());
  EXPECT_FALSE(b.recv(20ms));
  a.send(Message("x", {{"n", 5}}));
  EXPECT_EQ(b.recv(1000ms)->get<int>("n"), 5);
  // A message bigger than the socket buffer still goes through whole in
  // non-blocking mode, with a reader on the other side.
  std::thread reader([&, &b = b] { EXPECT_EQ(b.recv(5000ms)->get<std::string>("data").size(), 4u << 20); });
  a.send(sized(4 << 20, 1), 5000ms);
  reader.join();
}

TEST(Channel, SendTimesOutWhenThePeerDoesNotRead) {
  auto [a, b] = Channel::makePair();
  const Message chunk = sized(64 << 10, 0);
  bool timedOut = false;
  for (int i = 0; i < 1000 && !timedOut; ++i) {
    try {
      a.send(chunk, 20ms);
    } catch (const TimeoutError& e) {
      timedOut = true;
      EXPECT_NE(std::string(e.what()).find("the peer is not reading"), std::string::npos);
    }
  }
  EXPECT_TRUE(timedOut);
}

TEST(Channel, OneFrameModeKeepsPollMeaningful) {
  auto [a, b] = Channel::makePair();
  b.setReadMode(ReadMode::OneFrame);
  a.send(Message("one"));
  a.send(Message("two"));
  EXPECT_EQ(b.recv().command(), "one");
  pollfd p{b.fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 1) << "the second message must still be in the socket";
  EXPECT_EQ(b.recv().command(), "two");
  EXPECT_EQ(::poll(&p, 1, 0), 0);
}

TEST(Channel, GreedyModeReportsBufferedFrames) {
  auto [a, b] = Channel::makePair();
  a.send(Message("one"));
  a.send(Message("two"));
  EXPECT_TRUE(b.tryRecv());
  EXPECT_TRUE(b.buffered());
  EXPECT_EQ(b.tryRecv()->command(), "two");
  EXPECT_FALSE(b.buffered());
}

// A signal without SA_RESTART interrupts recv and poll with EINTR; the
// channel retries and still delivers.
TEST(Channel, SurvivesEintr) {
  struct sigaction sa {};
  sa.sa_handler = [](int) {};
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART
  struct sigaction old {};
  ASSERT_EQ(::sigaction(SIGALRM, &sa, &old), 0);
  itimerval it{{0, 2000}, {0, 2000}};  // every 2 ms
  auto [parent, child] = Channel::makePair();
  const pid_t pid = forkChild([&, &child = child, &parent = parent] {
    parent.close();
    ::usleep(100000);
    child.send(sized(1 << 20, 7));
    return child.recv(5000ms) ? 0 : 3;
  });
  child.close();
  ASSERT_EQ(::setitimer(ITIMER_REAL, &it, nullptr), 0);
  auto m = parent.recv(5000ms);
  auto m2 = parent.recv(50ms);  // a timed wait interrupted many times still ends
  itimerval off{};
  ::setitimer(ITIMER_REAL, &off, nullptr);
  ::sigaction(SIGALRM, &old, nullptr);
  ASSERT_TRUE(m);
  EXPECT_EQ(*m, sized(1 << 20, 7));
  EXPECT_FALSE(m2);
  parent.send(Message("ok"));
  EXPECT_EQ(exitCodeOf(waitChild(pid, 5000ms)), 0);
}

TEST(Channel, SmallMessagesAllocateNothingOnTheChannelSideAfterWarmUp) {
  auto [a, b] = Channel::makePair();
  const Message m("ping", {{"parameter", "gotcha!"}, {"count", 3}});
  for (int i = 0; i < 10; ++i) {
    a.send(m);
    (void)b.recv();
  }
  Buffer frame;
  encode(m, frame);
  forklift::test::g_allocs = 0;
  forklift::test::g_counting = true;
  const Message standalone = decode(frame.data(), frame.size());
  forklift::test::g_counting = false;
  const long decodeAllocs = forklift::test::g_allocs.exchange(0);

  forklift::test::g_counting = true;
  for (int i = 0; i < 100; ++i) a.send(m);
  forklift::test::g_counting = false;
  EXPECT_EQ(forklift::test::g_allocs.exchange(0), 0) << "send allocated";

  forklift::test::g_counting = true;
  for (int i = 0; i < 100; ++i) (void)b.recv();
  forklift::test::g_counting = false;
  EXPECT_EQ(forklift::test::g_allocs.exchange(0), 100 * decodeAllocs) << "recv allocated beyond the decoded message";
  EXPECT_EQ(standalone, m);
}

}  // namespace
}  // namespace forklift
