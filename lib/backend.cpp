#include "backend.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <span>

#include "control.hpp"
#include "doorbell.hpp"
#include "metrics.hpp"
#include "posix.hpp"

namespace forklift {

// ---------------------------------------------------------------- Reply

Reply& Reply::operator=(Reply&& o) noexcept {
  if (this != &o) {
    if (wanted()) reject("the reply was replaced before it was answered");
    backend_ = std::move(o.backend_);
    id_ = std::exchange(o.id_, 0);
    command_ = std::move(o.command_);
  }
  return *this;
}

Reply::~Reply() {
  // Unanswered: the caller must not wait for an answer that cannot come.
  if (wanted()) reject("c__" + command_ + " dropped its reply without answering");
}

void Reply::resolve(Value v) {
  if (!wanted()) return;
  const std::uint64_t id = std::exchange(id_, 0);
  if (auto b = backend_.lock()) b->answer(id, true, std::move(v), {});
}

void Reply::reject(const std::string& error) {
  const std::uint64_t id = std::exchange(id_, 0);
  auto b = backend_.lock();
  if (!b) return;
  try {
    if (id)
      b->answer(id, false, {}, error);
    else if (!command_.empty())
      b->reportFailure(command_, error);  // a sent command: the frontend hears of it
  } catch (const std::exception&) {
    // Called from destructors: a reply that cannot be queued is lost with
    // the channel, and the caller's call() ends when the backend does.
  }
  command_.clear();
}

namespace detail {

namespace {

void check(int r, const char* what) {
  // libuv's errors are negative errno values on Linux.
  if (r < 0) throw SystemError(-r, std::string("cannot ") + what);
}

// What an event of the shared-memory loop's epoll set stands for.
constexpr std::uint64_t kCmdInput = 1;  // the command queue's doorbell
constexpr std::uint64_t kCmdEnd = 2;    // the command channel's end
constexpr std::uint64_t kLibuv = 3;     // libuv's descriptor: its handles have work

}  // namespace

Backend::Backend(BackendConfig config, Channel cmd, Channel out)
    : config_(std::move(config)), cmd_(std::move(cmd)), out_(std::move(out)),
      sources_(&loop_, [this](const std::string& where, const std::string& what) {
        log().error("{} threw: {}", where, what);
      }) {
  cmdWriter_.ch = &cmd_;
  outWriter_.ch = &out_;
  check(uv_loop_init(&loop_), "initialise the backend loop");
  check(uv_poll_init(&loop_, &cmdPoll_, cmd_.fd()), "watch the command channel");
  // Over shared memory the command channel's writer waits on a doorbell of
  // its own; over a socket one handle watches both ways.
  if (cmd_.writeFd() != cmd_.fd()) {
    check(uv_poll_init(&loop_, &cmdWritePoll_, cmd_.writeFd()), "watch the command channel");
    cmdWritePoll_.data = this;
    cmdWritePolled_ = true;
  }
  check(uv_poll_init(&loop_, &outPoll_, out_.writeFd()), "watch the output channel");
  // uv_poll_init made both descriptors non-blocking; tell the channels.
  cmd_.assumeNonBlocking();
  out_.assumeNonBlocking();
  cmdPoll_.data = this;
  outPoll_.data = this;
  if (cmd_.transport() == Transport::SharedMemory) {
    loopSet_.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!loopSet_) throwErrno(config_.who + ": cannot create the backend loop's epoll set");
    cmd_.watchInputIn(loopSet_.get(), kCmdInput, kCmdEnd);
    epoll_event uv{};
    uv.events = EPOLLIN;
    uv.data.u64 = kLibuv;
    if (::epoll_ctl(loopSet_.get(), EPOLL_CTL_ADD, uv_backend_fd(&loop_), &uv) != 0)
      throwErrno(config_.who + ": cannot watch the backend loop");
  } else {
    check(uv_poll_start(&cmdPoll_, UV_READABLE, &Backend::onCmdPoll), "watch the command channel");
  }
  check(uv_poll_init(&loop_, &stopPoll_, config_.stopBell), "watch the stop bell");
  stopPoll_.data = this;
  check(uv_poll_start(&stopPoll_, UV_READABLE, &Backend::onStopBell), "watch the stop bell");
}

spdlog::logger& Backend::log() {
  if (!log_) log_ = config_.makeLog();
  return *log_;
}

bool Backend::logs(spdlog::level::level_enum level) const noexcept {
  return log_ ? log_->should_log(level) : level >= newLoggerLevel();
}

Backend::~Backend() {
  closeAll();
  uv_run(&loop_, UV_RUN_DEFAULT);  // runs the close callbacks
  if (uv_loop_close(&loop_) != 0) log().warn("backend loop closed with handles still open");
}

void Backend::closeAll() {
  sources_.closeAll();
  if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&cmdPoll_))) uv_close(reinterpret_cast<uv_handle_t*>(&cmdPoll_), nullptr);
  if (cmdWritePolled_ && !uv_is_closing(reinterpret_cast<uv_handle_t*>(&cmdWritePoll_)))
    uv_close(reinterpret_cast<uv_handle_t*>(&cmdWritePoll_), nullptr);
  if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&outPoll_))) uv_close(reinterpret_cast<uv_handle_t*>(&outPoll_), nullptr);
  if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&stopPoll_))) uv_close(reinterpret_cast<uv_handle_t*>(&stopPoll_), nullptr);
}

