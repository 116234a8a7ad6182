// forklift - RingBuffer: a single-producer, single-consumer shared-memory ring
//
// A `RingBuffer` is N slots of one fixed capacity in ONE `SharedMemory`
// segment of kind Ring (anonymous by default, a memfd; `ShmName::named` for
// /dev/shm, for processes outside the tree), with a self-describing ring header (slot count, capacity, policy,
// element type and shape when slots are arrays, counters) and per-slot
// metadata (valid bytes, sequence number, timestamp in CLOCK_MONOTONIC ns,
// which is std::chrono::steady_clock on Linux and the same in every
// process, four user int64). One process attaches as the writer (`writer()`), one as
// the reader (`reader()`); nothing is copied on the way:
//
//   writer:  WriteSlot s = w.reserve(timeout);   // a free slot, in place
//            s.tensor<std::uint8_t, 3>()... ;    // or s.data(); s.setUser(0, frame)
//            s.commit();                          // the reader may take it now
//   reader:  if (auto s = r.next(timeout)) {     // the oldest committed slot
//              use(s->tensor<std::uint8_t, 3>()); // read in place
//            }                                    // released when s goes (or s->release())
//   or, on a Manager's loop (it runs the doorbell protocol below):
//            manager.readRing(r, [](ReadSlot& s) { use(s.tensor<std::uint8_t, 3>()); });
//
// `push`/`pull` copy, for small payloads. The writer holds at most one slot
// at a time (reserve again only after commit/abandon). The reader holds up
// to `RingReaderOptions::maxHeld` (default 1) and releases them in any
// order; one more next() is an Error. A held slot stays in the ring while
// another process reads it in place: hand it `describe()` (once) and the
// slot's index() and sequence(); there `RingBuffer::view(index, sequence)`
// maps it (zero copies from camera to detector). The writer never reuses a
// held slot: it comes back only when the reader releases it, so with k
// slots held a ring of N works as one of N-k for the policies below.
//
// Transport. Made before fork, the object is inherited: the frontend creates
// it in its constructor, each side attaches its role after the fork. Made
// later, `describe()` is a Value with the segment and both doorbells as `Fd`s
// (they travel in a message with SCM_RIGHTS); `RingBuffer::open(value)` on
// the other side.
//
// How slots move. Two index queues in the segment: the delivery queue D
// (writer -> reader, committed slots in order) and the return queue R
// (reader -> writer, released slots). A slot belongs to exactly one place at
// a time (writer, D, reader, R); there are no shared reference counts. The
// writer takes free slots from R; the reader takes slots from D by a CAS on
// D's read cursor, and returns them to R.
//
// Which free slot the writer fills next is chosen for the cache (which one
// is invisible otherwise): with the reader on the writer's CPU, the one
// released last, still warm; with the reader on another CPU, the one
// released first, which has left the reader's private cache. And a writer
// that wakes a reader sleeping on its own CPU yields the CPU to it when the
// ring is larger than half the last-level cache, so the slot is read before
// the next fills push it out. How many slots: a pipeline needs two (one
// filled while the other is read); more absorb the reader's jitter and the
// wake-up latency, which matters while a fill is as short as a wake-up
// (tens of µs across CPUs on small VMs). For arrays of several MiB, two or
// three slots are the fastest: each slot more is memory out of the cache.
//
// Overflow policy, chosen at creation:
//   Block       reserve() waits (with its timeout) until the reader returns a
//               slot. Nothing is ever dropped.
//   DropOldest  with R empty, reserve() takes the oldest committed slot that
//               the reader has not taken yet (the same CAS on D's read
//               cursor: the reader and the writer never both win a slot) and
//               counts a drop. The writer never waits.
//   KeepLatest  as DropOldest for the writer; the reader, in addition, skips
//               to the newest committed slot, releasing (and counting as
//               dropped) the older ones, so it always sees the latest.
//   Example, 4 slots, reader asleep, writer commits 1..6: Block blocks at 5
//   (after 1..4, all slots committed); DropOldest drops 1 and 2, the reader
//   then gets 3, 4, 5, 6; KeepLatest drops 1..5, the reader gets 6.
// `stats().drops` counts drops on both sides and is visible to both.
//
// No torn slot. Because a slot is reused only after it came back through R
// or was won by the writer's CAS, the writer never writes a slot the reader
// holds. Sequence numbers check it anyway, seqlock style: a slot's metadata
// carries 2*seq once committed and an odd value while the writer fills it;
// the reader accepts a slot only when it carries the sequence the queue
// entry names, and `ReadSlot::intact()` re-checks after reading in place
// (a mismatch is counted in `stats().torn` and the slot is refused).
//
// The doorbell, and why no wake-up is lost. The reader sleeps on an eventfd
// (`RingReader::fd()`, pollable by any loop). The writer writes it only when
// the reader is armed, so a busy reader costs the writer no system call and
// many slots share one wake-up:
//   reader:  armed = 1;  full fence;  if (D not empty) { armed = 0; read }  else sleep on fd
//   writer:  publish (D.head += 1);  full fence;  if (exchange(armed, 0)) write fd
// Argument (Dekker): both sides store, fence, then load what the other
// stored. With both fences sequentially consistent, at least one of the two
// loads sees the other's store: either the reader sees the new slot and does
// not sleep, or the writer sees `armed` and rings. The exchange makes one
// ring per arming. The same protocol, mirrored, wakes a writer blocked on a
// full Block ring (`RingWriter::fd()`); that writer arms for half the slots
// (at least one), and the reader rings once that many came back: when the
// writer armed, every slot was queued or read, so at least n-1 will come
// back, and one wake-up buys several slots. The steps are the functions of
// lib/ring_layout.hpp; tests/ring_buffer_test.cpp enumerates every
// interleaving of them.
//
// Spinning: `setSpin(d)` makes a side poll the ring for up to d before it
// arms and sleeps. Off by default: on one shared CPU spinning only delays
// the peer.
//
// Either side dying. Each side writes its pid in the ring header when it
// attaches and keeps a pidfd of the other side's pid (Linux 5.3+). Every
// wait polls that pidfd beside the doorbell, so a peer killed with SIGKILL
// is seen at once, not at the timeout: the reader first gets every slot
// committed before the death, then `ProcessDied`; a writer blocked on a full
// Block ring gets `ProcessDied` when the reader dies. An orderly detach (the
// role object destroyed) clears the pid and rings the peer: `PeerClosed`
// instead. A side that never attached yet is simply waited for. Where
// pidfds are missing (old kernels, some sandboxes), a waiting side asks
// kill(pid, 0) every 50 ms instead (a zombie peer then looks alive until
// it is reaped).
// Re-attaching: a new writer or reader may attach once the old one is dead
// or detached (`Error` while it lives). It recovers the slots its
// predecessor held from the queues and the peer's records (see
// lib/ring_writer.cpp), so no slot is lost or duplicated, and the sequence
// numbers go on. A pid reused between a death and an attach is outside
// what this can tell apart.
//
// Threads: each role object is used by one thread at a time, and so are
// the slots it handed out (a held slot is released on the reader's thread). The same
// process may hold both roles (two threads); then death detection does not
// apply (one pid).
//
// A peer is not trusted. Every index, cursor and count one side loads from
// the segment is checked before it is used (lib/ring_state.hpp): a peer
// that writes nonsense there (a bug, memory corruption, hostility) makes
// the other side throw ShmFormatError "ring '<name>' is corrupt: ...",
// never read or write out of bounds, hand out a slot twice or hang.
//
// Errors: a bad size, slot count or shape is a LimitError naming it; a
// segment or descriptor that is not a ring, or a ring a peer corrupted, is
// a ShmFormatError; a view of
// the wrong element type, rank or layout is a TypeError; a wait that runs
// out is std::nullopt (next) or TimeoutError (reserve, push).
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "forklift/shm.hpp"
#include "forklift/shm_array.hpp"
#include "forklift/timeout.hpp"
#include "forklift/value.hpp"

