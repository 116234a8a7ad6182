// forklift::cluster: define() and the Agent, a FunctionPool on a Manager fed
// by the World (see pool.hpp).
#include <algorithm>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/remote.hpp"
#include "forklift/cluster/world.hpp"
#include "forklift/manager.hpp"
#include "protocol.hpp"

namespace forklift::cluster {

using namespace detail;

namespace {

std::mutex registry_mutex;
std::map<std::string, Function>& registry() {
  static std::map<std::string, Function> r;
  return r;
}

// The function the agent's workers run: the registry's, by name.
Value runByName(std::string name, List args) {
  Function fn;
  {
    std::lock_guard lock(registry_mutex);
    auto it = registry().find(name);
    if (it == registry().end()) throw Error("no function '" + name + "' is defined (cluster::define) on this host");
    fn = it->second;
  }
  return fn(args);
}

// The rank the launcher gives before MPI_Init, when it says.
std::optional<int> launcherRank() {
  for (const char* v : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"})
    if (const char* s = std::getenv(v); s && *s) return std::atoi(s);
  return std::nullopt;
}

}  // namespace

void define(const std::string& name, Function fn) {
  std::lock_guard lock(registry_mutex);
  if (!registry().emplace(name, std::move(fn)).second)
    throw Error("cluster::define: '" + name + "' is defined already");
}

// ---- Agent ------------------------------------------------------------------

namespace {

// A task the driver sent, waiting on the agent for an idle worker.
struct Waiting {
  std::int64_t id = 0;
  std::string fn;
  List args;
  std::int64_t timeoutMs = -1;
};

List idList(const std::deque<Waiting>& q) {
  List ids;
  for (const auto& w : q) ids.emplace_back(Value(w.id));
  return ids;
}

}  // namespace

struct Agent::Impl {
  Manager manager{[] {
    Manager::Options o;
    o.handleSignals = false;  // mpirun's signals end the rank as they would without forklift
    return o;
  }()};
  std::optional<FunctionPool<Value(std::string, List)>> pool;
  std::size_t refused = 0;

  // While serving:
  World* world = nullptr;
  int rank = -1;
  std::unordered_map<std::uint64_t, std::int64_t> ids;  // local task id -> the driver's
  std::deque<Waiting> waiting;
  std::vector<pid_t> pids;  // each worker's pid, kept by the pool's events
  bool suspended = false;
  bool out = false;
  int restartLimit = 5;  // the driver's PoolOptions::restartLimit (config)
  int lostInRow = 0;

  void refuse(int source, const std::string& command, const std::string& why) {
    ++refused;
    poolLog()->warn("rank {}: '{}' from rank {} refused: {}", rank, command, source, why);
  }

  void sendError(std::int64_t id, const std::string& what) {
    world->send(0, Message(kResult, {{"id", id},
                                     {"worker", std::int64_t{-1}},
                                     {"ok", false},
                                     {"kind", "error"},
                                     {"what", what}}));
  }

  // Leaves the rotation: the driver gets the reason and the tasks that
  // waited here (they never started); the ones running end as they end.
  void goOut(const std::string& reason) {
    if (out) return;
    out = true;
    poolLog()->error("rank {} ({}) is out of the pool's rotation: {}", rank, world->host(), reason);
    world->send(0, Message(kOut, {{"reason", reason}, {"ids", idList(waiting)}}));
    waiting.clear();
  }

  // Starts waiting tasks on idle workers (one task per worker at a time, so
  // a task in the local pool is a task that started or waits for a
  // replacement worker).
  void feed() {
    while (!suspended && !out && !waiting.empty() && ids.size() < pool->pool().size()) {
      Waiting& w = waiting.front();
      TaskOptions o;
      if (w.timeoutMs >= 0) o.timeout = Timeout(w.timeoutMs);
      try {
        auto f = pool->submitWith(o, w.fn, std::move(w.args));
        ids[f.id()] = w.id;
      } catch (const PoolBroken& e) {
        goOut(std::string("its local pool broke: ") + e.what());  // the task goes back with the others
        return;
      } catch (const std::exception& e) {
        sendError(w.id, std::string("the agent could not start the task: ") + e.what());
      }
      waiting.pop_front();
    }
  }

  void onLocalResult(const TaskInfo& info, const CallResult& r) {
    auto it = ids.find(info.id);
    if (it == ids.end()) {
      poolLog()->warn("rank {}: a result of local task {} nobody asked for", rank, info.id);
      return;
    }
    const std::int64_t id = it->second;
    ids.erase(it);
    std::string what, kind;
    ExitStatus status;
    if (!r.ok()) kind = kindOf(r.error(), what, status);
    if (kind == "broken" && info.attempts == 0) {  // it never started: another host runs it
      goOut("its local pool broke: " + what);        // first: the driver then sends it elsewhere
      world->send(0, Message(kReturned, {{"ids", List{Value(id)}}}));
      return;
    }
    const pid_t pid = info.worker < pids.size() ? pids[info.worker] : -1;
    Message m(kResult, {{"id", id},
                        {"worker", static_cast<std::int64_t>(info.worker)},
                        {"pid", static_cast<std::int64_t>(pid)},
                        {"ok", r.ok()}});
    if (r.ok()) {
      m.set("value", r.get());
    } else {
      m.set("kind", kind);
      m.set("what", what);
      if (kind == "died")
        m.set("status", Map{{"how", static_cast<std::int64_t>(status.how)},
                            {"code", static_cast<std::int64_t>(status.code)},
                            {"signal", static_cast<std::int64_t>(status.signal)}});
    }
    try {
      world->send(0, m);
    } catch (const std::exception& e) {  // a result over the limits: say so instead
      sendError(id, std::string("the result cannot be sent: ") + e.what());
    }
    if (r.ok()) {
      lostInRow = 0;
    } else if (kind == "died" || kind == "timeout") {
      if (++lostInRow > restartLimit)
        goOut(std::to_string(lostInRow) + " workers lost in a row (restart limit " + std::to_string(restartLimit) +
              "), the last: " + what);
    } else if (kind == "broken") {
      goOut("its local pool broke: " + what);
    }
    feed();
  }

