// The C++ side of the Python tests: makes or opens forklift arrays and rings
// and exchanges their describe() descriptors with the Python test over a
// SOCK_SEQPACKET socket (its number is the first argument). A descriptor
// travels as JSON in one packet, its file descriptors beside it (SCM_RIGHTS),
// each written in the JSON as {"__fd__": <index in the packet's list>}.
//
//   peer <sock> array-make <dtype> <name|-> <dims...>  makes an array (anonymous
//        for "-", else exact-named), fills element i with i % 97, sends its
//        descriptor; after a byte from Python checks element i == i % 89
//   peer <sock> array-check        receives a descriptor, opens it, checks
//        i % 97, writes i % 89, answers one byte
//   peer <sock> array-open-name <name> <dtype> <rank>  the same, by name
//   peer <sock> ring-write <frames> <slots> <policy>  makes a uint8 720x1280x3
//        ring, sends its descriptor, waits for a byte, then commits <frames>
//        frames of pseudo-random bytes, user[0] their byte sum and user[1]
//        the sum of (row + 1) * row's byte sum; waits for a byte, exits
//   peer <sock> ring-read <frames>  receives a ring's descriptor, reads that
//        many frames and checks their sums the same way
//
// Prints what it did on stdout; an error prints "error: <what>" and exits 1.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/ring_buffer.hpp"
#include "forklift/shm.hpp"
#include "forklift/shm_tensor.hpp"

using namespace forklift;

namespace {

// --- JSON, as much as descriptors need ---------------------------------

void writeJson(const Value& v, std::string& out, std::vector<int>& fds) {
  switch (v.kind()) {
    case Value::Kind::Nil: out += "null"; break;
    case Value::Kind::Bool: out += *v.getIf<bool>() ? "true" : "false"; break;
    case Value::Kind::Int: out += std::to_string(*v.getIf<std::int64_t>()); break;
    case Value::Kind::Double: out += std::to_string(*v.getIf<double>()); break;
    case Value::Kind::String:
      out += '"';
      for (char c : *v.getIf<std::string>()) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
      }
      out += '"';
      break;
    case Value::Kind::List: {
      out += '[';
      bool first = true;
      for (const Value& e : *v.getIf<List>()) {
        if (!first) out += ',';
        first = false;
        writeJson(e, out, fds);
      }
      out += ']';
      break;
    }
    case Value::Kind::Map: {
      out += '{';
      bool first = true;
      for (const auto& [k, e] : *v.getIf<Map>()) {
        if (!first) out += ',';
        first = false;
        writeJson(Value(k), out, fds);
        out += ':';
        writeJson(e, out, fds);
      }
      out += '}';
      break;
    }
    case Value::Kind::Fd:
      out += "{\"__fd__\":" + std::to_string(fds.size()) + "}";
      fds.push_back(v.getIf<Fd>()->get());
      break;
    default: throw std::runtime_error("writeJson: a value descriptors do not have");
  }
}

struct JsonReader {
  const std::string& s;
  std::size_t i = 0;
  std::vector<Fd>& fds;

  void ws() {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  }
  char peek() {
    ws();
    if (i >= s.size()) throw std::runtime_error("json: unexpected end");
    return s[i];
  }
  void expect(char c) {
    if (peek() != c) throw std::runtime_error(std::string("json: expected ") + c + " at " + std::to_string(i));
    ++i;
  }
  std::string str() {
    expect('"');
    std::string out;
    while (i < s.size() && s[i] != '"') {
      if (s[i] == '\\') ++i;
      out += s[i++];
    }
    ++i;
    return out;
  }
  Value value() {
    const char c = peek();
    if (c == '"') return Value(str());
    if (c == '[') {
      ++i;
      List l;
      if (peek() == ']') return ++i, Value(std::move(l));
      for (;;) {
        l.push_back(value());
        if (peek() == ',') { ++i; continue; }
        expect(']');
        return Value(std::move(l));
      }
    }
    if (c == '{') {
      ++i;
      Map m;
      if (peek() == '}') return ++i, Value(std::move(m));
      for (;;) {
        std::string k = str();
        expect(':');
        Value e = value();
        if (k == "__fd__") {  // {"__fd__": n}: the packet's descriptor n
          expect('}');
          return Value(fds.at(static_cast<std::size_t>(e.as<std::int64_t>())));
        }
        m.emplace_back(std::move(k), std::move(e));
        if (peek() == ',') { ++i; continue; }
        expect('}');
        return Value(std::move(m));
      }
    }
    if (s.compare(i, 4, "true") == 0) return i += 4, Value(true);
    if (s.compare(i, 5, "false") == 0) return i += 5, Value(false);
    if (s.compare(i, 4, "null") == 0) return i += 4, Value();
    std::size_t used = 0;
    const long long n = std::stoll(s.substr(i), &used);
    i += used;
    return Value(static_cast<std::int64_t>(n));
  }
};

