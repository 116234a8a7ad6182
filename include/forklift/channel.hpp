// forklift - Channel: one end of a duplex, framed message stream
//
// `Channel::makePair()` makes a connected pair over a Unix stream socketpair
// (close-on-exec). Make the pair before fork and keep one end on each side;
// `fd()` can be polled. Each message travels as one frame:
//   'F' 'K' version flags | u32 body length (little endian) | msgpack body
//
// Guarantees:
// - Messages arrive whole and in order, whatever their size up to
//   `Limits::maxBytes`. EINTR, short writes and short reads are handled here.
// - A message over the limit is refused by `send` with `LimitError` before
//   any byte is written.
// - A frame whose body does not decode throws `DecodeError` from `recv`; the
//   frame is consumed and the next good message is still delivered. A frame
//   announcing a body over the limit throws `LimitError` and its body is
//   skipped as it arrives, without being stored.
// - When the peer is gone, `send` and `recv` throw `PeerClosed`. No call
//   waits on a peer that has exited.
// - After warm-up, `send` allocates nothing, and `recv` allocates only what
//   the decoded Message itself needs.
//
// Reading: in `ReadMode::Greedy` (the default) `recv` reads as many bytes as
// the kernel has, and may keep whole frames buffered: drain with `tryRecv()`
// until it returns nothing, or check `buffered()`, before polling again. In
// `ReadMode::OneFrame` the channel never reads past the frame it returns, so
// "fd readable" keeps meaning "a message is waiting" for code that polls and
// then calls `recv` once; it costs one more system call per message.
//
// A Channel is used from one thread at a time.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/message.hpp"
#include "forklift/timeout.hpp"

namespace forklift {

enum class ReadMode : std::uint8_t { Greedy, OneFrame };

class Channel {
 public:
  static constexpr std::size_t kHeaderBytes = 8;

  // Throws SystemError when the socketpair cannot be made.
  static std::pair<Channel, Channel> makePair(const Limits& limits = {});

  Channel() = default;  // an empty channel: fd() == -1
  // Adopts a connected stream socket.
  Channel(int fd, const Limits& limits);
  Channel(Channel&&) noexcept = default;
  Channel& operator=(Channel&&) noexcept = default;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  int fd() const noexcept { return fd_.get(); }
  bool valid() const noexcept { return fd_.valid(); }
  void close() noexcept { fd_.reset(); }
  const Limits& limits() const noexcept { return limits_; }

  // O_NONBLOCK on the descriptor. Every call below works in both modes.
  void setNonBlocking(bool on);
  // Records that someone else (libuv) already set O_NONBLOCK.
  void assumeNonBlocking() noexcept { nonBlocking_ = true; }
  void setReadMode(ReadMode m) noexcept { readMode_ = m; }
  void watchPeer(int) noexcept {}  // STUB

  // Sends one message, waiting for socket space up to `timeout`. Throws
  // LimitError (nothing sent), PeerClosed, TimeoutError (nothing sent; if a
  // frame was cut half-way the channel is marked broken and later calls
  // throw), SystemError.
  void send(const Message& m, Timeout timeout = kForever);

  // Receives one message, waiting up to `timeout`; nullopt when none came in
  // time. Throws PeerClosed, DecodeError, LimitError, SystemError.
  std::optional<Message> recv(Timeout timeout);
  Message recv();  // waits until a message or the peer's exit
  std::optional<Message> tryRecv() { return recv(Timeout::zero()); }

  // True when a whole frame is already buffered (recv will not block).
  bool buffered() const noexcept;

  // --- Pieces for event loops that queue their own output -----------------
  // Appends one frame (header + body) for `m` to `out`. Throws LimitError
  // and leaves `out` as it was when the body exceeds the limit.
  static void encodeFrame(const Message& m, Buffer& out, const Limits& limits);
  // One non-blocking write of raw frame bytes; returns the bytes written (0
  // when the socket is full). Throws PeerClosed, SystemError.
  std::size_t writeSome(const char* p, std::size_t n);

 private:
  std::optional<Message> takeFrame();  // from the buffer, if whole
  bool fill(const Deadline& d);        // one read; false on timeout
  std::size_t wantBytes() const;       // how much the next read may take
  void setRecvTimeout(Timeout t);

  detail::UniqueFd fd_;
  Limits limits_;
  ReadMode readMode_ = ReadMode::Greedy;
  bool nonBlocking_ = false;
  bool broken_ = false;
  Buffer sendBuf_;
  std::vector<char> rbuf_;
  std::size_t rpos_ = 0;      // start of unconsumed bytes
  std::size_t rend_ = 0;      // end of bytes read
  std::size_t discard_ = 0;   // body bytes of an oversize frame still to skip
  Timeout rcvTimeout_{0};     // SO_RCVTIMEO as last set (0 = none)
};

}  // namespace forklift
