// forklift::cluster: the driver's Pool (see pool.hpp).
#include "forklift/cluster/pool.hpp"

#include <algorithm>
#include <deque>
#include <exception>
#include <unordered_map>

#include "forklift/cluster/world.hpp"
#include "protocol.hpp"

namespace forklift::cluster {

using detail::poolLog;

// ---- the driver's Pool -----------------------------------------------------

namespace detail {

struct ClusterTask {
  std::uint64_t id = 0;
  std::string fn;
  List args;
  std::optional<Timeout> timeout;
  int retries = 0;
  int attempts = 0;                  // sent to an agent and not given back unstarted
  std::vector<std::string> history;  // one line per failed attempt
  int lastRank = -1;                 // where the last attempt failed
  bool done = false;
  CallResult result;
  TaskPlace place;
};

namespace {

const Value* field(const Map& m, std::string_view key) {
  for (const auto& [k, v] : m)
    if (k == key) return &v;
  return nullptr;
}

std::int64_t intField(const Map& m, std::string_view key) {
  const Value* v = field(m, key);
  if (!v || v->kind() != Value::Kind::Int) throw TypeError("no integer '" + std::string(key) + "'");
  return v->as<std::int64_t>();
}

}  // namespace

class PoolCore {
 public:
  PoolCore(World& w, const cluster::PoolOptions& o) : world(w), options(o), box(w.route(kPrefix)) {}
  ~PoolCore() { world.unroute(kPrefix); }

  World& world;
  cluster::PoolOptions options;
  std::shared_ptr<Mailbox> box;  // this pool's messages
  struct Host {
    HostStats s;
    std::size_t capacity = 0;
    bool hello = false;
    bool acked = false;  // its suspension
  };
  std::vector<Host> hosts;  // by rank; rank 0 is the driver and has none
  std::deque<std::shared_ptr<ClusterTask>> queued;
  std::unordered_map<std::uint64_t, std::shared_ptr<ClusterTask>> running;  // sent, by id
  std::unordered_map<std::uint64_t, int> runningOn;                         // ... and to which rank
  std::function<void(const TaskEnd&, const CallResult&)> onResult;
  std::uint64_t nextId = 1;
  std::size_t submitted = 0, completed = 0, failed = 0, refused = 0;
  bool finalized = false, suspended = false, inCallback = false;

  bool anyServing() const {
    for (std::size_t r = 1; r < hosts.size(); ++r)
      if (hosts[r].s.serving) return true;
    return false;
  }

  std::string brokenText() const {
    std::string t = "every host is out of the pool:";
    for (std::size_t r = 1; r < hosts.size(); ++r)
      t += (r > 1 ? "; " : " ") + hosts[r].s.host + " (rank " + std::to_string(r) + "): " + hosts[r].s.reason;
    return t;
  }

  void refuse(int source, const std::string& command, const std::string& why) {
    ++refused;
    poolLog()->warn("driver: '{}' from rank {} refused: {}", command, source, why);
  }

  // The serving host with the most free room for `t`: another than the one
  // its last attempt failed on while another serves. -1: none has room.
  int choose(const ClusterTask& t) const {
    bool elsewhere = false;
    for (std::size_t r = 1; r < hosts.size(); ++r)
      elsewhere = elsewhere || (hosts[r].s.serving && static_cast<int>(r) != t.lastRank);
    int best = -1;
    std::size_t bestFree = 0;
    for (std::size_t r = 1; r < hosts.size(); ++r) {
      const auto& h = hosts[r];
      if (!h.s.serving || (elsewhere && static_cast<int>(r) == t.lastRank)) continue;
      const std::size_t free = h.capacity > h.s.inFlight ? h.capacity - h.s.inFlight : 0;
      if (free > bestFree) {
        bestFree = free;
        best = static_cast<int>(r);
      }
    }
    return best;
  }

  bool anyRoom() const {
    for (std::size_t r = 1; r < hosts.size(); ++r)
      if (hosts[r].s.serving && hosts[r].capacity > hosts[r].s.inFlight) return true;
    return false;
  }

