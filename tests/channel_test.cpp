#include "forklift/channel.hpp"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
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
using test::contains;

Message sized(std::size_t bytes, int seq) {
  std::string s(bytes, '\0');
  for (std::size_t i = 0; i < bytes; ++i) s[i] = static_cast<char>('a' + (i + static_cast<std::size_t>(seq)) % 26);
  return Message("blob", {{"seq", seq}, {"data", s}});
}

void writeRaw(int fd, const std::string& bytes) {
  ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
}

std::string frameHeader(std::uint32_t len, char version = 2) {
  std::string h = {'F', 'K', version, 0};
  for (int i = 0; i < 4; ++i) h += static_cast<char>((len >> (8 * i)) & 0xff);
  return h;
}

// timeout.hpp: a Deadline from a timeout, and from a `now` already read.
TEST(Deadline, CountsFromNowOrFromTheMomentGiven) {
  const auto now = Deadline::Clock::now();
  const Deadline given(250ms, now);
  EXPECT_EQ(given.at(), now + 250ms);
  EXPECT_FALSE(given.forever());
  EXPECT_GT(given.pollMillis(), 0);
  EXPECT_LE(given.pollMillis(), 250);
  const Deadline past(100ms, now - 1s);
  EXPECT_TRUE(past.expired());
  EXPECT_EQ(past.pollMillis(), 0);
  EXPECT_EQ(past.remaining(), Deadline::Clock::duration::zero());
  for (const Deadline& f : {Deadline(kForever), Deadline(kForever, now)}) {
    EXPECT_TRUE(f.forever());
    EXPECT_FALSE(f.expired());
    EXPECT_EQ(f.pollMillis(), -1);
    EXPECT_EQ(f.remaining(), Deadline::Clock::duration::max());
  }
  const Deadline fresh(Timeout::zero());
  EXPECT_EQ(fresh.pollMillis(), 0);
}

// timeout.hpp, every value a Timeout takes: zero and negative do not
// wait, one tick waits one tick, the largest finite values are far in the
// future (they overflowed the clock's nanoseconds into "expired at once"),
// kForever has no bound.
TEST(Timeout, ScaledSaturatesAtForeverAndNeverOverflows) {
  using std::chrono::seconds;
  EXPECT_EQ(scaledTimeout(Timeout(100), 3, Timeout(5)), Timeout(305));
  EXPECT_EQ(scaledTimeout(Timeout(0), 9, Timeout(0)), Timeout(0));
  EXPECT_EQ(scaledTimeout(kForever, 1, Timeout(0)), kForever);
  EXPECT_EQ(scaledTimeout(Timeout(1), 1, kForever), kForever);
  const Timeout big(kForever.count() / 2);
  EXPECT_EQ(scaledTimeout(big, 2, seconds(5)), kForever);      // the product would pass kForever
  EXPECT_EQ(scaledTimeout(kForever - Timeout(1), 1, Timeout(2)), kForever);  // the sum would
  EXPECT_EQ(scaledTimeout(big, 1, Timeout(1)), big + Timeout(1));
  static_assert(scaledTimeout(Timeout(2), 2, Timeout(1)) == Timeout(5));
}