  void onMessage(int source, Message& m) {
    const std::string& c = m.command();
    if (source != 0) return refuse(source, c, "only the driver (rank 0) talks to agents");
    if (c == kTask) return onTask(m);
    try {
      if (c == kStop) {
        manager.requestStop();
      } else if (c == kConfig) {
        const auto limit = m.get<std::int64_t>("restart_limit");
        if (limit < 0) return refuse(source, c, "a negative restart_limit");
        restartLimit = static_cast<int>(std::min<std::int64_t>(limit, 1 << 30));
      } else if (c == kSuspend) {
        suspended = true;  // the waiting tasks go back: nothing starts here until resumed
        world->send(0, Message(kSuspended, {{"ids", idList(waiting)}}));
        waiting.clear();
      } else if (c == kResume) {
        suspended = false;
        feed();
      } else {
        refuse(source, c, "no such command");
      }
    } catch (const std::exception& e) {
      refuse(source, c, e.what());
    }
  }

  void onTask(Message& m) {
    // Every field is read before anything changes: a malformed task changes nothing.
    const Value* idv = m.find("id");
    if (!idv || idv->kind() != Value::Kind::Int) return refuse(0, m.command(), "no integer 'id'");
    const auto id = idv->as<std::int64_t>();
    Waiting w;
    w.id = id;
    try {
      w.fn = m.get<std::string>("fn");
      w.args = m.get<List>("args");
      w.timeoutMs = m.get<std::int64_t>("timeout_ms", -1);
    } catch (const std::exception& e) {
      refuse(0, m.command(), e.what());
      sendError(id, std::string("the agent could not take the task: ") + e.what());
      return;
    }
    if (out) {
      world->send(0, Message(kReturned, {{"ids", List{Value(id)}}}));
      return;
    }
    waiting.push_back(std::move(w));
    feed();
  }
};

Agent::Agent(AgentOptions options) : impl_(std::make_unique<Impl>()) {
  if (World::exists())
    throw Error("cluster::Agent: make it before the World (its workers must be forked before MPI_Init)");
  if (launcherRank() == 0) return;  // the driver: no workers
  options.pool.workers = options.workers;
  impl_->pool.emplace(impl_->manager, runByName, options.pool);
}

Agent::~Agent() = default;

std::size_t Agent::refused() const { return impl_->refused; }

int Agent::serve(World& world) {
  if (world.isDriver()) throw Error("cluster::Agent::serve: rank 0 is the driver; agents serve");
  if (!impl_->pool) throw Error("cluster::Agent::serve: this Agent made no workers (the launcher said rank 0)");
  Impl& a = *impl_;
  auto& local = a.pool->pool();
  a.world = &world;
  a.rank = world.rank();
  for (std::size_t i = 0; i < local.size(); ++i) a.pids.push_back(local.worker(i).pid());

  local.onResult([&a](const TaskInfo& info, const CallResult& r) { a.onLocalResult(info, r); });
  local.onWorkerEvent([&a, &world, &local](const WorkerEvent& e) {
    if (e.index < a.pids.size() && (e.kind == WorkerEvent::Kind::Restarted || e.kind == WorkerEvent::Kind::Started))
      a.pids[e.index] = e.pid;
    if (e.kind == WorkerEvent::Kind::Restarted)  // the agent's own count, as each replacement starts
      world.send(0, Message(kReplaced, {{"replacements", static_cast<std::int64_t>(local.restarts())},
                                        {"worker", static_cast<std::int64_t>(e.index)},
                                        {"pid", static_cast<std::int64_t>(e.pid)}}));
  });

  // The driver's remote backends (remote.hpp), on a thread of their own;
  // routed before the pool's "__cluster_", so a start that came early moves
  // from the inbox to them, not to the pool.
  RemoteHost remotes(world);
  auto box = world.route(kPrefix);
  box->deliverTo(a.manager, [&a](int source, Message& m) { a.onMessage(source, m); });
  world.send(0, Message(kHello, {{"workers", static_cast<std::int64_t>(local.size())}, {"host", world.host()}}));
  const int rc = a.manager.run();
  box->deliverToInbox();
  world.unroute(kPrefix);
  a.world = nullptr;
  return rc;
}

}  // namespace forklift::cluster
