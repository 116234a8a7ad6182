#include "shm_pipe.hpp"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "child.hpp"
#include "forklift/error.hpp"
#include "doorbell.hpp"
#include "posix.hpp"
#include "seams.hpp"

namespace forklift::detail {

static_assert(std::atomic<std::uint64_t>::is_always_lock_free && std::atomic<std::uint32_t>::is_always_lock_free,
              "the queues' cursors must be lock-free to be shared between processes");

namespace {

constexpr std::size_t kHeaderBytes = 128;
static_assert(sizeof(PipeHeader) == kHeaderBytes);

std::size_t roundUp(std::size_t n) {
  std::size_t c = 4096;
  while (c < n) c <<= 1;
  return c;
}

}  // namespace

// Each side keeps the last value it saw of the other side's cursor: a
// lower bound, since cursors only grow, so "bytes wait" or "room is left"
// read from it is always true. Only when it says none does the side load
// the cursor itself, from the line the other side keeps writing: a
// message then costs the writer no miss on the reader's line.
//
// The cursors are in memory the other process writes, so they are input: a
// distance between them past the queue's capacity (a tail a lap ahead, a
// head past the tail) cannot be true, and is never copied. The reader then
// sees at most one queue of bytes (garbage the channel's framing refuses:
// StreamCorrupt), the writer no room (its send waits, bounded by its
// timeout); neither copies past the queue.
std::size_t Pipe::readable() const noexcept {
  const std::uint64_t head = h->head.load(std::memory_order_relaxed);
  std::uint64_t tail = tailSeen.load(std::memory_order_relaxed);
  if (tail == head) {
    tail = h->tail.load(std::memory_order_acquire);
    tailSeen.store(tail, std::memory_order_relaxed);
  }
  return static_cast<std::size_t>(std::min<std::uint64_t>(tail - head, capacity));
}

// The head the writer last saw, loaded again when it leaves less than
// `want` bytes of room.
std::size_t Pipe::room(std::uint64_t tail, std::size_t want) const noexcept {
  const auto left = [&](std::uint64_t head) -> std::size_t {
    const std::uint64_t used = tail - head;
    return used > capacity ? 0 : capacity - static_cast<std::size_t>(used);
  };
  std::uint64_t head = headSeen.load(std::memory_order_relaxed);
  if (left(head) < want) {
    head = h->head.load(std::memory_order_acquire);
    headSeen.store(head, std::memory_order_relaxed);
  }
  return left(head);
}

std::size_t Pipe::writable() const noexcept { return room(h->tail.load(std::memory_order_relaxed), 1); }

std::size_t Pipe::write(const char* p, std::size_t n) {
  std::size_t done = 0;
  for (;;) {
    const std::uint64_t tail = h->tail.load(std::memory_order_relaxed);
    const std::size_t room = this->room(tail, n - done);
    const std::size_t take = std::min(room, n - done);
    if (take > 0) {
      const std::size_t at = tail & (capacity - 1);
      const std::size_t first = std::min(take, capacity - at);
      std::memcpy(data + at, p + done, first);
      std::memcpy(data, p + done + first, take - first);
      done += take;
      bellPublish(h->tail, tail + take);
      if (bellMustRing(h->readerArmed, 1)) ringBell(dataBell.get());
    }
    if (done == n) return done;
    // Full: arm for space, then look again (the reader may have freed some
    // before it could see the arming).
    if (!writerArm()) return done;
  }
}

std::size_t Pipe::read(char* out, std::size_t max) {
  const std::uint64_t head = h->head.load(std::memory_order_relaxed);
  const std::size_t take = std::min<std::size_t>(max, readable());
  if (take == 0) return 0;
  const std::size_t at = head & (capacity - 1);
  const std::size_t first = std::min(take, capacity - at);
  std::memcpy(out, data + at, first);
  std::memcpy(out + first, data, take - first);
  bellPublish(h->head, head + take);
  if (bellMustRing(h->writerArmed, 1)) ringBell(spaceBell.get());
  return take;
}

void Pipe::readerArm() noexcept { bellArm(h->readerArmed); }

void Pipe::readerKeepBell() {
  // Always a ring of our own: the writer's ring (if it took the arming) may
  // be an edge that the reader's wait consumed already. Disarmed, so the
  // writer does not ring again for bytes the reader is bound to see.
  bellDisarm(h->readerArmed);
  ringBell(dataBell.get());
}

bool Pipe::writerArm() {
  clearBell(spaceBell.get());
  bellArm(h->writerArmed);
  if (writable() == 0) return false;
  bellDisarm(h->writerArmed);
  return true;
}

std::shared_ptr<ShmLink> ShmLink::make(std::size_t ab, std::size_t ba) { return make({ab, ba}); }

std::shared_ptr<ShmLink> ShmLink::make(std::initializer_list<std::size_t> sizes) {
  if (sizes.size() > kMaxPipes) throw Error("ShmLink::make: more than " + std::to_string(kMaxPipes) + " queues");
  std::shared_ptr<ShmLink> link(new ShmLink);
  std::size_t caps[kMaxPipes] = {};
  int n = 0;
  for (std::size_t want : sizes) caps[n++] = want ? roundUp(want) : 0;
  // One page-aligned block per queue: its header page, then its data.
  std::size_t bytes = 0;
  for (std::size_t c : caps)
    if (c) bytes += 4096 + c;
  void* base = syscalls.mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) throwErrno("cannot map the channel's shared-memory queues (" + std::to_string(bytes) + " bytes)");
  link->base_ = base;
  link->bytes_ = bytes;
  char* at = static_cast<char*>(base);
  for (int i = 0; i < n; ++i) {
    if (!caps[i]) continue;
    Pipe& p = link->pipes_[i];
    p.h = new (at) PipeHeader{};  // the mapping is zeroed: cursors start at 0
    p.data = at + 4096;
    p.capacity = caps[i];
    at += 4096 + caps[i];
    p.dataBell.reset(syscalls.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    p.spaceBell.reset(syscalls.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!p.dataBell || !p.spaceBell) throwErrno("cannot create the doorbells of the channel's shared-memory queues");
    // A reader starts armed: the first message rings.
    p.h->readerArmed.store(1, std::memory_order_relaxed);
  }
  return link;
}

void ShmLink::hideFromLaterForks() noexcept {
  if (!base_ || hidden_) return;
  // Listed first: a backend forked from here on unmaps the range as well
  // (for valgrind, see frontend_maps). Not listed (out of memory), only
  // valgrind's view of later backends is wrong; the kernel's is not.
  hidden_ = frontend_maps::add(base_, bytes_);
  ::madvise(base_, bytes_, MADV_DONTFORK);
}

ShmLink::~ShmLink() {
  if (hidden_) frontend_maps::remove(base_);
  if (base_) ::munmap(base_, bytes_);
}

}  // namespace forklift::detail
