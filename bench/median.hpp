// forklift benchmarks - what the shared-memory benchmarks report alike
//
// Google Benchmark reports the mean time of an iteration; a handoff's tail
// (a wake-up that comes late) would dominate it. The peers report the median
// iteration, so these benchmarks do too, as a counter: GB/s at the median.
// `memcpyBench` is the memory limit they are set beside.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace forklift::bench {

class Median {
 public:
  void add(double seconds) { s_.push_back(seconds); }
  void report(benchmark::State& state, std::int64_t bytes) {
    if (s_.empty()) return;
    std::nth_element(s_.begin(), s_.begin() + static_cast<std::ptrdiff_t>(s_.size() / 2), s_.end());
    state.counters["GBps_p50"] = static_cast<double>(bytes) / s_[s_.size() / 2] / 1e9;
  }

 private:
  std::vector<double> s_;
};

// memcpy of `bytes` between two heap buffers, timed per iteration.
inline void memcpyBench(benchmark::State& state, std::int64_t bytes) {
  using Clock = std::chrono::steady_clock;
  const auto size = static_cast<std::size_t>(bytes);
  auto src = std::make_unique<char[]>(size);
  auto dst = std::make_unique<char[]>(size);
  std::memset(src.get(), 1, size);
  std::memset(dst.get(), 2, size);
  Median median;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    std::memcpy(dst.get(), src.get(), size);
    benchmark::ClobberMemory();
    median.add(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  benchmark::DoNotOptimize(dst[size - 1]);
  median.report(state, bytes);
  state.SetBytesProcessed(state.iterations() * bytes);
}

}  // namespace forklift::bench
