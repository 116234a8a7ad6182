#include "forklift/pool.hpp"

#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <future>
#include <map>
#include <set>
#include <thread>
#include <utility>

#include "forklift/manager.hpp"
#include "seams.hpp"
#include "jobs.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::Jobs;
using test::jobs;

PoolOptions workers(std::size_t n) {
  PoolOptions o;
  o.workers = n;
  return o;
}

TEST(Pool, TenThousandTasksOverFourWorkersEachResolvedOnceWithItsResult) {
  constexpr int kTasks = 10000;
  { Manager warmUp; }  // libuv keeps a pipe for its signal handling for the process's life
  const int fdsBefore = test::openFdCount();
  {
    FunctionPool<std::int64_t(std::int64_t)> pool([](std::int64_t x) { return 3 * x + 1; }, workers(4));
    std::map<std::uint64_t, int> callbacks;  // task id: how often its callback ran
    std::set<std::size_t> usedWorkers;
    pool.pool().onResult([&](const TaskInfo& t, const CallResult& r) {
      ++callbacks[t.id];
      usedWorkers.insert(t.worker);
      EXPECT_TRUE(r.ok()) << r.what();
    });
    // Done / submitted so far: it falls while more tasks come than end.
    double lastProgress = -1;
    bool progressInRange = true;
    pool.pool().onProgress([&](double p) {
      progressInRange = progressInRange && p > 0 && p <= 1.0;
      lastProgress = p;
    });
    int finishedCalls = 0;
    pool.pool().onFinished([&] { ++finishedCalls; });
    std::vector<TaskFuture<std::int64_t>> fs;
    fs.reserve(kTasks);
    for (int i = 0; i < kTasks; ++i) fs.push_back(pool.submit(i));
    int wrong = 0;
    for (int i = 0; i < kTasks; ++i)
      if (fs[static_cast<std::size_t>(i)].get() != 3 * i + 1) ++wrong;
    EXPECT_EQ(wrong, 0);
    EXPECT_TRUE(pool.pool().finished());
    EXPECT_EQ(pool.pool().completed(), static_cast<std::size_t>(kTasks));
    EXPECT_EQ(pool.pool().failedTasks(), 0u);
    EXPECT_DOUBLE_EQ(pool.pool().progress(), 1.0);
    EXPECT_DOUBLE_EQ(lastProgress, 1.0);
    EXPECT_TRUE(progressInRange);
    EXPECT_GE(finishedCalls, 1);  // at least at the end (also whenever the workers caught up)
    ASSERT_EQ(callbacks.size(), static_cast<std::size_t>(kTasks));
    EXPECT_TRUE(std::all_of(callbacks.begin(), callbacks.end(), [](const auto& kv) { return kv.second == 1; }));
    EXPECT_EQ(usedWorkers.size(), 4u);
    pool.finalize();
  }
  EXPECT_EQ(test::openFdCount(), fdsBefore);
  EXPECT_FALSE(test::hasChildren());
}

TEST(Pool, MapReturnsResultsInInputOrderAndTheFirstErrorInInputOrder) {
  WorkerPool pool(jobs(), workers(3));
  std::vector<Map> args;
  for (int i = 0; i < 50; ++i) args.push_back({{"x", i}});
  const auto r = pool.map("square", args);
  ASSERT_EQ(r.size(), 50u);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(r[static_cast<std::size_t>(i)].as<double>(), i * i);
  // A handler that throws fails its task, is not retried, and the others run.
  auto bad = pool.submit("fail");
  auto good = pool.submit("square", {{"x", 4}});
  EXPECT_EQ(test::thrown<RemoteError>([&] { bad.get(); }), "Jobs.jobs-0: c__fail threw: this task fails");
  EXPECT_EQ(good.get().as<double>(), 16.0);
  EXPECT_EQ(pool.restarts(), 0u);
}

TEST(Pool, ATaskOverItsTimeoutGetsItsWorkerKilledAndReplaced) {
  PoolOptions o = workers(2);
  o.retries = 0;
  WorkerPool pool(jobs(), o);
  std::vector<WorkerEvent> events;
  pool.onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e); });
  const pid_t before0 = pool.worker(0).pid(), before1 = pool.worker(1).pid();
  const auto t0 = Clock::now();
  auto hung = pool.submit("hang", {}, TaskOptions{200ms, std::nullopt});
  auto other = pool.submit("nap", {{"ms", 50}});
  const std::string err = test::thrown<TaskTimeout>([&] { hung.get(); });
  EXPECT_LT(Clock::now() - t0, 200ms + test::slow(2800ms));
  EXPECT_GE(Clock::now() - t0, 200ms);
  EXPECT_TRUE(test::contains(err, "task 1 ('hang') ran longer than its timeout of 200 ms; its worker Jobs.jobs-0 "
                                  "was killed and replaced"))
      << err;
  EXPECT_EQ(other.get().as<int>(), 50);
  EXPECT_NE(pool.worker(0).pid(), before0);
  EXPECT_EQ(pool.worker(1).pid(), before1);
  EXPECT_EQ(pool.restarts(), 1u);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].kind, WorkerEvent::Kind::TimedOut);
  EXPECT_EQ(events[0].pid, before0);
  EXPECT_EQ(events[1].kind, WorkerEvent::Kind::Restarted);
  EXPECT_EQ(events[1].index, 0u);
  // The replacement works.
  EXPECT_EQ(pool.submit("square", {{"x", 5}}).get().as<double>(), 25.0);
}

