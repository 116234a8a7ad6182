#include "requests.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <thread>
#include <utility>

#include "child.hpp"
#include "control.hpp"
#include "doorbell.hpp"
#include "metrics.hpp"
#include "posix.hpp"
#include "seams.hpp"

namespace forklift {

// ---------------------------------------------------------------- CallResult

// Classified once, when the call fails (a failure costs a throw anyway).
CallResult::CallResult(std::exception_ptr e) : error_(std::move(e)) {
  if (!error_) return;
  try {
    std::rethrow_exception(error_);
  } catch (const RemoteError&) {
    kind_ = Kind::Remote;
  } catch (const TimeoutError&) {
    kind_ = Kind::Timeout;
  } catch (const PeerClosed&) {  // ProcessDied among them
    kind_ = Kind::ProcessDied;
  } catch (...) {
    kind_ = Kind::Other;
  }
}

const char* kindName(CallResult::Kind k) noexcept {
  switch (k) {
    case CallResult::Kind::Ok: return "ok";
    case CallResult::Kind::Remote: return "remote error";
    case CallResult::Kind::Timeout: return "timeout";
    case CallResult::Kind::ProcessDied: return "process died";
    case CallResult::Kind::Other: break;
  }
  return "other";
}

const Value& CallResult::get() const {
  if (error_) std::rethrow_exception(error_);
  return value_;
}

Value CallResult::take() {
  if (error_) std::rethrow_exception(error_);
  return std::exchange(value_, Value());
}

std::string CallResult::what() const {
  if (!error_) return {};
  try {
    std::rethrow_exception(error_);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "a non-standard exception";
  }
}

// ---------------------------------------------------------------- CallFuture

CallFuture::CallFuture(std::shared_ptr<detail::Requests> r, std::shared_ptr<detail::CallSlot> s)
    : requests_(std::move(r)), slot_(std::move(s)) {}
CallFuture::CallFuture(CallFuture&&) noexcept = default;
CallFuture& CallFuture::operator=(CallFuture&& o) noexcept {
  if (this != &o) {
    if (slot_) requests_->forget(*slot_);
    requests_ = std::move(o.requests_);
    slot_ = std::move(o.slot_);
  }
  return *this;
}

CallFuture::~CallFuture() {
  if (slot_) requests_->forget(*slot_);
}

bool CallFuture::ready() {
  if (!slot_) return false;
  if (requests_->done(*slot_)) return true;
  requests_->pump();
  return requests_->done(*slot_);
}

bool CallFuture::wait(Timeout timeout) {
  if (!slot_) return false;
  const Deadline mine(timeout);
  // Past the call's own deadline the slot completes with TimeoutError.
  const Deadline& d = mine.forever() || (!slot_->deadline.forever() && slot_->deadline.at() < mine.at())
                          ? slot_->deadline
                          : mine;
  return requests_->wait(*slot_, d);
}

CallResult CallFuture::result() {
  if (!slot_) return CallResult(std::make_exception_ptr(Error("CallFuture: no call (default-made or moved from)")));
  requests_->wait(*slot_, slot_->deadline);
  return slot_->result;  // complete: wait() returns only then, the deadline included
}

Value CallFuture::get() { return result().get(); }

namespace detail {

Requests::Requests(Channel cmd, UniqueFd stopBell, int deathFd, Hooks hooks)
    : hooks_(std::move(hooks)),
      cmd_(std::move(cmd)),
      stopBell_(std::move(stopBell)),
      deathFd_(deathFd),
      // Over shared memory close() rings the channel's own doorbell, which
      // the reader waits on: the eventfd is for the socket's poll only.
      wake_(cmd_.transport() == Transport::Socket ? syscalls.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK) : -1) {
  if (cmd_.transport() == Transport::Socket && !wake_)
    throwErrno(hooks_.who + ": cannot create the calls' wake-up event");
  cmd_.watchPeer(deathFd_);
}

Requests::~Requests() {
  for (int fd : cmd_.descriptors()) frontend_fds::remove({fd});
  frontend_fds::remove({stopBell_.get()});
}

void Requests::setDispatcher(std::function<void(std::function<void()>)> dispatch) {
  std::lock_guard lock(mutex_);
  dispatch_ = std::move(dispatch);
}

// ---------------------------------------------------------------- sending

// The right to write on the channel, held for one frame. A sender that
// finds it taken polls for it with short sleeps until its deadline: the
// holder is in the middle of one send, so waits are short or hopeless.
class Requests::SendTurn {
 public:
  SendTurn(Requests& r, const Deadline& d) : lock_(r.sendMutex_, std::try_to_lock), waited_(!lock_.owns_lock()) {
    for (auto nap = std::chrono::microseconds(20); !lock_.owns_lock() && !d.expired();
         nap = std::min(nap * 2, std::chrono::microseconds(2000))) {
      std::this_thread::sleep_for(std::min<Deadline::Clock::duration>(nap, d.remaining()));
      lock_.try_lock();
    }
  }
  bool held() const noexcept { return lock_.owns_lock(); }
  // What is left of `timeout` for the send itself: all of it unless the
  // turn had to be waited for (the clock is read only then).
  Timeout left(Timeout timeout, const Deadline& d) const {
    if (!waited_ || d.forever()) return timeout;
    return std::chrono::ceil<Timeout>(d.remaining());
  }
  void release() {
    if (lock_.owns_lock()) lock_.unlock();
  }