TEST(Deadline, EveryTimeoutFromNegativeToForever) {
  const auto now = Deadline::Clock::now();
  for (Timeout t : {Timeout::zero(), Timeout(-1), Timeout(-1000), Timeout::min(), Timeout::min() + 1ms}) {
    const Deadline d(t, now);
    EXPECT_TRUE(d.expired()) << t.count();
    EXPECT_FALSE(d.forever()) << t.count();
    EXPECT_EQ(d.pollMillis(), 0) << t.count();
    EXPECT_EQ(d.at(), now) << t.count();
  }
  const Deadline tick(1ms, now);
  EXPECT_EQ(tick.at(), now + 1ms);
  EXPECT_LE(tick.pollMillis(), 1);
  const auto farAway = now + std::chrono::hours(24 * 365 * 100);
  for (Timeout t : {kForever - 1ms, kForever - 1000ms, Timeout(kForever.count() / 2),
                    std::chrono::duration_cast<Timeout>(Deadline::Clock::duration::max()),
                    std::chrono::duration_cast<Timeout>(Deadline::Clock::duration::max()) - 1ms,
                    Timeout(std::chrono::hours(24 * 365 * 200))}) {
    for (const Deadline& d : {Deadline(t), Deadline(t, now)}) {
      EXPECT_FALSE(d.forever()) << t.count();
      EXPECT_FALSE(d.expired()) << t.count();
      EXPECT_GT(d.at(), farAway) << t.count();
      EXPECT_EQ(d.pollMillis(), 0x7fffffff) << t.count();
      EXPECT_GT(d.remaining(), std::chrono::hours(24 * 365 * 100)) << t.count();
    }
  }
  // A real wait with such a timeout waits (for a message that comes).
  auto [a, b] = Channel::makePair();
  a.send(Message("late"));
  const auto m = b.recv(kForever - 1ms);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->command(), "late");
  EXPECT_FALSE(b.recv(Timeout(-5)).has_value());
  EXPECT_FALSE(b.recv(Timeout::min()).has_value());
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
      auto m = child.recv(test::slow(5000ms));
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
  const Message first = *parent.recv(test::slow(5000ms));
  EXPECT_EQ(first.command(), "empty");
  EXPECT_TRUE(first.args().empty());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    auto m = parent.recv(test::slow(5000ms));
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
  EXPECT_TRUE(contains(test::thrown<DecodeError>([&, &b = b] { (void)b.recv(test::slow(1000ms)); }), "cannot decode message"));
  auto m = b.recv(test::slow(1000ms));
  ASSERT_TRUE(m);
  EXPECT_EQ(m->get<int>("n"), 1);
}

// A well-framed body refused for its arguments names the command and id, so
// the receiver can answer the call; the frame is consumed.
TEST(Channel, RefusedMessageCarriesItsCommandAndId) {
  auto [a, b] = Channel::makePair();
  Value tree = 1;
  for (int i = 0; i < 40; ++i) tree = List{tree};
  Message deep("ping", {{"tree", tree}});
  deep.setId(7);
  Limits lax;
  lax.maxDepth = 64;
  Buffer frame;
  Channel::encodeFrame(deep, frame, lax);  // a sender with larger limits
  writeRaw(a.fd(), std::string(frame.data(), frame.size()));
  a.send(Message("after"));
  try {
    (void)b.recv(test::slow(1000ms));
    FAIL() << "no error";
  } catch (const LimitError& e) {
    EXPECT_EQ(e.command(), "ping");
    EXPECT_EQ(e.id(), 7u);
    EXPECT_TRUE(contains(e.what(), "message 'ping': nests deeper than 32 levels"));
  }
  EXPECT_EQ(b.recv(test::slow(1000ms))->command(), "after");
}

TEST(Channel, SendRefusesTooDeepOrTooWideBeforeWritingAnything) {
  Limits l;
  l.maxElements = 1000;
  auto [a, b] = Channel::makePair(l);
  Value tree = 1;
  for (int i = 0; i < 40; ++i) tree = List{tree};
  try {
    a.send(Message("ping", {{"n", 1}, {"tree", tree}}));
    FAIL() << "no error";
  } catch (const LimitError& e) {
    EXPECT_EQ(std::string(e.what()), "cannot send 'ping': argument 'tree' nests deeper than 32 levels");
    EXPECT_EQ(e.command(), "ping");
  }
  EXPECT_EQ(test::thrown<LimitError>([&, &a = a] { a.send(Message("ping", {{"wide", List(2000, Value(1))}})); }),
            "cannot send 'ping': argument 'wide' has more than 1000 elements");
  EXPECT_EQ(a.unsentBytes(), 0u);
  EXPECT_FALSE(b.tryRecv());  // nothing was written
  a.send(Message("next"));
  EXPECT_EQ(b.recv(test::slow(1000ms))->command(), "next");
}

// Garbage where a header should be: the stream is corrupt for good, and
// the receiver says so at once and every time, without skipping ahead.
TEST(Channel, GarbageIsAFinalStreamCorruption) {
  auto [a, b] = Channel::makePair();
  writeRaw(a.fd(), "this is not a frame at all");
  a.send(Message("good"));
  EXPECT_EQ(test::thrown<StreamCorrupt>([&, &b = b] { (void)b.recv(test::slow(1000ms)); }),
            "channel: stream corrupt: bad magic bytes 74 68 69 where a frame header (46 4b 02) should start; a "
            "length-prefixed stream cannot be resynchronised, so this channel receives nothing more");
  EXPECT_TRUE(b.buffered());
  for (int i = 0; i < 3; ++i)
    EXPECT_TRUE(contains(test::thrown<StreamCorrupt>([&, &b = b] { (void)b.recv(test::slow(1000ms)); }), "bad magic bytes"));
  EXPECT_THROW((void)b.tryRecv(), DecodeError);  // StreamCorrupt is a DecodeError
}

