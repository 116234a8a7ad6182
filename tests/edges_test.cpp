// The API's edges, attacked: a peer that is stopped (SIGSTOP), slow, gone,
// that closed its channel and lives on, or that hands over a descriptor that
// is not what it claims; late replies; timeouts at every value from
// negative to kForever; a start that runs out of descriptors; an unknown
// value of forklift's environment variables; handlers that are const
// member functions; the kind of a failed call.
//
// Time bounds: each wait below is given a timeout T, and the test checks
// that it returned within T plus a margin well under the fixed bounds the
// library used to add of its own (1 s, 2 s): a slow machine makes the
// waits no shorter, so the margins are generous and never tight.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <set>
#include <string>
#include <thread>

#include "forklift/fork_server.hpp"
#include "forklift/manager.hpp"
#include "forklift/pool.hpp"
#include "forklift/process.hpp"
#include "forklift/ring_buffer.hpp"
#include "forklift/shm_array.hpp"
#include "posix.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::contains;

// The bound on what a wait may take past its own timeout (added to the
// timeout under test): generous, and still well below the fixed bounds a
// wait must not add, at FORKLIFT_TEST_SLOWDOWN=1.
const std::chrono::milliseconds kMargin = test::slow(600ms);

class Peer : public MessageProcess {
 public:
  explicit Peer(ProcessOptions o = {}) : MessageProcess("peer", std::move(o)) {
    command("echo", &Peer::c__echo, {"x"});
    command("slow", &Peer::c__slow, {"x", "ms"});
    command("hangUp", &Peer::c__hangUp);
    command("twice", &Peer::c__twice, {"x"});  // const
    command("constant", &Peer::c__constant);   // const, no parameter
    command("boom", &Peer::c__boom);
    command("after", &Peer::c__after, {"ms"});
    command("every", &Peer::c__every, {"ms"});
    command("burst", &Peer::c__burst, {"n", "bytes"});
    command("size", &Peer::c__size, {"s"});  // const
  }
  ~Peer() override { stop(test::slow(2s)); }

 private:
  std::int64_t c__echo(std::int64_t x) { return x; }
  std::int64_t c__slow(std::int64_t x, int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return x;
  }
  // Ends both channels for the frontend (shutdown of every socket it
  // holds) and lives on, stuck in this handler: what a peer that closed
  // its descriptors, or a hostile one, does.
  void c__hangUp() {
    for (int fd = 3; fd < 1024; ++fd) {
      int type = 0;
      socklen_t len = sizeof type;
      if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0) ::shutdown(fd, SHUT_RDWR);
    }
    for (;;) ::pause();
  }
  std::int64_t c__twice(std::int64_t x) const { return 2 * x; }
  std::string c__constant() const { return "same"; }
  void c__boom() { throw std::runtime_error("boom"); }
  void c__after(std::int64_t ms, Reply reply) {
    auto r = std::make_shared<Reply>(std::move(reply));
    after__(Timeout(ms), [r] { r->resolve(Value("fired")); });
  }
  void c__every(std::int64_t ms) { cancel__(every__(Timeout(ms), [] {})); }
  std::int64_t c__size(std::string s) const { return static_cast<std::int64_t>(s.size()); }
  std::int64_t c__burst(int n, int bytes) {
    for (int i = 0; i < n; ++i) sendOut__(Message("part", {{"i", i}, {"data", std::string(bytes, 'x')}}));
    return n;
  }
};

template <class F>
Clock::duration timed(F&& f) {
  const auto t0 = Clock::now();
  f();
  return Clock::now() - t0;
}

// ---- a peer that closed its channel and lives on -------------------------

