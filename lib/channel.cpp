#include "forklift/channel.hpp"
#include "posix.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace forklift {

namespace {

constexpr char kMagic[3] = {'F', 'K', 1};
constexpr std::size_t kInitialRecvBuffer = 64u << 10;
// A receive buffer that grew past this for one huge frame is released after
// it, so a channel does not pin megabytes for a single big message.
constexpr std::size_t kKeepRecvBuffer = 4u << 20;

std::uint32_t readLe32(const char* p) {
  return static_cast<std::uint32_t>(static_cast<std::uint8_t>(p[0])) |
         static_cast<std::uint32_t>(static_cast<std::uint8_t>(p[1])) << 8 |
         static_cast<std::uint32_t>(static_cast<std::uint8_t>(p[2])) << 16 |
         static_cast<std::uint32_t>(static_cast<std::uint8_t>(p[3])) << 24;
}

bool peerGone(int err) { return err == EPIPE || err == ECONNRESET || err == ENOTCONN; }

}  // namespace

std::pair<Channel, Channel> Channel::makePair(const Limits& limits) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    detail::throwErrno("cannot create channel socketpair");
  return {Channel(sv[0], limits), Channel(sv[1], limits)};
}

Channel::Channel(int fd, const Limits& limits) : fd_(fd), limits_(limits) {}

void Channel::setNonBlocking(bool on) {
  const int flags = ::fcntl(fd(), F_GETFL);
  if (flags < 0 || ::fcntl(fd(), F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) < 0)
    detail::throwErrno("cannot set channel blocking mode");
  nonBlocking_ = on;
}

// ---------------------------------------------------------------- sending

void Channel::encodeFrame(const Message& m, Buffer& out, const Limits& limits) {
  const std::size_t start = out.size();
  const char header[kHeaderBytes] = {kMagic[0], kMagic[1], kMagic[2], 0, 0, 0, 0, 0};
  out.write(header, kHeaderBytes);
  encode(m, out);
  const std::size_t body = out.size() - start - kHeaderBytes;
  if (body > limits.maxBytes) {
    out.truncate(start);
    throw LimitError("cannot send '" + m.command() + "': message of " + std::to_string(body) +
                     " bytes exceeds the limit of " + std::to_string(limits.maxBytes) + " bytes");
  }
  char* len = out.data() + start + 4;
  for (int i = 0; i < 4; ++i) len[i] = static_cast<char>((body >> (8 * i)) & 0xff);
}

std::size_t Channel::writeSome(const char* p, std::size_t n) {
  for (;;) {
    const ssize_t r = ::send(fd(), p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) return static_cast<std::size_t>(r);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    if (peerGone(errno)) throw PeerClosed("channel: peer closed");
    detail::throwErrno("cannot write to channel");
  }
}

void Channel::send(const Message& m, Timeout timeout) {
  if (!valid()) throw Error("channel: send on a closed channel");
  if (broken_) throw Error("channel: broken by an earlier send timeout that cut a frame");
  sendBuf_.clear();
  encodeFrame(m, sendBuf_, limits_);
  const Deadline d(timeout);
  std::size_t off = 0;
  const std::size_t n = sendBuf_.size();
  // Try first, wait only when the socket is full: the common case is one
  // system call.
  while (off < n) {
    const std::size_t w = writeSome(sendBuf_.data() + off, n - off);
    off += w;
    if (off == n) break;
    if (w == 0 && !detail::waitFor(fd(), POLLOUT, d)) {
      if (off > 0) broken_ = true;
      throw TimeoutError("channel: cannot send '" + m.command() + "' within " +
                         std::to_string(timeout.count()) + " ms: the peer is not reading");
    }
  }
  sendBuf_.shrinkTo(kKeepRecvBuffer);
}

// ---------------------------------------------------------------- receiving

bool Channel::buffered() const noexcept {
  const std::size_t avail = rend_ - rpos_;
  if (discard_ || avail < kHeaderBytes) return false;
  const char* h = rbuf_.data() + rpos_;
  if (std::memcmp(h, kMagic, 3) != 0) return true;  // recv reports it at once
  const std::uint32_t len = readLe32(h + 4);
  return len > limits_.maxBytes || avail >= kHeaderBytes + len;
}