TEST(Pool, ATimedOutTaskIsRetriedOnceByDefault) {
  WorkerPool pool(jobs(), workers(1));
  int attempts = 0;
  pool.onResult([&](const TaskInfo& t, const CallResult&) { attempts = t.attempts; });
  auto hung = pool.submit("hang", {}, TaskOptions{100ms, std::nullopt});
  EXPECT_TRUE(test::contains(test::thrown<TaskTimeout>([&] { hung.get(); }), "ran longer than its timeout"));
  EXPECT_EQ(attempts, 2);
  EXPECT_EQ(pool.restarts(), 2u);
}

TEST(Pool, AWorkerThatDiesFailsItsTaskSayingHowOrRunsItAgain) {
  PoolOptions o = workers(2);
  o.retries = 0;
  WorkerPool pool(jobs(), o);
  std::vector<WorkerEvent> died;
  pool.onWorkerEvent([&](const WorkerEvent& e) {
    if (e.kind == WorkerEvent::Kind::Died) died.push_back(e);
  });
  auto crash = pool.submit("crash");
  try {
    crash.get();
    ADD_FAILURE() << "no error";
  } catch (const WorkerDied& e) {
    EXPECT_EQ(e.status().how, ExitStatus::How::Signaled);
    EXPECT_EQ(e.status().signal, SIGKILL);
    EXPECT_TRUE(test::contains(e.what(), "task 1 ('crash'): its worker Jobs.jobs-0 died (killed by SIGKILL)"));
  }
  ASSERT_EQ(died.size(), 1u);
  EXPECT_EQ(died[0].status.signal, SIGKILL);

  // With a retry, a task whose worker died the first time runs again.
  const std::string path = "/tmp/forklift-pool-test-" + std::to_string(::getpid());
  std::remove(path.c_str());
  auto again = pool.submit("crash_once", {{"path", path}}, TaskOptions{std::nullopt, 1});
  EXPECT_EQ(again.get().as<std::string>(), "second time");
  std::remove(path.c_str());
  EXPECT_EQ(pool.restarts(), 2u);
}

// Python's Pool waits forever when a worker is killed under it; this one not.
TEST(Pool, AWorkerKilledFromOutsideNeverHangsTheWaiter) {
  PoolOptions o = workers(2);
  o.retries = 0;
  WorkerPool pool(jobs(), o);
  auto f = pool.submit("nap", {{"ms", 30000}});
  ::kill(pool.worker(0).pid(), SIGKILL);
  const auto t0 = Clock::now();
  EXPECT_TRUE(test::contains(test::thrown<WorkerDied>([&] { f.get(); }), "died (killed by SIGKILL)"));
  EXPECT_LT(Clock::now() - t0, test::slow(2s));
  EXPECT_EQ(pool.submit("square", {{"x", 3}}).get().as<double>(), 9.0);
}

TEST(Pool, TheRestartLimitStopsACrashLoopWithAClearError) {
  PoolOptions o = workers(2);
  o.retries = 0;
  o.restartLimit = 2;
  o.restartWindow = 10s;
  WorkerPool pool(jobs(), o);
  std::vector<TaskFuture<Value>> fs;
  for (int i = 0; i < 6; ++i) fs.push_back(pool.submit("crash"));
  int died = 0, broken = 0;
  for (auto& f : fs) {
    const CallResult r = f.result();
    try {
      r.get();
    } catch (const WorkerDied&) {
      ++died;
    } catch (const PoolBroken& e) {
      ++broken;
      EXPECT_TRUE(test::contains(e.what(), "restart limit reached: 3 workers died on their own within 10000 ms "
                                           "(the limit is 2): killed by SIGKILL (3); the pool stopped"))
          << e.what();
    }
  }
  EXPECT_EQ(died, 3);
  EXPECT_EQ(broken, 3);
  EXPECT_TRUE(test::contains(test::thrown<PoolBroken>([&] { pool.submit("square", {{"x", 1}}); }),
                             "WorkerPool::submit 'square': restart limit reached"));
  EXPECT_FALSE(test::hasChildren() && pool.worker(0).isAlive());
}