// The end of the channel while the backend still runs: the call, and then
// recv, end at their own timeouts, not a second later (each waited a fixed
// 1 s for the status of a backend that had not ended).
TEST(Edges, ABackendThatClosedItsChannelAndLivesOnEndsEachWaitAtItsTimeout) {
  Peer p;
  p.start();
  std::string e;
  const auto callTook = timed([&] { e = test::thrown<ProcessDied>([&] { p.call("hangUp", {}, 200ms); }); });
  EXPECT_LT(callTook, 200ms + kMargin) << e;
  EXPECT_TRUE(contains(e, "its channel ended while it still ran")) << e;
  EXPECT_TRUE(p.isAlive());
  const auto recvTook = timed([&] { e = test::thrown<ProcessDied>([&] { p.recv(100ms); }); });
  EXPECT_LT(recvTook, 100ms + kMargin) << e;
  EXPECT_TRUE(contains(e, "still ran")) << e;
  // A zero timeout waits for nothing at all.
  const auto zeroTook = timed([&] { test::thrown<ProcessDied>([&] { p.recv(Timeout::zero()); }); });
  EXPECT_LT(zeroTook, kMargin);
  const ExitStatus s = p.stop(50ms);  // the ladder: SIGTERM ends it
  EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
}

// ---- a stopped peer (SIGSTOP) ---------------------------------------------

TEST(Edges, AStoppedBackendMakesEveryWaitEndAtItsTimeout) {
  Peer p;
  p.start();
  ASSERT_EQ(p.call("echo", {{"x", 1}}, test::slow(5s)).as<std::int64_t>(), 1);
  ASSERT_EQ(::kill(p.pid(), SIGSTOP), 0);
  for (Timeout t : {Timeout::zero(), Timeout(-5), 1ms, 150ms}) {
    SCOPED_TRACE(t.count());
    const auto took = timed([&] { EXPECT_THROW(p.call("echo", {{"x", 2}}, t), TimeoutError); });
    EXPECT_LT(took, std::max<Clock::duration>(t, 0ms) + kMargin);
    auto f = p.callAsync("echo", {{"x", 3}}, t);
    const auto waited = timed([&] { EXPECT_FALSE(f.wait(t) && f.result().ok()); });
    EXPECT_LT(waited, std::max<Clock::duration>(t, 0ms) + kMargin);
    std::optional<Message> m;
    const auto recvTook = timed([&] { m = p.recv(t); });
    EXPECT_FALSE(m.has_value());
    EXPECT_LT(recvTook, std::max<Clock::duration>(t, 0ms) + kMargin);
  }
  // stop(): the grace, then SIGTERM (fatal even to a stopped process
  // that does not catch it), 500 ms, SIGKILL.
  const auto stopTook = timed([&] {
    const ExitStatus s = p.stop(100ms);
    EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
    EXPECT_TRUE(s.signal == SIGTERM || s.signal == SIGKILL) << s.describe();
  });
  EXPECT_LT(stopTook, 100ms + 500ms + kMargin);
}

// send() to a stopped backend: once its queue (or socket) is full, each
// send ends at ProcessOptions::sendTimeout, negative and zero included.
TEST(Edges, SendsToAStoppedBackendEndAtTheSendTimeout) {
  for (Timeout t : {Timeout(-1), Timeout::zero(), Timeout(100)}) {
    SCOPED_TRACE(t.count());
    ProcessOptions o;
    o.sendTimeout = t;
    Peer p(o);
    p.start();
    ASSERT_EQ(::kill(p.pid(), SIGSTOP), 0);
    const std::string blob(64 << 10, 'z');
    bool refused = false;
    for (int i = 0; i < 1000 && !refused; ++i) {
      const auto took = timed([&] {
        try {
          p.send("size", {{"s", blob}});
        } catch (const TimeoutError&) {
          refused = true;
        }
      });
      EXPECT_LT(took, std::max<Clock::duration>(t, 0ms) + kMargin) << i;
    }
    EXPECT_TRUE(refused);
    const ExitStatus s = p.stop(Timeout::zero());
    EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
  }
}

// ---- a stopped fork server ----------------------------------------------------

