// forklift::cluster: Agent (a FunctionPool on a Manager, fed by the World) and
// the driver's Pool (see pool.hpp).
#include "forklift/cluster/pool.hpp"

#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <unordered_map>

#include "forklift/cluster/remote.hpp"
#include "forklift/cluster/world.hpp"
#include "forklift/log.hpp"
#include "forklift/manager.hpp"

namespace forklift::cluster {

namespace {

std::shared_ptr<spdlog::logger> poolLog() {
  static auto log = makeLogger("cluster.pool");
  return log;
}

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

// Every message of the pool and its agents begins so (World::route).
constexpr const char* kPrefix = "__cluster_";
constexpr const char* kHello = "__cluster_hello";
constexpr const char* kTask = "__cluster_task";
constexpr const char* kResult = "__cluster_result";
constexpr const char* kStop = "__cluster_stop";

// What kind of failure a local task's error is (travels as a word).
std::string kindOf(const std::exception_ptr& e, std::string& what) {
  try {
    std::rethrow_exception(e);
  } catch (const TaskTimeout& x) {
    what = x.what();
    return "timeout";
  } catch (const WorkerDied& x) {
    what = x.what();
    return "died";
  } catch (const PoolBroken& x) {
    what = x.what();
    return "broken";
  } catch (const RemoteError& x) {
    what = x.what();
    return "remote";
  } catch (const std::exception& x) {
    what = x.what();
    return "error";
  }
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
  RemoteHost remotes(world);  // the driver's remote backends (remote.hpp), on a thread of their own
  const int rc = impl_->manager.run();
  box->deliverToInbox();
  world.unroute(kPrefix);
  return rc;
}

// ---- the driver's Pool -----------------------------------------------------

namespace detail {

struct ClusterTask {
  std::uint64_t id = 0;
  std::string fn;
  List args;
  std::optional<Timeout> timeout;
  bool done = false;
  CallResult result;
  TaskPlace place;
};

class PoolCore {
 public:
  explicit PoolCore(World& w) : world(w), box(w.route(kPrefix)) {}
  ~PoolCore() { world.unroute(kPrefix); }

  World& world;
  std::shared_ptr<Mailbox> box;  // this pool's messages
  struct Agent {
    std::size_t capacity = 0;
    std::size_t inflight = 0;
    std::size_t ran = 0;
  };
  std::vector<Agent> agents;  // by rank; rank 0 has capacity 0
  std::deque<std::shared_ptr<ClusterTask>> queued;
  std::unordered_map<std::uint64_t, std::shared_ptr<ClusterTask>> running;
  std::uint64_t nextId = 1;
  std::size_t submitted = 0, completed = 0;
  bool finalized = false;

  void dispatch() {
    while (!queued.empty()) {
      int best = -1;
      std::size_t bestFree = 0;
      for (std::size_t r = 1; r < agents.size(); ++r) {
        const auto& a = agents[r];
        const std::size_t free = a.capacity > a.inflight ? a.capacity - a.inflight : 0;
        if (free > bestFree) {
          bestFree = free;
          best = static_cast<int>(r);
        }
      }
      if (best < 0) return;
      auto t = queued.front();
      queued.pop_front();
      Message m(kTask, {{"id", static_cast<std::int64_t>(t->id)}, {"fn", t->fn}, {"args", t->args}});
      if (t->timeout) m.set("timeout_ms", static_cast<std::int64_t>(t->timeout->count()));
      try {
        world.send(best, m);
      } catch (const std::exception& e) {
        finish(*t, best, CallResult(std::make_exception_ptr(
                             Error("task " + std::to_string(t->id) + " '" + t->fn + "' cannot be sent: " + e.what()))));
        continue;
      }
      ++agents[static_cast<std::size_t>(best)].inflight;
      running.emplace(t->id, std::move(t));
    }
  }

  void finish(ClusterTask& t, int rank, CallResult r) {
    t.done = true;
    t.result = std::move(r);
    t.place.rank = rank;
    if (rank >= 0) t.place.host = world.host(rank);
    ++completed;
  }

  void onResult(int source, Message& m) {
    const auto id = static_cast<std::uint64_t>(m.get<std::int64_t>("id", -1));
    auto it = running.find(id);
    if (it == running.end()) {
      poolLog()->warn("driver: a result of task {} from rank {} that is not running; dropped", id, source);
      return;
    }
    auto t = std::move(it->second);
    running.erase(it);
    auto& a = agents[static_cast<std::size_t>(source)];
    --a.inflight;
    ++a.ran;
    const auto worker = m.get<std::int64_t>("worker", -1);
    t->place.worker = worker < 0 ? 0 : static_cast<std::size_t>(worker);
    t->place.pid = static_cast<pid_t>(m.get<std::int64_t>("pid", -1));
    if (m.get<bool>("ok", false)) {
      Value v;
      if (Value* p = m.find("value")) v = std::move(*p);
      finish(*t, source, CallResult(std::move(v)));
      return;
    }
    const std::string kind = m.get<std::string>("kind", "error");
    const std::string text = "task " + std::to_string(t->id) + " '" + t->fn + "' on host " + world.host(source) +
                             " (rank " + std::to_string(source) + "), worker " + std::to_string(worker) + ": " +
                             m.get<std::string>("what", "");
    std::exception_ptr e;
    if (kind == "timeout")
      e = std::make_exception_ptr(TaskTimeout(text));
    else if (kind == "died")
      e = std::make_exception_ptr(WorkerDied(text, ExitStatus{}));
    else if (kind == "broken")
      e = std::make_exception_ptr(PoolBroken(text));
    else if (kind == "remote")
      e = std::make_exception_ptr(RemoteError(text));
    else
      e = std::make_exception_ptr(Error(text));
    finish(*t, source, CallResult(e));
  }

