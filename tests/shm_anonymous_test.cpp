// Anonymous segments: memfds with no name in /dev/shm, sealed against
// resizing, reaching a backend through the fork or as a descriptor in a
// message, and freed by the kernel however their processes die.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <dirent.h>
#include <poll.h>

#include <cstring>
#include <map>
#include <set>
#include <thread>

#include "forklift/manager.hpp"
#include "forklift/process.hpp"
#include "forklift/shm_array.hpp"
#include "forklift/shm_tensor.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using test::contains;
using test::thrown;

std::set<std::string> shmEntries() {
  std::set<std::string> out;
  if (DIR* d = ::opendir("/dev/shm")) {
    while (const dirent* e = ::readdir(d))
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.insert(e->d_name);
    ::closedir(d);
  }
  return out;
}

// ---------------------------------------------------------------- in one process

TEST(AnonymousSegment, IsTheDefaultAndLeavesNothingInDevShm) {
  const auto before = shmEntries();
  auto a = ShmArray<double>::create("frames", 4, 5);
  EXPECT_TRUE(a.segment().anonymous());
  EXPECT_EQ(a.name().rfind("anon." + std::to_string(::getpid()) + ".", 0), 0u) << a.name();
  EXPECT_TRUE(contains(a.name(), ".frames"));
  EXPECT_GE(a.segment().fd(), 0);
  EXPECT_EQ(shmEntries(), before);
  // The label shows in /proc for tools and people.
  char link[256] = {};
  const std::string path = "/proc/self/fd/" + std::to_string(a.segment().fd());
  ASSERT_GT(::readlink(path.c_str(), link, sizeof link - 1), 0);
  EXPECT_TRUE(contains(link, "memfd:" + a.name()));
  // Close-on-exec, so an exec'd program never inherits it.
  EXPECT_TRUE(::fcntl(a.segment().fd(), F_GETFD) & FD_CLOEXEC);
}

TEST(AnonymousSegment, NamedAndExactStillGoToDevShm) {
  auto n = ShmArray<float>::create(ShmName::named("cam"), 2, 2);
  EXPECT_FALSE(n.segment().anonymous());
  EXPECT_EQ(n.segment().fd(), -1);
  EXPECT_EQ(n.name().rfind("fk." + std::to_string(::getpid()) + ".", 0), 0u);
  EXPECT_TRUE(shmEntries().count(n.name()));
  const auto name = n.name();
  n = {};
  EXPECT_FALSE(shmEntries().count(name));
}

