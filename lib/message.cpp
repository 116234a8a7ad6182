#include "forklift/message.hpp"

#include <msgpack.hpp>

#include <algorithm>
#include <cstring>
#include <ostream>
#include <utility>

namespace forklift {

namespace {

// msgpack ext type that carries an Array:
//   u8 dtype, u8 rank, rank x u64 dims (little endian), then the data.
constexpr std::int8_t kArrayExt = 1;
// msgpack ext type that stands for a descriptor: u32 (little endian), its
// index in the descriptor list that travels with the message.
constexpr std::int8_t kFdExt = 2;
constexpr std::uint32_t kFdExtSize = 4;

// What a decoded message costs in memory (Limits::maxExpansion), counted the
// same way by the encoder and the decoder.
constexpr std::uint64_t kListItemCost = sizeof(Value);
constexpr std::uint64_t kMapEntryCost = sizeof(Map::value_type);

std::uint64_t decodedBudget(std::size_t encoded, const Limits& limits) {
  const auto e = static_cast<std::uint64_t>(encoded);
  const std::uint64_t r = limits.maxExpansion;
  const std::uint64_t budget = r != 0 && e > UINT64_MAX / r ? UINT64_MAX : e * r;
  return std::max<std::uint64_t>(budget, kMinDecodedBudget);
}

std::string budgetText(std::uint64_t cost, std::size_t encoded, const Limits& limits) {
  return "decoded, it would take " + std::string(cost == UINT64_MAX ? "more than " : "") + std::to_string(cost) +
         " bytes of memory, over the limit of " + std::to_string(decodedBudget(encoded, limits)) + " (" +
         std::to_string(limits.maxExpansion) + " per byte of its " + std::to_string(encoded) +
         " encoded bytes, at least " + std::to_string(kMinDecodedBudget) +
         "); send numbers in bulk as an Array (a std::vector of numbers), not as a list of Values";
}

}  // namespace

// ---------------------------------------------------------------- Message

const Value* Message::find(std::string_view name) const noexcept {
  for (const auto& [k, v] : args_)
    if (k == name) return &v;
  return nullptr;
}

Value* Message::find(std::string_view name) noexcept {
  return const_cast<Value*>(std::as_const(*this).find(name));
}

Message& Message::set(std::string name, Value v) {
  for (auto& [k, old] : args_) {
    if (k == name) {
      old = std::move(v);
      return *this;
    }
  }
  args_.emplace_back(std::move(name), std::move(v));
  return *this;
}

void Message::missing(std::string_view name) const {
  throw TypeError("command '" + command_ + "': argument '" + std::string(name) + "' is missing");
}

void Message::wrongType(std::string_view name, const TypeError& e) const {
  throw TypeError("command '" + command_ + "': argument '" + std::string(name) + "': " + e.what());
}

std::string Message::toString() const {
  std::string s = command_ + "(";
  for (std::size_t i = 0; i < args_.size(); ++i) s += (i ? ", " : "") + args_[i].first + "=" + args_[i].second.toString();
  return s + ")";
}

std::ostream& operator<<(std::ostream& os, const Message& m) { return os << m.toString(); }

// ---------------------------------------------------------------- Buffer

void Buffer::grow(std::size_t need) {
  std::size_t cap = bytes_.empty() ? 256 : bytes_.size();
  while (cap < need) cap *= 2;
  bytes_.resize(cap);
}

void Buffer::shrinkTo(std::size_t keep) {
  if (bytes_.size() > keep) {
    std::vector<char>().swap(bytes_);
    size_ = 0;
  }
}

// ---------------------------------------------------------------- encode

namespace {

// msgpack-cxx packs a double with an integral value as an integer; a Value
// keeps its kind across the wire, so doubles are always written as float64.
void packFloat64(Buffer& out, double d) {
  std::uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  char b[9];
  b[0] = static_cast<char>(0xcb);
  for (int i = 0; i < 8; ++i) b[1 + i] = static_cast<char>((bits >> (56 - 8 * i)) & 0xff);
  out.write(b, sizeof b);
}

void packArray(msgpack::packer<Buffer>& pk, const Array& a) {
  const auto rank = static_cast<std::uint8_t>(a.shape().size());
  const std::size_t size = 2 + 8u * rank + a.data().size();
  pk.pack_ext(size, kArrayExt);
  char head[2 + 8 * Array::kMaxRank];
  head[0] = static_cast<char>(a.dtype());
  head[1] = static_cast<char>(rank);
  for (std::size_t i = 0; i < rank; ++i) {
    const auto d = static_cast<std::uint64_t>(a.shape()[i]);
    for (int b = 0; b < 8; ++b) head[2 + 8 * i + b] = static_cast<char>((d >> (8 * b)) & 0xff);
  }
  pk.pack_ext_body(head, 2 + 8u * rank);
  if (!a.data().empty())
    pk.pack_ext_body(reinterpret_cast<const char*>(a.data().data()), static_cast<std::uint32_t>(a.data().size()));
}

// Packs one message and counts nesting and elements on the way, exactly as
// the decoder counts them (the envelope array is level 1, the argument map
// level 2, an argument's own list or map level 3; every list item and map
// entry is one element), so a message the sender accepts is never refused
// by a receiver with the same limits.
class Packer {
 public:
  // `fds` receives the descriptors; null where none can travel.
  Packer(Buffer& out, const Message& m, const Limits& limits, std::vector<int>* fds)
      : pk_(out), out_(out), m_(m), limits_(limits), fds_(fds),
        fdsBefore_(fds ? fds->size() : 0),
        maxFds_(std::min(limits.maxFds, kMaxFdsPerMessage)) {}