  // Takes one message (waiting up to `timeout`); false when none came.
  bool pump(Timeout timeout) {
    auto r = box->recv(timeout);
    if (!r) return false;
    if (r->message.command() == kResult && r->source > 0 && static_cast<std::size_t>(r->source) < agents.size())
      onResult(r->source, r->message);
    else
      poolLog()->warn("driver: '{}' from rank {} is no result; dropped", r->message.command(), r->source);
    dispatch();
    return true;
  }

  bool waitFor(const std::function<bool()>& done, Timeout timeout) {
    const Deadline d(timeout);
    while (!done()) {
      if (d.expired()) return false;
      pump(d.forever() ? Timeout(1000) : std::min(Timeout(1000), std::chrono::ceil<Timeout>(d.remaining())));
    }
    return true;
  }
};

}  // namespace detail

std::uint64_t ClusterFuture::id() const noexcept { return t_ ? t_->id : 0; }

bool ClusterFuture::wait(Timeout timeout) {
  if (!t_) throw Error("cluster::ClusterFuture: not valid");
  if (t_->done) return true;
  auto core = core_.lock();
  if (!core) throw Error("cluster::ClusterFuture: its Pool is gone and the task did not end");
  return core->waitFor([t = t_.get()] { return t->done; }, timeout);
}

const CallResult& ClusterFuture::result() {
  wait(kForever);
  return t_->result;
}

Value ClusterFuture::get() { return result().get(); }

const TaskPlace& ClusterFuture::place() const {
  if (!t_) throw Error("cluster::ClusterFuture: not valid");
  return t_->place;
}

Pool::Pool(World& world) : core_(std::make_shared<detail::PoolCore>(world)) {
  if (!world.isDriver()) throw Error("cluster::Pool: only the driver (rank 0) makes one; agents serve()");
  if (world.size() < 2) throw Error("cluster::Pool: a World of one rank has no agent");
  core_->agents.resize(static_cast<std::size_t>(world.size()));
  int hellos = 0;
  const Deadline d(std::chrono::seconds(60));
  while (hellos < world.size() - 1) {
    if (d.expired())
      throw TimeoutError("cluster::Pool: " + std::to_string(world.size() - 1 - hellos) +
                         " agent(s) did not say hello within 60 s");
    auto r = core_->box->recv(std::chrono::ceil<Timeout>(d.remaining()));
    if (!r) continue;
    if (r->message.command() != kHello || r->source <= 0) {
      poolLog()->warn("driver: '{}' from rank {} before the agents' hello; dropped", r->message.command(), r->source);
      continue;
    }
    auto& a = core_->agents[static_cast<std::size_t>(r->source)];
    if (a.capacity == 0) ++hellos;
    a.capacity = 2 * static_cast<std::size_t>(r->message.get<std::int64_t>("workers"));
  }
}

Pool::~Pool() {
  if (!core_->finalized) {
    try {
      finalize();
    } catch (const std::exception& e) {
      poolLog()->error("cluster::Pool: finalize in the destructor failed: {}", e.what());
    }
  }
}

ClusterFuture Pool::submit(const std::string& function, List args, std::optional<Timeout> timeout) {
  if (core_->finalized) throw Error("cluster::Pool::submit: the pool was finalized");
  auto t = std::make_shared<detail::ClusterTask>();
  t->id = core_->nextId++;
  t->fn = function;
  t->args = std::move(args);
  t->timeout = timeout;
  ClusterFuture f;
  f.t_ = t;
  f.core_ = core_;
  core_->queued.push_back(std::move(t));
  ++core_->submitted;
  core_->dispatch();
  return f;
}

bool Pool::wait(Timeout timeout) {
  return core_->waitFor([c = core_.get()] { return c->completed == c->submitted; }, timeout);
}

void Pool::finalize() {
  if (core_->finalized) return;
  wait(kForever);
  core_->finalized = true;
  for (int r = 1; r < core_->world.size(); ++r) core_->world.send(r, Message(kStop));
}

std::size_t Pool::submitted() const { return core_->submitted; }
std::size_t Pool::completed() const { return core_->completed; }
std::vector<std::size_t> Pool::perRank() const {
  std::vector<std::size_t> v;
  for (const auto& a : core_->agents) v.push_back(a.ran);
  return v;
}

}  // namespace forklift::cluster
