// forklift - a ring's segment: its geometry, creating one, validating one
// found in a segment, the format as text. See lib/ring_state.hpp for how
// the ring's files divide the work.
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <new>
#include <string>

#include "forklift/error.hpp"
#include "posix.hpp"
#include "ring_state.hpp"
#include "shm_descriptor.hpp"

namespace forklift {
namespace detail {

namespace {
std::uint64_t alignUp(std::uint64_t v, std::uint64_t a) { return (v + a - 1) / a * a; }
}  // namespace

RingPidfdOpenFn ringPidfdOpen = [](int pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); };

std::int64_t monotonicNs() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void RingCore::bind() {
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

void RingCore::corrupt(const std::string& what) const { throw ShmFormatError(this->what() + " is corrupt: " + what); }

RingStats ringStats(const RingHeader& h) {
  RingStats s;
  s.committed = h.head.load(std::memory_order_relaxed);
  s.consumed = h.consumed.load(std::memory_order_relaxed);
  s.drops = h.drops.load(std::memory_order_relaxed);
  s.torn = h.torn.load(std::memory_order_relaxed);
  return s;
}

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

RingGeometry ringGeometry(std::size_t slots, std::uint64_t slotBytes) {
  RingGeometry g{};
  const std::uint64_t slotAlign = slotBytes >= 4096 ? 4096 : kRingAlign;
  g.metaOffset = alignUp(sizeof(RingHeader), kRingAlign);
  g.deliverOffset = g.metaOffset + slots * sizeof(RingSlotMeta);
  g.returnOffset = alignUp(g.deliverOffset + slots * 8, kRingAlign);
  g.dataOffset = alignUp(g.returnOffset + slots * 4, slotAlign);
  g.stride = alignUp(slotBytes, slotAlign);
  g.total = g.dataOffset + slots * g.stride;
  return g;
}

std::shared_ptr<RingCore> createRingCore(const ShmName& name, std::size_t slots, std::uint64_t slotBytes,
                                         RingPolicy policy, std::uint8_t dtype, const std::vector<std::int64_t>& shape,
                                         Layout layout) {
  if (slots < 2 || slots > kRingMaxSlots)
    throw LimitError("a ring has 2 to " + std::to_string(kRingMaxSlots) + " slots, not " + std::to_string(slots));
  if (slotBytes == 0 || slotBytes > kRingMaxSlotBytes)
    throw LimitError("a ring's slot holds 1 byte to 1 TiB, not " + std::to_string(slotBytes) + " bytes");
  if (static_cast<std::uint8_t>(policy) > 2) throw LimitError("unknown ring policy");
  const RingGeometry g = ringGeometry(slots, slotBytes);
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
void validateRing(const SharedMemory& shm) {
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
  if (n < 2 || n > kRingMaxSlots || h->slotBytes == 0 || h->slotBytes > kRingMaxSlotBytes || h->policy > 2)
    throw ShmFormatError(what + " has a corrupt ring header (slots, slot size or policy)");
  const RingGeometry g = ringGeometry(n, h->slotBytes);
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
      if (count > kRingMaxSlotBytes) throw ShmFormatError(what + " has a corrupt ring header (shape)");
    }
    if (count * dtypeSize(static_cast<DType>(h->dtype)) != h->slotBytes)
      throw ShmFormatError(what + " has a corrupt ring header (shape and slot size differ)");
  }
}

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

}  // namespace forklift