  // Memory the decoded message will take (see decodedBudget).
  std::uint64_t cost() const noexcept { return cost_; }

  // Flattened: msgpack-cxx's packer reaches Buffer::write through a member
  // function pointer (packer::append_buffer), which gcc left as a call per
  // header; inlined, each header becomes a store (BM_CodecRoundTrip:
  // 5,507 -> 4,935 instructions per round trip).
  [[gnu::flatten]] void message() {
    container(1, 3);
    cost_ += 3 * kListItemCost + m_.command().size();
    pk_.pack_array(3);
    pk_.pack_str(static_cast<std::uint32_t>(m_.command().size()));
    pk_.pack_str_body(m_.command().data(), static_cast<std::uint32_t>(m_.command().size()));
    pk_.pack_uint64(m_.id());
    const Map& args = m_.args();
    container(2, args.size());
    cost_ += args.size() * kMapEntryCost;
    pk_.pack_map(static_cast<std::uint32_t>(args.size()));
    const std::uint64_t envelope = elements_;
    for (const auto& [k, v] : args) {
      arg_ = &k;
      onlyThisArg_ = elements_ == envelope;
      fdsOfEarlierArgs_ = fdCount_;
      key(k);
      value(v, 3);
    }
  }

 private:
  void key(const std::string& k) {
    cost_ += k.size();
    pk_.pack_str(static_cast<std::uint32_t>(k.size()));
    pk_.pack_str_body(k.data(), static_cast<std::uint32_t>(k.size()));
  }

  // `level` is the nesting level a container in this position would have.
  [[gnu::flatten]] void value(const Value& v, std::uint32_t level) {
    switch (v.kind()) {
      case Value::Kind::Nil: pk_.pack_nil(); break;
      case Value::Kind::Bool: *v.getIf<bool>() ? pk_.pack_true() : pk_.pack_false(); break;
      case Value::Kind::Int: pk_.pack_int64(*v.getIf<std::int64_t>()); break;
      case Value::Kind::Double: packFloat64(out_, *v.getIf<double>()); break;
      case Value::Kind::String: {
        const auto& s = *v.getIf<std::string>();
        cost_ += s.size();
        pk_.pack_str(static_cast<std::uint32_t>(s.size()));
        pk_.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
        break;
      }
      case Value::Kind::Bytes: {
        const auto& b = *v.getIf<Bytes>();
        cost_ += b.size();
        pk_.pack_bin(static_cast<std::uint32_t>(b.size()));
        pk_.pack_bin_body(reinterpret_cast<const char*>(b.data()), static_cast<std::uint32_t>(b.size()));
        break;
      }
      case Value::Kind::List: {
        const auto& l = *v.getIf<List>();
        container(level, l.size());
        cost_ += l.size() * kListItemCost;
        pk_.pack_array(static_cast<std::uint32_t>(l.size()));
        for (const Value& e : l) value(e, level + 1);
        break;
      }
      case Value::Kind::Map: {
        const auto& m = *v.getIf<Map>();
        container(level, m.size());
        cost_ += m.size() * kMapEntryCost;
        pk_.pack_map(static_cast<std::uint32_t>(m.size()));
        for (const auto& [k, e] : m) {
          key(k);
          value(e, level + 1);
        }
        break;
      }
      case Value::Kind::Array: {
        const auto& a = *v.getIf<Array>();
        cost_ += a.data().size() + 8 * a.shape().size();
        packArray(pk_, a);
        break;
      }
      case Value::Kind::Fd: fd(*v.getIf<Fd>()); break;
    }
  }

