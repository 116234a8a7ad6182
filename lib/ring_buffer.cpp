#include "forklift/ring_buffer.hpp"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <thread>
#include <utility>

#include "forklift/error.hpp"
#include "metrics.hpp"
#include "posix.hpp"
#include "ring_layout.hpp"

// Recovery, the part the header only names. A slot is always in exactly one
// of: the writer (its spare list or its reserved slot), D, the reader (its
// record), R. Moves are D -> reader (CAS on tail, the record written
// *before* the CAS as "pending"), reader -> R (record "releasing", entry,
// rHead, record "none"), R -> writer, writer -> D, and D -> writer (a drop:
// CAS on tail with the writer bit). Each move writes the destination before
// it clears the source.
//
// A new writer (the old one dead or gone, so nothing enters D and nothing
// leaves R) owns exactly the slots found in none of D, the reader's record,
// R, read in that order, the order slots flow in: a slot that moves on
// while we look is found at its next place. A "pending" record is the
// reader's only if the tail says the reader took that position: tail ==
// pos+1 with the writer bit clear. Any later tail means the reader lost, or
// won and confirmed ("held") before it moved on, or the writer confirmed it
// for the reader: the writer, before a drop, turns a pending record of the
// position just before its CAS into "held" when the tail says the reader
// took it.
//
// A new reader resolves the dead reader's record the same way: held, or
// pending-and-won, goes back to R; releasing goes to R unless rHead shows
// it arrived; a resolution races with the writer's help only through a CAS
// on the record.

namespace forklift {

namespace detail {

namespace {

constexpr std::size_t kAlign = 64;
constexpr std::uint64_t kMaxSlotBytes = std::uint64_t{1} << 40;

std::uint64_t alignUp(std::uint64_t v, std::uint64_t a) { return (v + a - 1) / a * a; }

// Without pidfds, a waiting side looks at its peer this often.
constexpr int kPeerCheckMillis = 50;

// Waits for the doorbell or the peer's pidfd, each poll at most `capMillis`
// long when it is not negative; false when the deadline passed first.
bool sleepOn(int bell, int peer, const Deadline& d, int capMillis = -1) {
  for (;;) {
    pollfd p[2] = {{bell, POLLIN, 0}, {peer, POLLIN, 0}};
    int ms = d.pollMillis();
    if (capMillis >= 0 && (ms < 0 || ms > capMillis)) ms = capMillis;
    const int r = ::poll(p, peer >= 0 ? 2 : 1, ms);
    if (r < 0) {
      if (errno == EINTR) continue;
      throwErrno("cannot wait for the ring's doorbell");
    }
    if (p[0].revents & POLLIN) clearBell(bell);
    return r > 0 || !d.expired();
  }
}

int pidfdOpen(pid_t pid) { return ringPidfdOpen(pid); }

// True when `pid` is gone or a zombie (without pidfds: gone).
bool processDead(pid_t pid) {
  UniqueFd fd(pidfdOpen(pid));
  if (!fd && (errno == ENOSYS || errno == EPERM)) return ::kill(pid, 0) != 0 && errno == ESRCH;
  if (!fd) return errno == ESRCH;
  pollfd p{fd.get(), POLLIN, 0};
  return retryEintr([&] { return ::poll(&p, 1, 0); }) > 0;
}

std::string shapeText(const std::vector<std::int64_t>& shape) {
  std::string s;
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s;
}

// The last-level cache one CPU reaches, for the writer's choice of slot:
// the kernel's view in sysfs first (glibc's sysconf reports the whole
// package's L3 on some AMD parts, ten times what one core shares), then
// sysconf, then 8 MiB.
std::uint64_t lastLevelCacheBytes() {
  static const std::uint64_t bytes = [] {
    // The leading number of a small file ("3", "32768K"); -1 if unreadable.
    auto number = [](const std::string& path) -> long long {
      std::FILE* f = std::fopen(path.c_str(), "r");
      if (!f) return -1;
      long long v = -1;
      if (std::fscanf(f, "%lld", &v) != 1) v = -1;
      std::fclose(f);
      return v;
    };
    long long best = -1, bestLevel = -1;
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      const long long level = number(dir + "level");
      if (level < 0) break;
      const long long kib = number(dir + "size");
      if (kib > 0 && level >= bestLevel) {
        bestLevel = level;
        best = kib;
      }
    }
    if (best > 0) return static_cast<std::uint64_t>(best) << 10;
    for (const int name : {_SC_LEVEL3_CACHE_SIZE, _SC_LEVEL2_CACHE_SIZE}) {
      const long v = ::sysconf(name);
      if (v > 0) return static_cast<std::uint64_t>(v);
    }
    return std::uint64_t{8} << 20;
  }();
  return bytes;
}

}  // namespace

RingPidfdOpenFn ringPidfdOpen = [](int pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); };

std::int64_t monotonicNs() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// The mapping, the doorbells and pointers into the layout. Shared by the
// RingBuffer and the roles attached through it.
struct RingCore {
  SharedMemory shm;
  UniqueFd readerBell;  // the reader sleeps on it
  UniqueFd writerBell;  // a writer blocked on a full Block ring sleeps on it
  RingHeader* h = nullptr;
  RingSlotMeta* meta = nullptr;
  std::atomic<std::uint64_t>* deliver = nullptr;
  std::atomic<std::uint32_t>* ret = nullptr;
  std::byte* data = nullptr;
  std::uint64_t stride = 0;
  std::uint32_t n = 0;
  RingFormat fmt;

  std::byte* slot(std::uint32_t i) const noexcept { return data + std::uint64_t{i} * stride; }
  std::string what() const { return "ring '" + shm.name() + "'"; }