TEST(AnonymousSegment, IsSealedAgainstResizing) {
  auto a = ShmArray<float>::create("sealed", 16, 16);
  const int seals = ::fcntl(a.segment().fd(), F_GET_SEALS);
  ASSERT_GE(seals, 0);
  EXPECT_EQ(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  EXPECT_EQ(::fcntl(a.segment().fd(), F_ADD_SEALS, F_SEAL_WRITE), -1);  // F_SEAL_SEAL: no more seals either
  EXPECT_EQ(errno, EPERM);
}

TEST(AnonymousSegment, OpensByLabelInTheSameProcessAndShares) {
  auto a = ShmArray<int>::create("same", 3, 3);
  a.matrix().setConstant(7);
  auto b = ShmArray<int>::open(a.name());
  EXPECT_TRUE(b.segment().anonymous());
  EXPECT_NE(b.segment().fd(), a.segment().fd());  // a descriptor of its own
  EXPECT_EQ(b.matrix().sum(), 63);
  b.matrix()(0, 0) = 100;
  EXPECT_EQ(a.matrix()(0, 0), 100);
}

TEST(AnonymousSegment, ALabelThisProcessDoesNotHoldIsENOENTSayingWhy) {
  std::string label;
  {
    auto a = ShmArray<int>::create("gone", 2, 2);
    label = a.name();
  }
  const auto text = thrown<SystemError>([&] { SharedMemory(open_only, label); });
  EXPECT_TRUE(contains(text, "'" + label + "'"));
  EXPECT_TRUE(contains(text, "anonymous"));
  EXPECT_TRUE(contains(text, "describe()"));
}

TEST(AnonymousSegment, DescriptorCarriesItsFdAndOpensWithoutTheRegistry) {
  auto a = ShmTensor<std::uint8_t, 3>::create("frame", 4, 6, 3);
  a.tensor().setConstant(9);
  const Value d = a.describe();
  const Fd* fd = nullptr;
  for (const auto& [k, v] : *d.getIf<Map>())
    if (k == "fd") fd = v.getIf<Fd>();
  ASSERT_NE(fd, nullptr);
  EXPECT_NE(fd->get(), a.segment().fd());
  auto b = ShmTensor<std::uint8_t, 3>::open(d);
  EXPECT_EQ(b.channel(1)(3, 5), 9);
  // Opening dups: the descriptor in the Value stays usable.
  EXPECT_TRUE(fd->valid());
  auto c = ShmArray<std::uint8_t>::open(ShmTensor<std::uint8_t, 2>::create("m", 2, 3).describe());
  EXPECT_EQ(c.rows(), 2);
}

TEST(AnonymousSegment, RawSegmentOfAKindRoundTripsItsDescriptor) {
  SharedMemory ring(create_only, "ring", ShmKind::Ring, 4096);
  EXPECT_EQ(ring.kind(), ShmKind::Ring);
  const Value d = ring.descriptor();
  SharedMemory again(open_only, d);
  EXPECT_EQ(again.kind(), ShmKind::Ring);
  EXPECT_EQ(again.bytes(), 4096u);
  EXPECT_EQ(again.generation(), ring.generation());
  EXPECT_TRUE(contains(thrown<TypeError>([] { SharedMemory(create_only, "x", ShmKind::Array, 8); }), "kind array"));
}

// A memfd holding a valid forklift header, copied from a real segment, but
// without seals: an opener must refuse it.
TEST(AnonymousSegment, AnUnsealedDescriptorIsRefused) {
  auto real = ShmArray<float>::create("real", 2, 2);
  detail::UniqueFd forged(::memfd_create("forged", MFD_CLOEXEC));
  ASSERT_TRUE(forged);
  const std::size_t total = real.segment().bytes() + 192;
  ASSERT_EQ(::write(forged.get(), static_cast<const char*>(real.segment().data()) - 192, total),
            static_cast<ssize_t>(total));
  Map d = real.describe().as<Map>();
  for (auto& [k, v] : d)
    if (k == "fd") v = Value(Fd(std::move(forged)));
  const auto text = thrown<ShmFormatError>([&] { ShmArray<float>::open(Value(d)); });
  EXPECT_TRUE(contains(text, "'" + real.name() + "'"));
  EXPECT_TRUE(contains(text, "not sealed"));
}

TEST(AnonymousSegment, ADescriptorOfAnotherFileIsRefused) {
  Map d{{"name", "anon.1.2.pipe"}, {"kind", "array"}};
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  detail::UniqueFd r(p[0]), w(p[1]);
  d.emplace_back("fd", Value(Fd(std::move(r))));
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { SharedMemory(open_only, Value(d)); }), "not a memory file"));
  Map bad{{"name", "anon.1.2.x"}, {"fd", 3}};
  EXPECT_TRUE(contains(thrown<TypeError>([&] { SharedMemory(open_only, Value(bad)); }), "field 'fd'"));
}

TEST(AnonymousSegment, TooLargeForMemoryFailsAtOnceWithENOSPC) {
  const auto text = thrown<SystemError>([] { SharedMemory(create_only, "huge", std::size_t{1} << 50); });
  EXPECT_TRUE(contains(text, "cannot reserve"));
  EXPECT_TRUE(contains(text, "the machine has"));
}

// ---------------------------------------------------------------- across the fork

class Reader : public MessageProcess {
 public:
  explicit Reader(std::string label = {}) : MessageProcess("reader"), label_(std::move(label)) {
    command("sum_inherited", &Reader::c__sumInherited);
    command("open", &Reader::c__open, {"key", "array"});
    command("sum", &Reader::c__sum, {"key"});
    command("close", &Reader::c__close, {"key"});
    command("open_fds", &Reader::c__openFds);
    command("resize", &Reader::c__resize, {"key", "bytes"});
  }

 protected:
  // The tutorial's pattern: open by name in preRun__, after the fork.
  void preRun__() override {
    if (!label_.empty()) inherited_ = ShmArray<double>::open(label_);
  }