TEST(Channel, FrameOfAnOlderVersionIsStreamCorrupt) {
  auto [a, b] = Channel::makePair();
  writeRaw(a.fd(), frameHeader(1, 1) + "\xc0");
  EXPECT_TRUE(contains(test::thrown<StreamCorrupt>([&, &b = b] { (void)b.recv(test::slow(1000ms)); }),
                       "bad magic bytes 46 4b 01 where a frame header (46 4b 02) should start (frame version 1; "
                       "this side speaks version 2)"));
}

// One 8-byte header declaring 4 GiB used to make the receiver skip the next
// 4 GiB, answering nothing. Now the lie ends the stream, at once.
TEST(Channel, HeaderDeclaringMoreThanTheLimitIsStreamCorruptAtOnce) {
  Limits l;
  l.maxBytes = 1 << 10;
  auto [a, b] = Channel::makePair(l);
  writeRaw(a.fd(), frameHeader(0xFFFFFFFFu));
  Channel sender(::dup(a.fd()), Limits{});
  sender.send(Message("after"));
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(test::thrown<StreamCorrupt>([&, &b = b] { (void)b.recv(test::slow(5000ms)); }),
            "channel: stream corrupt: a frame header declares a body of 4294967295 bytes, over the limit of 1024 "
            "bytes; a length-prefixed stream cannot be resynchronised, so this channel receives nothing more");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(1000ms));
  EXPECT_TRUE(b.buffered());
  EXPECT_THROW((void)b.recv(test::slow(5000ms)), StreamCorrupt);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(1000ms));
}

TEST(Channel, PeerExitIsPeerClosedNotAHang) {
  auto [parent, child] = Channel::makePair();
  const pid_t pid = forkChild([&, &parent = parent] {
    parent.close();
    return 0;  // exits without sending: the parent must see EOF
  });
  child.close();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(parent.recv(test::slow(10000ms)), PeerClosed);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(5000ms));
  EXPECT_THROW(parent.send(Message("anyone?")), PeerClosed);
  EXPECT_EQ(exitCodeOf(waitChild(pid, 5000ms)), 0);
}

TEST(Channel, RecvTimeoutReturnsNothing) {
  auto [a, b] = Channel::makePair();
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(b.recv(50ms));
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(took, 45ms);
  EXPECT_LT(took, test::slow(2000ms));
}

TEST(Channel, NonBlockingModeWorks) {
  auto [a, b] = Channel::makePair();
  a.setNonBlocking(true);
  b.setNonBlocking(true);
  EXPECT_FALSE(b.tryRecv());
  EXPECT_FALSE(b.recv(20ms));
  a.send(Message("x", {{"n", 5}}));
  EXPECT_EQ(b.recv(test::slow(1000ms))->get<int>("n"), 5);
  // A message bigger than the socket buffer still goes through whole in
  // non-blocking mode, with a reader on the other side.
  std::thread reader([&, &b = b] { EXPECT_EQ(b.recv(test::slow(5000ms))->get<std::string>("data").size(), 4u << 20); });
  a.send(sized(4 << 20, 1), test::slow(5000ms));
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

// A small send buffer, so a 256 KiB frame surely does not fit.
void shrinkSendBuffer(const Channel& c) {
  const int size = 32 << 10;
  ASSERT_EQ(::setsockopt(c.fd(), SOL_SOCKET, SO_SNDBUF, &size, sizeof size), 0);
}

// A send timeout that cut a frame half-way leaves the channel usable: the
// next send completes the cut frame first, and the peer gets both whole.
TEST(Channel, SendAfterACutFrameCompletesItFirst) {
  auto [a, b] = Channel::makePair();
  shrinkSendBuffer(a);
  const Message big = sized(256 << 10, 1);
  const std::string cut = test::thrown<TimeoutError>([&, &a = a] { a.send(big, 50ms); });
  EXPECT_TRUE(contains(cut, "channel: cannot send 'blob' within 50 ms: the peer is not reading; "));
  EXPECT_TRUE(contains(cut, "the message will still be completed by the next send"));
  const std::size_t left = a.unsentBytes();
  EXPECT_GT(left, 0u);
  EXPECT_LT(left, 256u << 10);

  std::vector<Message> got;
  std::thread reader([&, &b = b] {
    ::usleep(20000);  // the peer starts reading only now
    for (int i = 0; i < 2; ++i)
      if (auto m = b.recv(test::slow(5000ms))) got.push_back(std::move(*m));
  });
  const Message next = sized(1000, 2);
  EXPECT_NO_THROW(a.send(next, test::slow(5000ms)));
  EXPECT_EQ(a.unsentBytes(), 0u);
  reader.join();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], big);
  EXPECT_EQ(got[1], next);
}