TEST(Pool, SuspendHoldsTheQueueAndResumeRunsIt) {
  WorkerPool pool(jobs(), workers(2));
  pool.suspend();
  std::vector<TaskFuture<Value>> fs;
  for (int i = 0; i < 10; ++i) fs.push_back(pool.submit("square", {{"x", i}}));
  const auto t0 = Clock::now();
  while (Clock::now() - t0 < 100ms) pool.poll();
  EXPECT_EQ(pool.completed(), 0u);
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { pool.wait(); }), "the pool is suspended with 10 tasks queued"));
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { fs[0].get(); }), "queued and the pool is suspended"));
  pool.resume();
  EXPECT_TRUE(pool.wait(test::slow(10s)));
  EXPECT_EQ(pool.completed(), 10u);
  EXPECT_EQ(fs[9].get().as<double>(), 81.0);
}

TEST(Pool, FinalizeFinishesEveryTaskThenStopsTheWorkers) {
  WorkerPool pool(jobs(), workers(2));
  std::vector<TaskFuture<Value>> fs;
  for (int i = 0; i < 20; ++i) fs.push_back(pool.submit("nap", {{"ms", 2}}));
  pool.finalize();
  for (auto& f : fs) EXPECT_TRUE(f.ready());
  EXPECT_EQ(pool.completed(), 20u);
  EXPECT_EQ(pool.failedTasks(), 0u);
  EXPECT_FALSE(pool.worker(0).isAlive());
  EXPECT_FALSE(pool.worker(1).isAlive());
  EXPECT_FALSE(test::hasChildren());
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { pool.submit("nap", {{"ms", 1}}); }), "finalized"));
}

TEST(Pool, TheFunctionAndItsFixedArgumentsChangeBetweenBatches) {
  FunctionPool<double(double)> pool([](const Value& fixed, double x) { return fixed.as<double>() * x; }, Value(2.0),
                                    workers(2));
  EXPECT_EQ(pool.map({1.0, 2.0, 3.0}), (std::vector<double>{2, 4, 6}));
  const pid_t pid = pool.pool().worker(0).pid();
  pool.setFixed(Value(10.0));
  EXPECT_EQ(pool.map({1.0, 2.0, 3.0}), (std::vector<double>{10, 20, 30}));
  EXPECT_EQ(pool.pool().worker(0).pid(), pid);  // the same workers
  pool.setFunction([](const Value& fixed, double x) { return fixed.as<double>() + x; }, Value(100.0));
  EXPECT_EQ(pool.map({1.0, 2.0, 3.0}), (std::vector<double>{101, 102, 103}));
  EXPECT_NE(pool.pool().worker(0).pid(), pid);  // new workers for the new function
  EXPECT_EQ(pool.pool().restarts(), 0u);

  FunctionPool<std::string(std::string, int)> two([](std::string s, int n) {
    std::string out;
    for (int i = 0; i < n; ++i) out += s;
    return out;
  }, workers(1));
  EXPECT_EQ(two.map({{"ab", 2}, {"c", 3}}), (std::vector<std::string>{"abab", "ccc"}));
  EXPECT_TRUE(test::contains(test::thrown<TypeError>([&] { two.pool().submit("call", {{"a", List{1, 2}}}).get(); }),
                             "argument 1: int found"));

  // No arguments, no result.
  FunctionPool<int()> none([] { return 7; }, workers(1));
  EXPECT_EQ(none.submit().get(), 7);
  EXPECT_EQ(none.map({{}, {}}), (std::vector<int>{7, 7}));
  FunctionPool<void(int)> sink([](int) {}, workers(1));
  sink.map({1, 2, 3});
  sink.submit(4).get();
  EXPECT_EQ(sink.pool().failedTasks(), 0u);
  EXPECT_EQ(sink.pool().completed(), 1u);  // a new batch began with submit(4)
}

TEST(Pool, ABoundedQueueMakesSubmitWait) {
  PoolOptions o = workers(2);
  o.maxQueued = 4;
  o.queueDepth = 1;
  WorkerPool pool(jobs(), o);
  std::size_t mostOutstanding = 0;
  for (int i = 0; i < 40; ++i) {
    pool.submit("nap", {{"ms", 2}});
    mostOutstanding = std::max(mostOutstanding, pool.submitted() - pool.completed());
  }
  EXPECT_LE(mostOutstanding, 4u + 2u);  // the queue, and one task on each worker
  EXPECT_GE(mostOutstanding, 4u);
  EXPECT_TRUE(pool.wait(test::slow(10s)));
  EXPECT_EQ(pool.completed(), 40u);
}