namespace forklift {

// The numbering is part of the segment format.
enum class RingPolicy : std::uint8_t { Block = 0, DropOldest = 1, KeepLatest = 2 };
const char* ringPolicyName(RingPolicy p) noexcept;  // "block", "drop-oldest", "keep-latest"

inline constexpr std::size_t kRingMaxSlots = 65535;
inline constexpr std::size_t kRingUserInts = 4;

// What a ring holds, the same on both sides (read from the ring header).
struct RingFormat {
  std::size_t slots = 0;
  std::size_t slotBytes = 0;  // capacity of one slot
  RingPolicy policy = RingPolicy::Block;
  std::optional<DType> dtype;        // set when slots are arrays
  std::vector<std::int64_t> shape;   // of one slot's array
  Layout layout = Layout::RowMajor;
  // "4 slots of uint8[720x1280x3] row-major, drop-oldest"
  std::string describe() const;
};

// The metadata of one slot.
struct RingSlotInfo {
  std::uint64_t sequence = 0;   // 1, 2, ... in commit order
  std::uint64_t bytes = 0;      // valid bytes
  std::int64_t timestampNs = 0; // CLOCK_MONOTONIC
  std::array<std::int64_t, kRingUserInts> user{};
};

// Counters of the ring, the same seen from either side.
struct RingStats {
  std::uint64_t committed = 0;  // slots committed so far
  std::uint64_t consumed = 0;   // slots the reader took and released
  std::uint64_t drops = 0;      // slots lost to DropOldest / KeepLatest
  std::uint64_t torn = 0;       // slots refused by the sequence check
};

namespace detail {
struct RingCore;
struct RingWriterState;
struct RingReaderState;
struct RingReaderAccess;
inline constexpr std::size_t kRingMaxRank = 8;
using RingDims = std::array<Eigen::Index, kRingMaxRank>;
// The dimensions of a slot's array; TypeError when the ring does not hold
// `dtype` in `rank` axes (and `layout` for rank 2 and more).
RingDims ringViewDims(const RingFormat& f, DType dtype, std::size_t rank, Layout layout);
std::int64_t monotonicNs() noexcept;

template <class T, int Rank, Layout L>
using RingTensorMap =
    Eigen::TensorMap<Eigen::Tensor<T, Rank, L == Layout::RowMajor ? Eigen::RowMajor : Eigen::ColMajor, Eigen::Index>,
                     Eigen::Aligned16>;
template <class T, Layout L>
using RingMatrixMap =
    Eigen::Map<Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic,
                             L == Layout::RowMajor ? Eigen::RowMajor : Eigen::ColMajor>,
               Eigen::Aligned64>;

template <class T, int Rank, Layout L>
RingTensorMap<T, Rank, L> ringTensor(T* data, const RingFormat& f) {
  static_assert(kShmElement<std::remove_const_t<T>>, "ring arrays hold int8..uint64, float, double or Eigen::half");
  const RingDims d = ringViewDims(f, dtypeOf<std::remove_const_t<T>>(), Rank, L);
  std::array<Eigen::Index, Rank> dims{};
  for (int i = 0; i < Rank; ++i) dims[static_cast<std::size_t>(i)] = d[static_cast<std::size_t>(i)];
  return RingTensorMap<T, Rank, L>(data, dims);
}
}  // namespace detail

// A slot the writer reserved. Fill it in place, then commit(). Dropped
// without commit, the slot goes back to the writer unseen. Move-only.
class WriteSlot {
 public:
  WriteSlot() noexcept = default;
  WriteSlot(WriteSlot&& o) noexcept;
  WriteSlot& operator=(WriteSlot&& o) noexcept;
  WriteSlot(const WriteSlot&) = delete;
  WriteSlot& operator=(const WriteSlot&) = delete;
  ~WriteSlot();