  void fd(const Fd& f) {
    const std::string where = arg_ ? "argument '" + *arg_ + "'" : std::string("the message");
    if (!fds_)
      refuseType(where + " is a descriptor, which only a Channel can carry (this encoding has no descriptor list)");
    const int n = f.get();
    if (n < 0) refuseType(where + " is an empty descriptor (never set, or taken)");
    if (fdCount_ == maxFds_) {
      const std::string over = "more than " + std::to_string(maxFds_) + " descriptors";
      if (fdsOfEarlierArgs_ == 0) refuse(where + " carries " + over);
      refuse("the arguments up to '" + *arg_ + "' carry " + over);
    }
    const auto index = static_cast<std::uint32_t>(fdCount_++);
    fds_->push_back(n);
    char body[kFdExtSize];
    for (std::uint32_t b = 0; b < kFdExtSize; ++b) body[b] = static_cast<char>((index >> (8 * b)) & 0xff);
    pk_.pack_ext(kFdExtSize, kFdExt);
    pk_.pack_ext_body(body, kFdExtSize);
  }

  void container(std::uint32_t level, std::size_t n) {
    if (level > limits_.maxDepth)
      refuse((arg_ ? "argument '" + *arg_ + "'" : std::string("the message")) + " nests deeper than " +
             std::to_string(limits_.maxDepth) + " levels");
    elements_ += n;
    if (elements_ > limits_.maxElements) {
      const std::string over = "more than " + std::to_string(limits_.maxElements) + " elements";
      if (!arg_) refuse("the message has " + over);
      if (onlyThisArg_) refuse("argument '" + *arg_ + "' has " + over);
      refuse("the arguments up to '" + *arg_ + "' have " + over);
    }
  }

  [[noreturn]] void refuse(const std::string& why) const {
    if (fds_) fds_->resize(fdsBefore_);
    throw LimitError("cannot send '" + m_.command() + "': " + why, m_.command(), m_.id());
  }
  [[noreturn]] void refuseType(const std::string& why) const {
    if (fds_) fds_->resize(fdsBefore_);
    throw TypeError("cannot send '" + m_.command() + "': " + why);
  }

