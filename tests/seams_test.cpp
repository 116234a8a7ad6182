// Fault injection through lib/seams.hpp: each system call a start or a
// message depends on fails (or comes back short) on purpose. A failure must
// be an error naming the operation, and leave no process, no descriptor and
// no stale entry in the registry of frontend descriptors; a short write or
// read in the middle of a frame must cost nothing but time.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <string>

#include "child.hpp"
#include "forklift/channel.hpp"
#include "forklift/process.hpp"
#include "forklift/shm.hpp"
#include "forklift/sync.hpp"
#include "seams.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using detail::ScopedSeam;
using detail::syscalls;
using test::contains;

class Squarer : public MessageProcess {
 public:
  Squarer() : MessageProcess("seams") {
    command("square", &Squarer::c__square, {"x"});
    command("echoOut", &Squarer::c__echoOut, {"text"});
  }
  ~Squarer() override { stop(); }

 private:
  double c__square(double x) { return x * x; }
  void c__echoOut(std::string text) { sendOut__(Message("echo", {{"text", text}})); }
};

// What a failed start must leave: what was there before it.
struct Before {
  int fds = test::openFdCount();
  std::vector<int> registry = detail::frontend_fds::snapshot();

  void check() const {
    EXPECT_FALSE(test::hasChildren()) << "a process was left behind";
    EXPECT_EQ(test::openFdCount(), fds) << "descriptors were left behind";
    EXPECT_EQ(detail::frontend_fds::snapshot(), registry) << "stale descriptors in the frontend registry";
  }
};

std::atomic<int> g_calls{0};
std::atomic<int> g_failOn{0};  // fail the n-th call (1-based)

int enosysPidfd(pid_t, unsigned) {
  errno = ENOSYS;
  return -1;
}

pid_t eagainFork() {
  errno = EAGAIN;
  return -1;
}

int nthSocketpairFails(int d, int t, int p, int sv[2]) {
  if (++g_calls == g_failOn) {
    errno = EMFILE;
    return -1;
  }
  return ::socketpair(d, t, p, sv);
}

int enfileEventfd(unsigned, int) {
  errno = ENFILE;
  return -1;
}

// Where pidfd_open does not exist (ENOSYS: old kernels, sandboxes,
// valgrind), the backend is watched through its death pipe and works.
TEST(Seams, PidfdOpenUnavailableFallsBackToTheDeathPipe) {
  const Before before;
  {
    ScopedSeam seam(syscalls.pidfdOpen, &enosysPidfd);
    Squarer p;
    p.start();
    EXPECT_EQ(p.call("square", {{"x", 3.0}}).as<double>(), 9.0);
    ::kill(p.pid(), SIGKILL);
    EXPECT_TRUE(contains(test::thrown<ProcessDied>([&] { p.call("square", {{"x", 1.0}}, 5000ms); }), "SIGKILL"));
    p.stop();
  }
  before.check();
}

// pidfd_open failing otherwise, after the fork (no descriptor left, say):
// the child cannot be watched, so it is killed, and the error says why.
int g_pidfdCalls = 0;
int emfileOnSecondPidfd(pid_t pid, unsigned flags) {
  if (++g_pidfdCalls >= 2) {  // the first is the probe on this process
    errno = EMFILE;
    return -1;
  }
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, flags));
}

TEST(Seams, PidfdOpenFailingAfterTheForkIsAClearErrorAndKillsTheChild) {
  Squarer p;
  const Before before;
  {
    g_pidfdCalls = 0;
    ScopedSeam seam(syscalls.pidfdOpen, &emfileOnSecondPidfd);
    const std::string e = test::thrown<SystemError>([&] { p.start(); });
    EXPECT_TRUE(contains(e, "pidfd_open"));
    EXPECT_TRUE(contains(e, "the backend was killed"));
  }
  before.check();
  // Nothing of the failed start stays in the way of the next one.
  p.start();
  EXPECT_EQ(p.call("square", {{"x", 4.0}}).as<double>(), 16.0);
  EXPECT_TRUE(p.stop().ok());
}

TEST(Seams, ForkFailingIsAClearError) {
  Squarer p;
  const Before before;
  {
    ScopedSeam seam(syscalls.fork, &eagainFork);
    const std::string e = test::thrown<SystemError>([&] { p.start(); });
    EXPECT_TRUE(contains(e, "cannot fork the backend (fork)"));
    EXPECT_TRUE(contains(e, "Resource temporarily unavailable"));
  }
  before.check();
  p.start();
  EXPECT_EQ(p.call("square", {{"x", 5.0}}).as<double>(), 25.0);
}

TEST(Seams, SocketpairFailingIsAClearError) {
  for (int n : {1, 2}) {
    SCOPED_TRACE("socketpair call " + std::to_string(n) + " fails");
    Squarer p;
    const Before before;
    g_calls = 0;
    g_failOn = n;
    {
      ScopedSeam seam(syscalls.socketpair, &nthSocketpairFails);
      const std::string e = test::thrown<SystemError>([&] { p.start(); });
      EXPECT_TRUE(contains(e, "cannot create channel socketpair"));
      EXPECT_TRUE(contains(e, "Too many open files"));
    }
    before.check();
  }
}