 private:
  double c__sumInherited() { return inherited_.matrix().sum(); }
  void c__open(int key, Value array) { open_[key] = ShmArray<double>::open(array); }
  double c__sum(int key) { return open_.at(key).matrix().sum(); }
  void c__close(int key) { open_.erase(key); }
  int c__openFds() { return test::openFdCount(); }
  // A hostile peer: tries to resize a segment it holds. Returns errno.
  int c__resize(int key, std::int64_t bytes) {
    const int fd = open_.at(key).segment().fd();
    if (::ftruncate(fd, static_cast<off_t>(bytes)) == 0) return 0;
    const int truncErr = errno;
    if (::fallocate(fd, 0, 0, static_cast<off_t>(bytes)) == 0) return -1;
    return truncErr;
  }

  std::string label_;
  ShmArray<double> inherited_;
  std::map<int, ShmArray<double>> open_;
};

TEST(AnonymousSegmentAcrossFork, CreatedBeforeStartOpensByLabelInPreRun) {
  auto a = ShmArray<double>::create("before", 10, 10);
  a.matrix().setConstant(0.5);
  Reader r(a.name());
  r.start();
  EXPECT_DOUBLE_EQ(r.call("sum_inherited").as<double>(), 50.0);
  r.stop();
}

TEST(AnonymousSegmentAcrossFork, ThousandArraysMadeOnDemandTravelAsDescriptorsAndNothingStays) {
  Reader r;
  r.start();
  const int backendBefore = r.call("open_fds").as<int>();
  const int frontendBefore = test::openFdCount();
  for (int i = 0; i < 1000; ++i) {
    auto a = ShmArray<double>::create("demand", 8, 8);
    a.matrix().setConstant(static_cast<double>(i));
    r.call("open", {{"key", i % 7}, {"array", a.describe()}});
    ASSERT_DOUBLE_EQ(r.call("sum", {{"key", i % 7}}).as<double>(), 64.0 * i);
    if (i % 7 == 6 || i == 999)
      for (int k = 0; k <= i % 7; ++k) r.call("close", {{"key", k}});
  }
  EXPECT_EQ(test::openFdCount(), frontendBefore);
  EXPECT_EQ(r.call("open_fds").as<int>(), backendBefore);
  r.stop();
}

TEST(AnonymousSegmentAcrossFork, APeerCannotResizeASealedSegmentAndTheOtherSideKeepsReading) {
  auto a = ShmArray<double>::create("victim", 256, 256);
  a.matrix().setConstant(1.0);
  Reader r;
  r.start();
  r.call("open", {{"key", 1}, {"array", a.describe()}});
  EXPECT_EQ(r.call("resize", {{"key", 1}, {"bytes", 0}}).as<int>(), EPERM);
  EXPECT_EQ(r.call("resize", {{"key", 1}, {"bytes", std::int64_t{1} << 30}}).as<int>(), EPERM);
  EXPECT_DOUBLE_EQ(a.matrix().sum(), 65536.0);  // every page still there: no SIGBUS
  EXPECT_DOUBLE_EQ(r.call("sum", {{"key", 1}}).as<double>(), 65536.0);
  r.stop();
}

// ---------------------------------------------------------------- deaths, in a private /dev/shm

// Runs `scenario` in a child with its own mount namespace and an empty
// tmpfs on /dev/shm, so that no other program's segments change the count.
// The scenario returns 0 on success; 77 means the namespace could not be
// made (the test is skipped).
void inPrivateDevShm(const std::function<int()>& scenario) {
  const pid_t pid = test::forkChild([&] {
    if (::unshare(CLONE_NEWNS) != 0) return 77;
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return 77;
    if (::mount("fk-test", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777") != 0) return 77;
    return scenario();
  });
  const int code = test::exitCodeOf(test::waitChild(pid, 60s));
  if (code == 77) GTEST_SKIP() << "cannot make a private mount namespace here";
  EXPECT_EQ(code, 0);
}

// Waits up to `timeout` for an unrelated process to end.
bool waitGone(pid_t pid, std::chrono::milliseconds timeout) {
  detail::UniqueFd pfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pfd) return errno == ESRCH;
  pollfd p{pfd.get(), POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(timeout.count())) == 1;
}

// The frontend of the kill scenarios: eight arrays (made as `name` says),
// a backend that opens them all, a ninth sent as a descriptor once it runs;
// then it writes the backend's pid to `out` and waits to be killed.
int frontendThatWaits(int out, bool named) {
  std::vector<ShmArray<double>> arrays;
  for (int i = 0; i < 8; ++i)
    arrays.push_back(ShmArray<double>::create(named ? ShmName::named("k") : ShmName("k"), 64, 64));
  Reader r(arrays[0].name());
  r.start();
  auto late = ShmArray<double>::create(named ? ShmName::named("late") : ShmName("late"), 64, 64);
  r.call("open", {{"key", 9}, {"array", late.describe()}});
  const pid_t backend = r.pid();
  if (::write(out, &backend, sizeof backend) != sizeof backend) return 3;
  for (;;) ::pause();
}

// Forks the frontend above, kills it with SIGKILL once its backend runs;
// returns the entries /dev/shm holds once both are gone, or -1.
int entriesAfterFrontendKill(bool named) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return -1;
  const pid_t frontend = test::forkChild([&] { return frontendThatWaits(p[1], named); });
  ::close(p[1]);
  pid_t backend = 0;
  pollfd pf{p[0], POLLIN, 0};
  const bool ready = ::poll(&pf, 1, static_cast<int>(test::slowMs(10000))) == 1 && ::read(p[0], &backend, sizeof backend) == sizeof backend;
  ::close(p[0]);
  ::kill(frontend, SIGKILL);
  test::waitChild(frontend, 5s);
  if (!ready) return -1;
  // The backend follows its frontend (PR_SET_PDEATHSIG).
  if (!waitGone(backend, test::slow(5s))) return -1;
  return static_cast<int>(shmEntries().size());
}

