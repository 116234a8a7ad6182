// tests/cluster/netns_prog: the SPMD program netns_test.py runs with each
// rank in its own network namespace (its own network stack), so MPI's
// traffic crosses veth pairs and a bridge over TCP.
//
// Every rank prints "rank R host H netns N pid P" (N: its /proc/self/ns/net,
// "net:[inode]"; the script checks the three differ). The driver checks the
// three host names differ, runs `--tasks` tasks (200 by default) through a
// cluster::Pool over both agents, checks every result, that both agents ran
// some, and that each agent's tasks ran in one namespace, its own, different
// from the driver's; it prints "N passed, N failed" and exits 0 when every
// check passed.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/world.hpp"

using namespace forklift;

namespace {

int failures = 0, passes = 0;

void check(bool ok, const std::string& what) {
  std::printf("[ %s ] %s\n", ok ? "    OK" : "FAILED", what.c_str());
  std::fflush(stdout);
  (ok ? passes : failures)++;
}

// The network namespace this process runs in, as the kernel names it
// ("net:[4026531840]"), or "" when it cannot be read.
std::string netNamespace() {
  char buf[64] = {};
  const ssize_t n = ::readlink("/proc/self/ns/net", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
}

}  // namespace

int main(int argc, char** argv) {
  int tasks = 200;
  for (int i = 1; i + 1 < argc; i += 2)
    if (std::strcmp(argv[i], "--tasks") == 0) tasks = std::atoi(argv[i + 1]);

  // The task says where it ran: its own namespace (a forked worker of the
  // agent shares the agent's) and a value the driver can check.
  cluster::define("cube_ns", [](const List& a) {
    const auto x = a.at(0).as<std::int64_t>();
    return Value(List{Value(x * x * x), Value(netNamespace())});
  });

  cluster::Agent agent;  // before the World: its workers are forked before MPI_Init
  cluster::World world;
  const std::string ns = netNamespace();
  std::printf("rank %d host %s netns %s pid %d\n", world.rank(), world.host().c_str(), ns.c_str(),
              static_cast<int>(::getpid()));
  std::fflush(stdout);

  if (!world.isDriver()) return agent.serve(world);
  check(world.size() == 3, "3 ranks");
  const std::set<std::string> hosts(world.hosts().begin(), world.hosts().end());
  check(hosts.size() == 3, "every rank on its own host: " + world.host(0) + " " + world.host(1) + " " + world.host(2));

  // Each agent's namespace, as its workers (forks of the agent) see it.
  std::vector<std::set<std::string>> spaces(static_cast<std::size_t>(world.size()));
  spaces[0].insert(ns);
  int right = 0;
  {
    cluster::Pool pool(world);
    std::vector<cluster::ClusterFuture> fs;
    for (int i = 0; i < tasks; ++i) fs.push_back(pool.submit("cube_ns", {Value(static_cast<std::int64_t>(i))}));
    for (int i = 0; i < tasks; ++i) {
      auto& f = fs[static_cast<std::size_t>(i)];
      const auto r = f.get().as<List>();
      const std::int64_t x = i;
      if (r.at(0).as<std::int64_t>() == x * x * x) ++right;
      const auto rank = static_cast<std::size_t>(f.place().rank);
      if (rank > 0 && rank < spaces.size()) spaces[rank].insert(r.at(1).as<std::string>());
    }
    const auto per = pool.perRank();
    check(right == tasks && static_cast<int>(pool.completed()) == tasks,
          std::to_string(right) + " of " + std::to_string(tasks) + " results right");
    // One namespace per rank, three different ones: the workers of an agent
    // run in its network stack, not in the driver's nor the other agent's.
    std::set<std::string> all;
    std::string text;
    for (const auto& s : spaces) {
      text += " {";
      for (const auto& n : s) text += " " + n;
      text += " }";
      if (s.size() == 1) all.insert(*s.begin());
    }
    check(all.size() == 3 && !all.count(""), "each rank's tasks ran in one network namespace of its own:" + text);
    check(per.size() == 3 && per[1] > 0 && per[2] > 0,
          "both agents ran tasks: rank 1 " + std::to_string(per.size() > 1 ? per[1] : 0) + ", rank 2 " +
              std::to_string(per.size() > 2 ? per[2] : 0));
    pool.finalize();
  }
  std::printf("%d passed, %d failed\n", passes, failures);
  std::fflush(stdout);
  return failures == 0 ? 0 : 1;
}
