#include "forklift/shm_array.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "forklift/channel.hpp"
#include "forklift/message.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using test::exitCodeOf;
using test::forkChild;
using test::waitChild;

using test::contains;
using test::thrown;

bool exists(const std::string& name) {
  struct stat st {};
  return ::stat(("/dev/shm/" + name).c_str(), &st) == 0;
}

// A value per element that differs for every (i, j) and, for signed and
// floating types, is negative or fractional somewhere.
template <class T>
T valueAt(Eigen::Index i, Eigen::Index j, int round) {
  const auto base = static_cast<long long>(i * 10 + j + round * 3);
  if constexpr (std::is_same_v<T, Eigen::half>) return T(static_cast<float>(base) * 0.5f - 7.25f);  // exact in half
  else if constexpr (std::is_floating_point_v<T>) return static_cast<T>(base) * T(0.5) - T(7.25);
  else if constexpr (std::is_signed_v<T>) return static_cast<T>(base - 20);
  else return static_cast<T>(base + (std::numeric_limits<T>::max() - 100));
}

template <class T, Layout L>
struct Case {
  using Scalar = T;
  static constexpr Layout kLayout = L;
};

template <class C>
class ShmArrayAcrossFork : public ::testing::Test {};

using Cases = ::testing::Types<
    Case<std::int8_t, Layout::RowMajor>, Case<std::uint8_t, Layout::RowMajor>,
    Case<std::int16_t, Layout::RowMajor>, Case<std::uint16_t, Layout::RowMajor>,
    Case<std::int32_t, Layout::RowMajor>, Case<std::uint32_t, Layout::RowMajor>,
    Case<std::int64_t, Layout::RowMajor>, Case<std::uint64_t, Layout::RowMajor>,
    Case<float, Layout::RowMajor>, Case<double, Layout::RowMajor>, Case<Eigen::half, Layout::RowMajor>,
    Case<std::int8_t, Layout::ColMajor>, Case<std::uint8_t, Layout::ColMajor>,
    Case<std::int16_t, Layout::ColMajor>, Case<std::uint16_t, Layout::ColMajor>,
    Case<std::int32_t, Layout::ColMajor>, Case<std::uint32_t, Layout::ColMajor>,
    Case<std::int64_t, Layout::ColMajor>, Case<std::uint64_t, Layout::ColMajor>,
    Case<float, Layout::ColMajor>, Case<double, Layout::ColMajor>, Case<Eigen::half, Layout::ColMajor>>;
TYPED_TEST_SUITE(ShmArrayAcrossFork, Cases);

// The frontend writes, the backend opens by name, checks every element and
// the storage order of the raw memory, then writes back; a 3x5 shape so
// rows and columns cannot be confused.
TYPED_TEST(ShmArrayAcrossFork, BackendReadsWhatFrontendWroteAndBack) {
  using T = typename TypeParam::Scalar;
  constexpr Layout L = TypeParam::kLayout;
  auto a = ShmArray<T, L>::create("xfork", 3, 5);
  ASSERT_EQ(a.rows(), 3);
  ASSERT_EQ(a.cols(), 5);
  EXPECT_EQ(a.size(), 15);
  EXPECT_EQ(a.bytes(), 15 * sizeof(T));
  EXPECT_EQ(a.segment().dtype(), dtypeOf<T>());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a.data()) % 64, 0u);
  auto m = a.matrix();
  for (Eigen::Index i = 0; i < 3; ++i)
    for (Eigen::Index j = 0; j < 5; ++j) m(i, j) = valueAt<T>(i, j, 0);

  const std::string name = a.name();
  const pid_t pid = forkChild([&] {
    auto b = ShmArray<T, L>::open(name);
    if (b.rows() != 3 || b.cols() != 5) return 3;
    if (b.segment().owns()) return 4;
    const auto v = b.matrix();
    for (Eigen::Index i = 0; i < 3; ++i)
      for (Eigen::Index j = 0; j < 5; ++j) {
        if (v(i, j) != valueAt<T>(i, j, 0)) return 5;
        const Eigen::Index k = L == Layout::RowMajor ? i * 5 + j : j * 3 + i;
        if (b.data()[k] != valueAt<T>(i, j, 0)) return 6;
      }
    for (Eigen::Index i = 0; i < 3; ++i)
      for (Eigen::Index j = 0; j < 5; ++j) b.matrix()(i, j) = valueAt<T>(i, j, 1);
    return 0;
  });
  ASSERT_EQ(exitCodeOf(waitChild(pid, 10s)), 0);
  for (Eigen::Index i = 0; i < 3; ++i)
    for (Eigen::Index j = 0; j < 5; ++j) EXPECT_EQ(m(i, j), valueAt<T>(i, j, 1)) << i << "," << j;
  // Anonymous: nothing in /dev/shm, and the child's exit took nothing away.
  EXPECT_FALSE(exists(name));
  EXPECT_EQ((ShmArray<T, L>::open(name).matrix()(2, 4)), (valueAt<T>(2, 4, 1)));
}

