// forklift - Channel: one end of a duplex, framed message stream
//
// `Channel::makePair()` makes a connected pair over a Unix stream socketpair
// (close-on-exec). Make the pair before fork and keep one end on each side;
// `fd()` can be polled. Each message travels as one frame:
//   'F' 'K' version nfds | u32 body length (little endian) | msgpack body
// Version 2 (this one) carries [command, id, args]; version 1 had the id last.
// `nfds` (0..253; always 0 before descriptors could travel) counts the
// descriptors sent with the frame's first byte.
//
// Guarantees:
// - Messages arrive whole and in order, whatever their size up to
//   `Limits::maxBytes`. EINTR, short writes and short reads are handled here.
// - A message over a limit (bytes, depth, elements) is refused by `send`
//   with `LimitError`, naming the command and the argument, before any of it
//   is written.
// - A well-framed body that does not decode throws `DecodeError` (or
//   `LimitError` for depth and element counts) from `recv`, carrying the
//   command and call id when they were read so the receiver can answer; the
//   frame is consumed and the next message is still delivered.
// - A frame whose magic or version bytes are wrong, or whose header declares
//   a body over `Limits::maxBytes`, means the stream is corrupt: `recv`
//   throws `StreamCorrupt` saying which, and every later `recv` throws it
//   again without reading (`buffered()` is then true). A length-prefixed
//   stream cannot be resynchronised safely (any byte may look like a
//   header, and a lying length swallows the good frames after it), so the
//   receiver ends the conversation with a clear error instead of skipping.
// - A `send` that times out after writing part of its frame keeps the rest:
//   the next `send` (or `flush`) completes it first, within its own timeout,
//   so the peer still gets every frame whole. If that cannot finish in time,
//   the new message is not started.
// - When the peer is gone, `send` and `recv` throw `PeerClosed`. With
//   `watchPeer(deathFd)`, every wait also ends when deathFd turns readable
//   (a pidfd, an eventfd): the bytes the peer left are still delivered
//   first, then `PeerClosed`, even while another process holds the peer's
//   end of the socket open. No call waits on a peer that has exited and
//   closed its end, or whose death the watched descriptor reports.
// - After warm-up, `send` allocates nothing, and `recv` allocates only what
//   the decoded Message itself needs.
//
// Descriptors: the `Fd` arguments of a message travel with it (SCM_RIGHTS),
// at most `Limits::maxFds` per message (LimitError before anything is
// sent). The sender keeps its descriptors; the receiver gets new ones,
// close-on-exec, owned by the received Message (closed with it unless taken).
// They are sent with the first byte of their frame, in a sendmsg that starts
// at that byte, and Linux hands them to the recvmsg that reads that byte, one
// batch per recvmsg; the receiver notes the stream range of each recvmsg
// that brought a batch, and a frame that declares descriptors takes the
// oldest batch, which must have come with the frame's first byte. So a batch
// can never be attached to another frame: a batch that no frame claims, or a
// frame whose batch is missing, is a corrupt stream (StreamCorrupt). A frame
// whose descriptors went over this side's limit (the kernel truncated the
// control message and closed the rest) is refused with LimitError naming
// its command and id, its descriptors closed; the next message still comes.
//
// Transport: `makePair` gives a socket pair; `makeSharedPair` gives the
// same framed stream over shared-memory byte queues with eventfd doorbells
// (lib/shm_pipe.hpp), one per direction, beside a socket that still carries
// descriptors and the peer's hang-up. Everything above holds for both; the
// differences are what `fd()` is (below) and that a send into a queue does
// not wait for the peer to be scheduled. Make a shared pair before the fork
// that separates its ends (its memory is inherited, never named).
//
// Reading: in `ReadMode::Greedy` (the default) `recv` reads as many bytes as
// the kernel has, and may keep whole frames buffered: drain with `tryRecv()`
// until it returns nothing, or check `buffered()`, before polling again. In
// `ReadMode::OneFrame` the channel never reads past the frame it returns, so
// "fd readable" keeps meaning "a message is waiting" for code that polls and
// then calls `recv` once; it costs one more system call per message.
//
// Threads: one thread may `send` (and `flush`) while another `recv`s on the
// same Channel: the two sides share no mutable state. Two concurrent
// senders, or two concurrent receivers, are not allowed (frames would
// interleave, buffers would race); serialise them yourself. The set-up calls (`setNonBlocking`,
// `setReadMode`, `watchPeer`, `close`, moves) must not run concurrently
// with anything else on the Channel.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/message.hpp"
#include "forklift/timeout.hpp"