  msgpack::packer<Buffer> pk_;
  Buffer& out_;
  const Message& m_;
  const Limits& limits_;
  std::vector<int>* fds_;
  std::size_t fdsBefore_;             // fds_ as the caller gave it
  std::uint32_t maxFds_;
  std::uint32_t fdCount_ = 0;         // descriptors of this message so far
  std::uint32_t fdsOfEarlierArgs_ = 0;
  const std::string* arg_ = nullptr;  // the top-level argument being packed
  bool onlyThisArg_ = true;           // no earlier argument added elements
  std::uint64_t elements_ = 0;
  std::uint64_t cost_ = 0;
};

}  // namespace

namespace {

void encodeWith(const Message& m, Buffer& out, const Limits& limits, std::vector<int>* fds) {
  const std::size_t start = out.size();
  const std::size_t fdStart = fds ? fds->size() : 0;
  std::uint64_t cost = 0;
  try {
    Packer p(out, m, limits, fds);
    p.message();
    cost = p.cost();
  } catch (...) {
    out.truncate(start);
    if (fds) fds->resize(fdStart);
    throw;
  }
  const std::size_t size = out.size() - start;
  if (size > limits.maxBytes) {
    out.truncate(start);
    if (fds) fds->resize(fdStart);
    throw LimitError("cannot send '" + m.command() + "': message of " + std::to_string(size) +
                         " bytes exceeds the limit of " + std::to_string(limits.maxBytes) + " bytes",
                     m.command(), m.id());
  }
  if (cost > decodedBudget(size, limits)) {
    out.truncate(start);
    if (fds) fds->resize(fdStart);
    throw LimitError("cannot send '" + m.command() + "': " + budgetText(cost, size, limits), m.command(), m.id());
  }
}

}  // namespace

void encode(const Message& m, Buffer& out, const Limits& limits, std::vector<int>& fds) {
  encodeWith(m, out, limits, &fds);
}

void encode(const Message& m, Buffer& out, const Limits& limits) { encodeWith(m, out, limits, nullptr); }

void encode(const Message& m, Buffer& out) { encodeWith(m, out, Limits{}, nullptr); }

// ---------------------------------------------------------------- decode

namespace {

// One open container while parsing: a list, a map, or the envelope
// (both null), the [command, id, args] array of a well-formed message.
struct Frame {
  List* list;
  Map* map;
};

// Builds the Message straight from msgpack's SAX-style parser: no msgpack
// zone, no msgpack::object, and no Value tree for the envelope. The command,
// id and argument map of a [command, id, {args}] array go straight to where
// the Message keeps them, and every value is constructed in place in its
// parent (building a Value tree, then moving its parts into the Message,
// cost a List of three Values and two moves of every Value: about 1,000
// of the 7,000 instructions of BM_CodecRoundTrip). Anything else (another
// root, another element in the envelope) is built as before, as a Value tree
// that is checked the same way and refused at the end as not a
// [command, id, args] triple; so the errors and their texts do not change.
// Every container size is checked against the bytes left before anything is
// reserved, so memory stays proportional to the input.
//
// One builder per thread, with its msgpack parse context: msgpack::parse()
// makes a new context per call, whose stack reserves 32 entries on the heap,
// a malloc and a free per decode (~230 instructions a round trip). A decode
// never starts another on the same thread; reset() begins each one.
class MessageBuilder {
 public:
  void reset(std::size_t inputSize, const Limits& limits, std::vector<detail::UniqueFd>& fds) {
    inputSize_ = inputSize;
    limits_ = &limits;
    fds_ = &fds;
    budget_ = decodedBudget(inputSize, limits);
    cost_ = 0;
    elements_ = 0;
    frames_.clear();
    haveKey_ = false;
    envelope_ = false;
    envelopePos_ = 0;
    haveCommand_ = haveId_ = haveArgs_ = false;
    command_.clear();
    args_.clear();
    id_ = 0;
    error.clear();
    limitHit = false;
  }
  // Frees what a refused or half-built message left here (a decoded one
  // took its command and arguments): a thread keeps no memory of a message.
  void release() noexcept {
    if (generic_) {
      root_ = Value();
      for (Value& v : other_) v = Value();
      generic_ = false;
    }
    if (args_.capacity() != 0) Map().swap(args_);
    if (command_.capacity() > kKeptCommand) std::string().swap(command_);
    // A huge frame stack (a deep message with a large Limits::maxDepth) is
    // not kept for the thread's lifetime.
    if (frames_.capacity() > 64) std::vector<Frame>().swap(frames_);
  }

  std::string error;  // set when a callback refused the input
  bool limitHit = false;

  // A well-formed [command, id, args] envelope: a string, an id >= 0 and a
  // map. Then the parts can be taken.
  bool wellFormed() const { return envelope_ && haveCommand_ && haveId_ && haveArgs_ && id_ >= 0; }
  Message take() {
    Message m(std::move(command_), std::move(args_));
    m.setId(static_cast<std::uint64_t>(id_));
    return m;
  }