TEST(ShmArray, OneDimensionalArrayIsAColumn) {
  auto a = ShmArray<std::int32_t>::create("vec", 7);
  EXPECT_EQ(a.rows(), 7);
  EXPECT_EQ(a.cols(), 1);
  EXPECT_EQ(a.segment().shape(), std::vector<std::int64_t>{7});
  for (int i = 0; i < 7; ++i) a.matrix()(i, 0) = i * i;
  // Rank 1 has no storage order: a column-major view opens it too.
  auto b = ShmArray<std::int32_t, Layout::ColMajor>::open(a.name());
  EXPECT_EQ(b.rows(), 7);
  EXPECT_EQ(b.cols(), 1);
  EXPECT_EQ(b.matrix().col(0).sum(), 0 + 1 + 4 + 9 + 16 + 25 + 36);
}

TEST(ShmArray, FixedSizeViewsAliasTheDynamicOne) {
  auto a = ShmArray<double>::create("fixed", 3, 4);
  auto f = a.fixed<3, 4>();
  static_assert(decltype(f)::RowsAtCompileTime == 3 && decltype(f)::ColsAtCompileTime == 4);
  f(2, 3) = 1.5;
  f(0, 1) = -2.0;
  EXPECT_EQ(a.matrix()(2, 3), 1.5);
  EXPECT_EQ(a.data()[1], -2.0);  // row-major: (0, 1) is the second element
  EXPECT_EQ(thrown<ShmFormatError>([&] { a.fixed<4, 3>(); }),
            "shared memory segment '" + a.name() + "' is 3x4, the fixed-size view wants 4x3");

  auto v = ShmArray<float>::create("fixedvec", 5);
  auto fv = v.fixed<5, 1>();
  fv(4) = 3.0f;
  EXPECT_EQ(v.data()[4], 3.0f);
}

TEST(ShmArray, EmptyAndMovedFromArraysAreEmpty) {
  ShmArray<float> none;
  EXPECT_FALSE(none.valid());
  EXPECT_EQ(none.data(), nullptr);
  EXPECT_EQ(none.size(), 0);

  auto a = ShmArray<float>::create(ShmName::named("moved"), 2, 2);
  const std::string name = a.name();
  ShmArray<float> b = std::move(a);
  EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): documented empty state
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.rows(), 0);
  EXPECT_EQ(a.cols(), 0);
  EXPECT_EQ(b.rows(), 2);
  EXPECT_TRUE(b.segment().owns());
  EXPECT_EQ(b.name(), name);
  b = ShmArray<float>();
  EXPECT_FALSE(exists(name)) << "assigning over the owner did not remove its name";
}

