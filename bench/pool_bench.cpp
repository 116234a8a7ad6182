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
#include <benchmark/benchmark.h>

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

}  // namespace

BENCHMARK_MAIN();
