// forklift - the ring's writing side: RingWriterState (recovery, drops, the
// choice of a free slot), WriteSlot, RingWriter
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <utility>

#include "forklift/error.hpp"
#include "metrics.hpp"
#include "posix.hpp"
#include "ring_state.hpp"

// Recovery, the part the header only names. A slot is always in exactly one
// of: the writer (its spare list or its reserved slot), D, the reader (its
// record, then its held mark), R. Moves are D -> reader (CAS on tail, the
// record written *before* the CAS as "pending", then the slot's held mark,
// then the record cleared), reader -> R (record "releasing", entry, rHead,
// held mark cleared, record "none"), R -> writer, writer -> D, and D ->
// writer (a drop: CAS on tail with the writer bit). Each move writes the
// destination before it clears the source.
//
// A new writer (the old one dead or gone, so nothing enters D and nothing
// leaves R) owns exactly the slots found in none of D, the reader's record,
// the held marks, R, read in that order, the order slots flow in: a slot
// that moves on while we look is found at its next place. A "pending"
// record is the reader's only if the tail says the reader took that
// position: tail == pos+1 with the writer bit clear. Any later tail means
// the reader lost, or won and marked the slot held before it moved on, or
// the writer confirmed it for the reader: the writer, before a drop, turns
// a pending record of the position just before its CAS into "held" when
// the tail says the reader took it.
//
// A new reader resolves the dead reader's record the same way (see
// lib/ring_reader.cpp), then gives back every slot marked held.

