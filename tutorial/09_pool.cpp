// Tutorial step 9: a pool of workers computing on a shared-memory array.
//
// A FunctionPool runs one function in N forked workers. Here each task
// computes one row of a frame that lives in shared memory (made before the
// pool, so every worker has it mapped) and returns the row's sum; the
// frontend checks each sum against what it reads from the same memory.
// Along the way:
//   - a progress line updates in place on a terminal (plain lines when the
//     output is a file or a pipe);
//   - one task hangs: past its timeout its worker is killed and replaced,
//     and the task fails with TaskTimeout;
//   - one worker is killed from outside (SIGKILL) in the middle of the run:
//     it is replaced, and the row it was computing runs again (one retry).
//
//   09_pool [--workers N] [--rows R]
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <forklift.hpp>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;

constexpr Eigen::Index kCols = 50000;

double value(int row, Eigen::Index col) { return std::sin(0.0001 * static_cast<double>(col) + row); }

// One line that redraws itself on a terminal; elsewhere a line per quarter.
class ProgressLine {
 public:
  ProgressLine() : tty_(::isatty(STDOUT_FILENO) == 1) {}
  void show(double p) {
    if (tty_) {
      const int filled = static_cast<int>(p * 30);
      std::printf("\r[%-30s] %3.0f%%", std::string(static_cast<std::size_t>(filled), '#').c_str(), p * 100);
      std::fflush(stdout);
      return;
    }
    const int quarter = static_cast<int>(p * 4);
    while (shown_ < quarter) std::printf("progress: %d%%\n", 25 * ++shown_);
  }
  // Lines printed beside the progress line start on a fresh line.
  void interrupt() {
    if (tty_) std::printf("\r%50s\r", "");
  }

 private:
  bool tty_;
  int shown_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  forklift::PoolOptions options;
  options.workers = 4;
  int rows = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--workers") == 0) options.workers = static_cast<std::size_t>(std::atoi(argv[i + 1]));
    if (std::strcmp(argv[i], "--rows") == 0) rows = std::atoi(argv[i + 1]);
  }

  // Made before the pool: every worker is forked with it mapped.
  auto frame = forklift::ShmArray<double>::create("pool-frame", rows, kCols);
  std::printf("pool of %zu workers, frame %s: %d x %ld doubles\n", options.workers, frame.name().c_str(), rows,
              static_cast<long>(kCols));

  // The task: fill one row (row -1 hangs, to show the timeout), return its sum.
  forklift::FunctionPool<double(int)> pool(
      [&frame](int row) {
        if (row < 0)
          for (;;) ::pause();
        auto m = frame.matrix();
        double sum = 0;
        for (Eigen::Index c = 0; c < kCols; ++c) sum += m(row, c) = value(row, c);
        std::this_thread::sleep_for(20ms);  // a task that takes a moment, so the progress shows
        return sum;
      },
      options);

  ProgressLine progress;
  pool.pool().onProgress([&](double p) { progress.show(p); });
  pool.pool().onWorkerEvent([&](const forklift::WorkerEvent& e) {
    using Kind = forklift::WorkerEvent::Kind;
    progress.interrupt();
    if (e.kind == Kind::Died) std::printf("worker %zu died: %s\n", e.index, e.status.describe().c_str());
    if (e.kind == Kind::TimedOut) std::printf("worker %zu was killed: a task ran past its timeout\n", e.index);
    if (e.kind == Kind::Restarted) std::printf("worker %zu replaced by a new process\n", e.index);
  });
  int results = 0;
  pool.pool().onResult([&](const forklift::TaskInfo&, const forklift::CallResult&) {
    // Midway, a worker dies from outside, as an OOM kill would do it.
    if (++results == 10) ::kill(pool.pool().worker(1).pid(), SIGKILL);
  });

  auto hung = pool.submitWith(forklift::TaskOptions{1000ms, 0}, -1);
  std::vector<forklift::TaskFuture<double>> sums;
  for (int r = 0; r < rows; ++r) sums.push_back(pool.submit(r));

  int match = 0;
  const auto m = frame.matrix();
  for (int r = 0; r < rows; ++r) {
    const double sum = sums[static_cast<std::size_t>(r)].get();
    if (std::abs(sum - m.row(r).sum()) < 1e-6) ++match;
  }
  try {
    hung.get();
  } catch (const forklift::TaskTimeout& e) {
    progress.interrupt();
    std::printf("the hanging task failed: %s\n", e.what());
  }
  pool.finalize();
  std::printf("%d of %d rows match the values read from shared memory\n", match, rows);
  std::printf("workers replaced: %zu\n", pool.pool().restarts());
  return match == rows ? 0 : 1;
}
