// forklift - the ring buffer's shared layout and its protocol steps (internal)
//
// The payload of a ring's segment: `RingHeader`, then N `RingSlotMeta`, the
// delivery queue D (N x u64 entries: seq << 16 | slot), the return queue R
// (N x u32 slot indices), then the N slots. Offsets are from the payload's
// start, each 64-byte aligned. The format fields are written once by the
// creator before the segment is shared; `magic` last, with release.
//
// Cursors (monotonic, never wrap in practice):
//   head   D positions published; written by the writer only.
//   tail   D positions taken, << 1, low bit set when the writer took the
//          last one (a drop); advanced by CAS by either side.
//   rHead  R positions pushed; reader only.   rTail  R positions popped; writer only.
// `readerCpu` tells the writer whether the reader shares its CPU, which
// decides which free slot is warmest to reuse (see RingWriterState).
// `readerRecord` is the reader's slot in flight, so a new reader can
// recover the slots of a dead one (see lib/ring_reader.cpp): none, pending
// (slot s at D position p, CAS not known to have won), held (slot s, its
// `held` mark maybe not set yet), or releasing (slot s into R position p).
// A slot the reader holds carries `held` = 1 in its metadata (a reader may
// hold several, RingReaderOptions::maxHeld); only the reader writes it.
//
// The doorbell steps below are the whole wake-up protocol (the argument is
// in ring_buffer.hpp); the ring calls exactly these, and the test
// enumerates their interleavings.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "doorbell.hpp"

namespace forklift::detail {

// pidfd_open(pid, 0), through a pointer that tests swap to make pidfds
// missing (ENOSYS), as on old kernels and in some sandboxes.
using RingPidfdOpenFn = int (*)(int pid);
extern RingPidfdOpenFn ringPidfdOpen;

inline constexpr std::uint64_t kRingMagic = 0x314f474e49524b46ull;  // "FKRINGO1"
inline constexpr std::uint32_t kRingVersion = 2;  // 2: the reader's held marks

static_assert(std::atomic<std::uint64_t>::is_always_lock_free && std::atomic<std::uint32_t>::is_always_lock_free &&
                  std::atomic<std::int32_t>::is_always_lock_free,
              "the ring's cursors must be lock-free to be shared between processes");

struct alignas(64) RingHeader {
  // format, written once
  std::atomic<std::uint64_t> magic;
  std::uint32_t version;
  std::uint32_t slotCount;
  std::uint64_t slotBytes;
  std::uint64_t slotStride;
  std::uint64_t metaOffset;
  std::uint64_t deliverOffset;
  std::uint64_t returnOffset;
  std::uint64_t dataOffset;
  std::uint8_t policy;
  std::uint8_t dtype;  // 0: raw bytes
  std::uint8_t rank;
  std::uint8_t layout;
  std::uint32_t reserved0;
  std::int64_t shape[8];
  // writer's line
  alignas(64) std::atomic<std::uint64_t> head;
  std::atomic<std::uint64_t> rTail;
  std::atomic<std::uint32_t> writerArmed;
  std::atomic<std::int32_t> writerPid;
  std::atomic<std::uint32_t> writerEpoch;
  // the contested line
  alignas(64) std::atomic<std::uint64_t> tail;
  std::atomic<std::uint64_t> drops;
  std::atomic<std::uint64_t> torn;
  // reader's line
  alignas(64) std::atomic<std::uint64_t> rHead;
  std::atomic<std::uint64_t> readerRecord;
  std::atomic<std::uint64_t> consumed;
  std::atomic<std::uint32_t> readerArmed;
  std::atomic<std::int32_t> readerPid;
  std::atomic<std::uint32_t> readerEpoch;
  std::atomic<std::int32_t> readerCpu;  // 1 + the CPU the reader last released a slot on; 0: not known
};

struct alignas(64) RingSlotMeta {
  std::atomic<std::uint64_t> seq;  // 2*sequence once committed, odd while filled
  std::uint64_t bytes;
  std::int64_t timestampNs;
  std::int64_t user[4];
  std::atomic<std::uint32_t> held;  // the reader holds this slot (reader only)
  std::uint32_t reserved;
};
static_assert(sizeof(RingSlotMeta) == 64);
static_assert(std::is_standard_layout_v<RingHeader>);

// ---- queue entries and the reader's record

inline std::uint64_t deliverEntry(std::uint64_t seq, std::uint32_t slot) noexcept { return seq << 16 | slot; }
inline std::uint32_t entrySlot(std::uint64_t e) noexcept { return static_cast<std::uint32_t>(e & 0xffff); }
inline std::uint64_t entrySeq(std::uint64_t e) noexcept { return e >> 16; }

enum class RecordState : std::uint64_t { None = 0, Pending = 1, Held = 2, Releasing = 3 };
inline std::uint64_t record(RecordState s, std::uint32_t slot, std::uint64_t pos) noexcept {
  return static_cast<std::uint64_t>(s) | std::uint64_t{slot} << 2 | pos << 18;
}
inline RecordState recordState(std::uint64_t r) noexcept { return static_cast<RecordState>(r & 3); }
inline std::uint32_t recordSlot(std::uint64_t r) noexcept { return static_cast<std::uint32_t>(r >> 2 & 0xffff); }
inline std::uint64_t recordPos(std::uint64_t r) noexcept { return r >> 18; }

inline std::uint64_t tailPos(std::uint64_t t) noexcept { return t >> 1; }
inline bool tailByWriter(std::uint64_t t) noexcept { return (t & 1) != 0; }

// The re-checks: something to take?
inline bool deliverReady(const RingHeader& h) noexcept {
  return tailPos(h.tail.load(std::memory_order_acquire)) < h.head.load(std::memory_order_acquire);
}
inline bool returnReady(const RingHeader& h) noexcept {
  return h.rTail.load(std::memory_order_relaxed) < h.rHead.load(std::memory_order_acquire);
}

}  // namespace forklift::detail
