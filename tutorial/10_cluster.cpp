// Tutorial step 10: step 9's pool, spread over hosts with MPI.
//
// The same kind of work as 09_pool: each task computes one row of a frame
// (50,000 values) and returns the row's sum; the driver computes the same
// sums itself and checks every result. But the workers now live on other
// hosts: this one program runs as every rank of an MPI job. Rank 0 is the
// driver (this main); every other rank is an agent that forks its host's
// workers and serves the driver until it finalizes. Along the way:
//   - each result says where it ran (host, rank, worker, pid), and the
//     driver prints how many rows each host computed;
//   - one task hangs: past its timeout its worker is killed and replaced
//     on its host, and the task fails with TaskTimeout naming the host;
//   - one task crashes its worker (SIGSEGV): that task fails with
//     WorkerDied, the agent replaces the worker, the other rows go on.
//
//   mpirun --oversubscribe -np 3 10_cluster [--workers N] [--rows R]
//
// (--workers: workers per host; on one machine, FORKLIFT_CLUSTER_HOST=
// host{rank} gives each rank a host name of its own.)
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <forklift.hpp>
#include <forklift/cluster/pool.hpp>
#include <forklift/cluster/world.hpp>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using namespace std::chrono_literals;
namespace cluster = forklift::cluster;

constexpr int kCols = 50000;

double value(int row, int col) { return std::sin(0.0001 * static_cast<double>(col) + row); }

// The task, as every host runs it. Row -1 hangs, to show the timeout.
double rowSum(int row) {
  if (row < 0)
    for (;;) ::pause();
  double sum = 0;
  for (int c = 0; c < kCols; ++c) sum += value(row, c);
  std::this_thread::sleep_for(20ms);  // a task that takes a moment
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  cluster::AgentOptions options;
  int rows = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--workers") == 0) options.workers = static_cast<std::size_t>(std::atoi(argv[i + 1]));
    if (std::strcmp(argv[i], "--rows") == 0) rows = std::atoi(argv[i + 1]);
  }

  // 1. Every function a task may name, registered by name in every rank.
  cluster::define("row_sum", [](const forklift::List& a) { return forklift::Value(rowSum(a.at(0).as<int>())); });
  cluster::define("crash", [](const forklift::List&) -> forklift::Value {
    ::raise(SIGSEGV);
    return {};
  });
  // 2. The Agent (this host's workers, forked now: one thread, no MPI yet),
  //    then the World (MPI_Init). On the driver the Agent forks nothing.
  cluster::Agent agent(options);
  cluster::World world;
  // 3. Agents serve until the driver's pool finalizes.
  if (!world.isDriver()) return agent.serve(world);

  std::printf("driver on %s; %d agents of %zu workers each:", world.host().c_str(), world.size() - 1,
              options.workers);
  for (int r = 1; r < world.size(); ++r) std::printf(" %s (rank %d)", world.host(r).c_str(), r);
  std::printf("\n");

  cluster::Pool pool(world);
  auto hung = pool.submit("row_sum", {-1}, forklift::Timeout(1000));
  auto crashed = pool.submit("crash", {});
  std::vector<cluster::ClusterFuture> sums;
  for (int r = 0; r < rows; ++r) sums.push_back(pool.submit("row_sum", {r}));

  int match = 0;
  std::map<std::pair<int, std::string>, int> perHost;  // (rank, host) -> rows
  for (int r = 0; r < rows; ++r) {
    auto& f = sums[static_cast<std::size_t>(r)];
    const double sum = f.get().as<double>();
    double expected = 0;
    for (int c = 0; c < kCols; ++c) expected += value(r, c);
    if (std::abs(sum - expected) < 1e-6) ++match;
    const auto& where = f.place();
    ++perHost[{where.rank, where.host}];
    if (r % 16 == 0)
      std::printf("row %d: sum %.6f, from %s (rank %d), worker %zu, pid %d\n", r, sum, where.host.c_str(), where.rank,
                  where.worker, static_cast<int>(where.pid));
  }
  try {
    hung.get();
  } catch (const forklift::TaskTimeout& e) {
    std::printf("the hanging task failed: %s\n", e.what());
  }
  try {
    crashed.get();
  } catch (const forklift::WorkerDied& e) {
    std::printf("the crashing task failed: %s\n", e.what());
  }
  pool.finalize();  // every agent's serve() returns; the World ends with them

  for (const auto& [key, n] : perHost) std::printf("%s (rank %d) computed %d rows\n", key.second.c_str(), key.first, n);
  std::printf("%d of %d row sums match the driver's own\n", match, rows);
  return match == rows ? 0 : 1;
}
