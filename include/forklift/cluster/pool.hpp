// forklift::cluster - Pool: forklift's function pool across hosts; Agent: a
// host's side of it; define(): the functions they run, by name
//
// One SPMD program is the whole job: rank 0 is the driver (the user's main),
// every other rank an agent that runs the driver's tasks in crash-isolated
// forklift workers on its host. The API and its promises are the local
// FunctionPool's (forklift/pool.hpp), across hosts:
//
//   int main() {
//     forklift::cluster::define("square", [](const forklift::List& a) {
//       return forklift::Value(a.at(0).as<double>() * a.at(0).as<double>()); });
//     forklift::cluster::Agent agent;          // before the World: see below
//     forklift::cluster::World world;
//     if (!world.isDriver()) return agent.serve(world);
//     forklift::cluster::Pool pool(world);
//     auto f = pool.submit("square", {3.0});
//     double r = f.get().as<double>();          // 9; f.place() says where
//     auto all = pool.map("square", {{1.0}, {2.0}});   // {1, 4}, in order
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
// How a task travels. submit() queues the task on the driver; it is sent to
// the serving agent with the most free room (each agent holds at most
// `tasksPerWorker` x its workers tasks sent and not answered). The agent
// hands a task only to an idle worker of its local pool; the others wait on
// the agent, in order. The result, or the error, comes back with where it ran: `place()` (rank, host,
// worker index, the worker's pid). Results, deaths and host reports are seen
// inside the driver's waits (get, wait, map, poll, suspend, finalize).
//
// Failures. A task fails with RemoteError when its function threw (a wrong
// argument type is the TypeError of Value::as, its text kept) or is not
// defined on that host; with TaskTimeout when it ran past its timeout
// (TaskOptions::timeout, else PoolOptions::taskTimeout, counted from its
// start in a worker: the worker is killed and replaced); with WorkerDied when
// its worker died (crash, _exit, a signal; replaced), `status()` saying how;
// with Error when its arguments or its result cannot travel (Limits; the
// text says so; RemoteError when the worker itself could not send its
// result). A task whose worker died or timed out runs again while it
// has retries left (TaskOptions::retries, else PoolOptions::retries, 1 by
// default), on another host than its last attempt's while another serves
// (it waits for room there; the tasks behind it do not wait for it).
// RemoteError and Error are never retried. Every error's text names the
// task, its function, and for each attempt the host, rank, worker and how it
// ended ("task 7 'crash' on host host1 (rank 1), worker 0: ... died (killed
// by SIGSEGV); attempt 2 of 2 on host host2 (rank 2), worker 1: ..."); its
// type is the last attempt's (a WorkerDied's status() too); place() is the
// last attempt's, with the worker's pid.
//
// Hosts out of the rotation. An agent takes its host out, and tells the
// driver why, when its local pool breaks (AgentOptions::pool's crash loop,
// or a replacement that cannot start) or when more than
// PoolOptions::restartLimit tasks in a row there lost their worker (it died,
// or was killed for a timeout) with no task ending well between them. The driver then sends it no
// more tasks; the tasks that waited on that agent and never started go back
// to the driver's queue (no attempt counted) and run on the other hosts; the
// tasks running there end as they end (retried elsewhere if they fail and
// may). When no host is left, every task waiting for one fails with
// PoolBroken naming each host's reason (a task still running on a host that
// is out ends as it ends), and submit() throws it. `hostStats()` tells
// each host's state and counts: tasks ended there, failed there, and the
// replacements its agent made (the agent's own count, reported as each
// replacement starts).
//
// suspend() stops tasks from starting on every host: the driver sends no
// more, and each agent hands no more to its workers and returns the tasks
// waiting on it to the driver's queue, then acknowledges. So once suspend()
// returns, no task is handed to a worker anywhere until resume(); the ones
// handed before (at most one per worker, which may begin to run a moment
// after suspend() returned) finish and their results come in. Waiting
// while suspended for a task that is queued (Pool::wait with tasks queued,
// a queued task's get or wait) throws Error: it would never run.
//
// The progress callback (onResult) runs on the driver's thread, inside its
// waits, once for each task as it ends, ok or not, with its id, function,
// attempts and place; a program that prints there has reported every result
// that arrived, even if a lost host later aborts the job. Waiting on the
// pool from the callback (get, wait, map, poll, ...) throws Error; a
// future's ready() there only looks.
//
// Bad input. Bytes that do not decode are the World's (World::stats()
// .refused). A "__cluster_" message that decodes but is wrong (a missing or
// ill-typed field, an unknown command, a result for a task not running on
// the rank that sent it, a second hello) is logged, counted (Pool::refused()
// on the driver, Agent::refused() on an agent) and dropped; a task message
// whose id is readable is answered with an error for that task. The driver
// and the agents go on serving.
//
// The Pool and the agents take only the World's messages whose command
// begins with "__cluster_" (World::route); every other message stays in the
// World's inbox for the program, on the driver and on the agents (while an
// agent serves, the World's inbox is the agent's program's to read). An agent
// rank that dies aborts the job (Open MPI 4.1 has no fault tolerance): its
// tasks never end, so the driver's waits end with the job.
//
// Threads: the Pool belongs to the thread that made it (it has none of its
// own; its waits drive it, its callbacks run there), as a WorkerPool does.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

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
  // Of the local pool (PoolOptions::workers is `workers`); retries 0: the
  // driver retries (on any host). Its crash loop (restartLimit within
  // restartWindow) takes the host out.
  forklift::PoolOptions pool = [] {
    forklift::PoolOptions o;
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

  // The agent's side of the job: serves the driver's tasks on this thread,
  // and its remote backends (remote.hpp) on a thread of their own, until the
  // driver's Pool finalizes; returns 0 (1 when the local pool's loop ended
  // badly). Error on the driver.
  int serve(World& world);

  // Well-formed but wrong "__cluster_" messages this agent dropped.
  std::size_t refused() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The driver's options.
struct PoolOptions {
  Timeout taskTimeout = kForever;  // per task, from its start; TaskOptions override it
  int retries = 1;                 // runs again after its worker's death or a timeout
  int restartLimit = 5;            // workers lost in a row on one host before it is out (see above)
  std::size_t tasksPerWorker = 2;  // tasks sent to an agent and not answered, per worker
  Timeout startTimeout = std::chrono::seconds(60);  // for every agent's hello
};

// Where a task ran (its last attempt).
struct TaskPlace {
  int rank = -1;
  std::string host;
  std::size_t worker = 0;  // the agent's worker index
  pid_t pid = -1;          // that worker's pid (on its host)
};

// What the progress callback learns about a task that ended.
struct TaskEnd {
  std::uint64_t id;  // 1, 2, ... in submission order
  const std::string& function;
  int attempts;             // runs started (2 after one retry)
  const TaskPlace& place;   // rank -1 when it never reached an agent
};

// A host as the driver sees it.
struct HostStats {
  int rank = -1;
  std::string host;
  bool serving = true;        // false: out of the rotation, `reason` says why
  std::string reason;
  std::size_t workers = 0;
  std::size_t inFlight = 0;   // tasks sent there and not answered
  std::size_t ran = 0;        // attempts that ended there, ok or not
  std::size_t failed = 0;     // of those, the ones that failed
  std::size_t replacements = 0;  // workers its agent replaced (after a death or a timeout)
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
  // Handles what is ready, without waiting; true when done.
  bool ready() { return wait(Timeout::zero()); }
  // The result, or the task's error (see "Failures").
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
  // On the driver: waits (up to startTimeout) for every agent's hello.
  // Error on an agent rank or in a World of one rank; TimeoutError when an
  // agent did not say hello.
  explicit Pool(World& world, PoolOptions options = {});
  // finalize() unless done; the agents' serve() returns in any case. While
  // an exception unwinds it does not wait for the tasks (one may hang): it
  // stops the agents and abandons what did not end, so the exception reaches
  // its handler (and a World it unwinds aborts the job, world.hpp).
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // Queues a task. Throws PoolBroken when every host is out, Error after
  // finalize().
  ClusterFuture submit(const std::string& function, List args, std::optional<Timeout> timeout = std::nullopt);
  ClusterFuture submitWith(const std::string& function, List args, TaskOptions options);
  // Runs every task and returns their results in input order; throws the
  // error of the first task (in input order) that failed, after all ended.
  std::vector<Value> map(const std::string& function, std::vector<List> argsList,
                         std::optional<Timeout> timeout = std::nullopt);
  std::vector<Value> mapWith(const std::string& function, std::vector<List> argsList, TaskOptions options);

  // The progress callback (see above).
  void onResult(std::function<void(const TaskEnd&, const CallResult&)> fn);

  // Waits for every task submitted; true when all ended within `timeout`.
  // Error while suspended with tasks queued.
  bool wait(Timeout timeout = kForever);
  // Handles the messages that came, without waiting.
  void poll();
  // See "suspend()" above. suspend() waits (up to startTimeout) for every
  // serving agent's acknowledgement: TimeoutError otherwise.
  void suspend();
  void resume();
  bool suspended() const;
  // Waits for every task, then ends every agent's serve(). Error while
  // suspended with tasks queued.
  void finalize();

  std::size_t submitted() const;
  std::size_t completed() const;    // ok or failed
  std::size_t failedTasks() const;
  // Attempts that ended on each agent rank, ok or not (index: rank).
  std::vector<std::size_t> perRank() const;
  // Every agent (ranks 1..N-1, in order).
  std::vector<HostStats> hostStats() const;
  // Well-formed but wrong "__cluster_" messages the driver dropped.
  std::size_t refused() const;

 private:
  std::shared_ptr<detail::PoolCore> core_;
};

}  // namespace forklift::cluster
