// A pool on a Manager's loop: results, deaths and timeouts handled in the
// turn of the manager's loop that sees them, with no timer that polls the
// pool; a manager's shutdown (requestStop, SIGTERM to the process group)
// never forks a replacement.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <thread>

#include "forklift/fork_server.hpp"
#include "forklift/manager.hpp"
#include "forklift/pool.hpp"
#include "jobs.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::Jobs;
using test::jobs;

Manager::Options quiet() {
  Manager::Options o;
  o.handleSignals = false;
  o.stopTimeout = 200ms;
  return o;
}

// The manager's loop has no timer at all: every result comes by the reply's
// own descriptor, in the turn that reads it, and its callback runs there.
TEST(PoolOnManager, ResultsArriveByCallbacksWithoutAnyPollTimer) {
  Manager m(quiet());
  PoolOptions o;
  o.workers = 3;
  FunctionPool<int(int)> pool(m, [](int x) { return 2 * x; }, o);
  EXPECT_EQ(m.size(), 3u);  // the pool's workers are the manager's
  constexpr int kTasks = 200;
  long sum = 0;
  int results = 0;
  std::vector<TaskFuture<int>> fs;
  std::string nested;
  bool readyInLoop = true;
  pool.pool().onResult([&](const TaskInfo&, const CallResult& r) {
    sum += r.get().as<int>();
    if (results++ == 0) {
      // Inside the loop a look does not wait, and a wait would nest: it says so.
      readyInLoop = fs.back().ready();
      nested = test::thrown<Error>([&] { fs.back().get(); });
    }
    if (results == kTasks) m.requestStop();
  });
  // Submitted before run(): sent at once, their replies read by the loop.
  for (int i = 0; i < kTasks; ++i) fs.push_back(pool.submit(i));
  // The manager stops itself when all came; a bound on the whole test only,
  // from a thread (no timer on the loop; nothing forks here).
  std::atomic<bool> over{false};
  std::thread watchdog([&] {
    for (auto t0 = Clock::now(); !over && Clock::now() - t0 < test::slow(30s);) std::this_thread::sleep_for(10ms);
    if (!over) m.requestStop();  // safe from any thread
  });
  EXPECT_EQ(m.run(), 0);
  over = true;
  watchdog.join();
  EXPECT_EQ(results, kTasks);
  EXPECT_FALSE(readyInLoop);
  EXPECT_TRUE(test::contains(nested, "loops do not nest")) << nested;
  EXPECT_EQ(sum, static_cast<long>(kTasks) * (kTasks - 1));
  ASSERT_EQ(fs.size(), static_cast<std::size_t>(kTasks));
  EXPECT_TRUE(fs.back().ready());
  EXPECT_EQ(fs.back().get(), 2 * (kTasks - 1));
  EXPECT_EQ(pool.pool().restarts(), 0u);
}

// A worker's death and a task's timeout are handled in the manager's loop:
// the tasks fail, the workers are replaced there, and the events say so.
TEST(PoolOnManager, ADeathAndATimeoutAreHandledInTheManagersLoop) {
  Manager m(quiet());
  PoolOptions o;
  o.workers = 2;
  o.retries = 0;
  o.queueDepth = 1;
  WorkerPool pool(m, jobs(), o);
  const std::thread::id loopThread = std::this_thread::get_id();
  std::vector<WorkerEvent::Kind> events;
  bool onLoopThread = true;
  pool.onWorkerEvent([&](const WorkerEvent& e) {
    events.push_back(e.kind);
    onLoopThread = onLoopThread && std::this_thread::get_id() == loopThread;
    if (std::count(events.begin(), events.end(), WorkerEvent::Kind::Restarted) == 2) m.requestStop();
  });
  std::vector<std::string> errors;
  pool.onResult([&](const TaskInfo&, const CallResult& r) { errors.push_back(r.what()); });
  m.post([&] {
    pool.submit("hang", {}, TaskOptions{100ms, std::nullopt});
    pool.submit("crash");
  });
  // A bound on the whole test (a timer: a thread would stop the replacements
  // from forking).
  m.after(test::slow(30s), [&] {
    ADD_FAILURE() << "the events did not all come within " << test::slow(30s).count() << " ms";
    m.requestStop();
  });
  EXPECT_EQ(m.run(), 0);
  EXPECT_TRUE(onLoopThread);
  EXPECT_EQ(std::count(events.begin(), events.end(), WorkerEvent::Kind::TimedOut), 1);
  EXPECT_EQ(std::count(events.begin(), events.end(), WorkerEvent::Kind::Died), 1);
  EXPECT_EQ(std::count(events.begin(), events.end(), WorkerEvent::Kind::Restarted), 2);
  ASSERT_EQ(errors.size(), 2u);
  std::sort(errors.begin(), errors.end());
  EXPECT_TRUE(test::contains(errors[0], "task 1 ('hang') ran longer than its timeout of 100 ms")) << errors[0];
  EXPECT_TRUE(test::contains(errors[1], "task 2 ('crash'): its worker Jobs.jobs-1 died (killed by SIGKILL)"))
      << errors[1];
  EXPECT_EQ(pool.restarts(), 2u);
  EXPECT_FALSE(pool.worker(0).isAlive());  // the manager's shutdown stopped them
}