namespace forklift {
namespace detail {

namespace {

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

RingWriterState::RingWriterState(std::shared_ptr<RingCore> c)
    : core(std::move(c)), reader(*core, core->h->readerPid, core->h->readerEpoch),
      own(core->n, 0), bigRing(std::uint64_t{core->n} * core->fmt.slotBytes > lastLevelCacheBytes() / 2) {
  spare.reserve(core->n);
}

RingWriterState::~RingWriterState() {
  if (pid == 0 || pid != ::getpid()) return;  // not attached, or a forked copy
  std::int32_t me = pid;
  core->h->writerPid.compare_exchange_strong(me, 0, std::memory_order_acq_rel);
  ringBell(core->readerBell.get());
}

void RingWriterState::attach() {
  RingHeader& h = *core->h;
  attachRingPid(*core, h.writerPid, "writer");
  pid = ::getpid();
  try {
    recover();
  } catch (...) {
    std::int32_t me = pid;
    h.writerPid.compare_exchange_strong(me, 0, std::memory_order_acq_rel);
    pid = 0;
    throw;
  }
  h.writerEpoch.fetch_add(1, std::memory_order_acq_rel);
  ringBell(core->readerBell.get());  // a waiting reader looks at the new writer
}

// See the comment at the top: the slots in none of D, the reader, R.
void RingWriterState::recover() {
  RingCore& c = *core;
  RingHeader& h = *c.h;
  std::vector<char> taken(c.n, 0);
  const std::uint64_t t0 = tailPos(h.tail.load(std::memory_order_seq_cst));
  const std::uint64_t hd = h.head.load(std::memory_order_acquire);
  if (hd < t0 || hd - t0 > c.n)
    c.corrupt("the delivery queue holds " + std::to_string(hd) + " - " + std::to_string(t0) + " slots, of " +
              std::to_string(c.n));
  for (std::uint64_t p = t0; p < hd; ++p)
    taken[c.checkedSlot(entrySlot(c.deliver[p % c.n].load(std::memory_order_relaxed)), "the delivery queue")] = 1;
  const std::uint64_t rec = h.readerRecord.load(std::memory_order_seq_cst);
  switch (recordState(rec)) {
    case RecordState::None:
      break;
    case RecordState::Held:
    case RecordState::Releasing:
      taken[c.checkedSlot(recordSlot(rec), "the reader's record")] = 1;
      break;
    case RecordState::Pending: {
      const std::uint32_t rs = c.checkedSlot(recordSlot(rec), "the reader's record");
      const std::uint64_t t = h.tail.load(std::memory_order_seq_cst);
      if (tailPos(t) == recordPos(rec) + 1 && !tailByWriter(t)) taken[rs] = 1;
      // tail <= pos: the slot is still in D (counted above); later: not the reader's.
      break;
    }
  }
  for (std::uint32_t i = 0; i < c.n; ++i)
    if (c.meta[i].held.load(std::memory_order_seq_cst) != 0) taken[i] = 1;
  const std::uint64_t rt = h.rTail.load(std::memory_order_relaxed);
  const std::uint64_t rh = h.rHead.load(std::memory_order_acquire);
  if (rh < rt || rh - rt > c.n)
    c.corrupt("the return queue holds " + std::to_string(rh) + " - " + std::to_string(rt) + " slots, of " +
              std::to_string(c.n));
  for (std::uint64_t q = rt; q < rh; ++q)
    taken[c.checkedSlot(c.ret[q % c.n].load(std::memory_order_relaxed), "the return queue")] = 1;
  spare.clear();
  std::fill(own.begin(), own.end(), 0);
  for (std::uint32_t i = 0; i < c.n; ++i)
    if (!taken[i]) {
      spare.push_back(i);
      own[i] = 1;
    }
  head = hd;
  rTail = rt;
}

// The writer's drop: takes the oldest slot of D that the reader has not
// taken. Confirms the reader's pending claim first (see the top).
std::optional<std::uint32_t> RingWriterState::dropOldest() {
  RingCore& c = *core;
  RingHeader& h = *c.h;
  for (int attempt = 0; attempt < 64; ++attempt) {
    std::uint64_t t = h.tail.load(std::memory_order_acquire);
    const std::uint64_t p = tailPos(t);
    if (p > head) c.corrupt("the delivery queue's read position " + std::to_string(p) + " is past its end " +
                            std::to_string(head));
    if (p == head) {
      if (c.h->rHead.load(std::memory_order_acquire) == rTail && spare.empty())
        // Only this writer adds to D, only it takes from R: both were empty
        // at once, so the reader had all n slots, and it may hold n-1.
        c.corrupt("all " + std::to_string(c.n) + " slots are with the reader, which may hold " +
                  std::to_string(c.n - 1) + " at most");
      return std::nullopt;
    }
    if (!tailByWriter(t) && p > 0) {
      std::uint64_t rec = h.readerRecord.load(std::memory_order_acquire);
      if (recordState(rec) == RecordState::Pending && recordPos(rec) == p - 1)
        h.readerRecord.compare_exchange_strong(rec, record(RecordState::Held, recordSlot(rec), 0),
                                               std::memory_order_acq_rel);
    }
    const std::uint64_t e = c.deliver[p % c.n].load(std::memory_order_relaxed);
    if (h.tail.compare_exchange_strong(t, (p + 1) << 1 | 1, std::memory_order_acq_rel)) {
      const std::uint32_t s = c.checkedSlot(entrySlot(e), "the delivery queue");
      if (entrySeq(e) != p + 1 || own[s])
        c.corrupt("the delivery queue's entry " + std::to_string(p) + " names slot " + std::to_string(s) +
                  " with sequence " + std::to_string(entrySeq(e)) + ", not what the writer put there");
      h.drops.fetch_add(1, std::memory_order_relaxed);
      countRingDrops(1);
      own[s] = 1;
      return s;
    }
  }
  return std::nullopt;
}

std::uint64_t RingWriterState::loadRHead() const {
  const std::uint64_t rh = core->h->rHead.load(std::memory_order_acquire);
  if (rh < rTail || rh - rTail > core->n)
    core->corrupt("the return queue's end " + std::to_string(rh) + " is not within " + std::to_string(core->n) +
                  " slots of its read position " + std::to_string(rTail));
  return rh;
}

bool RingWriterState::returnReady() const { return loadRHead() > rTail; }

std::uint32_t RingWriterState::fromReturn(std::uint64_t q) {
  RingCore& c = *core;
  const std::uint32_t s = c.checkedSlot(c.ret[q % c.n].load(std::memory_order_relaxed), "the return queue");
  if (own[s])
    c.corrupt("the return queue gives back slot " + std::to_string(s) + ", which the writer holds already");
  own[s] = 1;
  return s;
}

// Which free slot: the one whose bytes are where the next fill and read
// are cheapest. A reader on this CPU shares our caches: the slot it
// released last is the warmest, so R is emptied into the spare list and
// the newest taken, and a ring whose reader keeps up works in one slot's
// worth of cache instead of N. A reader on another CPU still holds the
// slot it released last in its own cache, and our writes would have to
// take every line from there: the oldest slot (first the spare list, then
// R in order) has left that cache for the shared one.
std::optional<std::uint32_t> RingWriterState::takeFree() {
  RingCore& c = *core;
  RingHeader& h = *c.h;
  const std::uint64_t rh = loadRHead();
  if (rTail < rh && readerSharesCpu()) {
    for (std::uint64_t q = rTail; q < rh; ++q) spare.push_back(fromReturn(q));
    rTail = rh;
    h.rTail.store(rh, std::memory_order_release);
  }
  if (!spare.empty()) {
    const std::uint32_t s = spare.back();
    spare.pop_back();
    return s;
  }
  if (rTail < rh) {
    const std::uint32_t s = fromReturn(rTail);
    h.rTail.store(++rTail, std::memory_order_release);
    return s;
  }
  if (c.fmt.policy == RingPolicy::Block) return std::nullopt;
  return dropOldest();
}

bool RingWriterState::readerSharesCpu() const noexcept {
  const std::int32_t r = core->h->readerCpu.load(std::memory_order_relaxed);
  return r != 0 && r == cpuTag();
}

// After ringing the reader: when it sleeps on this CPU and the ring does
// not fit in half the cache, give it the CPU now. Run on, the writer
// would fill the next slots and push the one just committed out of the
// cache before the reader reads it; yielded, the reader reads it warm
// and gives it back warm. A small ring stays in cache either way, and
// then one wake-up for many slots is worth more.
void RingWriterState::yieldToReader() const noexcept {
  if (bigRing && readerSharesCpu()) ::sched_yield();
}

void RingWriterState::checkOne() const {
  if (reserved) throw Error(core->what() + ": the writer holds a reserved slot already; commit or abandon it first");
}

}  // namespace detail

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
  const std::uint64_t head = w_->head;
  c.deliver[head % c.n].store(detail::deliverEntry(info_.sequence, index_), std::memory_order_relaxed);
  w_->own[index_] = 0;
  w_->head = head + 1;
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
  w.info_.sequence = s_->head + 1;
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
    if (detail::spinFor(s_->spin, [&] { return s_->returnReady(); })) continue;
    // Full: every slot is in D or with the reader, so at least n-1 will
    // come back. Woken when half of them did, a wake-up buys several slots.
    detail::bellArm(h.writerArmed, std::max<std::uint32_t>(1, c.n / 2));
    if (s_->returnReady()) {
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
    if (!detail::ringSleepOn(c.writerBell.get(), s_->reader.pollFd(), d, s_->reader.pollCap())) {
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
  if (!s_->spare.empty() || s_->returnReady()) {
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

RingStats RingWriter::stats() const { return s_ ? detail::ringStats(*s_->core->h) : RingStats{}; }

}  // namespace forklift