  void bind() {
    auto* base = static_cast<std::byte*>(shm.data());
    h = reinterpret_cast<RingHeader*>(base);
    meta = reinterpret_cast<RingSlotMeta*>(base + h->metaOffset);
    deliver = reinterpret_cast<std::atomic<std::uint64_t>*>(base + h->deliverOffset);
    ret = reinterpret_cast<std::atomic<std::uint32_t>*>(base + h->returnOffset);
    data = base + h->dataOffset;
    stride = h->slotStride;
    n = h->slotCount;
    fmt.slots = n;
    fmt.slotBytes = static_cast<std::size_t>(h->slotBytes);
    fmt.policy = static_cast<RingPolicy>(h->policy);
    if (h->dtype != 0) {
      fmt.dtype = static_cast<DType>(h->dtype);
      fmt.shape.assign(h->shape, h->shape + h->rank);
      fmt.layout = static_cast<Layout>(h->layout);
    }
  }
};

// The other side's attachment as this side sees it: its pid, and a pidfd
// that becomes readable when it dies.
class PeerWatch {
 public:
  enum class State : std::uint8_t { NotYet, Alive, Closed, Died };

  PeerWatch(std::atomic<std::int32_t>& pid, std::atomic<std::uint32_t>& epoch) : pid_(&pid), epoch_(&epoch) {}

  State state() {
    refresh();
    if (pid == 0) return epoch == 0 ? State::NotYet : State::Closed;
    if (gone) return State::Died;
    if (noPidfd) return ::kill(pid, 0) != 0 && errno == ESRCH ? State::Died : State::Alive;
    if (!fd) return State::Alive;  // our own pid (both roles in one process)
    pollfd p{fd.get(), POLLIN, 0};
    return retryEintr([&] { return ::poll(&p, 1, 0); }) > 0 ? State::Died : State::Alive;
  }
  int pollFd() {
    refresh();
    return fd.get();
  }

  // Each poll's cap: without a pidfd to poll, the state is looked at this often.
  int pollCap() const noexcept { return noPidfd ? kPeerCheckMillis : -1; }

  pid_t pid = 0;
  std::uint32_t epoch = 0;
  bool gone = false;     // the pid was gone before we could open it
  bool noPidfd = false;  // this kernel or sandbox gives none: kill(pid, 0) instead
  UniqueFd fd;

 private:
  void refresh() {
    const std::uint32_t e = epoch_->load(std::memory_order_acquire);
    const pid_t p = pid_->load(std::memory_order_acquire);
    if (e == epoch && p == pid && (fd || gone || noPidfd || p == 0 || p == ::getpid())) return;
    epoch = e;
    pid = p;
    fd.reset();
    gone = false;
    noPidfd = false;
    if (p == 0 || p == ::getpid()) return;
    fd.reset(pidfdOpen(p));
    if (!fd) {
      if (errno == ENOSYS || errno == EPERM) noPidfd = true;
      else if (errno == ESRCH) gone = true;
      else throwErrno("cannot open a pidfd of the ring's peer, pid " + std::to_string(p));
    }
  }

  std::atomic<std::int32_t>* pid_;
  std::atomic<std::uint32_t>* epoch_;
};

namespace {

// Attaches this process in `slot`; Error when a live process holds it.
void attachPid(RingCore& c, std::atomic<std::int32_t>& slot, const char* role) {
  const pid_t me = ::getpid();
  for (;;) {
    std::int32_t cur = slot.load(std::memory_order_acquire);
    if (cur == me) throw Error(c.what() + ": this process is its " + role + " already");
    if (cur != 0 && !processDead(cur))
      throw Error(c.what() + " has a " + role + " already (pid " + std::to_string(cur) + ")");
    if (slot.compare_exchange_strong(cur, me, std::memory_order_acq_rel)) return;
  }
}

}  // namespace

struct RingWriterState {
  std::shared_ptr<RingCore> core;
  PeerWatch reader;
  std::vector<std::uint32_t> spare;  // free slots the writer holds
  bool reserved = false;
  std::chrono::nanoseconds spin{0};
  pid_t pid = 0;
  bool bigRing;  // larger than half the last-level cache (see yieldToReader)

  explicit RingWriterState(std::shared_ptr<RingCore> c)
      : core(std::move(c)), reader(core->h->readerPid, core->h->readerEpoch),
        bigRing(std::uint64_t{core->n} * core->fmt.slotBytes > lastLevelCacheBytes() / 2) {
    spare.reserve(core->n);
  }
  ~RingWriterState() {
    if (pid == 0 || pid != ::getpid()) return;  // not attached, or a forked copy
    std::int32_t me = pid;
    core->h->writerPid.compare_exchange_strong(me, 0, std::memory_order_acq_rel);
    ringBell(core->readerBell.get());
  }

  void attach() {
    RingHeader& h = *core->h;
    attachPid(*core, h.writerPid, "writer");
    pid = ::getpid();
    recover();
    h.writerEpoch.fetch_add(1, std::memory_order_acq_rel);
    ringBell(core->readerBell.get());  // a waiting reader looks at the new writer
  }

  // See the comment at the top: the slots in none of D, the reader, R.
  void recover() {
    RingCore& c = *core;
    RingHeader& h = *c.h;
    std::vector<char> taken(c.n, 0);
    const std::uint64_t t0 = tailPos(h.tail.load(std::memory_order_seq_cst));
    const std::uint64_t head = h.head.load(std::memory_order_acquire);
    for (std::uint64_t p = t0; p < head; ++p) taken[entrySlot(c.deliver[p % c.n].load(std::memory_order_relaxed)) % c.n] = 1;
    const std::uint64_t rec = h.readerRecord.load(std::memory_order_seq_cst);
    const std::uint32_t rs = recordSlot(rec) % c.n;
    switch (recordState(rec)) {
      case RecordState::None:
        break;
      case RecordState::Held:
      case RecordState::Releasing:
        taken[rs] = 1;
        break;
      case RecordState::Pending: {
        const std::uint64_t t = h.tail.load(std::memory_order_seq_cst);
        if (tailPos(t) == recordPos(rec) + 1 && !tailByWriter(t)) taken[rs] = 1;
        // tail <= pos: the slot is still in D (counted above); later: not the reader's.
        break;
      }
    }
    const std::uint64_t rHead = h.rHead.load(std::memory_order_acquire);
    for (std::uint64_t q = h.rTail.load(std::memory_order_relaxed); q < rHead; ++q)
      taken[c.ret[q % c.n].load(std::memory_order_relaxed) % c.n] = 1;
    spare.clear();
    for (std::uint32_t i = 0; i < c.n; ++i)
      if (!taken[i]) spare.push_back(i);
  }

