#include "forklift/channel.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "metrics.hpp"
#include "posix.hpp"
#include "seams.hpp"
#include "doorbell.hpp"
#include "shm_pipe.hpp"

namespace forklift {

namespace {

// What an epoll event of a shared-memory channel's input stands for.
constexpr std::uint64_t kBellTag = 0;
constexpr std::uint64_t kEndTag = 1;  // the socket's hang-up or the watched death

// Version 2: the body is [command, id, args] (version 1 had [command, args, id]).
constexpr char kVersion = 2;
constexpr char kMagic[3] = {'F', 'K', kVersion};
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

[[noreturn]] void peerEnded() { throw PeerClosed("channel: the peer process ended"); }

std::string hexBytes(const char* p, std::size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    const auto b = static_cast<std::uint8_t>(p[i]);
    if (i) s += ' ';
    s += kDigits[b >> 4];
    s += kDigits[b & 15];
  }
  return s;
}

}  // namespace

std::pair<Channel, Channel> Channel::makePair(const Limits& limits) {
  int sv[2];
  if (detail::syscalls.socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    detail::throwErrno("cannot create channel socketpair");
  return {Channel(sv[0], limits), Channel(sv[1], limits)};
}

Channel::Channel(int fd, const Limits& limits) : fd_(fd), limits_(limits) {}

std::pair<Channel, Channel> Channel::makeSharedPair(const Limits& limits, std::size_t toSecond, std::size_t toFirst) {
  auto pair = makePair(limits);
  attachQueues(pair, detail::ShmLink::make(toSecond, toFirst), 0);
  return pair;
}

std::pair<Channel::Pair, Channel::Pair> Channel::makeSharedPairs(const Limits& limits, std::size_t toSecond1,
                                                                 std::size_t toFirst1, std::size_t toSecond2,
                                                                 std::size_t toFirst2) {
  std::pair<Pair, Pair> pairs{makePair(limits), makePair(limits)};
  auto link = detail::ShmLink::make({toSecond1, toFirst1, toSecond2, toFirst2});
  attachQueues(pairs.first, link, 0);
  attachQueues(pairs.second, link, 2);
  return pairs;
}

// The pair's first end writes queue `first` and reads queue `first + 1`.
void Channel::attachQueues(Pair& pair, const std::shared_ptr<detail::ShmLink>& link, int first) {
  Channel* ends[2] = {&pair.first, &pair.second};
  for (int side = 0; side < 2; ++side) {
    Channel& c = *ends[side];
    c.link_ = link;
    c.out_ = link->pipe(first + side);
    c.in_ = link->pipe(first + 1 - side);
    if (!c.in_) continue;
    // One descriptor to poll for "a message or the end", as a socket is.
    c.readSet_.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!c.readSet_) detail::throwErrno("cannot create the channel's epoll set");
    c.watchInputIn(c.readSet_.get(), kBellTag, kEndTag);
  }
}

void Channel::watchInputIn(int epollFd, std::uint64_t tag, std::uint64_t endTag) const {
  // The doorbell edge-triggered: an eventfd write is an edge even when its
  // count is not zero, so the count is never read back to zero.
  epoll_event input{};
  input.events = in_ ? EPOLLIN | EPOLLET : EPOLLIN;
  input.data.u64 = tag;
  if (::epoll_ctl(epollFd, EPOLL_CTL_ADD, in_ ? in_->dataBell.get() : fd_.get(), &input) != 0)
    detail::throwErrno("cannot watch the channel's input");
  if (!in_) return;
  epoll_event hangUp{};
  hangUp.events = EPOLLRDHUP;
  hangUp.data.u64 = endTag;
  if (::epoll_ctl(epollFd, EPOLL_CTL_ADD, fd_.get(), &hangUp) != 0) detail::throwErrno("cannot watch the channel's end");
}

void Channel::watchPeer(int deathFd) {
  if (readSet_ && deathFd_ != deathFd) {
    if (deathFd_ >= 0) ::epoll_ctl(readSet_.get(), EPOLL_CTL_DEL, deathFd_, nullptr);
    if (deathFd >= 0) {
      epoll_event death{};
      death.events = EPOLLIN;
      death.data.u64 = kEndTag;
      if (::epoll_ctl(readSet_.get(), EPOLL_CTL_ADD, deathFd, &death) != 0) {
        deathFd_ = -1;
        if (errno == EBADF) throw Error("channel: the death descriptor " + std::to_string(deathFd) + " is not open");
        detail::throwErrno("cannot watch the death descriptor " + std::to_string(deathFd));
      }
    }
  }
  deathFd_ = deathFd;
}

