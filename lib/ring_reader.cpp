// forklift - the ring's reading side: RingReaderState (claims, held slots,
// recovery of a dead reader's slots), ReadSlot, RingReader, RingSlotView
#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "forklift/error.hpp"
#include "metrics.hpp"
#include "posix.hpp"
#include "ring_state.hpp"

namespace forklift {
namespace detail {

RingReaderState::RingReaderState(std::shared_ptr<RingCore> c, std::size_t maxHeldSlots)
    : core(std::move(c)), writer(*core, core->h->writerPid, core->h->writerEpoch), maxHeld(maxHeldSlots),
      mine(core->n, 0) {}

RingReaderState::~RingReaderState() {
  if (pid == 0 || pid != ::getpid()) return;
  std::int32_t me = pid;
  core->h->readerPid.compare_exchange_strong(me, 0, std::memory_order_acq_rel);
  ringBell(core->writerBell.get());
}

void RingReaderState::attach() {
  RingHeader& h = *core->h;
  attachRingPid(*core, h.readerPid, "reader");
  pid = ::getpid();
  try {
    recover();
  } catch (...) {
    std::int32_t me = pid;
    h.readerPid.compare_exchange_strong(me, 0, std::memory_order_acq_rel);
    pid = 0;
    throw;
  }
  bellDisarm(h.readerArmed);
  clearBell(core->readerBell.get());
  h.readerEpoch.fetch_add(1, std::memory_order_acq_rel);
  ringBell(core->writerBell.get());
}

// The dead reader's slots go back to R: first the one its record names
// (see lib/ring_writer.cpp), then every slot marked held.
void RingReaderState::recover() {
  RingCore& c = *core;
  RingHeader& h = *c.h;
  rHead = h.rHead.load(std::memory_order_acquire);
  const std::uint64_t rt = h.rTail.load(std::memory_order_acquire);
  if (rHead < rt || rHead - rt > c.n)
    c.corrupt("the return queue holds " + std::to_string(rHead) + " - " + std::to_string(rt) + " slots, of " +
              std::to_string(c.n));
  lastHead = h.head.load(std::memory_order_acquire);
  std::uint64_t rec = h.readerRecord.load(std::memory_order_acquire);
  auto markHeld = [&](std::uint32_t s) { c.meta[s].held.store(1, std::memory_order_seq_cst); };
  switch (recordState(rec)) {
    case RecordState::None:
      break;
    case RecordState::Held:
      markHeld(c.checkedSlot(recordSlot(rec), "the reader's record"));
      break;
    case RecordState::Releasing: {
      const std::uint32_t s = c.checkedSlot(recordSlot(rec), "the reader's record");
      if (rHead > recordPos(rec)) c.meta[s].held.store(0, std::memory_order_seq_cst);  // it arrived in R
      else markHeld(s);
      break;
    }
    case RecordState::Pending: {
      const std::uint32_t s = c.checkedSlot(recordSlot(rec), "the reader's record");
      const std::uint64_t t = h.tail.load(std::memory_order_seq_cst);
      const bool won = tailPos(t) == recordPos(rec) + 1 && !tailByWriter(t);
      const std::uint64_t to = won ? record(RecordState::Held, s, 0) : 0;
      // Fails only when the writer confirmed the claim meanwhile.
      if (!h.readerRecord.compare_exchange_strong(rec, to, std::memory_order_acq_rel) || won) markHeld(s);
      break;
    }
  }
  h.readerRecord.store(0, std::memory_order_seq_cst);
  for (std::uint32_t s = 0; s < c.n; ++s)
    if (c.meta[s].held.load(std::memory_order_seq_cst) != 0) release(s, false);
}

// Takes the oldest slot of D; nullopt when empty. An entry is checked
// before its claim while the tail says it is still the one to take (an
// honest writer rewrites an entry only after the tail left it).
std::optional<std::pair<std::uint32_t, std::uint64_t>> RingReaderState::claim() {
  RingCore& c = *core;
  RingHeader& h = *c.h;
  for (;;) {
    std::uint64_t t = h.tail.load(std::memory_order_acquire);
    const std::uint64_t p = tailPos(t);
    const std::uint64_t hd = h.head.load(std::memory_order_acquire);
    if (hd < lastHead)
      c.corrupt("the delivery queue's end went back from " + std::to_string(lastHead) + " to " + std::to_string(hd));
    lastHead = hd;
    if (p > hd)
      c.corrupt("the delivery queue's read position " + std::to_string(p) + " is past its end " + std::to_string(hd));
    if (p == hd) return std::nullopt;
    const std::uint64_t e = c.deliver[p % c.n].load(std::memory_order_relaxed);
    const std::uint32_t s = entrySlot(e);
    if (hd - p > c.n || s >= c.n || entrySeq(e) != p + 1 || mine[s]) {
      if (h.tail.load(std::memory_order_acquire) != t) continue;  // a drop moved on meanwhile
      if (hd - p > c.n)
        c.corrupt("the delivery queue holds " + std::to_string(hd - p) + " slots, of " + std::to_string(c.n));
      c.checkedSlot(s, "the delivery queue");
      if (mine[s])
        c.corrupt("the delivery queue hands out slot " + std::to_string(s) + ", which the reader holds already");
      c.corrupt("the delivery queue's entry " + std::to_string(p) + " carries sequence " +
                std::to_string(entrySeq(e)) + ", not " + std::to_string(p + 1));
    }
    std::uint64_t pending = record(RecordState::Pending, s, p);
    h.readerRecord.store(pending, std::memory_order_seq_cst);
    if (h.tail.compare_exchange_strong(t, (p + 1) << 1, std::memory_order_acq_rel)) {
      mine[s] = 1;
      ++held;
      c.meta[s].held.store(1, std::memory_order_seq_cst);
      // The writer may have turned the record into "held" for us: the mark says so now.
      h.readerRecord.store(0, std::memory_order_seq_cst);
      return std::make_pair(s, entrySeq(e));
    }
    h.readerRecord.store(0, std::memory_order_release);
  }
}

// Gives slot s back through R and rings a writer waiting for room.
// `consumed`: false for a slot recovered from a dead reader.
void RingReaderState::release(std::uint32_t s, bool consumed) noexcept {
  RingCore& c = *core;
  RingHeader& h = *c.h;
  const std::uint64_t rpos = rHead;
  h.readerRecord.store(record(RecordState::Releasing, s, rpos), std::memory_order_release);
  c.ret[rpos % c.n].store(s, std::memory_order_relaxed);
  rHead = rpos + 1;
  bellPublish(h.rHead, rpos + 1);
  c.meta[s].held.store(0, std::memory_order_seq_cst);
  h.readerRecord.store(0, std::memory_order_release);
  if (mine[s]) {
    mine[s] = 0;
    --held;
  }
  if (consumed) h.consumed.store(h.consumed.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  if (const std::int32_t cpu = cpuTag(); h.readerCpu.load(std::memory_order_relaxed) != cpu)
    h.readerCpu.store(cpu, std::memory_order_relaxed);
  if (bellMustRing(h.writerArmed, rpos + 1 - h.rTail.load(std::memory_order_relaxed))) ringBell(c.writerBell.get());
  if (ringOnRelease && held < maxHeld) {
    ringOnRelease = false;
    ringBell(c.readerBell.get());
  }
}

void RingReaderState::checkRoom() const {
  if (held < maxHeld) return;
  if (maxHeld == 1)
    throw Error(core->what() + ": the reader holds a slot already; release it before taking the next");
  throw Error(core->what() + ": the reader holds " + std::to_string(held) +
              " slots already, its maxHeld; release one before taking the next");
}

// One slot that passed the sequence check (KeepLatest: the newest).
std::optional<ReadSlot> RingReaderState::take(const std::shared_ptr<RingReaderState>& self) {
  RingCore& c = *core;
  RingHeader& h = *c.h;
  for (;;) {
    auto got = claim();
    if (!got) return std::nullopt;
    if (c.fmt.policy == RingPolicy::KeepLatest) {
      // Skip to the newest: each older slot goes back as a drop.
      while (deliverReady(h)) {
        release(got->first, false);  // a drop, not a read
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
    return s;
  }
}

}  // namespace detail

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
  data_ = nullptr;
  r_.reset();
}


// ---------------------------------------------------------------- RingReader

RingReader::RingReader() noexcept = default;
RingReader::RingReader(RingReader&&) noexcept = default;
RingReader& RingReader::operator=(RingReader&&) noexcept = default;
RingReader::~RingReader() = default;
RingReader::RingReader(std::shared_ptr<detail::RingReaderState> s) : s_(std::move(s)) {}

std::optional<ReadSlot> RingReader::tryNext() {
  if (!s_) throw Error("tryNext() on an empty RingReader");
  s_->checkRoom();
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
    if (!detail::ringSleepOn(c.readerBell.get(), s_->writer.pollFd(), d, s_->writer.pollCap())) {
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
std::size_t RingReader::held() const noexcept { return s_ ? s_->held : 0; }
std::size_t RingReader::maxHeld() const noexcept { return s_ ? s_->maxHeld : 0; }

bool RingSlotView::intact() const noexcept {
  if (!core_) return false;
  FORKLIFT_FENCE_BEGIN
  std::atomic_thread_fence(std::memory_order_acquire);
  FORKLIFT_FENCE_END
  return core_->meta[index_].seq.load(std::memory_order_relaxed) == 2 * info_.sequence;
}

RingStats RingReader::stats() const { return s_ ? detail::ringStats(*s_->core->h) : RingStats{}; }

}  // namespace forklift