  // The writer's drop: takes the oldest slot of D that the reader has not
  // taken. Confirms the reader's pending claim first (see the top).
  std::optional<std::uint32_t> dropOldest() {
    RingCore& c = *core;
    RingHeader& h = *c.h;
    for (int attempt = 0; attempt < 64; ++attempt) {
      std::uint64_t t = h.tail.load(std::memory_order_acquire);
      const std::uint64_t p = tailPos(t);
      if (p >= h.head.load(std::memory_order_relaxed)) return std::nullopt;
      if (!tailByWriter(t) && p > 0) {
        std::uint64_t rec = h.readerRecord.load(std::memory_order_acquire);
        if (recordState(rec) == RecordState::Pending && recordPos(rec) == p - 1)
          h.readerRecord.compare_exchange_strong(rec, record(RecordState::Held, recordSlot(rec), 0),
                                                 std::memory_order_acq_rel);
      }
      const std::uint64_t e = c.deliver[p % c.n].load(std::memory_order_relaxed);
      if (h.tail.compare_exchange_strong(t, (p + 1) << 1 | 1, std::memory_order_acq_rel)) {
        h.drops.fetch_add(1, std::memory_order_relaxed);
        countRingDrops(1);
        return entrySlot(e);
      }
    }
    return std::nullopt;
  }

  // Which free slot: the one whose bytes are where the next fill and read
  // are cheapest. A reader on this CPU shares our caches: the slot it
  // released last is the warmest, so R is emptied into the spare list and
  // the newest taken, and a ring whose reader keeps up works in one slot's
  // worth of cache instead of N. A reader on another CPU still holds the
  // slot it released last in its own cache, and our writes would have to
  // take every line from there: the oldest slot (first the spare list, then
  // R in order) has left that cache for the shared one.
  std::optional<std::uint32_t> takeFree() {
    RingCore& c = *core;
    RingHeader& h = *c.h;
    const std::uint64_t rt = h.rTail.load(std::memory_order_relaxed);
    const std::uint64_t rh = h.rHead.load(std::memory_order_acquire);
    if (rt < rh && readerSharesCpu()) {
      for (std::uint64_t q = rt; q < rh; ++q) spare.push_back(c.ret[q % c.n].load(std::memory_order_relaxed));
      h.rTail.store(rh, std::memory_order_release);
    }
    if (!spare.empty()) {
      const std::uint32_t s = spare.back();
      spare.pop_back();
      return s;
    }
    if (rt < rh) {
      const std::uint32_t s = c.ret[rt % c.n].load(std::memory_order_relaxed);
      h.rTail.store(rt + 1, std::memory_order_release);
      return s;
    }
    if (c.fmt.policy == RingPolicy::Block) return std::nullopt;
    return dropOldest();
  }

  bool readerSharesCpu() const noexcept {
    const std::int32_t r = core->h->readerCpu.load(std::memory_order_relaxed);
    return r != 0 && r == cpuTag();
  }

  // After ringing the reader: when it sleeps on this CPU and the ring does
  // not fit in half the cache, give it the CPU now. Run on, the writer
  // would fill the next slots and push the one just committed out of the
  // cache before the reader reads it; yielded, the reader reads it warm
  // and gives it back warm. A small ring stays in cache either way, and
  // then one wake-up for many slots is worth more.
  void yieldToReader() const noexcept {
    if (bigRing && readerSharesCpu()) ::sched_yield();
  }

  void checkOne() const {
    if (reserved)
      throw Error(core->what() + ": the writer holds a reserved slot already; commit or abandon it first");
  }
};

struct RingReaderState {
  std::shared_ptr<RingCore> core;
  PeerWatch writer;
  bool holding = false;
  std::chrono::nanoseconds spin{0};
  pid_t pid = 0;

  explicit RingReaderState(std::shared_ptr<RingCore> c)
      : core(std::move(c)), writer(core->h->writerPid, core->h->writerEpoch) {}
  ~RingReaderState() {
    if (pid == 0 || pid != ::getpid()) return;
    std::int32_t me = pid;
    core->h->readerPid.compare_exchange_strong(me, 0, std::memory_order_acq_rel);
    ringBell(core->writerBell.get());
  }

  void attach() {
    RingHeader& h = *core->h;
    attachPid(*core, h.readerPid, "reader");
    pid = ::getpid();
    recover();
    bellDisarm(h.readerArmed);
    clearBell(core->readerBell.get());
    h.readerEpoch.fetch_add(1, std::memory_order_acq_rel);
    ringBell(core->writerBell.get());
  }

  // The dead reader's slot goes back to R (see the top).
  void recover() {
    RingHeader& h = *core->h;
    std::uint64_t rec = h.readerRecord.load(std::memory_order_acquire);
    switch (recordState(rec)) {
      case RecordState::None:
        return;
      case RecordState::Held:
        release(recordSlot(rec), false);
        return;
      case RecordState::Releasing:
        if (h.rHead.load(std::memory_order_relaxed) > recordPos(rec))
          h.readerRecord.store(0, std::memory_order_release);
        else
          release(recordSlot(rec), false);
        return;
      case RecordState::Pending: {
        const std::uint64_t t = h.tail.load(std::memory_order_seq_cst);
        const bool won = tailPos(t) == recordPos(rec) + 1 && !tailByWriter(t);
        const std::uint64_t to = won ? record(RecordState::Held, recordSlot(rec), 0) : 0;
        // Fails only when the writer confirmed the claim meanwhile.
        if (h.readerRecord.compare_exchange_strong(rec, to, std::memory_order_acq_rel) && !won) return;
        release(recordSlot(rec), false);
        return;
      }
    }
  }