  void init() {}  // msgpack's context::init() calls it; reset() does the work
  bool visit_nil() { return place(nullptr) != nullptr; }
  bool visit_boolean(bool v) { return place(v) != nullptr; }
  bool visit_positive_integer(std::uint64_t v) {
    if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      return fail("integer " + std::to_string(v) + " does not fit int64");
    return place(static_cast<std::int64_t>(v)) != nullptr;
  }
  bool visit_negative_integer(std::int64_t v) { return place(v) != nullptr; }
  bool visit_float32(float v) { return place(static_cast<double>(v)) != nullptr; }
  bool visit_float64(double v) { return place(v) != nullptr; }
  bool visit_str(const char* p, std::uint32_t n) {
    if (!spend(n)) return false;
    if (expectingKey()) {
      key_ = std::string_view(p, n);  // points into the input, which outlives the parse
      haveKey_ = true;
      return true;
    }
    return place(std::string_view(p, n)) != nullptr;
  }
  bool visit_bin(const char* p, std::uint32_t n) {
    if (!spend(n)) return false;
    const auto* b = reinterpret_cast<const std::uint8_t*>(p);
    return place(Bytes(b, b + n)) != nullptr;
  }
  bool visit_ext(const char* p, std::uint32_t n) {
    if (n >= 1 && static_cast<std::int8_t>(p[0]) == kArrayExt) return decodeArray(p + 1, n - 1);
    if (n >= 1 && static_cast<std::int8_t>(p[0]) == kFdExt) return decodeFd(p + 1, n - 1);
    return fail("unknown msgpack extension type");
  }
  // Descriptors that came with the message but that nothing referred to.
  std::size_t unusedFds() const {
    std::size_t n = 0;
    for (const auto& f : *fds_) n += f.valid() ? 1 : 0;
    return n;
  }
  bool start_array(std::uint32_t n) {
    if (!reserveElements(n) || !spend(n * kListItemCost)) return false;
    if (frames_.empty() && n == 3) {  // the envelope: its parts go to their places
      envelope_ = true;
      return push({nullptr, nullptr});
    }
    List l;
    l.reserve(n);
    Value* v = place(std::move(l));
    return v && push({v->getIf<List>(), nullptr});
  }
  bool start_array_item() { return true; }
  bool end_array_item() { return true; }
  bool end_array() { frames_.pop_back(); return true; }
  bool start_map(std::uint32_t n) {
    if (!reserveElements(n) || !spend(n * kMapEntryCost)) return false;
    if (inEnvelope() && envelopePos_ == 2) {  // the arguments
      ++envelopePos_;
      haveArgs_ = true;
      args_.reserve(n);
      return push({nullptr, &args_});
    }
    Map m;
    m.reserve(n);
    Value* v = place(std::move(m));
    return v && push({nullptr, v->getIf<Map>()});
  }
  bool start_map_key() { return true; }
  bool end_map_key() {
    if (!haveKey_) return fail("map key is not a string");
    return true;
  }
  bool start_map_value() { return true; }
  bool end_map_value() { return true; }
  bool end_map() { frames_.pop_back(); return true; }
  void parse_error(std::size_t, std::size_t off) {
    if (error.empty()) error = "malformed msgpack at byte " + std::to_string(off);
  }
  void insufficient_bytes(std::size_t, std::size_t) {
    if (error.empty()) error = "truncated message";
  }

  // The command and id, read before the arguments, also when the arguments
  // were refused: "" and 0 when the input did not get that far.
  void header(std::string& command, std::uint64_t& id) const {
    if (!envelope_) return;
    if (haveCommand_) command = command_;
    if (haveId_ && id_ > 0) id = static_cast<std::uint64_t>(id_);
  }

