// forklift benchmarks - WorkerPool: empty tasks per second
//
// The same empty task (a function of one int that returns it) run through a
// FunctionPool of 1, 2, 4 and 8 workers, every round 2,000 tasks submitted
// and waited for. BM_PoolEmptyTasks/<workers> is the pool as a user gets it:
// PoolOptions' defaults (queue depth, shared-memory transport).
// BM_PoolEmptyTasksAtDepth/<workers>/<depth> sets the queue depth: at depth
// 1 every task is a round trip, and one worker's time per task there minus
// a bare call()'s (BM_BareCallEmpty: the same empty command on one backend,
// over the same transport) is the pool's own cost per task (bench/compare
// works it out). The processes are not pinned: a pool spreads over the CPUs
// it has, as Python's peers do (bench/peers/pool_peer.py runs the same tasks
// in multiprocessing.Pool and concurrent.futures.ProcessPoolExecutor).
//
// SCHED_BATCH or not (PoolOptions::batchScheduling), on both kinds of work:
// BM_PoolThroughputScheduling/<batch> is the empty-task throughput above (4
// workers); BM_PoolLatencyScheduling/<batch> is a latency pipeline's
// detector: one task of about 2 ms of CPU every 10 ms (a frame), on a pool of
// 3 workers, beside 3 processes that spin (other stages of the program, or
// other programs), reporting the task's latency from submit to result at
// the median and the 99th percentile (p50_ms, p99_ms).
#include <benchmark/benchmark.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include <forklift.hpp>

namespace {

constexpr int kTasks = 2000;

void runPool(benchmark::State& state, const forklift::PoolOptions& o) {
  forklift::FunctionPool<int(int)> pool([](int x) { return x; }, o);
  std::int64_t wrong = 0;
  std::vector<forklift::TaskFuture<int>> fs;
  fs.reserve(kTasks);
  for (auto _ : state) {
    fs.clear();
    for (int i = 0; i < kTasks; ++i) fs.push_back(pool.submit(i));
    for (int i = 0; i < kTasks; ++i) wrong += fs[static_cast<std::size_t>(i)].get() != i;
  }
  pool.finalize();
  if (wrong) state.SkipWithError("wrong results");
  state.SetItemsProcessed(state.iterations() * kTasks);
  state.SetLabel(std::to_string(o.workers) + " workers, queue depth " + std::to_string(o.queueDepth));
}

void BM_PoolEmptyTasks(benchmark::State& state) {
  forklift::PoolOptions o;
  o.workers = static_cast<std::size_t>(state.range(0));
  runPool(state, o);
}
BENCHMARK(BM_PoolEmptyTasks)->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_PoolEmptyTasksAtDepth(benchmark::State& state) {
  forklift::PoolOptions o;
  o.workers = static_cast<std::size_t>(state.range(0));
  o.queueDepth = static_cast<std::size_t>(state.range(1));
  runPool(state, o);
}
BENCHMARK(BM_PoolEmptyTasksAtDepth)
    ->Args({1, 1})
    ->Args({4, 16})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

class Empty : public forklift::MessageProcess {
 public:
  // The transport of FunctionPool's workers.
  Empty() : MessageProcess("empty", forklift::PoolOptions().process) { command("call", &Empty::c__call, {"x"}); }

 private:
  int c__call(int x) { return x; }
};

// The reference: the same empty command as a blocking call() on one backend,
// over the transport the pool's workers use.
void BM_BareCallEmpty(benchmark::State& state) {
  Empty p;
  p.start();
  std::int64_t wrong = 0;
  for (auto _ : state)
    for (int i = 0; i < kTasks; ++i) wrong += p.call("call", {{"x", i}}).as<int>() != i;
  p.stop();
  if (wrong) state.SkipWithError("wrong results");
  state.SetItemsProcessed(state.iterations() * kTasks);
}
BENCHMARK(BM_BareCallEmpty)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_PoolThroughputScheduling(benchmark::State& state) {
  forklift::PoolOptions o;
  o.workers = 4;
  o.batchScheduling = state.range(0) != 0;
  runPool(state, o);
  state.SetLabel(o.batchScheduling ? "SCHED_BATCH" : "SCHED_OTHER");
}
BENCHMARK(BM_PoolThroughputScheduling)->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();

// CPU work of about `ms` (a detector's inference, say).
int spinFor(int ms) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  int n = 0;
  while (std::chrono::steady_clock::now() < end) ++n;
  return n;
}

void BM_PoolLatencyScheduling(benchmark::State& state) {
  constexpr int kFrames = 300;
  forklift::PoolOptions o;
  o.workers = 3;
  o.batchScheduling = state.range(0) != 0;
  forklift::FunctionPool<int(int)> pool(spinFor, o);
  std::vector<pid_t> hogs;  // CPU-bound neighbours, forked after the pool
  for (int i = 0; i < 3; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      volatile unsigned n = 0;
      for (;;) n = static_cast<unsigned>(n) + 1u;  // never leaves: killed below
    }
    if (pid > 0) hogs.push_back(pid);
  }
  std::vector<double> ms;
  for (auto _ : state) {
    ms.clear();
    for (int f = 0; f < kFrames; ++f) {
      const auto t0 = std::chrono::steady_clock::now();
      pool.submit(2).get();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      std::this_thread::sleep_until(t0 + std::chrono::milliseconds(10));
    }
  }
  for (pid_t h : hogs) ::kill(h, SIGKILL);
  for (pid_t h : hogs) ::waitpid(h, nullptr, 0);
  pool.finalize();
  std::sort(ms.begin(), ms.end());
  state.counters["p50_ms"] = ms[ms.size() / 2];
  state.counters["p99_ms"] = ms[ms.size() * 99 / 100];
  state.SetLabel(o.batchScheduling ? "SCHED_BATCH" : "SCHED_OTHER");
}
BENCHMARK(BM_PoolLatencyScheduling)->Arg(1)->Arg(0)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