TEST(Pool, QueueDepthSendsSeveralTasksToAWorker) {
  PoolOptions o = workers(1);
  o.queueDepth = 4;
  WorkerPool pool(jobs(), o);
  std::vector<TaskFuture<Value>> fs;
  for (int i = 0; i < 8; ++i) fs.push_back(pool.submit("square", {{"x", i}}));
  for (int i = 0; i < 8; ++i) EXPECT_EQ(fs[static_cast<std::size_t>(i)].get().as<double>(), i * i);
}

TEST(Pool, WorkersAreRecycledAfterKTasks) {
  PoolOptions o = workers(1);
  o.recycleAfter = 3;
  WorkerPool pool(jobs(), o);
  std::set<int> pids;
  for (int i = 0; i < 9; ++i) pids.insert(pool.submit("pid").get().as<int>());
  EXPECT_EQ(pids.size(), 3u);
  EXPECT_EQ(pool.restarts(), 0u);  // recycling is not a restart
  // Submitted at once, with room for all of them on the worker: still 3
  // tasks per worker, none queued on one beyond its last.
  std::vector<TaskFuture<Value>> fs;
  for (int i = 0; i < 9; ++i) fs.push_back(pool.submit("pid"));
  std::map<int, int> tasksOf;
  for (auto& f : fs) ++tasksOf[f.get().as<int>()];
  EXPECT_EQ(tasksOf.size(), 3u);
  for (const auto& [pid, n] : tasksOf) EXPECT_EQ(n, 3) << "worker " << pid;
}

TEST(Pool, WorkersAreRecycledAboveAResidentSize) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "a sanitizer's shadow memory puts every worker above any small resident size";
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
  GTEST_SKIP() << "a sanitizer's shadow memory puts every worker above any small resident size";
#endif
#endif
  PoolOptions o = workers(1);
  o.recycleAboveRss = 64u << 20;
  WorkerPool pool(jobs(), o);
  const int first = pool.submit("grow", {{"mib", 1}}).get().as<int>();
  EXPECT_EQ(pool.submit("grow", {{"mib", 1}}).get().as<int>(), first);  // small: kept
  EXPECT_EQ(pool.submit("grow", {{"mib", 100}}).get().as<int>(), first);
  EXPECT_NE(pool.submit("grow", {{"mib", 1}}).get().as<int>(), first);  // the big one was replaced
}

TEST(Pool, OnlyItsOwnerThreadMayUseIt) {
  WorkerPool pool(jobs(), workers(1));
  std::string err;
  std::thread([&] { err = test::thrown<Error>([&] { pool.submit("pid"); }); }).join();
  EXPECT_TRUE(test::contains(err, "WorkerPool::submit: called from another thread than the one that made the pool"));
  bool once = false;
  pool.onResult([&](const TaskInfo&, const CallResult&) {
    if (std::exchange(once, true)) return;
    auto inner = pool.submit("pid");  // fine: the queue has room
    err = test::thrown<Error>([&] { inner.get(); });
  });
  pool.submit("pid").get();
  EXPECT_TRUE(test::contains(err, "loops do not nest")) << err;
}

TEST(Pool, InProcessWorkersRunTasksAndAreReplacedAfterATimeout) {
  PoolOptions o = workers(2);
  o.process.inProcess = true;
  o.retries = 0;
  FunctionPool<int(int)> pool([](int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
  }, o);
  EXPECT_EQ(pool.pool().worker(0).pid(), ::getpid());
  EXPECT_EQ(pool.map({1, 2, 3, 4}), (std::vector<int>{1, 2, 3, 4}));
  auto slow = pool.submitWith(TaskOptions{100ms, std::nullopt}, 400);
  EXPECT_TRUE(test::contains(test::thrown<TaskTimeout>([&] { slow.get(); }),
                             "ran longer than its timeout of 100 ms; its worker FunctionWorker.pool-0 was abandoned (an "
                             "in-process worker's thread cannot be killed) and replaced"));
  EXPECT_EQ(pool.map({5, 6}), (std::vector<int>{5, 6}));
  EXPECT_EQ(pool.pool().restarts(), 1u);
  std::this_thread::sleep_for(test::slow(400ms));  // the abandoned thread ends its sleep and leaves
}

