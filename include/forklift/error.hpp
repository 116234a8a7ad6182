// forklift - the error types thrown at the API edge
//
// Every public call that fails throws a `forklift::Error` or one of the
// subclasses below. Each names what went wrong in words a user can act on:
// the command, the argument, the process, the errno. Destructors never throw
// (except `SyncIndex`, which documents its own rule); they log instead.
//
// Which subclass to catch:
//   SystemError   an OS call failed; `code()` holds the errno.
//   TypeError     a message argument is missing or has the wrong type.
//   DecodeError   bytes that are not a valid forklift message.
//   StreamCorrupt a DecodeError that ends a channel: its byte stream lost
//                 its framing, and every later recv throws it again.
//   LimitError    a message larger, deeper or wider than the configured limit.
//   TimeoutError  a bounded wait ran out.
//   PeerClosed    the other end of a channel is gone (process exited).
//   ProcessDied   a backend process died while we waited for it.
//   RemoteError   a backend handler threw; `what()` carries its message.
//   CommandError  a RemoteError for a command sent with send(), from recv().
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

namespace forklift {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An OS call failed. The message reads "cannot <verb> <object>: <strerror>".
class SystemError : public Error {
 public:
  SystemError(int errnum, const std::string& what);
  const std::error_code& code() const noexcept { return code_; }

 private:
  std::error_code code_;
};

class TypeError : public Error {
 public:
  using Error::Error;
};

// DecodeError and LimitError from `decode` (and so from `Channel::recv`)
// carry the command and call id of the refused message when the decoder got
// that far (they come first on the wire), so a receiver can answer the call
// instead of leaving the caller to its timeout. `command()` is empty and
// `id()` is 0 when unknown; an id of 0 also means "no reply wanted".
namespace detail {
// The command and call id an error of a message names (the part DecodeError
// and LimitError share).
class MessageOrigin {
 public:
  const std::string& command() const noexcept { return command_; }
  std::uint64_t id() const noexcept { return id_; }

 protected:
  MessageOrigin(std::string command, std::uint64_t id) : command_(std::move(command)), id_(id) {}

 private:
  std::string command_;
  std::uint64_t id_;
};
}  // namespace detail

class DecodeError : public Error, public detail::MessageOrigin {
 public:
  explicit DecodeError(const std::string& what, std::string command = {}, std::uint64_t id = 0)
      : Error(what), MessageOrigin(std::move(command), id) {}
};

// The stream itself is corrupt (bad frame magic, or a frame declaring a body
// over the limit): a length-prefixed stream cannot be resynchronised safely,
// so the channel stays in this state and every later recv throws again.
class StreamCorrupt : public DecodeError {
 public:
  explicit StreamCorrupt(const std::string& what) : DecodeError(what) {}
};

class LimitError : public Error, public detail::MessageOrigin {
 public:
  explicit LimitError(const std::string& what, std::string command = {}, std::uint64_t id = 0)
      : Error(what), MessageOrigin(std::move(command), id) {}
};

class TimeoutError : public Error {
 public:
  using Error::Error;
};

class PeerClosed : public Error {
 public:
  using Error::Error;
};

// A subclass of PeerClosed: code that only cares that the other side is gone
// catches PeerClosed and sees both.
class ProcessDied : public PeerClosed {
 public:
  using PeerClosed::PeerClosed;
};

class RemoteError : public Error {
 public:
  using Error::Error;
};

// A command sent with send() failed in the backend (unknown command, bad
// argument, the handler threw, the message was refused). `recv()` throws it
// in the place of the message that would have come; `command()` names the
// command that failed.
class CommandError : public RemoteError {
 public:
  CommandError(std::string command, const std::string& what) : RemoteError(what), command_(std::move(command)) {}
  const std::string& command() const noexcept { return command_; }

 private:
  std::string command_;
};

}  // namespace forklift
