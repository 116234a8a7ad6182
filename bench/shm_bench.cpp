// forklift - shared-memory handoff benchmark
//
// What a ShmArray buys: the frontend fills an array of doubles in place,
// calls "sum" on a MessageProcess whose backend has the array open; the
// backend reads every element and answers. That handoff is measured beside, in the same
// run:
//   memcpy of the same bytes (what copying the data once would cost), and
//   the same fill-then-read done in one process, on heap memory and on a
//   shared-memory array, with no second process at all.
// DESIGN.md asks the handoff to reach 0.9x of the one-process fill-then-read
// for 1 MiB and more. Every case reports the array size per iteration as
// bytes processed, so the GB/s figures compare directly. The fill_ms and
// read_ms counters split each iteration into the fill and the read (the
// backend times its own read). Sizes are in KiB: 64 KiB to 128 MiB.
//
//   build/bench/shm_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "forklift/process.hpp"
#include "forklift/shm_array.hpp"
#include "median.hpp"
#include "placement.hpp"

namespace {

using forklift::bench::Median;

using forklift::bench::pinTo;
using forklift::bench::placement;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr std::int64_t kKiB = 1 << 10;  // benchmark arguments are sizes in KiB

// The backend of the handoff: a MessageProcess whose arrays are created in
// the frontend (server side, before the fork) and opened in preRun__
// (client side). "sum" reads every element of one array and returns the
// sum; the backend times its own read.
class Summer : public forklift::MessageProcess {
 public:
  Summer(Eigen::Index n, int arrays) : MessageProcess("summer") {
    for (int i = 0; i < arrays; ++i) arrays_.push_back(forklift::ShmArray<double>::create("bench", n));
    command("sum", &Summer::c__sum, {"slot"});
  }
  forklift::ShmArray<double>& array(std::size_t i) { return arrays_[i]; }

