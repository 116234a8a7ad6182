// forklift::cluster: the driver's Pool (see pool.hpp).
#include "forklift/cluster/pool.hpp"

#include <deque>
#include <unordered_map>

#include "forklift/cluster/world.hpp"
#include "protocol.hpp"

namespace forklift::cluster {

using detail::kHello;
using detail::kPrefix;
using detail::kResult;
using detail::kStop;
using detail::kTask;
using detail::poolLog;

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