  // Sends queued tasks, in order, to hosts with room; a retried task that
  // waits for another host than its last does not hold up the ones behind.
  void dispatch() {
    if (suspended) return;
    if (!anyServing()) {
      const std::string why = brokenText();
      while (!queued.empty()) {
        auto t = queued.front();
        queued.pop_front();
        fail(*t, std::make_exception_ptr(PoolBroken("task " + std::to_string(t->id) + " '" + t->fn + "': " + why)));
      }
      return;
    }
    for (auto it = queued.begin(); it != queued.end() && anyRoom();) {
      const int rank = choose(**it);
      if (rank < 0) {
        ++it;
        continue;
      }
      auto t = std::move(*it);
      it = queued.erase(it);
      Message m(kTask, {{"id", static_cast<std::int64_t>(t->id)}, {"fn", t->fn}, {"args", t->args}});
      if (t->timeout) m.set("timeout_ms", static_cast<std::int64_t>(t->timeout->count()));
      try {
        world.send(rank, m);
      } catch (const std::exception& e) {  // its arguments cannot travel (Limits)
        fail(*t, std::make_exception_ptr(
                     Error("task " + std::to_string(t->id) + " '" + t->fn + "' cannot be sent: " + e.what())));
        continue;
      }
      ++t->attempts;
      ++hosts[static_cast<std::size_t>(rank)].s.inFlight;
      runningOn[t->id] = rank;
      running.emplace(t->id, std::move(t));
    }
  }

  void finish(ClusterTask& t, CallResult r) {
    t.done = true;
    t.result = std::move(r);
    ++completed;
    if (!t.result.ok()) ++failed;
    if (onResult) {
      inCallback = true;
      try {
        onResult(TaskEnd{t.id, t.fn, t.attempts, t.place}, t.result);
      } catch (const std::exception& e) {
        poolLog()->error("driver: the result callback of task {} threw: {}", t.id, e.what());
      }
      inCallback = false;
    }
  }
  void fail(ClusterTask& t, std::exception_ptr e) { finish(t, CallResult(std::move(e))); }

  // Takes a sent task back from `rank` (it ended or never started there).
  std::shared_ptr<ClusterTask> take(std::uint64_t id, int rank) {
    auto it = running.find(id);
    auto on = runningOn.find(id);
    if (it == running.end() || on == runningOn.end() || on->second != rank) return nullptr;
    auto t = std::move(it->second);
    running.erase(it);
    runningOn.erase(on);
    --hosts[static_cast<std::size_t>(rank)].s.inFlight;
    return t;
  }

  void onTaskResult(int source, Message& m) {
    // Every field is read before anything changes: a malformed result changes nothing.
    const auto id = m.get<std::int64_t>("id");
    const bool ok = m.get<bool>("ok");
    const auto worker = m.get<std::int64_t>("worker");
    const auto pid = m.get<std::int64_t>("pid", -1);
    std::string kind, what;
    ExitStatus status;
    if (!ok) {
      kind = m.get<std::string>("kind");
      what = m.get<std::string>("what");
      if (kind == "died") {
        const Map st = m.get<Map>("status");
        status.how = static_cast<ExitStatus::How>(intField(st, "how"));
        status.code = static_cast<int>(intField(st, "code"));
        status.signal = static_cast<int>(intField(st, "signal"));
      }
    }
    auto it = runningOn.find(static_cast<std::uint64_t>(id));
    if (id <= 0 || it == runningOn.end() || it->second != source)
      return refuse(source, m.command(), "task " + std::to_string(id) + " is not running on rank " +
                                            std::to_string(source));
    auto t = take(static_cast<std::uint64_t>(id), source);
    auto& h = hosts[static_cast<std::size_t>(source)].s;
    ++h.ran;
    t->place = TaskPlace{source, h.host, worker < 0 ? 0 : static_cast<std::size_t>(worker), static_cast<pid_t>(pid)};
    if (ok) {
      Value v;
      if (Value* p = m.find("value")) v = std::move(*p);
      return finish(*t, CallResult(std::move(v)));
    }
    ++h.failed;
    std::string where = "on host " + h.host + " (rank " + std::to_string(source) + ")";
    if (worker >= 0) where += ", worker " + std::to_string(worker);
    t->history.push_back(where + ": " + what);
    const bool retriable = kind == "died" || kind == "timeout" || kind == "broken";
    if (retriable && t->attempts <= t->retries) {
      poolLog()->info("driver: task {} '{}' failed {}: {}; it runs again", t->id, t->fn, where, what);
      t->lastRank = source;
      queued.push_front(std::move(t));
      return;
    }
    // The first attempt, then each other one; the last attempt's words end it.
    std::string text = "task " + std::to_string(t->id) + " '" + t->fn + "' " + t->history[0];
    const auto n = t->history.size();
    for (std::size_t i = 1; i < n; ++i)
      text += "; attempt " + std::to_string(i + 1) + " of " + std::to_string(n) + " " + t->history[i];
    std::exception_ptr e;
    if (kind == "timeout")
      e = std::make_exception_ptr(TaskTimeout(text));
    else if (kind == "died")
      e = std::make_exception_ptr(WorkerDied(text, status));
    else if (kind == "broken")
      e = std::make_exception_ptr(PoolBroken(text));
    else if (kind == "remote")
      e = std::make_exception_ptr(RemoteError(text));
    else
      e = std::make_exception_ptr(Error(text));
    fail(*t, e);
  }