// A served backend's status comes through the fork server. With the
// server stopped, a call that sees the backend die still ends at its own
// timeout (it waited 5 s for the relay), and a start through the server
// fails at its startTimeout (it waited 10 s for the server's answer).
TEST(Edges, AStoppedForkServerHoldsNoWaitPastItsTimeout) {
  Peer p;
  ProcessOptions o;
  o.startTimeout = 300ms;
  Peer late(o);
  std::optional<ForkServer> server(std::in_place);
  const pid_t serverPid = ForkServer::pid();
  ASSERT_GT(serverPid, 0);
  p.start();
  ASSERT_EQ(p.call("echo", {{"x", 1}}, test::slow(5s)).as<std::int64_t>(), 1);
  ASSERT_EQ(::kill(serverPid, SIGSTOP), 0);
  ::kill(p.pid(), SIGKILL);
  const auto callTook = timed([&] { EXPECT_THROW(p.call("echo", {{"x", 2}}, 200ms), ProcessDied); });
  EXPECT_LT(callTook, 200ms + kMargin);
  std::string e;
  const auto startTook = timed([&] { e = test::thrown<TimeoutError>([&] { late.start(); }); });
  EXPECT_LT(startTook, 300ms + kMargin);
  EXPECT_TRUE(contains(e, "did not answer")) << e;
  ASSERT_EQ(::kill(serverPid, SIGCONT), 0);
  const ExitStatus s = p.stop(test::slow(2s));  // now relayed
  EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
  server.reset();
}

// ---- a peer that is gone ---------------------------------------------------

TEST(Edges, ABackendThatIsGoneEndsEveryWaitAtOnceWhateverItsTimeout) {
  for (Timeout t : {Timeout::zero(), 1ms, Timeout(5s), kForever - 1ms, kForever}) {
    SCOPED_TRACE(t.count());
    Peer p;
    p.start();
    ::kill(p.pid(), SIGKILL);
    ASSERT_TRUE(test::eventually([&] { return !p.isAlive(); }, 10s));
    const auto took = timed([&] {
      EXPECT_TRUE(contains(test::thrown<ProcessDied>([&] { p.call("echo", {{"x", 1}}, t); }), "SIGKILL"));
      EXPECT_THROW(p.recv(t), ProcessDied);
    });
    EXPECT_LT(took, kMargin);
  }
}

// ---- late replies -----------------------------------------------------------

// A reply that comes after its call timed out goes to no one: not to the
// next call, nor to a call waiting at the same time, nor to a future.
TEST(Edges, ALateReplyIsNeverDeliveredToALaterCall) {
  Peer p;
  p.start();
  for (int round = 0; round < 3; ++round) {
    EXPECT_THROW(p.call("slow", {{"x", 100 + round}, {"ms", 150}}, 20ms), TimeoutError);
    auto f = p.callAsync("slow", {{"x", 200 + round}, {"ms", 100}}, 10ms);
    EXPECT_EQ(f.result().kind(), CallResult::Kind::Timeout);
    // Sent while the late replies are still to come: each gets its own.
    auto g = p.callAsync("echo", {{"x", 300 + round}}, test::slow(5s));
    EXPECT_EQ(p.call("echo", {{"x", round}}, test::slow(5s)).as<std::int64_t>(), round);
    EXPECT_EQ(g.get().as<std::int64_t>(), 300 + round);
  }
  // Once the late replies came (and were dropped), calls still get theirs.
  std::this_thread::sleep_for(test::slow(300ms));
  EXPECT_EQ(p.call("echo", {{"x", 7}}, test::slow(5s)).as<std::int64_t>(), 7);
  EXPECT_FALSE(p.tryRecv().has_value());
}

// ---- a descriptor that is not what it claims --------------------------------