  // Takes the oldest slot of D; nullopt when empty.
  std::optional<std::pair<std::uint32_t, std::uint64_t>> claim() {
    RingCore& c = *core;
    RingHeader& h = *c.h;
    for (;;) {
      std::uint64_t t = h.tail.load(std::memory_order_acquire);
      const std::uint64_t p = tailPos(t);
      if (p >= h.head.load(std::memory_order_acquire)) return std::nullopt;
      const std::uint64_t e = c.deliver[p % c.n].load(std::memory_order_relaxed);
      std::uint64_t pending = record(RecordState::Pending, entrySlot(e), p);
      h.readerRecord.store(pending, std::memory_order_seq_cst);
      if (h.tail.compare_exchange_strong(t, (p + 1) << 1, std::memory_order_acq_rel)) {
        // Fails when the writer confirmed it for us: the same outcome.
        h.readerRecord.compare_exchange_strong(pending, record(RecordState::Held, entrySlot(e), 0),
                                               std::memory_order_acq_rel);
        return std::make_pair(entrySlot(e) % c.n, entrySeq(e));
      }
      h.readerRecord.store(0, std::memory_order_release);
    }
  }

  // Gives slot s back through R and rings a writer waiting for room.
  // `consumed`: false for a slot recovered from a dead reader.
  void release(std::uint32_t s, bool consumed = true) noexcept {
    RingCore& c = *core;
    RingHeader& h = *c.h;
    const std::uint64_t rpos = h.rHead.load(std::memory_order_relaxed);
    h.readerRecord.store(record(RecordState::Releasing, s, rpos), std::memory_order_release);
    c.ret[rpos % c.n].store(s, std::memory_order_relaxed);
    bellPublish(h.rHead, rpos + 1);
    h.readerRecord.store(0, std::memory_order_release);
    if (consumed) h.consumed.store(h.consumed.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    if (const std::int32_t cpu = cpuTag(); h.readerCpu.load(std::memory_order_relaxed) != cpu)
      h.readerCpu.store(cpu, std::memory_order_relaxed);
    if (bellMustRing(h.writerArmed, rpos + 1 - h.rTail.load(std::memory_order_relaxed))) ringBell(c.writerBell.get());
  }

  // One slot that passed the sequence check (KeepLatest: the newest).
  std::optional<ReadSlot> take(const std::shared_ptr<RingReaderState>& self);
};

RingDims ringViewDims(const RingFormat& f, DType dtype, std::size_t rank, Layout layout) {
  if (!f.dtype || *f.dtype != dtype || f.shape.size() != rank || (rank >= 2 && f.layout != layout)) {
    std::string want = std::string(dtypeName(dtype)) + " of rank " + std::to_string(rank);
    if (rank >= 2) want += std::string(" ") + layoutName(layout);
    throw TypeError("the ring's slots hold " + f.describe() + ", not " + want);
  }
  RingDims d{};
  for (std::size_t i = 0; i < rank; ++i) d[i] = static_cast<Eigen::Index>(f.shape[i]);
  return d;
}

std::optional<ReadSlot> RingReaderState::take(const std::shared_ptr<RingReaderState>& self) {
  RingCore& c = *core;
  RingHeader& h = *c.h;
  for (;;) {
    auto got = claim();
    if (!got) return std::nullopt;
    if (c.fmt.policy == RingPolicy::KeepLatest) {
      // Skip to the newest: each older slot goes back as a drop.
      while (deliverReady(h)) {
        release(got->first);
        h.drops.fetch_add(1, std::memory_order_relaxed);
        countRingDrops(1);
        got = claim();
        if (!got) break;
      }
      if (!got) continue;
    }
    const RingSlotMeta& m = c.meta[got->first];
    if (m.seq.load(std::memory_order_acquire) != 2 * got->second) {
      h.torn.fetch_add(1, std::memory_order_relaxed);
      release(got->first);
      continue;
    }
    ReadSlot s;
    s.r_ = self;
    s.index_ = got->first;
    s.data_ = c.slot(got->first);
    s.info_.sequence = got->second;
    s.info_.bytes = std::min<std::uint64_t>(m.bytes, c.fmt.slotBytes);
    s.info_.timestampNs = m.timestampNs;
    std::copy(std::begin(m.user), std::end(m.user), s.info_.user.begin());
    holding = true;
    return s;
  }
}

namespace {

struct Geometry {
  std::uint64_t metaOffset, deliverOffset, returnOffset, dataOffset, stride, total;
};

Geometry geometry(std::size_t slots, std::uint64_t slotBytes) {
  Geometry g{};
  const std::uint64_t slotAlign = slotBytes >= 4096 ? 4096 : kAlign;
  g.metaOffset = alignUp(sizeof(RingHeader), kAlign);
  g.deliverOffset = g.metaOffset + slots * sizeof(RingSlotMeta);
  g.returnOffset = alignUp(g.deliverOffset + slots * 8, kAlign);
  g.dataOffset = alignUp(g.returnOffset + slots * 4, slotAlign);
  g.stride = alignUp(slotBytes, slotAlign);
  g.total = g.dataOffset + slots * g.stride;
  return g;
}

std::shared_ptr<RingCore> createCore(const ShmName& name, std::size_t slots, std::uint64_t slotBytes,
                                     RingPolicy policy, std::uint8_t dtype, const std::vector<std::int64_t>& shape,
                                     Layout layout) {
  if (slots < 2 || slots > kRingMaxSlots)
    throw LimitError("a ring has 2 to " + std::to_string(kRingMaxSlots) + " slots, not " + std::to_string(slots));
  if (slotBytes == 0 || slotBytes > kMaxSlotBytes)
    throw LimitError("a ring's slot holds 1 byte to 1 TiB, not " + std::to_string(slotBytes) + " bytes");
  if (static_cast<std::uint8_t>(policy) > 2) throw LimitError("unknown ring policy");
  const Geometry g = geometry(slots, slotBytes);
  if (g.total / slots < g.stride) throw LimitError("a ring of " + std::to_string(slots) + " slots is too large");

  auto c = std::make_shared<RingCore>();
  c->readerBell = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!c->readerBell) throwErrno("cannot create the ring's doorbell (eventfd)");
  c->writerBell = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!c->writerBell) throwErrno("cannot create the ring's doorbell (eventfd)");
  c->shm = SharedMemory(create_only, name, ShmKind::Ring, static_cast<std::size_t>(g.total));