  bool valid() const noexcept { return data_ != nullptr; }
  explicit operator bool() const noexcept { return valid(); }

  std::byte* data() noexcept { return data_; }
  std::size_t capacity() const noexcept;
  std::span<std::byte> span() noexcept { return {data_, capacity()}; }
  // The sequence number this slot will carry.
  std::uint64_t sequence() const noexcept { return info_.sequence; }

  // Array rings: the slot as an N-D TensorMap or (rank 1, 2) a matrix.
  // TypeError for another element type, rank or layout.
  template <class T, int Rank, Layout L = Layout::RowMajor>
  detail::RingTensorMap<T, Rank, L> tensor() {
    return detail::ringTensor<T, Rank, L>(reinterpret_cast<T*>(data_), format());
  }
  template <class T, Layout L = Layout::RowMajor>
  detail::RingMatrixMap<T, L> matrix();

  // Valid bytes (default: the whole capacity); LimitError past capacity.
  void setBytes(std::size_t n);
  // Default: the moment of commit().
  void setTimestampNs(std::int64_t ns) noexcept { info_.timestampNs = ns; }
  // i < kRingUserInts, else LimitError.
  void setUser(std::size_t i, std::int64_t v);
  const RingSlotInfo& info() const noexcept { return info_; }

  // Publishes the slot to the reader (and rings it if it is armed). The
  // object becomes empty.
  void commit();
  // Gives the slot back to the writer unpublished. The object becomes empty.
  void abandon() noexcept;