// poll() is one turn of the pool's loop that does not wait: results,
// deaths and timeouts are handled there and their callbacks run.
TEST(Pool, PollHandlesResultsDeathsAndTimeoutsWithoutWaiting) {
  PoolOptions o = workers(2);
  o.retries = 0;
  WorkerPool pool(jobs(), o);
  int results = 0;
  std::vector<WorkerEvent::Kind> events;
  pool.onResult([&](const TaskInfo&, const CallResult&) { ++results; });
  pool.onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e.kind); });
  auto seen = [&](WorkerEvent::Kind k) { return std::count(events.begin(), events.end(), k); };
  const auto t0 = Clock::now();
  pool.poll();  // nothing is ready: it does not wait
  EXPECT_LT(Clock::now() - t0, test::slow(1s));

  pool.submit("square", {{"x", 3}});
  EXPECT_TRUE(test::eventually([&] {
    pool.poll();
    return pool.completed() == 1;
  }, 10s));
  EXPECT_EQ(results, 1);

  ::kill(pool.worker(1).pid(), SIGKILL);
  EXPECT_TRUE(test::eventually([&] {
    pool.poll();
    return seen(WorkerEvent::Kind::Restarted) == 1;
  }, 10s));
  EXPECT_EQ(seen(WorkerEvent::Kind::Died), 1);
  EXPECT_EQ(pool.restarts(), 1u);

  pool.submit("hang", {}, TaskOptions{100ms, std::nullopt});
  EXPECT_TRUE(test::eventually([&] {
    pool.poll();
    return pool.completed() == 1 && pool.failedTasks() == 1;  // a new batch began with it
  }, 10s));
  EXPECT_EQ(seen(WorkerEvent::Kind::TimedOut), 1);
  EXPECT_EQ(results, 2);
  EXPECT_TRUE(pool.finished());
}

// With several tasks on a worker (the default depth), a task's timeout
// counts from when it reaches the front: time spent queued behind a slow
// task on its worker is not held against it.
TEST(Pool, ATimeoutCountsFromTheFrontOfTheWorkersQueue) {
  PoolOptions o = workers(1);
  o.retries = 0;
  ASSERT_GT(o.queueDepth, 1u);
  WorkerPool pool(jobs(), o);
  // quick's timeout is a bound (square must answer within it once at the
  // front); the nap ahead of it is twice that, so quick is queued for longer
  // than its timeout.
  const auto quickTimeout = test::slow(200ms);
  const int napMs = static_cast<int>(2 * quickTimeout.count());
  auto slow = pool.submit("nap", {{"ms", napMs}});
  auto quick = pool.submit("square", {{"x", 5}}, TaskOptions{quickTimeout, std::nullopt});
  auto hung = pool.submit("hang", {}, TaskOptions{200ms, std::nullopt});
  EXPECT_EQ(slow.get().as<int>(), napMs);
  EXPECT_EQ(quick.get().as<double>(), 25.0);  // queued for twice its timeout, not timed out
  const auto t0 = Clock::now();
  EXPECT_TRUE(test::contains(test::thrown<TaskTimeout>([&] { hung.get(); }), "ran longer than its timeout of 200 ms"));
  EXPECT_LT(Clock::now() - t0, 200ms + test::slow(4800ms));
  EXPECT_EQ(pool.restarts(), 1u);
}

// Pipelining does not pile tasks on a busy worker while another is idle: a
// task goes to the least busy worker with room.
TEST(Pool, ATaskGoesToAnIdleWorkerBeforeQueueingBehindABusyOne) {
  WorkerPool pool(jobs(), workers(2));
  std::map<std::uint64_t, std::size_t> workerOf;
  pool.onResult([&](const TaskInfo& t, const CallResult&) { workerOf[t.id] = t.worker; });
  // The nap is a bound on quick's round trip: quick must be back before it
  // ends.
  const int napMs = static_cast<int>(test::slowMs(1000));
  auto slow = pool.submit("nap", {{"ms", napMs}});
  auto quick = pool.submit("pid");
  EXPECT_EQ(quick.get().as<int>(), pool.worker(1).pid());
  EXPECT_FALSE(slow.ready());  // quick did not wait behind it
  EXPECT_EQ(slow.get().as<int>(), napMs);
  EXPECT_EQ(workerOf[1], 0u);
  EXPECT_EQ(workerOf[2], 1u);
  // Both busy: the next tasks spread over both, not all on the first.
  std::vector<TaskFuture<Value>> fs;
  for (int i = 0; i < 4; ++i) fs.push_back(pool.submit("nap", {{"ms", 20}}));
  for (auto& f : fs) f.get();
  std::set<std::size_t> used;
  for (std::uint64_t id = 3; id <= 6; ++id) used.insert(workerOf[id]);
  EXPECT_EQ(used.size(), 2u);
}

// FunctionPool's workers run under SCHED_OTHER (latency) unless asked for
// SCHED_BATCH (batch jobs of tiny tasks).
TEST(Pool, FunctionPoolWorkersRunUnderBatchSchedulingWhenAsked) {
  FunctionPool<int()> normal([] { return ::sched_getscheduler(0); }, workers(1));
  EXPECT_EQ(normal.submit().get(), SCHED_OTHER);
  PoolOptions o = workers(1);
  o.batchScheduling = true;
  FunctionPool<int()> batch([] { return ::sched_getscheduler(0); }, o);
  EXPECT_EQ(batch.submit().get(), SCHED_BATCH);
}

