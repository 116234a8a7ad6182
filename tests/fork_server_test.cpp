// The fork server: backends forked safely after the frontend started
// threads, from the server's copies of the objects and pools made before it.
#include "forklift/fork_server.hpp"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "forklift/manager.hpp"
#include "forklift/pool.hpp"
#include "forklift/process.hpp"
#include "forklift/detail/fd.hpp"
#include "child.hpp"
#include "support.hpp"
#include "threads.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;

class Echo : public MessageProcess {
 public:
  explicit Echo(std::string name = "echo") : MessageProcess(std::move(name)) {
    command("echo", &Echo::c__echo, {"x"});
    command("base", &Echo::c__base);
    command("ppid", &Echo::c__ppid);
    command("quit", &Echo::c__quit, {"code"});
    command("raise", &Echo::c__raise, {"sig"});
    command("stubborn", &Echo::c__stubborn);
  }
  int base = 1;  // the frontend may change it; a served backend sees the server's copy

 private:
  int c__echo(int x) { return x; }
  int c__base() { return base; }
  int c__ppid() { return static_cast<int>(::getppid()); }
  void c__quit(int code) { ::_exit(code); }
  void c__raise(int sig) { ::raise(sig); }
  void c__stubborn() {
    ::signal(SIGTERM, SIG_IGN);
    for (;;) ::pause();
  }
};

using test::BusyThread;

bool endsWithin(pid_t pid, std::chrono::milliseconds t) {
  detail::UniqueFd fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!fd) return errno == ESRCH;  // gone already
  pollfd p{fd.get(), POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(t.count())) == 1;
}

// Leaves no process and no descriptor: checked when the test's scope ends.
// The exit statuses a Manager reports on its loop's thread. The record is
// shared with the callback, which may outlive this object (the Manager's
// destructor still reports).
class ExitLog {
 public:
  explicit ExitLog(Manager& m) : state_(std::make_shared<State>()) {
    m.onExit([st = state_](MessageProcess&, const ExitStatus& s) {
      std::lock_guard lock(st->mu);
      st->exits.push_back(s);
    });
  }
  std::vector<ExitStatus> all() const {
    std::lock_guard lock(state_->mu);
    return state_->exits;
  }

 private:
  struct State {
    std::mutex mu;
    std::vector<ExitStatus> exits;
  };
  std::shared_ptr<State> state_;
};

class FdCheck {
 public:
  FdCheck() {
    { Manager warm; }  // libuv's process-wide signal pipe stays: made before the count
    fds_ = test::openFdCount();
  }
  ~FdCheck() {
    EXPECT_FALSE(ForkServer::running()) << "the fork server outlived its handles";
    EXPECT_TRUE(test::eventually([&] { return test::openFdCount() == fds_; }, 2000ms))
        << "descriptors: " << fds_ << " before, " << test::openFdCount() << " after";
    EXPECT_FALSE(test::hasChildren()) << "a process was left behind";
  }

 private:
  int fds_ = 0;
};

// First: under ThreadSanitizer a child of a multi-threaded process may not
// start threads, and this test's frontend runs in a child.
TEST(ForkServer, AKilledFrontendTakesTheServerAndItsBackendsDown) {
  FdCheck check;
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  const pid_t frontend = test::forkChild([&] {
    ::close(fds[0]);
    Echo a("a");
    Echo b("b");
    ForkServer server;
    a.start();
    b.start();
    const pid_t pids[3] = {ForkServer::pid(), a.pid(), b.pid()};
    if (a.call("ppid").as<int>() != pids[0]) return 4;  // served, not forked here
    if (::write(fds[1], pids, sizeof pids) != sizeof pids) return 3;
    for (;;) ::pause();
  });
  ::close(fds[1]);
  pid_t pids[3] = {};
  pollfd pf{fds[0], POLLIN, 0};
  const bool got = ::poll(&pf, 1, static_cast<int>(test::slowMs(10000))) == 1 && ::read(fds[0], pids, sizeof pids) == sizeof pids;
  ::close(fds[0]);
  ASSERT_TRUE(got) << "the frontend did not start its backends through the server";
  ::kill(frontend, SIGKILL);
  test::waitChild(frontend, 5s);
  EXPECT_TRUE(endsWithin(pids[0], test::slow(2000ms))) << "the fork server outlived its frontend";
  EXPECT_TRUE(endsWithin(pids[1], test::slow(2000ms))) << "a served backend outlived its frontend";
  EXPECT_TRUE(endsWithin(pids[2], test::slow(2000ms))) << "a served backend outlived its frontend";
}