TEST(AnonymousSegmentDeaths, KillingTheFrontendLeavesDevShmAsItWas) {
  inPrivateDevShm([] {
    if (!shmEntries().empty()) return 10;
    if (entriesAfterFrontendKill(false) != 0) return 11;
    // The control: named segments are left behind by the same kill, so the
    // count above could have failed.
    if (entriesAfterFrontendKill(true) != 9) return 12;
    return 0;
  });
}

TEST(AnonymousSegmentDeaths, KillingTheBackendLeavesDevShmAsItWasAndTheFrontendReading) {
  inPrivateDevShm([] {
    {
      auto a = ShmArray<double>::create("k", 64, 64);
      a.matrix().setConstant(2.0);
      Reader r(a.name());
      r.start();
      if (r.call("sum_inherited").as<double>() != 8192.0) return 10;
      ::kill(r.pid(), SIGKILL);
      if (!waitGone(r.pid(), test::slow(5s))) return 11;
      if (!shmEntries().empty()) return 12;
      if (a.matrix().sum() != 8192.0) return 13;
      r.stop();
    }
    return shmEntries().empty() ? 0 : 14;
  });
}

class SlowStarter : public MessageProcess {
 public:
  SlowStarter(std::string label, int out) : MessageProcess("slow"), label_(std::move(label)), out_(out) {}

 protected:
  void preRun__() override {
    array_ = ShmArray<double>::open(label_);
    const pid_t me = ::getpid();
    if (::write(out_, &me, sizeof me) != sizeof me) ::_exit(3);
    std::this_thread::sleep_for(150ms);
  }

 private:
  std::string label_;
  int out_;
  ShmArray<double> array_;
};

TEST(AnonymousSegmentDeaths, SigintDuringManagerStartUpLeavesDevShmAsItWas) {
  inPrivateDevShm([] {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) return 10;
    const pid_t frontend = test::forkChild([&] {
      std::vector<ShmArray<double>> arrays;
      Manager m;
      for (int i = 0; i < 6; ++i) {
        arrays.push_back(ShmArray<double>::create("w", 128, 128));
        m.emplace<SlowStarter>(arrays.back().name(), p[1]);
      }
      return m.run();
    });
    ::close(p[1]);
    // SIGINT once the second worker is in its preRun__.
    std::vector<pid_t> workers;
    pid_t w = 0;
    pollfd pf{p[0], POLLIN, 0};
    while (workers.size() < 2 && ::poll(&pf, 1, static_cast<int>(test::slowMs(10000))) == 1 && ::read(p[0], &w, sizeof w) == sizeof w)
      workers.push_back(w);
    ::kill(frontend, SIGINT);
    const auto status = test::waitChild(frontend, 10s);
    while (::poll(&pf, 1, 0) == 1 && ::read(p[0], &w, sizeof w) == sizeof w) workers.push_back(w);
    ::close(p[0]);
    if (workers.size() < 2) return 11;
    if (!status) return 12;  // it had to be killed: the SIGINT did not end it
    for (pid_t pid : workers)
      if (!waitGone(pid, test::slow(5s))) return 13;
    return shmEntries().empty() ? 0 : 14;
  });
}

}  // namespace
}  // namespace forklift
