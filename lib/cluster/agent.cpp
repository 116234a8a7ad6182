// forklift::cluster: define() and the Agent, a FunctionPool on a Manager fed
// by the World (see pool.hpp).
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "forklift/cluster/pool.hpp"
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

struct Agent::Impl {
  Manager manager{[] {
    Manager::Options o;
    o.handleSignals = false;  // mpirun's signals end the rank as they would without forklift
    return o;
  }()};
  std::optional<FunctionPool<Value(std::string, List)>> pool;
  std::unordered_map<std::uint64_t, std::uint64_t> ids;  // local task id -> the driver's
};

Agent::Agent(AgentOptions options) : impl_(std::make_unique<Impl>()) {
  if (World::exists())
    throw Error("cluster::Agent: make it before the World (its workers must be forked before MPI_Init)");
  if (launcherRank() == 0) return;  // the driver: no workers
  options.pool.workers = options.workers;
  impl_->pool.emplace(impl_->manager, runByName, options.pool);
}

Agent::~Agent() = default;

int Agent::serve(World& world) {
  if (world.isDriver()) throw Error("cluster::Agent::serve: rank 0 is the driver; agents serve");
  if (!impl_->pool) throw Error("cluster::Agent::serve: this Agent made no workers (the launcher said rank 0)");
  auto& pool = *impl_->pool;
  auto& ids = impl_->ids;
  const int rank = world.rank();
  const std::string host = world.host();

  pool.pool().onResult([&](const TaskInfo& info, const CallResult& r) {
    auto it = ids.find(info.id);
    if (it == ids.end()) {
      poolLog()->warn("rank {}: a result of local task {} nobody asked for", rank, info.id);
      return;
    }
    Message m(kResult, {{"id", static_cast<std::int64_t>(it->second)},
                        {"worker", static_cast<std::int64_t>(info.worker)},
                        {"ok", r.ok()}});
    ids.erase(it);
    if (r.ok()) {
      m.set("value", r.get());
      m.set("pid", static_cast<std::int64_t>(pool.pool().worker(info.worker).pid()));
    } else {
      std::string what;
      m.set("kind", kindOf(r.error(), what));
      m.set("what", what);
    }
    try {
      world.send(0, m);
    } catch (const std::exception& e) {  // a result over the limits: say so instead
      Message err(kResult, {{"id", m.get<std::int64_t>("id")},
                            {"worker", static_cast<std::int64_t>(info.worker)},
                            {"ok", false},
                            {"kind", "error"},
                            {"what", std::string("the result cannot be sent: ") + e.what()}});
      world.send(0, err);
    }
  });

  auto box = world.route(kPrefix);
  box->deliverTo(impl_->manager, [&](int source, Message& m) {
    if (m.command() == kStop) {
      impl_->manager.requestStop();
      return;
    }
    if (m.command() != kTask || source != 0) {
      poolLog()->warn("rank {}: '{}' from rank {} is no task; dropped", rank, m.command(), source);
      return;
    }
    std::int64_t id = -1;
    try {
      id = m.get<std::int64_t>("id");
      TaskOptions o;
      if (auto ms = m.get<std::int64_t>("timeout_ms", -1); ms >= 0) o.timeout = Timeout(ms);
      auto f = pool.submitWith(o, m.get<std::string>("fn"), m.get<List>("args"));
      ids[f.id()] = static_cast<std::uint64_t>(id);
    } catch (const std::exception& e) {
      world.send(0, Message(kResult, {{"id", id},
                                      {"worker", std::int64_t{-1}},
                                      {"ok", false},
                                      {"kind", "error"},
                                      {"what", std::string("the agent could not take the task: ") + e.what()}}));
    }
  });
  world.send(0, Message(kHello, {{"workers", static_cast<std::int64_t>(pool.pool().size())}, {"host", host}}));
  const int rc = impl_->manager.run();
  box->deliverToInbox();
  world.unroute(kPrefix);
  return rc;
}

}  // namespace forklift::cluster
