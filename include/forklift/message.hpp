// forklift - Message: a command name with named arguments, and its codec
//
// A `Message` is what the frontend sends to a backend and what a backend
// sends out: `Message("ping", {{"parameter", "gotcha!"}, {"count", 3}})`.
// It is the native form of valkka-multiprocess's `MessageObject(command,
// **kwargs)`.
//
// Reading arguments is strict. `get<T>(name)` throws `TypeError` when the
// argument is missing or has the wrong type, and the text names the command,
// the argument, the type found and the type wanted:
//   command 'ping': argument 'count': string found, int32 wanted
//
// The codec is msgpack: [command, id, {args...}]; the command and id come
// first so that a message refused for its arguments can still be answered.
// Decoding is safe against any bytes. Total size, nesting depth and element
// counts and the memory a decoded message takes are limited (`Limits`), so
// malformed or hostile input gives a `DecodeError` or `LimitError`, never a
// crash and never an allocation of more than a small multiple of the input
// (Limits::maxExpansion); both carry the command and id when they were read.
// `encode` checks the same limits, counted the same way, while it walks the
// message, so a message the sender accepts is never refused by a receiver
// with the same limits.
//
// Descriptors (`Fd` arguments) are not bytes: the body refers to each by its
// index in the message's descriptor list, which travels beside the body
// (a Channel sends it with SCM_RIGHTS). Only the overloads with a list carry
// descriptors; the others refuse a message that holds one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <iosfwd>
#include <string>
#include <string_view>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/value.hpp"

namespace forklift {

// Depth counts the envelope: the [command, id, args] array is level 1, the
// argument map level 2, an argument's own list or map level 3. Elements are
// the list items and map entries of the whole message, envelope included.
// Decoded memory counts sizeof(Value) per list item, sizeof(Map entry) per
// map entry, and the bytes of every string, key, binary and Array.
// Descriptors count every place an Fd appears; the kernel carries at most
// kMaxFdsPerMessage with one message, so a larger maxFds acts as that.
struct Limits {
  std::size_t maxBytes = 16u << 20;     // encoded size of one message
  std::uint32_t maxDepth = 32;          // nesting of lists and maps
  std::uint32_t maxElements = 1u << 20; // list items + map entries in one message
  std::uint32_t maxFds = 64;            // descriptors in one message
  // Memory one decoded message may take, per byte of its encoding (and
  // kMinDecodedBudget in any case). A list of a million one-byte nils is
  // 1 MB on the wire but 64 MB as Values: such a message is refused (a
  // LimitError on both sides) instead of costing tens of times its size.
  // Numbers in bulk belong in an Array (a std::vector of numbers becomes
  // one), which costs what it weighs.
  std::uint32_t maxExpansion = 8;
};

inline constexpr std::size_t kMinDecodedBudget = 1u << 20;

inline constexpr std::uint32_t kMaxFdsPerMessage = 253;  // Linux's SCM_MAX_FD

class Message {
 public:
  Message() = default;
  explicit Message(std::string command, Map args = {}) : command_(std::move(command)), args_(std::move(args)) {}

  const std::string& command() const noexcept { return command_; }
  const Map& args() const noexcept { return args_; }
  Map& args() noexcept { return args_; }

  bool has(std::string_view name) const noexcept { return find(name) != nullptr; }
  const Value* find(std::string_view name) const noexcept;
  Value* find(std::string_view name) noexcept;  // to move an argument out

  // Throws TypeError naming the command and argument when `name` is missing
  // or does not convert to T (see Value::as).
  template <class T>
  T get(std::string_view name) const {
    const Value* v = find(name);
    if (!v) missing(name);
    try {
      return v->as<T>();
    } catch (const TypeError& e) {
      wrongType(name, e);
    }
  }

  // As get(name) but returns `fallback` when the argument is absent. A
  // present argument of the wrong type still throws.
  template <class T>
  T get(std::string_view name, T fallback) const {
    const Value* v = find(name);
    if (!v) return fallback;
    try {
      return v->as<T>();
    } catch (const TypeError& e) {
      wrongType(name, e);
    }
  }

  // Sets (replaces or appends) an argument; returns *this for chaining.
  Message& set(std::string name, Value v);

  // Transport metadata: the id that pairs a call with its reply. 0 means
  // "no reply wanted". Users normally never touch it.
  std::uint64_t id() const noexcept { return id_; }
  void setId(std::uint64_t id) noexcept { id_ = id; }

  bool operator==(const Message& o) const {
    return command_ == o.command_ && args_ == o.args_ && id_ == o.id_;
  }

  std::string toString() const;  // "ping(parameter=\"x\", count=3)", for logs

 private:
  [[noreturn]] void missing(std::string_view name) const;
  [[noreturn]] void wrongType(std::string_view name, const TypeError& e) const;

  std::string command_;
  Map args_;
  std::uint64_t id_ = 0;
};

// Prints toString(); lets test frameworks show messages readably.
std::ostream& operator<<(std::ostream& os, const Message& m);

// A growable byte buffer that keeps its capacity across clear(), so encoding
// in a loop allocates only while it warms up. Satisfies msgpack's Stream.
class Buffer {
 public:
  void write(const char* p, std::size_t n) {
    if (n == 0) return;  // p may be null then (an empty string's data), which memcpy forbids
    if (size_ + n > bytes_.size()) grow(size_ + n);
    std::memcpy(bytes_.data() + size_, p, n);
    size_ += n;
  }
  void clear() noexcept { size_ = 0; }
  void truncate(std::size_t n) noexcept {
    if (n < size_) size_ = n;
  }
  char* data() noexcept { return bytes_.data(); }
  const char* data() const noexcept { return bytes_.data(); }
  std::size_t size() const noexcept { return size_; }
  std::size_t capacity() const noexcept { return bytes_.size(); }
  // Drops the storage when it grew past `keep` bytes (after a huge message).
  void shrinkTo(std::size_t keep);

 private:
  void grow(std::size_t need);
  std::vector<char> bytes_;
  std::size_t size_ = 0;
};

// Appends the encoding of `m` to `out`. Throws LimitError, naming the
// command and the top-level argument, and leaves `out` as it was, when `m`
// nests deeper, has more elements, carries more descriptors or encodes to
// more bytes than `limits`:
//   cannot send 'ping': argument 'tree' nests deeper than 32 levels
// The descriptors of `m` are appended to `fds` in the order the body refers
// to them; they are not owned there (valid while `m` holds them). Throws
// TypeError naming the command and argument for an empty Fd, and, in the
// overloads without `fds`, for any Fd (nothing can carry it there).
void encode(const Message& m, Buffer& out, const Limits& limits, std::vector<int>& fds);
void encode(const Message& m, Buffer& out, const Limits& limits);
void encode(const Message& m, Buffer& out);  // with the default Limits

// Decodes exactly `size` bytes into a message. Throws LimitError when the
// input breaks `limits`, DecodeError for anything else that is not one
// well-formed message; the text names the command when it was read
// ("cannot decode message 'ping': nests deeper than 32 levels"), and
// `command()` / `id()` of the error return it and the call id.
// `fds` are the descriptors that came with the body: each must be referred
// to exactly once (DecodeError otherwise). The message owns the ones it
// holds; on any error all of them are closed.
Message decode(const char* data, std::size_t size, const Limits& limits, std::vector<detail::UniqueFd> fds);
Message decode(const char* data, std::size_t size, const Limits& limits = {});

}  // namespace forklift