TEST(ForkServer, RestartsWhileAnotherThreadRuns) {
  FdCheck check;
  Echo p;
  ForkServer server;
  p.base = 2;  // after the server's copy was made
  ASSERT_TRUE(ForkServer::running());
  BusyThread other;
  ASSERT_GT(detail::countUserThreads(), 1);
  for (int run = 0; run < 3; ++run) {
    ASSERT_NO_THROW(p.start()) << "run " << run;
    EXPECT_EQ(p.call("echo", {{"x", run}}).as<int>(), run);
    EXPECT_EQ(p.call("ppid").as<int>(), ForkServer::pid()) << "not forked by the server";
    EXPECT_EQ(p.call("base").as<int>(), 1) << "a restart runs the object as it was when the server started";
    const ExitStatus s = p.stop();
    EXPECT_TRUE(s.ok()) << s.describe();
  }
  // Made after the server started: the server has no copy, and this
  // process runs threads: a clear refusal.
  Echo late("late");
  const std::string e = test::thrown<Error>([&] { late.start(); });
  EXPECT_TRUE(test::contains(e, "cannot fork"));
  EXPECT_TRUE(test::contains(e, "no copy of it"));
  EXPECT_TRUE(test::contains(e, "allowThreads"));
}

TEST(ForkServer, ABackendStartedFromAThreadThatEndsKeepsRunning) {
  FdCheck check;
  Echo p;
  ForkServer server;
  std::thread([&] { p.start(); }).join();
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(p.isAlive()) << "the backend died with the thread that started it";
  EXPECT_EQ(p.call("echo", {{"x", 7}}).as<int>(), 7);
  EXPECT_TRUE(p.stop().ok());
}

TEST(ForkServer, RelaysExitStatuses) {
  FdCheck check;
  Echo p;
  ForkServer server;
  BusyThread other;

  p.start();
  p.send("quit", {{"code", 7}});
  ExitStatus s = p.waitStop(test::slow(5000ms));
  EXPECT_EQ(s.how, ExitStatus::How::Exited) << s.describe();
  EXPECT_EQ(s.code, 7);

  p.start();
  p.send("raise", {{"sig", SIGUSR1}});
  s = p.waitStop(test::slow(5000ms));
  EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
  EXPECT_EQ(s.signal, SIGUSR1);

  // The ladder: not stopped in time, SIGTERM ignored, SIGKILL.
  p.start();
  p.send("stubborn");
  std::this_thread::sleep_for(100ms);
  s = p.stop(200ms);
  EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
  EXPECT_EQ(s.signal, SIGKILL);
  EXPECT_EQ(s.escalation, 2);
  EXPECT_TRUE(test::contains(s.describe(), "killed by SIGKILL (after SIGKILL)"));

  // A signal sent by the frontend reaches it through the server's pidfd.
  p.start();
  p.signal(SIGTERM);
  s = p.waitStop(test::slow(5000ms));
  EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
  EXPECT_EQ(s.signal, SIGTERM);
}

// Where pidfds are missing, the server hands the read end of the child's
// death pipe instead, and signals its child itself.
TEST(ForkServer, WithoutPidfdsTheServerHandsADeathPipe) {
  FdCheck check;
  detail::useDeathPipeForTests(true);
  {
    Echo p;
    ForkServer server;
    BusyThread other;
    p.start();
    EXPECT_EQ(p.call("ppid").as<int>(), ForkServer::pid());
    p.signal(SIGUSR2);
    ExitStatus s = p.waitStop(test::slow(5000ms));
    EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
    EXPECT_EQ(s.signal, SIGUSR2);
    p.start();
    EXPECT_EQ(p.call("echo", {{"x", 3}}).as<int>(), 3);
    s = p.stop();
    EXPECT_TRUE(s.ok()) << s.describe();
  }
  detail::useDeathPipeForTests(false);
}

TEST(ForkServer, ManagerRestartsUnderRunAsThread) {
  FdCheck check;
  {
    Manager m;
    Echo& w = m.emplace<Echo>("w");
    ExitLog log(m);
    m.runAsThread();
    ASSERT_TRUE(ForkServer::running()) << "runAsThread starts a fork server";
    const pid_t first = w.pid();
    for (int i = 0; i < 2; ++i) {
      std::promise<std::string> answered;
      m.post([&] {
        try {
          m.restart(w);
          w.callAsync("echo", {{"x", 40 + i}}, test::slow(5000ms), [&](CallResult r) {
            answered.set_value(std::to_string(r.get().as<int>()) + " from " +
                               std::to_string(w.pid() != first ? 1 : 0));
          });
        } catch (const std::exception& e) {
          answered.set_value(e.what());
        }
      });
      auto f = answered.get_future();
      ASSERT_EQ(f.wait_for(test::slow(10s)), std::future_status::ready);
      EXPECT_EQ(f.get(), std::to_string(40 + i) + " from 1");
    }
    EXPECT_EQ(m.stopThread(), 0);
    const auto exits = log.all();
    ASSERT_EQ(exits.size(), 3u);
    for (const ExitStatus& s : exits) EXPECT_TRUE(s.ok()) << s.describe();
  }
}