// The tasks queued behind the one that was running when a worker died go
// back to the pool's queue untouched: they run once, on the replacement,
// their attempts not counted, their retries not spent.
TEST(Pool, TasksQueuedBehindADeadWorkersTaskRunOnceOnTheReplacement) {
  PoolOptions o = workers(1);
  o.retries = 0;
  ASSERT_GE(o.queueDepth, 4u);
  WorkerPool pool(jobs(), o);
  std::map<std::uint64_t, int> attempts;
  pool.onResult([&](const TaskInfo& t, const CallResult&) { attempts[t.id] = t.attempts; });
  const pid_t first = pool.worker(0).pid();
  auto crash = pool.submit("crash");
  std::vector<TaskFuture<Value>> behind;
  for (int i = 0; i < 3; ++i) behind.push_back(pool.submit("pid"));
  EXPECT_EQ(pool.submitted(), 4u);
  EXPECT_TRUE(test::contains(test::thrown<WorkerDied>([&] { crash.get(); }), "died (killed by SIGKILL)"));
  for (auto& f : behind) {
    const int pid = f.get().as<int>();
    EXPECT_NE(pid, first);
    EXPECT_EQ(pid, pool.worker(0).pid());
  }
  EXPECT_EQ(attempts.size(), 4u);
  for (std::uint64_t id = 2; id <= 4; ++id) EXPECT_EQ(attempts[id], 1) << "task " << id;
  EXPECT_EQ(pool.failedTasks(), 1u);
  EXPECT_EQ(pool.restarts(), 1u);
}

TEST(Pool, StopFailsWhatIsLeftAndDoesNotWaitForABusyWorker) {
  WorkerPool pool(jobs(), workers(2));
  auto hung = pool.submit("hang");
  std::vector<TaskFuture<Value>> queued;
  for (int i = 0; i < 5; ++i) queued.push_back(pool.submit("nap", {{"ms", 1000}}));
  pool.poll();
  const auto t0 = Clock::now();
  pool.stop();
  EXPECT_LT(Clock::now() - t0, test::slow(2s));
  EXPECT_EQ(test::thrown<PoolBroken>([&] { hung.get(); }), "task 1 ('hang'): the pool was stopped");
  for (auto& f : queued) EXPECT_TRUE(test::contains(test::thrown<PoolBroken>([&] { f.get(); }), "the pool was stopped"));
  EXPECT_FALSE(test::hasChildren());
  EXPECT_TRUE(test::contains(test::thrown<PoolBroken>([&] { pool.submit("pid"); }), "the pool was stopped"));
}

// A reply waiting when the timeout's timer runs (the owner was busy past
// the deadline) is read first: the task answered in time, so nothing says
// it timed out, its worker lives on, and no restart is counted.
TEST(Pool, ATaskThatAnsweredInTimeIsNeverReportedAsTimedOut) {
  PoolOptions o = workers(1);
  o.retries = 0;
  WorkerPool pool(jobs(), o);
  std::vector<WorkerEvent> events;
  pool.onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e); });
  std::vector<bool> results;
  pool.onResult([&](const TaskInfo&, const CallResult& r) { results.push_back(r.ok()); });
  const pid_t pid = pool.worker(0).pid();
  auto f = pool.submit("nap", {{"ms", 50}}, TaskOptions{150ms, std::nullopt});
  pool.poll();  // sent; the timer runs from here
  // Busy past the deadline: at the next wait the timer is due and the reply
  // waits. (50 ms of nap against 150 ms: the reply is there well before.)
  // The sleep is the deadline (behaviour) plus a bound on the reply's
  // arrival.
  std::this_thread::sleep_for(150ms + test::slow(250ms));
  EXPECT_EQ(f.get().as<int>(), 50);
  for (int i = 0; i < 3; ++i) pool.poll();  // anything the timer left behind runs now
  EXPECT_EQ(pool.worker(0).pid(), pid);
  EXPECT_TRUE(pool.worker(0).isAlive());
  EXPECT_TRUE(events.empty()) << events.front().what;
  EXPECT_EQ(results, std::vector<bool>{true});
  EXPECT_EQ(pool.restarts(), 0u);
  EXPECT_EQ(pool.failedTasks(), 0u);
}