  auto* h = new (c->shm.data()) RingHeader{};
  h->version = kRingVersion;
  h->slotCount = static_cast<std::uint32_t>(slots);
  h->slotBytes = slotBytes;
  h->slotStride = g.stride;
  h->metaOffset = g.metaOffset;
  h->deliverOffset = g.deliverOffset;
  h->returnOffset = g.returnOffset;
  h->dataOffset = g.dataOffset;
  h->policy = static_cast<std::uint8_t>(policy);
  h->dtype = dtype;
  h->rank = static_cast<std::uint8_t>(shape.size());
  h->layout = static_cast<std::uint8_t>(layout);
  for (std::size_t i = 0; i < shape.size(); ++i) h->shape[i] = shape[i];
  auto* base = static_cast<std::byte*>(c->shm.data());
  for (std::size_t i = 0; i < slots; ++i) new (base + g.metaOffset + i * sizeof(RingSlotMeta)) RingSlotMeta{};
  for (std::size_t i = 0; i < slots; ++i) new (base + g.deliverOffset + i * 8) std::atomic<std::uint64_t>(0);
  // Every slot starts in R, as if the reader had returned it.
  for (std::size_t i = 0; i < slots; ++i)
    new (base + g.returnOffset + i * 4) std::atomic<std::uint32_t>(static_cast<std::uint32_t>(i));
  h->rHead.store(slots, std::memory_order_relaxed);
  h->magic.store(kRingMagic, std::memory_order_release);
  c->bind();
  return c;
}

// Checks a ring header found in a segment; ShmFormatError naming what is wrong.
void validate(const SharedMemory& shm) {
  const std::string what = "shared memory segment '" + shm.name() + "'";
  if (shm.kind() != ShmKind::Ring)
    throw ShmFormatError(what + " holds " + shmKindName(shm.kind()) + ", not a ring");
  if (shm.bytes() < sizeof(RingHeader)) throw ShmFormatError(what + " is too small to hold a ring");
  const auto* h = static_cast<const RingHeader*>(shm.data());
  if (h->magic.load(std::memory_order_acquire) != kRingMagic) throw ShmFormatError(what + " does not hold a ring");
  if (h->version != kRingVersion)
    throw ShmFormatError(what + " holds a ring of format " + std::to_string(h->version) + ", this build reads " +
                         std::to_string(kRingVersion));
  const std::size_t n = h->slotCount;
  if (n < 2 || n > kRingMaxSlots || h->slotBytes == 0 || h->slotBytes > kMaxSlotBytes || h->policy > 2)
    throw ShmFormatError(what + " has a corrupt ring header (slots, slot size or policy)");
  const Geometry g = geometry(n, h->slotBytes);
  if (h->metaOffset != g.metaOffset || h->deliverOffset != g.deliverOffset || h->returnOffset != g.returnOffset ||
      h->dataOffset != g.dataOffset || h->slotStride != g.stride || g.total > shm.bytes())
    throw ShmFormatError(what + " has a corrupt ring header (its layout does not add up)");
  if (h->dtype != 0) {
    if (!dtypeValid(h->dtype) || h->rank == 0 || h->rank > kRingMaxRank || h->layout > 1)
      throw ShmFormatError(what + " has a corrupt ring header (element type or rank)");
    std::uint64_t count = 1;
    for (std::size_t i = 0; i < h->rank; ++i) {
      if (h->shape[i] <= 0) throw ShmFormatError(what + " has a corrupt ring header (shape)");
      count *= static_cast<std::uint64_t>(h->shape[i]);
      if (count > kMaxSlotBytes) throw ShmFormatError(what + " has a corrupt ring header (shape)");
    }
    if (count * dtypeSize(static_cast<DType>(h->dtype)) != h->slotBytes)
      throw ShmFormatError(what + " has a corrupt ring header (shape and slot size differ)");
  }
}

const Value* field(const Value& v, std::string_view key) {
  const Map* m = v.getIf<Map>();
  if (!m) throw TypeError("a ring descriptor is a map, " + v.typeName() + " found");
  for (const auto& [k, val] : *m)
    if (k == key) return &val;
  throw TypeError("a ring descriptor has no '" + std::string(key) + "'");
}

template <class T>
T fieldAs(const Value& v, std::string_view key) {
  const Value* f = field(v, key);
  try {
    return f->as<T>();
  } catch (const TypeError& e) {
    throw TypeError("ring descriptor '" + std::string(key) + "': " + e.what());
  }
}

}  // namespace
}  // namespace detail

// ---------------------------------------------------------------- small things

const char* ringPolicyName(RingPolicy p) noexcept {
  switch (p) {
    case RingPolicy::Block:
      return "block";
    case RingPolicy::DropOldest:
      return "drop-oldest";
    case RingPolicy::KeepLatest:
      return "keep-latest";
  }
  return "unknown";
}

std::string RingFormat::describe() const {
  std::string s = std::to_string(slots) + " slots of ";
  if (dtype)
    s += std::string(dtypeName(*dtype)) + "[" + detail::shapeText(shape) + "]" +
         (shape.size() >= 2 ? std::string(" ") + layoutName(layout) : std::string());
  else
    s += std::to_string(slotBytes) + " bytes";
  return s + ", " + ringPolicyName(policy);
}

// ---------------------------------------------------------------- WriteSlot