struct msghdr;

namespace forklift {

enum class ReadMode : std::uint8_t { Greedy, OneFrame };
enum class Transport : std::uint8_t { Socket, SharedMemory };

namespace detail {
class ShmLink;
struct Pipe;

// An allocator whose resize() leaves new bytes as they are instead of
// zeroing them: a receive buffer is only read where bytes were received.
template <class T>
struct UninitAlloc : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitAlloc<U>;
  };
  UninitAlloc() = default;
  template <class U>
  UninitAlloc(const UninitAlloc<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
}  // namespace detail

class Channel {
 public:
  static constexpr std::size_t kHeaderBytes = 8;

  // Throws SystemError when the socketpair cannot be made.
  static std::pair<Channel, Channel> makePair(const Limits& limits = {});

  // Shared-memory queues of `toSecond` bytes (first -> second) and
  // `toFirst` bytes (second -> first); 0 means that end never writes.
  // Throws SystemError when the memory or a descriptor cannot be had.
  static std::pair<Channel, Channel> makeSharedPair(const Limits& limits, std::size_t toSecond,
                                                    std::size_t toFirst);
  // Two such pairs whose four queues share one mapping (a backend's command
  // and output channels): one mmap, one madvise and one munmap instead of
  // two each. The memory lives until the last of the four ends closes.
  using Pair = std::pair<Channel, Channel>;
  static std::pair<Pair, Pair> makeSharedPairs(const Limits& limits, std::size_t toSecond1, std::size_t toFirst1,
                                               std::size_t toSecond2, std::size_t toFirst2);