// The restart limit guards against workers that die on their own: the
// pool's own kills for timeouts are not a crash loop.
TEST(Pool, TimeoutsDoNotCountTowardTheRestartLimit) {
  PoolOptions o = workers(1);
  o.retries = 0;
  o.restartLimit = 1;
  o.restartWindow = 60s;
  WorkerPool pool(jobs(), o);
  for (int i = 0; i < 3; ++i) {
    auto f = pool.submit("hang", {}, TaskOptions{50ms, std::nullopt});
    EXPECT_TRUE(test::contains(test::thrown<TaskTimeout>([&] { f.get(); }), "ran longer than its timeout of 50 ms"));
  }
  EXPECT_EQ(pool.restarts(), 3u);
  EXPECT_EQ(pool.submit("square", {{"x", 3}}).get().as<double>(), 9.0);
  // Deaths still count: the second within the window breaks the pool.
  for (int i = 0; i < 2; ++i) pool.submit("crash").result();
  const std::string err = test::thrown<PoolBroken>([&] { pool.submit("square", {{"x", 1}}); });
  EXPECT_TRUE(test::contains(err, "restart limit reached: 2 workers died on their own within 60000 ms (the limit is "
                                  "1): killed by SIGKILL (2)"))
      << err;
  EXPECT_EQ(pool.restarts(), 4u);
}

// A replacement that can never start (threads run, no fork server) breaks
// the pool at once with that reason: no retries, no restarts counted.
TEST(Pool, AReplacementThatCannotStartBreaksThePoolAtOnceWithItsCause) {
  PoolOptions o = workers(1);
  o.retries = 0;
  WorkerPool pool(jobs(), o);
  std::vector<WorkerEvent::Kind> events;
  pool.onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e.kind); });
  std::promise<void> leave;
  std::thread other([f = leave.get_future()]() mutable { f.wait(); });
  auto crash = pool.submit("crash");
  EXPECT_TRUE(test::contains(test::thrown<WorkerDied>([&] { crash.get(); }), "died (killed by SIGKILL)"));
  const auto t0 = Clock::now();
  pool.wait(test::slow(2s));
  const std::string err = test::thrown<PoolBroken>([&] { pool.submit("square", {{"x", 1}}); });
  EXPECT_LT(Clock::now() - t0, test::slow(1s));  // at once, not after retries
  leave.set_value();
  other.join();
  EXPECT_TRUE(test::contains(err, "worker 0 cannot be replaced: ")) << err;
  EXPECT_TRUE(test::contains(err, "cannot fork: this process already runs 2 threads")) << err;
  EXPECT_EQ(std::count(events.begin(), events.end(), WorkerEvent::Kind::StartFailed), 0);
  EXPECT_EQ(std::count(events.begin(), events.end(), WorkerEvent::Kind::Died), 1);
  EXPECT_EQ(pool.restarts(), 0u);
}

// Workers the pool kills itself (it broke, or stops) are not reported as
// deaths: one worker died, one Died event.
TEST(Pool, WorkersThePoolStopsItselfAreNotReportedAsDied) {
  PoolOptions o = workers(2);
  o.retries = 0;
  o.restartLimit = 0;
  o.queueDepth = 1;
  WorkerPool pool(jobs(), o);
  std::vector<WorkerEvent> events;
  pool.onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e); });
  auto hung = pool.submit("hang");
  auto crash = pool.submit("crash");
  EXPECT_TRUE(test::contains(test::thrown<WorkerDied>([&] { crash.get(); }), "died (killed by SIGKILL)"));
  EXPECT_TRUE(test::contains(test::thrown<PoolBroken>([&] { hung.get(); }),
                             "restart limit reached: 1 worker died on their own within 10000 ms (the limit is 0)"));
  pool.poll();
  pool.stop();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, WorkerEvent::Kind::Died);
  EXPECT_EQ(events[0].index, 1u);
}

// A task that throws is the task's result: the worker does not log an
// error for it (it logs at debug), and the owner gets the RemoteError.
TEST(Pool, ATaskThatThrowsIsItsResultNotAnErrorLog) {
  test::TempDir dir;
  std::string err, log;
  {
    const test::CaptureStderr capture(dir);
    WorkerPool pool(jobs(), workers(1));
    std::vector<TaskFuture<Value>> fs;
    for (int i = 0; i < 3; ++i) fs.push_back(pool.submit("fail"));
    for (auto& f : fs) err = test::thrown<RemoteError>([&] { f.get(); });
    pool.finalize();
    log = capture.text();
  }
  EXPECT_EQ(err, "Jobs.jobs-0: c__fail threw: this task fails");
  EXPECT_FALSE(test::contains(log, "this task fails")) << log;
}

int g_forkFailures = 0;  // forks left to fail with EAGAIN
pid_t failingFork() {
  if (g_forkFailures > 0) {
    --g_forkFailures;
    errno = EAGAIN;
    return -1;
  }
  return ::fork();
}