// The stop bell is made after both channels are registered: a failure
// there must take them out of the registry again (it used to leave the
// command channel's number in it, for a later fork to close blindly).
TEST(Seams, EventfdFailingIsAClearErrorAndLeavesNoStaleRegistryEntry) {
  Squarer p;
  const Before before;
  {
    ScopedSeam seam(syscalls.eventfd, &enfileEventfd);
    const std::string e = test::thrown<SystemError>([&] { p.start(); });
    EXPECT_TRUE(contains(e, "cannot create the stop bell (eventfd)"));
    EXPECT_TRUE(contains(e, "Too many open files in system"));
    EXPECT_TRUE(contains(test::thrown<SystemError>([] { Event e; }), "cannot create event (eventfd)"));
  }
  before.check();
}

// ---- short writes and reads in the middle of frames ----------------------

// At most 5 bytes per write, and every third call interrupted first.
ssize_t shortSendmsg(int fd, const msghdr* m, int flags) {
  if (++g_calls % 3 == 0) {
    errno = EINTR;
    return -1;
  }
  msghdr copy = *m;
  iovec iov = m->msg_iov[0];
  iov.iov_len = std::min<std::size_t>(iov.iov_len, 5);
  copy.msg_iov = &iov;
  copy.msg_iovlen = 1;
  return ::sendmsg(fd, &copy, flags);
}

// At most 3 bytes per read.
ssize_t shortRecvmsg(int fd, msghdr* m, int flags) {
  iovec* real = m->msg_iov;
  iovec iov = real[0];
  iov.iov_len = std::min<std::size_t>(iov.iov_len, 3);
  m->msg_iov = &iov;
  const ssize_t r = ::recvmsg(fd, m, flags);
  m->msg_iov = real;
  return r;
}

TEST(Seams, ShortWritesAndReadsInTheMiddleOfAFrameDeliverItWhole) {
  ScopedSeam send(syscalls.sendmsg, &shortSendmsg);
  ScopedSeam recv(syscalls.recvmsg, &shortRecvmsg);
  auto [a, b] = Channel::makePair();
  int pipeFds[2];
  ASSERT_EQ(::pipe2(pipeFds, O_CLOEXEC), 0);
  // Small enough for the socket to hold its five-byte writes unread (each
  // one costs the socket a whole buffer of its own).
  const Message m("blob", {{"data", std::string(100, 'x')}, {"fd", Fd::dup(pipeFds[1])}, {"n", 7}});
  a.send(m, 5s);
  a.send(Message("after", {{"n", 8}}), 5s);
  auto got = b.recv(5s);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->get<std::string>("data"), std::string(100, 'x'));
  EXPECT_EQ(got->get<int>("n"), 7);
  // The descriptor came with the frame's first byte, whole.
  const Fd fd = got->get<Fd>("fd");
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::write(fd.get(), "k", 1), 1);
  char c = 0;
  ASSERT_EQ(::read(pipeFds[0], &c, 1), 1);
  EXPECT_EQ(c, 'k');
  auto next = b.recv(5s);
  ASSERT_TRUE(next);
  EXPECT_EQ(next->get<int>("n"), 8);
  ::close(pipeFds[0]);
  ::close(pipeFds[1]);
}

// The backend inherits the seams at fork: both sides write and read in
// dribbles, the backend's queued output included.
TEST(Seams, ABackendServesThroughShortWritesAndReads) {
  ScopedSeam send(syscalls.sendmsg, &shortSendmsg);
  ScopedSeam recv(syscalls.recvmsg, &shortRecvmsg);
  Squarer p;
  p.start();
  for (int i = 0; i < 20; ++i) EXPECT_EQ(p.call("square", {{"x", double(i)}}).as<double>(), double(i * i));
  const std::string big(20000, 'y');
  p.send("echoOut", {{"text", big}});
  auto m = p.recv(10s);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->get<std::string>("text"), big);
  EXPECT_TRUE(p.stop().ok());
}

int enomemMemfd(const char*, unsigned) {
  errno = ENOMEM;
  return -1;
}

TEST(Seams, MemfdCreateFailingIsAClearErrorAndLeavesNothing) {
  const Before before;
  {
    ScopedSeam seam(syscalls.memfdCreate, &enomemMemfd);
    const std::string e = test::thrown<SystemError>([] { SharedMemory(create_only, "seam", 4096); });
    EXPECT_TRUE(contains(e, "memfd_create")) << e;
    EXPECT_TRUE(contains(e, "anon.")) << e;
  }
  before.check();
  EXPECT_NO_THROW(SharedMemory(create_only, "seam", 4096));  // and the next one works
}

}  // namespace
}  // namespace forklift