// An array's descriptor whose fd is a pipe, a socket, a regular file (no
// seals), or an unsealed memfd: a clear ShmFormatError at once, no hang, no
// mapping of something that could shrink under us.
TEST(Edges, AnArrayDescriptorWhoseDescriptorIsNotASealedMemfdIsRefusedAtOnce) {
  auto a = ShmArray<double>::create("edges", 4, 4);
  const Value good = a.describe();
  int pipeFds[2];
  ASSERT_EQ(::pipe2(pipeFds, O_CLOEXEC), 0);
  int sockFds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sockFds), 0);
  test::TempDir dir;
  const std::string file = (dir.path() / "plain").string();
  const int plain = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(plain, 0);
  ASSERT_EQ(::ftruncate(plain, 1 << 16), 0);
  const int unsealed = ::memfd_create("unsealed", MFD_CLOEXEC);
  ASSERT_GE(unsealed, 0);
  ASSERT_EQ(::ftruncate(unsealed, 1 << 16), 0);
  for (const auto& [what, fd] : {std::pair{"pipe", pipeFds[0]}, std::pair{"fifo writer", pipeFds[1]},
                                 std::pair{"socket", sockFds[0]}, std::pair{"regular file", plain},
                                 std::pair{"unsealed memfd", unsealed}}) {
    SCOPED_TRACE(what);
    Map m = *good.getIf<Map>();
    for (auto& [k, v] : m)
      if (k == "fd") v = Fd::dup(fd);
    const auto took = timed([&] { EXPECT_THROW(ShmArray<double>::open(Value(m)), ShmFormatError); });
    EXPECT_LT(took, kMargin);
  }
  for (int fd : {pipeFds[0], pipeFds[1], sockFds[0], sockFds[1], plain, unsealed}) ::close(fd);
}

// lib/posix.hpp: what a doorbell handed over by a peer must be.
TEST(Edges, OnlyAnEventfdPassesForADoorbell) {
  const int bell = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  int pipeFds[2];
  ASSERT_EQ(::pipe2(pipeFds, O_CLOEXEC), 0);
  int sockFds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sockFds), 0);
  const int mem = ::memfd_create("not-a-bell", MFD_CLOEXEC);
  EXPECT_TRUE(detail::isEventfd(bell));
  for (int fd : {pipeFds[0], pipeFds[1], sockFds[0], mem, -1, 100000}) EXPECT_FALSE(detail::isEventfd(fd)) << fd;
  for (int fd : {bell, pipeFds[0], pipeFds[1], sockFds[0], sockFds[1], mem}) ::close(fd);
}

// forklift-ps opens what other processes hold and name. A mapped segment
// of /dev/shm whose name another process then turned into a FIFO (the
// directory is everyone's) blocked its open for good: it opens nothing
// that way, and lists the process in time.
TEST(Edges, ForkliftPsDoesNotHangOnAFifoWhereASegmentWas) {
  std::string tool;
  if (const char* env = std::getenv("FORKLIFT_PS_TOOL")) {
    tool = env;
  } else {
    char self[4096];
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
      const std::string exe(self, static_cast<std::size_t>(n));
      tool = exe.substr(0, exe.rfind('/')) + "/../tools/forklift-ps";
    }
  }
  if (::access(tool.c_str(), X_OK) != 0) GTEST_SKIP() << "forklift-ps not found (set FORKLIFT_PS_TOOL)";
  const std::string path = "/dev/shm/fk.edges-fifo." + std::to_string(::getpid());
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 4096), 0);
  void* map = ::mmap(nullptr, 4096, PROT_READ, MAP_SHARED, fd, 0);
  ASSERT_NE(map, MAP_FAILED);
  ::close(fd);
  ::unlink(path.c_str());
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  const pid_t pid = test::forkChild([&] {
    const int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, 1);
    ::execl(tool.c_str(), tool.c_str(), static_cast<char*>(nullptr));
    return 127;
  });
  const auto status = test::waitChild(pid, 10s);  // killed when it hangs
  ::unlink(path.c_str());
  ::munmap(map, 4096);
  EXPECT_EQ(test::exitCodeOf(status), 0) << "forklift-ps did not end within 10 s";
}

// ---- out of descriptors -----------------------------------------------------

