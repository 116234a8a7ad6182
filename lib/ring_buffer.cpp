// forklift - RingBuffer: making, describing and opening a ring, attaching
// its roles, watching the peer (see lib/ring_state.hpp for the other files)
#include "forklift/ring_buffer.hpp"

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>
#include <utility>

#include "forklift/error.hpp"
#include "posix.hpp"
#include "ring_state.hpp"
#include "shm_descriptor.hpp"

namespace forklift {

namespace detail {

bool ringSleepOn(int bell, int peer, const Deadline& d, int capMillis) {
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

namespace {

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

PeerWatch::State PeerWatch::state() {
  refresh();
  if (pid == 0) return epoch == 0 ? State::NotYet : State::Closed;
  if (gone) return State::Died;
  if (noPidfd) return ::kill(pid, 0) != 0 && errno == ESRCH ? State::Died : State::Alive;
  if (!fd) return State::Alive;  // our own pid (both roles in one process)
  pollfd p{fd.get(), POLLIN, 0};
  return retryEintr([&] { return ::poll(&p, 1, 0); }) > 0 ? State::Died : State::Alive;
}

void PeerWatch::refresh() {
  const std::uint32_t e = epoch_->load(std::memory_order_acquire);
  const pid_t p = pid_->load(std::memory_order_acquire);
  if (e == epoch && p == pid && (fd || gone || noPidfd || p == 0 || p == ::getpid())) return;
  // kill(-p, 0) would ask a whole process group.
  if (p < 0) core_->corrupt("the peer's pid is " + std::to_string(p));
  epoch = e;
  pid = p;
  fd.reset();
  gone = false;
  noPidfd = false;
  if (p == 0 || p == ::getpid()) return;
  fd.reset(ringPidfdOpen(p));
  if (!fd) {
    if (errno == ENOSYS || errno == EPERM) noPidfd = true;
    else if (errno == ESRCH) gone = true;
    else throwErrno("cannot open a pidfd of the ring's peer, pid " + std::to_string(p));
  }
}

void attachRingPid(RingCore& c, std::atomic<std::int32_t>& slot, const char* role) {
  const pid_t me = ::getpid();
  for (;;) {
    std::int32_t cur = slot.load(std::memory_order_acquire);
    if (cur == me) throw Error(c.what() + ": this process is its " + role + " already");
    if (cur < 0) c.corrupt(std::string("the ") + role + "'s pid is " + std::to_string(cur));
    if (cur != 0 && !processDead(cur, ringPidfdOpen))
      throw Error(c.what() + " has a " + role + " already (pid " + std::to_string(cur) + ")");
    if (slot.compare_exchange_strong(cur, me, std::memory_order_acq_rel)) return;
  }
}

}  // namespace detail

// ---------------------------------------------------------------- RingBuffer

RingBuffer::RingBuffer() noexcept = default;
RingBuffer::RingBuffer(RingBuffer&&) noexcept = default;
RingBuffer& RingBuffer::operator=(RingBuffer&&) noexcept = default;
RingBuffer::~RingBuffer() = default;
RingBuffer::RingBuffer(std::shared_ptr<detail::RingCore> core) : core_(std::move(core)) {}

RingBuffer RingBuffer::create(const ShmName& name, std::size_t slots, std::size_t slotBytes, RingPolicy policy) {
  return RingBuffer(detail::createRingCore(name, slots, slotBytes, policy, 0, {}, Layout::RowMajor));
}

RingBuffer RingBuffer::createArray(const ShmName& name, std::size_t slots, DType dtype,
                                   const std::vector<std::int64_t>& shape, RingPolicy policy, Layout layout) {
  if (shape.empty() || shape.size() > detail::kRingMaxRank)
    throw LimitError("a ring's array slot has rank 1 to 8, not " + std::to_string(shape.size()));
  std::uint64_t count = 1;
  for (const std::int64_t e : shape) {
    if (e <= 0) throw LimitError("a ring's array slot has positive dimensions, not " + detail::shapeText(shape));
    if (count > detail::kRingMaxSlotBytes / static_cast<std::uint64_t>(e))
      throw LimitError("a ring's array slot of " + detail::shapeText(shape) + " is too large");
    count *= static_cast<std::uint64_t>(e);
  }
  return RingBuffer(detail::createRingCore(name, slots, count * dtypeSize(dtype), policy,
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
  using detail::field;
  if (fieldAs<std::string>(descriptor, "kind") != "ring")
    throw TypeError("not a ring descriptor: kind is '" + fieldAs<std::string>(descriptor, "kind") + "'");
  const Value& segment = *detail::field(descriptor, "segment");
  const Fd readerBell = fieldAs<Fd>(descriptor, "readerBell");
  const Fd writerBell = fieldAs<Fd>(descriptor, "writerBell");
  if (!readerBell.valid() || !writerBell.valid()) throw TypeError("ring descriptor: a doorbell descriptor is missing");
  // A pipe or socket in a doorbell's place would block the clearing read of
  // an attach for good; an eventfd never blocks it.
  if (!detail::isEventfd(readerBell.get()) || !detail::isEventfd(writerBell.get()))
    throw TypeError("ring descriptor: a doorbell descriptor is not an eventfd");

  auto c = std::make_shared<detail::RingCore>();
  c->shm = SharedMemory(open_only, segment);
  detail::validateRing(c->shm);
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

RingReader RingBuffer::reader(RingReaderOptions options) {
  if (!core_) throw Error("reader() of an empty RingBuffer");
  if (options.maxHeld < 1 || options.maxHeld >= core_->n)
    throw LimitError(core_->what() + ": a reader holds 1 to " + std::to_string(core_->n - 1) + " of its " +
                     std::to_string(core_->n) + " slots at once, not " + std::to_string(options.maxHeld));
  auto s = std::make_shared<detail::RingReaderState>(core_, options.maxHeld);
  s->attach();
  return RingReader(std::move(s));
}

RingSlotView RingBuffer::view(std::uint32_t index, std::uint64_t sequence) const {
  if (!core_) throw Error("view() of an empty RingBuffer");
  detail::RingCore& c = *core_;
  if (index >= c.n)
    throw LimitError(c.what() + " has " + std::to_string(c.n) + " slots, no slot " + std::to_string(index));
  const detail::RingSlotMeta& m = c.meta[index];
  RingSlotView v;
  v.core_ = core_;
  v.format_ = &c.fmt;
  v.index_ = index;
  v.data_ = c.slot(index);
  v.info_.sequence = sequence;
  v.info_.bytes = std::min<std::uint64_t>(m.bytes, c.fmt.slotBytes);
  v.info_.timestampNs = m.timestampNs;
  std::copy(std::begin(m.user), std::end(m.user), v.info_.user.begin());
  // Checked after the metadata was copied: it was that frame's.
  if (!v.intact())
    throw Error(c.what() + ": slot " + std::to_string(index) + " no longer holds frame " + std::to_string(sequence) +
                " (released by its reader and reused)");
  return v;
}

const RingFormat& RingBuffer::format() const {
  if (!core_) throw Error("an empty RingBuffer has no format");
  return core_->fmt;
}
RingStats RingBuffer::stats() const { return core_ ? detail::ringStats(*core_->h) : RingStats{}; }
const std::string& RingBuffer::name() const {
  static const std::string empty;
  return core_ ? core_->shm.name() : empty;
}

}  // namespace forklift