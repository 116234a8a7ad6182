// A backend started from a thread other than the main one: PR_SET_PDEATHSIG
// fires when the forking thread ends, so forklift forks such backends from
// a thread of its own that lives as long as the process.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <thread>

#include "forklift/process.hpp"
#include "threads.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;

ProcessOptions withThreads() {
  ProcessOptions o;
  o.allowThreads = true;
  return o;
}

class Echo : public MessageProcess {
 public:
  explicit Echo(ProcessOptions o = {}) : MessageProcess("echo", std::move(o)) {
    command("echo", &Echo::c__echo, {"x"});
    command("nested", &Echo::c__nested);
  }

 private:
  int c__echo(int x) { return x; }
  // A backend of its own, started from the backend's only thread.
  int c__nested() {
    Echo inner;
    inner.start();
    const int v = inner.call("echo", {{"x", 42}}).as<int>();
    inner.stop();
    return v;
  }
};

// First: under ThreadSanitizer, a child forked after this process started
// a thread may not start threads itself, and the test below starts one.
TEST(Forker, SuchABackendStillDiesWithItsFrontend) {
#if defined(__SANITIZE_THREAD__)
  if (detail::countUserThreads() > 1) GTEST_SKIP() << "TSan: no new threads after a multi-threaded fork";
#endif
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  const pid_t frontend = test::forkChild([&] {
    ::close(fds[0]);
    Echo p(withThreads());
    std::thread([&] { p.start(); }).join();
    const pid_t backend = p.pid();
    if (::write(fds[1], &backend, sizeof backend) != sizeof backend) return 3;
    for (;;) ::pause();
  });
  ::close(fds[1]);
  pid_t backend = 0;
  pollfd pf{fds[0], POLLIN, 0};
  const bool got = ::poll(&pf, 1, static_cast<int>(test::slowMs(10000))) == 1 && ::read(fds[0], &backend, sizeof backend) == sizeof backend;
  ::close(fds[0]);
  ::kill(frontend, SIGKILL);
  test::waitChild(frontend, 5s);
  ASSERT_TRUE(got);
  detail::UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, backend, 0)));
  if (pidfd) {
    pollfd p{pidfd.get(), POLLIN, 0};
    EXPECT_EQ(::poll(&p, 1, static_cast<int>(test::slowMs(2000))), 1) << "the backend outlived its frontend";
  }
}

TEST(Forker, ABackendStartedFromAThreadThatEndsKeepsRunning) {
  auto p = std::make_unique<Echo>(withThreads());
  std::thread([&] { p->start(); }).join();  // the starting thread is gone
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(p->isAlive()) << "the backend died with the thread that started it";
  EXPECT_EQ(p->call("echo", {{"x", 7}}).as<int>(), 7);
  // Its own backend, started from its main thread, works too.
  EXPECT_EQ(p->call("nested", {}, test::slow(10s)).as<int>(), 42);
  EXPECT_TRUE(p->stop().ok());

  // forklift's forking thread is not counted: the main thread still forks
  // without allowThreads.
  Echo q;
  EXPECT_NO_THROW(q.start());
  EXPECT_EQ(q.call("echo", {{"x", 1}}).as<int>(), 1);
  q.stop();
}

}  // namespace
}  // namespace forklift