 private:
  bool fail(std::string why) {
    if (error.empty()) error = std::move(why);
    return false;
  }
  bool failLimit(std::string why) {
    limitHit = true;
    return fail(std::move(why));
  }
  // Counts memory the decoded message takes, before it is allocated.
  bool spend(std::uint64_t bytes) {
    cost_ += bytes;
    if (cost_ > budget_) return failLimit(budgetText(cost_, inputSize_, *limits_));
    return true;
  }
  bool inEnvelope() const { return envelope_ && frames_.size() == 1; }
  bool expectingKey() const { return !frames_.empty() && frames_.back().map && !haveKey_; }
  bool reserveElements(std::uint32_t n) {
    // Each element takes at least one byte of input: a count beyond the
    // input size is a lie, and must not become a huge reserve().
    if (n > inputSize_) return fail("container claims " + std::to_string(n) + " elements in " +
                                    std::to_string(inputSize_) + " bytes");
    elements_ += n;
    if (elements_ > limits_->maxElements)
      return failLimit("has more than " + std::to_string(limits_->maxElements) + " elements");
    return true;
  }
  bool push(Frame f) {
    if (frames_.size() >= limits_->maxDepth)
      return failLimit("nests deeper than " + std::to_string(limits_->maxDepth) + " levels");
    frames_.push_back(f);
    return true;
  }
  // Places a finished value, or a new container, in its parent, constructed
  // in place from `a` (what a Value is made of). Returns where it went, null
  // when refused. Parents reserved their exact element count, so pointers
  // into them stay valid while they fill.
  template <class A>
  Value* place(A&& a) {
    if (frames_.empty()) {
      generic_ = true;
      root_ = Value(std::forward<A>(a));
      return &root_;
    }
    const Frame& f = frames_.back();
    if (f.list) return &f.list->emplace_back(std::forward<A>(a));
    if (f.map) {
      if (!haveKey_) {
        fail("map key is not a string");
        return nullptr;
      }
      haveKey_ = false;
      return &f.map->emplace_back(std::piecewise_construct, std::forward_as_tuple(key_),
                                  std::forward_as_tuple(std::forward<A>(a))).second;
    }
    // The envelope: a string first is the command, an int second the id;
    // anything else is kept aside until the message is refused.
    const std::uint32_t pos = envelopePos_++;
    if constexpr (std::is_same_v<std::decay_t<A>, std::string_view>) {
      if (pos == 0) {
        command_.assign(a);
        haveCommand_ = true;
        return &other_[0];
      }
    } else if constexpr (std::is_same_v<std::decay_t<A>, std::int64_t>) {
      if (pos == 1) {
        id_ = a;
        haveId_ = true;
        return &other_[1];
      }
    }
    generic_ = true;
    other_[pos] = Value(std::forward<A>(a));
    return &other_[pos];
  }
  bool decodeArray(const char* p, std::size_t n) {
    if (n < 2) return fail("array extension too short");
    const auto raw = static_cast<std::uint8_t>(p[0]);
    const auto rank = static_cast<std::uint8_t>(p[1]);
    if (!dtypeValid(raw)) return fail("array has invalid element type " + std::to_string(raw));
    if (rank > Array::kMaxRank) return fail("array rank " + std::to_string(rank) + " too large");
    if (n < 2 + 8u * rank) return fail("array extension too short for its shape");
    std::vector<std::int64_t> shape(rank);
    for (std::size_t i = 0; i < rank; ++i) {
      std::uint64_t d = 0;
      for (int b = 0; b < 8; ++b) d |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(p[2 + 8 * i + b])) << (8 * b);
      if (d > n) return fail("array dimension larger than the message");
      shape[i] = static_cast<std::int64_t>(d);
    }
    const char* body = p + 2 + 8 * rank;
    const std::size_t len = n - 2 - 8u * rank;
    if (!spend(len + 8u * rank)) return false;
    try {
      const auto* b = reinterpret_cast<const std::uint8_t*>(body);
      return place(Array(static_cast<DType>(raw), std::move(shape), Bytes(b, b + len))) != nullptr;
    } catch (const TypeError& e) {
      return fail(e.what());
    }
  }

  bool decodeFd(const char* p, std::size_t n) {
    if (n != kFdExtSize) return fail("descriptor extension of " + std::to_string(n) + " bytes, not " +
                                     std::to_string(kFdExtSize));
    std::uint32_t index = 0;
    for (std::uint32_t b = 0; b < kFdExtSize; ++b)
      index |= static_cast<std::uint32_t>(static_cast<std::uint8_t>(p[b])) << (8 * b);
    std::vector<detail::UniqueFd>& fds = *fds_;
    if (index >= fds.size())
      return fail("refers to descriptor " + std::to_string(index) + " but came with " +
                  std::to_string(fds.size()) + (fds.size() == 1 ? " descriptor" : " descriptors"));
    if (!fds[index]) return fail("refers to descriptor " + std::to_string(index) + " twice");
    return place(Fd(std::move(fds[index]))) != nullptr;
  }

  std::size_t inputSize_ = 0;
  const Limits* limits_ = nullptr;
  std::vector<detail::UniqueFd>* fds_ = nullptr;  // taken as the body refers to them
  std::vector<Frame> frames_;                     // the open containers, innermost last
  std::string_view key_;                          // the key of the map entry being read
  bool haveKey_ = false;
  std::uint64_t elements_ = 0;
  std::uint64_t budget_ = 0;  // memory the decoded message may take
  std::uint64_t cost_ = 0;    // memory it takes so far

