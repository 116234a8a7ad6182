// Decoding costs at most a small multiple of its input, whatever the input
// claims: hostile 1 MB bodies (a million one-byte elements, lying counts,
// deep lists of huge declared size, maps of tiny entries) are refused with a
// LimitError before they cost more than Limits::maxExpansion times their
// size, and a frame header that declares a big body costs only the bytes
// that really came. The encoder refuses the same messages, so a sender
// never sends what its receiver refuses.
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "alloc_counter.hpp"
#include "forklift/channel.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using test::contains;
using namespace std::chrono_literals;

constexpr std::size_t kMiB = 1u << 20;

std::string be32(std::uint32_t n) {
  std::string s;
  for (int i = 3; i >= 0; --i) s += static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// ["bomb", 0, {"x": <value>}]
std::string body(const std::string& value) { return std::string("\x93\xa4" "bomb\x00\x81\xa1x", 10) + value; }

struct Counted {
  std::string error;  // "" when it decoded
  long bytes = 0;     // allocated while decoding
};

Counted decodeCounted(const std::string& b, const Limits& limits = {}) {
  Counted c;
  test::g_allocBytes = 0;
  test::g_counting = true;
  try {
    const Message m = decode(b.data(), b.size(), limits);
    test::g_counting = false;
  } catch (const Error& e) {
    test::g_counting = false;
    c.error = e.what();
  }
  c.bytes = test::g_allocBytes.exchange(0);
  return c;
}

struct Bomb {
  const char* what;
  std::string body;
};

TEST(DecodeAlloc, HostileMegabyteBodiesCostASmallMultipleOfTheirSize) {
  std::vector<Bomb> bombs;
  // A million nils in one list: honest counts, 64 bytes each as Values.
  bombs.push_back({"a list of 1M nils", body("\xdd" + be32(kMiB - 16) + std::string(kMiB - 16, '\xc0'))});
  // Lists that claim as many elements as the input has bytes, nested.
  {
    std::string v;
    for (int i = 0; i < 30; ++i) v += "\xdd" + be32(kMiB - 256);
    bombs.push_back({"nested lists claiming 1M elements each", body(v + std::string(kMiB - v.size() - 16, '\xc0'))});
  }
  // A map of one-byte keys and nils: 96 bytes per 2-byte entry.
  {
    std::string v = "\xdf" + be32(kMiB / 2 - 16);
    for (std::size_t i = 0; i < kMiB / 2 - 16; ++i) v += "\xa0\xc0";
    bombs.push_back({"a map of 512k empty keys", body(v)});
  }
  // 64k sibling lists of 15 nils: each list is small, together they are
  // 60 MB of Values.
  {
    std::string v = "\xdd" + be32(kMiB / 16 - 16);
    for (std::size_t i = 0; i < kMiB / 16 - 16; ++i) v += "\x9f" + std::string(15, '\xc0');
    bombs.push_back({"64k lists of 15 nils", body(v)});
  }
  for (const auto& b : bombs) {
    SCOPED_TRACE(b.what);
    ASSERT_LE(b.body.size(), kMiB + 64);
    const Counted c = decodeCounted(b.body);
    EXPECT_TRUE(contains(c.error, "bytes of memory, over the limit")) << c.error;
    EXPECT_TRUE(contains(c.error, "as an Array"));
    EXPECT_LE(c.bytes, static_cast<long>(10 * b.body.size()))
        << "decoding " << b.body.size() << " bytes allocated " << c.bytes;
  }
}

TEST(DecodeAlloc, HonestBulkStaysWithinTheBudget) {
  // 100k doubles in a list (9 bytes each on the wire, 64 as Values): under
  // 8 per byte, so it decodes.
  std::vector<Value> doubles(100000, Value(0.5));
  const Message list("bulk", {{"x", List(doubles.begin(), doubles.end())}});
  Buffer b;
  encode(list, b);
  const Counted c = decodeCounted(std::string(b.data(), b.size()));
  EXPECT_EQ(c.error, "");
  EXPECT_LE(c.bytes, static_cast<long>(10 * b.size()));
  // The same numbers as an Array cost what they weigh.
  const Message array("bulk", {{"x", std::vector<double>(1000000, 0.5)}});
  b.clear();
  encode(array, b);
  const Counted a = decodeCounted(std::string(b.data(), b.size()));
  EXPECT_EQ(a.error, "");
  EXPECT_LE(a.bytes, static_cast<long>(2 * b.size()));
}

TEST(DecodeAlloc, TheSenderRefusesWhatTheReceiverWould) {
  // 200k small ints: 1 byte each on the wire, 64 as Values.
  const Message m("ints", {{"x", List(200000, Value(1))}});
  Buffer b;
  const std::string e = test::thrown<LimitError>([&] { encode(m, b); });
  EXPECT_TRUE(contains(e, "cannot send 'ints': decoded, it would take"));
  EXPECT_EQ(b.size(), 0u) << "a refused message leaves the buffer as it was";
  // Right under the limit both sides agree too: with a larger expansion the
  // same message goes through the encoder and the decoder.
  Limits generous;
  generous.maxExpansion = 100;
  encode(m, b, generous);
  EXPECT_EQ(decode(b.data(), b.size(), generous), m);
  const std::string d = test::thrown<LimitError>([&] { (void)decode(b.data(), b.size()); });
  EXPECT_TRUE(contains(d, "cannot decode message 'ints': decoded, it would take"));
  // Small messages are never refused for their expansion (1 MiB floor).
  const Message small("ints", {{"x", List(1000, Value(1))}});
  b.clear();
  encode(small, b);
  EXPECT_EQ(decode(b.data(), b.size()), small);
}

TEST(DecodeAlloc, AFrameHeaderThatLiesCostsOnlyTheBytesThatCame) {
  for (const std::uint32_t declared : {std::uint32_t{16u << 20}, std::uint32_t{(16u << 20) - 1}, std::uint32_t{1u << 20}}) {
    SCOPED_TRACE(declared);
    auto [w, rd] = Channel::makePair();
    std::string header = {'F', 'K', 2, 0};
    for (int i = 0; i < 4; ++i) header += static_cast<char>((declared >> (8 * i)) & 0xff);
    const std::string bytes = header + std::string(1000, '\xc0');
    ASSERT_EQ(::write(w.fd(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    test::g_allocBytes = 0;
    test::g_counting = true;
    const auto m = rd.recv(50ms);
    test::g_counting = false;
    EXPECT_FALSE(m);
    EXPECT_LE(test::g_allocBytes.exchange(0), 128 << 10) << "the receive buffer followed the declared length";
  }
}

}  // namespace
}  // namespace forklift