// When the rest of the cut frame cannot be written in time, the next send
// times out without starting its own message; flush finishes the rest.
TEST(Channel, SendThatCannotFinishTheCutFrameSendsNothingOfItsOwn) {
  auto [a, b] = Channel::makePair();
  shrinkSendBuffer(a);
  const Message big = sized(256 << 10, 3);
  EXPECT_THROW(a.send(big, 30ms), TimeoutError);
  const std::size_t left = a.unsentBytes();
  ASSERT_GT(left, 0u);
  EXPECT_TRUE(contains(test::thrown<TimeoutError>([&, &a = a] { a.send(Message("small"), 30ms); }),
                       "channel: cannot send 'small' within 30 ms: the peer is not reading; " + std::to_string(left) +
                           " bytes of an earlier message are still unsent, and this message was not sent"));
  EXPECT_EQ(a.unsentBytes(), left);
  EXPECT_FALSE(a.flush(20ms));

  std::optional<Message> first, second;
  std::thread reader([&, &b = b] {
    first = b.recv(test::slow(5000ms));
    second = b.recv(test::slow(5000ms));
  });
  EXPECT_TRUE(a.flush(test::slow(5000ms)));
  EXPECT_EQ(a.unsentBytes(), 0u);
  a.send(Message("last"), test::slow(5000ms));
  reader.join();
  ASSERT_TRUE(first);
  EXPECT_EQ(*first, big);
  ASSERT_TRUE(second);
  EXPECT_EQ(second->command(), "last");  // "small" was never sent
}

// A death descriptor ends a wait on a peer whose socket someone else still
// holds open (no EOF comes), even on a blocking descriptor.
TEST(Channel, WatchedDeathEndsARecvWait) {
  auto [a, b] = Channel::makePair();
  const detail::UniqueFd death(::eventfd(0, EFD_CLOEXEC));
  ASSERT_TRUE(death.valid());
  b.watchPeer(death.get());
  std::thread killer([&] {
    ::usleep(100000);
    const std::uint64_t one = 1;
    EXPECT_EQ(::write(death.get(), &one, sizeof one), 8);
  });
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(test::thrown<PeerClosed>([&, &b = b] { (void)b.recv(test::slow(5000ms)); }), "channel: the peer process ended");
  const auto took = std::chrono::steady_clock::now() - t0;
  killer.join();
  EXPECT_GE(took, 90ms);
  EXPECT_LT(took, test::slow(1000ms));
  EXPECT_TRUE(a.valid());  // the peer's end stayed open all along
  b.watchPeer(-1);
  EXPECT_FALSE(b.recv(10ms));  // unwatched: a plain timeout again
}

TEST(Channel, WatchedDeathStillDeliversWhatThePeerLeft) {
  auto [a, b] = Channel::makePair();
  const detail::UniqueFd death(::eventfd(0, EFD_CLOEXEC));
  a.send(Message("one"));
  a.send(sized(100 << 10, 4));  // more than one read in OneFrame mode
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(death.get(), &one, sizeof one), 8);
  b.watchPeer(death.get());
  b.setReadMode(ReadMode::OneFrame);
  EXPECT_EQ(b.recv(test::slow(1000ms))->command(), "one");
  EXPECT_EQ(*b.recv(test::slow(1000ms)), sized(100 << 10, 4));
  EXPECT_THROW((void)b.recv(test::slow(5000ms)), PeerClosed);
}