// Whichever descriptor of a start is the one too many (a channel's
// socketpair, a queue's doorbell or epoll set, the stop bell, the pidfd),
// the error is one text: the backend, what this process holds, its limit,
// and the two remedies. In a child, whose limit the test lowers to every
// value in a range, so that each start runs out at another place.
// The lowest RLIMIT_NOFILE under which exactly `room` descriptor numbers
// are free (the kernel gives the lowest free number below the limit).
int limitLeaving(int room) {
  std::set<int> listed;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) listed.insert(std::stoi(e.path().filename()));
  int limit = 0;
  for (int free = 0; free < room; ++limit)
    if (listed.count(limit) == 0 || ::fcntl(limit, F_GETFD) < 0) ++free;  // the listing's own descriptor is closed
  return limit;
}

TEST(Edges, RunningOutOfDescriptorsIsOneMessageWhereverItHappens) {
  if (std::getenv("FORKLIFT_TRANSPORT")) GTEST_SKIP() << "FORKLIFT_TRANSPORT overrides the transport of each case";
  for (Transport transport : {Transport::SharedMemory, Transport::Socket}) {
    const pid_t pid = test::forkChild([transport] {
      const int base = test::openFdCount();
      std::set<std::string> texts;
      int failed = 0;
      for (int extra = 0; extra < 16; ++extra) {
        ProcessOptions o;
        o.transport = transport;
        Peer p(o);
        std::string error;
        {
          test::ScopedFdLimit limit(base + extra);
          if (!limit.ok()) return 10;
          try {
            p.start();
          } catch (const SystemError& e) {
            error = e.what();
            if (e.code().value() != EMFILE) {
              std::fprintf(stderr, "not EMFILE: %s\n", error.c_str());
              return 11;
            }
          }
        }
        if (error.empty()) break;  // enough descriptors from here on
        ++failed;
        const std::string expect = "peer: cannot start the backend: out of file descriptors (this process holds ";
        const std::string limit = ", its limit RLIMIT_NOFILE is " + std::to_string(base + extra) + "; ";
        if (!contains(error, expect) || !contains(error, limit) || !contains(error, "ulimit -n") ||
            !contains(error, "Transport::Socket") || !contains(error, "FORKLIFT_TRANSPORT=socket") ||
            !contains(error, "Too many open files")) {
          std::fprintf(stderr, "the error: %s\n", error.c_str());
          return 12;
        }
        // One text: only the two numbers differ from one place to another.
        std::string shape;
        for (char c : error)
          if (!(c >= '0' && c <= '9')) shape += c;
          else if (shape.empty() || shape.back() != '#') shape += '#';
        texts.insert(shape);
      }
      if (failed < 3) return 13;  // it ran out at several places
      // What the text says a start takes at once (17, over the socket 9)
      // is what it takes: one descriptor less is too few. Counted as free
      // descriptor numbers below the limit (the limit bounds numbers, and a
      // runner may leave a gap or a high descriptor open).
      const int peak = transport == Transport::Socket ? 9 : 17;
      for (int room : {peak - 1, peak}) {
        ProcessOptions o;
        o.transport = transport;
        Peer p(o);
        bool started = true;
        {
          test::ScopedFdLimit limit(limitLeaving(room));
          try {
            p.start();
          } catch (const SystemError&) {
            started = false;
          }
        }
        if (started != (room == peak)) {
          std::fprintf(stderr, "with room for %d descriptors the start %s\n", room, started ? "worked" : "failed");
          return 15;
        }
      }
      if (texts.size() != 1) {
        for (const auto& t : texts) std::fprintf(stderr, "text: %s\n", t.c_str());
        return 14;
      }
      return 0;
    });
    EXPECT_EQ(test::exitCodeOf(test::waitChild(pid, 60s)), 0) << (transport == Transport::Socket ? "socket" : "shm");
  }
}

// ---- environment variables ---------------------------------------------------