// ---------------------------------------------------------------- output

void Backend::sendReady() { enqueue(cmdWriter_, Message(std::string(control::kReady))); }

void Backend::sendFailed(const std::string& why) {
  enqueue(cmdWriter_, Message(std::string(control::kFailed), {{"error", why}}));
  flush(std::chrono::seconds(1));
}

void Backend::sendOut(const Message& m) {
  if (frontendGone_) throw PeerClosed(config_.who + ": sendOut__: the frontend is gone");
  if (control::reserved(m.command()))
    throw Error(config_.who + ": sendOut__: '" + m.command() + "' is a reserved name (names starting with __ are forklift's)");
  enqueue(outWriter_, m);
}

void Backend::reportFailure(const std::string& command, const std::string& error) {
  countError();
  if (frontendGone_) return;
  try {
    enqueue(outWriter_, Message(std::string(control::kCommandError), {{"command", command}, {"error", error}}));
  } catch (const std::exception& e) {
    log().error("cannot report the failure of '{}' to the frontend: {}", command, e.what());
  }
}

void Backend::answer(std::uint64_t id, bool ok, Value v, const std::string& error) {
  if (!ok) countError();
  if (frontendGone_) return;
  Message m(std::string(ok ? control::kOk : control::kError));
  if (ok)
    m.args().emplace_back("value", std::move(v));
  else
    m.args().emplace_back("error", error);
  m.setId(id);
  // The reply itself cannot go (too big, too many or empty descriptors): the
  // caller must still hear about it.
  auto fail = [&](const Error& e) {
    Message err(std::string(control::kError), {{"error", std::string(e.what())}});
    err.setId(id);
    enqueue(cmdWriter_, err);
  };
  try {
    enqueue(cmdWriter_, m);
  } catch (const LimitError& e) {
    fail(e);
  } catch (const TypeError& e) {
    fail(e);
  }
}