TEST(ShmArray, ZeroRowsIsAValidArray) {
  auto a = ShmArray<std::uint16_t>::create("zero", 0, 5);
  EXPECT_EQ(a.size(), 0);
  EXPECT_EQ(a.bytes(), 0u);
  auto b = ShmArray<std::uint16_t>::open(a.name());
  EXPECT_EQ(b.rows(), 0);
  EXPECT_EQ(b.cols(), 5);
}

TEST(ShmArray, NegativeDimensionIsRefused) {
  EXPECT_TRUE(contains(thrown<LimitError>([] { ShmArray<double>::create("neg", -1, 4); }),
                       "shape [-1x4] has a negative dimension"));
}

TEST(ShmArray, OpeningAnotherTypeLayoutOrRankFails) {
  auto d = ShmArray<double>::create("typed", 2, 3);
  const std::string seg = "shared memory segment '" + d.name() + "'";
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<float>::open(d.name()); }), seg + " holds float64, not float32");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<std::int64_t>::open(d.name()); }), seg + " holds float64, not int64");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<double, Layout::ColMajor>::open(d.name()); }),
            seg + " is row-major, this ShmArray is column-major");

  SharedMemory raw(create_only, "raw", 48);
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<double>::open(raw.name()); }),
            "shared memory segment '" + raw.name() + "' holds raw bytes, not float64");

  SharedMemory cube(create_only, "cube", DType::F64, {2, 3, 4});
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<double>::open(cube.name()); }),
            "shared memory segment '" + cube.name() + "' has rank 3; ShmArray needs rank 1 or 2 (ShmTensor opens any rank)");

  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<double>::open(d.name(), 3, 2); }), seg + " is 2x3, expected 3x2");
  EXPECT_EQ(ShmArray<double>::open(d.name(), 2, 3).size(), 6);

  const std::string missing = "fk." + std::to_string(::getpid()) + ".nothing";
  EXPECT_EQ(thrown<SystemError>([&] { ShmArray<double>::open(missing); }),
            "cannot open shared memory segment '" + missing + "': No such file or directory");
  // A literal is a name, not a descriptor Value.
  EXPECT_EQ(thrown<SystemError>([&] { ShmArray<double>::open("fk.0.literal"); }),
            "cannot open shared memory segment 'fk.0.literal': No such file or directory");
}

// ---------------------------------------------------------------- descriptors

TEST(ShmArrayDescriptor, DescribesNameTypeShapeLayoutAndGeneration) {
  auto a = ShmArray<float, Layout::ColMajor>::create("desc", 4, 2);
  const Value d = a.describe();
  const Map* m = d.getIf<Map>();
  ASSERT_NE(m, nullptr);
  const Map want = {{"name", a.name()},
                    {"dtype", "float32"},
                    {"shape", List{4, 2}},
                    {"rows", 4},
                    {"cols", 2},
                    {"layout", "column-major"},
                    {"generation", static_cast<std::int64_t>(a.segment().generation())}};
  ASSERT_EQ(m->size(), want.size() + 1);
  EXPECT_EQ(Map(m->begin(), m->end() - 1), want);
  // Anonymous: the descriptor itself, a duplicate of the segment's.
  EXPECT_EQ(m->back().first, "fd");
  const Fd* fd = m->back().second.getIf<Fd>();
  ASSERT_NE(fd, nullptr);
  EXPECT_TRUE(fd->valid());
  EXPECT_NE(fd->get(), a.segment().fd());
}

TEST(ShmArrayDescriptor, AnAnonymousDescriptorNeedsAChannelANamedOneEncodesAnywhere) {
  auto anon = ShmArray<std::int16_t>::create("anon", 2, 3);
  Buffer refused;
  EXPECT_TRUE(contains(thrown<Error>([&] { encode(Message("frames", {{"array", anon.describe()}}), refused); }),
                       "only a Channel can carry"));
  auto a = ShmArray<std::int16_t>::create(ShmName::named("msg"), 2, 3);
  a.matrix() << 1, 2, 3, 4, 5, 6;
  Buffer wire;
  encode(Message("frames", {{"array", a.describe()}}), wire);
  const Message got = decode(wire.data(), wire.size());
  auto b = ShmArray<std::int16_t>::open(got.get<Value>("array"));
  EXPECT_EQ(b.name(), a.name());
  EXPECT_EQ(b.rows(), 2);
  EXPECT_EQ(b.cols(), 3);
  EXPECT_EQ(b.matrix()(1, 2), 6);
  EXPECT_FALSE(b.segment().owns());
}