bool Channel::harvest() {
  epoll_event ev[3];
  for (;;) {
    const int n = ::epoll_wait(readSet_.get(), ev, 3, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) detail::throwErrno("cannot read the channel's epoll set");
    for (int i = 0; i < n; ++i)
      if (ev[i].data.u64 == kEndTag) return true;
    return false;
  }
}

Channel::Wake Channel::waitInput(const Deadline& d) {
  if (!readSet_) {
    switch (waitReady(POLLIN, d)) {
      case Ready::Timeout: return Wake::Timeout;
      case Ready::PeerDied: return Wake::PeerEnd;
      case Ready::Fd: return Wake::Input;
    }
  }
  if (spin_.count() > 0) {
    const auto now = Deadline::Clock::now();
    const auto end = d.forever() || d.at() - now > spin_ ? now + spin_ : d.at();
    if (end > now) {
      holdRings();  // a writer need not ring a reader that is looking
      if (detail::spinUntil(end, [this] { return in_->readable() > 0; })) return Wake::Input;
    }
  }
  // Armed before sleeping (holdRings may have left it disarmed), then one
  // more look: a message published before the arming rang nobody.
  in_->readerArm();
  if (in_->readable() > 0 || buffered()) return Wake::Input;
  epoll_event ev[3];
  for (;;) {
    const int n = ::epoll_wait(readSet_.get(), ev, 3, d.pollMillis());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) detail::throwErrno("cannot wait on the channel's epoll set");
    if (n == 0) return Wake::Timeout;
    for (int i = 0; i < n; ++i)
      if (ev[i].data.u64 == kEndTag) return Wake::PeerEnd;
    return Wake::Input;
  }
}

void Channel::holdRings() const noexcept {
  if (in_) detail::bellDisarm(in_->h->readerArmed);
}

void Channel::resumeRings() const noexcept {
  if (!in_) return;
  in_->readerArm();
  if (in_->readable() > 0) in_->readerKeepBell();
}

void Channel::wakeReader() const noexcept {
  if (in_) detail::ringBell(in_->dataBell.get());
}

std::optional<Message> Channel::tryRecvWaited() {
  if (!in_) return tryRecv();
  struct Flag {
    bool& f;
    explicit Flag(bool& x) : f(x) { f = true; }
    ~Flag() { f = false; }
  } flag(waited_);
  return tryRecv();
}

void Channel::close() noexcept {
  readSet_.reset();
  in_ = out_ = nullptr;
  link_.reset();
  fd_.reset();
}

int Channel::writeFd() const noexcept { return out_ ? out_->spaceBell.get() : fd_.get(); }
short Channel::writeEvents() const noexcept { return out_ ? POLLIN : POLLOUT; }

std::vector<int> Channel::descriptors() const {
  std::vector<int> fds;
  if (fd_) fds.push_back(fd_.get());
  if (readSet_) fds.push_back(readSet_.get());
  for (detail::Pipe* p : {in_, out_})
    if (p) {
      fds.push_back(p->dataBell.get());
      fds.push_back(p->spaceBell.get());
    }
  return fds;
}

void Channel::hideFromLaterForks() noexcept {
  if (link_) link_->hideFromLaterForks();
}

bool Channel::pending() const {
  if (buffered()) return true;
  if (in_) return in_->readable() > 0;
  return detail::waitFor(fd(), POLLIN, Deadline(Timeout::zero()));
}

bool Channel::waitWritable(const Deadline& d) {
  const Ready r = !out_                ? waitReady(POLLOUT, d)
                  : out_->writerArm() ? Ready::Fd  // space came meanwhile
                                      : waitShared(out_->spaceBell.get(), d);
  if (r == Ready::PeerDied) peerEnded();
  return r == Ready::Fd;
}