void Backend::enqueue(Writer& w, const Message& m) {
  w.frame.clear();
  w.frameFds.clear();
  Channel::encodeFrame(m, w.frame, w.ch->limits(), w.frameFds);  // LimitError, TypeError: nothing queued
  const char* p = w.frame.data();
  std::size_t n = w.frame.size();
  std::span<const int> fds = w.frameFds;
  if (w.queued() == 0) {
    // The common case: the socket takes the whole frame now, one syscall.
    const std::size_t sent = w.ch->writeSome(p, n, fds);
    w.sent += sent;
    if (sent == n) return;
    if (sent > 0) fds = {};  // they went with the first byte
    p += sent;
    n -= sent;
    w.pending.clear();
    w.off = 0;
  } else if (w.queued() + n > config_.outQueueBytes) {
    // Full: wait (bounded) for the frontend to read, writing as it does.
    // A message larger than the bound (every one when it is 0) goes once
    // the queue is empty: it waited forever for room that cannot be.
    const Deadline d(config_.outWait);
    const auto full = [&] { return w.queued() > 0 && w.queued() + n > config_.outQueueBytes; };
    while (full()) {
      const bool writable = w.ch->waitWritable(d);
      if (writable) drain(w);
      if (!writable || d.expired()) {
        if (!full()) break;
        throw TimeoutError(config_.who + ": cannot send '" + m.command() + "': the frontend has not read " +
                           std::to_string(w.queued()) + " queued bytes within " +
                           std::to_string(config_.outWait.count()) + " ms");
      }
    }
  }
  if (!fds.empty()) {
    // The queue owns duplicates: the sender's own may be closed before the
    // socket takes the frame.
    Writer::Attached a;
    a.at = w.sent + w.queued();
    a.fds.reserve(fds.size());
    for (int fd : fds) {
      a.fds.emplace_back(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
      if (!a.fds.back()) throwErrno(config_.who + ": cannot send '" + m.command() + "': cannot keep descriptor " +
                                    std::to_string(fd) + " for the output queue");
    }
    w.attached.push_back(std::move(a));
  }
  if (w.off > 0 && w.off >= w.pending.size() / 2) {
    // Compact so the queue does not creep forward forever.
    const std::size_t left = w.queued();
    std::memmove(w.pending.data(), w.pending.data() + w.off, left);
    w.pending.truncate(left);
    w.off = 0;
  }
  w.pending.write(p, n);
  updatePoll(w);
}

bool Backend::drain(Writer& w) {
  while (w.queued() > 0) {
    // A write never runs past the first byte of the next frame with
    // descriptors, and one that starts there carries them.
    std::size_t n = w.queued();
    int fds[kMaxFdsPerMessage];
    std::size_t nfds = 0;
    if (!w.attached.empty()) {
      std::uint64_t next = w.attached.front().at;
      if (next == w.sent) {
        for (const UniqueFd& f : w.attached.front().fds) fds[nfds++] = f.get();
        next = w.attached.size() > 1 ? w.attached[1].at : w.sent + n;
      }
      n = std::min<std::uint64_t>(n, next - w.sent);
    }
    const std::size_t sent = w.ch->writeSome(w.pending.data() + w.off, n, std::span<const int>(fds, nfds));
    if (sent == 0) break;
    if (nfds > 0) w.attached.pop_front();  // the kernel holds them now
    w.off += sent;
    w.sent += sent;
  }
  if (w.queued() == 0) {
    w.pending.clear();
    w.off = 0;
    w.pending.shrinkTo(1u << 20);
    return true;
  }
  return false;
}

namespace {
int uvEvents(short pollEvents) { return pollEvents == POLLOUT ? UV_WRITABLE : UV_READABLE; }
}  // namespace

void Backend::updatePoll(Writer& w) {
  const bool want = w.queued() > 0;
  if (&w == &cmdWriter_ && !cmdWritePolled_) {
    if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&cmdPoll_)))
      uv_poll_start(&cmdPoll_, UV_READABLE | (want ? UV_WRITABLE : 0), &Backend::onCmdPoll);
    return;
  }
  uv_poll_t& h = &w == &cmdWriter_ ? cmdWritePoll_ : outPoll_;
  bool& polling = &w == &cmdWriter_ ? cmdWritePolling_ : outPolling_;
  if (want == polling || uv_is_closing(reinterpret_cast<uv_handle_t*>(&h))) return;
  polling = want;
  if (want)
    uv_poll_start(&h, uvEvents(w.ch->writeEvents()), &w == &cmdWriter_ ? &Backend::onCmdWritable : &Backend::onOutPoll);
  else
    uv_poll_stop(&h);
}

void Backend::flush(Timeout bound) {
  const Deadline d(bound);
  for (Writer* w : {&cmdWriter_, &outWriter_}) {
    try {
      while (!drain(*w) && w->ch->waitWritable(d)) {
      }
      if (w->queued() > 0)
        log().warn("dropping {} queued bytes at exit: the frontend did not read them within {} ms", w->queued(),
                   bound.count());
    } catch (const PeerClosed&) {
      // Nobody left to read them.
    }
  }
}

// ---------------------------------------------------------------- input