// The tutorial's pattern: the descriptor travels on a Channel to a forked
// backend, which opens the array, reads it and answers.
TEST(ShmArrayDescriptor, BackendOpensFromADescriptorReceivedOnAChannel) {
  auto [front, back] = Channel::makePair();
  const pid_t pid = forkChild([&, &front = front, &back = back] {
    front.close();
    const auto m = back.recv(test::slow(10s));
    if (!m) return 2;
    auto a = ShmArray<double>::open(m->get<Value>("array"));
    back.send(Message("sum", {{"value", a.matrix().sum()}, {"rows", a.rows()}}));
    return 0;
  });
  back.close();
  auto a = ShmArray<double>::create("chan", 100, 30);
  a.matrix().setConstant(0.25);
  // Written before the send: the backend sees them after its recv.
  front.send(Message("go", {{"array", a.describe()}}));
  const auto reply = front.recv(test::slow(10s));
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->get<double>("value"), 0.25 * 100 * 30);
  EXPECT_EQ(reply->get<int>("rows"), 100);
  EXPECT_EQ(exitCodeOf(waitChild(pid, 10s)), 0);
}

TEST(ShmArrayDescriptor, MalformedDescriptorsAreClearErrors) {
  auto a = ShmArray<float>::create("bad", 3, 4);
  const std::string where = "shared memory descriptor of '" + a.name() + "': ";
  auto withField = [&](const std::string& key, Value v) {
    Map m = *a.describe().getIf<Map>();
    for (auto& [k, val] : m)
      if (k == key) val = std::move(v);
    return Value(m);
  };
  auto without = [&](const std::string& key) {
    Map m = *a.describe().getIf<Map>();
    std::erase_if(m, [&](const auto& kv) { return kv.first == key; });
    return Value(m);
  };

  EXPECT_EQ(thrown<TypeError>([&] { ShmArray<float>::open(Value("fk.1.2")); }),
            "shared memory descriptor: string found, map wanted");
  EXPECT_EQ(thrown<TypeError>([&] { ShmArray<float>::open(without("name")); }),
            "shared memory descriptor: missing field 'name'");
  EXPECT_EQ(thrown<TypeError>([&] { ShmArray<float>::open(without("dtype")); }), where + "missing field 'dtype'");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<double>::open(a.describe()); }),
            where + "dtype float32, this ShmArray holds float64");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<float, Layout::ColMajor>::open(a.describe()); }),
            where + "layout row-major, this ShmArray is column-major");
  EXPECT_EQ(thrown<TypeError>([&] { ShmArray<float>::open(withField("rows", "three")); }),
            where + "field 'rows': string found, int64 wanted");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<float>::open(withField("rows", 4)); }),
            "shared memory segment '" + a.name() + "' is 3x4, the descriptor says 4x4");
  EXPECT_NO_THROW(ShmArray<float>::open(without("generation")));
}

TEST(ShmArrayDescriptor, ADescriptorOfAReplacedSegmentIsRefused) {
  const std::string name = "fk." + std::to_string(::getpid()) + ".again";
  Value old;
  {
    auto a = ShmArray<float>::create(ShmName::exact(name), 2, 2);
    old = a.describe();
  }
  auto b = ShmArray<float>::create(ShmName::exact(name), 2, 2);
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { ShmArray<float>::open(old); }),
                       "shared memory segment '" + name + "' was re-created after the descriptor was made"));
  EXPECT_NO_THROW(ShmArray<float>::open(b.describe()));
}

}  // namespace
}  // namespace forklift
