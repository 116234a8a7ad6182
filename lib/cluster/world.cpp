// forklift::cluster::World: the MPI thread and the inbox (see world.hpp).
#include "forklift/cluster/world.hpp"

#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#include "forklift/fork_server.hpp"
#include "forklift/log.hpp"
#include "forklift/manager.hpp"
#include "mpi_error.hpp"

namespace forklift::cluster {

namespace {

// forklift's tag on MPI_COMM_WORLD's duplicate.
constexpr int kTag = 0x466b;  // "Fk"

// 0: no World yet; 1: one lives; 2: one ended (MPI cannot start again).
std::atomic<int> world_state{0};

std::shared_ptr<spdlog::logger> clusterLog() {
  static auto log = makeLogger("cluster");
  return log;
}

std::string hostName(int rank, const char* mpiName) {
  const char* env = std::getenv("FORKLIFT_CLUSTER_HOST");
  if (!env || !*env) return mpiName;
  std::string s = env;
  const std::string key = "{rank}";
  for (auto at = s.find(key); at != std::string::npos; at = s.find(key, at))
    s.replace(at, key.size(), std::to_string(rank));
  return s;
}

}  // namespace

struct World::Impl {
  WorldOptions options;
  pid_t owner = ::getpid();
  std::optional<ForkServer> forkServer;
  std::thread thread;

  // Start-up handshake.
  std::mutex startMutex;
  std::condition_variable startCv;
  bool started = false;
  std::exception_ptr startError;
  int rank = -1, size = 0;
  std::vector<std::string> hosts;

  // The MPI thread's queue of sends; stop/abort requests.
  std::mutex outMutex;
  std::condition_variable outCv;
  std::deque<std::pair<int, std::vector<char>>> out;
  bool stopping = false;
  bool abort = false;

  // Where received messages go: the inbox, or a routed prefix's mailbox.
  Mailbox inbox;
  mutable std::mutex routeMutex;
  std::map<std::string, std::shared_ptr<Mailbox>> routes;

  std::atomic<std::uint64_t> sent{0}, received{0}, refused{0}, wakeups{0};

  MPI_Comm comm = MPI_COMM_NULL;