Channel::Ready Channel::waitShared(int bell, const Deadline& d) const {
  for (;;) {
    // The socket only for its hang-up: descriptors on it come with frames.
    pollfd p[3] = {{bell, POLLIN, 0}, {fd_.get(), POLLRDHUP, 0}, {deathFd_, POLLIN, 0}};
    const int n = deathFd_ >= 0 ? 3 : 2;
    const int r = ::poll(p, static_cast<nfds_t>(n), d.pollMillis());
    if (r > 0) {
      if (p[0].revents) return Ready::Fd;
      if (n == 3 && (p[2].revents & POLLNVAL))
        throw Error("channel: the watched death descriptor " + std::to_string(deathFd_) + " is not open");
      return Ready::PeerDied;
    }
    if (r == 0) return Ready::Timeout;
    if (errno != EINTR) detail::throwErrno("cannot poll the channel's doorbell");
  }
}

void Channel::setNonBlocking(bool on) {
  const int flags = ::fcntl(fd_.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd_.get(), F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) < 0)
    detail::throwErrno("cannot set channel blocking mode");
  nonBlocking_ = on;
}

Channel::Ready Channel::waitReady(short events, const Deadline& d) const {
  if (deathFd_ < 0) return detail::waitFor(fd_.get(), events, d) ? Ready::Fd : Ready::Timeout;
  for (;;) {
    pollfd p[2] = {{fd_.get(), events, 0}, {deathFd_, POLLIN, 0}};
    const int r = ::poll(p, 2, d.pollMillis());
    if (r > 0) {
      if (p[0].revents) return Ready::Fd;
      if (p[1].revents & POLLNVAL)
        throw Error("channel: the watched death descriptor " + std::to_string(deathFd_) + " is not open");
      return Ready::PeerDied;
    }
    if (r == 0) return Ready::Timeout;
    if (errno != EINTR) detail::throwErrno("cannot poll channel descriptor " + std::to_string(fd_.get()));
  }
}

// ---------------------------------------------------------------- sending

namespace {

// Frames one message; `fds` null refuses descriptors.
void frame(const Message& m, Buffer& out, const Limits& limits, std::vector<int>* fds) {
  const std::size_t start = out.size();
  const std::size_t fdStart = fds ? fds->size() : 0;
  const char header[Channel::kHeaderBytes] = {kMagic[0], kMagic[1], kMagic[2], 0, 0, 0, 0, 0};
  out.write(header, Channel::kHeaderBytes);
  try {
    // Checks every limit (maxFds too, which keeps nfds within one byte);
    // LimitError names the command and argument.
    if (fds)
      encode(m, out, limits, *fds);
    else
      encode(m, out, limits);
  } catch (...) {
    out.truncate(start);
    throw;
  }
  const std::size_t body = out.size() - start - Channel::kHeaderBytes;
  char* h = out.data() + start;
  h[3] = static_cast<char>(fds ? fds->size() - fdStart : 0);
  for (int i = 0; i < 4; ++i) h[4 + i] = static_cast<char>((body >> (8 * i)) & 0xff);
  detail::countMessageOut();
}

}  // namespace

void Channel::encodeFrame(const Message& m, Buffer& out, const Limits& limits, std::vector<int>& fds) {
  frame(m, out, limits, &fds);
}

void Channel::encodeFrame(const Message& m, Buffer& out, const Limits& limits) { frame(m, out, limits, nullptr); }

std::size_t Channel::writeSome(const char* p, std::size_t n, std::span<const int> fds) {
  if (!link_) return sendFds(p, n, fds);
  if (!out_) throw Error("channel: this end of the channel only receives");
  if (n == 0) return 0;
  if (out_->writable() == 0 && !out_->writerArm()) return 0;
  if (!fds.empty()) {
    // Before the frame's first byte is published: the reader finds them
    // on the socket when it meets the frame. They carry its stream offset.
    char at[8];
    const std::uint64_t tail = out_->h->tail.load(std::memory_order_relaxed);
    for (int i = 0; i < 8; ++i) at[i] = static_cast<char>((tail >> (8 * i)) & 0xff);
    if (sendFds(at, sizeof at, fds) != sizeof at) return 0;  // the socket is full: try again later
  }
  return out_->write(p, n);
}