 private:
  void preRun__() override {
    pinTo(placement().backend);
    for (const auto& a : arrays_) clients_.push_back(forklift::ShmArray<double>::open(a.name()));
  }
  forklift::List c__sum(std::size_t slot) {
    const auto t0 = Clock::now();
    const double sum = clients_.at(slot).matrix().sum();
    return {sum, std::chrono::duration<double>(Clock::now() - t0).count()};
  }
  std::vector<forklift::ShmArray<double>> arrays_;
  std::vector<forklift::ShmArray<double>> clients_;
};

// One array (valkka-multiprocess's way), or `arrays` used in turn (the way
// iceoryx's loaned chunks come from a pool): with one array, the frontend
// writes lines the backend's core read a moment ago, and on two cores each
// write first takes the line back from the other core's cache.
void handoff(benchmark::State& state, int arrays) {
  pinTo(placement().frontend);
  const std::int64_t bytes = state.range(0) * kKiB;
  const Eigen::Index n = bytes / static_cast<std::int64_t>(sizeof(double));
  Summer backend(n, arrays);
  backend.start();
  // Warm-up: both sides touch every page once, outside the timing.
  for (int i = 0; i < arrays; ++i) {
    backend.array(static_cast<std::size_t>(i)).matrix().setConstant(1.0);
    backend.call("sum", {{"slot", i}});
  }

  double value = 0;
  double fillSeconds = 0;
  double readSeconds = 0;
  Median median;
  int slot = 0;
  for (auto _ : state) {
    value += 1.0;
    auto m = backend.array(static_cast<std::size_t>(slot)).matrix();
    const auto t0 = Clock::now();
    m.setConstant(value);
    const auto t1 = Clock::now();
    const auto reply = backend.call("sum", {{"slot", slot}}, 60s).as<forklift::List>();
    const auto t2 = Clock::now();
    slot = (slot + 1) % arrays;
    state.SetIterationTime(std::chrono::duration<double>(t2 - t0).count());
    median.add(std::chrono::duration<double>(t2 - t0).count());
    fillSeconds += std::chrono::duration<double>(t1 - t0).count();
    readSeconds += reply.at(1).as<double>();
    if (reply.at(0).as<double>() != value * static_cast<double>(n)) {
      state.SkipWithError("the backend read a wrong sum");
      break;
    }
  }
  backend.stop();
  median.report(state, bytes);
  state.SetBytesProcessed(state.iterations() * bytes);
  // Where the time goes: the frontend's fill and the backend's read, per
  // iteration; the rest is the call's two messages and wake-ups.
  state.counters["fill_ms"] = benchmark::Counter(fillSeconds * 1e3, benchmark::Counter::kAvgIterations);
  state.counters["read_ms"] = benchmark::Counter(readSeconds * 1e3, benchmark::Counter::kAvgIterations);
  state.SetLabel(placement().describe());
}

void BM_ShmHandoff(benchmark::State& state) { handoff(state, 1); }
BENCHMARK(BM_ShmHandoff)->Arg(64)->Arg(1024)->Arg(16384)->Arg(131072)->UseManualTime()->Unit(benchmark::kMillisecond);

void BM_ShmHandoff4(benchmark::State& state) { handoff(state, 4); }
BENCHMARK(BM_ShmHandoff4)->Arg(64)->Arg(1024)->Arg(16384)->Arg(131072)->UseManualTime()->Unit(benchmark::kMillisecond);

void BM_Memcpy(benchmark::State& state) {
  pinTo(placement().frontend);
  forklift::bench::memcpyBench(state, state.range(0) * kKiB);
}
BENCHMARK(BM_Memcpy)->Arg(64)->Arg(1024)->Arg(16384)->Arg(131072)->UseRealTime()->Unit(benchmark::kMillisecond);

// The same fill and sum as the handoff, in one process.
template <class M>
void fillThenRead(benchmark::State& state, M m, std::int64_t bytes) {
  m.setConstant(1.0);
  double value = 0;
  double fillSeconds = 0;
  double readSeconds = 0;
  Median median;
  for (auto _ : state) {
    value += 1.0;
    const auto t0 = Clock::now();
    m.setConstant(value);
    benchmark::ClobberMemory();  // the sum must read memory, not the constant
    const auto t1 = Clock::now();
    double s = m.sum();
    benchmark::DoNotOptimize(s);
    const auto t2 = Clock::now();
    fillSeconds += std::chrono::duration<double>(t1 - t0).count();
    readSeconds += std::chrono::duration<double>(t2 - t1).count();
    median.add(std::chrono::duration<double>(t2 - t0).count());
  }
  median.report(state, bytes);
  state.SetBytesProcessed(state.iterations() * bytes);
  state.counters["fill_ms"] = benchmark::Counter(fillSeconds * 1e3, benchmark::Counter::kAvgIterations);
  state.counters["read_ms"] = benchmark::Counter(readSeconds * 1e3, benchmark::Counter::kAvgIterations);
}

void BM_FillThenReadHeap(benchmark::State& state) {
  pinTo(placement().frontend);
  const std::int64_t bytes = state.range(0) * kKiB;
  // 64-byte aligned like a shared-memory payload, so only the memory differs.
  std::unique_ptr<double, decltype(&std::free)> heap(
      static_cast<double*>(std::aligned_alloc(64, static_cast<std::size_t>(bytes))), &std::free);
  fillThenRead(state, Eigen::Map<Eigen::VectorXd, Eigen::Aligned64>(heap.get(), bytes / 8), bytes);
}
// 2 and 4 MiB: what one turn of a 1 MiB pipeline on one CPU touches when it
// batches two or four slots (the figure behind bench/compare's 1 MiB bound).
BENCHMARK(BM_FillThenReadHeap)->Arg(64)->Arg(1024)->Arg(2048)->Arg(4096)->Arg(16384)->Arg(131072)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_FillThenReadShm(benchmark::State& state) {
  pinTo(placement().frontend);
  const std::int64_t bytes = state.range(0) * kKiB;
  auto array = forklift::ShmArray<double>::create("bench1p", bytes / static_cast<std::int64_t>(sizeof(double)));
  fillThenRead(state, array.matrix(), bytes);
}
BENCHMARK(BM_FillThenReadShm)->Arg(64)->Arg(1024)->Arg(16384)->Arg(131072)->UseRealTime()->Unit(benchmark::kMillisecond);

// Creating and destroying a 1 MiB array: Arg 0 anonymous (the default, a
// sealed memfd), Arg 1 named (/dev/shm). Every page is reserved at create.
void BM_CreateArray1MiB(benchmark::State& state) {
  pinTo(placement().frontend);
  const bool named = state.range(0) == 1;
  for (auto _ : state) {
    auto a = forklift::ShmArray<double>::create(named ? forklift::ShmName::named("create") : forklift::ShmName("create"),
                                                kKiB * 1024 / static_cast<std::int64_t>(sizeof(double)));
    benchmark::DoNotOptimize(a.data());
  }
  state.SetLabel(named ? "named" : "anonymous");
}
BENCHMARK(BM_CreateArray1MiB)->Arg(0)->Arg(1)->UseRealTime()->Unit(benchmark::kMicrosecond);

// The limit: a bare memfd of 1 MiB, pages reserved, mapped and unmapped.
void BM_RawMemfd1MiB(benchmark::State& state) {
  pinTo(placement().frontend);
  constexpr std::size_t kBytes = 1u << 20;
  for (auto _ : state) {
    const int fd = ::memfd_create("raw", MFD_CLOEXEC);
    if (fd < 0 || ::posix_fallocate(fd, 0, kBytes) != 0) state.SkipWithError("memfd");
    void* p = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    benchmark::DoNotOptimize(p);
    ::munmap(p, kBytes);
    ::close(fd);
  }
}
BENCHMARK(BM_RawMemfd1MiB)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