TEST(Channel, WatchedDeathEndsASendWait) {
  auto [a, b] = Channel::makePair();
  shrinkSendBuffer(a);
  const detail::UniqueFd death(::eventfd(0, EFD_CLOEXEC));
  a.watchPeer(death.get());
  std::thread killer([&] {
    ::usleep(100000);
    const std::uint64_t one = 1;
    EXPECT_EQ(::write(death.get(), &one, sizeof one), 8);
  });
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(test::thrown<PeerClosed>([&, &a = a] { a.send(sized(1 << 20, 5), test::slow(5000ms)); }),
            "channel: the peer process ended");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(1000ms));
  killer.join();
}

// One thread sends while another receives on the same Channel; the other
// end echoes. 100k messages each way, every one in order.
TEST(Channel, OneSenderAndOneReceiverThreadShareAChannel) {
  constexpr int kCount = 100000;
  auto [a, b] = Channel::makePair();
  std::thread echo([&, &b = b] {
    for (int i = 0; i < kCount; ++i) {
      auto m = b.recv(test::slow(5000ms));
      if (!m) return;
      b.send(*m, test::slow(5000ms));
    }
  });
  std::thread sender([&, &a = a] {
    for (int i = 0; i < kCount; ++i) a.send(Message("n", {{"i", i}}), test::slow(5000ms));
  });
  int received = 0;
  for (; received < kCount; ++received) {
    auto m = a.recv(test::slow(5000ms));
    if (!m || m->get<int>("i") != received) break;
  }
  sender.join();
  echo.join();
  EXPECT_EQ(received, kCount);
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
    return child.recv(test::slow(5000ms)) ? 0 : 3;
  });
  child.close();
  ASSERT_EQ(::setitimer(ITIMER_REAL, &it, nullptr), 0);
  auto m = parent.recv(test::slow(5000ms));
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

// ---------------------------------------------------------------- descriptors