std::size_t Channel::sendFds(const char* p, std::size_t n, std::span<const int> fds) {
  msghdr msg{};
  iovec iov{const_cast<char*>(p), n};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  // Room for the most descriptors one message may carry; aligned as cmsghdr.
  union {
    cmsghdr align;
    char bytes[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
  } control;
  if (!fds.empty()) {
    if (fds.size() > kMaxFdsPerMessage)
      throw LimitError("channel: " + std::to_string(fds.size()) + " descriptors in one write, over " +
                       std::to_string(kMaxFdsPerMessage));
    msg.msg_control = control.bytes;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    std::memset(control.bytes, 0, msg.msg_controllen);  // the padding goes to the kernel too
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    const ssize_t r = detail::syscalls.sendmsg(fd_.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) return static_cast<std::size_t>(r);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    if (peerGone(errno)) throw PeerClosed("channel: peer closed");
    if (!fds.empty() && errno == EBADF) detail::throwErrno("cannot send descriptors on the channel: one is not open");
    if (!fds.empty()) detail::throwErrno("cannot send " + std::to_string(fds.size()) + " descriptors on the channel");
    detail::throwErrno("cannot write to channel");
  }
}

bool Channel::pushOut(const Deadline& d) {
  const std::size_t n = sendBuf_.size();
  bool peerDied = false;
  // Try first, wait only when the socket is full: the common case is one
  // system call.
  while (sendOff_ < n) {
    // Descriptors go with their frame's first byte, in a write that starts
    // there: the rest of an earlier frame is written up to it first.
    std::size_t end = n;
    std::span<const int> fds;
    if (!sendFds_.empty()) {
      if (sendOff_ < sendFdsAt_)
        end = sendFdsAt_;
      else
        fds = sendFds_;
    }
    const std::size_t wrote = writeSome(sendBuf_.data() + sendOff_, end - sendOff_, fds);
    sendOff_ += wrote;
    if (wrote > 0 && !fds.empty()) sendFds_.clear();  // gone with this write
    if (sendOff_ == n) break;
    if (sendOff_ == end) continue;  // reached the descriptors' frame: go on at once
    if (peerDied) peerEnded();  // nothing more fits, and nobody will read
    if (out_ && out_->writerArm()) continue;  // space came meanwhile
    switch (out_ ? waitShared(out_->spaceBell.get(), d) : waitReady(POLLOUT, d)) {
      case Ready::Timeout: return false;
      case Ready::PeerDied: peerDied = true; break;  // one last try
      case Ready::Fd: break;
    }
  }
  return true;
}

void Channel::send(const Message& m, Timeout timeout) {
  if (!valid()) throw Error("channel: send on a closed channel");
  // A queue takes bytes whether or not anyone will read them, where a
  // socket refuses them once the peer is gone. The death descriptor is
  // asked at most once per 100 µs: a send that close to the death is one
  // the peer could as well have died right after.
  const bool deathCheck = link_ && deathFd_ >= 0;
  const auto now = deathCheck || timeout != kForever ? Deadline::Clock::now() : Deadline::Clock::time_point{};
  if (deathCheck && now - lastDeathCheck_ > std::chrono::microseconds(100)) {
    lastDeathCheck_ = now;
    if (detail::waitFor(deathFd_, POLLIN, Deadline(Timeout::zero()))) peerEnded();
  }
  const Deadline d(timeout, now);
  const std::size_t rest = unsentBytes();
  if (rest == 0) {
    sendBuf_.clear();
  } else if (sendOff_ > 0) {
    std::memmove(sendBuf_.data(), sendBuf_.data() + sendOff_, rest);
    sendBuf_.truncate(rest);
  }
  sendOff_ = 0;
  sendFds_.clear();                         // an earlier frame's went with its first byte
  const std::size_t own = sendBuf_.size();  // where this message's frame starts
  encodeFrame(m, sendBuf_, limits_, sendFds_);  // LimitError: the buffer is as it was
  sendFdsAt_ = own;
  if (!pushOut(d)) {
    const std::string head = "channel: cannot send '" + m.command() + "' within " + std::to_string(timeout.count()) +
                             " ms: the peer is not reading; ";
    if (sendOff_ <= own) {
      sendBuf_.truncate(own);
      sendFds_.clear();  // not sent: they stay the caller's alone
      throw TimeoutError(head + (own > sendOff_ ? std::to_string(own - sendOff_) +
                                                      " bytes of an earlier message are still unsent, and this "
                                                      "message was not sent"
                                                : std::string("nothing of this message was sent")));
    }
    const std::size_t frame = sendBuf_.size() - own;
    throw TimeoutError(head + std::to_string(sendOff_ - own) + " of its " + std::to_string(frame) +
                       " bytes were written; the message will still be completed by the next send (or flush)");
  }
  sendBuf_.clear();
  sendOff_ = 0;
  sendBuf_.shrinkTo(kKeepRecvBuffer);
}

bool Channel::flush(Timeout timeout) {
  if (unsentBytes() == 0) return true;
  if (!valid()) throw Error("channel: flush on a closed channel");
  if (!pushOut(Deadline(timeout))) return false;
  sendBuf_.clear();
  sendOff_ = 0;
  sendBuf_.shrinkTo(kKeepRecvBuffer);
  return true;
}

// ---------------------------------------------------------------- receiving

bool Channel::buffered() const noexcept {
  if (!corrupt_.empty()) return true;
  const std::size_t avail = rend_ - rpos_;
  if (avail == 0) return false;
  const char* h = rbuf_.data() + rpos_;
  if (std::memcmp(h, kMagic, std::min(avail, sizeof kMagic)) != 0) return true;  // recv reports it at once
  if (avail < kHeaderBytes) return false;
  const std::uint32_t len = readLe32(h + 4);
  return len > limits_.maxBytes || avail >= kHeaderBytes + len;
}

void Channel::corrupt(const std::string& why) {
  corrupt_ = "channel: stream corrupt: " + why +
             "; a length-prefixed stream cannot be resynchronised, so this channel receives nothing more";
  fdBatches_.clear();  // nobody will claim them: close them now
  throw StreamCorrupt(corrupt_);
}

std::vector<detail::UniqueFd> Channel::frameFds(std::uint64_t at, unsigned nfds, bool& truncated) {
  truncated = false;
  // A batch is claimed by the frame starting within the bytes it came with:
  // one whose bytes all belong to frames already taken was never claimed.
  if (!fdBatches_.empty() && fdBatches_.front().to <= at)
    corrupt(std::to_string(fdBatches_.front().fds.size()) +
            " descriptors came with stream bytes that no frame declaring descriptors started in");
  if (nfds == 0) return {};
  if (link_ && (fdBatches_.empty() || fdBatches_.front().from > at)) pullFdBatches();
  if (fdBatches_.empty() || fdBatches_.front().from > at)
    corrupt("a frame declares " + std::to_string(nfds) + " descriptors, but none came with its first byte");
  FdBatch b = std::move(fdBatches_.front());
  fdBatches_.pop_front();
  truncated = b.truncated;
  return std::move(b.fds);
}

void Channel::refuseFds(const char* body, std::size_t len, unsigned nfds, std::size_t got, bool truncated) {
  // The frame is consumed and its descriptors closed; say which message it
  // was so the receiver can answer it.
  std::string command;
  std::uint64_t id = 0;
  try {
    const Message m = decode(body, len, limits_);
    command = m.command();
    id = m.id();
  } catch (const DecodeError& e) {
    command = e.command();
    id = e.id();
  } catch (const LimitError& e) {
    command = e.command();
    id = e.id();
  }
  const std::string what =
      command.empty() ? std::string("cannot receive a message: ") : "cannot receive '" + command + "': ";
  const std::uint32_t limit = std::min(limits_.maxFds, kMaxFdsPerMessage);
  if (truncated || nfds > limit || got > limit)
    throw LimitError(what + "it carries " + std::to_string(nfds) + " descriptors, over the limit of " +
                         std::to_string(limit) + " (the message is dropped and its descriptors closed)",
                     command, id);
  throw DecodeError(what + "its frame declares " + std::to_string(nfds) + " descriptors but " + std::to_string(got) +
                        " came with it (the message is dropped and its descriptors closed)",
                    command, id);
}

std::size_t Channel::wantBytes() const {
  const std::size_t avail = rend_ - rpos_;
  std::size_t frame = kHeaderBytes;
  if (avail >= kHeaderBytes) frame += readLe32(rbuf_.data() + rpos_ + 4);  // checked: within the limit
  const std::size_t need = frame > avail ? frame - avail : 1;
  if (readMode_ == ReadMode::OneFrame) return need;
  return std::max(need, rbuf_.size() > rend_ ? rbuf_.size() - rend_ : std::size_t{0});
}

std::optional<Message> Channel::takeFrame() {
  const std::size_t avail = rend_ - rpos_;
  if (avail == 0) return std::nullopt;
  const char* h = rbuf_.data() + rpos_;
  // The magic is checked as soon as its first byte is in, so garbage is
  // reported at once rather than after waiting for a whole header.
  const std::size_t magic = std::min(avail, sizeof kMagic);
  if (std::memcmp(h, kMagic, magic) != 0) {
    std::string why = "bad magic bytes " + hexBytes(h, magic) + " where a frame header (" +
                      hexBytes(kMagic, magic) + ") should start";
    if (magic == sizeof kMagic && h[0] == kMagic[0] && h[1] == kMagic[1])
      why += " (frame version " + std::to_string(static_cast<std::uint8_t>(h[2])) + "; this side speaks version " +
             std::to_string(kVersion) + ")";
    corrupt(why);
  }
  if (avail < kHeaderBytes) return std::nullopt;
  const std::uint32_t len = readLe32(h + 4);
  if (len > limits_.maxBytes)
    corrupt("a frame header declares a body of " + std::to_string(len) + " bytes, over the limit of " +
            std::to_string(limits_.maxBytes) + " bytes");
  const auto nfds = static_cast<std::uint8_t>(h[3]);
  if (nfds > kMaxFdsPerMessage)
    corrupt("a frame header declares " + std::to_string(nfds) + " descriptors, more than a message can carry (" +
            std::to_string(kMaxFdsPerMessage) + ")");
  if (avail < kHeaderBytes + len) return std::nullopt;
  bool truncated = false;
  std::vector<detail::UniqueFd> fds = frameFds(rstream_, nfds, truncated);
  const char* body = h + kHeaderBytes;
  rpos_ += kHeaderBytes + len;
  rstream_ += kHeaderBytes + len;
  if (rpos_ == rend_) rpos_ = rend_ = 0;  // the bytes stay valid until the next read
  if (truncated || fds.size() != nfds || nfds > std::min(limits_.maxFds, kMaxFdsPerMessage)) {
    const std::size_t got = fds.size();
    fds.clear();
    refuseFds(body, len, nfds, got, truncated);
  }
  Message m = decode(body, len, limits_, std::move(fds));
  detail::countMessageIn();
  if (rend_ == 0 && rbuf_.size() > kKeepRecvBuffer) decltype(rbuf_)().swap(rbuf_);
  return m;
}

void Channel::setRecvTimeout(Timeout t) {
  if (t == rcvTimeout_) return;
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(t.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
  if (::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0)
    detail::throwErrno("cannot set channel receive timeout");
  rcvTimeout_ = t;
}

bool Channel::fill(const Deadline& d) {
  if (control_.empty()) {
    // Room for this side's limit: the kernel closes what does not fit and
    // says so (MSG_CTRUNC).
    const std::size_t bytes = CMSG_SPACE(sizeof(int) * std::min(limits_.maxFds, kMaxFdsPerMessage));
    control_.resize((bytes + sizeof(std::uint64_t) - 1) / sizeof(std::uint64_t));
  }
  std::size_t want = wantBytes();
  if (rbuf_.size() - rend_ < want) {
    // Compact first; grow only a full buffer, towards the frame being read
    // and at most doubling: memory follows the bytes that came, not what a
    // header declares (a lying length costs no more than its real bytes).
    // Headers that declare more than the limit never get here.
    if (rpos_ > 0) {
      std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rend_ - rpos_);
      rend_ -= rpos_;
      rpos_ = 0;
    }
    if (rend_ == rbuf_.size())
      rbuf_.resize(std::max(kInitialRecvBuffer, std::min(rend_ + want, 2 * rbuf_.size())));
    want = std::min(wantBytes(), rbuf_.size() - rend_);
  }
  if (link_) return fillShared(d, want);
  // A blocking descriptor waits in recv itself, bounded by SO_RCVTIMEO: one
  // system call per message on the request/reply path. A watched peer needs
  // a poll that also sees its death descriptor, so then (and for a
  // non-blocking descriptor) a waiting recv polls, then reads without
  // waiting. A zero timeout only tries.
  const bool watching = deathFd_ >= 0;
  const bool waitInRecv = !watching && !nonBlocking_ && d.pollMillis() != 0;
  bool pollFirst = watching && d.pollMillis() != 0;
  bool peerDied = false;
  for (;;) {
    if (pollFirst) {
      switch (waitReady(POLLIN, d)) {
        case Ready::Timeout: return false;
        case Ready::PeerDied: peerDied = true; break;  // read what it left first
        case Ready::Fd: break;
      }
    } else if (waitInRecv) {
      const int ms = d.pollMillis();
      if (ms == 0) return false;
      setRecvTimeout(ms < 0 ? Timeout::zero() : Timeout(ms));
    }
    // recvmsg, always: a descriptor sent to a plain recv would be closed
    // by the kernel without a word.
    msghdr msg{};
    iovec iov{rbuf_.data() + rend_, want};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control_.data();
    msg.msg_controllen = control_.size() * sizeof(std::uint64_t);
    const ssize_t r = detail::syscalls.recvmsg(fd_.get(), &msg, MSG_CMSG_CLOEXEC | (waitInRecv ? 0 : MSG_DONTWAIT));
    if (r >= 0 && (msg.msg_controllen > 0 || (msg.msg_flags & MSG_CTRUNC))) {
      const std::uint64_t from = rstream_ + (rend_ - rpos_);
      keepFds(msg, from, from + static_cast<std::uint64_t>(r));
    }
    if (r > 0) {
      rend_ += static_cast<std::size_t>(r);
      return true;
    }
    if (r == 0) throw PeerClosed("channel: peer closed");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (peerDied) peerEnded();
      if (waitInRecv) continue;  // SO_RCVTIMEO fired; the loop re-checks the deadline
      if (d.pollMillis() == 0) return false;
      if (watching) {
        pollFirst = true;
        continue;
      }
      if (!detail::waitFor(fd_.get(), POLLIN, d)) return false;
      continue;
    }
    if (peerGone(errno)) throw PeerClosed("channel: peer closed");
    detail::throwErrno("cannot read from channel");
  }
}