void Backend::onCmdPoll(uv_poll_t* h, int status, int events) {
  auto* self = static_cast<Backend*>(h->data);
  try {
    if (status < 0) {
      // An error on the channel is as final as EOF: nobody can command us.
      self->log().error("command channel error: {}; stopping", uv_strerror(status));
      self->frontendGone_ = true;
      self->requestStop();
      return;
    }
    if (events & UV_WRITABLE) {
      self->drain(self->cmdWriter_);
      self->updatePoll(self->cmdWriter_);
    }
  } catch (const PeerClosed&) {
    self->frontendGone_ = true;
    self->requestStop();
    return;
  } catch (const std::exception& e) {
    self->log().error("backend loop: {}", e.what());
  } catch (...) {
    self->log().error("backend loop: a non-standard exception");
  }
  if (events & (UV_READABLE | UV_DISCONNECT)) self->onCommandInput(false);
}

void Backend::onCommandInput(bool waited) {
  try {
    onCommandReadable(waited);
  } catch (const PeerClosed&) {
    frontendGone_ = true;
    requestStop();
  } catch (const std::exception& e) {
    log().error("backend loop: {}", e.what());
  } catch (...) {
    log().error("backend loop: a non-standard exception");
  }
}

void Backend::onWritable(Writer& w, int status) {
  try {
    if (status < 0 || drain(w)) updatePoll(w);
  } catch (const PeerClosed&) {
    frontendGone_ = true;
    requestStop();
  }
}

void Backend::onCmdWritable(uv_poll_t* h, int status, int) {
  auto* self = static_cast<Backend*>(h->data);
  self->onWritable(self->cmdWriter_, status);
}

void Backend::onOutPoll(uv_poll_t* h, int status, int) {
  auto* self = static_cast<Backend*>(h->data);
  self->onWritable(self->outWriter_, status);
}

void Backend::onStopBell(uv_poll_t* h, int, int) {
  auto* self = static_cast<Backend*>(h->data);
  if (self->logs(spdlog::level::debug)) self->log().debug("stop requested");
  uv_poll_stop(h);
  try {
    // Commands sent before the request are in the channel already: every
    // whole one is handled first, as if the request had queued behind them.
    // A cut frame at the end waits for nobody. Bounded, against a frontend
    // that keeps sending.
    for (int round = 0; round < 1000 && !self->stopping_; ++round) {
      if (!self->cmd_.pending()) break;
      self->onCommandReadable();
    }
  } catch (const std::exception& e) {
    self->log().error("stop: {}", e.what());
  }
  self->requestStop();
}

void Backend::onCommandReadable(bool waited) {
  // Read once, then handle every whole frame already buffered; the loop
  // wakes us again for the rest, so one burst costs one read.
  for (;;) {
    std::optional<Message> m;
    try {
      m = waited ? cmd_.tryRecvWaited() : cmd_.tryRecv();
    } catch (const StreamCorrupt& e) {
      // Nothing after this can be trusted to be a frame: end, and say why.
      const std::string why = config_.who + ": the command stream is corrupt: " + e.what();
      log().error("{}; stopping", why);
      reportFailure("", why);
      corrupt_ = true;
      requestStop();
      return;
    } catch (const PeerClosed&) {
      if (!stopping_ && logs(spdlog::level::debug)) log().debug("the frontend closed the command channel; stopping");
      frontendGone_ = true;
      requestStop();
      return;
    } catch (const DecodeError& e) {
      refuse(e, e.command(), e.id());
      continue;
    } catch (const LimitError& e) {
      refuse(e, e.command(), e.id());
      continue;
    }
    if (!m) return;
    dispatch(*m);
    if (stopping_ || !cmd_.buffered()) return;
  }
}

// A frame that came whole but was refused: its caller hears why at once.
void Backend::refuse(const Error& e, const std::string& command, std::uint64_t id) {
  if (!id) countError();  // answer() counts the others
  const std::string why = config_.who + ": refused " + (command.empty() ? "a message" : "'" + command + "'") + ": " + e.what();
  log().error("{}", why);
  if (id)
    answer(id, false, {}, why);
  else
    reportFailure(command, why);
}