 private:
  std::unique_lock<std::mutex> lock_;
  bool waited_;
};

std::exception_ptr Requests::endError(const End& end, const char* what, const std::string& command,
                                      bool during) const {
  if (end.error) return end.error;
  const std::string call = std::string(what) + " '" + command + "'";
  if (end.stopped && !during) return std::make_exception_ptr(Error(hooks_.who + ": " + call + " after stop"));
  return std::make_exception_ptr(ProcessDied(hooks_.who + (end.stopped ? ": the backend stopped" : ": the backend died") +
                                             (during ? " during " : " before ") + call + " (" + end.how + ")"));
}

void Requests::throwIfClosed(const char* what, const std::string& command) {
  if (!closedFlag_.load(std::memory_order_acquire)) return;
  std::lock_guard lock(mutex_);
  if (closed_) std::rethrow_exception(endError(*closed_, what, command, false));
}

void Requests::send(Message& m, Timeout timeout) {
  const Deadline d(timeout);
  SendTurn turn(*this, d);
  if (!turn.held())
    throw TimeoutError(hooks_.who + ": cannot send '" + m.command() + "' within " + std::to_string(timeout.count()) +
                       " ms: another thread's send still holds the channel");
  throwIfClosed("send", m.command());
  m.setId(0);
  try {
    cmd_.send(m, turn.left(timeout, d));
  } catch (const PeerClosed&) {
    turn.release();
    std::rethrow_exception(endError(endOfPeer(d), "send", m.command(), true));
  }
}

std::shared_ptr<CallSlot> Requests::call(Message& m, Timeout timeout, std::function<void(CallResult)> callback,
                                         bool callerWaits) {
  auto s = std::make_shared<CallSlot>();
  s->command = m.command();
  s->deadline = Deadline(timeout);
  s->timeout = timeout;
  s->callback = std::move(callback);
  SendTurn turn(*this, s->deadline);
  if (!turn.held())
    throw TimeoutError(hooks_.who + ": call '" + m.command() + "' could not be sent within " +
                       std::to_string(timeout.count()) + " ms: another thread's send still holds the channel");
  s->id = ++nextId_;
  m.setId(s->id);
  countCall();
  bool held = false;
  {
    // Checked under the lock that close() takes: a call registered after
    // the close would never complete.
    std::unique_lock l(mutex_);
    if (closed_) {
      l.unlock();
      throwIfClosed("call", m.command());
    }
    pending_.emplace(s->id, s);  // before sending: the reply may beat us back
    if (s->callback) ++callbacks_;
    // No reader now: this thread will be the one, and looks before it sleeps.
    held = callerWaits && !reading_;
    if (held) cmd_.holdRings();
  }
  try {
    cmd_.send(m, turn.left(timeout, s->deadline));
  } catch (const PeerClosed&) {
    if (held) cmd_.resumeRings();
    forget(*s);
    turn.release();
    std::rethrow_exception(endError(endOfPeer(s->deadline), "call", m.command(), true));
  } catch (...) {
    if (held) cmd_.resumeRings();
    forget(*s);
    throw;
  }
  return s;
}

void Requests::ringStop() noexcept { ringBell(stopBell_.get()); }

// ---------------------------------------------------------------- completing

void Requests::complete(CallSlot& s, CallResult r, std::vector<std::function<void()>>& ready) {
  if (s.done) return;
  s.done = true;
  s.result = std::move(r);
  if (s.callback) {
    --callbacks_;
    auto fn = std::move(s.callback);
    s.callback = nullptr;
    // Nobody else reads the result of a call with a callback.
    ready.push_back([fn = std::move(fn), res = std::move(s.result)]() mutable { fn(std::move(res)); });
  }
  pending_.erase(s.id);  // last: it may hold the only reference to s
}

void Requests::expire(std::vector<std::function<void()>>& ready) {
  std::vector<CallSlot*> late;
  for (auto& [id, s] : pending_)
    if (s->deadline.expired()) late.push_back(s.get());
  for (CallSlot* s : late)
    complete(*s,
             CallResult(std::make_exception_ptr(TimeoutError(hooks_.who + ": call '" + s->command +
                                                             "' got no reply within " +
                                                             std::to_string(s->timeout.count()) + " ms"))),
             ready);
}

void Requests::closeLocked(End end, std::vector<std::function<void()>>& ready) {
  if (!closed_) closed_ = std::move(end);
  closedFlag_.store(true, std::memory_order_release);
  std::vector<CallSlot*> all;
  for (auto& [id, s] : pending_) all.push_back(s.get());
  for (CallSlot* s : all) complete(*s, CallResult(endError(*closed_, "call", s->command, true)), ready);
  cv_.notify_all();
}

void Requests::close(End end) {
  std::vector<std::function<void()>> ready;
  {
    std::lock_guard lock(mutex_);
    closeLocked(std::move(end), ready);
  }
  if (wake_) ringBell(wake_.get());
  cmd_.wakeReader();
  run(ready);
}

void Requests::run(std::vector<std::function<void()>>& ready) {
  if (ready.empty()) return;
  std::function<void(std::function<void()>)> dispatch;
  {
    std::lock_guard lock(mutex_);
    dispatch = dispatch_;
  }
  for (auto& fn : ready) {
    if (dispatch) {
      dispatch(std::move(fn));
      continue;
    }
    try {
      fn();
    } catch (...) {
      // A callback's exception has nowhere to go on a reader's thread;
      // the loop dispatcher reports it.
    }
  }
  ready.clear();
}

Requests::End Requests::endOfPeer(const Deadline& d) {
  {
    std::lock_guard lock(mutex_);
    if (closed_) return *closed_;
  }
  End end;
  end.stopped = hooks_.stopRequested && hooks_.stopRequested();
  end.how = hooks_.describeEnd ? hooks_.describeEnd(d) : "ended";
  return end;
}

// ---------------------------------------------------------------- reading

void Requests::readTurn(const Deadline& d, Read how) {
  std::vector<std::function<void()>> ready;
  bool peerEnded = false;
  // Over shared memory the wait is the channel's epoll set (its doorbell,
  // hang-up and our death descriptor; close() rings the doorbell), and it
  // consumes the doorbell's edge, so the reads after it need no system
  // call of their own.
  bool waited = false;
  if (how == Read::Wait && cmd_.transport() == Transport::SharedMemory) {
    switch (cmd_.waitInput(d)) {  // returns at once when a message is there
      case Channel::Wake::Timeout: {
        std::lock_guard lock(mutex_);
        expire(ready);
        break;
      }
      case Channel::Wake::PeerEnd: peerEnded = true; break;
      case Channel::Wake::Input: waited = true; break;
    }
  } else if (how == Read::Wait) {
    pollfd fds[3] = {{cmd_.fd(), POLLIN, 0}, {deathFd_, POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    const int r = ::poll(fds, 3, d.pollMillis());
    if (r < 0 && errno != EINTR) throwErrno(hooks_.who + ": cannot wait for replies");
    if (r <= 0) {
      std::lock_guard lock(mutex_);
      expire(ready);
    } else {
      peerEnded = (fds[1].revents & (POLLIN | POLLHUP)) != 0;  // a death pipe hangs up
    }
  } else {
    // Over shared memory the read below sees the death itself (the death
    // descriptor is in the channel's epoll set, which an empty read looks
    // at): no poll of our own per pump.
    peerEnded = cmd_.transport() == Transport::Socket && waitFor(deathFd_, POLLIN, Deadline(Timeout::zero()));
  }
  if (ready.empty()) {
    // A reply that arrived whole but does not decode still completes its call.
    auto refused = [&](std::uint64_t id, const char* what) {
      if (id == 0) return;
      std::lock_guard lock(mutex_);
      if (auto it = pending_.find(id); it != pending_.end())
        complete(*it->second, CallResult(std::make_exception_ptr(RemoteError(hooks_.who + ": " + what))), ready);
      cv_.notify_all();
    };
    // One read takes all the socket holds; after it only whole frames
    // already buffered are taken, so a reply costs one poll and one read.
    // A dead backend's channel is read to its end.
    for (bool first = true;; first = false) {
      if (!first && !peerEnded && !cmd_.buffered()) break;
      std::optional<Message> m;
      std::exception_ptr failure;
      try {
        m = waited && !peerEnded ? cmd_.tryRecvWaited() : cmd_.tryRecv();
      } catch (const StreamCorrupt&) {
        failure = std::current_exception();
      } catch (const PeerClosed&) {
        peerEnded = true;
        break;
      } catch (const DecodeError& e) {
        refused(e.id(), e.what());
        continue;
      } catch (const LimitError& e) {
        refused(e.id(), e.what());
        continue;
      }
      if (failure) {
        std::lock_guard lock(mutex_);
        closeLocked(End{false, {}, failure}, ready);
        break;
      }
      if (!m) break;
      std::lock_guard lock(mutex_);
      auto it = pending_.find(m->id());
      if (it == pending_.end()) continue;  // the late reply of a forgotten call
      if (m->command() == control::kOk) {
        // Moved out, not copied: a reply may carry megabytes.
        Value* value = m->find("value");
        complete(*it->second, CallResult(value ? std::move(*value) : Value()), ready);
      } else {
        countError();
        complete(*it->second,
                 CallResult(std::make_exception_ptr(RemoteError(m->get<std::string>("error", "unknown remote error")))),
                 ready);
      }
      cv_.notify_all();
    }
    if (peerEnded) {
      End end = endOfPeer(d);
      std::lock_guard lock(mutex_);
      closeLocked(std::move(end), ready);
    } else {
      std::lock_guard lock(mutex_);
      expire(ready);
    }
  }
  run(ready);
}

bool Requests::wait(CallSlot& s, const Deadline& d) {
  std::unique_lock lock(mutex_);
  for (;;) {
    if (s.done) return true;
    if (closed_) {
      std::vector<std::function<void()>> ready;
      closeLocked(*closed_, ready);
      lock.unlock();
      run(ready);
      return true;
    }
    // One clock read for both deadlines.
    const auto now = s.deadline.forever() && d.forever() ? Deadline::Clock::time_point{} : Deadline::Clock::now();
    if (!s.deadline.forever() && now >= s.deadline.at()) {
      std::vector<std::function<void()>> ready;
      expire(ready);
      lock.unlock();
      run(ready);
      lock.lock();
      continue;
    }
    if (!d.forever() && now >= d.at()) return false;
    if (!reading_) {
      reading_ = true;
      lock.unlock();
      try {
        readTurn(d, Read::Wait);
      } catch (...) {
        lock.lock();
        reading_ = false;
        cv_.notify_all();
        throw;
      }
      lock.lock();
      reading_ = false;
      cv_.notify_all();  // another waiter may take the reader's turn
      continue;
    }
    if (d.forever())
      cv_.wait(lock);
    else
      cv_.wait_until(lock, d.at());
  }
}

bool Requests::done(const CallSlot& s) {
  std::lock_guard lock(mutex_);
  return s.done;
}

void Requests::forget(const CallSlot& s) {
  std::lock_guard lock(mutex_);
  if (s.done) return;
  if (s.callback) --callbacks_;
  pending_.erase(s.id);
}

void Requests::pump() {
  {
    std::lock_guard lock(mutex_);
    if (reading_) return;  // the reader routes what comes
    reading_ = true;
  }
  try {
    readTurn(Deadline(Timeout::zero()), Read::NoWait);
  } catch (...) {
    std::lock_guard lock(mutex_);
    reading_ = false;
    cv_.notify_all();
    throw;
  }
  std::lock_guard lock(mutex_);
  reading_ = false;
  cv_.notify_all();
}

std::optional<Deadline::Clock::time_point> Requests::nextCallbackDeadline() {
  if (callbacks_.load(std::memory_order_relaxed) == 0) return std::nullopt;
  std::lock_guard lock(mutex_);
  std::optional<Deadline::Clock::time_point> best;
  for (auto& [id, s] : pending_)
    if (s->callback && !s->deadline.forever() && (!best || s->deadline.at() < *best)) best = s->deadline.at();
  return best;
}

}  // namespace detail
}  // namespace forklift
