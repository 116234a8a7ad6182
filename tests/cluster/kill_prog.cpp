// tests/cluster/kill_prog: the SPMD program kill_test.py runs, then kills
// an agent rank of (kill -9) while tasks run.
//
// Every rank prints "rank R pid P" at start. The driver submits `--tasks`
// tasks (2,000 by default) of `--ms` milliseconds each (20) and prints
// "result I V rank R" (V = I * I, R the agent that ran it) for every task
// as its result arrives, flushed at once, so what the driver had when the
// job ended is on its stdout. A task that fails prints "error I: text".
// After the last result it prints "all N results" and finalizes: a run that
// nobody kills ends with exit 0.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <thread>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/world.hpp"

using namespace forklift;

int main(int argc, char** argv) {
  int tasks = 2000;
  int ms = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--tasks") == 0) tasks = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--ms") == 0) ms = std::atoi(argv[i + 1]);
  }
  cluster::define("slow_square", [](const List& a) {
    std::this_thread::sleep_for(std::chrono::milliseconds(a.at(1).as<std::int64_t>()));
    const auto x = a.at(0).as<std::int64_t>();
    return Value(x * x);
  });

  cluster::Agent agent;  // before the World: its workers are forked before MPI_Init
  cluster::World world;
  std::printf("rank %d pid %d\n", world.rank(), static_cast<int>(::getpid()));
  std::fflush(stdout);
  if (!world.isDriver()) return agent.serve(world);

  cluster::Pool pool(world);
  std::list<std::pair<int, cluster::ClusterFuture>> pending;
  for (int i = 0; i < tasks; ++i)
    pending.emplace_back(i, pool.submit("slow_square", {Value(i), Value(ms)}));
  // Results in the order they arrive: the pool is driven a few ms at a time,
  // then every task that ended is printed and forgotten.
  while (!pending.empty()) {
    pool.wait(Timeout(5));
    for (auto it = pending.begin(); it != pending.end();) {
      auto& f = it->second;
      if (!f.wait(Timeout(0))) {
        ++it;
        continue;
      }
      try {
        const auto v = f.get().as<std::int64_t>();
        std::printf("result %d %lld rank %d\n", it->first, static_cast<long long>(v), f.place().rank);
      } catch (const std::exception& e) {
        std::printf("error %d: %s\n", it->first, e.what());
      }
      std::fflush(stdout);
      it = pending.erase(it);
    }
  }
  std::printf("all %d results\n", tasks);
  std::fflush(stdout);
  pool.finalize();
  return 0;
}