TEST(Edges, AnUnknownValueOfAnEnvironmentVariableIsAnErrorNamingIt) {
  const pid_t pid = test::forkChild([] {
    ::setenv("FORKLIFT_TRANSPORT", "SOCKET", 1);
    std::string e;
    {
      Peer p;
      try {
        p.start();
        return 20;
      } catch (const Error& err) {
        e = err.what();
      }
    }
    if (!contains(e, "FORKLIFT_TRANSPORT='SOCKET'") || !contains(e, "shm") || !contains(e, "socket")) {
      std::fprintf(stderr, "%s\n", e.c_str());
      return 21;
    }
    ::setenv("FORKLIFT_TRANSPORT", "socket", 1);
    ::setenv("FORKLIFT_IN_PROCESS", "maybe", 1);
    {
      Peer p;
      try {
        p.start();
        return 22;
      } catch (const Error& err) {
        e = err.what();
      }
    }
    if (!contains(e, "FORKLIFT_IN_PROCESS='maybe'") || !contains(e, "true")) {
      std::fprintf(stderr, "%s\n", e.c_str());
      return 23;
    }
    // Known values (and empty, which is unset) work.
    for (const char* v : {"0", "", "off"}) {
      ::setenv("FORKLIFT_IN_PROCESS", v, 1);
      Peer p;
      p.start();
      if (p.call("echo", {{"x", 5}}, test::slow(5s)).as<std::int64_t>() != 5) return 24;
    }
    return 0;
  });
  EXPECT_EQ(test::exitCodeOf(test::waitChild(pid, 30s)), 0);
}

// ---- handlers and results -----------------------------------------------------

TEST(Edges, ConstHandlersAndTheKindOfEveryResult) {
  Peer p;
  p.start();
  EXPECT_EQ(p.call("twice", {{"x", 21}}, test::slow(5s)).as<std::int64_t>(), 42);
  EXPECT_EQ(p.call("constant", {}, test::slow(5s)).as<std::string>(), "same");
  auto ok = p.callAsync("echo", {{"x", 1}}, test::slow(5s));
  EXPECT_EQ(ok.result().kind(), CallResult::Kind::Ok);
  auto remote = p.callAsync("boom", {}, test::slow(5s));
  EXPECT_EQ(remote.result().kind(), CallResult::Kind::Remote);
  auto unknown = p.callAsync("no such command", {}, test::slow(5s));
  EXPECT_EQ(unknown.result().kind(), CallResult::Kind::Remote);
  auto late = p.callAsync("slow", {{"x", 1}, {"ms", 200}}, 10ms);
  EXPECT_EQ(late.result().kind(), CallResult::Kind::Timeout);
  EXPECT_STREQ(kindName(late.result().kind()), "timeout");
  auto dies = p.callAsync("slow", {{"x", 1}, {"ms", 5000}}, test::slow(10s));
  ::kill(p.pid(), SIGKILL);
  const CallResult r = dies.result();
  EXPECT_EQ(r.kind(), CallResult::Kind::ProcessDied) << r.what();
  EXPECT_STREQ(kindName(r.kind()), "process died");
  EXPECT_EQ(CallResult().kind(), CallResult::Kind::Ok);
}

// ---- every size value ------------------------------------------------------------

