// forklift::cluster::World: the MPI thread and the inbox (see world.hpp).
#include "forklift/cluster/world.hpp"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "forklift/fork_server.hpp"
#include "forklift/log.hpp"
#include "forklift/manager.hpp"
#include "array_wire.hpp"
#include "mpi_error.hpp"

namespace forklift::cluster {

namespace {

// forklift's tag on MPI_COMM_WORLD's duplicate; arrays' bytes travel on the
// next one (see "Arrays" in world.hpp).
constexpr int kTag = 0x466b;  // "Fk"
constexpr int kDataTag = kTag + 1;

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

// One queued send: a plain message, or an array header and the segments
// whose pages follow it (kept mapped until every chunk's send completed).
struct detail::Outgoing {
  int dest = -1;
  std::vector<char> bytes;
  bool arrays = false;  // bytes is an array header: its seq is set when posted
  std::vector<std::vector<char>> rawChunks;  // after the segments' (tests only)
  std::vector<SharedMemory> segments;
  std::size_t chunkBytes = 0;
};

namespace {

// A message from one rank that waits for its arrays' bytes, or for an
// earlier one from that rank to be delivered (messages keep their order).
struct Incoming {
  Message message;
  std::size_t arrays = 0;
  std::vector<SharedMemory> segments;  // the pages the chunks land in
  struct Chunk {
    char* to;
    std::size_t bytes;
  };
  std::vector<Chunk> chunks;
  std::size_t next = 0;                 // the next chunk to match
  std::vector<MPI_Request> requests;    // receives into the pages
  // Refused: its chunks (those still to come: drainLeft) go to the scratch
  // buffer, one at a time, and nothing is delivered.
  bool refused = false;
  std::uint64_t drainLeft = 0;
  MPI_Request drain = MPI_REQUEST_NULL;
  std::vector<char> scratch;  // at most one chunk

  bool done() const {
    return next == chunks.size() && requests.empty() && drainLeft == 0 && drain == MPI_REQUEST_NULL;
  }
};

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
  std::deque<detail::Outgoing> out;
  bool stopping = false;
  bool abort = false;

  // Where received messages go: the inbox, or a routed prefix's mailbox.
  Mailbox inbox;
  mutable std::mutex routeMutex;
  std::map<std::string, std::shared_ptr<Mailbox>> routes;

  std::atomic<std::uint64_t> sent{0}, received{0}, refused{0}, wakeups{0}, arraysSent{0}, arraysReceived{0};

  MPI_Comm comm = MPI_COMM_NULL;

  // The MPI thread's: array messages sent to each rank, expected from each
  // rank; what waits, per source.
  std::map<int, std::uint64_t> sendSeq, recvSeq;
  std::map<int, std::deque<Incoming>> incoming;

