// forklift - CallFuture and CallResult: calls that do not block the caller
//
// `MessageProcess::callAsync(command, args[, timeout])` sends a call and
// returns a `CallFuture` at once; many may be in flight to one backend, from
// any number of frontend threads, and replies are matched to them by id.
//
//   auto a = proc.callAsync("square", {{"x", 3}});
//   auto b = proc.callAsync("square", {{"x", 4}});
//   double s = a.get().as<double>() + b.get().as<double>();
//
// `get()` returns what the handler returned, or throws what call() would
// have thrown: RemoteError (the handler threw, unknown command, bad or
// refused arguments), TimeoutError (no reply within the call's timeout,
// counted from callAsync), ProcessDied (the backend died or stopped first;
// at once, not at the timeout). Waiting on a future reads the replies of
// every call of the same process, so no thread is needed behind it.
//
// The callback form, `callAsync(command, args, timeout, fn)`, is for code
// running on a Manager's loop: `fn(CallResult)` runs on that loop once the
// reply (or the error) is there, and the loop never blocks. For a process
// outside a Manager, `fn` runs on whichever frontend thread reads the reply
// (one waiting on another call or future of the same process).
//
// A CallFuture is movable, not copyable; a dropped future forgets its call
// (a late reply is discarded).
#pragma once

#include <cstdint>
#include <exception>
#include <memory>

#include "forklift/timeout.hpp"
#include "forklift/value.hpp"

namespace forklift {

namespace detail {
class Requests;
struct CallSlot;
}  // namespace detail

// The outcome of one call: a value, or the exception call() would throw.
// `kind()` tells which without rethrowing it:
//   Ok           the handler's value;
//   Remote       RemoteError: the handler threw, an unknown command, bad or
//                refused arguments;
//   Timeout      TimeoutError: no reply within the call's timeout (a reply
//                that comes later goes to no one);
//   ProcessDied  ProcessDied: the backend died or stopped before replying;
//   Other        anything else (a corrupt stream, a call after stop, a
//                system error).
class CallResult {
 public:
  enum class Kind : std::uint8_t { Ok, Remote, Timeout, ProcessDied, Other };

  CallResult() = default;
  explicit CallResult(Value v) : value_(std::move(v)) {}
  explicit CallResult(std::exception_ptr e);

  bool ok() const noexcept { return !error_; }
  Kind kind() const noexcept { return kind_; }
  // The value, or rethrows the error.
  const Value& get() const;
  // As get(), but moves the value out (this result then holds nil): for the
  // one who consumes it, so a large reply is not copied.
  Value take();
  std::exception_ptr error() const noexcept { return error_; }
  // The error's message ("" when ok).
  std::string what() const;

 private:
  Value value_;
  std::exception_ptr error_;
  Kind kind_ = Kind::Ok;
};

// "ok", "remote error", "timeout", "process died", "other".
const char* kindName(CallResult::Kind k) noexcept;

class CallFuture {
 public:
  CallFuture() = default;  // not valid()
  CallFuture(CallFuture&&) noexcept;
  CallFuture& operator=(CallFuture&&) noexcept;
  CallFuture(const CallFuture&) = delete;
  CallFuture& operator=(const CallFuture&) = delete;
  ~CallFuture();

  bool valid() const noexcept { return slot_ != nullptr; }
  // True once the reply or an error is there (reads waiting replies first;
  // never blocks).
  bool ready();
  // Waits up to `timeout` (at most until the call's own deadline); true when
  // ready.
  bool wait(Timeout timeout);
  // Waits until ready (bounded by the call's timeout and the backend's life)
  // and returns the value or throws. The future is still valid afterwards;
  // get() again returns or throws the same.
  Value get();
  CallResult result();  // as get(), without throwing

 private:
  friend class MessageProcess;
  CallFuture(std::shared_ptr<detail::Requests> r, std::shared_ptr<detail::CallSlot> s);
  std::shared_ptr<detail::Requests> requests_;
  std::shared_ptr<detail::CallSlot> slot_;
};

}  // namespace forklift