  // Tasks `source` gives back unstarted: to the front of the queue, in
  // order, no attempt counted.
  static List idsOf(const Message& m) {
    List ids = m.get<List>("ids");
    for (const auto& v : ids)
      if (v.kind() != Value::Kind::Int) throw TypeError("'ids' holds a " + v.typeName());
    return ids;
  }
  void giveBack(int source, const Message& m, const List& ids) {
    if (!ids.empty())
      poolLog()->info("driver: {} (rank {}) gave back {} tasks that did not start",
                      hosts[static_cast<std::size_t>(source)].s.host, source, ids.size());
    for (auto i = ids.rbegin(); i != ids.rend(); ++i) {
      const auto id = static_cast<std::uint64_t>(i->as<std::int64_t>());
      auto t = take(id, source);
      if (!t) {
        refuse(source, m.command(), "task " + std::to_string(id) + " is not running on rank " + std::to_string(source));
        continue;
      }
      --t->attempts;
      queued.push_front(std::move(t));
    }
  }

  void handle(int source, Message& m) {
    const std::string& c = m.command();
    if (source <= 0 || static_cast<std::size_t>(source) >= hosts.size())
      return refuse(source, c, "not from an agent");
    auto& h = hosts[static_cast<std::size_t>(source)];
    if (c == kResult) {
      onTaskResult(source, m);
    } else if (c == kReplaced) {
      const auto n = m.get<std::int64_t>("replacements");
      if (n < 0) return refuse(source, c, "a negative count");
      h.s.replacements = std::max(h.s.replacements, static_cast<std::size_t>(n));
    } else if (c == kOut) {
      const std::string reason = m.get<std::string>("reason");
      const List ids = idsOf(m);
      if (!h.s.serving) return refuse(source, c, "the host is out already");
      h.s.serving = false;
      h.s.reason = reason;
      poolLog()->error("driver: {} (rank {}) is out of the rotation: {}", h.s.host, source, reason);
      giveBack(source, m, ids);
    } else if (c == kReturned) {
      giveBack(source, m, idsOf(m));
    } else if (c == kSuspended) {
      const List ids = idsOf(m);
      if (!suspended || h.acked) return refuse(source, c, "no suspension asked");
      giveBack(source, m, ids);
      h.acked = true;
    } else if (c == kHello) {
      refuse(source, c, "a second hello");
    } else {
      refuse(source, c, "no such command");
    }
  }

  void take(Received& r) {
    try {
      handle(r.source, r.message);
    } catch (const std::exception& e) {  // a missing or ill-typed field
      refuse(r.source, r.message.command(), e.what());
    }
  }

  // Takes one message (waiting up to `timeout`); false when none came.
  bool pump(Timeout timeout) {
    auto r = box->recv(timeout);
    if (!r) return false;
    take(*r);
    dispatch();
    return true;
  }

  void poll() {
    while (auto r = box->tryRecv()) take(*r);
    dispatch();
  }

  bool waitFor(const std::function<bool()>& done, Timeout timeout) {
    if (inCallback) throw Error("cluster::Pool: waiting from its own result callback");
    const Deadline d(timeout);
    while (!done()) {
      if (d.expired()) return false;
      pump(d.forever() ? Timeout(1000) : std::min(Timeout(1000), std::chrono::ceil<Timeout>(d.remaining())));
    }
    return true;
  }

