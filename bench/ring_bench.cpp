// forklift - ring buffer benchmarks
//
// A frontend writes slots of a RingBuffer in place while its backend (a
// MessageProcess whose libuv loop watches the ring's doorbell) reads them
// in place, so the frontend fills slot k+1 while the backend reads slot k:
//   BM_RingFrames/<KiB>   raw slots of 64 KiB, 1 MiB, 6 MiB (8 slots): the
//                         writer memsets the frame, the reader sums it as
//                         64-bit words; frames/s and GB/s, beside
//                         BM_RingMemcpy of the same sizes (the memory
//                         limit: each byte written once and read once).
//   BM_RingPingPong/<us>  the reader's wake-up: a 64-byte slot there through
//                         one ring and back through another, without (0) or
//                         with 50 us of spinning before each side sleeps;
//                         p50/p99 round trip beside process_bench's raw
//                         eventfd round trip.
//   BM_RingHandoff/<KiB>  the pipelined array handoff: the same fill of
//                         doubles and sum as shm_bench's BM_ShmHandoff and
//                         BM_FillThenReadHeap (the one-process limit), at 64
//                         KiB, 1 MiB (4 slots), 16 MiB (2 slots), without a
//                         call per array.
// An iteration is one slot at the frontend: reserve (waiting for a free
// slot when the backend is behind), fill, commit. The backend checks every
// slot (sum against the value in the slot's metadata); a wrong one fails
// the benchmark. GBps_p50 is the bytes of one slot over the median
// iteration, as in shm_bench.
//
//   build/bench/ring_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "forklift/process.hpp"
#include "forklift/ring_buffer.hpp"
#include "median.hpp"
#include "placement.hpp"

namespace {

using forklift::bench::pinTo;
using forklift::bench::placement;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr std::int64_t kKiB = 1 << 10;

using forklift::bench::Median;

enum class Kind { Frames, Doubles };

// The backend: reads every slot the moment its loop is woken, checks it,
// releases it; "report" answers {slots read, wrong slots}.
class RingReaderProcess : public forklift::MessageProcess {
 public:
  RingReaderProcess(Kind kind, std::int64_t bytes, std::size_t slots)
      : MessageProcess("ring-reader"), kind_(kind),
        ring_(kind == Kind::Frames
                  ? forklift::RingBuffer::create("bench-ring", slots, static_cast<std::size_t>(bytes))
                  : forklift::RingBuffer::createArray<double>("bench-ring", slots, {bytes / 8})) {
    command("report", &RingReaderProcess::c__report);
  }
  ~RingReaderProcess() override { stop(); }
  forklift::RingBuffer& ring() { return ring_; }

 private:
  void preRun__() override {
    pinTo(placement().backend);
    reader_ = ring_.reader();
    watch__(reader_.fd(), [this](int) { drain(); });
    drain();
  }
  void postRun__() override {
    unwatch__(reader_.fd());
    reader_ = {};
  }

  void drain() {
    reader_.drainDoorbell();
    do {
      while (auto s = reader_.tryNext()) {
        ++read_;
        if (!check(*s)) ++wrong_;
      }
    } while (!reader_.arm());
  }

  bool check(const forklift::ReadSlot& s) const {
    if (kind_ == Kind::Doubles) {
      const double sum = s.matrix<double>().sum();
      return sum == static_cast<double>(s.user(0)) * static_cast<double>(s.bytes() / 8);
    }
    const auto* w = reinterpret_cast<const std::uint64_t*>(s.data());
    const std::size_t n = s.bytes() / 8;
    std::uint64_t sum = 0;
    for (std::size_t i = 0; i < n; ++i) sum += w[i];
    return sum == static_cast<std::uint64_t>(s.user(0)) * 0x0101010101010101ull * n;
  }

  forklift::List c__report() { return {static_cast<std::int64_t>(read_), static_cast<std::int64_t>(wrong_)}; }