bool Channel::fillShared(const Deadline& d, std::size_t want) {
  if (!in_) throw Error("channel: this end of the channel only sends");
  // Before arming, take the doorbell's edge out of fd() (unless the
  // caller's own wait took it): then arm, then look again. In that order a
  // ring after the arming stays in fd() for pollers, and bytes that came
  // before it are seen by the second look (readerKeepBell rings for them).
  const auto arm = [this] {
    const bool ended = !waited_ && harvest();
    in_->readerArm();
    return ended;
  };
  bool peerDied = false;
  for (;;) {
    if (in_->readable() > 0) {
      rend_ += in_->read(rbuf_.data() + rend_, want);
      // Leave fd() true for pollers: readable while bytes wait, clear and
      // armed when none do.
      if (in_->readable() > 0 || (arm(), in_->readable() > 0)) in_->readerKeepBell();
      return true;
    }
    if (arm()) peerDied = true;
    if (in_->readable() > 0) continue;
    // The end: the bytes the peer left have been read before.
    if (peerDied) peerEnded();
    if (d.pollMillis() == 0) return false;
    switch (waitInput(d)) {
      case Wake::Timeout: return false;
      case Wake::PeerEnd: peerDied = true; break;
      case Wake::Input: break;
    }
  }
}

void Channel::pullFdBatches() {
  if (control_.empty()) {
    const std::size_t bytes = CMSG_SPACE(sizeof(int) * std::min(limits_.maxFds, kMaxFdsPerMessage));
    control_.resize((bytes + sizeof(std::uint64_t) - 1) / sizeof(std::uint64_t));
  }
  for (;;) {
    char at[8];
    msghdr msg{};
    iovec iov{at, sizeof at};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control_.data();
    msg.msg_controllen = control_.size() * sizeof(std::uint64_t);
    const ssize_t r = detail::syscalls.recvmsg(fd_.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return;  // none waiting, or the end (seen by the next wait)
    std::uint64_t from = 0;
    for (int i = 0; i < 8; ++i) from |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(at[i])) << (8 * i);
    if (r != sizeof at) {
      keepFds(msg, 0, 1);
      fdBatches_.clear();
      corrupt("a cut descriptor marker on the socket beside the shared-memory queue");
    }
    keepFds(msg, from, from + 1);
  }
}

void Channel::keepFds(msghdr& msg, std::uint64_t from, std::uint64_t to) {
  FdBatch b;
  b.from = from;
  b.to = to;
  b.truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0)) continue;
    const std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      b.fds.emplace_back(fd);
    }
  }
  if (from == to) return;  // no byte to belong to (cannot happen on Linux): closed with b
  fdBatches_.push_back(std::move(b));
}

std::optional<Message> Channel::recv(Timeout timeout) {
  if (!valid()) throw Error("channel: recv on a closed channel");
  if (!corrupt_.empty()) throw StreamCorrupt(corrupt_);
  const Deadline d(timeout);
  for (;;) {
    if (auto m = takeFrame()) return m;
    if (!fill(d)) return std::nullopt;
  }
}

Message Channel::recv() { return *recv(kForever); }

}  // namespace forklift