  void stopAgents() {
    finalized = true;
    for (int r = 1; r < world.size(); ++r) world.send(r, Message(kStop));
  }
};

}  // namespace detail

std::uint64_t ClusterFuture::id() const noexcept { return t_ ? t_->id : 0; }

bool ClusterFuture::wait(Timeout timeout) {
  if (!t_) throw Error("cluster::ClusterFuture: not valid");
  if (t_->done) return true;
  auto core = core_.lock();
  if (!core) throw Error("cluster::ClusterFuture: its Pool is gone and the task did not end");
  if (timeout == Timeout::zero()) {
    if (!core->inCallback) core->poll();  // from the callback: a look only
    return t_->done;
  }
  // Queued while suspended, it would never run: say so instead of waiting.
  auto done = [c = core.get(), t = t_.get()] {
    if (!t->done && c->suspended && c->running.count(t->id) == 0)
      throw Error("cluster::ClusterFuture::wait: task " + std::to_string(t->id) +
                  " is queued and the pool is suspended (it would never run)");
    return t->done;
  };
  return core->waitFor(done, timeout);
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

Pool::Pool(World& world, PoolOptions options) {
  if (!world.isDriver()) throw Error("cluster::Pool: only the driver (rank 0) makes one; agents serve()");
  if (world.size() < 2) throw Error("cluster::Pool: a World of one rank has no agent");
  if (options.restartLimit < 0 || options.retries < 0 || options.tasksPerWorker == 0)
    throw Error("cluster::Pool: restartLimit and retries must be >= 0, tasksPerWorker > 0");
  core_ = std::make_shared<detail::PoolCore>(world, options);
  auto& c = *core_;
  c.hosts.resize(static_cast<std::size_t>(world.size()));
  for (int r = 1; r < world.size(); ++r) {
    c.hosts[static_cast<std::size_t>(r)].s.rank = r;
    c.hosts[static_cast<std::size_t>(r)].s.host = world.host(r);
  }
  int hellos = 0;
  const Deadline d(options.startTimeout);
  while (hellos < world.size() - 1) {
    if (d.expired())
      throw TimeoutError("cluster::Pool: " + std::to_string(world.size() - 1 - hellos) +
                         " agent(s) did not say hello within " + std::to_string(options.startTimeout.count()) + " ms");
    auto r = c.box->recv(std::chrono::ceil<Timeout>(d.remaining()));
    if (!r) continue;
    const std::string& cmd = r->message.command();
    if (cmd != detail::kHello || r->source <= 0) {
      c.refuse(r->source, cmd, "no hello, before the agents' hello");
      continue;
    }
    auto& h = c.hosts[static_cast<std::size_t>(r->source)];
    const auto workers = r->message.get<std::int64_t>("workers", -1);
    if (h.hello || workers <= 0) {
      c.refuse(r->source, cmd, h.hello ? "a second hello" : "no positive 'workers'");
      continue;
    }
    h.hello = true;
    h.s.workers = static_cast<std::size_t>(workers);
    h.capacity = options.tasksPerWorker * h.s.workers;
    ++hellos;
  }
  for (int r = 1; r < world.size(); ++r)
    world.send(r, Message(detail::kConfig, {{"restart_limit", static_cast<std::int64_t>(options.restartLimit)}}));
}

Pool::~Pool() {
  if (!core_ || core_->finalized) return;
  if (std::uncaught_exceptions() > 0) {
    // Unwinding: waiting for the tasks (forever, if one hangs) would keep
    // the exception from ever reaching its handler, and the World's abort
    // with it. The agents stop; what did not end is abandoned.
    poolLog()->warn("cluster::Pool: destroyed while an exception unwinds; {} task(s) not ended are abandoned",
                    core_->submitted - core_->completed);
    try {
      core_->stopAgents();
    } catch (const std::exception& e) {
      poolLog()->error("cluster::Pool: stopping the agents failed: {}", e.what());
    }
    return;
  }
  try {
    finalize();
  } catch (const std::exception& e) {
    poolLog()->error("cluster::Pool: finalize in the destructor failed: {}", e.what());
  }
  if (!core_->finalized) {
    try {
      core_->stopAgents();  // the agents' serve() returns in any case
    } catch (const std::exception& e) {
      poolLog()->error("cluster::Pool: stopping the agents failed: {}", e.what());
    }
  }
}

ClusterFuture Pool::submit(const std::string& function, List args, std::optional<Timeout> timeout) {
  TaskOptions o;
  o.timeout = timeout;
  return submitWith(function, std::move(args), o);
}

ClusterFuture Pool::submitWith(const std::string& function, List args, TaskOptions options) {
  auto& c = *core_;
  if (c.finalized) throw Error("cluster::Pool::submit: the pool was finalized");
  if (!c.anyServing()) throw PoolBroken("cluster::Pool::submit '" + function + "': " + c.brokenText());
  auto t = std::make_shared<detail::ClusterTask>();
  t->id = c.nextId++;
  t->fn = function;
  t->args = std::move(args);
  t->timeout = options.timeout;
  if (!t->timeout && c.options.taskTimeout != kForever) t->timeout = c.options.taskTimeout;
  t->retries = std::max(0, options.retries.value_or(c.options.retries));
  ClusterFuture f;
  f.t_ = t;
  f.core_ = core_;
  c.queued.push_back(std::move(t));
  ++c.submitted;
  c.dispatch();
  return f;
}

std::vector<Value> Pool::map(const std::string& function, std::vector<List> argsList, std::optional<Timeout> timeout) {
  TaskOptions o;
  o.timeout = timeout;
  return mapWith(function, std::move(argsList), o);
}

std::vector<Value> Pool::mapWith(const std::string& function, std::vector<List> argsList, TaskOptions options) {
  std::vector<ClusterFuture> fs;
  fs.reserve(argsList.size());
  for (auto& a : argsList) fs.push_back(submitWith(function, std::move(a), options));
  for (auto& f : fs) f.wait(kForever);
  std::vector<Value> out;
  out.reserve(fs.size());
  for (auto& f : fs) out.push_back(f.get());
  return out;
}

void Pool::onResult(std::function<void(const TaskEnd&, const CallResult&)> fn) { core_->onResult = std::move(fn); }

bool Pool::wait(Timeout timeout) {
  auto* c = core_.get();
  return c->waitFor(
      [c] {
        if (c->suspended && !c->queued.empty())  // also when a host that went out gave tasks back
          throw Error("cluster::Pool::wait: suspended with " + std::to_string(c->queued.size()) +
                      " tasks queued (they would never run)");
        return c->completed == c->submitted;
      },
      timeout);
}

void Pool::poll() {
  if (core_->inCallback) throw Error("cluster::Pool::poll: from its own result callback");
  core_->poll();
}

void Pool::suspend() {
  auto& c = *core_;
  if (c.suspended) return;
  c.suspended = true;
  for (int r = 1; r < c.world.size(); ++r) {
    auto& h = c.hosts[static_cast<std::size_t>(r)];
    h.acked = false;
    c.world.send(r, Message(detail::kSuspend));
  }
  auto allAcked = [&c] {
    for (std::size_t r = 1; r < c.hosts.size(); ++r)
      if (c.hosts[r].s.serving && !c.hosts[r].acked) return false;
    return true;
  };
  if (!c.waitFor(allAcked, c.options.startTimeout))
    throw TimeoutError("cluster::Pool::suspend: not every agent acknowledged within " +
                       std::to_string(c.options.startTimeout.count()) + " ms");
}

void Pool::resume() {
  auto& c = *core_;
  if (!c.suspended) return;
  c.suspended = false;
  for (int r = 1; r < c.world.size(); ++r) c.world.send(r, Message(detail::kResume));
  c.dispatch();
}

bool Pool::suspended() const { return core_->suspended; }

void Pool::finalize() {
  if (core_->finalized) return;
  wait(kForever);
  core_->stopAgents();
}

std::size_t Pool::submitted() const { return core_->submitted; }
std::size_t Pool::completed() const { return core_->completed; }
std::size_t Pool::failedTasks() const { return core_->failed; }
std::size_t Pool::refused() const { return core_->refused; }

std::vector<std::size_t> Pool::perRank() const {
  std::vector<std::size_t> v(core_->hosts.size(), 0);
  for (std::size_t r = 1; r < v.size(); ++r) v[r] = core_->hosts[r].s.ran;
  return v;
}

std::vector<HostStats> Pool::hostStats() const {
  std::vector<HostStats> v;
  for (std::size_t r = 1; r < core_->hosts.size(); ++r) v.push_back(core_->hosts[r].s);
  return v;
}

}  // namespace forklift::cluster