  void run();
  void deliver(int source, Message m);
  Mailbox& mailboxForLocked(const std::string& command);  // routeMutex held
  void take(int source, const std::vector<char>& bytes);
  void takeArrays(int source, const std::vector<char>& bytes);
  void refuse(int source, std::size_t bytes, const std::string& why);
  bool progress(int source, Incoming& in);
  bool receivingPages() const;
  std::size_t sendingPages = 0;  // pending sends that carry array bytes
  bool transferring() const { return sendingPages > 0 || receivingPages(); }
  bool receiveSome();
};

void World::Impl::refuse(int source, std::size_t bytes, const std::string& why) {
  refused.fetch_add(1, std::memory_order_relaxed);
  clusterLog()->warn("rank {}: {} bytes from rank {} on forklift's tag refused: {}", rank, bytes, source, why);
}

// A header taken off forklift's tag: delivered now when nothing from its
// source waits before it, else queued behind.
void World::Impl::take(int source, const std::vector<char>& bytes) {
  if (detail::isArrayHeader(bytes.data(), bytes.size())) return takeArrays(source, bytes);
  Message m;
  try {
    m = decode(bytes.data(), bytes.size(), options.limits);
  } catch (const std::exception& e) {
    return refuse(source, bytes.size(), e.what());
  }
  auto q = incoming.find(source);
  if (q == incoming.end() || q->second.empty()) return deliver(source, std::move(m));
  Incoming in;
  in.message = std::move(m);
  q->second.push_back(std::move(in));
}

void World::Impl::takeArrays(int source, const std::vector<char>& bytes) {
  const auto h = detail::readArrayHeader(bytes.data(), bytes.size(), options.limits, options.arrays);
  if (!h.wellFormed)
    return refuse(source, bytes.size(), "array header: " + h.error + " (sent by no World: nothing drained)");
  // Only the next header in the source's sequence owns the chunks that come
  // next on the data tag; one out of sequence was sent by no World.
  std::uint64_t& expected = recvSeq[source];
  if (h.seq != expected)
    return refuse(source, bytes.size(),
                  "array header number " + std::to_string(h.seq) + ", expected " + std::to_string(expected) +
                      " (sent by no World: nothing drained)");
  ++expected;
  Incoming in;
  std::string why = h.refusal;
  if (why.empty()) {
    try {
      in.segments = detail::makeArrays(h);
      in.message = detail::decodeWithArrays(h, in.segments, options.limits);
    } catch (const std::exception& e) {
      why = e.what();
    }
  }
  if (!why.empty()) {
    refuse(source, bytes.size(),
           "array header: " + why + " (its " + std::to_string(h.chunks) + " chunks are drained and dropped)");
    if (h.chunks == 0) return;
    in = Incoming{};
    in.refused = true;
    in.drainLeft = h.chunks;
  } else {
    in.arrays = in.segments.size();
    for (std::size_t i = 0; i < h.arrays.size(); ++i) {
      char* base = static_cast<char*>(in.segments[i].data());
      for (std::uint64_t at = 0; at < h.arrays[i].bytes; at += h.chunk)
        in.chunks.push_back(
            {base + at, static_cast<std::size_t>(std::min<std::uint64_t>(h.chunk, h.arrays[i].bytes - at))});
    }
  }
  auto& q = incoming[source];
  q.push_back(std::move(in));
  if (q.size() == 1) progress(source, q.front());
}

// Moves the front message of `source` on: completes receives, matches the
// chunks that came (straight into the pages; a chunk of another size than
// announced refuses the message), drains a refused one's. True on progress.
bool World::Impl::progress(int source, Incoming& in) {
  bool moved = false;
  for (std::size_t i = 0; i < in.requests.size();) {
    int done = 0;
    detail::check("MPI_Test", MPI_Test(&in.requests[i], &done, MPI_STATUS_IGNORE));
    if (done) {
      in.requests[i] = in.requests.back();
      in.requests.pop_back();
      moved = true;
    } else {
      ++i;
    }
  }
  if (in.drain != MPI_REQUEST_NULL) {
    int done = 0;
    detail::check("MPI_Test", MPI_Test(&in.drain, &done, MPI_STATUS_IGNORE));
    if (done) moved = true;
  }
  for (;;) {
    const bool wantPage = !in.refused && in.next < in.chunks.size();
    const bool wantDrain = in.refused && in.drainLeft > 0 && in.drain == MPI_REQUEST_NULL;
    if (!wantPage && !wantDrain) break;
    int flag = 0;
    MPI_Message msg;
    MPI_Status st;
    detail::check("MPI_Improbe", MPI_Improbe(source, kDataTag, comm, &flag, &msg, &st));
    if (!flag) break;
    moved = true;
    int n = 0;
    detail::check("MPI_Get_count", MPI_Get_count(&st, MPI_BYTE, &n));
    if (wantPage && static_cast<std::size_t>(n) == in.chunks[in.next].bytes) {
      MPI_Request r;
      detail::check("MPI_Imrecv", MPI_Imrecv(in.chunks[in.next].to, n, MPI_BYTE, &msg, &r));
      in.requests.push_back(r);
      ++in.next;
      continue;
    }
    if (wantPage) {
      refuse(source, static_cast<std::size_t>(n),
             "array chunk " + std::to_string(in.next) + " of '" + in.message.command() + "' is " + std::to_string(n) +
                 " bytes, its header said " + std::to_string(in.chunks[in.next].bytes) +
                 "; the message is dropped, its other chunks drained");
      in.refused = true;
      in.drainLeft = in.chunks.size() - in.next;
      in.next = in.chunks.size();
    }
    // Drained through the scratch buffer, one chunk at a time.
    if (in.scratch.size() < static_cast<std::size_t>(n)) in.scratch.resize(static_cast<std::size_t>(n));
    detail::check("MPI_Imrecv", MPI_Imrecv(in.scratch.data(), n, MPI_BYTE, &msg, &in.drain));
    --in.drainLeft;
  }
  return moved;
}

// True while receives into pages (or a drain) are posted.
bool World::Impl::receivingPages() const {
  return std::any_of(incoming.begin(), incoming.end(), [](const auto& q) {
    return std::any_of(q.second.begin(), q.second.end(),
                       [](const Incoming& in) { return !in.requests.empty() || in.drain != MPI_REQUEST_NULL; });
  });
}

void World::Impl::deliver(int source, Message m) {
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
    take(st.MPI_SOURCE, buf);
    any = true;
  }
  // Messages waiting for their arrays, each source's in order.
  for (auto& [source, q] : incoming) {
    while (!q.empty()) {
      if (progress(source, q.front())) any = true;
      if (!q.front().done()) break;
      Incoming in = std::move(q.front());
      q.pop_front();
      if (in.refused) continue;
      arraysReceived.fetch_add(in.arrays, std::memory_order_relaxed);
      deliver(source, std::move(in.message));
      any = true;
    }
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
    detail::Outgoing out;
    std::vector<MPI_Request> requests;
  };
  std::vector<Pending> pending;
  std::deque<detail::Outgoing> batch;
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
      for (auto& o : batch) {
        pending.push_back(Pending{std::move(o), {}});
        Pending& p = pending.back();
        const int dest = p.out.dest;
        if (p.out.arrays) detail::setArraySeq(p.out.bytes, sendSeq[dest]++);
        MPI_Request r;
        detail::check("MPI_Isend", MPI_Isend(p.out.bytes.data(), static_cast<int>(p.out.bytes.size()), MPI_BYTE, dest,
                                             kTag, comm, &r));
        p.requests.push_back(r);
        // The arrays' bytes, straight from their pages, after the header.
        for (SharedMemory& shm : p.out.segments) {
          const char* base = static_cast<const char*>(shm.data());
          for (std::size_t at = 0; at < shm.bytes(); at += p.out.chunkBytes) {
            const auto n = static_cast<int>(std::min(p.out.chunkBytes, shm.bytes() - at));
            detail::check("MPI_Isend", MPI_Isend(base + at, n, MPI_BYTE, dest, kDataTag, comm, &r));
            p.requests.push_back(r);
          }
        }
        for (auto& c : p.out.rawChunks) {
          detail::check("MPI_Isend", MPI_Isend(c.data(), static_cast<int>(c.size()), MPI_BYTE, dest, kDataTag, comm, &r));
          p.requests.push_back(r);
        }
        if (p.requests.size() > 1) ++sendingPages;
        progress = true;
      }
      batch.clear();
      for (std::size_t i = 0; i < pending.size();) {
        int done = 0;
        auto& reqs = pending[i].requests;
        detail::check("MPI_Testall", MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done,
                                                 MPI_STATUSES_IGNORE));
        if (done) {
          sent.fetch_add(1, std::memory_order_relaxed);
          arraysSent.fetch_add(pending[i].out.segments.size(), std::memory_order_relaxed);
          if (pending[i].requests.size() > 1) --sendingPages;
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
      // While array bytes move, MPI needs its progress calls on both sides
      // (shared memory moves a large message in fragments): the shortest
      // sleeps, until the transfer ends.
      if (transferring()) sleep = minSleep;
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
    // Every rank's sends completed, so whatever is still coming is here
    // already: take it, and let the receives posted into pages finish before
    // MPI ends (it is all dropped with the World). A message still waiting
    // for chunks after some quiet turns waits for chunks no rank sent (a
    // forged header): it is dropped, not waited for.
    sleep = minSleep;
    for (int quiet = 0; quiet < 20;) {
      const bool moved = receiveSome();
      const bool posted = receivingPages();
      if (!posted && std::all_of(incoming.begin(), incoming.end(), [](const auto& q) { return q.second.empty(); }))
        break;
      quiet = moved || posted ? 0 : quiet + 1;
      std::this_thread::sleep_for(sleep);
      sleep = std::min<std::chrono::microseconds>(options.maxBackoff, sleep * 2);
    }
    for (const auto& q : incoming)
      if (!q.second.empty())
        clusterLog()->warn("rank {}: {} message(s) from rank {} still waited for array chunks that never came at the "
                           "end; dropped",
                           rank, q.second.size(), q.first);
    incoming.clear();
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
    const std::size_t chunk = impl_->options.arrays.chunk;
    if (chunk < detail::kMinArrayChunk || chunk > detail::kMaxArrayChunk)
      throw Error("cluster::World: WorldOptions::arrays.chunk is " + std::to_string(chunk) + " bytes; it must be " +
                  std::to_string(detail::kMinArrayChunk) + " to " + std::to_string(detail::kMaxArrayChunk));
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
  detail::Outgoing o;
  o.dest = dest;
  if (detail::holdsDescriptor(m)) {
    auto packed = detail::packArrays(m, impl_->options.limits, impl_->options.arrays);
    o.bytes = std::move(packed.header);
    o.arrays = true;
    o.segments = std::move(packed.arrays);
    o.chunkBytes = packed.chunk;
  } else {
    Buffer buf;
    encode(m, buf, impl_->options.limits);
    o.bytes.assign(buf.data(), buf.data() + buf.size());
  }
  if (o.bytes.size() > static_cast<std::size_t>(INT_MAX))
    throw LimitError("cannot send '" + m.command() + "': " + std::to_string(o.bytes.size()) +
                     " bytes, more than MPI's int count");
  queue(std::move(o), m.command());
}

void World::queue(detail::Outgoing o, const std::string& command) {
  {
    std::lock_guard lock(impl_->outMutex);
    if (impl_->stopping || impl_->abort)
      throw Error("cluster::World::send '" + command + "': the World is ending");
    impl_->out.push_back(std::move(o));
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
  s.arraysSent = impl_->arraysSent.load(std::memory_order_relaxed);
  s.arraysReceived = impl_->arraysReceived.load(std::memory_order_relaxed);
  return s;
}

void detail::sendRaw(World& world, int dest, std::vector<char> bytes) {
  if (dest < 0 || dest >= world.size()) throw Error("cluster::detail::sendRaw: rank out of range");
  Outgoing o;
  o.dest = dest;
  o.bytes = std::move(bytes);
  world.queue(std::move(o), "(raw bytes)");
}

void detail::sendRawArrays(World& world, int dest, std::vector<char> header, std::vector<std::vector<char>> chunks) {
  if (dest < 0 || dest >= world.size()) throw Error("cluster::detail::sendRawArrays: rank out of range");
  if (!isArrayHeader(header.data(), header.size()) || header.size() < kArrayPrefixBytes)
    throw Error("cluster::detail::sendRawArrays: not an array header");
  Outgoing o;
  o.dest = dest;
  o.bytes = std::move(header);
  o.arrays = true;
  o.rawChunks = std::move(chunks);
  world.queue(std::move(o), "(raw arrays)");
}

bool World::exists() noexcept { return world_state.load() == 1; }

}  // namespace forklift::cluster