 private:
  friend class RingWriter;
  const RingFormat& format() const;

  std::shared_ptr<detail::RingWriterState> w_;  // kept alive while the slot is
  std::byte* data_ = nullptr;
  std::uint32_t index_ = 0;
  RingSlotInfo info_{};
};

// A slot the reader took. Read it in place; release() (or the destructor)
// gives it back to the writer. Move-only.
class ReadSlot {
 public:
  ReadSlot() noexcept = default;
  ReadSlot(ReadSlot&& o) noexcept;
  ReadSlot& operator=(ReadSlot&& o) noexcept;
  ReadSlot(const ReadSlot&) = delete;
  ReadSlot& operator=(const ReadSlot&) = delete;
  ~ReadSlot();

  bool valid() const noexcept { return data_ != nullptr; }
  explicit operator bool() const noexcept { return valid(); }

  const std::byte* data() const noexcept { return data_; }
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(info_.bytes); }
  std::span<const std::byte> span() const noexcept { return {data_, bytes()}; }
  const RingSlotInfo& info() const noexcept { return info_; }
  std::uint64_t sequence() const noexcept { return info_.sequence; }
  std::int64_t timestampNs() const noexcept { return info_.timestampNs; }
  std::int64_t user(std::size_t i) const;  // LimitError for i >= kRingUserInts

  template <class T, int Rank, Layout L = Layout::RowMajor>
  detail::RingTensorMap<const T, Rank, L> tensor() const {
    return detail::ringTensor<const T, Rank, L>(reinterpret_cast<const T*>(data_), format());
  }
  template <class T, Layout L = Layout::RowMajor>
  Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic,
                                 L == Layout::RowMajor ? Eigen::RowMajor : Eigen::ColMajor>,
             Eigen::Aligned64>
  matrix() const;

  // The seqlock check: true while the slot still carries the sequence it
  // was taken with. Call it after reading in place to prove nothing was
  // overwritten; false is counted in stats().torn.
  bool intact() const noexcept;
  // Which slot of the ring (0..slots-1): with sequence(), what another
  // process needs to view it in place (RingBuffer::view) while this one
  // holds it.
  std::uint32_t index() const noexcept { return index_; }
  // Gives the slot back to the writer (and rings it if it waits for room).
  void release() noexcept;

 private:
  friend struct detail::RingReaderState;
  const RingFormat& format() const;

  std::shared_ptr<detail::RingReaderState> r_;
  const std::byte* data_ = nullptr;
  std::uint32_t index_ = 0;
  RingSlotInfo info_{};
};

// A slot that a reader (in another process, or this one) holds, seen in
// place by RingBuffer::view: a pool worker reading the frame its owner
// handed it. It does not keep the slot: the holder must not release it
// before the viewer is done (intact() tells when it did too early).
class RingSlotView {
 public:
  const std::byte* data() const noexcept { return data_; }
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(info_.bytes); }
  std::span<const std::byte> span() const noexcept { return {data_, bytes()}; }
  const RingSlotInfo& info() const noexcept { return info_; }
  std::uint64_t sequence() const noexcept { return info_.sequence; }
  std::uint32_t index() const noexcept { return index_; }
  template <class T, int Rank, Layout L = Layout::RowMajor>
  detail::RingTensorMap<const T, Rank, L> tensor() const {
    return detail::ringTensor<const T, Rank, L>(reinterpret_cast<const T*>(data_), *format_);
  }
  // True while the slot still holds this sequence (not released and reused).
  bool intact() const noexcept;

 private:
  friend class RingBuffer;
  std::shared_ptr<detail::RingCore> core_;
  const RingFormat* format_ = nullptr;
  const std::byte* data_ = nullptr;
  std::uint32_t index_ = 0;
  RingSlotInfo info_{};
};

