// tests/cluster/pool_test: cluster::Pool, Agent and define() under
// mpirun -np 3 (the driver and two agents of 2 workers each). The driver
// checks; the agents serve until it finalizes. Prints "N passed, N failed".
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/world.hpp"

using namespace forklift;
using namespace std::chrono_literals;

namespace {

int failures = 0, passes = 0;

void check(bool ok, const std::string& what) {
  std::printf("[ %s ] %s\n", ok ? "    OK" : "FAILED", what.c_str());
  std::fflush(stdout);
  (ok ? passes : failures)++;
}

template <class E>
std::string failsWith(cluster::ClusterFuture f) {
  try {
    f.get();
    return "";
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(other error) ") + e.what();
  }
}

}  // namespace

int main() {
  cluster::define("square", [](const List& a) { return Value(a.at(0).as<double>() * a.at(0).as<double>()); });
  cluster::define("pid", [](const List&) { return Value(static_cast<std::int64_t>(getpid())); });
  cluster::define("crash", [](const List&) -> Value {
    raise(SIGSEGV);
    return Value();
  });
  cluster::define("hang", [](const List&) -> Value {
    std::this_thread::sleep_for(60s);
    return Value();
  });
  cluster::define("throws", [](const List&) -> Value { throw std::runtime_error("on purpose"); });

  cluster::Agent agent;  // before the World: workers forked before MPI_Init
  cluster::World world;
  if (!world.isDriver()) return agent.serve(world);

  {
    cluster::Pool pool(world);

    // 1,000 tasks over both agents, every future once, every result right.
    std::vector<cluster::ClusterFuture> fs;
    for (int i = 0; i < 1000; ++i) fs.push_back(pool.submit("square", {Value(static_cast<double>(i))}));
    int right = 0;
    std::set<std::string> hosts;
    for (int i = 0; i < 1000; ++i) {
      if (fs[static_cast<std::size_t>(i)].get().as<double>() == static_cast<double>(i) * i) ++right;
      hosts.insert(fs[static_cast<std::size_t>(i)].place().host);
    }
    auto per = pool.perRank();
    check(right == 1000 && pool.completed() == 1000, "1000 squares right: " + std::to_string(right));
    check(hosts.size() == 2 && per.size() == 3 && per[1] > 100 && per[2] > 100,
          "both agents ran tasks: rank 1 " + std::to_string(per.at(1)) + ", rank 2 " + std::to_string(per.at(2)));

    // The place of a task: the worker's pid is the one the task saw.
    auto p = pool.submit("pid", {});
    const auto pid = p.get().as<std::int64_t>();
    check(p.place().pid == pid && p.place().rank > 0 && p.place().host == world.host(p.place().rank),
          "a result says its host, rank, worker and pid (" + p.place().host + ", worker " +
              std::to_string(p.place().worker) + ", pid " + std::to_string(pid) + ")");

    // Failures say where, and the agents go on.
    std::string e = failsWith<RemoteError>(pool.submit("nope", {}));
    check(e.find("no function 'nope'") != std::string::npos && e.find("host") != std::string::npos,
          "unknown function: RemoteError: " + e);
    e = failsWith<RemoteError>(pool.submit("throws", {}));
    check(e.find("on purpose") != std::string::npos, "a function that throws: RemoteError: " + e);
    e = failsWith<WorkerDied>(pool.submit("crash", {}));
    check(e.find("worker") != std::string::npos && e.find("SIGSEGV") != std::string::npos,
          "a segfault kills a worker only: WorkerDied: " + e);
    const auto t0 = std::chrono::steady_clock::now();
    e = failsWith<TaskTimeout>(pool.submit("hang", {}, Timeout(300)));
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    check(!e.empty() && e.find("(other") == std::string::npos && ms < 5000,
          "a hang past its timeout: TaskTimeout after " + std::to_string(ms) + " ms: " + e);
    e = failsWith<RemoteError>(pool.submit("square", {Value("seven")}));
    check(!e.empty() && e.find("(other") == std::string::npos, "an argument of the wrong type: RemoteError: " + e);

    // After all that, both agents still serve (replaced workers).
    std::vector<cluster::ClusterFuture> again;
    for (int i = 0; i < 200; ++i) again.push_back(pool.submit("square", {Value(2.0)}));
    int ok = 0;
    for (auto& f : again) ok += f.get().as<double>() == 4.0;
    check(ok == 200, "200 more tasks after the failures: " + std::to_string(ok) + " right");
    // A figure, not a check: empty-ish tasks per second through both agents.
    const auto s0 = std::chrono::steady_clock::now();
    std::vector<cluster::ClusterFuture> many;
    for (int i = 0; i < 2000; ++i) many.push_back(pool.submit("square", {Value(1.0)}));
    pool.wait();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count();
    std::printf("figure: 2000 tasks in %.3f s: %.0f tasks/s over 2 agents of 2 workers\n", secs, 2000 / secs);
    pool.finalize();
  }
  std::printf("%d passed, %d failed\n", passes, failures);
  std::fflush(stdout);
  return failures == 0 ? 0 : 1;
}