detail::UniqueFd counter(std::uint64_t value) {
  detail::UniqueFd fd(::eventfd(static_cast<unsigned>(value), EFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  return fd;
}

std::uint64_t counterValue(int fd) {
  std::uint64_t v = 0;
  EXPECT_EQ(::read(fd, &v, sizeof v), static_cast<ssize_t>(sizeof v));
  return v;
}

// Raw bytes with descriptors, as a peer that breaks the rules would send them.
void sendRawWithFds(int sock, const std::string& bytes, const std::vector<int>& fds) {
  msghdr msg{};
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  union {
    cmsghdr align;
    char bytes[CMSG_SPACE(sizeof(int) * 8)];
  } control{};
  msg.msg_control = control.bytes;
  msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  ASSERT_EQ(::sendmsg(sock, &msg, MSG_NOSIGNAL), static_cast<ssize_t>(bytes.size()));
}

std::string frameOf(const Message& m, char nfds = 0) {
  Buffer b;
  Channel::encodeFrame(m, b, Limits{});
  std::string f(b.data(), b.size());
  f[3] = nfds;
  return f;
}

// A pair with a different limit on each end.
std::pair<Channel, Channel> pairWith(const Limits& la, const Limits& lb) {
  int sv[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  return {Channel(sv[0], la), Channel(sv[1], lb)};
}

TEST(ChannelFds, ADescriptorTravelsWithItsMessageAndIsTheReceiversOwn) {
  const int before = test::openFdCount();
  {
    auto [a, b] = Channel::makePair();
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    detail::UniqueFd readEnd(p[0]);
    a.send(Message("use", {{"n", 1}, {"out", detail::UniqueFd(p[1])}}));  // the message closes ours
    Message m = b.recv();
    const Fd out = m.get<Fd>("out");
    ASSERT_TRUE(out.valid());
    EXPECT_TRUE(::fcntl(out.get(), F_GETFD) & FD_CLOEXEC);
    ASSERT_EQ(::write(out.get(), "hi", 2), 2);
    char got[2] = {};
    ASSERT_EQ(::read(readEnd.get(), got, 2), 2);
    EXPECT_EQ(std::string(got, 2), "hi");
    EXPECT_EQ(test::openFdCount(), before + 4);  // the pair, the read end, the received write end
    detail::UniqueFd mine = m.args()[1].second.takeFd();  // taken: the message no longer closes it
    m = Message();
    EXPECT_TRUE(mine.valid());
    EXPECT_EQ(::fcntl(mine.get(), F_GETFD) >= 0, true);
  }
  EXPECT_EQ(test::openFdCount(), before);
}

TEST(ChannelFds, AMessageDroppedUnreadClosesItsDescriptors) {
  const int before = test::openFdCount();
  {
    auto [a, b] = Channel::makePair();
    const Fd f(counter(1));
    for (int i = 0; i < 10; ++i) a.send(Message("use", {{"fds", List(3, Value(f))}}));
    for (int i = 0; i < 5; ++i) (void)b.recv();  // received and dropped
    EXPECT_EQ(test::openFdCount(), before + 3);
  }
  // The rest died in the socket or in the channel's batches.
  EXPECT_EQ(test::openFdCount(), before);
}

// Frames with and without descriptors, small and large, sent in bursts:
// every message gets exactly its own descriptors, in both read modes and
// whatever the reads return.
void burst(ReadMode mode) {
  const int before = test::openFdCount();
  {
    auto [a, b] = Channel::makePair();
    b.setReadMode(mode);
    constexpr int kMessages = 300;
    std::thread writer([&, &a = a] {
      for (int i = 0; i < kMessages; ++i) {
        Message m("m", {{"i", i}});
        if (i % 3 == 0) m.set("fd", counter(static_cast<std::uint64_t>(i) + 1));
        if (i % 6 == 0) m.set("more", List{Value(counter(10000 + static_cast<std::uint64_t>(i)))});
        if (i % 7 == 0) m.set("pad", std::string(static_cast<std::size_t>(i) * 997 % (200 << 10), 'x'));
        a.send(m, test::slow(5000ms));
      }
    });
    for (int i = 0; i < kMessages; ++i) {
      if (i % 50 == 0) ::usleep(5000);  // let a backlog build up
      auto m = b.recv(test::slow(5000ms));
      ASSERT_TRUE(m) << i;
      ASSERT_EQ(m->get<int>("i"), i);
      EXPECT_EQ(m->has("fd"), i % 3 == 0) << i;
      if (m->has("fd")) {
        EXPECT_EQ(counterValue(m->get<Fd>("fd").get()), static_cast<std::uint64_t>(i) + 1) << i;
      }
      if (m->has("more")) {
        EXPECT_EQ(counterValue(m->get<List>("more")[0].as<Fd>().get()), 10000 + static_cast<std::uint64_t>(i)) << i;
      }
    }
    writer.join();
    EXPECT_FALSE(b.tryRecv());
  }
  EXPECT_EQ(test::openFdCount(), before);
}

TEST(ChannelFds, BurstsMapEveryBatchToItsFrameInGreedyMode) { burst(ReadMode::Greedy); }
TEST(ChannelFds, BurstsMapEveryBatchToItsFrameInOneFrameMode) { burst(ReadMode::OneFrame); }

// A frame cut by a send timeout took its descriptors with its first byte;
// a message that was not started keeps its descriptors home.
TEST(ChannelFds, CutFramesCarryTheirDescriptorsOnce) {
  const int before = test::openFdCount();
  {
    auto [a, b] = Channel::makePair();
    shrinkSendBuffer(a);
    Message big = sized(256 << 10, 1);
    big.set("fd", counter(41));
    EXPECT_THROW(a.send(big, 30ms), TimeoutError);
    ASSERT_GT(a.unsentBytes(), 0u);
    const Message small("small", {{"fd", counter(42)}});
    EXPECT_TRUE(contains(test::thrown<TimeoutError>([&, &a = a] { a.send(small, 30ms); }),
                         "this message was not sent"));
    std::vector<Message> got;
    std::thread reader([&, &b = b] {
      for (int i = 0; i < 3; ++i)
        if (auto m = b.recv(test::slow(5000ms))) got.push_back(std::move(*m));
    });
    EXPECT_TRUE(a.flush(test::slow(5000ms)));
    a.send(small, test::slow(5000ms));  // now it goes, with its descriptor
    a.send(Message("last", {{"fd", counter(43)}}), test::slow(5000ms));
    reader.join();
    ASSERT_EQ(got.size(), 3u);
    EXPECT_EQ(got[0].command(), "blob");
    EXPECT_EQ(counterValue(got[0].get<Fd>("fd").get()), 41u);
    EXPECT_EQ(counterValue(got[1].get<Fd>("fd").get()), 42u);
    EXPECT_EQ(counterValue(got[2].get<Fd>("fd").get()), 43u);
  }
  EXPECT_EQ(test::openFdCount(), before);
}

TEST(ChannelFds, TooManyDescriptorsAreRefusedBeforeSendingAnything) {
  Limits l;
  l.maxFds = 2;
  auto [a, b] = Channel::makePair(l);
  const Fd f(counter(1));
  const int before = test::openFdCount();
  EXPECT_EQ(test::thrown<LimitError>([&, &a = a] { a.send(Message("use", {{"fds", List(3, Value(f))}})); }),
            "cannot send 'use': argument 'fds' carries more than 2 descriptors");
  EXPECT_EQ(test::thrown<TypeError>([&, &a = a] { a.send(Message("use", {{"fd", Fd()}})); }),
            "cannot send 'use': argument 'fd' is an empty descriptor (never set, or taken)");
  EXPECT_EQ(a.unsentBytes(), 0u);
  EXPECT_FALSE(b.tryRecv());
  EXPECT_EQ(test::openFdCount(), before);
  Buffer plain;
  EXPECT_THROW(Channel::encodeFrame(Message("use", {{"fd", f}}), plain, l), TypeError);
  a.send(Message("use", {{"fds", List(2, Value(f))}}));
  EXPECT_EQ(b.recv().get<List>("fds").size(), 2u);
}

// A sender with a larger limit: the kernel truncates the control message
// to this side's room and closes the rest; the one message is refused,
// naming its command and id, and the stream goes on.
TEST(ChannelFds, DescriptorsOverTheReceiversLimitRefuseTheOneMessage) {
  Limits lax, strict;
  lax.maxFds = 10;
  strict.maxFds = 2;
  const int before = test::openFdCount();
  {
    auto [a, b] = pairWith(lax, strict);
    const Fd f(counter(1));
    Message m("use", {{"fds", List(5, Value(f))}});
    m.setId(9);
    a.send(m);
    a.send(Message("after", {{"fd", f}}));
    try {
      (void)b.recv(test::slow(1000ms));
      ADD_FAILURE() << "no error";
    } catch (const LimitError& e) {
      EXPECT_EQ(std::string(e.what()),
                "cannot receive 'use': it carries 5 descriptors, over the limit of 2 (the message is dropped and its "
                "descriptors closed)");
      EXPECT_EQ(e.command(), "use");
      EXPECT_EQ(e.id(), 9u);
    }
    const auto after = b.recv(test::slow(1000ms));
    ASSERT_TRUE(after);
    EXPECT_TRUE(after->get<Fd>("fd").valid());
    EXPECT_EQ(test::openFdCount(), before + 4);  // the pair, f, the one received
  }
  EXPECT_EQ(test::openFdCount(), before);
}

// Descriptors that came with a frame declaring none: no frame can claim
// them, and guessing would hand them to the wrong message.
TEST(ChannelFds, AnUnclaimedBatchIsStreamCorruptAndClosed) {
  const int before = test::openFdCount();
  {
    auto [a, b] = Channel::makePair();
    detail::UniqueFd f = counter(1);
    sendRawWithFds(a.fd(), frameOf(Message("first")), {f.get(), f.get()});
    a.send(Message("second"));
    EXPECT_EQ(b.recv(test::slow(1000ms))->command(), "first");
    EXPECT_TRUE(contains(test::thrown<StreamCorrupt>([&, &b = b] { (void)b.recv(test::slow(1000ms)); }),
                         "channel: stream corrupt: 2 descriptors came with stream bytes that no frame declaring "
                         "descriptors started in"));
    EXPECT_EQ(test::openFdCount(), before + 3);  // the received two are closed
  }
  EXPECT_EQ(test::openFdCount(), before);
}

TEST(ChannelFds, AFrameWhoseDescriptorsDidNotComeIsStreamCorrupt) {
  auto [a, b] = Channel::makePair();
  writeRaw(a.fd(), frameOf(Message("use"), 1));
  EXPECT_TRUE(contains(test::thrown<StreamCorrupt>([&, &b = b] { (void)b.recv(test::slow(1000ms)); }),
                       "a frame declares 1 descriptors, but none came with its first byte"));
  auto [c, d] = Channel::makePair();
  writeRaw(c.fd(), frameOf(Message("use"), static_cast<char>(254)));
  EXPECT_TRUE(contains(test::thrown<StreamCorrupt>([&, &d = d] { (void)d.recv(test::slow(1000ms)); }),
                       "a frame header declares 254 descriptors, more than a message can carry (253)"));
}

TEST(ChannelFds, AFrameWithMoreDescriptorsThanItDeclaresIsRefused) {
  auto [a, b] = Channel::makePair();
  detail::UniqueFd f = counter(1);
  Message m("use");
  m.setId(3);
  sendRawWithFds(a.fd(), frameOf(m, 1), {f.get(), f.get()});
  a.send(Message("after"));
  try {
    (void)b.recv(test::slow(1000ms));
    ADD_FAILURE() << "no error";
  } catch (const DecodeError& e) {
    EXPECT_EQ(std::string(e.what()), "cannot receive 'use': its frame declares 1 descriptors but 2 came with it (the "
                                     "message is dropped and its descriptors closed)");
    EXPECT_EQ(e.id(), 3u);
  }
  EXPECT_EQ(b.recv(test::slow(1000ms))->command(), "after");
}

// A closed channel closes the descriptors of a frame it had not finished.
TEST(ChannelFds, ClosingAChannelClosesDescriptorsOfAnUnfinishedFrame) {
  const int before = test::openFdCount();
  {
    auto [a, b] = Channel::makePair();
    detail::UniqueFd f = counter(1);
    const std::string frame = frameOf(Message("use", {{"x", std::string(100, 'x')}}), 1);
    sendRawWithFds(a.fd(), frame.substr(0, 20), {f.get()});
    EXPECT_FALSE(b.recv(20ms));
    EXPECT_EQ(test::openFdCount(), before + 4);
  }
  EXPECT_EQ(test::openFdCount(), before);
}

// Across a fork: the child maps 200 memfd arrays it is sent, sums them,
// answers, and leaves with as many descriptors as it had.
TEST(ChannelFds, ArraysTravelAcrossForkAndLeaveNoDescriptorBehind) {
  auto [parent, child] = Channel::makePair();
  const pid_t pid = forkChild([&, &child = child, &parent = parent] {
    parent.close();
    const int start = test::openFdCount();
    for (;;) {
      auto m = child.recv(test::slow(5000ms));
      if (!m) return 2;
      if (m->command() == "done") return test::openFdCount() == start ? 0 : 3;
      const Fd fd = m->get<Fd>("array");
      struct stat st {};
      if (::fstat(fd.get(), &st) != 0) return 4;
      const auto n = static_cast<std::size_t>(st.st_size) / sizeof(double);
      void* p = ::mmap(nullptr, static_cast<std::size_t>(st.st_size), PROT_READ, MAP_SHARED, fd.get(), 0);
      if (p == MAP_FAILED) return 5;
      double sum = 0;
      for (std::size_t i = 0; i < n; ++i) sum += static_cast<const double*>(p)[i];
      ::munmap(p, static_cast<std::size_t>(st.st_size));
      child.send(Message("sum", {{"sum", sum}}));
    }
  });
  child.close();
  const int start = test::openFdCount();
  for (int i = 0; i < 200; ++i) {
    detail::UniqueFd mem(::memfd_create("array", MFD_CLOEXEC));
    ASSERT_TRUE(mem.valid());
    std::vector<double> data(static_cast<std::size_t>(i) + 1, 0.5);
    ASSERT_EQ(::write(mem.get(), data.data(), data.size() * sizeof(double)),
              static_cast<ssize_t>(data.size() * sizeof(double)));
    parent.send(Message("array", {{"array", std::move(mem)}}), test::slow(5000ms));
    auto m = parent.recv(test::slow(5000ms));
    ASSERT_TRUE(m);
    EXPECT_EQ(m->get<double>("sum"), 0.5 * (i + 1));
  }
  EXPECT_EQ(test::openFdCount(), start);
  parent.send(Message("done"));
  EXPECT_EQ(exitCodeOf(waitChild(pid, 5000ms)), 0);
}

}  // namespace
}  // namespace forklift
