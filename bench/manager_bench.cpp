// forklift benchmarks - Manager fan-in
//
// N workers send small messages as fast as they can; the manager's loop
// receives them all. Every round moves the same total (64,000 messages), so
// the figures compare directly: the cost of an event must not grow with the
// number of workers.
#include <benchmark/benchmark.h>

#include <condition_variable>
#include <forklift.hpp>
#include <mutex>

#include "placement.hpp"

namespace {

using forklift::bench::pinTo;
using forklift::bench::placement;

constexpr int kTotal = 64000;

class Sender : public forklift::MessageProcess {
 public:
  explicit Sender(std::string name) : MessageProcess(std::move(name)) {
    command("blast", &Sender::c__blast, {"n"});
  }

 private:
  void preRun__() override { pinTo(placement().backend); }
  void c__blast(int n) {
    const forklift::Message m("data", {{"parameter", "gotcha!"}});
    for (int i = 0; i < n; ++i) sendOut__(m);
    sendOut__(forklift::Message("done"));
  }
};

void BM_ManagerFanIn(benchmark::State& state) {
  pinTo(placement().frontend);
  const int workers = static_cast<int>(state.range(0));
  const int each = kTotal / workers;
  forklift::Manager m;
  for (int i = 0; i < workers; ++i) m.emplace<Sender>("sender" + std::to_string(i));
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  std::int64_t received = 0;
  m.onMessage([&](forklift::MessageProcess&, forklift::Message& msg) {
    if (msg.command() == "data") {
      ++received;
      return;
    }
    std::lock_guard lock(mu);
    ++done;
    cv.notify_one();
  });
  m.runAsThread();
  for (auto _ : state) {
    {
      std::lock_guard lock(mu);
      done = 0;
    }
    for (std::size_t i = 0; i < m.size(); ++i) m.worker(i).send("blast", {{"n", each}});
    std::unique_lock lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(60), [&] { return done == workers; })) state.SkipWithError("timeout");
  }
  m.stopThread();
  if (received != static_cast<std::int64_t>(state.iterations()) * each * workers) state.SkipWithError("lost messages");
  state.SetItemsProcessed(received);
  state.SetLabel(placement().describe() + " (all workers)");
}
BENCHMARK(BM_ManagerFanIn)->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