void sendValue(int sock, const Value& v) {
  std::string text;
  std::vector<int> fds;
  writeJson(v, text, fds);
  iovec iov{text.data(), text.size()};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  if (::sendmsg(sock, &msg, 0) < 0) throw std::runtime_error(std::string("sendmsg: ") + std::strerror(errno));
}

Value recvValue(int sock) {
  std::string buf(65536, '\0');
  std::vector<char> control(CMSG_SPACE(sizeof(int) * 16));
  iovec iov{buf.data(), buf.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  if (n <= 0) throw std::runtime_error("recvmsg: no descriptor came");
  buf.resize(static_cast<std::size_t>(n));
  std::vector<Fd> fds;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t k = 0; k < count; ++k) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof(int));
      fds.emplace_back(detail::UniqueFd(fd));
    }
  }
  JsonReader r{buf, 0, fds};
  return r.value();
}

void sendByte(int sock) {
  const char b = 'x';
  if (::send(sock, &b, 1, 0) != 1) throw std::runtime_error("send of a byte failed");
}
void awaitByte(int sock) {
  char b = 0;
  if (::recv(sock, &b, 1, 0) != 1) throw std::runtime_error("the Python side closed before its byte");
}

// --- arrays --------------------------------------------------------------

template <class F>
void forDType(DType t, F&& f) {
  switch (t) {
    case DType::I8: return f(std::int8_t{});
    case DType::U8: return f(std::uint8_t{});
    case DType::I16: return f(std::int16_t{});
    case DType::U16: return f(std::uint16_t{});
    case DType::I32: return f(std::int32_t{});
    case DType::U32: return f(std::uint32_t{});
    case DType::I64: return f(std::int64_t{});
    case DType::U64: return f(std::uint64_t{});
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    case DType::F16: return f(Eigen::half{});
  }
}

DType dtypeFrom(const std::string& name) {
  for (int i = 1; i <= 11; ++i)
    if (name == dtypeName(static_cast<DType>(i))) return static_cast<DType>(i);
  throw std::runtime_error("unknown dtype " + name);
}

std::size_t elements(const SharedMemory& shm) {
  std::size_t n = 1;
  for (auto d : shm.shape()) n *= static_cast<std::size_t>(d);
  return n;
}

void fill(SharedMemory& shm, int mod) {
  forDType(*shm.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* p = static_cast<T*>(shm.data());
    for (std::size_t i = 0, n = elements(shm); i < n; ++i) p[i] = static_cast<T>(static_cast<int>(i % mod));
  });
}

void check(const SharedMemory& shm, int mod) {
  forDType(*shm.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* p = static_cast<const T*>(shm.data());
    for (std::size_t i = 0, n = elements(shm); i < n; ++i)
      if (!(p[i] == static_cast<T>(static_cast<int>(i % mod))))
        throw std::runtime_error("element " + std::to_string(i) + " differs from " + std::to_string(i % mod));
  });
  std::cout << "verified " << elements(shm) << " elements of " << shm.describe() << std::endl;
}

// Opens an array descriptor the way ShmTensor<T, rank, layout>::open does,
// for the dtype, rank and layout the descriptor names.
SharedMemory openDescribed(const Value& d) {
  const Map& m = *d.getIf<Map>();
  std::string dtype, layout;
  std::size_t rank = 0;
  for (const auto& [k, v] : m) {
    if (k == "dtype") dtype = v.as<std::string>();
    if (k == "layout") layout = v.as<std::string>();
    if (k == "shape") rank = v.getIf<List>()->size();
  }
  return detail::openDescribedTensor(d, dtypeFrom(dtype), rank,
                                     layout == layoutName(Layout::ColMajor) ? Layout::ColMajor : Layout::RowMajor);
}

// --- rings ---------------------------------------------------------------

