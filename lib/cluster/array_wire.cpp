// forklift::cluster - arrays in a World's messages: header and checks (see array_wire.hpp).
#include "array_wire.hpp"

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <string_view>
#include <utility>

#include "forklift/shm_array.hpp"

namespace forklift::cluster::detail {

namespace {

constexpr std::size_t kMaxHintBytes = 255;

bool holds(const Value& v) noexcept {
  if (v.getIf<Fd>()) return true;
  if (const List* l = v.getIf<List>())
    return std::any_of(l->begin(), l->end(), [](const Value& e) { return holds(e); });
  if (const Map* m = v.getIf<Map>())
    return std::any_of(m->begin(), m->end(), [](const auto& kv) { return holds(kv.second); });
  return false;
}

const Value* field(const Map& m, std::string_view key) {
  for (const auto& kv : m)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

// Replaces every array descriptor under `v` by a placeholder descriptor (a
// duplicate of the segment's memfd, so the codec numbers it) and keeps the
// opened segment; any other descriptor is a TypeError.
class Collector {
 public:
  Collector(const Message& m, const ArrayLimits& limits) : m_(m), limits_(limits) {}

  void walk(Value& v, const std::string& where) {
    if (v.getIf<Fd>())
      refuse(where + " is a descriptor (a socket, a pipe, a file?), which cannot cross hosts; only a forklift "
                     "array's describe() value (ShmArray, ShmTensor) travels in a cluster message");
    if (List* l = v.getIf<List>()) {
      for (std::size_t i = 0; i < l->size(); ++i) walk((*l)[i], where + "[" + std::to_string(i) + "]");
      return;
    }
    Map* m = v.getIf<Map>();
    if (!m) return;
    const Value* fd = field(*m, "fd");
    if (!fd || !fd->getIf<Fd>()) {
      for (auto& kv : *m) walk(kv.second, where + "." + kv.first);
      return;
    }
    SharedMemory shm;
    try {
      shm = SharedMemory(open_only, v);
    } catch (const std::exception& e) {
      refuse(where + " holds a descriptor that is not a forklift array (" + e.what() +
             "); only a forklift array's describe() value (ShmArray, ShmTensor) travels in a cluster message");
    }
    if (shm.kind() != ShmKind::Array || !shm.dtype())
      refuse(where + " describes a " + shmKindName(shm.kind()) +
             " segment; only a forklift array (ShmArray, ShmTensor) travels in a cluster message");
    if (shm.bytes() > limits_.maxBytes)
      throw LimitError("cannot send '" + m_.command() + "': " + where + " is an array of " +
                           std::to_string(shm.bytes()) + " bytes, over the limit of " +
                           std::to_string(limits_.maxBytes) + " (WorldOptions::arrays.maxBytes)",
                       m_.command(), m_.id());
    total_ += shm.bytes();
    if (total_ > limits_.maxBytesPerMessage)
      throw LimitError("cannot send '" + m_.command() + "': its arrays hold more than " +
                           std::to_string(limits_.maxBytesPerMessage) +
                           " bytes together (WorldOptions::arrays.maxBytesPerMessage)",
                       m_.command(), m_.id());
    v = Value(Fd::dup(shm.fd()));
    placeholders_.push_back(v.getIf<Fd>()->get());
    arrays_.push_back(std::move(shm));
  }

  std::vector<int> placeholders_;  // descriptor numbers, as arrays_
  std::vector<SharedMemory> arrays_;

 private:
  [[noreturn]] void refuse(const std::string& why) const {
    throw TypeError("cannot send '" + m_.command() + "': " + why);
  }

  const Message& m_;
  const ArrayLimits& limits_;
  std::uint64_t total_ = 0;
};

std::string hintOf(const std::string& name) {
  // "anon.<pid>.<n>.<hint>" -> "<hint>"
  if (name.rfind(kShmAnonymousPrefix, 0) == 0) {
    std::size_t at = kShmAnonymousPrefix.size();
    for (int dots = 0; dots < 2 && at != std::string::npos; ++dots) {
      at = name.find('.', at);
      if (at != std::string::npos) ++at;
    }
    if (at != std::string::npos) return name.substr(at);
  }
  return name;
}

void putLe(char* p, std::uint64_t v, int bytes) noexcept {
  for (int b = 0; b < bytes; ++b) p[b] = static_cast<char>((v >> (8 * b)) & 0xff);
}
std::uint64_t getLe(const char* p, int bytes) noexcept {
  std::uint64_t v = 0;
  for (int b = 0; b < bytes; ++b) v |= static_cast<std::uint64_t>(static_cast<unsigned char>(p[b])) << (8 * b);
  return v;
}

std::uint64_t chunksFor(std::uint64_t bytes, std::uint64_t chunk) { return (bytes + chunk - 1) / chunk; }

bool dtypeFromName(const std::string& s, DType& out) {
  for (std::uint8_t raw = 0; raw < 32; ++raw) {
    if (!dtypeValid(raw)) continue;
    if (s == dtypeName(static_cast<DType>(raw))) {
      out = static_cast<DType>(raw);
      return true;
    }
  }
  return false;
}

// Reads one table entry and checks that it is what a World sends: "" when
// it is (its size against the limits is the caller's).
std::string readSpec(const Value& entry, ArraySpec& s) {
  const Map* m = entry.getIf<Map>();
  if (!m) return entry.typeName() + " found, map wanted";
  try {
    const auto get = [&](const char* key) -> const Value& {
      const Value* v = field(*m, key);
      if (!v) throw TypeError(std::string("field '") + key + "' is missing");
      return *v;
    };
    s.hint = get("name").as<std::string>();
    if (s.hint.size() > kMaxHintBytes) return "a name of " + std::to_string(s.hint.size()) + " bytes";
    s.hint = hintOf(s.hint);
    const auto dtype = get("dtype").as<std::string>();
    if (!dtypeFromName(dtype, s.dtype)) return "unknown dtype '" + dtype.substr(0, 32) + "'";
    const auto layout = get("layout").as<std::string>();
    if (layout == layoutName(Layout::RowMajor))
      s.layout = Layout::RowMajor;
    else if (layout == layoutName(Layout::ColMajor))
      s.layout = Layout::ColMajor;
    else
      return "unknown layout '" + layout.substr(0, 32) + "'";
    const List shape = get("shape").as<List>();
    if (shape.empty() || shape.size() > forklift::detail::kShmMaxRank)
      return "rank " + std::to_string(shape.size()) + " (1 to " + std::to_string(forklift::detail::kShmMaxRank) + ")";
    // No product of a World's array reaches 2^62 bytes; a larger one is absurd.
    constexpr std::uint64_t kAbsurd = std::uint64_t{1} << 62;
    const std::uint64_t size = dtypeSize(s.dtype);
    std::uint64_t bytes = size;
    bool absurd = false;
    s.shape.clear();
    for (const Value& d : shape) {
      const auto n = d.as<std::int64_t>();
      if (n < 0) return "negative dimension " + std::to_string(n);
      s.shape.push_back(n);
      if (n == 0) {
        bytes = 0;
        absurd = false;
      } else if (bytes != 0 && !absurd) {
        if (static_cast<std::uint64_t>(n) > kAbsurd / bytes)
          absurd = true;
        else
          bytes *= static_cast<std::uint64_t>(n);
      }
    }
    if (absurd && bytes != 0) return "shape " + Value(shape).toString() + " of " + dtype + " is absurdly large";
    const auto said = get("bytes").as<std::int64_t>();
    if (said < 0 || static_cast<std::uint64_t>(said) != bytes)
      return "says " + std::to_string(said) + " bytes, but its shape and dtype make " + std::to_string(bytes);
    s.bytes = bytes;
    const auto chunks = get("chunks").as<std::int64_t>();
    if (chunks < 0) return "a negative chunk count";
    s.chunks = static_cast<std::uint64_t>(chunks);
  } catch (const TypeError& e) {
    return e.what();
  }
  return {};
}

}  // namespace

bool isArrayHeader(const char* bytes, std::size_t size) noexcept {
  return size >= sizeof kArrayMagic && std::memcmp(bytes, kArrayMagic, sizeof kArrayMagic) == 0;
}

bool holdsDescriptor(const Message& m) noexcept {
  return std::any_of(m.args().begin(), m.args().end(), [](const auto& kv) { return holds(kv.second); });
}

PackedArrays packArrays(const Message& m, const Limits& limits, const ArrayLimits& arrays) {
  Message copy = m;  // the placeholders go in a copy; the caller's message stays as it was
  Collector c(m, arrays);
  for (auto& kv : copy.args()) c.walk(kv.second, "argument '" + kv.first + "'");

  Buffer body;
  std::vector<int> fds;
  encode(copy, body, limits, fds);
  // The codec numbers descriptors in the order it meets them: table entry i
  // is the array whose placeholder is the body's descriptor i.
  PackedArrays out;
  out.chunk = arrays.chunk;
  List table;
  for (int fd : fds) {
    const auto at = std::find(c.placeholders_.begin(), c.placeholders_.end(), fd);
    auto& shm = c.arrays_[static_cast<std::size_t>(at - c.placeholders_.begin())];
    List shape;
    for (auto d : shm.shape()) shape.emplace_back(d);
    table.emplace_back(Map{{"name", shm.name()},
                           {"dtype", dtypeName(*shm.dtype())},
                           {"shape", std::move(shape)},
                           {"layout", layoutName(shm.layout())},
                           {"bytes", static_cast<std::int64_t>(shm.bytes())},
                           {"chunks", static_cast<std::int64_t>(chunksFor(shm.bytes(), arrays.chunk))}});
    out.arrays.push_back(std::move(shm));
  }
  Buffer tableBytes;
  encode(Message("arrays", {{"chunk", static_cast<std::int64_t>(arrays.chunk)}, {"arrays", std::move(table)}}),
         tableBytes, limits);
  out.header.resize(kArrayPrefixBytes + tableBytes.size() + body.size());
  char* p = out.header.data();
  std::memcpy(p, kArrayMagic, sizeof kArrayMagic);
  putLe(p + 4, 0, 8);
  putLe(p + 12, tableBytes.size(), 4);
  std::memcpy(p + kArrayPrefixBytes, tableBytes.data(), tableBytes.size());
  std::memcpy(p + kArrayPrefixBytes + tableBytes.size(), body.data(), body.size());
  return out;
}

void setArraySeq(std::vector<char>& header, std::uint64_t seq) noexcept { putLe(header.data() + 4, seq, 8); }

ArrayHeader readArrayHeader(const char* bytes, std::size_t size, const Limits& limits, const ArrayLimits& arrays) {
  ArrayHeader h;
  if (size < kArrayPrefixBytes || !isArrayHeader(bytes, size)) {
    h.error = "an array header of " + std::to_string(size) + " bytes, shorter than its prefix";
    return h;
  }
  h.seq = getLe(bytes + 4, 8);
  const std::uint64_t tableSize = getLe(bytes + 12, 4);
  if (tableSize > size - kArrayPrefixBytes) {
    h.error = "its table of " + std::to_string(tableSize) + " bytes runs past the header's " + std::to_string(size);
    return h;
  }
  Message table;
  try {
    table = decode(bytes + kArrayPrefixBytes, tableSize, limits);
  } catch (const std::exception& e) {
    h.error = std::string("its table does not decode: ") + e.what();
    return h;
  }
  h.body = bytes + kArrayPrefixBytes + tableSize;
  h.bodySize = size - kArrayPrefixBytes - tableSize;
  try {
    if (table.command() != "arrays") {
      h.error = "its table is '" + table.command().substr(0, 32) + "', not 'arrays'";
      return h;
    }
    const auto list = table.get<List>("arrays");
    const auto chunk = table.get<std::int64_t>("chunk");
    if (chunk < static_cast<std::int64_t>(kMinArrayChunk) || chunk > static_cast<std::int64_t>(kMaxArrayChunk)) {
      h.error = "a chunk of " + std::to_string(chunk) + " bytes (" + std::to_string(kMinArrayChunk) + " to " +
                std::to_string(kMaxArrayChunk) + ")";
      return h;
    }
    h.chunk = static_cast<std::uint64_t>(chunk);
    const std::size_t maxArrays = std::min<std::size_t>(limits.maxFds, kMaxFdsPerMessage);
    if (list.empty() || list.size() > maxArrays) {
      h.error = std::to_string(list.size()) + " arrays (1 to " + std::to_string(maxArrays) + ", Limits::maxFds)";
      return h;
    }
    for (std::size_t i = 0; i < list.size(); ++i) {
      ArraySpec s;
      std::string why = readSpec(list[i], s);
      if (why.empty() && s.chunks != chunksFor(s.bytes, h.chunk))
        why = "says " + std::to_string(s.chunks) + " chunks, but " + std::to_string(s.bytes) + " bytes in chunks of " +
              std::to_string(h.chunk) + " make " + std::to_string(chunksFor(s.bytes, h.chunk));
      if (!why.empty()) {
        h.error = "array " + std::to_string(i) + ": " + why;
        return h;
      }
      h.arrays.push_back(std::move(s));
    }
  } catch (const TypeError& e) {
    h.error = std::string("its table: ") + e.what();
    return h;
  }
  // A header a World could send: its chunks follow. The limits are this
  // rank's choice, checked last.
  h.wellFormed = true;
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < h.arrays.size(); ++i) {
    const ArraySpec& s = h.arrays[i];
    h.chunks += s.chunks;
    total += s.bytes;
    if (s.bytes > arrays.maxBytes && h.refusal.empty())
      h.refusal = "array " + std::to_string(i) + " holds " + std::to_string(s.bytes) + " bytes, over the limit of " +
                  std::to_string(arrays.maxBytes) + " (WorldOptions::arrays.maxBytes)";
  }
  if (total > arrays.maxBytesPerMessage && h.refusal.empty())
    h.refusal = "its arrays hold " + std::to_string(total) + " bytes together, over the limit of " +
                std::to_string(arrays.maxBytesPerMessage) + " (WorldOptions::arrays.maxBytesPerMessage)";
  return h;
}

std::vector<SharedMemory> makeArrays(const ArrayHeader& h) {
  std::vector<SharedMemory> out;
  out.reserve(h.arrays.size());
  for (const ArraySpec& s : h.arrays) out.emplace_back(create_only, ShmName(s.hint), s.dtype, s.shape, s.layout);
  return out;
}

Message decodeWithArrays(const ArrayHeader& h, const std::vector<SharedMemory>& arrays, const Limits& limits) {
  std::vector<forklift::detail::UniqueFd> fds;
  std::vector<int> numbers;
  for (const SharedMemory& shm : arrays) {
    Fd dup = Fd::dup(shm.fd());
    numbers.push_back(dup.get());
    fds.push_back(dup.take());
  }
  Message m = decode(h.body, h.bodySize, limits, std::move(fds));
  // Each placeholder becomes its array's describe(): the same Value a
  // ShmArray or ShmTensor made on this host gives.
  std::function<void(Value&)> place = [&](Value& v) {
    if (const Fd* fd = v.getIf<Fd>()) {
      const auto at = std::find(numbers.begin(), numbers.end(), fd->get());
      if (at == numbers.end()) throw DecodeError("an array placeholder that names no array", m.command(), m.id());
      v = forklift::detail::describeArray(arrays[static_cast<std::size_t>(at - numbers.begin())]);
    } else if (List* l = v.getIf<List>()) {
      for (Value& e : *l) place(e);
    } else if (Map* mm = v.getIf<Map>()) {
      for (auto& kv : *mm) place(kv.second);
    }
  };
  for (auto& kv : m.args()) place(kv.second);
  return m;
}

}  // namespace forklift::cluster::detail
