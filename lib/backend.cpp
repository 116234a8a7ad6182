#include "backend.hpp"

#include <poll.h>

#include <cstring>

namespace forklift::detail {

namespace {

void check(int r, const char* what) {
  if (r < 0) throw Error(std::string("cannot ") + what + ": " + uv_strerror(r));
}

}  // namespace

Backend::Backend(MessageProcess& owner, Channel cmd, Channel out,
                 std::function<std::shared_ptr<spdlog::logger>()> makeLog)
    : owner_(owner), makeLog_(std::move(makeLog)), cmd_(std::move(cmd)), out_(std::move(out)),
      sources_(&loop_, [this](const std::string& where, const std::exception& e) {
        log().error("{} threw: {}", where, e.what());
      }) {
  cmdWriter_.ch = &cmd_;
  outWriter_.ch = &out_;
  check(uv_loop_init(&loop_), "initialise the backend loop");
  check(uv_poll_init(&loop_, &cmdPoll_, cmd_.fd()), "watch the command channel");
  check(uv_poll_init(&loop_, &outPoll_, out_.fd()), "watch the output channel");
  // uv_poll_init made both descriptors non-blocking; tell the channels.
  cmd_.assumeNonBlocking();
  out_.assumeNonBlocking();
  cmdPoll_.data = this;
  outPoll_.data = this;
  check(uv_poll_start(&cmdPoll_, UV_READABLE, &Backend::onCmdPoll), "watch the command channel");
}

spdlog::logger& Backend::log() {
  if (!log_) log_ = makeLog_();
  return *log_;
}

Backend::~Backend() {
  closeAll();
  uv_run(&loop_, UV_RUN_DEFAULT);  // runs the close callbacks
  if (uv_loop_close(&loop_) != 0) log().warn("backend loop closed with handles still open");
}

void Backend::closeAll() {
  sources_.closeAll();
  if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&cmdPoll_))) uv_close(reinterpret_cast<uv_handle_t*>(&cmdPoll_), nullptr);
  if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&outPoll_))) uv_close(reinterpret_cast<uv_handle_t*>(&outPoll_), nullptr);
}

// ---------------------------------------------------------------- output

void Backend::sendReady() { enqueue(cmdWriter_, Message("__ready")); }

void Backend::sendFailed(const std::string& why) {
  enqueue(cmdWriter_, Message("__failed", {{"error", why}}));
  flush(std::chrono::seconds(1));
}

void Backend::sendOut(const Message& m) {
  if (frontendGone_) throw PeerClosed(owner_.whoAmI() + ": sendOut__: the frontend is gone");
  enqueue(outWriter_, m);
}

void Backend::answer(std::uint64_t id, bool ok, Value v, const std::string& error) {
  if (frontendGone_) return;
  Message m(ok ? "__ok" : "__error");
  if (ok)
    m.args().emplace_back("value", std::move(v));
  else
    m.args().emplace_back("error", error);
  m.setId(id);
  try {
    enqueue(cmdWriter_, m);
  } catch (const LimitError& e) {
    // The reply itself is too big: the caller must still hear about it.
    Message err("__error", {{"error", std::string(e.what())}});
    err.setId(id);
    enqueue(cmdWriter_, err);
  }
}

void Backend::enqueue(Writer& w, const Message& m) {
  w.frame.clear();
  Channel::encodeFrame(m, w.frame, w.ch->limits());  // LimitError: nothing queued
  const char* p = w.frame.data();
  std::size_t n = w.frame.size();
  if (w.queued() == 0) {
    // The common case: the socket takes the whole frame now, one syscall.
    const std::size_t sent = w.ch->writeSome(p, n);
    if (sent == n) return;
    p += sent;
    n -= sent;
    w.pending.clear();
    w.off = 0;
  } else if (w.queued() + n > owner_.options_.outQueueBytes) {
    // Full: wait (bounded) for the frontend to read, writing as it does.
    const Deadline d(owner_.options_.outWait);
    while (w.queued() + n > owner_.options_.outQueueBytes) {
      const bool writable = waitFor(w.ch->fd(), POLLOUT, d);
      if (writable) drain(w);
      if (!writable || d.expired()) {
        if (w.queued() + n <= owner_.options_.outQueueBytes) break;
        throw TimeoutError(owner_.whoAmI() + ": cannot send '" + m.command() + "': the frontend has not read " +
                           std::to_string(w.queued()) + " queued bytes within " +
                           std::to_string(owner_.options_.outWait.count()) + " ms");
      }
    }
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
    const std::size_t sent = w.ch->writeSome(w.pending.data() + w.off, w.queued());
    if (sent == 0) break;
    w.off += sent;
  }
  if (w.queued() == 0) {
    w.pending.clear();
    w.off = 0;
    w.pending.shrinkTo(1u << 20);
    return true;
  }
  return false;
}

