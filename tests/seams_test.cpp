// Fault injection through lib/seams.hpp: each system call a start or a
// message depends on fails (or comes back short) on purpose. A failure must
// be an error naming the operation, and leave no process, no descriptor and
// no stale entry in the registry of frontend descriptors; a short write or
// read in the middle of a frame must cost nothing but time.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>

#include "child.hpp"
#include "forklift/channel.hpp"
#include "forklift/process.hpp"
#include "forklift/ring_buffer.hpp"
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

// The socket transport unless told otherwise: most seams here (sendmsg,
// recvmsg, the order of the eventfds made at start) are the socket's path;
// the shared-memory queues have their own cases below.
ProcessOptions over(Transport t) {
  ProcessOptions o;
  o.transport = t;
  return o;
}

class Squarer : public MessageProcess {
 public:
  explicit Squarer(Transport t = Transport::Socket) : MessageProcess("seams", over(t)) {
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
    EXPECT_TRUE(contains(test::thrown<ProcessDied>([&] { p.call("square", {{"x", 1.0}}, test::slow(5000ms)); }), "SIGKILL"));
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
    // Out of descriptors: the one text of every such start (process.hpp);
    // the child forked before it was killed (the check below).
    const std::string e = test::thrown<SystemError>([&] { p.start(); });
    EXPECT_TRUE(contains(e, "cannot start the backend: out of file descriptors")) << e;
    EXPECT_TRUE(contains(e, "RLIMIT_NOFILE")) << e;
    EXPECT_FALSE(test::hasChildren());
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
      // EMFILE: the one text of a start out of descriptors, wherever.
      const std::string e = test::thrown<SystemError>([&] { p.start(); });
      EXPECT_TRUE(contains(e, "cannot start the backend: out of file descriptors")) << e;
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
  // Over shared memory the first eventfd is a queue's doorbell.
  Squarer q(Transport::SharedMemory);
  {
    ScopedSeam seam(syscalls.eventfd, &enfileEventfd);
    const std::string e = test::thrown<SystemError>([&] { q.start(); });
    EXPECT_TRUE(contains(e, "cannot create the doorbells of the channel's shared-memory queues")) << e;
    EXPECT_TRUE(contains(e, "Too many open files in system"));
  }
  before.check();
  q.start();  // and a start after it works
  EXPECT_EQ(q.call("square", {{"x", 3.0}}).as<double>(), 9.0);
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
  a.send(m, test::slow(5s));
  a.send(Message("after", {{"n", 8}}), test::slow(5s));
  auto got = b.recv(test::slow(5s));
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
  auto next = b.recv(test::slow(5s));
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
  auto m = p.recv(test::slow(10s));
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

// ---------------------------------------------------------------- shm_open

int eaccesShmOpen(const char*, int, mode_t) {
  errno = EACCES;
  return -1;
}

TEST(Seams, ShmOpenFailingIsAClearErrorAndLeavesNothing) {
  SharedMemory existing(create_only, ShmName::named("seam-shm-open"), 4096);
  const Before before;
  const auto shmBefore = test::forkliftSegments();
  {
    ScopedSeam seam(syscalls.shmOpen, &eaccesShmOpen);
    const std::string c =
        test::thrown<SystemError>([] { SharedMemory(create_only, ShmName::named("seam-shm-open"), 4096); });
    EXPECT_TRUE(contains(c, "cannot create shared memory segment 'fk.")) << c;
    EXPECT_TRUE(contains(c, std::strerror(EACCES))) << c;
    const std::string o = test::thrown<SystemError>([&] { SharedMemory(open_only, existing.name()); });
    EXPECT_TRUE(contains(o, "cannot open shared memory segment '" + existing.name() + "'")) << o;
    EXPECT_TRUE(contains(o, std::strerror(EACCES))) << o;
  }
  EXPECT_EQ(test::forkliftSegments(), shmBefore);
  before.check();
  EXPECT_TRUE(SharedMemory(open_only, existing.name()).valid());  // and the next one works
}

// ---------------------------------------------------------------- mmap

std::atomic<int> g_maps{0};

void* enomemMmap(void*, size_t, int, int, int, off_t) {
  ++g_maps;
  errno = ENOMEM;
  return MAP_FAILED;
}

// The label an error message names ("... 'anon.<pid>.<n>.<hint>' ..."), or "".
std::string quotedLabel(const std::string& e) {
  const auto from = e.find("'anon.");
  if (from == std::string::npos) return "";
  const auto to = e.find('\'', from + 1);
  return to == std::string::npos ? "" : e.substr(from + 1, to - from - 1);
}

// Every segment is mapped through the seam: a failed mapping names mmap and
// the segment, and leaves no descriptor, no registry entry and no name.
TEST(Seams, MmapFailingOnCreateIsAClearErrorAndLeavesNothing) {
  const Before before;
  const auto shmBefore = test::forkliftSegments();
  g_maps = 0;
  std::string anon;
  std::string named;
  {
    ScopedSeam seam(syscalls.mmap, &enomemMmap);
    anon = test::thrown<SystemError>([] { SharedMemory(create_only, "seam", 4096); });
    named = test::thrown<SystemError>([] { SharedMemory(create_only, ShmName::named("seam"), 4096); });
  }
  EXPECT_EQ(g_maps.load(), 2) << "both segments went through the seam";
  for (const std::string& e : {anon, named}) {
    EXPECT_TRUE(contains(e, "cannot map shared memory segment")) << e;
    EXPECT_TRUE(contains(e, "mmap of ")) << e;
    EXPECT_TRUE(contains(e, std::strerror(ENOMEM))) << e;
  }
  EXPECT_TRUE(contains(named, "'fk.")) << named;
  // The anonymous segment's label is not held any more (no registry entry).
  const std::string label = quotedLabel(anon);
  ASSERT_FALSE(label.empty()) << anon;
  EXPECT_TRUE(contains(test::thrown<SystemError>([&] { SharedMemory(open_only, label); }), "does not hold it"));
  EXPECT_EQ(test::forkliftSegments(), shmBefore) << "a named segment was left in /dev/shm";
  before.check();
  EXPECT_NO_THROW(SharedMemory(create_only, "seam", 4096));  // and the next one works
}

TEST(Seams, MmapFailingOnOpenIsAClearErrorAndLeavesTheSegmentUsable) {
  SharedMemory anon(create_only, "seam-open", 4096);
  SharedMemory named(create_only, ShmName::named("seam-open"), 4096);
  static_cast<char*>(anon.data())[0] = 'a';
  static_cast<char*>(named.data())[0] = 'n';
  const Value byFd = anon.descriptor();
  const Before before;
  {
    ScopedSeam seam(syscalls.mmap, &enomemMmap);
    const std::string byLabel = test::thrown<SystemError>([&] { SharedMemory(open_only, anon.name()); });
    const std::string byDescriptor = test::thrown<SystemError>([&] { SharedMemory(open_only, byFd); });
    const std::string byName = test::thrown<SystemError>([&] { SharedMemory(open_only, named.name()); });
    for (const std::string& e : {byLabel, byDescriptor, byName}) {
      EXPECT_TRUE(contains(e, "cannot map shared memory segment")) << e;
      EXPECT_TRUE(contains(e, "mmap")) << e;
    }
    EXPECT_TRUE(contains(byName, named.name())) << byName;
    EXPECT_TRUE(contains(byLabel, anon.name())) << byLabel;
  }
  before.check();
  EXPECT_EQ(static_cast<const char*>(SharedMemory(open_only, anon.name()).data())[0], 'a');
  EXPECT_EQ(static_cast<const char*>(SharedMemory(open_only, named.name()).data())[0], 'n');
}

// A ring is a segment and two eventfds: a failed mapping leaves neither.
TEST(Seams, MmapFailingForARingIsAClearErrorAndLeavesNothing) {
  const Before before;
  const auto shmBefore = test::forkliftSegments();
  {
    ScopedSeam seam(syscalls.mmap, &enomemMmap);
    const std::string e = test::thrown<SystemError>([] { RingBuffer::create("seam-ring", 4, 1024); });
    EXPECT_TRUE(contains(e, "cannot map shared memory segment")) << e;
    EXPECT_TRUE(contains(e, "mmap")) << e;
    const std::string n =
        test::thrown<SystemError>([] { RingBuffer::create(ShmName::named("seam-ring"), 4, 1024); });
    EXPECT_TRUE(contains(n, "mmap")) << n;
  }
  EXPECT_EQ(test::forkliftSegments(), shmBefore) << "a named ring was left in /dev/shm";
  before.check();
  EXPECT_NO_THROW(RingBuffer::create("seam-ring", 4, 1024));
}

// ---------------------------------------------------------------- sendmsg, recvmsg failing

ssize_t enobufsSendmsg(int, const msghdr*, int) {
  errno = ENOBUFS;
  return -1;
}

ssize_t eioRecvmsg(int, msghdr*, int) {
  errno = EIO;
  return -1;
}

// Set after start(), so only the frontend's calls fail (the backend forked
// with the real ones). Nothing was written: the stream stays whole, and the
// next call is served.
TEST(Seams, SendmsgFailingIsAClearErrorAndTheChannelStaysUsable) {
  const Before before;
  {
    Squarer p;
    p.start();
    {
      ScopedSeam seam(syscalls.sendmsg, &enobufsSendmsg);
      const std::string e = test::thrown<SystemError>([&] { p.call("square", {{"x", 3.0}}, test::slow(5s)); });
      EXPECT_TRUE(contains(e, "cannot write to channel")) << e;
      EXPECT_TRUE(contains(e, std::strerror(ENOBUFS))) << e;
      const std::string s = test::thrown<SystemError>([&] { p.send("echoOut", {{"text", "x"}}); });
      EXPECT_TRUE(contains(s, "cannot write to channel")) << s;
    }
    EXPECT_EQ(p.call("square", {{"x", 4.0}}, test::slow(5s)).as<double>(), 16.0);
    EXPECT_TRUE(p.stop().ok());
  }
  before.check();
}

TEST(Seams, RecvmsgFailingIsAClearErrorAndLeavesNothing) {
  const Before before;
  {
    Squarer p;
    p.start();
    p.send("echoOut", {{"text", "waiting"}});
    {
      ScopedSeam seam(syscalls.recvmsg, &eioRecvmsg);
      const std::string e = test::thrown<SystemError>([&] { p.recv(test::slow(5s)); });
      EXPECT_TRUE(contains(e, "cannot read from channel")) << e;
      EXPECT_TRUE(contains(e, std::strerror(EIO))) << e;
    }
    // The message was never taken from the socket: it is still there.
    const auto m = p.recv(test::slow(5s));
    ASSERT_TRUE(m);
    EXPECT_EQ(m->get<std::string>("text"), "waiting");
    EXPECT_TRUE(p.stop().ok());
  }
  before.check();
}

}  // namespace
}  // namespace forklift