  void run();
  void deliver(int source, const std::vector<char>& bytes);
  Mailbox& mailboxForLocked(const std::string& command);  // routeMutex held
  bool receiveSome();
};

void World::Impl::deliver(int source, const std::vector<char>& bytes) {
  Message m;
  try {
    m = decode(bytes.data(), bytes.size(), options.limits);
  } catch (const std::exception& e) {
    refused.fetch_add(1, std::memory_order_relaxed);
    clusterLog()->warn("rank {}: {} bytes from rank {} on forklift's tag refused: {}", rank, bytes.size(), source,
                       e.what());
    return;
  }
  received.fetch_add(1, std::memory_order_relaxed);
  // Chosen and filled under routeMutex, so route() cannot move the inbox's
  // messages between the two.
  std::lock_guard lock(routeMutex);
  mailboxForLocked(m.command()).put(Received{source, std::move(m)});
}

Mailbox& World::Impl::mailboxForLocked(const std::string& command) {
  Mailbox* best = nullptr;
  std::size_t bestSize = 0;
  for (const auto& [prefix, box] : routes)  // few: one per consumer
    if (prefix.size() > bestSize && command.compare(0, prefix.size(), prefix) == 0) {
      best = box.get();
      bestSize = prefix.size();
    }
  if (best) return *best;
  return inbox;
}

// Takes the messages waiting on forklift's tag (at most a few per turn, so
// sends are not starved); true when it took any.
bool World::Impl::receiveSome() {
  bool any = false;
  std::vector<char> buf;
  for (int i = 0; i < 64; ++i) {
    int flag = 0;
    MPI_Message msg;
    MPI_Status st;
    detail::check("MPI_Improbe", MPI_Improbe(MPI_ANY_SOURCE, kTag, comm, &flag, &msg, &st));
    if (!flag) break;
    int n = 0;
    detail::check("MPI_Get_count", MPI_Get_count(&st, MPI_BYTE, &n));
    buf.resize(static_cast<std::size_t>(n));
    detail::check("MPI_Mrecv", MPI_Mrecv(buf.data(), n, MPI_BYTE, &msg, MPI_STATUS_IGNORE));
    deliver(st.MPI_SOURCE, buf);
    any = true;
  }
  return any;
}

void World::Impl::run() {
  // ---- init: this thread is MPI's main thread (FUNNELED) -----------------
  try {
    int already = 0;
    detail::check("MPI_Initialized", MPI_Initialized(&already));
    if (already) throw Error("cluster::World: MPI was initialised already by someone else in this process");
    int provided = 0;
    detail::check("MPI_Init_thread", MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      throw MpiError("MPI_Init_thread", 0,
                     "cluster::World: MPI_Init_thread provides thread level " + std::to_string(provided) +
                         ", less than MPI_THREAD_FUNNELED, which the MPI thread needs");
    }
    // Errors come back as codes (detail::check turns them into MpiError).
    detail::check("MPI_Comm_set_errhandler", MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    detail::check("MPI_Comm_dup", MPI_Comm_dup(MPI_COMM_WORLD, &comm));
    detail::check("MPI_Comm_set_errhandler", MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
    detail::check("MPI_Comm_rank", MPI_Comm_rank(comm, &rank));
    detail::check("MPI_Comm_size", MPI_Comm_size(comm, &size));
    char name[MPI_MAX_PROCESSOR_NAME] = {};
    int len = 0;
    detail::check("MPI_Get_processor_name", MPI_Get_processor_name(name, &len));
    std::string mine = hostName(rank, name);
    char fixed[MPI_MAX_PROCESSOR_NAME] = {};
    std::strncpy(fixed, mine.c_str(), MPI_MAX_PROCESSOR_NAME - 1);
    std::vector<char> all(static_cast<std::size_t>(size) * MPI_MAX_PROCESSOR_NAME);
    detail::check("MPI_Allgather", MPI_Allgather(fixed, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(),
                                                 MPI_MAX_PROCESSOR_NAME, MPI_CHAR, comm));
    std::vector<std::string> h;
    for (int r = 0; r < size; ++r) {
      const char* p = all.data() + static_cast<std::size_t>(r) * MPI_MAX_PROCESSOR_NAME;
      h.emplace_back(p, strnlen(p, MPI_MAX_PROCESSOR_NAME));
    }
    std::lock_guard lock(startMutex);
    hosts = std::move(h);
    started = true;
  } catch (...) {
    std::lock_guard lock(startMutex);
    startError = std::current_exception();
    started = true;
    startCv.notify_all();
    return;
  }
  startCv.notify_all();

  // ---- serve -------------------------------------------------------------
  struct Pending {
    std::vector<char> bytes;
    MPI_Request request;
  };
  std::vector<Pending> pending;
  std::deque<std::pair<int, std::vector<char>>> batch;
  using Clock = std::chrono::steady_clock;
  const auto minSleep = std::chrono::microseconds(10);
  auto sleep = minSleep;
  auto lastProgress = Clock::now();
  bool stop = false;
  try {
    for (;;) {
      bool progress = false;
      {
        std::unique_lock lock(outMutex);
        if (abort) break;
        batch.swap(out);
        stop = stopping;
      }
      for (auto& [dest, bytes] : batch) {
        pending.push_back(Pending{std::move(bytes), MPI_REQUEST_NULL});
        Pending& p = pending.back();
        detail::check("MPI_Isend", MPI_Isend(p.bytes.data(), static_cast<int>(p.bytes.size()), MPI_BYTE, dest, kTag,
                                             comm, &p.request));
        progress = true;
      }
      batch.clear();
      for (std::size_t i = 0; i < pending.size();) {
        int done = 0;
        detail::check("MPI_Test", MPI_Test(&pending[i].request, &done, MPI_STATUS_IGNORE));
        if (done) {
          sent.fetch_add(1, std::memory_order_relaxed);
          pending[i] = std::move(pending.back());
          pending.pop_back();
          progress = true;
        } else {
          ++i;
        }
      }
      if (receiveSome()) progress = true;
      if (stop && pending.empty()) {
        std::lock_guard lock(outMutex);
        if (out.empty()) break;
        continue;
      }
      if (progress) {
        lastProgress = Clock::now();
        sleep = minSleep;
        continue;
      }
      if (Clock::now() - lastProgress < options.spin) continue;
      std::unique_lock lock(outMutex);
      outCv.wait_for(lock, sleep, [&] { return !out.empty() || stopping || abort; });
      wakeups.fetch_add(1, std::memory_order_relaxed);
      const bool idle = Clock::now() - lastProgress >= options.idleAfter;
      sleep = std::min<std::chrono::microseconds>(idle ? std::max(options.idleBackoff, options.maxBackoff)
                                                       : options.maxBackoff,
                                                  sleep * 2);
    }
    bool aborting;
    {
      std::lock_guard lock(outMutex);
      aborting = abort;
    }
    if (aborting) {
      clusterLog()->error("rank {} of {} on {}: the World ended while an exception unwound: MPI_Abort", rank, size,
                          hosts[static_cast<std::size_t>(rank)]);
      MPI_Abort(MPI_COMM_WORLD, 1);
      return;
    }
    // ---- the end: every rank's sends done, then MPI_Finalize -------------
    MPI_Request barrier = MPI_REQUEST_NULL;
    detail::check("MPI_Ibarrier", MPI_Ibarrier(comm, &barrier));
    sleep = minSleep;
    for (;;) {
      int done = 0;
      detail::check("MPI_Test", MPI_Test(&barrier, &done, MPI_STATUS_IGNORE));
      if (done) break;
      if (receiveSome()) {
        sleep = minSleep;
        continue;
      }
      std::this_thread::sleep_for(sleep);
      sleep = std::min<std::chrono::microseconds>(options.maxBackoff, sleep * 2);
    }
    receiveSome();
    MPI_Comm_free(&comm);
    detail::check("MPI_Finalize", MPI_Finalize());
  } catch (const std::exception& e) {
    clusterLog()->error("rank {} of {} on {}: the MPI thread failed: {}; aborting the job", rank, size,
                        hosts.empty() ? std::string("?") : hosts[static_cast<std::size_t>(rank)], e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
}

World::World(WorldOptions options) {
  int expected = 0;
  if (!world_state.compare_exchange_strong(expected, 1))
    throw Error(expected == 1 ? "cluster::World: one exists already in this process (MPI is initialised once)"
                              : "cluster::World: one existed and ended in this process; MPI cannot be initialised "
                                "again after MPI_Finalize");
  try {
    impl_ = std::make_unique<Impl>();
    impl_->options = std::move(options);
    // Before MPI_Init, which starts threads (see "Forks" in world.hpp).
    if (impl_->options.forkServer) impl_->forkServer.emplace();
    impl_->thread = std::thread([impl = impl_.get()] { impl->run(); });
    std::unique_lock lock(impl_->startMutex);
    impl_->startCv.wait(lock, [&] { return impl_->started; });
    if (impl_->startError) {
      lock.unlock();
      impl_->thread.join();
      std::rethrow_exception(impl_->startError);
    }
    rank_ = impl_->rank;
    size_ = impl_->size;
    hosts_ = impl_->hosts;
  } catch (...) {
    world_state = 2;
    throw;
  }
}

World::~World() {
  if (!impl_ || impl_->owner != ::getpid()) return;  // a forked child's copy
  // What comes during the end waits in the inbox: the manager may be gone.
  impl_->inbox.deliverToInbox();
  {
    std::lock_guard lock(impl_->outMutex);
    if (std::uncaught_exceptions() > 0)
      impl_->abort = true;
    else
      impl_->stopping = true;
  }
  impl_->outCv.notify_all();
  impl_->thread.join();
  world_state = 2;
}

const std::string& World::host(int rank) const {
  if (rank < 0 || rank >= size_)
    throw Error("cluster::World::host: rank " + std::to_string(rank) + " out of range (size " + std::to_string(size_) +
                ")");
  return hosts_[static_cast<std::size_t>(rank)];
}

void World::send(int dest, const Message& m) {
  if (dest < 0 || dest >= size_)
    throw Error("cluster::World::send '" + m.command() + "': rank " + std::to_string(dest) + " out of range (size " +
                std::to_string(size_) + ")");
  Buffer buf;
  encode(m, buf, impl_->options.limits);
  if (buf.size() > static_cast<std::size_t>(INT_MAX))
    throw LimitError("cannot send '" + m.command() + "': " + std::to_string(buf.size()) + " bytes, more than MPI's int count");
  queue(dest, std::vector<char>(buf.data(), buf.data() + buf.size()), m.command());
}

void World::queue(int dest, std::vector<char> bytes, const std::string& command) {
  {
    std::lock_guard lock(impl_->outMutex);
    if (impl_->stopping || impl_->abort)
      throw Error("cluster::World::send '" + command + "': the World is ending");
    impl_->out.emplace_back(dest, std::move(bytes));
  }
  impl_->outCv.notify_one();
}

std::optional<Received> World::tryRecv() { return impl_->inbox.tryRecv(); }
std::optional<Received> World::recv(Timeout timeout) { return impl_->inbox.recv(timeout); }
int World::fd() const noexcept { return impl_->inbox.fd(); }
Mailbox& World::inbox() noexcept { return impl_->inbox; }

void World::deliverTo(Manager& manager, std::function<void(int source, Message&)> fn) {
  impl_->inbox.deliverTo(manager, std::move(fn));
}

void World::deliverToInbox() { impl_->inbox.deliverToInbox(); }

std::shared_ptr<Mailbox> World::route(const std::string& prefix) {
  if (prefix.empty()) throw Error("cluster::World::route: an empty prefix (it would take every message)");
  auto box = std::make_shared<Mailbox>();
  std::lock_guard lock(impl_->routeMutex);
  if (!impl_->routes.emplace(prefix, box).second)
    throw Error("cluster::World::route: '" + prefix + "' is routed already");
  // Those of the prefix that wait in the inbox move, in order; the MPI
  // thread, which takes routeMutex to choose a mailbox, puts nothing
  // meanwhile.
  std::vector<Received> keep;
  while (auto r = impl_->inbox.tryRecv()) {
    if (&impl_->mailboxForLocked(r->message.command()) == box.get())
      box->put(std::move(*r));
    else
      keep.push_back(std::move(*r));
  }
  for (auto& r : keep) impl_->inbox.put(std::move(r));
  return box;
}

void World::unroute(const std::string& prefix) {
  std::lock_guard lock(impl_->routeMutex);
  impl_->routes.erase(prefix);
}

World::Stats World::stats() const {
  Stats s;
  s.sent = impl_->sent.load(std::memory_order_relaxed);
  s.received = impl_->received.load(std::memory_order_relaxed);
  s.refused = impl_->refused.load(std::memory_order_relaxed);
  s.wakeups = impl_->wakeups.load(std::memory_order_relaxed);
  return s;
}

void detail::sendRaw(World& world, int dest, std::vector<char> bytes) {
  if (dest < 0 || dest >= world.size()) throw Error("cluster::detail::sendRaw: rank out of range");
  world.queue(dest, std::move(bytes), "(raw bytes)");
}

bool World::exists() noexcept { return world_state.load() == 1; }

}  // namespace forklift::cluster