void Backend::updatePoll(Writer& w) {
  const bool want = w.queued() > 0;
  if (&w == &cmdWriter_) {
    if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&cmdPoll_)))
      uv_poll_start(&cmdPoll_, UV_READABLE | (want ? UV_WRITABLE : 0), &Backend::onCmdPoll);
  } else if (want != outPolling_) {
    outPolling_ = want;
    if (want)
      uv_poll_start(&outPoll_, UV_WRITABLE, &Backend::onOutPoll);
    else
      uv_poll_stop(&outPoll_);
  }
}

void Backend::flush(Timeout bound) {
  const Deadline d(bound);
  for (Writer* w : {&cmdWriter_, &outWriter_}) {
    try {
      while (!drain(*w) && waitFor(w->ch->fd(), POLLOUT, d)) {
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
    if (events & (UV_READABLE | UV_DISCONNECT)) self->onCommandReadable();
  } catch (const PeerClosed&) {
    self->frontendGone_ = true;
    self->requestStop();
  } catch (const std::exception& e) {
    self->log().error("backend loop: {}", e.what());
  }
}

void Backend::onOutPoll(uv_poll_t* h, int status, int) {
  auto* self = static_cast<Backend*>(h->data);
  try {
    if (status < 0 || self->drain(self->outWriter_)) self->updatePoll(self->outWriter_);
  } catch (const PeerClosed&) {
    self->frontendGone_ = true;
    self->requestStop();
  }
}

void Backend::onCommandReadable() {
  // Read once, then handle every whole frame already buffered; the loop
  // wakes us again for the rest, so one burst costs one read.
  for (;;) {
    std::optional<Message> m;
    try {
      m = cmd_.tryRecv();
    } catch (const PeerClosed&) {
      if (!stopping_) log().info("the frontend closed the command channel; stopping");
      frontendGone_ = true;
      requestStop();
      return;
    } catch (const StreamCorrupt& e) {
      // Final: every later read throws it again, so nothing more can come.
      log().error("{}; stopping", e.what());
      requestStop();
      return;
    } catch (const DecodeError& e) {
      log().error("dropped a malformed command: {}", e.what());
      continue;
    } catch (const LimitError& e) {
      log().error("dropped an oversize command: {}", e.what());
      continue;
    }
    if (!m) return;
    dispatch(*m);
    if (stopping_ || !cmd_.buffered()) return;
  }
}

void Backend::dispatch(Message& m) {
  const std::string& command = m.command();
  if (command == "__stop") {
    requestStop();
    return;
  }
  auto it = owner_.handlers_.find(command);
  if (it == owner_.handlers_.end()) {
    const std::string why = owner_.whoAmI() + ": unknown command '" + command + "'";
    log().error("{}", why);
    if (m.id()) answer(m.id(), false, {}, why);
    return;
  }
  Reply reply(weak_from_this(), m.id());
  try {
    Value v = it->second(owner_, m, reply);
    if (reply.wanted()) reply.resolve(std::move(v));
  } catch (const TypeError& e) {
    const std::string why = owner_.whoAmI() + ": " + e.what();
    log().error("{}", why);
    if (reply.wanted()) reply.reject(why);
  } catch (const std::exception& e) {
    const std::string why = owner_.whoAmI() + ": c__" + command + " threw: " + e.what();
    log().error("{}", why);
    if (reply.wanted()) reply.reject(why);
  } catch (...) {
    const std::string why = owner_.whoAmI() + ": c__" + command + " threw a non-standard exception";
    log().error("{}", why);
    if (reply.wanted()) reply.reject(why);
  }
}

void Backend::run() {
  if (!stopping_) uv_run(&loop_, UV_RUN_DEFAULT);
}

void Backend::requestStop() {
  stopping_ = true;
  uv_stop(&loop_);
}

// ---------------------------------------------------------------- user handles

void Backend::watch(int fd, std::function<void(int)> fn, bool writable) {
  if (fd == cmd_.fd() || fd == out_.fd()) throw Error(owner_.whoAmI() + ": watch__: descriptor " + std::to_string(fd) + " is forklift's own channel");
  sources_.watch(fd, std::move(fn), writable);
}

void Backend::unwatch(int fd) { sources_.unwatch(fd); }

std::uint64_t Backend::addTimer(Timeout delay, Timeout period, std::function<void()> fn) {
  return sources_.addTimer(delay, period, std::move(fn));
}

void Backend::cancel(std::uint64_t id) { sources_.cancel(id); }

}  // namespace forklift::detail
