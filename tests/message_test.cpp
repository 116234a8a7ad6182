#include "forklift/message.hpp"

#include <Eigen/Core>
#include <msgpack.hpp>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <limits>
#include <random>
#include <thread>
#include <utility>

#include "support.hpp"

namespace forklift {
namespace {

Message roundTrip(const Message& m, const Limits& limits = {}) {
  Buffer b;
  encode(m, b);
  return decode(b.data(), b.size(), limits);
}

Buffer encoded(const Message& m) {
  Buffer b;
  encode(m, b);
  return b;
}

const auto errorOf = [](auto&& fn) { return test::thrown(fn); };

TEST(Message, FindOnAMutableMessageLetsAnArgumentBeMovedOut) {
  Message m("reply", {{"value", Bytes(4096, 1)}, {"other", 2}});
  Value* v = m.find("value");
  ASSERT_NE(v, nullptr);
  const std::uint8_t* at = v->getIf<Bytes>()->data();
  const Value taken = std::move(*v);
  EXPECT_EQ(taken.getIf<Bytes>()->data(), at);
  EXPECT_EQ(m.find("missing"), nullptr);
  EXPECT_EQ(std::as_const(m).find("other")->as<std::int64_t>(), 2);
}

TEST(Message, EveryValueKindRoundTrips) {
  Message m("ping", {{"nil", nullptr},
                     {"yes", true},
                     {"no", false},
                     {"int", 3},
                     {"neg", -1234567890123LL},
                     {"big", std::int64_t{1} << 62},
                     {"double", 2.5},
                     {"string", "gotcha!"},
                     {"empty", ""},
                     {"bytes", Bytes{0, 1, 2, 255}},
                     {"list", List{1, "two", 3.0, List{}}},
                     {"map", Map{{"a", 1}, {"b", Map{{"c", "d"}}}}},
                     {"array", std::vector<float>{1.5f, -2.0f, 3.25f}}});
  m.setId(42);
  const Message out = roundTrip(m);
  EXPECT_EQ(out, m);
  EXPECT_EQ(out.command(), "ping");
  EXPECT_EQ(out.id(), 42u);
  EXPECT_TRUE(out.get<Value>("nil").isNil());
  EXPECT_TRUE(out.get<bool>("yes"));
  EXPECT_FALSE(out.get<bool>("no"));
  EXPECT_EQ(out.get<int>("int"), 3);
  EXPECT_EQ(out.get<std::int64_t>("neg"), -1234567890123LL);
  EXPECT_EQ(out.get<double>("double"), 2.5);
  EXPECT_EQ(out.get<std::string>("string"), "gotcha!");
  EXPECT_EQ(out.get<Bytes>("bytes"), (Bytes{0, 1, 2, 255}));
  EXPECT_EQ(out.get<List>("list").size(), 4u);
  EXPECT_EQ(out.get<Map>("map")[1].second.as<Map>()[0].second.as<std::string>(), "d");
  EXPECT_EQ(out.get<std::vector<float>>("array"), (std::vector<float>{1.5f, -2.0f, 3.25f}));
}

TEST(Message, IntegralDoublesStayDoubles) {
  const Message out = roundTrip(Message("d", {{"x", 3.0}, {"y", -0.0}, {"n", 3}}));
  EXPECT_EQ(out.get<Value>("x").kind(), Value::Kind::Double);
  EXPECT_EQ(out.get<Value>("y").kind(), Value::Kind::Double);
  EXPECT_EQ(out.get<Value>("n").kind(), Value::Kind::Int);
}

TEST(Message, NoArgumentsRoundTrip) {
  const Message m("stop");
  EXPECT_EQ(roundTrip(m), m);
  EXPECT_TRUE(roundTrip(m).args().empty());
}

TEST(Message, EigenMatricesRoundTripInEitherStorageOrder) {
  Eigen::MatrixXd a(3, 4);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) a(i, j) = i * 10 + j;
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> b(2, 5);
  b.setRandom();
  Eigen::Matrix3i c;
  c << 1, 2, 3, 4, 5, 6, 7, 8, 9;
  const Message out = roundTrip(Message("m", {{"a", a}, {"b", b}, {"c", c}}));
  EXPECT_EQ(out.get<Eigen::MatrixXd>("a"), a);
  EXPECT_EQ((out.get<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>("b")), b);
  EXPECT_EQ(out.get<Eigen::Matrix3i>("c"), c);
  // Row-major on the wire, like numpy: element (0, 1) is the second value.
  const Array arr = out.get<Array>("a");
  EXPECT_EQ(arr.shape(), (std::vector<std::int64_t>{3, 4}));
  EXPECT_EQ(reinterpret_cast<const double*>(arr.data().data())[1], 1.0);
  EXPECT_EQ(arr.describe(), "float64[3x4]");
}

TEST(Message, EveryArrayElementTypeRoundTrips) {
  const Message m("t", {{"i8", std::vector<std::int8_t>{-1, 2}},
                        {"u8", std::vector<std::uint8_t>{255, 0}},
                        {"i16", std::vector<std::int16_t>{-300}},
                        {"u16", std::vector<std::uint16_t>{65535}},
                        {"i32", std::vector<std::int32_t>{-70000}},
                        {"u32", std::vector<std::uint32_t>{4000000000u}},
                        {"i64", std::vector<std::int64_t>{-(std::int64_t{1} << 40)}},
                        {"u64", std::vector<std::uint64_t>{~std::uint64_t{0}}},
                        {"f32", std::vector<float>{}},
                        {"f64", std::vector<double>{1e300}}});
  const Message out = roundTrip(m);
  EXPECT_EQ(out, m);
  EXPECT_EQ(out.get<std::vector<std::uint64_t>>("u64")[0], ~std::uint64_t{0});
  EXPECT_TRUE(out.get<std::vector<float>>("f32").empty());
}

TEST(Message, MissingArgumentNamesCommandAndArgument) {
  const Message m("ping", {{"parameter", "x"}});
  EXPECT_EQ(errorOf([&] { (void)m.get<std::string>("count"); }),
            "command 'ping': argument 'count' is missing");
  EXPECT_THROW((void)m.get<int>("count"), TypeError);
}

TEST(Message, WrongTypeNamesFoundAndWanted) {
  const Message m("ping", {{"count", "three"}, {"ratio", 0.5}, {"n", 300}, {"neg", -1}, {"flag", 1}});
  EXPECT_EQ(errorOf([&] { (void)m.get<int>("count"); }),
            "command 'ping': argument 'count': string found, int32 wanted");
  // No silent narrowing: a double is not an int, 300 is not an int8, -1 is
  // not unsigned, 1 is not a bool.
  EXPECT_EQ(errorOf([&] { (void)m.get<std::int64_t>("ratio"); }),
            "command 'ping': argument 'ratio': double found, int64 wanted");
  EXPECT_EQ(errorOf([&] { (void)m.get<std::int8_t>("n"); }),
            "command 'ping': argument 'n': int 300 found, int8 wanted (out of range)");
  EXPECT_EQ(errorOf([&] { (void)m.get<unsigned>("neg"); }),
            "command 'ping': argument 'neg': int -1 found, uint32 wanted (out of range)");
  EXPECT_EQ(errorOf([&] { (void)m.get<bool>("flag"); }),
            "command 'ping': argument 'flag': int found, bool wanted");
  EXPECT_EQ(errorOf([&] { (void)m.get<std::vector<double>>("count"); }),
            "command 'ping': argument 'count': string found, list or array wanted");
  // Widening is allowed.
  EXPECT_EQ(m.get<double>("n"), 300.0);
}

TEST(Message, ArrayTypeMismatchIsAnError) {
  const Message m("a", {{"v", std::vector<float>{1, 2}}, {"m", Eigen::MatrixXd::Zero(2, 2).eval()}});
  EXPECT_EQ(errorOf([&] { (void)m.get<std::vector<double>>("v"); }),
            "command 'a': argument 'v': array float32[2] found, array<float64> of rank 1 wanted");
  EXPECT_EQ(errorOf([&] { (void)m.get<Eigen::Matrix3d>("m"); }),
            "command 'a': argument 'm': array of 2x2 does not fit a fixed-size matrix of 3x3");
  EXPECT_THROW((void)m.get<Eigen::MatrixXf>("m"), TypeError);
}

TEST(Message, FallbackOnlyForMissing) {
  const Message m("ping", {{"count", "three"}});
  EXPECT_EQ(m.get<int>("absent", 7), 7);
  EXPECT_THROW((void)m.get<int>("count", 7), TypeError);
}

TEST(Message, SetReplacesOrAppends) {
  Message m("x", {{"a", 1}});
  m.set("a", 2).set("b", "c");
  EXPECT_EQ(m.get<int>("a"), 2);
  EXPECT_EQ(m.get<std::string>("b"), "c");
  EXPECT_EQ(m.args().size(), 2u);
  EXPECT_EQ(m.toString(), "x(a=2, b=\"c\")");
}

TEST(Message, UnsignedBeyondInt64IsRefused) {
  EXPECT_THROW(Value(~std::uint64_t{0}), TypeError);
  EXPECT_NO_THROW(Value(std::uint64_t{1} << 62));
}

TEST(Message, InvalidArrayShapeIsRefused) {
  EXPECT_EQ(errorOf([] { Array(DType::F64, {2, 2}, Bytes(8)); }),
            "array: float64[2x2] needs 4 elements of 8 bytes, got 8 bytes");
  EXPECT_THROW(Array(DType::U8, {1, 1, 1, 1, 1, 1, 1, 1, 1}, Bytes(1)), TypeError);
  EXPECT_THROW(Array(DType::U8, {-1}, Bytes{}), TypeError);
}

TEST(Decode, SizeLimit) {
  const Message m("big", {{"s", std::string(1000, 'x')}});
  Limits l;
  l.maxBytes = 100;
  const Buffer b = encoded(m);
  EXPECT_THROW(decode(b.data(), b.size(), l), LimitError);
  EXPECT_EQ(errorOf([&] { decode(b.data(), b.size(), l); }),
            "message of " + std::to_string(b.size()) + " bytes exceeds the limit of 100 bytes");
}

Value nested(int levels) {
  Value v = 1;
  for (int i = 0; i < levels; ++i) v = List{v};
  return v;
}

Buffer encodedWith(const Message& m, const Limits& l) {
  Buffer b;
  encode(m, b, l);
  return b;
}

TEST(Decode, DepthLimit) {
  Limits lax;
  lax.maxDepth = 64;
  const Buffer b = encodedWith(Message("deep", {{"v", nested(40)}}), lax);
  EXPECT_THROW(decode(b.data(), b.size()), LimitError);
  EXPECT_NO_THROW(decode(b.data(), b.size(), lax));
}

TEST(Decode, ElementLimit) {
  List l(5000, Value(1));
  const Buffer b = encoded(Message("wide", {{"l", l}}));
  Limits lim;
  lim.maxElements = 1000;
  EXPECT_THROW(decode(b.data(), b.size(), lim), LimitError);
  EXPECT_NO_THROW(decode(b.data(), b.size()));
}

// The command and id come before the arguments on the wire, so a message
// refused for its arguments still says which call it was.
TEST(Decode, WireLayoutIsCommandIdArgs) {
  Message m("ping", {{"a", 1}});
  m.setId(5);
  const Buffer b = encoded(m);
  const msgpack::object_handle h = msgpack::unpack(b.data(), b.size());
  const msgpack::object& o = h.get();
  ASSERT_EQ(o.type, msgpack::type::ARRAY);
  ASSERT_EQ(o.via.array.size, 3u);
  EXPECT_EQ(o.via.array.ptr[0].as<std::string>(), "ping");
  EXPECT_EQ(o.via.array.ptr[1].as<std::uint64_t>(), 5u);
  EXPECT_EQ(o.via.array.ptr[2].type, msgpack::type::MAP);
}

TEST(Decode, RefusedArgumentsStillNameTheCommandAndId) {
  Limits lax;
  lax.maxDepth = 64;
  Message deep("ping", {{"tree", nested(40)}});
  deep.setId(9);
  const Buffer d = encodedWith(deep, lax);
  try {
    (void)decode(d.data(), d.size());
    FAIL() << "no error";
  } catch (const LimitError& e) {
    EXPECT_EQ(std::string(e.what()), "cannot decode message 'ping': nests deeper than 32 levels");
    EXPECT_EQ(e.command(), "ping");
    EXPECT_EQ(e.id(), 9u);
  }

  Message wide("sum", {{"l", List(5000, Value(1))}});
  wide.setId(10);
  const Buffer w = encoded(wide);
  Limits narrow;
  narrow.maxElements = 1000;
  try {
    (void)decode(w.data(), w.size(), narrow);
    FAIL() << "no error";
  } catch (const LimitError& e) {
    EXPECT_EQ(std::string(e.what()), "cannot decode message 'sum': has more than 1000 elements");
    EXPECT_EQ(e.command(), "sum");
    EXPECT_EQ(e.id(), 10u);
  }

  // Malformed arguments: a DecodeError, again with the command and id.
  Buffer bad;
  msgpack::packer<Buffer> pk(bad);
  pk.pack_array(3);
  pk.pack_str(3);
  pk.pack_str_body("set", 3);
  pk.pack_uint64(11);
  pk.pack_map(1);
  pk.pack_int(5);
  pk.pack_int(6);
  try {
    (void)decode(bad.data(), bad.size());
    FAIL() << "no error";
  } catch (const DecodeError& e) {
    EXPECT_EQ(std::string(e.what()), "cannot decode message 'set': map key is not a string");
    EXPECT_EQ(e.command(), "set");
    EXPECT_EQ(e.id(), 11u);
  }

  // Nothing readable: no command, id 0.
  const char junk[] = {'\xc1'};
  try {
    (void)decode(junk, sizeof junk);
    FAIL() << "no error";
  } catch (const DecodeError& e) {
    EXPECT_EQ(e.command(), "");
    EXPECT_EQ(e.id(), 0u);
  }
}

TEST(Encode, RefusesTooDeepOrTooWideNamingTheArgument) {
  Buffer b;
  b.write("abc", 3);  // what was there before stays
  Message m("ping", {{"n", 1}, {"tree", nested(40)}});
  m.setId(3);
  try {
    encode(m, b);
    FAIL() << "no error";
  } catch (const LimitError& e) {
    EXPECT_EQ(std::string(e.what()), "cannot send 'ping': argument 'tree' nests deeper than 32 levels");
    EXPECT_EQ(e.command(), "ping");
    EXPECT_EQ(e.id(), 3u);
  }
  EXPECT_EQ(std::string(b.data(), b.size()), "abc");

  Limits l;
  l.maxElements = 1000;
  EXPECT_EQ(errorOf([&] { encode(Message("sum", {{"l", List(2000, Value(1))}}), b, l); }),
            "cannot send 'sum': argument 'l' has more than 1000 elements");
  EXPECT_EQ(errorOf([&] {
              encode(Message("sum", {{"a", List(600, Value(1))}, {"b", Map{{"x", List(600, Value(1))}}}}), b, l);
            }),
            "cannot send 'sum': the arguments up to 'b' have more than 1000 elements");
  Map many;
  for (int i = 0; i < 1200; ++i) many.emplace_back("k" + std::to_string(i), i);
  EXPECT_EQ(errorOf([&] { encode(Message("cfg", many), b, l); }),
            "cannot send 'cfg': the message has more than 1000 elements");
  EXPECT_EQ(b.size(), 3u);
}

// Sender and receiver count depth and elements the same way: at every size
// around the limits, encode accepts exactly what decode accepts.
TEST(Encode, AcceptsExactlyWhatDecodeAccepts) {
  Limits l;
  l.maxDepth = 8;
  l.maxElements = 50;
  Limits lax;
  lax.maxDepth = 100;
  lax.maxElements = 1000;
  int accepted = 0, refused = 0;
  const auto agree = [&](const Message& m) {
    const Buffer raw = encodedWith(m, lax);
    bool decodes = true;
    try {
      (void)decode(raw.data(), raw.size(), l);
    } catch (const LimitError&) {
      decodes = false;
    }
    Buffer out;
    bool encodes = true;
    try {
      encode(m, out, l);
    } catch (const LimitError&) {
      encodes = false;
    }
    ++(encodes ? accepted : refused);
    return encodes == decodes;
  };
  for (int depth = 0; depth < 12; ++depth) {
    EXPECT_TRUE(agree(Message("d", {{"v", nested(depth)}}))) << "depth " << depth;
    EXPECT_TRUE(agree(Message("d", {{"m", Map{{"k", nested(depth)}}}}))) << "map depth " << depth;
  }
  for (int n = 40; n < 52; ++n) {
    EXPECT_TRUE(agree(Message("w", {{"l", List(static_cast<std::size_t>(n), Value(1))}}))) << n << " elements";
    EXPECT_TRUE(agree(Message("w", {{"a", 1}, {"m", Map{{"x", List(static_cast<std::size_t>(n - 6), Value(1))}}}})))
        << n << " elements";
  }
  EXPECT_GT(accepted, 10);  // the loops cross both limits
  EXPECT_GT(refused, 10);
}

TEST(Decode, ContainerCountBeyondInputIsRefusedWithoutAllocating) {
  // array32 claiming 4 billion elements, in 5 bytes.
  const char bytes[] = {'\xdd', '\xff', '\xff', '\xff', '\xff'};
  EXPECT_EQ(errorOf([&] { decode(bytes, sizeof bytes); }),
            "cannot decode message: container claims 4294967295 elements in 5 bytes");
  // str32 claiming 4 GiB: truncated, not allocated.
  const char str[] = {'\x93', '\xdb', '\xff', '\xff', '\xff', '\xff', 'a'};
  EXPECT_THROW(decode(str, sizeof str), DecodeError);
}

TEST(Decode, NotAMessageShape) {
  Buffer b;
  msgpack::packer<Buffer> pk(b);
  pk.pack_array(2);
  pk.pack_int(1);
  pk.pack_int(2);
  EXPECT_EQ(errorOf([&] { decode(b.data(), b.size()); }),
            "cannot decode message: not a [command, id, args] triple");
  const Buffer good = encoded(Message("x"));
  std::string withTrailer(good.data(), good.size());
  withTrailer += '\x01';
  EXPECT_EQ(errorOf([&] { decode(withTrailer.data(), withTrailer.size()); }),
            "cannot decode message 'x': 1 trailing bytes");
}

// Starts a [command "x", id 0, {one entry}] message by hand, up to the entry.
void packOneEntryMessage(msgpack::packer<Buffer>& pk) {
  pk.pack_array(3);
  pk.pack_str(1);
  pk.pack_str_body("x", 1);
  pk.pack_uint64(0);
  pk.pack_map(1);
}

TEST(Decode, NonStringMapKeyIsRefused) {
  Buffer b;
  msgpack::packer<Buffer> pk(b);
  packOneEntryMessage(pk);
  pk.pack_int(5);
  pk.pack_int(6);
  EXPECT_EQ(errorOf([&] { decode(b.data(), b.size()); }), "cannot decode message 'x': map key is not a string");
}

TEST(Decode, BadArrayExtensionIsRefused) {
  Buffer b;
  msgpack::packer<Buffer> pk(b);
  packOneEntryMessage(pk);
  pk.pack_str(1);
  pk.pack_str_body("a", 1);
  const char ext[] = {static_cast<char>(DType::F64), 1, 2, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3};  // 2 doubles, 3 bytes
  pk.pack_ext(sizeof ext, 1);
  pk.pack_ext_body(ext, sizeof ext);
  EXPECT_THROW(decode(b.data(), b.size()), DecodeError);
}

// Thousands of random and truncated inputs: every one either decodes or
// throws one of our errors. Under ASan/UBSan this also proves no overflow.
TEST(Decode, RandomAndTruncatedBytesNeverCrash) {
  std::mt19937 rng(12345);
  const Message sample("ping", {{"parameter", "gotcha!"}, {"count", 3}, {"list", List{1, 2.5, "x", Map{{"k", nullptr}}}},
                                {"arr", std::vector<double>{1, 2, 3}}, {"bytes", Bytes{1, 2, 3}}});
  const Buffer good = encoded(sample);
  int decoded = 0, refused = 0;
  auto tryDecode = [&](const char* p, std::size_t n) {
    try {
      (void)decode(p, n);
      ++decoded;
    } catch (const DecodeError&) {
      ++refused;
    } catch (const LimitError&) {
      ++refused;
    }
  };
  for (std::size_t n = 0; n < good.size(); ++n) tryDecode(good.data(), n);  // every truncation
  EXPECT_EQ(decoded, 0);
  std::string mutated(good.data(), good.size());
  for (int i = 0; i < 3000; ++i) {
    std::string s = mutated;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) s[rng() % s.size()] = static_cast<char>(rng());
    tryDecode(s.data(), s.size());
  }
  for (int i = 0; i < 3000; ++i) {
    std::string s(rng() % 64, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    tryDecode(s.data(), s.size());
  }
  EXPECT_EQ(decoded + refused, static_cast<int>(good.size()) + 6000);
  EXPECT_GT(refused, 3000);
}

// ---------------------------------------------------------------- descriptors

detail::UniqueFd anEventFd(std::uint64_t value = 0) {
  detail::UniqueFd fd(::eventfd(static_cast<unsigned>(value), EFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  return fd;
}

// The same open file (inode and device), whatever the descriptor number.
bool sameFile(int a, int b) {
  struct stat sa {}, sb {};
  return ::fstat(a, &sa) == 0 && ::fstat(b, &sb) == 0 && sa.st_ino == sb.st_ino && sa.st_dev == sb.st_dev;
}

TEST(Fd, CopiesShareOneDescriptorClosedByTheLast) {
  const int before = test::openFdCount();
  {
    Fd a(anEventFd());
    const int n = a.get();
    EXPECT_GE(n, 0);
    Fd b = a;
    Value v(b);
    EXPECT_EQ(test::openFdCount(), before + 1);
    EXPECT_EQ(v.as<Fd>().get(), n);
    EXPECT_EQ(v.kind(), Value::Kind::Fd);
    EXPECT_EQ(v.typeName(), "fd");
    EXPECT_EQ(v.toString(), "fd(" + std::to_string(n) + ")");
    EXPECT_EQ(a, b);
    EXPECT_NE(a, Fd(anEventFd()));
  }
  EXPECT_EQ(test::openFdCount(), before);
}

TEST(Fd, TakeMovesTheDescriptorOutOfEveryCopy) {
  const int before = test::openFdCount();
  Fd a(anEventFd());
  const Value v(a);
  detail::UniqueFd mine = v.takeFd();
  EXPECT_TRUE(mine.valid());
  EXPECT_FALSE(a.valid());
  EXPECT_EQ(a.get(), -1);
  EXPECT_EQ(v.toString(), "fd(empty)");
  EXPECT_FALSE(a.take().valid());  // taken already
  EXPECT_EQ(test::openFdCount(), before + 1);
  mine.reset();
  EXPECT_EQ(test::openFdCount(), before);
  EXPECT_EQ(errorOf([] { (void)Value(3).takeFd(); }), "int found, fd wanted");
  EXPECT_EQ(errorOf([] { (void)Value(3).as<Fd>(); }), "int found, fd wanted");
}

TEST(Fd, DupKeepsTheOriginalAndRefusesAClosedDescriptor) {
  detail::UniqueFd orig = anEventFd();
  const Fd copy = Fd::dup(orig.get());
  EXPECT_NE(copy.get(), orig.get());
  EXPECT_TRUE(sameFile(copy.get(), orig.get()));
  EXPECT_TRUE(::fcntl(copy.get(), F_GETFD) & FD_CLOEXEC);
  EXPECT_THROW((void)Fd::dup(-1), SystemError);
  EXPECT_FALSE(Fd(detail::UniqueFd()).valid());
}

TEST(Message, DescriptorsRoundTripThroughTheirList) {
  const int before = test::openFdCount();
  {
    detail::UniqueFd a = anEventFd(1), b = anEventFd(2);
    const int an = a.get(), bn = b.get();
    const Message m("use", {{"a", std::move(a)}, {"n", 7}, {"more", List{Map{{"b", std::move(b)}}}}});
    Buffer out;
    std::vector<int> fds{42};  // appended to, never cleared
    encode(m, out, Limits{}, fds);
    ASSERT_EQ(fds, (std::vector<int>{42, an, bn}));
    // The receiver's own descriptors for the same files (dups here).
    std::vector<detail::UniqueFd> got;
    got.emplace_back(::fcntl(an, F_DUPFD_CLOEXEC, 0));
    got.emplace_back(::fcntl(bn, F_DUPFD_CLOEXEC, 0));
    const Message back = decode(out.data(), out.size(), Limits{}, std::move(got));
    const Fd ra = back.get<Fd>("a");
    const Fd rb = back.get<List>("more")[0].as<Map>()[0].second.as<Fd>();
    EXPECT_TRUE(sameFile(ra.get(), an));
    EXPECT_TRUE(sameFile(rb.get(), bn));
    EXPECT_NE(ra.get(), an);
    EXPECT_EQ(back.get<int>("n"), 7);
    EXPECT_EQ(test::openFdCount(), before + 4);
  }
  EXPECT_EQ(test::openFdCount(), before);  // the decoded message closed its own
}

TEST(Message, ADescriptorCannotTravelWithoutAList) {
  Buffer out;
  const Message m("use", {{"n", 1}, {"fd", anEventFd()}});
  EXPECT_EQ(errorOf([&] { encode(m, out); }),
            "cannot send 'use': argument 'fd' is a descriptor, which only a Channel can carry (this encoding has "
            "no descriptor list)");
  EXPECT_THROW(encode(m, out), TypeError);
  EXPECT_EQ(out.size(), 0u);
  // The receiving side refuses a reference it has no descriptor for.
  std::vector<int> fds;
  encode(m, out, Limits{}, fds);
  EXPECT_EQ(errorOf([&] { (void)decode(out.data(), out.size()); }),
            "cannot decode message 'use': refers to descriptor 0 but came with 0 descriptors");
}

TEST(Message, AnEmptyDescriptorIsRefusedByName) {
  Buffer out;
  std::vector<int> fds;
  Fd f(anEventFd());
  f.take();
  EXPECT_EQ(errorOf([&] { encode(Message("use", {{"fd", f}}), out, Limits{}, fds); }),
            "cannot send 'use': argument 'fd' is an empty descriptor (never set, or taken)");
  EXPECT_THROW(encode(Message("use", {{"fd", Fd()}}), out, Limits{}, fds), TypeError);
  EXPECT_EQ(out.size(), 0u);
  EXPECT_TRUE(fds.empty());
}

TEST(Message, TooManyDescriptorsIsALimitErrorNamingTheArgument) {
  Limits l;
  l.maxFds = 3;
  const Fd f(anEventFd());
  Buffer out;
  std::vector<int> fds;
  EXPECT_EQ(errorOf([&] { encode(Message("use", {{"fds", List(4, Value(f))}}), out, l, fds); }),
            "cannot send 'use': argument 'fds' carries more than 3 descriptors");
  EXPECT_EQ(errorOf([&] { encode(Message("use", {{"a", List(2, Value(f))}, {"b", List(2, Value(f))}}), out, l, fds); }),
            "cannot send 'use': the arguments up to 'b' carry more than 3 descriptors");
  EXPECT_EQ(out.size(), 0u);
  EXPECT_TRUE(fds.empty());
  encode(Message("use", {{"fds", List(3, Value(f))}}), out, l, fds);  // the limit itself is fine
  EXPECT_EQ(fds.size(), 3u);
  // The kernel's own bound caps a larger setting.
  l.maxFds = 1000;
  out.clear();
  fds.clear();
  try {
    encode(Message("use", {{"fds", List(254, Value(f))}}), out, l, fds);
    ADD_FAILURE() << "254 descriptors were accepted";
  } catch (const LimitError& e) {
    EXPECT_TRUE(test::contains(e.what(), "more than 253 descriptors"));
    EXPECT_EQ(e.command(), "use");
  }
}

TEST(Message, DecodeClosesEveryDescriptorOfARefusedMessage) {
  const int before = test::openFdCount();
  const Fd f(anEventFd());
  Buffer out;
  std::vector<int> fds;
  encode(Message("use", {{"a", f}, {"b", f}}), out, Limits{}, fds);
  auto received = [&](std::size_t n) {
    std::vector<detail::UniqueFd> v;
    for (std::size_t i = 0; i < n; ++i) v.emplace_back(::fcntl(f.get(), F_DUPFD_CLOEXEC, 0));
    return v;
  };
  // Fewer than referred to, more than referred to, over this side's limit.
  EXPECT_EQ(errorOf([&] { (void)decode(out.data(), out.size(), Limits{}, received(1)); }),
            "cannot decode message 'use': refers to descriptor 1 but came with 1 descriptor");
  EXPECT_EQ(errorOf([&] { (void)decode(out.data(), out.size(), Limits{}, received(3)); }),
            "cannot decode message 'use': came with 3 descriptors but refers to only 2");
  Limits one;
  one.maxFds = 1;
  try {
    (void)decode(out.data(), out.size(), one, received(2));
    ADD_FAILURE() << "over the limit was accepted";
  } catch (const LimitError& e) {
    EXPECT_EQ(std::string(e.what()), "cannot decode message 'use': carries 2 descriptors, over the limit of 1");
    EXPECT_EQ(e.command(), "use");
  }
  // A body that refers to one descriptor twice.
  Buffer twice;
  static const char body[] = "\x93\xa3use\x00\x82\xa1" "a\xd6\x02\x00\x00\x00\x00\xa1" "b\xd6\x02\x00\x00\x00\x00";
  twice.write(body, sizeof body - 1);
  EXPECT_EQ(errorOf([&] { (void)decode(twice.data(), twice.size(), Limits{}, received(1)); }),
            "cannot decode message 'use': refers to descriptor 0 twice");
  EXPECT_EQ(test::openFdCount(), before + 1);  // only f
}


// ---------------------------------------------------------------- decode into place
// The decoder builds a well-formed [command, id, {args}] straight into the
// Message and anything else as a Value tree it then refuses; these cases try
// each envelope position with each wrong kind, and the per-thread state that
// one decode leaves for the next.

struct Refusal {
  std::string what;
  std::string command;
  std::uint64_t id = 0;
  bool limit = false;
};

Refusal refusalOf(const Buffer& b, const Limits& limits = {}) {
  try {
    (void)decode(b.data(), b.size(), limits);
  } catch (const LimitError& e) {
    return {e.what(), e.command(), e.id(), true};
  } catch (const DecodeError& e) {
    return {e.what(), e.command(), e.id(), false};
  }
  ADD_FAILURE() << "decoded";
  return {};
}

// An envelope of three elements, each packed by one of these.
using Pack = std::function<void(msgpack::packer<Buffer>&)>;
Buffer envelope(const Pack& first, const Pack& second, const Pack& third) {
  Buffer b;
  msgpack::packer<Buffer> pk(b);
  pk.pack_array(3);
  first(pk);
  second(pk);
  third(pk);
  return b;
}
const Pack kCmd = [](msgpack::packer<Buffer>& pk) { pk.pack_str(4); pk.pack_str_body("ping", 4); };
const Pack kId7 = [](msgpack::packer<Buffer>& pk) { pk.pack_uint64(7); };
const Pack kArgs = [](msgpack::packer<Buffer>& pk) {
  pk.pack_map(1);
  pk.pack_str(1);
  pk.pack_str_body("a", 1);
  pk.pack_int(1);
};
const Pack kNil = [](msgpack::packer<Buffer>& pk) { pk.pack_nil(); };
const Pack kInt = [](msgpack::packer<Buffer>& pk) { pk.pack_int(3); };
const Pack kNeg = [](msgpack::packer<Buffer>& pk) { pk.pack_int(-1); };
// Not integral: msgpack-cxx packs an integral double as an integer.
const Pack kDouble = [](msgpack::packer<Buffer>& pk) { pk.pack_double(7.5); };
const Pack kStr = [](msgpack::packer<Buffer>& pk) { pk.pack_str(1); pk.pack_str_body("s", 1); };
const Pack kBin = [](msgpack::packer<Buffer>& pk) { pk.pack_bin(1); pk.pack_bin_body("b", 1); };
const Pack kList = [](msgpack::packer<Buffer>& pk) { pk.pack_array(2); pk.pack_int(1); pk.pack_str(1); pk.pack_str_body("x", 1); };
const Pack kMap = [](msgpack::packer<Buffer>& pk) {
  pk.pack_map(1);
  pk.pack_str(1);
  pk.pack_str_body("k", 1);
  pk.pack_array(0);
};

TEST(DecodeInPlace, EachEnvelopePositionOfAnotherKindIsNotATriple) {
  const std::string notTriple = "not a [command, id, args] triple";
  struct Case {
    const char* what;
    Buffer body;
    std::string command;  // what the error names
    std::uint64_t id;
  };
  std::vector<Case> cases;
  for (const Pack* wrong : {&kNil, &kInt, &kNeg, &kDouble, &kBin, &kList, &kMap})
    cases.push_back({"command of another kind", envelope(*wrong, kId7, kArgs), "", 7});
  for (const Pack* wrong : {&kNil, &kNeg, &kDouble, &kStr, &kBin, &kList, &kMap})
    cases.push_back({"id of another kind", envelope(kCmd, *wrong, kArgs), "ping", 0});
  for (const Pack* wrong : {&kNil, &kInt, &kDouble, &kStr, &kBin, &kList})
    cases.push_back({"arguments of another kind", envelope(kCmd, kId7, *wrong), "ping", 7});
  cases.push_back({"everything of another kind", envelope(kList, kMap, kList), "", 0});
  cases.push_back({"command and arguments swapped", envelope(kArgs, kId7, kCmd), "", 7});
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const Refusal r = refusalOf(c.body);
    EXPECT_FALSE(r.limit);
    EXPECT_EQ(r.what, "cannot decode message" + (c.command.empty() ? std::string() : " '" + c.command + "'") +
                          ": " + notTriple);
    EXPECT_EQ(r.command, c.command);
    EXPECT_EQ(r.id, c.id);
  }
}

TEST(DecodeInPlace, OtherRootsAreNotATriple) {
  std::vector<Buffer> roots;
  for (const Pack* p : {&kNil, &kInt, &kStr, &kBin, &kList, &kMap, &kArgs}) {
    Buffer b;
    msgpack::packer<Buffer> pk(b);
    (*p)(pk);
    roots.push_back(b);
  }
  for (std::uint32_t n : {0u, 1u, 2u, 4u}) {  // arrays of other lengths, a message's parts first
    Buffer b;
    msgpack::packer<Buffer> pk(b);
    pk.pack_array(n);
    const Pack* parts[] = {&kCmd, &kId7, &kArgs, &kNil};
    for (std::uint32_t i = 0; i < n; ++i) (*parts[i])(pk);
    roots.push_back(b);
  }
  for (const Buffer& b : roots) {
    const Refusal r = refusalOf(b);
    EXPECT_EQ(r.what, "cannot decode message: not a [command, id, args] triple");
    EXPECT_EQ(r.command, "");
    EXPECT_EQ(r.id, 0u);
  }
}

// An error inside an envelope element of another kind is still the first
// error reported, with what was read before it.
TEST(DecodeInPlace, ErrorsInsideAnEnvelopeElementOfAnotherKindComeFirst) {
  const Pack deep = [](msgpack::packer<Buffer>& pk) {
    for (int i = 0; i < 40; ++i) pk.pack_array(1);
    pk.pack_int(1);
  };
  Refusal r = refusalOf(envelope(deep, kId7, kArgs));
  EXPECT_TRUE(r.limit);
  EXPECT_EQ(r.what, "cannot decode message: nests deeper than 32 levels");
  EXPECT_EQ(r.id, 0u);  // the id comes after the refused element
  r = refusalOf(envelope(kCmd, deep, kArgs));
  EXPECT_EQ(r.what, "cannot decode message 'ping': nests deeper than 32 levels");
  EXPECT_EQ(r.command, "ping");
  const Pack badKey = [](msgpack::packer<Buffer>& pk) {
    pk.pack_map(1);
    pk.pack_int(1);
    pk.pack_int(2);
  };
  r = refusalOf(envelope(kCmd, kId7, [&](msgpack::packer<Buffer>& pk) {
    pk.pack_array(1);
    badKey(pk);
  }));
  EXPECT_EQ(r.what, "cannot decode message 'ping': map key is not a string");
  EXPECT_EQ(r.id, 7u);
  // An id over int64 is refused where it is read.
  r = refusalOf(envelope(kCmd, [](msgpack::packer<Buffer>& pk) { pk.pack_uint64(1ull << 63); }, kArgs));
  EXPECT_EQ(r.what, "cannot decode message 'ping': integer 9223372036854775808 does not fit int64");
  EXPECT_EQ(r.id, 0u);
}

TEST(DecodeInPlace, LongStringsKeysAndTheLargestIdRoundTrip) {
  const std::string longCommand(300, 'c');  // past the short-string buffer
  const std::string longKey(70000, 'k');    // str32 on the wire
  Message m(longCommand, {{longKey, std::string(100, 'v')},
                          {"", ""},
                          {"dup", 1},
                          {"dup", 2},  // duplicate keys stay, in order
                          {"nested", Map{{longKey, Map{{"", List{Map{{"x", List{}}}, Map{}}}}}}}});
  m.setId(static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()));
  const Message out = roundTrip(m);
  EXPECT_EQ(out, m);
  EXPECT_EQ(out.args()[3].second.as<int>(), 2);
}

TEST(DecodeInPlace, DepthAndElementLimitsAtTheirEdges) {
  Limits l;
  l.maxDepth = 5;  // envelope 1, args 2, then three more levels
  EXPECT_NO_THROW(roundTrip(Message("d", {{"v", nested(3)}}), l));
  EXPECT_THROW(roundTrip(Message("d", {{"v", nested(4)}}), l), LimitError);
  // Elements: 3 in the envelope, 1 argument, then the list's items.
  Limits e;
  e.maxElements = 3 + 1 + 10;
  EXPECT_NO_THROW(roundTrip(Message("w", {{"l", List(10, Value(1))}}), e));
  const Buffer over = encoded(Message("w", {{"l", List(11, Value(1))}}));
  const Refusal r = refusalOf(over, e);
  EXPECT_TRUE(r.limit);
  EXPECT_EQ(r.what, "cannot decode message 'w': has more than 14 elements");
}

// What one decode leaves behind (a half-built message, an open container, a
// tree of another shape) never shows in the next.
TEST(DecodeInPlace, EveryDecodeStartsClean) {
  Message good("ok", {{"a", List{1, Map{{"b", "c"}}}}, {"d", Bytes{1, 2}}});
  good.setId(3);
  const Buffer g = encoded(good);
  Limits lax;
  lax.maxDepth = 64;
  const std::vector<Buffer> bad = {
      encodedWith(Message("deep", {{"t", nested(40)}, {"after", 1}}), lax),
      envelope(kList, kId7, kArgs),
      envelope(kCmd, kId7, kList),
      [] {
        Buffer b;
        msgpack::packer<Buffer> pk(b);
        kMap(pk);
        return b;
      }(),
      Buffer(),
  };
  for (int round = 0; round < 3; ++round) {
    for (const Buffer& b : bad) {
      EXPECT_ANY_THROW(decode(b.data(), b.size()));
      const Message out = decode(g.data(), g.size());
      EXPECT_EQ(out, good);
    }
    // A truncated good message at every length, then the whole one.
    for (std::size_t n = 0; n < g.size(); ++n) EXPECT_ANY_THROW(decode(g.data(), n));
    EXPECT_EQ(decode(g.data(), g.size()), good);
  }
}

// Each thread decodes with its own state.
TEST(DecodeInPlace, ThreadsDecodeAtTheSameTime) {
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &wrong] {
      for (int i = 0; i < 2000; ++i) {
        Message m("t" + std::to_string(t), {{"i", i}, {"l", List{t, std::string(20 + t, 'x')}}});
        m.setId(static_cast<std::uint64_t>(i));
        Buffer b;
        encode(m, b);
        if (i % 7 == 0) {
          try {
            (void)decode(b.data(), b.size() - 1);
            ++wrong;
          } catch (const DecodeError&) {
          }
        }
        if (!(decode(b.data(), b.size()) == m)) ++wrong;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
}

}  // namespace
}  // namespace forklift