// The manager's shutdown stops the pool's workers with its own; the pool
// replaces none of them, and what was left fails with PoolBroken.
TEST(PoolOnManager, AShutdownNeverForksAndFailsWhatIsLeft) {
  Manager m(quiet());
  PoolOptions o;
  o.workers = 2;
  o.queueDepth = 1;
  WorkerPool pool(m, jobs(), o);
  std::vector<WorkerEvent::Kind> events;
  pool.onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e.kind); });
  TaskFuture<Value> hung;
  m.post([&] {
    hung = pool.submit("hang");
    // Killed from outside while the stop is under way: not replaced.
    m.requestStop();
    ::kill(pool.worker(1).pid(), SIGKILL);
  });
  EXPECT_EQ(m.run(), 1);  // a worker had to be killed (the hanging one) or died
  EXPECT_TRUE(test::contains(test::thrown<PoolBroken>([&] { hung.get(); }), "the manager stopped"));
  EXPECT_EQ(std::count(events.begin(), events.end(), WorkerEvent::Kind::Restarted), 0);
  EXPECT_EQ(pool.restarts(), 0u);
  EXPECT_TRUE(test::contains(test::thrown<PoolBroken>([&] { pool.submit("square", {{"x", 1}}); }),
                             "the manager stopped"));
}

// SIGTERM to the whole process group (a service manager, a closing
// terminal) reaches the workers and the owner at once: the workers may die
// of it before the manager's handler runs. The shutdown is orderly all the
// same: no replacement is forked, and run() returns 0.
TEST(PoolOnManager, SigtermToTheProcessGroupShutsDownInOrderWithoutForking) {
  constexpr int kRuns = 8;
  for (int run = 0; run < kRuns; ++run) {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    const pid_t child = test::forkChild([&] {
      ::close(ready[0]);
      ::setpgid(0, 0);  // a process group of its own, as a service's
      Manager m;        // handles SIGINT and SIGTERM
      PoolOptions o;
      o.workers = 3;
      FunctionPool<int(int)> pool(m, [](int ms) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        return ms;
      }, o);
      int restarted = 0;
      pool.pool().onWorkerEvent([&](const WorkerEvent& e) { restarted += e.kind == WorkerEvent::Kind::Restarted; });
      m.post([&] {
        for (int i = 0; i < 30; ++i) pool.submit(20);
        const char c = 'r';
        (void)!::write(ready[1], &c, 1);
      });
      const int code = m.run();
      // 0: in order; 1: run() failed; 2: a replacement was forked.
      return code != 0 ? 1 : (restarted != 0 || pool.pool().restarts() != 0) ? 2 : 0;
    });
    ::close(ready[1]);
    pollfd p{ready[0], POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 10000), 1) << "run " << run << ": the child's pool did not start";
    ::close(ready[0]);
    ASSERT_EQ(::kill(-child, SIGTERM), 0);
    // Bounded by the manager's stop timeout (5 s) plus the ladder's grace.
    const int code = test::exitCodeOf(test::waitChild(child, 15s));
    EXPECT_EQ(code, 0) << "run " << run << (code == 2 ? ": a replacement was forked" : "");
    if (code != 0) break;
  }
}

// A Manager's worker (ignoreSigint) ignores SIGTERM from any process but
// its frontend: a signal to the whole process group reaches the manager,
// which stops it in order; the stop ladder's own SIGTERM still ends it,
// whether forked here or by the fork server (which signals for the frontend
// through a pidfd).
TEST(PoolOnManager, AManagersWorkerObeysSigtermOnlyFromItsFrontend) {
  for (const bool served : {false, true}) {
    SCOPED_TRACE(served ? "served by the fork server" : "forked here");
    Jobs w(0);
    w.ignoreSigint();  // what Manager::add does
    std::unique_ptr<ForkServer> server;
    if (served) server = std::make_unique<ForkServer>();
    w.start();
    const pid_t pid = w.pid();
    if (served) {  // its parent is the server, not this process
      const std::string stat = test::readFile("/proc/" + std::to_string(pid) + "/stat");
      char state = 0;
      int ppid = 0;
      ASSERT_EQ(std::sscanf(stat.c_str() + stat.rfind(") ") + 2, "%c %d", &state, &ppid), 2);
      EXPECT_NE(ppid, ::getpid());
    }
    // From another process, as a service manager's SIGTERM to the group.
    const pid_t other = test::forkChild([pid] { return ::kill(pid, SIGTERM) == 0 ? 0 : 1; });
    ASSERT_EQ(test::exitCodeOf(test::waitChild(other, 5s)), 0);
    // Delivered before the worker reads the next command: it still serves.
    EXPECT_EQ(w.call("square", {{"x", 3}}, test::slow(5s)).as<double>(), 9.0);
    // From its frontend: obeyed.
    w.signal(SIGTERM);
    const ExitStatus s = w.waitStop(test::slow(5s));
    EXPECT_EQ(s.how, ExitStatus::How::Signaled) << s.describe();
    EXPECT_EQ(s.signal, SIGTERM);
  }
}

}  // namespace
}  // namespace forklift
