// forklift::cluster - a minimal pool across hosts: functions by name, agents
// that run them in crash-isolated forklift workers, futures on the driver
//
// One SPMD program is the whole job (the first slice of issue 22's
// cluster::Pool; no map, retries across hosts, suspend or progress yet):
//
//   int main() {
//     forklift::cluster::define("square", [](const forklift::List& a) {
//       return forklift::Value(a.at(0).as<double>() * a.at(0).as<double>()); });
//     forklift::cluster::Agent agent;          // before the World: see below
//     forklift::cluster::World world;
//     if (!world.isDriver()) return agent.serve(world);
//     forklift::cluster::Pool pool(world);
//     auto f = pool.submit("square", {3.0});
//     double r = f.get().as<double>();          // 9, f.host() says where
//     pool.finalize();                          // the agents' serve() returns
//   }
//
// Order matters: define every function, then make the Agent, then the World.
// The Agent makes this host's FunctionPool (its workers forked now, while the
// process runs one thread, before MPI_Init); the World then makes the fork
// server, which holds the pool's factory, so a worker that crashed or was
// killed for a timeout is replaced by a fork of the server, never of the MPI
// rank. On the driver the Agent makes no workers when the launcher tells the
// rank before MPI_Init (OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK or
// SLURM_PROCID is 0); otherwise it makes its pool and the driver stops it
// unused.
//
// A task runs in one worker of one agent: it fails with RemoteError when the
// function threw or is not defined (its text names the function), TaskTimeout
// when it ran past its timeout (its worker was killed and replaced), WorkerDied
// when its worker died (crash, _exit; replaced); every error's text names the
// host, rank and worker. The agent goes on serving. A task goes to the agent
// with the most free room (workers x 2 tasks in flight each); beyond that
// tasks wait on the driver.
//
// The Pool and the agents take only the World's messages whose command
// begins with "__cluster_" (World::route); every other message stays in the
// World's inbox for the program, on the driver and on the agents (while an
// agent serves, the World's inbox is the agent's program's to read). An agent rank
// that dies aborts the job (Open MPI 4.1 has no fault tolerance): its tasks
// never end, so the driver's waits end with the job.
//
// Threads: the Pool belongs to the thread that made it (it has none of its
// own; its waits drive it), as a WorkerPool does.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "forklift/call_future.hpp"
#include "forklift/pool.hpp"
#include "forklift/value.hpp"

namespace forklift::cluster {

class World;

using Function = std::function<Value(const List& args)>;

// Registers `fn` as `name` in this process (before the Agent is made: the
// workers are forks that carry the registry). Error for a name defined twice.
void define(const std::string& name, Function fn);

struct AgentOptions {
  std::size_t workers = 2;  // forked workers on this host
  // Of the local pool (PoolOptions::workers is `workers`); retries 0 by
  // default: a task that killed its worker fails with the reason.
  PoolOptions pool = [] {
    PoolOptions o;
    o.retries = 0;
    return o;
  }();
};

class Agent {
 public:
  // Makes the local pool (see "Order matters"); Error when a World exists.
  explicit Agent(AgentOptions options = {});
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // The agent's side of the job: serves the driver's tasks on this thread
  // until the driver's Pool finalizes; returns 0 (1 when the local pool's
  // loop ended badly). Error on the driver.
  int serve(World& world);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Where a task ran.
struct TaskPlace {
  int rank = -1;
  std::string host;
  std::size_t worker = 0;  // the agent's worker index
  pid_t pid = -1;          // that worker's pid (on its host)
};

namespace detail {
class PoolCore;
struct ClusterTask;
}  // namespace detail

class ClusterFuture {
 public:
  ClusterFuture() = default;
  bool valid() const noexcept { return t_ != nullptr; }
  std::uint64_t id() const noexcept;
  // Drives the pool (on the driver's thread) until the task is done or the
  // timeout passed; true when done.
  bool wait(Timeout timeout = kForever);
  // The result, or the task's error (see the header comment).
  Value get();
  const CallResult& result();
  // After it is done: where it ran (rank -1 when it never reached an agent).
  const TaskPlace& place() const;

 private:
  friend class Pool;
  friend class detail::PoolCore;
  std::shared_ptr<detail::ClusterTask> t_;
  std::weak_ptr<detail::PoolCore> core_;
};

class Pool {
 public:
  // On the driver: waits (up to 60 s) for every agent's hello. Error on an
  // agent rank or in a World of one rank.
  explicit Pool(World& world);
  // finalize() unless done.
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  ClusterFuture submit(const std::string& function, List args, std::optional<Timeout> timeout = std::nullopt);
  // Waits for every task submitted; true when all ended within `timeout`.
  bool wait(Timeout timeout = kForever);
  // Waits for every task, then ends every agent's serve().
  void finalize();

  std::size_t submitted() const;
  std::size_t completed() const;
  // Tasks each agent rank ran (index: rank).
  std::vector<std::size_t> perRank() const;

 private:
  std::shared_ptr<detail::PoolCore> core_;
};

}  // namespace forklift::cluster