WriteSlot::WriteSlot(WriteSlot&& o) noexcept
    : w_(std::move(o.w_)), data_(std::exchange(o.data_, nullptr)), index_(o.index_), info_(o.info_) {}

WriteSlot& WriteSlot::operator=(WriteSlot&& o) noexcept {
  if (this != &o) {
    abandon();
    w_ = std::move(o.w_);
    data_ = std::exchange(o.data_, nullptr);
    index_ = o.index_;
    info_ = o.info_;
  }
  return *this;
}

WriteSlot::~WriteSlot() { abandon(); }

std::size_t WriteSlot::capacity() const noexcept { return w_ ? w_->core->fmt.slotBytes : 0; }

const RingFormat& WriteSlot::format() const {
  if (!w_) throw Error("an empty WriteSlot has no format");
  return w_->core->fmt;
}

void WriteSlot::setBytes(std::size_t n) {
  if (n > capacity())
    throw LimitError("a ring slot holds " + std::to_string(capacity()) + " bytes, " + std::to_string(n) +
                     " do not fit");
  info_.bytes = n;
}

void WriteSlot::setUser(std::size_t i, std::int64_t v) {
  if (i >= kRingUserInts)
    throw LimitError("a ring slot has " + std::to_string(kRingUserInts) + " user integers, index " +
                     std::to_string(i) + " is out of range");
  info_.user[i] = v;
}

void WriteSlot::commit() {
  if (!valid()) throw Error("commit() of an empty WriteSlot");
  detail::RingCore& c = *w_->core;
  detail::RingHeader& h = *c.h;
  detail::RingSlotMeta& m = c.meta[index_];
  m.bytes = info_.bytes;
  m.timestampNs = info_.timestampNs != 0 ? info_.timestampNs : detail::monotonicNs();
  std::copy(info_.user.begin(), info_.user.end(), std::begin(m.user));
  m.seq.store(2 * info_.sequence, std::memory_order_release);
  const std::uint64_t head = h.head.load(std::memory_order_relaxed);
  c.deliver[head % c.n].store(detail::deliverEntry(info_.sequence, index_), std::memory_order_relaxed);
  detail::bellPublish(h.head, head + 1);
  if (detail::bellMustRing(h.readerArmed, 1)) {
    detail::ringBell(c.readerBell.get());
    w_->yieldToReader();
  }
  w_->reserved = false;
  data_ = nullptr;
  w_.reset();
}

void WriteSlot::abandon() noexcept {
  if (!valid()) return;
  w_->spare.push_back(index_);
  w_->reserved = false;
  data_ = nullptr;
  w_.reset();
}

// ---------------------------------------------------------------- ReadSlot

ReadSlot::ReadSlot(ReadSlot&& o) noexcept
    : r_(std::move(o.r_)), data_(std::exchange(o.data_, nullptr)), index_(o.index_), info_(o.info_) {}

ReadSlot& ReadSlot::operator=(ReadSlot&& o) noexcept {
  if (this != &o) {
    release();
    r_ = std::move(o.r_);
    data_ = std::exchange(o.data_, nullptr);
    index_ = o.index_;
    info_ = o.info_;
  }
  return *this;
}

ReadSlot::~ReadSlot() { release(); }

const RingFormat& ReadSlot::format() const {
  if (!r_) throw Error("an empty ReadSlot has no format");
  return r_->core->fmt;
}

std::int64_t ReadSlot::user(std::size_t i) const {
  if (i >= kRingUserInts)
    throw LimitError("a ring slot has " + std::to_string(kRingUserInts) + " user integers, index " +
                     std::to_string(i) + " is out of range");
  return info_.user[i];
}

bool ReadSlot::intact() const noexcept {
  if (!valid()) return false;
  FORKLIFT_FENCE_BEGIN
  std::atomic_thread_fence(std::memory_order_acquire);
  FORKLIFT_FENCE_END
  detail::RingCore& c = *r_->core;
  if (c.meta[index_].seq.load(std::memory_order_relaxed) == 2 * info_.sequence) return true;
  c.h->torn.fetch_add(1, std::memory_order_relaxed);
  return false;
}

void ReadSlot::release() noexcept {
  if (!valid()) return;
  r_->release(index_);
  r_->holding = false;
  data_ = nullptr;
  r_.reset();
}

// ---------------------------------------------------------------- RingWriter

RingWriter::RingWriter() noexcept = default;
RingWriter::RingWriter(RingWriter&&) noexcept = default;
RingWriter& RingWriter::operator=(RingWriter&&) noexcept = default;
RingWriter::~RingWriter() = default;
RingWriter::RingWriter(std::shared_ptr<detail::RingWriterState> s) : s_(std::move(s)) {}

std::optional<WriteSlot> RingWriter::tryReserve() {
  if (!s_) throw Error("tryReserve() on an empty RingWriter");
  s_->checkOne();
  std::optional<std::uint32_t> idx;
  // A drop can lose a race with the reader; the next try finds a slot.
  for (int i = 0; i < 16 && !idx; ++i) idx = s_->takeFree();
  if (!idx) return std::nullopt;
  detail::RingCore& c = *s_->core;
  WriteSlot w;
  w.w_ = s_;
  w.index_ = *idx;
  w.data_ = c.slot(*idx);
  w.info_.sequence = c.h->head.load(std::memory_order_relaxed) + 1;
  w.info_.bytes = c.fmt.slotBytes;
  // Odd while filled: the seqlock's "being written".
  c.meta[*idx].seq.store(2 * w.info_.sequence + 1, std::memory_order_seq_cst);
  s_->reserved = true;
  return w;
}