// A replacement that fails to start for want of a resource for a moment
// (EAGAIN from fork) is tried again, 50 ms, 100 ms, ... later; more
// failures in a row than restartLimit break the pool, saying so.
TEST(Pool, AReplacementThatFailsToStartForAMomentIsTriedAgain) {
  PoolOptions o = workers(1);
  o.retries = 0;
  o.restartLimit = 3;
  WorkerPool pool(jobs(), o);
  std::vector<WorkerEvent> events;
  pool.onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e); });
  auto count = [&](WorkerEvent::Kind k) {
    return std::count_if(events.begin(), events.end(), [k](const WorkerEvent& e) { return e.kind == k; });
  };
  const detail::ScopedSeam seam(detail::syscalls.fork, &failingFork);
  g_forkFailures = 2;
  pool.submit("crash").result();
  // Two retries, 50 and 100 ms apart, then a fork: bounded far above that.
  auto f = pool.submit("square", {{"x", 4}});
  ASSERT_TRUE(f.wait(test::slow(10s))) << "the task never reached the replacement";
  EXPECT_EQ(f.get().as<double>(), 16.0);
  EXPECT_EQ(count(WorkerEvent::Kind::StartFailed), 2);
  EXPECT_EQ(count(WorkerEvent::Kind::Restarted), 1);
  EXPECT_EQ(pool.restarts(), 1u);
  for (const auto& e : events) {
    if (e.kind == WorkerEvent::Kind::StartFailed) {
      EXPECT_TRUE(test::contains(e.what, "cannot fork the backend (fork): Resource temporarily unavailable")) << e.what;
    }
  }

  g_forkFailures = 100;
  pool.submit("crash").result();
  auto g = pool.submit("square", {{"x", 4}});
  ASSERT_TRUE(g.wait(test::slow(10s)));  // 4 tries 50 to 400 ms apart
  const CallResult r = g.result();
  const std::string err = test::thrown<PoolBroken>([&] { r.get(); });
  EXPECT_TRUE(test::contains(err, "worker 0 did not start 4 times in a row; the last time: ")) << err;
  EXPECT_TRUE(test::contains(err, "Resource temporarily unavailable")) << err;
  EXPECT_EQ(count(WorkerEvent::Kind::StartFailed), 2 + 4);
  EXPECT_EQ(pool.restarts(), 1u);  // the second replacement never started
  g_forkFailures = 0;
}

// A worker that dies in preRun__ (before it is ready), as a crash or the
// OOM killer would end it there.
class DiesStarting : public Jobs {
 public:
  using Jobs::Jobs;

 private:
  void preRun__() override { ::kill(::getpid(), SIGKILL); }
};

// A replacement that dies while it starts is not a permanent cause (it was
// one, and broke the pool at once, when a loaded machine crashed a starting
// worker): it is tried again, and only restartLimit failures in a row break
// the pool, with the last one's text.
TEST(Pool, AReplacementThatDiesWhileStartingIsTriedAgain) {
  PoolOptions o = workers(1);
  o.retries = 0;
  o.restartLimit = 3;
  int dying = 0;  // replacements to make that die while starting
  WorkerPool pool(
      [&dying](std::size_t i) -> std::unique_ptr<MessageProcess> {
        if (dying > 0) {
          --dying;
          return std::make_unique<DiesStarting>(i);
        }
        return std::make_unique<Jobs>(i);
      },
      o);
  std::vector<WorkerEvent> events;
  pool.onWorkerEvent([&](const WorkerEvent& e) { events.push_back(e); });
  auto count = [&](WorkerEvent::Kind k) {
    return std::count_if(events.begin(), events.end(), [k](const WorkerEvent& e) { return e.kind == k; });
  };
  dying = 2;
  pool.submit("crash").result();
  auto f = pool.submit("square", {{"x", 3}});
  ASSERT_TRUE(f.wait(test::slow(10s))) << "the task never reached a replacement";
  EXPECT_EQ(f.get().as<double>(), 9.0);
  EXPECT_EQ(count(WorkerEvent::Kind::StartFailed), 2);
  EXPECT_EQ(count(WorkerEvent::Kind::Restarted), 1);
  for (const auto& e : events) {
    if (e.kind == WorkerEvent::Kind::StartFailed) {
      EXPECT_TRUE(test::contains(e.what, "SIGKILL")) << e.what;
    }
  }

  dying = 100;
  pool.submit("crash").result();
  auto g = pool.submit("square", {{"x", 4}});
  ASSERT_TRUE(g.wait(test::slow(10s)));  // 4 tries 50 to 400 ms apart
  const std::string err = test::thrown<PoolBroken>([&] { g.get(); });
  EXPECT_TRUE(test::contains(err, "worker 0 did not start 4 times in a row; the last time: ")) << err;
}

}  // namespace
}  // namespace forklift