std::size_t Channel::wantBytes() const {
  const std::size_t avail = rend_ - rpos_;
  if (discard_) return std::max<std::size_t>(1, std::min(discard_ - std::min(discard_, avail), kInitialRecvBuffer));
  std::size_t frame = kHeaderBytes;
  if (avail >= kHeaderBytes) frame += readLe32(rbuf_.data() + rpos_ + 4);
  const std::size_t need = frame > avail ? frame - avail : 1;
  if (readMode_ == ReadMode::OneFrame) return need;
  return std::max(need, rbuf_.size() > rend_ ? rbuf_.size() - rend_ : std::size_t{0});
}

std::optional<Message> Channel::takeFrame() {
  if (discard_) {
    const std::size_t drop = std::min(discard_, rend_ - rpos_);
    rpos_ += drop;
    discard_ -= drop;
    if (discard_) return std::nullopt;
  }
  const std::size_t avail = rend_ - rpos_;
  if (avail < kHeaderBytes) return std::nullopt;
  const char* h = rbuf_.data() + rpos_;
  if (std::memcmp(h, kMagic, 3) != 0) {
    // Out of sync: skip to the next plausible frame start, keeping a tail
    // that might be the beginning of one.
    std::size_t skip = 1;
    while (skip + 3 <= avail && std::memcmp(h + skip, kMagic, 3) != 0) ++skip;
    if (skip + 3 > avail) skip = avail - 2;
    rpos_ += skip;
    throw DecodeError("channel: out of sync, skipped " + std::to_string(skip) + " bytes that are not a frame");
  }
  const std::uint32_t len = readLe32(h + 4);
  if (len > limits_.maxBytes) {
    rpos_ += kHeaderBytes;
    discard_ = len;
    throw LimitError("channel: incoming message of " + std::to_string(len) + " bytes exceeds the limit of " +
                     std::to_string(limits_.maxBytes) + " bytes; skipped");
  }
  if (avail < kHeaderBytes + len) return std::nullopt;
  const char* body = h + kHeaderBytes;
  rpos_ += kHeaderBytes + len;
  if (rpos_ == rend_) rpos_ = rend_ = 0;  // the bytes stay valid until the next read
  Message m = decode(body, len, limits_);
  if (rend_ == 0 && rbuf_.size() > kKeepRecvBuffer) std::vector<char>().swap(rbuf_);
  return m;
}

void Channel::setRecvTimeout(Timeout t) {
  if (t == rcvTimeout_) return;
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(t.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
  if (::setsockopt(fd(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0)
    detail::throwErrno("cannot set channel receive timeout");
  rcvTimeout_ = t;
}

bool Channel::fill(const Deadline& d) {
  std::size_t want = wantBytes();
  if (rbuf_.size() - rend_ < want) {
    // Compact first, then grow to hold the frame being read. Oversize frames
    // never get here whole (they are discarded), so growth is bounded by
    // the limit.
    if (rpos_ > 0) {
      std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rend_ - rpos_);
      rend_ -= rpos_;
      rpos_ = 0;
    }
    if (rbuf_.size() - rend_ < want) rbuf_.resize(std::max(kInitialRecvBuffer, rend_ + want));
    want = std::min(wantBytes(), rbuf_.size() - rend_);
  }
  // A blocking descriptor waits in recv itself, bounded by SO_RCVTIMEO: one
  // system call per message on the request/reply path. A non-blocking one
  // (or a zero timeout) tries, then polls.
  const bool waitInRecv = !nonBlocking_ && d.pollMillis() != 0;
  for (;;) {
    if (waitInRecv) {
      const int ms = d.pollMillis();
      if (ms == 0) return false;
      setRecvTimeout(ms < 0 ? Timeout::zero() : Timeout(ms));
    }
    const ssize_t r = ::recv(fd(), rbuf_.data() + rend_, want, waitInRecv ? 0 : MSG_DONTWAIT);
    if (r > 0) {
      rend_ += static_cast<std::size_t>(r);
      return true;
    }
    if (r == 0) throw PeerClosed("channel: peer closed");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (waitInRecv) continue;  // SO_RCVTIMEO fired; the loop re-checks the deadline
      if (d.pollMillis() == 0 || !detail::waitFor(fd(), POLLIN, d)) return false;
      continue;
    }
    if (peerGone(errno)) throw PeerClosed("channel: peer closed");
    detail::throwErrno("cannot read from channel");
  }
}

std::optional<Message> Channel::recv(Timeout timeout) {
  if (!valid()) throw Error("channel: recv on a closed channel");
  const Deadline d(timeout);
  for (;;) {
    if (auto m = takeFrame()) return m;
    if (!fill(d)) return std::nullopt;
  }
}

Message Channel::recv() { return *recv(kForever); }

}  // namespace forklift