WriteSlot RingWriter::reserve(Timeout timeout) {
  if (!s_) throw Error("reserve() on an empty RingWriter");
  detail::RingCore& c = *s_->core;
  detail::RingHeader& h = *c.h;
  const Deadline d(timeout);
  for (;;) {
    if (auto w = tryReserve()) return std::move(*w);
    if (c.fmt.policy != RingPolicy::Block) {
      // A drop raced with the reader: the next try finds a slot. Bounded
      // all the same, against a corrupt ring.
      if (d.expired())
        throw TimeoutError(c.what() + ": no slot to reuse in " + std::to_string(timeout.count()) + " ms");
      std::this_thread::yield();
      continue;
    }
    if (detail::spinFor(s_->spin, [&] { return detail::returnReady(h); })) continue;
    // Full: every slot is in D or with the reader, so at least n-1 will
    // come back. Woken when half of them did, a wake-up buys several slots.
    detail::bellArm(h.writerArmed, std::max<std::uint32_t>(1, c.n / 2));
    if (detail::returnReady(h)) {
      detail::bellDisarm(h.writerArmed);
      continue;
    }
    switch (s_->reader.state()) {
      case detail::PeerWatch::State::Died:
        detail::bellDisarm(h.writerArmed);
        throw ProcessDied(c.what() + " is full and its reader (pid " + std::to_string(s_->reader.pid) + ") died");
      case detail::PeerWatch::State::Closed:
        detail::bellDisarm(h.writerArmed);
        throw PeerClosed(c.what() + " is full and its reader detached");
      default:
        break;
    }
    if (!detail::sleepOn(c.writerBell.get(), s_->reader.pollFd(), d, s_->reader.pollCap())) {
      detail::bellDisarm(h.writerArmed);
      if (auto w = tryReserve()) return std::move(*w);
      throw TimeoutError(c.what() + " stayed full for " + std::to_string(timeout.count()) +
                         " ms (policy block): the reader does not release slots");
    }
  }
}

void RingWriter::push(std::span<const std::byte> data, Timeout timeout, std::span<const std::int64_t> user) {
  if (!s_) throw Error("push() on an empty RingWriter");
  if (data.size() > s_->core->fmt.slotBytes)
    throw LimitError(s_->core->what() + ": " + std::to_string(data.size()) + " bytes do not fit a slot of " +
                     std::to_string(s_->core->fmt.slotBytes));
  if (user.size() > kRingUserInts)
    throw LimitError("a ring slot has " + std::to_string(kRingUserInts) + " user integers, " +
                     std::to_string(user.size()) + " given");
  WriteSlot w = reserve(timeout);
  if (!data.empty()) std::memcpy(w.data(), data.data(), data.size());
  w.setBytes(data.size());
  for (std::size_t i = 0; i < user.size(); ++i) w.setUser(i, user[i]);
  w.commit();
}

int RingWriter::fd() const noexcept { return s_ ? s_->core->writerBell.get() : -1; }

bool RingWriter::arm() {
  detail::RingHeader& h = *s_->core->h;
  detail::bellArm(h.writerArmed);
  if (!s_->spare.empty() || detail::returnReady(h)) {
    detail::bellDisarm(h.writerArmed);
    return false;
  }
  return true;
}

void RingWriter::drainDoorbell() noexcept {
  if (s_) detail::clearBell(s_->core->writerBell.get());
}

int RingWriter::readerFd() { return s_ ? s_->reader.pollFd() : -1; }
void RingWriter::setSpin(std::chrono::nanoseconds d) noexcept {
  if (s_) s_->spin = d;
}
const RingFormat& RingWriter::format() const {
  if (!s_) throw Error("an empty RingWriter has no format");
  return s_->core->fmt;
}

namespace {
RingStats statsOf(const detail::RingHeader& h) {
  RingStats s;
  s.committed = h.head.load(std::memory_order_relaxed);
  s.consumed = h.consumed.load(std::memory_order_relaxed);
  s.drops = h.drops.load(std::memory_order_relaxed);
  s.torn = h.torn.load(std::memory_order_relaxed);
  return s;
}
}  // namespace

RingStats RingWriter::stats() const { return s_ ? statsOf(*s_->core->h) : RingStats{}; }

// ---------------------------------------------------------------- RingReader

RingReader::RingReader() noexcept = default;
RingReader::RingReader(RingReader&&) noexcept = default;
RingReader& RingReader::operator=(RingReader&&) noexcept = default;
RingReader::~RingReader() = default;
RingReader::RingReader(std::shared_ptr<detail::RingReaderState> s) : s_(std::move(s)) {}

std::optional<ReadSlot> RingReader::tryNext() {
  if (!s_) throw Error("tryNext() on an empty RingReader");
  if (s_->holding)
    throw Error(s_->core->what() + ": the reader holds a slot already; release it before taking the next");
  return s_->take(s_);
}

std::optional<ReadSlot> RingReader::next(Timeout timeout) {
  if (!s_) throw Error("next() on an empty RingReader");
  detail::RingCore& c = *s_->core;
  detail::RingHeader& h = *c.h;
  const Deadline d(timeout);
  for (;;) {
    if (auto s = tryNext()) return s;
    if (detail::spinFor(s_->spin, [&] { return detail::deliverReady(h); })) continue;
    detail::bellArm(h.readerArmed);
    if (detail::deliverReady(h)) {
      detail::bellDisarm(h.readerArmed);
      continue;
    }
    const auto state = s_->writer.state();
    if (state == detail::PeerWatch::State::Died || state == detail::PeerWatch::State::Closed) {
      detail::bellDisarm(h.readerArmed);
      if (detail::deliverReady(h)) continue;  // what it committed before it went comes first
      if (state == detail::PeerWatch::State::Closed) throw PeerClosed(c.what() + ": the writer detached");
      throw ProcessDied(c.what() + ": the writer (pid " + std::to_string(s_->writer.pid) + ") died");
    }
    if (!detail::sleepOn(c.readerBell.get(), s_->writer.pollFd(), d, s_->writer.pollCap())) {
      detail::bellDisarm(h.readerArmed);
      return tryNext();
    }
  }
}