TEST(ForkServer, APoolReplacesAKilledWorkerWhileThreadsRun) {
  FdCheck check;
  PoolOptions o;
  o.workers = 2;
  FunctionPool<int(int)> pool([](int x) { return 2 * x; }, o);
  ForkServer server;
  BusyThread other;
  std::vector<WorkerEvent> events;
  pool.pool().onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e); });
  const pid_t victim = pool.pool().worker(0).pid();
  ::kill(victim, SIGKILL);
  std::vector<int> in(50);
  for (int i = 0; i < 50; ++i) in[static_cast<std::size_t>(i)] = i;
  const std::vector<int> out = pool.map(in);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(out[static_cast<std::size_t>(i)], 2 * i);
  EXPECT_EQ(pool.pool().restarts(), 1u);
  bool restarted = false;
  for (const auto& e : events) {
    EXPECT_NE(e.kind, WorkerEvent::Kind::StartFailed) << e.what;
    if (e.kind == WorkerEvent::Kind::Restarted) restarted = true;
  }
  EXPECT_TRUE(restarted);
  events.clear();
  EXPECT_NE(pool.pool().worker(0).pid(), victim);
  // A new fixed value changes the factory: the server's copy is stale, so a
  // replacement now would fork here, which the thread forbids.
  pool.pool().factoryChanged();
  ::kill(pool.pool().worker(1).pid(), SIGKILL);
  // Tasks drive the pool: the death is seen, the replacement refused; a
  // refusal that every retry would meet breaks the pool at once, saying why.
  std::string broken;
  try {
    pool.map(in);
  } catch (const PoolBroken& e) {
    broken = e.what();
  } catch (const std::exception&) {  // a task the dead worker held may fail first
  }
  if (broken.empty()) broken = test::thrown<PoolBroken>([&] { pool.submit(1); });
  EXPECT_TRUE(test::contains(broken, "worker 1 cannot be replaced")) << broken;
  EXPECT_TRUE(test::contains(broken, "made or changed")) << broken;
  EXPECT_TRUE(test::contains(broken, "allowThreads")) << broken;
  for (const auto& e : events) EXPECT_NE(e.kind, WorkerEvent::Kind::StartFailed) << e.what;
  pool.pool().stop();
}

TEST(ForkServer, AKilledServerIsReportedNotHung) {
  FdCheck check;
  Echo a("a");
  Echo b("b");
  {
    ForkServer server;
    BusyThread other;
    a.start();
    b.start();
    const pid_t serverPid = ForkServer::pid();
    ASSERT_GT(serverPid, 0);
    ::kill(serverPid, SIGKILL);
    // Its backends die with it; the frontend says how it knows.
    for (Echo* p : {&a, &b}) {
      const ExitStatus s = p->waitStop(test::slow(3000ms));
      EXPECT_EQ(s.how, ExitStatus::How::Unknown) << s.describe();
      EXPECT_TRUE(s.serverLost);
      EXPECT_TRUE(test::contains(s.describe(), "fork server died"));
      EXPECT_FALSE(p->isAlive());
    }
    const std::string e = test::thrown<Error>([&] { a.start(); });
    EXPECT_TRUE(test::contains(e, "the fork server (pid " + std::to_string(serverPid) + ") killed by SIGKILL"))
        << e;
    EXPECT_TRUE(test::contains(e, "allowThreads")) << e;
    EXPECT_FALSE(ForkServer::running());
    const std::string call = test::thrown([&] { b.call("echo", {{"x", 1}}); });
    EXPECT_FALSE(test::contains(call, "no exception"));
  }
  // Without other threads, a dead server is replaced by a new handle.
  ForkServer again;
  EXPECT_TRUE(ForkServer::running());
  a.start();
  EXPECT_EQ(a.call("ppid").as<int>(), ForkServer::pid());
  EXPECT_TRUE(a.stop().ok());
}

TEST(ForkServer, AManagerSeesItsWorkersDieWithTheServer) {
  FdCheck check;
  Manager m;
  Echo& w = m.emplace<Echo>("w");
  m.emplace<Echo>("v");
  ExitLog log(m);
  m.runAsThread();
  const pid_t server = ForkServer::pid();
  ASSERT_GT(server, 0);
  ::kill(server, SIGKILL);
  EXPECT_TRUE(test::eventually([&] { return log.all().size() == 2; }, 3000ms))
      << "the workers' deaths were not reported";
  for (const ExitStatus& s : log.all()) EXPECT_TRUE(s.serverLost) << s.describe();
  std::promise<std::string> restarted;
  m.post([&] { restarted.set_value(test::thrown<Error>([&] { m.restart(w); })); });
  auto f = restarted.get_future();
  ASSERT_EQ(f.wait_for(test::slow(10s)), std::future_status::ready);
  const std::string e = f.get();
  EXPECT_TRUE(test::contains(e, "fork server (pid " + std::to_string(server) + ") killed by SIGKILL")) << e;
  EXPECT_EQ(m.stopThread(), 0);
}

TEST(ForkServer, CannotStartWhileThreadsRun) {
  FdCheck check;
  BusyThread other;
  const std::string e = test::thrown<Error>([] { ForkServer s; });
  EXPECT_TRUE(test::contains(e, "cannot start the fork server"));
  EXPECT_TRUE(test::contains(e, "before any thread"));
}

}  // namespace
}  // namespace forklift