  Channel() = default;  // an empty channel: fd() == -1
  // Adopts a connected stream socket.
  Channel(int fd, const Limits& limits);
  Channel(Channel&&) noexcept = default;
  Channel& operator=(Channel&&) noexcept = default;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Readable when a message (or the peer's end) waits: the socket, or for
  // shared memory an epoll set of the data doorbell (edge-triggered), the
  // socket's hang-up and the watched death descriptor. Poll it; do not read
  // it. (After a ring whose message another path already took, it may read
  // readable once with nothing there: recv then finds nothing and clears it.)
  int fd() const noexcept { return readSet_ ? readSet_.get() : fd_.get(); }
  // Ready (for `writeEvents()`, POLLOUT or POLLIN) when a blocked writer
  // may go on: the socket, or the queue's space doorbell.
  int writeFd() const noexcept;
  short writeEvents() const noexcept;
  bool valid() const noexcept { return fd_.valid(); }
  void close() noexcept;
  const Limits& limits() const noexcept { return limits_; }
  Transport transport() const noexcept { return link_ ? Transport::SharedMemory : Transport::Socket; }
  // Every descriptor this end holds (for registries of open descriptors).
  std::vector<int> descriptors() const;
  // Shared memory: processes forked from now on do not inherit the queues.
  void hideFromLaterForks() noexcept;
  // True when recv would find bytes without waiting (buffered or queued).
  bool pending() const;
  // Waits until a blocked send may go on; false on timeout. Throws
  // PeerClosed when the peer is gone.
  bool waitWritable(const Deadline& d);

  // --- Shared memory: waiting on the doorbell directly ---------------------
  // The data doorbell is an eventfd that only counts rings: it is in fd()
  // edge-triggered and is never read, so a ring costs its reader no reset.
  // A reader that waits in an epoll set of its own registers the channel's
  // input there with `watchInputIn` (the doorbell edge-triggered as `tag`,
  // the peer's hang-up level-triggered as `endTag`), and after a wake-up
  // takes messages with `tryRecvWaited()`: tryRecv without the system call
  // that keeps fd()'s readiness exact for pollers (the epoll_wait that woke
  // the reader consumed the edge already). On `endTag`, use tryRecv(),
  // which reads what the peer left and then throws PeerClosed. A stale edge
  // (a ring whose message was taken before the wait) costs one spurious
  // wake-up, never a lost one. Socket channels: watchInputIn registers the
  // socket as `tag`, and tryRecvWaited is tryRecv.
  void watchInputIn(int epollFd, std::uint64_t tag, std::uint64_t endTag) const;
  std::optional<Message> tryRecvWaited();
  // Shared memory: waits in fd() until input may be there (Input), the
  // peer's end or the watched death descriptor (PeerEnd), or `d` passes;
  // consumes the doorbell's edge. Take messages with tryRecvWaited() after
  // Input, tryRecv() after PeerEnd. Socket channels poll like recv.
  enum class Wake : std::uint8_t { Timeout, Input, PeerEnd };
  Wake waitInput(const Deadline& d);
  // Shared memory (no-ops on a socket): `holdRings` tells the writer that
  // this end's reader is awake and looks at the queue before it sleeps, so
  // a message sent back meanwhile costs no ring (and, on one CPU, no wait:
  // it is there when the reader looks). For a caller about to send a
  // request and read the reply itself. Every recv and waitInput arms again
  // before it sleeps or returns empty-handed; a caller that will not read
  // after all calls `resumeRings`.
  void holdRings() const noexcept;
  void resumeRings() const noexcept;
  // Shared memory: a waiter (waitInput, recv) first polls the queue this
  // long, the writer not ringing meanwhile, before it arms and sleeps. For
  // the lowest latency when both ends have a CPU of their own; where they
  // share one, spinning only delays the peer it waits for. 0 (the
  // default): no spin. No effect on a socket.
  void setSpin(std::chrono::nanoseconds d) noexcept { spin_ = d; }
  std::chrono::nanoseconds spin() const noexcept { return spin_; }
  // Rings this end's own data doorbell (shared memory; a no-op on a socket):
  // a reader in waitInput or polling fd() wakes up and finds no message. For
  // another thread to interrupt a reader.
  void wakeReader() const noexcept;

  // O_NONBLOCK on the descriptor. Every call below works in both modes.
  void setNonBlocking(bool on);
  // Records that someone else (libuv) already set O_NONBLOCK.
  void assumeNonBlocking() noexcept { nonBlocking_ = true; }
  void setReadMode(ReadMode m) noexcept { readMode_ = m; }

  // Ends every wait of send and recv also when `deathFd` is readable (not
  // owned; -1 to stop). Then recv polls before it reads, so a blocking
  // descriptor never sits in a recv(2) that cannot see the death. A
  // zero-timeout call does not wait, so it does not look at deathFd either.
  // A wait on a deathFd that is not open throws Error. Shared memory: the
  // descriptor joins fd()'s epoll set (so fd() is also readable on the
  // death), and one that is not open throws Error here; it must stay open
  // while it is watched.
  void watchPeer(int deathFd);

  // Sends one message, waiting for socket space up to `timeout`. First
  // completes the unsent rest of an earlier frame, if any. Throws
  // LimitError (nothing sent), TypeError for an empty Fd argument (nothing
  // sent), PeerClosed, SystemError, and TimeoutError: either this message
  // was not started (the earlier rest did not finish), or it was cut and its
  // rest is kept for the next send or flush (its descriptors went already,
  // with its first byte).
  void send(const Message& m, Timeout timeout = kForever);

  // Bytes of a frame cut by a send timeout, still to be written.
  std::size_t unsentBytes() const noexcept { return sendBuf_.size() - sendOff_; }
  // Writes those bytes, waiting up to `timeout`; false when some remain.
  // Throws PeerClosed, SystemError.
  bool flush(Timeout timeout);

  // Receives one message, waiting up to `timeout`; nullopt when none came in
  // time. Throws PeerClosed, StreamCorrupt, DecodeError, LimitError,
  // SystemError.
  std::optional<Message> recv(Timeout timeout);
  Message recv();  // waits until a message or the peer's exit
  std::optional<Message> tryRecv() { return recv(Timeout::zero()); }

  // True when recv will not block: a whole frame is buffered, or recv is
  // about to throw (a corrupt stream).
  bool buffered() const noexcept;

  // --- Pieces for event loops that queue their own output -----------------
  // Appends one frame (header + body) for `m` to `out`, and its descriptors
  // to `fds` (not owned: valid while `m` holds them). Throws LimitError or
  // TypeError and leaves `out` and `fds` as they were when `m` breaks
  // `limits` or holds an empty Fd. The overload without `fds` refuses any
  // Fd argument (TypeError).
  static void encodeFrame(const Message& m, Buffer& out, const Limits& limits, std::vector<int>& fds);
  static void encodeFrame(const Message& m, Buffer& out, const Limits& limits);
  // One non-blocking write of raw frame bytes; returns the bytes written (0
  // when the socket is full). With `fds`, `p` must be the first byte of
  // their frame and the write must end before the next frame that carries
  // descriptors starts; the descriptors go exactly when the result is not 0.
  // Throws PeerClosed, SystemError. It bypasses send's unsent rest: do not
  // mix the two on one Channel.
  std::size_t writeSome(const char* p, std::size_t n, std::span<const int> fds = {});

 private:
  static void attachQueues(Pair& pair, const std::shared_ptr<detail::ShmLink>& link, int first);
  enum class Ready : std::uint8_t { Timeout, Fd, PeerDied };
  // Polls fd() for `events` and the death descriptor, if any. Fd wins when
  // both are ready, so bytes already there are handled first.
  Ready waitReady(short events, const Deadline& d) const;
  bool pushOut(const Deadline& d);      // writes the unsent rest; false on timeout
  std::optional<Message> takeFrame();   // from the buffer, if whole
  // The descriptors of the frame starting at stream offset `at` (which
  // declares `nfds`); throws StreamCorrupt when they did not come with it.
  std::vector<detail::UniqueFd> frameFds(std::uint64_t at, unsigned nfds, bool& truncated);
  [[noreturn]] void refuseFds(const char* body, std::size_t len, unsigned nfds, std::size_t got, bool truncated);
  [[noreturn]] void corrupt(const std::string& why);
  bool fill(const Deadline& d);         // one read; false on timeout
  bool fillShared(const Deadline& d, std::size_t want);
  // Shared memory: takes the doorbell's edge (and the level events) out of
  // fd(), without waiting; true when they say the peer ended.
  bool harvest();
  Ready waitShared(int bell, const Deadline& d) const;
  void pullFdBatches();                 // shared memory: the descriptors waiting on the socket
  std::size_t sendFds(const char* p, std::size_t n, std::span<const int> fds);
  // Keeps the descriptors a recvmsg brought with stream bytes [from, to).
  void keepFds(msghdr& msg, std::uint64_t from, std::uint64_t to);
  std::size_t wantBytes() const;        // how much the next read may take
  void setRecvTimeout(Timeout t);

  // Set up before use; read, never written, by send and recv.
  detail::UniqueFd fd_;
  std::shared_ptr<detail::ShmLink> link_;  // shared memory only
  detail::Pipe* in_ = nullptr;             // the queue this end reads
  detail::Pipe* out_ = nullptr;            // the queue this end writes
  detail::UniqueFd readSet_;               // epoll: in_'s data bell + the socket's hang-up
  Limits limits_;
  ReadMode readMode_ = ReadMode::Greedy;
  bool nonBlocking_ = false;
  int deathFd_ = -1;
  bool waited_ = false;
  std::chrono::nanoseconds spin_{0};  // in tryRecvWaited: the caller's epoll_wait took the edge
  // Send side only.
  std::chrono::steady_clock::time_point lastDeathCheck_{};
  Buffer sendBuf_;
  std::size_t sendOff_ = 0;   // sendBuf_ bytes already written
  std::vector<int> sendFds_;  // descriptors still to go with sendBuf_[sendFdsAt_]
  std::size_t sendFdsAt_ = 0;
  // Receive side only. Not zeroed when it grows: zeroing its first 64 KiB
  // was 51,000 instructions and 16 page faults in the frontend's wait for
  // a backend's "__ready" (callgrind, perf), for a frame of 40 bytes.
  std::vector<char, detail::UninitAlloc<char>> rbuf_;
  std::size_t rpos_ = 0;      // start of unconsumed bytes
  std::size_t rend_ = 0;      // end of bytes read
  std::uint64_t rstream_ = 0; // stream offset of rbuf_[rpos_]
  struct FdBatch {
    std::uint64_t from = 0, to = 0;  // the stream bytes of the recvmsg that brought it
    std::vector<detail::UniqueFd> fds;
    bool truncated = false;          // MSG_CTRUNC: the kernel closed the rest
  };
  std::deque<FdBatch> fdBatches_;
  std::vector<std::uint64_t> control_;  // recvmsg's control buffer (8-byte aligned)
  std::string corrupt_;       // why the stream is corrupt; empty while it is not
  Timeout rcvTimeout_{0};     // SO_RCVTIMEO as last set (0 = none)
};

}  // namespace forklift