// How a reader attaches.
struct RingReaderOptions {
  // Slots the reader may hold at once, 1 to slots-1 (LimitError otherwise).
  std::size_t maxHeld = 1;
};

// The writing end. At most one per ring at a time. Move-only; destroying it
// detaches (the reader sees PeerClosed once the ring is drained).
class RingWriter {
 public:
  RingWriter() noexcept;
  RingWriter(RingWriter&&) noexcept;
  RingWriter& operator=(RingWriter&&) noexcept;
  ~RingWriter();

  bool valid() const noexcept { return static_cast<bool>(s_); }

  // A free slot. Block: waits up to `timeout` for the reader to return one
  // (TimeoutError), and ends at once with ProcessDied / PeerClosed when the
  // reader dies or detaches meanwhile. Drop policies never wait.
  WriteSlot reserve(Timeout timeout);
  // Without waiting; nullopt when a Block ring is full.
  std::optional<WriteSlot> tryReserve();
  // Copies `data` into a slot and commits it. LimitError when it does not
  // fit; as reserve() otherwise.
  void push(std::span<const std::byte> data, Timeout timeout, std::span<const std::int64_t> user = {});

  // Readable when a blocked writer may retry (the reader returned a slot);
  // the mirror of RingReader::fd(). Poll it after tryReserve() failed and
  // arm() returned true.
  int fd() const noexcept;
  bool arm();
  void drainDoorbell() noexcept;
  // The reader's pidfd, readable once it died; -1 while no reader attached.
  int readerFd();

  void setSpin(std::chrono::nanoseconds d) noexcept;
  const RingFormat& format() const;
  RingStats stats() const;

 private:
  friend class RingBuffer;
  explicit RingWriter(std::shared_ptr<detail::RingWriterState> s);
  std::shared_ptr<detail::RingWriterState> s_;
};

// The reading end. At most one per ring at a time. Move-only; destroying it
// detaches (a writer blocked on a full ring sees PeerClosed).
class RingReader {
 public:
  RingReader() noexcept;
  RingReader(RingReader&&) noexcept;
  RingReader& operator=(RingReader&&) noexcept;
  ~RingReader();

  bool valid() const noexcept { return static_cast<bool>(s_); }

  // The oldest committed slot (KeepLatest: the newest), waiting up to
  // `timeout`; nullopt when none came. Once the ring is drained and the
  // writer is gone: ProcessDied (it died) or PeerClosed (it detached).
  // Error when the reader holds maxHeld slots already.
  std::optional<ReadSlot> next(Timeout timeout);
  // Without waiting; nullopt when empty (also when the writer is gone: see
  // writerGone()). Error when the reader holds maxHeld slots already.
  std::optional<ReadSlot> tryNext();
  // Slots held now, and at most.
  std::size_t held() const noexcept;
  std::size_t maxHeld() const noexcept;
  // Copies the next slot into `out` (resized) and releases it.
  std::optional<RingSlotInfo> pull(Bytes& out, Timeout timeout);

  // For event loops. With a Manager, Manager::readRing runs all of this
  // (and keeps the doorbell armed when a callback throws). Elsewhere (libuv,
  // epoll): fd() is the doorbell. On readable: drainDoorbell(), take slots
  // with tryNext() until empty, then arm(): true means "armed, go back to
  // the loop", false means a slot came meanwhile: take it (and arm again).
  // Arm even when handling a slot threw, or the ring stays silent.
  int fd() const noexcept;
  bool arm();
  void drainDoorbell() noexcept;
  // The writer's pidfd, readable once it died; -1 while no writer attached.
  // Changes when a new writer attaches.
  int writerFd();
  // True once a writer attached and then died or detached (slots may still
  // be waiting: tryNext() them first).
  bool writerGone();

