// forklift - a ring's state in one process (internal)
//
// What the ring's files share: `RingCore` (the mapping, the doorbells and
// the format, copied out of the header once it was validated), `PeerWatch`
// (the other side's pid and pidfd), and the two roles' states. Who writes
// what:
//   ring_layout.cpp  the segment's geometry, creating and validating a ring
//   ring_writer.cpp  RingWriterState, WriteSlot, RingWriter (recovery of a
//                    dead writer's slots, drops, the choice of a free slot)
//   ring_reader.cpp  RingReaderState, ReadSlot, RingReader, RingSlotView
//                    (claims, held slots, recovery of a dead reader's)
//   ring_buffer.cpp  RingBuffer, attaching a role, PeerWatch, the waits
//   ring_loop.cpp    the reader's drain/arm loop on a libuv loop
//                    (Manager::readRing)
//
// Shared memory is input. The other side can write anything anywhere in the
// segment, so nothing loaded from it is used before it is checked: format
// fields are read once (validated, then copied into RingCore); every slot
// index, cursor and count loaded later goes through the checks below, and
// a value that cannot be true throws ShmFormatError naming the ring and the
// field ("ring 'frames' is corrupt: the delivery queue names slot 9 of 8").
// Each side keeps its own cursors privately and only stores them, so a
// peer that overwrites them cannot steer this side.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/ring_buffer.hpp"
#include "forklift/shm.hpp"
#include "ring_layout.hpp"

namespace forklift::detail {

inline constexpr std::size_t kRingAlign = 64;
inline constexpr std::uint64_t kRingMaxSlotBytes = std::uint64_t{1} << 40;
// Without pidfds, a waiting side looks at its peer this often.
inline constexpr int kPeerCheckMillis = 50;

struct RingGeometry {
  std::uint64_t metaOffset, deliverOffset, returnOffset, dataOffset, stride, total;
};
RingGeometry ringGeometry(std::size_t slots, std::uint64_t slotBytes);

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
  // Points into a validated segment and copies its format.
  void bind();

  // ShmFormatError: "<ring> is corrupt: <what>".
  [[noreturn]] void corrupt(const std::string& what) const;
  // A slot index loaded from shared memory (`where` names the field).
  std::uint32_t checkedSlot(std::uint64_t i, const char* where) const {
    if (i >= n) corrupt(std::string(where) + " names slot " + std::to_string(i) + " of " + std::to_string(n));
    return static_cast<std::uint32_t>(i);
  }
};

std::shared_ptr<RingCore> createRingCore(const ShmName& name, std::size_t slots, std::uint64_t slotBytes,
                                         RingPolicy policy, std::uint8_t dtype, const std::vector<std::int64_t>& shape,
                                         Layout layout);
// Checks a ring header found in a segment; ShmFormatError naming what is wrong.
void validateRing(const SharedMemory& shm);
RingStats ringStats(const RingHeader& h);

// Waits for the doorbell or the peer's pidfd, each poll at most `capMillis`
// long when it is not negative; false when the deadline passed first.
bool ringSleepOn(int bell, int peer, const Deadline& d, int capMillis = -1);

// The other side's attachment as this side sees it: its pid, and a pidfd
// that becomes readable when it dies. A pid the peer wrote that cannot be
// a process (0 is "none"; negative) is a corrupt ring.
class PeerWatch {
 public:
  enum class State : std::uint8_t { NotYet, Alive, Closed, Died };

  PeerWatch(const RingCore& core, std::atomic<std::int32_t>& pid, std::atomic<std::uint32_t>& epoch)
      : core_(&core), pid_(&pid), epoch_(&epoch) {}

  State state();
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
  void refresh();

  const RingCore* core_;
  std::atomic<std::int32_t>* pid_;
  std::atomic<std::uint32_t>* epoch_;
};

// Attaches this process in `slot`; Error when a live process holds it.
void attachRingPid(RingCore& c, std::atomic<std::int32_t>& slot, const char* role);

struct RingWriterState {
  std::shared_ptr<RingCore> core;
  PeerWatch reader;
  std::vector<std::uint32_t> spare;  // free slots the writer holds
  std::vector<char> own;             // own[s]: s is in `spare` or reserved
  std::uint64_t head = 0;            // D positions published (ours; the header's copy is only stored)
  std::uint64_t rTail = 0;           // R positions popped (ours)
  bool reserved = false;
  std::chrono::nanoseconds spin{0};
  pid_t pid = 0;
  bool bigRing;  // larger than half the last-level cache (see yieldToReader)

  explicit RingWriterState(std::shared_ptr<RingCore> c);
  ~RingWriterState();

  void attach();
  void recover();
  std::optional<std::uint32_t> dropOldest();
  std::optional<std::uint32_t> takeFree();
  // rHead as loaded, checked: never behind rTail, never more than n ahead.
  std::uint64_t loadRHead() const;
  // A slot popped from R: in range and not ours already.
  std::uint32_t fromReturn(std::uint64_t q);
  bool readerSharesCpu() const noexcept;
  void yieldToReader() const noexcept;
  void checkOne() const;
  bool returnReady() const;
};

struct RingReaderState {
  std::shared_ptr<RingCore> core;
  PeerWatch writer;
  std::size_t maxHeld = 1;
  std::size_t held = 0;       // slots taken and not released
  std::vector<char> mine;     // mine[s]: this reader holds s
  std::uint64_t rHead = 0;    // R positions pushed (ours)
  std::uint64_t lastHead = 0; // the writer's head as last loaded: it never goes back
  bool ringOnRelease = false; // a loop waits for a held slot to come back (ring_loop.cpp)
  std::chrono::nanoseconds spin{0};
  pid_t pid = 0;

  explicit RingReaderState(std::shared_ptr<RingCore> c, std::size_t maxHeldSlots);
  ~RingReaderState();

  void attach();
  void recover();
  // D's read position and head, loaded and checked.
  std::pair<std::uint64_t, std::uint64_t> loadTailHead(std::uint64_t& tailWord);
  std::optional<std::pair<std::uint32_t, std::uint64_t>> claim();
  void release(std::uint32_t s, bool consumed = true) noexcept;
  std::optional<ReadSlot> take(const std::shared_ptr<RingReaderState>& self);
  void checkRoom() const;
};

}  // namespace forklift::detail
