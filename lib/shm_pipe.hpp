// forklift - shared-memory byte queues under a Channel (internal)
//
// A `ShmLink` is the shared-memory transport of one Channel pair: up to two
// single-producer single-consumer byte queues (one per direction) in one
// shared anonymous mapping, made before the fork and inherited by it, each
// with two doorbells (eventfds): "data" (rung by the writer for a reader
// that armed itself; it only counts rings, and its readers wait on it
// edge-triggered, so it is never read back to zero) and "space" (rung by the reader for a writer that
// found the queue full and armed itself). The protocol is lib/doorbell.hpp:
// a busy reader costs its writer no system call, and a message costs no
// copy through the kernel.
//
// The queues carry the same frames as the socket would, so framing,
// limits and errors stay the Channel's. The socket stays beside them for
// two things only: its hang-up is the peer's end, and descriptors travel
// on it (SCM_RIGHTS, with the stream offset of their frame's first byte),
// sent before that byte is published, so they are in the socket by the
// time the reader sees the frame.
//
// Memory order: `tail` (bytes published, writer) is stored with release
// after the bytes, and loaded with acquire by the reader before it copies
// them; `head` (bytes taken, reader) likewise the other way, so the writer
// never overwrites bytes not yet copied out. Each side caches the other's
// cursor (`tailSeen`, `headSeen`) and reloads it only when the cached value
// shows no bytes or no room: a lower bound is always safe to act on.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>

#include "forklift/detail/fd.hpp"

namespace forklift::detail {

struct alignas(64) PipeHeader {
  // the writer's line
  std::atomic<std::uint64_t> tail;
  std::atomic<std::uint32_t> readerArmed;  // set by the reader, taken by the writer
  // the reader's line
  alignas(64) std::atomic<std::uint64_t> head;
  std::atomic<std::uint32_t> writerArmed;  // set by the writer, taken by the reader
};

// One direction. The data area is `capacity` bytes (a power of two).
struct Pipe {
  PipeHeader* h = nullptr;
  char* data = nullptr;
  std::size_t capacity = 0;
  UniqueFd dataBell;   // the reader waits on it
  UniqueFd spaceBell;  // the writer waits on it
  // The other side's cursor as this side last loaded it (see shm_pipe.cpp).
  // Atomic only because a side's queries may come from several threads;
  // relaxed, it costs what a plain variable does.
  mutable std::atomic<std::uint64_t> headSeen{0};  // writer's
  mutable std::atomic<std::uint64_t> tailSeen{0};  // reader's

  std::size_t readable() const noexcept;
  std::size_t writable() const noexcept;
  std::size_t room(std::uint64_t tail, std::size_t want) const noexcept;

  // Writer: copies what fits of [p, p+n), publishes it and rings the reader
  // if it armed. When not all of it fits, the writer arms itself for space
  // (and copies on if space came meanwhile): a short write is always
  // followed by a ring of `spaceBell` once the reader frees space.
  std::size_t write(const char* p, std::size_t n);
  // Reader: copies up to `max` bytes out, frees them and rings the writer
  // if it armed for space.
  std::size_t read(char* out, std::size_t max);

  // Reader, queue found empty: arms (the caller then looks again). The
  // data bell is never cleared: its readers wait on it edge-triggered.
  void readerArm() noexcept;
  // Reader, leaving bytes in the queue: rings the data bell itself, so a
  // reader that waits on it does not sleep on waiting bytes.
  void readerKeepBell();
  // Writer about to wait for space: arms and re-checks; true when there is
  // space (do not wait). Clears the space bell first.
  bool writerArm();
};

class ShmLink {
 public:
  static constexpr int kMaxPipes = 4;
  // `ab` and `ba` are the capacities of the two directions (rounded up to
  // a power of two, at least 4 KiB; 0 for no queue). Throws SystemError.
  static std::shared_ptr<ShmLink> make(std::size_t ab, std::size_t ba);
  // Up to kMaxPipes queues in one mapping (two channel pairs' directions):
  // one mmap, one madvise and one munmap for all of them.
  static std::shared_ptr<ShmLink> make(std::initializer_list<std::size_t> caps);
  ~ShmLink();
  ShmLink(const ShmLink&) = delete;
  ShmLink& operator=(const ShmLink&) = delete;

  // Queue `i` in the order given to make: with make(ab, ba), 0 is end A
  // writing to end B, 1 the other way. Null when absent.
  Pipe* pipe(int i) noexcept { return pipes_[i].capacity ? &pipes_[i] : nullptr; }
  // Processes forked from now on do not inherit the mapping (the backend
  // that uses it is forked already).
  void hideFromLaterForks() noexcept;

 private:
  ShmLink() = default;
  void* base_ = nullptr;
  std::size_t bytes_ = 0;
  bool hidden_ = false;  // listed in frontend_maps
  Pipe pipes_[kMaxPipes];
};

}  // namespace forklift::detail