std::optional<RingSlotInfo> RingReader::pull(Bytes& out, Timeout timeout) {
  auto s = next(timeout);
  if (!s) return std::nullopt;
  out.assign(reinterpret_cast<const std::uint8_t*>(s->data()),
             reinterpret_cast<const std::uint8_t*>(s->data()) + s->bytes());
  const RingSlotInfo info = s->info();
  const bool ok = s->intact();
  s->release();
  if (!ok) throw Error(s_->core->what() + ": slot " + std::to_string(info.sequence) + " was overwritten while copied");
  return info;
}

int RingReader::fd() const noexcept { return s_ ? s_->core->readerBell.get() : -1; }

bool RingReader::arm() {
  detail::RingHeader& h = *s_->core->h;
  detail::bellArm(h.readerArmed);
  if (detail::deliverReady(h)) {
    detail::bellDisarm(h.readerArmed);
    return false;
  }
  return true;
}

void RingReader::drainDoorbell() noexcept {
  if (s_) detail::clearBell(s_->core->readerBell.get());
}

int RingReader::writerFd() { return s_ ? s_->writer.pollFd() : -1; }

bool RingReader::writerGone() {
  if (!s_) return true;
  const auto st = s_->writer.state();
  return st == detail::PeerWatch::State::Died || st == detail::PeerWatch::State::Closed;
}

void RingReader::setSpin(std::chrono::nanoseconds d) noexcept {
  if (s_) s_->spin = d;
}
const RingFormat& RingReader::format() const {
  if (!s_) throw Error("an empty RingReader has no format");
  return s_->core->fmt;
}
RingStats RingReader::stats() const { return s_ ? statsOf(*s_->core->h) : RingStats{}; }

// ---------------------------------------------------------------- RingBuffer

RingBuffer::RingBuffer() noexcept = default;
RingBuffer::RingBuffer(RingBuffer&&) noexcept = default;
RingBuffer& RingBuffer::operator=(RingBuffer&&) noexcept = default;
RingBuffer::~RingBuffer() = default;
RingBuffer::RingBuffer(std::shared_ptr<detail::RingCore> core) : core_(std::move(core)) {}

RingBuffer RingBuffer::create(const ShmName& name, std::size_t slots, std::size_t slotBytes, RingPolicy policy) {
  return RingBuffer(detail::createCore(name, slots, slotBytes, policy, 0, {}, Layout::RowMajor));
}

RingBuffer RingBuffer::createArray(const ShmName& name, std::size_t slots, DType dtype,
                                   const std::vector<std::int64_t>& shape, RingPolicy policy, Layout layout) {
  if (shape.empty() || shape.size() > detail::kRingMaxRank)
    throw LimitError("a ring's array slot has rank 1 to 8, not " + std::to_string(shape.size()));
  std::uint64_t count = 1;
  for (const std::int64_t e : shape) {
    if (e <= 0) throw LimitError("a ring's array slot has positive dimensions, not " + detail::shapeText(shape));
    if (count > detail::kMaxSlotBytes / static_cast<std::uint64_t>(e))
      throw LimitError("a ring's array slot of " + detail::shapeText(shape) + " is too large");
    count *= static_cast<std::uint64_t>(e);
  }
  return RingBuffer(detail::createCore(name, slots, count * dtypeSize(dtype), policy,
                                       static_cast<std::uint8_t>(dtype), shape, layout));
}

Value RingBuffer::describe() const {
  if (!core_) throw Error("describe() of an empty RingBuffer");
  return Value(Map{{"kind", "ring"},
                   {"segment", core_->shm.descriptor()},
                   {"readerBell", Fd::dup(core_->readerBell.get())},
                   {"writerBell", Fd::dup(core_->writerBell.get())},
                   {"slots", core_->fmt.slots},
                   {"slotBytes", core_->fmt.slotBytes},
                   {"policy", ringPolicyName(core_->fmt.policy)}});
}

RingBuffer RingBuffer::open(const Value& descriptor) {
  using detail::fieldAs;
  if (fieldAs<std::string>(descriptor, "kind") != "ring")
    throw TypeError("not a ring descriptor: kind is '" + fieldAs<std::string>(descriptor, "kind") + "'");
  const Value& segment = *detail::field(descriptor, "segment");
  const Fd readerBell = fieldAs<Fd>(descriptor, "readerBell");
  const Fd writerBell = fieldAs<Fd>(descriptor, "writerBell");
  if (!readerBell.valid() || !writerBell.valid()) throw TypeError("ring descriptor: a doorbell descriptor is missing");

  auto c = std::make_shared<detail::RingCore>();
  c->shm = SharedMemory(open_only, segment);
  detail::validate(c->shm);
  c->bind();
  if (c->fmt.slots != fieldAs<std::size_t>(descriptor, "slots") ||
      c->fmt.slotBytes != fieldAs<std::size_t>(descriptor, "slotBytes") ||
      ringPolicyName(c->fmt.policy) != fieldAs<std::string>(descriptor, "policy"))
    throw ShmFormatError(c->what() + " is " + c->fmt.describe() + ", not the ring described");
  c->readerBell = Fd::dup(readerBell.get()).take();
  c->writerBell = Fd::dup(writerBell.get()).take();
  return RingBuffer(std::move(c));
}

RingWriter RingBuffer::writer() {
  if (!core_) throw Error("writer() of an empty RingBuffer");
  auto s = std::make_shared<detail::RingWriterState>(core_);
  s->attach();
  return RingWriter(std::move(s));
}

RingReader RingBuffer::reader() {
  if (!core_) throw Error("reader() of an empty RingBuffer");
  auto s = std::make_shared<detail::RingReaderState>(core_);
  s->attach();
  return RingReader(std::move(s));
}

const RingFormat& RingBuffer::format() const {
  if (!core_) throw Error("an empty RingBuffer has no format");
  return core_->fmt;
}
RingStats RingBuffer::stats() const { return core_ ? statsOf(*core_->h) : RingStats{}; }
const std::string& RingBuffer::name() const {
  static const std::string empty;
  return core_ ? core_->shm.name() : empty;
}

}  // namespace forklift