// outQueueBytes 0 and 1 (every message larger than the bound: each goes
// once the queue is empty; they waited outWait for room that cannot be and
// threw), and the largest; queueBytes from 0 to the largest it takes, and
// past it a LimitError; spin from negative to the largest.
TEST(Edges, EverySizeAndSpinValue) {
  for (std::size_t outQueue : {std::size_t{0}, std::size_t{1}, std::numeric_limits<std::size_t>::max()}) {
    SCOPED_TRACE(outQueue);
    ProcessOptions o;
    o.outQueueBytes = outQueue;
    o.outWait = test::slow(10s);
    Peer p(o);
    p.start();
    auto f = p.callAsync("burst", {{"n", 40}, {"bytes", 100000}}, test::slow(30s));
    int got = 0;
    while (got < 40) {
      std::this_thread::sleep_for(2ms);  // a frontend slower than the backend
      if (auto m = p.recv(test::slow(10s))) ++got;
      else break;
    }
    EXPECT_EQ(got, 40);
    EXPECT_EQ(f.get().as<std::int64_t>(), 40);
  }
  // (The largest queue, kMaxQueueBytes, maps 3 GiB: not on a test machine.)
  for (std::size_t q : {std::size_t{0}, std::size_t{1}, std::size_t{4097}, std::size_t{16} << 20}) {
    SCOPED_TRACE(q);
    ProcessOptions o;
    o.queueBytes = q;
    Peer p(o);
    p.start();
    EXPECT_EQ(p.call("echo", {{"x", 9}}, test::slow(5s)).as<std::int64_t>(), 9);
    EXPECT_EQ(p.call("size", {{"s", std::string(20000, 'y')}}, test::slow(5s)).as<std::int64_t>(), 20000);
  }
  for (std::size_t q : {ProcessOptions::kMaxQueueBytes + 1, std::numeric_limits<std::size_t>::max()}) {
    ProcessOptions o;
    o.queueBytes = q;
    o.transport = Transport::SharedMemory;
    Peer p(o);
    if (test::overSharedMemory()) {
      EXPECT_TRUE(contains(test::thrown<LimitError>([&] { p.start(); }), "queueBytes")) << q;
    }
  }
  for (auto spin : {std::chrono::microseconds(-1), std::chrono::microseconds::min(), std::chrono::microseconds(1),
                    std::chrono::microseconds::max()}) {
    SCOPED_TRACE(spin.count());
    ProcessOptions o;
    o.spin = spin;
    Peer p(o);
    p.start();
    EXPECT_EQ(p.call("echo", {{"x", 3}}, test::slow(5s)).as<std::int64_t>(), 3);
  }
}

// ---- every timeout value -------------------------------------------------------

// Timeouts from negative to kForever on every frontend wait: negative and
// zero do not wait, the largest finite ones wait like kForever (they
// overflowed into "expired at once"), and the reply that comes is taken.
TEST(Edges, EveryTimeoutValueOnCallsRecvAndStop) {
  ProcessOptions o;
  o.callTimeout = kForever - 1ms;
  o.sendTimeout = kForever - 1ms;
  o.startTimeout = kForever - 1ms;
  o.stopTimeout = kForever - 1ms;
  Peer p(o);
  p.start();
  EXPECT_EQ(p.call("echo", {{"x", 1}}).as<std::int64_t>(), 1);
  p.send("echo", {{"x", 1}});
  // One tick: a reply within it, or TimeoutError; never a hang.
  try {
    EXPECT_EQ(p.call("echo", {{"x", 4}}, 1ms).as<std::int64_t>(), 4);
  } catch (const TimeoutError&) {
  }
  for (Timeout t : {Timeout(test::slow(10s)), kForever / 2, kForever - 1ms, kForever}) {
    SCOPED_TRACE(t.count());
    EXPECT_EQ(p.call("slow", {{"x", 2}, {"ms", 20}}, t).as<std::int64_t>(), 2);
    EXPECT_EQ(p.callAsync("slow", {{"x", 3}, {"ms", 20}}, t).get().as<std::int64_t>(), 3);
  }
  for (Timeout t : {Timeout::zero(), Timeout(-1), Timeout::min()}) {
    SCOPED_TRACE(t.count());
    EXPECT_THROW(p.call("slow", {{"x", 2}, {"ms", 20}}, t), TimeoutError);
    EXPECT_FALSE(p.recv(t).has_value());
  }
  EXPECT_FALSE(p.waitStop(Timeout(-1)).ended());
  EXPECT_FALSE(p.waitStop(Timeout::min()).ended());
  // Backend timers: a delay of zero or less fires at once (a negative one
  // wrapped into a timer that never fired), a period below 1 ms is refused.
  for (std::int64_t ms : {std::int64_t{0}, std::int64_t{-1}, std::numeric_limits<std::int64_t>::min()}) {
    SCOPED_TRACE(ms);
    EXPECT_EQ(p.call("after", {{"ms", ms}}, test::slow(5s)).as<std::string>(), "fired");
  }
  for (std::int64_t ms : {std::int64_t{0}, std::int64_t{-1}})
    EXPECT_TRUE(
        contains(test::thrown<RemoteError>([&] { p.call("every", {{"ms", ms}}, test::slow(5s)); }), "1 ms or more"));
  p.call("every", {{"ms", 1}}, test::slow(5s));
  // stop with the largest finite timeout stops as kForever would.
  const ExitStatus s = p.stop(kForever - 1ms);
  EXPECT_TRUE(s.ok()) << s.describe();
  // And a stop with a negative timeout is a stop without grace.
  Peer q;
  q.start();
  const ExitStatus sq = q.stop(Timeout::min());
  EXPECT_TRUE(sq.ended()) << sq.describe();
}