constexpr std::int64_t kH = 720, kW = 1280, kC = 3;

struct Sums {
  std::int64_t sum = 0;
  std::int64_t weighted = 0;
};

Sums sums(const std::uint8_t* p) {
  Sums s;
  for (std::int64_t y = 0; y < kH; ++y) {
    std::int64_t row = 0;
    for (std::int64_t x = 0; x < kW * kC; ++x) row += p[y * kW * kC + x];
    s.sum += row;
    s.weighted += (y + 1) * row;
  }
  return s;
}

void frame(std::uint8_t* p, std::uint64_t seed) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::int64_t i = 0; i < kH * kW * kC; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
}

RingPolicy policyFrom(const std::string& p) {
  for (RingPolicy r : {RingPolicy::Block, RingPolicy::DropOldest, RingPolicy::KeepLatest})
    if (p == ringPolicyName(r)) return r;
  throw std::runtime_error("unknown policy " + p);
}

int run(int argc, char** argv) {
  if (argc < 3) throw std::runtime_error("usage: peer <sock> <command> ...");
  const int sock = std::stoi(argv[1]);
  const std::string cmd = argv[2];
  if (cmd == "array-make" && argc >= 6) {
    std::vector<std::int64_t> shape;
    for (int a = 5; a < argc; ++a) shape.push_back(std::stoll(argv[a]));
    const std::string name = argv[4];
    SharedMemory shm(create_only, name == "-" ? ShmName("peer") : ShmName::exact(name), dtypeFrom(argv[3]), shape);
    fill(shm, 97);
    sendValue(sock, detail::describeTensor(shm));
    awaitByte(sock);
    check(shm, 89);
    return 0;
  }
  if (cmd == "array-check") {
    SharedMemory shm = openDescribed(recvValue(sock));
    check(shm, 97);
    fill(shm, 89);
    sendByte(sock);
    return 0;
  }
  if (cmd == "array-open-name" && argc == 6) {
    SharedMemory shm(open_only, std::string(argv[3]));
    detail::checkTensorSegment(shm, dtypeFrom(argv[4]), std::stoul(argv[5]), Layout::RowMajor);
    check(shm, 97);
    fill(shm, 89);
    sendByte(sock);
    return 0;
  }
  if (cmd == "ring-write" && argc == 6) {
    const long frames = std::stol(argv[3]);
    RingBuffer ring = RingBuffer::createArray("peer", std::stoul(argv[4]), DType::U8, {kH, kW, kC},
                                              policyFrom(argv[5]));
    RingWriter w = ring.writer();
    sendValue(sock, ring.describe());
    awaitByte(sock);
    for (long f = 0; f < frames; ++f) {
      WriteSlot s = w.reserve(Timeout(20000));
      auto* p = reinterpret_cast<std::uint8_t*>(s.data());
      frame(p, static_cast<std::uint64_t>(f) + 1);
      const Sums c = sums(p);
      s.setUser(0, c.sum);
      s.setUser(1, c.weighted);
      s.setUser(2, f);
      s.commit();
    }
    const RingStats st = w.stats();
    std::cout << "wrote " << frames << " frames, committed " << st.committed << ", drops " << st.drops << std::endl;
    awaitByte(sock);
    return 0;
  }
  if (cmd == "ring-read" && argc == 4) {
    const long frames = std::stol(argv[3]);
    RingBuffer ring = RingBuffer::open(recvValue(sock));
    RingReader r = ring.reader();
    sendByte(sock);
    for (long f = 0; f < frames; ++f) {
      auto s = r.next(Timeout(20000));
      if (!s) throw std::runtime_error("no frame " + std::to_string(f) + " within 20 s");
      const Sums c = sums(reinterpret_cast<const std::uint8_t*>(s->data()));
      if (c.sum != s->user(0) || c.weighted != s->user(1))
        throw std::runtime_error("frame " + std::to_string(f) + ": checksums differ");
      if (s->user(2) != f) throw std::runtime_error("frame " + std::to_string(f) + " came as " +
                                                    std::to_string(s->user(2)));
      s->release();
    }
    std::cout << "read " << frames << " frames, checksums ok" << std::endl;
    sendByte(sock);
    return 0;
  }
  throw std::runtime_error("unknown command or arguments: " + cmd);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cout << "error: " << e.what() << std::endl;
    return 1;
  }
}