  // The message, when the root is an array of three (envelope_).
  bool envelope_ = false;
  std::uint32_t envelopePos_ = 0;  // elements of the envelope placed so far
  bool haveCommand_ = false, haveId_ = false, haveArgs_ = false;
  static constexpr std::size_t kKeptCommand = 64;  // longer ones are not kept between decodes
  std::string command_;
  std::int64_t id_ = 0;
  Map args_;
  Value other_[3];  // envelope elements of another kind than expected
  Value root_;      // a root that is not an array of three
  bool generic_ = false;  // other_ or root_ holds something
};

// The builder and msgpack's parse context of this thread. The context is
// msgpack-cxx's own (msgpack::parse() makes one the same way per call), kept
// to reuse its stack.
struct ThreadParser {
  MessageBuilder builder;
  msgpack::detail::parse_helper<MessageBuilder> context{builder};
};

// Not inlined: inlined, gcc recomputed the thread-local address with a call
// to __tls_get_addr at each of ~35 uses in a decode (~1,000 instructions a
// round trip); a plain reference computes it once.
[[gnu::noinline]] ThreadParser& threadParser() {
  thread_local ThreadParser p;
  return p;
}

// msgpack::parse(data, size, off, visitor), with a context kept from one
// decode to the next: the same steps as its detail::parse_imp. Flattened,
// so that msgpack's state machine calls the builder's callbacks inline.
[[gnu::flatten]] bool parse(ThreadParser& p, const char* data, std::size_t size, std::size_t& off) {
  if (size == 0) {
    p.builder.insufficient_bytes(0, 0);
    return false;
  }
  p.context.init();
  std::size_t noff = 0;
  const msgpack::parse_return ret = p.context.execute(data, size, noff);
  off = noff;
  switch (ret) {
    case msgpack::PARSE_CONTINUE:
      p.builder.insufficient_bytes(noff - 1, noff);
      return false;
    case msgpack::PARSE_SUCCESS:
      return true;  // trailing bytes are counted by the caller
    default:
      return false;
  }
}

// Frees what the builder holds whichever way a decode ends.
struct Release {
  MessageBuilder& b;
  ~Release() { b.release(); }
};

[[noreturn]] void refuse(const std::string& why, bool limit, const std::string& command, std::uint64_t id) {
  const std::string text =
      (command.empty() ? std::string("cannot decode message: ") : "cannot decode message '" + command + "': ") + why;
  if (limit) throw LimitError(text, command, id);
  throw DecodeError(text, command, id);
}

// refuse(), with the command and id the builder read, if it got that far
// (looked up only on this path: a message that decodes pays nothing).
[[noreturn]] void refuseNamed(const MessageBuilder& b, const std::string& why, bool limit) {
  std::string command;
  std::uint64_t id = 0;
  b.header(command, id);
  refuse(why, limit, command, id);
}

}  // namespace

Message decode(const char* data, std::size_t size, const Limits& limits) {
  return decode(data, size, limits, {});
}

Message decode(const char* data, std::size_t size, const Limits& limits, std::vector<detail::UniqueFd> fds) {
  if (size > limits.maxBytes)
    throw LimitError("message of " + std::to_string(size) + " bytes exceeds the limit of " +
                     std::to_string(limits.maxBytes) + " bytes");
  ThreadParser& p = threadParser();
  MessageBuilder& b = p.builder;
  b.reset(size, limits, fds);
  const Release release{b};
  std::size_t off = 0;
  bool ok = false;
  std::string why;
  try {
    ok = parse(p, data, size, off);
    if (!ok) why = b.error.empty() ? "malformed msgpack" : b.error;
  } catch (const std::exception& e) {  // msgpack reports a few overflows by throwing
    why = e.what();
  }
  // Whatever went wrong, name the command and id if they were read: the
  // receiver can then answer the call instead of dropping it.
  if (!ok) refuseNamed(b, why, b.limitHit);
  if (off != size) refuseNamed(b, std::to_string(size - off) + " trailing bytes", false);
  if (fds.size() > std::min(limits.maxFds, kMaxFdsPerMessage))
    refuseNamed(b,
                "carries " + std::to_string(fds.size()) + " descriptors, over the limit of " +
                    std::to_string(std::min(limits.maxFds, kMaxFdsPerMessage)),
                true);
  if (const std::size_t unused = b.unusedFds())
    refuseNamed(b,
                "came with " + std::to_string(fds.size()) + " descriptors but refers to only " +
                    std::to_string(fds.size() - unused),
                false);
  if (!b.wellFormed()) refuseNamed(b, "not a [command, id, args] triple", false);
  return b.take();
}

}  // namespace forklift