// A pool's task timeouts (through the public API only: lib/pool.cpp is
// another unit's): the largest finite values below kForever let a task
// run as kForever does, for the pool's default and for one task's.
// Without the saturation in pool.cpp's backstop (`t.timeout * (queueDepth
// + 1)`, the call's deadline) the task was killed at once, "ran longer than
// 9223372036854775806 ms".
TEST(Edges, APoolTaskWithTheLargestFiniteTimeoutRunsToItsEnd) {
  PoolOptions o;
  o.workers = 1;
  o.taskTimeout = kForever - 1ms;
  FunctionPool<std::int64_t(std::int64_t)> pool(
      [](std::int64_t x) {
        std::this_thread::sleep_for(30ms);
        return x + 1;
      },
      o);
  EXPECT_EQ(pool.submit(1).get(), 2);
  for (Timeout t : {kForever - 1ms, kForever / 2, Timeout(24h), kForever}) {
    SCOPED_TRACE(t.count());
    EXPECT_EQ(pool.submitWith(TaskOptions{t, 0}, 5).get(), 6);
  }
}

// A ring's waits and a Manager's timers at the extremes of a Timeout: zero
// and negative look once, the largest finite values wait as kForever does
// (never "expired at once"), and a period under a tick is refused.
TEST(Edges, RingWaitsAndManagerTimersAtTheirExtremes) {
  RingBuffer ring = RingBuffer::create("extremes", 2, 16);
  RingWriter w = ring.writer();
  RingReader r = ring.reader();
  for (Timeout t : {Timeout::zero(), Timeout(-5), Timeout::min()}) {
    SCOPED_TRACE(t.count());
    const auto t0 = Clock::now();
    EXPECT_FALSE(r.next(t).has_value());
    EXPECT_LT(Clock::now() - t0, test::slow(500ms));
  }
  for (Timeout t : {Timeout(24h), kForever - 1ms, kForever}) {
    SCOPED_TRACE(t.count());
    w.push({}, t);  // room: returns at once
    EXPECT_TRUE(r.next(t).has_value()) << "a slot waits: it is taken, not timed out";
  }
  w.push({}, Timeout::zero());
  w.push({}, Timeout::zero());  // Block: the ring is full now
  for (Timeout t : {Timeout::zero(), Timeout(-5), Timeout::min()})
    EXPECT_THROW(w.push({}, t), TimeoutError) << t.count();

  Manager m;
  int fired = 0;
  m.after(Timeout(-5), [&] { ++fired; });
  m.after(Timeout::min(), [&] { ++fired; });
  m.after(Timeout::zero(), [&] { ++fired; });
  bool late = false;
  m.after(kForever - 1ms, [&] { late = true; });
  m.after(Timeout(24h), [&] { late = true; });
  EXPECT_TRUE(m.runUntil([&] { return fired == 3; }, test::slow(2s)));
  m.runUntil([] { return false; }, 50ms);
  EXPECT_FALSE(late) << "a timer far away fired at once";
  for (Timeout p : {Timeout::zero(), Timeout(-5), Timeout::min()})
    EXPECT_TRUE(test::contains(test::thrown<Error>([&] { m.every(p, [] {}); }), "1 ms or more")) << p.count();
}

}  // namespace
}  // namespace forklift