void Backend::dispatch(Message& m) {
  const std::string& command = m.command();
  auto it = config_.commands.end();
  if (!control::reserved(command)) it = config_.commands.find(command);
  if (it == config_.commands.end()) {
    const std::string why = config_.who + ": unknown command '" + command + "'";
    log().error("{}", why);
    if (m.id())
      answer(m.id(), false, {}, why);
    else
      reportFailure(command, why);
    return;
  }
  if (userGone()) return;  // in-process: the object is being destroyed
  const std::uint64_t id = m.id();
  Reply reply(weak_from_this(), id, command);
  std::string why;
  try {
    Value v = it->second(m, reply);
    if (reply.wanted()) reply.resolve(std::move(v));
    return;
  } catch (const TypeError& e) {
    why = config_.who + ": " + e.what();
  } catch (const std::exception& e) {
    why = config_.who + ": c__" + command + " threw: " + e.what();
  } catch (...) {
    why = config_.who + ": c__" + command + " threw a non-standard exception";
  }
  // A call's failure is its caller's result (RemoteError there; a pool's
  // task that throws is an expected outcome, not this process's error):
  // logged at debug. A send's failure is reported as an event too, but
  // nobody may read it, so it is logged as an error here.
  if (!id)
    log().error("{}", why);
  else if (logs(spdlog::level::debug))
    log().debug("{}", why);
  reply.reject(why);
}

void Backend::run() {
  if (loopSet_)
    runShared();
  else if (!stopping_)
    uv_run(&loop_, UV_RUN_DEFAULT);
}

void Backend::runShared() {
  epoll_event ev[4];
  while (!stopping_) {
    // 0 when libuv has work due now (a timer whose time came, pending
    // callbacks, idle or closing handles), -1 when it waits for nothing but
    // descriptors. Its clock is brought up to now first: commands that keep
    // coming must not starve the timers (libuv's clock moves only in
    // uv_run, which this loop skips while only commands come).
    uv_update_time(&loop_);
    const int timeout = uv_backend_timeout(&loop_);
    if (timeout != 0 && cmd_.spin().count() > 0) {
      // Poll the queue for a while, the frontend not ringing meanwhile.
      cmd_.holdRings();
      if (detail::spinFor(cmd_.spin(), [this] { return cmd_.pending(); })) {
        onCommandInput(true);  // reading to the end arms again
        continue;
      }
      cmd_.resumeRings();  // armed again (and rung by us if bytes came after all)
    }
    const int n = ::epoll_wait(loopSet_.get(), ev, 4, timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      log().error("backend loop: cannot wait: {}; stopping", std::strerror(errno));
      requestStop();
      break;
    }
    bool libuv = n == 0 || timeout == 0;  // a timer is due, or work was
    for (int i = 0; i < n && !stopping_; ++i) {
      if (ev[i].data.u64 == kLibuv)
        libuv = true;
      else
        onCommandInput(ev[i].data.u64 == kCmdInput);
    }
    if (libuv && !stopping_) uv_run(&loop_, UV_RUN_NOWAIT);
  }
}

void Backend::requestStop() {
  stopping_ = true;
  uv_stop(&loop_);
}

// ---------------------------------------------------------------- user handles

void Backend::watch(int fd, std::function<void(int)> fn, bool writable) {
  auto ours = cmd_.descriptors();
  for (int d : out_.descriptors()) ours.push_back(d);
  if (std::find(ours.begin(), ours.end(), fd) != ours.end())
    throw Error(config_.who + ": watch__: descriptor " + std::to_string(fd) + " is forklift's own channel");
  sources_.watch(fd, [this, fn = std::move(fn)](int events) {
    if (!userGone()) fn(events);
  }, writable);
}

void Backend::unwatch(int fd) { sources_.unwatch(fd); }

std::uint64_t Backend::addTimer(Timeout delay, Timeout period, std::function<void()> fn) {
  return sources_.addTimer(delay, period, [this, fn = std::move(fn)] {
    if (!userGone()) fn();
  });
}

void Backend::cancel(std::uint64_t id) { sources_.cancel(id); }

}  // namespace detail
}  // namespace forklift