  void setSpin(std::chrono::nanoseconds d) noexcept;
  const RingFormat& format() const;
  RingStats stats() const;

 private:
  friend class RingBuffer;
  friend struct detail::RingReaderAccess;
  explicit RingReader(std::shared_ptr<detail::RingReaderState> s);
  std::shared_ptr<detail::RingReaderState> s_;
};

class RingBuffer {
 public:
  RingBuffer() noexcept;  // empty; valid() false
  RingBuffer(RingBuffer&&) noexcept;
  RingBuffer& operator=(RingBuffer&&) noexcept;
  ~RingBuffer();

  // A ring of `slots` (2..65535) raw slots of `slotBytes` (>= 1) each.
  // Throws LimitError for bad sizes, and what SharedMemory's create throws.
  static RingBuffer create(const ShmName& name, std::size_t slots, std::size_t slotBytes,
                           RingPolicy policy = RingPolicy::Block);
  // A ring whose slots each hold a `dtype` array of `shape` (rank 1..8).
  static RingBuffer createArray(const ShmName& name, std::size_t slots, DType dtype,
                                const std::vector<std::int64_t>& shape, RingPolicy policy = RingPolicy::Block,
                                Layout layout = Layout::RowMajor);
  template <class T>
  static RingBuffer createArray(const ShmName& name, std::size_t slots, const std::vector<std::int64_t>& shape,
                                RingPolicy policy = RingPolicy::Block, Layout layout = Layout::RowMajor) {
    return createArray(name, slots, dtypeOf<T>(), shape, policy, layout);
  }

  // A Map for a message: {kind "ring", segment (SharedMemory::descriptor(),
  // with the memfd as an Fd when anonymous), readerBell (Fd), writerBell
  // (Fd), slots, slotBytes, policy}. open() on the other side.
  Value describe() const;
  // Opens a described ring. ShmFormatError when the segment is not the ring
  // described; TypeError for a malformed descriptor.
  static RingBuffer open(const Value& descriptor);

  // Attaches this process as the ring's writer / reader. Error when a live
  // one is attached already.
  RingWriter writer();
  RingReader reader(RingReaderOptions options = {});

  // Slot `index` as it holds frame `sequence`, read in place (a reader
  // holds it, maybe in another process: ReadSlot::index(), sequence()).
  // Error when the slot holds another frame by now; LimitError for an
  // index past the ring.
  RingSlotView view(std::uint32_t index, std::uint64_t sequence) const;

  bool valid() const noexcept { return static_cast<bool>(core_); }
  const RingFormat& format() const;
  RingStats stats() const;
  const std::string& name() const;  // of the segment

 private:
  explicit RingBuffer(std::shared_ptr<detail::RingCore> core);
  std::shared_ptr<detail::RingCore> core_;
};

// ---------------------------------------------------------------- details

template <class T, Layout L>
detail::RingMatrixMap<T, L> WriteSlot::matrix() {
  const detail::RingDims d = detail::ringViewDims(format(), dtypeOf<T>(), format().shape.size() == 1 ? 1 : 2, L);
  return detail::RingMatrixMap<T, L>(reinterpret_cast<T*>(data_), d[0], format().shape.size() == 1 ? 1 : d[1]);
}

template <class T, Layout L>
Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic,
                               L == Layout::RowMajor ? Eigen::RowMajor : Eigen::ColMajor>,
           Eigen::Aligned64>
ReadSlot::matrix() const {
  const detail::RingDims d = detail::ringViewDims(format(), dtypeOf<T>(), format().shape.size() == 1 ? 1 : 2, L);
  using M = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, L == Layout::RowMajor ? Eigen::RowMajor : Eigen::ColMajor>;
  return Eigen::Map<const M, Eigen::Aligned64>(reinterpret_cast<const T*>(data_), d[0],
                                               format().shape.size() == 1 ? 1 : d[1]);
}

}  // namespace forklift