  Kind kind_;
  forklift::RingBuffer ring_;
  forklift::RingReader reader_;
  std::uint64_t read_ = 0;
  std::uint64_t wrong_ = 0;
};

void fill(forklift::WriteSlot& s, Kind kind, std::int64_t value) {
  if (kind == Kind::Doubles) {
    s.matrix<double>().setConstant(static_cast<double>(value));
  } else {
    std::memset(s.data(), static_cast<int>(value), s.capacity());
  }
  s.setUser(0, value);
}

void pipeline(benchmark::State& state, Kind kind, std::size_t slots) {
  pinTo(placement().frontend);
  const std::int64_t bytes = state.range(0) * kKiB;
  RingReaderProcess backend(kind, bytes, slots);
  backend.start();
  forklift::RingWriter writer = backend.ring().writer();
  // Warm-up: every slot written and read once, outside the timing.
  for (std::size_t i = 0; i < slots; ++i) {
    forklift::WriteSlot s = writer.reserve(60s);
    fill(s, kind, 1);
    s.commit();
  }

  std::int64_t value = 1;
  Median median;
  for (auto _ : state) {
    value = value % 200 + 1;  // a byte, for the frames' memset
    const auto t0 = Clock::now();
    forklift::WriteSlot s = writer.reserve(60s);
    fill(s, kind, value);
    s.commit();
    const auto dt = std::chrono::duration<double>(Clock::now() - t0).count();
    state.SetIterationTime(dt);
    median.add(dt);
  }
  // Until the backend has read everything, then its verdict.
  const auto end = Clock::now() + 30s;
  while (backend.ring().stats().consumed < backend.ring().stats().committed && Clock::now() < end)
    std::this_thread::sleep_for(100us);
  const auto report = backend.call("report").as<forklift::List>();
  const auto committed = static_cast<std::int64_t>(backend.ring().stats().committed);
  if (report.at(0).as<std::int64_t>() != committed)
    state.SkipWithError("the backend did not read every slot");
  else if (report.at(1).as<std::int64_t>() != 0)
    state.SkipWithError("the backend read a wrong slot");
  writer = {};
  backend.stop();
  median.report(state, bytes);
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetItemsProcessed(state.iterations());  // frames/s
  state.SetLabel(placement().describe());
}

void BM_RingFrames(benchmark::State& state) { pipeline(state, Kind::Frames, 8); }
BENCHMARK(BM_RingFrames)->Arg(64)->Arg(1024)->Arg(6144)->UseManualTime()->Unit(benchmark::kMicrosecond);

// Four slots up to 1 MiB, where a fill is as short as a wake-up across CPUs
// and the slack keeps the writer from waiting; two (double buffering) at 16
// MiB, where a fill takes far longer than any wake-up and every slot more is
// 16 MiB more out of the cache. ring_buffer.hpp gives users the same advice.
void BM_RingHandoff(benchmark::State& state) { pipeline(state, Kind::Doubles, state.range(0) >= 4096 ? 2 : 4); }
BENCHMARK(BM_RingHandoff)->Arg(64)->Arg(1024)->Arg(16384)->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_RingPingPong(benchmark::State& state) {
  pinTo(placement().frontend);
  const std::chrono::microseconds spin(state.range(0));
  auto there = forklift::RingBuffer::create("bench-ping", 4, 64);
  auto back = forklift::RingBuffer::create("bench-pong", 4, 64);
  auto backReader = back.reader();
  backReader.setSpin(spin);
  std::fflush(nullptr);
  const pid_t child = ::fork();
  if (child == 0) {
    int code = 1;
    try {
      pinTo(placement().backend);
      auto in = there.reader();
      auto out = back.writer();
      in.setSpin(spin);
      out.setSpin(spin);
      for (;;) {
        auto s = in.next(10s);  // PeerClosed once the frontend's writer goes
        if (!s) break;
        s->release();
        out.push({}, 10s);
      }
    } catch (const forklift::PeerClosed&) {
      code = 0;
    } catch (...) {
    }
    ::_exit(code);
  }
  std::vector<double> us;
  {
    auto writer = there.writer();
    us.reserve(1 << 20);
    for (auto _ : state) {
      const auto t0 = Clock::now();
      writer.push({}, 10s);
      if (!backReader.next(10s)) {
        state.SkipWithError("no answer within 10 s");
        break;
      }
      us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
  }  // the writer detaches: the child ends
  int st = 0;
  ::waitpid(child, &st, 0);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) state.SkipWithError("the ping-pong child failed");
  if (!us.empty()) {
    std::sort(us.begin(), us.end());
    state.counters["p50_us"] = us[us.size() / 2];
    state.counters["p99_us"] = us[std::min(us.size() - 1, us.size() * 99 / 100)];
  }
  state.SetLabel(placement().describe());
}
BENCHMARK(BM_RingPingPong)->Arg(0)->Arg(50)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_RingMemcpy(benchmark::State& state) {
  pinTo(placement().frontend);
  forklift::bench::memcpyBench(state, state.range(0) * kKiB);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_RingMemcpy)->Arg(64)->Arg(1024)->Arg(6144)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
