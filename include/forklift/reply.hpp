// forklift - Reply: a backend's deferred answer to a call
//
// A `c__` handler that takes a `Reply` as its last parameter answers when it
// likes: from a timer, a watched descriptor, or at once. Backend side only.
//
// - `resolve(value)` answers the caller's call() with `value`;
//   `reject(text)` makes it throw RemoteError(text).
// - A Reply answers once; later resolve/reject calls do nothing.
// - A Reply destroyed (or overwritten) unanswered answers the caller with an
//   error, so no call() waits for a reply that cannot come.
// - For a command that came with send(), `wanted()` is false, resolve does
//   nothing, and reject is reported to the frontend as a CommandError event
//   (see MessageProcess::recv), so no failure goes unseen.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "forklift/value.hpp"

namespace forklift {

namespace detail {
class Backend;
}

class Reply {
 public:
  Reply() = default;
  Reply(Reply&& o) noexcept
      : backend_(std::move(o.backend_)), id_(std::exchange(o.id_, 0)), command_(std::move(o.command_)) {}
  Reply& operator=(Reply&& o) noexcept;
  Reply(const Reply&) = delete;
  Reply& operator=(const Reply&) = delete;
  ~Reply();

  // True while a caller waits for this answer.
  bool wanted() const noexcept { return id_ != 0; }
  void resolve(Value v = {});
  void reject(const std::string& error);

 private:
  friend class detail::Backend;
  Reply(std::weak_ptr<detail::Backend> b, std::uint64_t id, std::string command)
      : backend_(std::move(b)), id_(id), command_(std::move(command)) {}
  std::weak_ptr<detail::Backend> backend_;
  std::uint64_t id_ = 0;
  std::string command_;  // for the error event of a sent command
};

}  // namespace forklift
