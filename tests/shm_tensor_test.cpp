#include "forklift/shm_tensor.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <functional>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "forklift/channel.hpp"
#include "forklift/message.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using test::contains;
using test::exitCodeOf;
using test::forkChild;
using test::thrown;
using test::waitChild;
using Index = Eigen::Index;

bool exists(const std::string& name) {
  struct stat st {};
  return ::stat(("/dev/shm/" + name).c_str(), &st) == 0;
}

std::string seg(const std::string& name) { return "shared memory segment '" + name + "'"; }

// A value per linear position k that differs for every k of a small array
// and, for signed and floating types, is negative or fractional somewhere.
template <class T>
T valueAt(Index k) {
  if constexpr (std::is_same_v<T, Eigen::half>) return T(static_cast<float>(k % 200) * 0.25f - 7.5f);  // exact
  else if constexpr (std::is_floating_point_v<T>) return static_cast<T>(k) * T(0.5) - T(7.25);
  else if constexpr (std::is_signed_v<T>) return static_cast<T>(k % 100 - 50);
  else return static_cast<T>(k % 200 + 3);
}

// Axis lengths that differ from each other, so no two axes can be confused.
template <int Rank>
std::array<Index, Rank> testDims() {
  constexpr Index lengths[] = {2, 3, 4, 5, 2, 3, 1, 2};
  std::array<Index, Rank> d{};
  for (int a = 0; a < Rank; ++a) d[a] = lengths[a];
  return d;
}

// The offset of `idx` in a dense array, computed here from the layout's
// definition, apart from the code under test.
template <int Rank>
Index offsetOf(const std::array<Index, Rank>& idx, const std::array<Index, Rank>& dims, Layout layout) {
  Index off = 0;
  if (layout == Layout::RowMajor)
    for (int a = 0; a < Rank; ++a) off = off * dims[a] + idx[a];
  else
    for (int a = Rank - 1; a >= 0; --a) off = off * dims[a] + idx[a];
  return off;
}

// Every index of `dims`, the last axis fastest.
template <int Rank, class Fn>
void forEachIndex(const std::array<Index, Rank>& dims, Fn&& fn) {
  Index n = 1;
  for (Index d : dims) n *= d;
  for (Index k = 0; k < n; ++k) {
    std::array<Index, Rank> idx{};
    Index rest = k;
    for (int a = Rank - 1; a >= 0; --a) {
      idx[a] = rest % dims[a];
      rest /= dims[a];
    }
    fn(idx, k);
  }
}

std::vector<std::int64_t> toShape(const auto& dims) { return {dims.begin(), dims.end()}; }

// One rank and layout: create, fill through tensor(), check the bytes'
// order, describe, send the description through an encoded message, open
// from it and by name, and read it all back.
template <class T, int Rank, Layout L>
void roundTrip() {
  SCOPED_TRACE("rank " + std::to_string(Rank) + ", " + layoutName(L));
  using Tensor = ShmTensor<T, Rank, L>;
  const auto dims = testDims<Rank>();
  auto t = Tensor::create("rt", dims);
  ASSERT_TRUE(t.valid());
  EXPECT_EQ(t.dimensions(), dims);
  EXPECT_EQ(t.size(), std::accumulate(dims.begin(), dims.end(), Index{1}, std::multiplies<>()));
  EXPECT_EQ(t.bytes(), static_cast<std::size_t>(t.size()) * sizeof(T));
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.data()) % 64, 0u);
  EXPECT_EQ(t.segment().kind(), ShmKind::Array);
  EXPECT_EQ(t.segment().dtype(), dtypeOf<T>());
  EXPECT_EQ(t.segment().shape(), toShape(dims));
  EXPECT_EQ(t.segment().strides(), toShape(t.strides()));

  auto map = t.tensor();
  forEachIndex<Rank>(dims, [&](const auto& idx, Index k) { map(idx) = valueAt<T>(k); });
  bool ordered = true;
  forEachIndex<Rank>(dims, [&](const auto& idx, Index k) {
    ordered = ordered && t.data()[offsetOf<Rank>(idx, dims, L)] == valueAt<T>(k);
  });
  EXPECT_TRUE(ordered) << "the payload is not in " << layoutName(L) << " order";
  // Strides in elements: one step along an axis moves that many elements.
  for (int a = 0; a < Rank; ++a) {
    std::array<Index, Rank> unit{};
    unit[a] = 1;
    EXPECT_EQ(t.strides()[a], offsetOf<Rank>(unit, dims, L)) << "axis " << a;
  }

  const Value d = t.describe();
  const Map* m = d.getIf<Map>();
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->at(1), (std::pair<std::string, Value>{"dtype", dtypeName(dtypeOf<T>())}));
  EXPECT_EQ(m->at(2).second.template as<std::vector<std::int64_t>>(), toShape(dims));

  // Through a Channel, which carries the anonymous segment's descriptor.
  auto [sender, receiver] = Channel::makePair();
  sender.send(Message("tensor", {{"t", d}}));
  const auto got = receiver.recv(std::chrono::seconds(5));
  ASSERT_TRUE(got);
  auto u = Tensor::open(got->get<Value>("t"));
  EXPECT_EQ(u.name(), t.name());
  EXPECT_EQ(u.dimensions(), dims);
  EXPECT_EQ(u.strides(), t.strides());
  EXPECT_FALSE(u.segment().owns());
  EXPECT_NE(u.data(), t.data());  // a mapping of its own
  bool same = true;
  const auto back = u.tensor();
  forEachIndex<Rank>(dims, [&](const auto& idx, Index k) { same = same && back(idx) == valueAt<T>(k); });
  EXPECT_TRUE(same) << "the opener reads other values";

  EXPECT_EQ(Tensor::open(t.name()).dimensions(), dims);
  EXPECT_EQ(Tensor::open(t.name(), dims).size(), t.size());
}

template <class T>
class ShmTensorRoundTrip : public ::testing::Test {};
using ElementTypes = ::testing::Types<std::int8_t, std::uint8_t, std::int16_t, std::uint16_t, std::int32_t,
                                      std::uint32_t, std::int64_t, std::uint64_t, float, double, Eigen::half>;
TYPED_TEST_SUITE(ShmTensorRoundTrip, ElementTypes);

TYPED_TEST(ShmTensorRoundTrip, EveryRankAndLayoutRoundTripsThroughDescribeAndOpen) {
  using T = TypeParam;
  roundTrip<T, 1, Layout::RowMajor>();
  roundTrip<T, 2, Layout::RowMajor>();
  roundTrip<T, 3, Layout::RowMajor>();
  roundTrip<T, 4, Layout::RowMajor>();
  roundTrip<T, 8, Layout::RowMajor>();
  roundTrip<T, 1, Layout::ColMajor>();
  roundTrip<T, 2, Layout::ColMajor>();
  roundTrip<T, 3, Layout::ColMajor>();
  roundTrip<T, 4, Layout::ColMajor>();
  roundTrip<T, 8, Layout::ColMajor>();
}

// ---------------------------------------------------------------- views

// channel(c) of an HxWxC frame is H x W with neighbours C apart; plane(y)
// is row y, W x C. Both alias the tensor, in both layouts.
template <Layout L>
void frameViews() {
  SCOPED_TRACE(layoutName(L));
  auto f = ShmTensor<std::uint8_t, 3, L>::create("frame", 4, 6, 3);
  auto t = f.tensor();
  for (Index y = 0; y < 4; ++y)
    for (Index x = 0; x < 6; ++x)
      for (Index c = 0; c < 3; ++c) t(y, x, c) = static_cast<std::uint8_t>(80 * c + 10 * y + x);

  auto blue = f.channel(2);
  static_assert(std::is_same_v<decltype(blue), typename ShmTensor<std::uint8_t, 3, L>::PlaneMap>);
  ASSERT_EQ(blue.rows(), 4);
  ASSERT_EQ(blue.cols(), 6);
  if constexpr (L == Layout::RowMajor) {
    EXPECT_EQ(blue.innerStride(), 3);  // from pixel to pixel
    EXPECT_EQ(blue.outerStride(), 18);  // from row to row
  } else {
    EXPECT_EQ(blue.innerStride(), 1);  // a column-major frame keeps its channels apart
    EXPECT_EQ(blue.outerStride(), 4);
  }
  for (Index y = 0; y < 4; ++y)
    for (Index x = 0; x < 6; ++x) EXPECT_EQ(blue(y, x), 160 + 10 * y + x) << y << "," << x;
  EXPECT_EQ(blue.template cast<int>().sum(), 24 * 160 + 6 * 10 * (0 + 1 + 2 + 3) + 4 * (0 + 1 + 2 + 3 + 4 + 5));

  auto row2 = f.plane(2);
  ASSERT_EQ(row2.rows(), 6);
  ASSERT_EQ(row2.cols(), 3);
  for (Index x = 0; x < 6; ++x)
    for (Index c = 0; c < 3; ++c) EXPECT_EQ(row2(x, c), 80 * c + 20 + x);

  // Writes through a view land in the tensor.
  f.channel(1).setConstant(7);
  row2(5, 0) = 255;
  EXPECT_EQ(t(3, 5, 1), 7);
  EXPECT_EQ(t(0, 0, 1), 7);
  EXPECT_EQ(t(0, 0, 0), 0);
  EXPECT_EQ(t(2, 5, 0), 255);
  EXPECT_EQ(t(3, 5, 2), 160 + 35);

  const auto& cf = f;
  auto cblue = cf.channel(2);
  static_assert(std::is_same_v<decltype(cblue), typename ShmTensor<std::uint8_t, 3, L>::ConstPlaneMap>);
  EXPECT_EQ(cblue(3, 5), 195);
  EXPECT_EQ(cf.plane(0)(1, 2), 161);
  EXPECT_EQ(cf.tensor()(1, 2, 0), 12);
}

TEST(ShmTensorViews, ChannelAndPlaneOfAFrame) {
  frameViews<Layout::RowMajor>();
  frameViews<Layout::ColMajor>();
}

TEST(ShmTensorViews, Rank4TakesTheLeadingIndices) {
  // A batch of 2 frames, NHWC.
  auto b = ShmTensor<float, 4>::create("batch", 2, 3, 4, 3);
  auto t = b.tensor();
  for (Index n = 0; n < 2; ++n)
    for (Index y = 0; y < 3; ++y)
      for (Index x = 0; x < 4; ++x)
        for (Index c = 0; c < 3; ++c) t(n, y, x, c) = static_cast<float>(1000 * n + 100 * y + 10 * x + c);
  auto ch = b.channel(1, 2);  // frame 1, channel 2
  ASSERT_EQ(ch.rows(), 3);
  ASSERT_EQ(ch.cols(), 4);
  EXPECT_EQ(ch(2, 3), 1000 + 200 + 30 + 2);
  auto row = b.plane(1, 2);  // frame 1, row 2: x by c
  ASSERT_EQ(row.rows(), 4);
  ASSERT_EQ(row.cols(), 3);
  EXPECT_EQ(row(3, 1), 1000 + 200 + 30 + 1);
  // Eigen's tensor operations work on the map.
  const Eigen::Tensor<float, 0, Eigen::RowMajor> total = t.sum();
  float want = 0;
  for (Index k = 0; k < b.size(); ++k) want += b.data()[k];
  EXPECT_EQ(total(), want);
}

TEST(ShmTensorViews, MatrixForRankOneAndTwoAndPlaneOfAMatrix) {
  auto v = ShmTensor<double, 1>::create("vec", 5);
  v.matrix()(4, 0) = 2.5;
  EXPECT_EQ(v.matrix().rows(), 5);
  EXPECT_EQ(v.matrix().cols(), 1);
  EXPECT_EQ(v.tensor()(4), 2.5);

  auto m = ShmTensor<std::int32_t, 2, Layout::ColMajor>::create("mat", 3, 4);
  m.matrix()(2, 1) = 9;
  EXPECT_EQ(m.data()[1 * 3 + 2], 9);
  EXPECT_EQ(m.tensor()(2, 1), 9);
  EXPECT_EQ(m.plane()(2, 1), 9);  // no index: the whole matrix, strided
  EXPECT_EQ(m.plane().outerStride(), 3);
}

TEST(ShmTensorViews, AnIndexOutOfRangeIsALimitErrorNamingTheSegment) {
  auto f = ShmTensor<std::uint8_t, 3>::create("range", 4, 6, 3);
  EXPECT_EQ(thrown<LimitError>([&] { f.channel(3); }),
            seg(f.name()) + ": channel() index 3 on axis 2 is out of range, the axis has length 3");
  EXPECT_EQ(thrown<LimitError>([&] { f.plane(-1); }),
            seg(f.name()) + ": plane() index -1 on axis 0 is out of range, the axis has length 4");
  auto b = ShmTensor<float, 4>::create("range4", 2, 3, 4, 3);
  EXPECT_EQ(thrown<LimitError>([&] { b.channel(2, 0); }),
            seg(b.name()) + ": channel() index 2 on axis 0 is out of range, the axis has length 2");
  EXPECT_NO_THROW(b.channel(1, 2));
}

// ---------------------------------------------------------------- checks

TEST(ShmTensorOpen, AnotherRankTypeLayoutOrShapeIsAShmFormatErrorNamingTheSegment) {
  auto f = ShmTensor<std::uint8_t, 3>::create("checked", 2, 3, 4);
  const std::string s = seg(f.name());
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::uint8_t, 2>::open(f.name()); }),
            s + " has rank 3, this ShmTensor has rank 2");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::uint8_t, 4>::open(f.name()); }),
            s + " has rank 3, this ShmTensor has rank 4");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<float, 3>::open(f.name()); }), s + " holds uint8, not float32");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<Eigen::half, 3>::open(f.name()); }),
            s + " holds uint8, not float16");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::uint8_t, 3, Layout::ColMajor>::open(f.name()); }),
            s + " is row-major, this ShmTensor is column-major");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::uint8_t, 3>::open(f.name(), {2, 3, 5}); }),
            s + " is 2x3x4, expected 2x3x5");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmArray<std::uint8_t>::open(f.name()); }),
            s + " has rank 3; ShmArray needs rank 1 or 2 (ShmTensor opens any rank)");

  SharedMemory raw(create_only, "rawbytes", 24);
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::uint8_t, 1>::open(raw.name()); }),
            seg(raw.name()) + " holds raw bytes, not uint8");

  const std::string missing = "fk." + std::to_string(::getpid()) + ".nothing";
  EXPECT_EQ(thrown<SystemError>([&] { ShmTensor<float, 3>::open(missing); }),
            "cannot open " + seg(missing) + ": No such file or directory");

  // Rank 1 has no storage order.
  auto v = ShmTensor<float, 1>::create("vec", 4);
  EXPECT_EQ((ShmTensor<float, 1, Layout::ColMajor>::open(v.name()).size()), 4);
  EXPECT_EQ((ShmTensor<float, 1, Layout::ColMajor>::open(v.describe()).size()), 4);
}

TEST(ShmTensorOpen, ADescriptorIsCheckedAgainstTheReceiverAndTheSegment) {
  auto f = ShmTensor<std::uint16_t, 3>::create("described", 2, 3, 4);
  const std::string where = "shared memory descriptor of '" + f.name() + "': ";
  auto withField = [&](const std::string& key, Value v) {
    Map m = *f.describe().getIf<Map>();
    for (auto& [k, val] : m)
      if (k == key) val = std::move(v);
    return Value(m);
  };

  // The segment differs from the description: ShmFormatError.
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::uint16_t, 3>::open(withField("shape", List{2, 3, 5})); }),
            seg(f.name()) + " is 2x3x4, the descriptor says 2x3x5");
  // The description differs from the receiving type: ShmFormatError too.
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::uint16_t, 2>::open(f.describe()); }),
            where + "shape 2x3x4 has rank 3, this ShmTensor has rank 2");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::int16_t, 3>::open(f.describe()); }),
            where + "dtype uint16, this ShmTensor holds int16");
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::uint16_t, 3, Layout::ColMajor>::open(f.describe()); }),
            where + "layout row-major, this ShmTensor is column-major");
  EXPECT_EQ(thrown<TypeError>([&] { ShmTensor<std::uint16_t, 3>::open(withField("shape", "2x3x4")); }),
            where + "field 'shape': string found, list or array wanted");
  EXPECT_EQ(thrown<TypeError>([&] { ShmTensor<std::uint16_t, 3>::open(Value(Map{{"dtype", "uint16"}})); }),
            "shared memory descriptor: missing field 'name'");
  // A lying dtype field still meets the segment's own header.
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<std::int16_t, 3>::open(withField("dtype", "int16")); }),
            seg(f.name()) + " holds uint16, not int16");
}

TEST(ShmTensorOpen, ADescriptorOfAReplacedSegmentIsRefused) {
  const std::string name = "fk." + std::to_string(::getpid()) + ".again";
  Value old;
  {
    auto a = ShmTensor<float, 3>::create(ShmName::exact(name), 2, 2, 2);
    old = a.describe();
  }
  auto b = ShmTensor<float, 3>::create(ShmName::exact(name), 2, 2, 2);
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { ShmTensor<float, 3>::open(old); }),
                       seg(name) + " was re-created after the descriptor was made"));
  EXPECT_NO_THROW((ShmTensor<float, 3>::open(b.describe())));
}

TEST(ShmTensorOpen, ShmArrayAndShmTensorOpenEachOther) {
  auto t = ShmTensor<double, 2>::create("t2", 3, 4);
  t.matrix()(2, 3) = 1.5;
  auto a = ShmArray<double>::open(t.describe());
  EXPECT_EQ(a.rows(), 3);
  EXPECT_EQ(a.cols(), 4);
  EXPECT_EQ(a.matrix()(2, 3), 1.5);
  EXPECT_EQ(ShmArray<double>::open(t.name()).matrix()(2, 3), 1.5);

  auto m = ShmArray<float, Layout::ColMajor>::create("a2", 2, 5);
  m.matrix()(1, 4) = -3.0f;
  auto u = ShmTensor<float, 2, Layout::ColMajor>::open(m.describe());
  EXPECT_EQ(u.tensor()(1, 4), -3.0f);
  EXPECT_EQ(thrown<ShmFormatError>([&] { ShmTensor<float, 3, Layout::ColMajor>::open(m.name()); }),
            seg(m.name()) + " has rank 2, this ShmTensor has rank 3");

  auto vec = ShmArray<std::int32_t>::create("a1", 6);
  EXPECT_EQ((ShmTensor<std::int32_t, 1>::open(vec.describe()).dimensions()), (std::array<Index, 1>{6}));
  auto tv = ShmTensor<std::int32_t, 1>::create("t1", 6);
  EXPECT_EQ(ShmArray<std::int32_t>::open(tv.describe()).rows(), 6);
  // A rank-1 array has no storage order, through a descriptor too.
  EXPECT_EQ((ShmArray<std::int32_t, Layout::ColMajor>::open(tv.describe()).rows()), 6);
}

TEST(ShmTensor, EmptyMovedFromAndZeroSizedTensors) {
  ShmTensor<float, 3> none;
  EXPECT_FALSE(none.valid());
  EXPECT_EQ(none.data(), nullptr);
  EXPECT_EQ(none.size(), 0);
  EXPECT_EQ(thrown<Error>([&] { none.describe(); }), "cannot describe an empty ShmTensor");

  auto a = ShmTensor<float, 3>::create(ShmName::named("moved"), 2, 2, 2);
  const std::string name = a.name();
  ShmTensor<float, 3> b = std::move(a);
  EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): documented empty state
  EXPECT_EQ(a.size(), 0);
  EXPECT_EQ(a.dimensions(), (std::array<Index, 3>{0, 0, 0}));
  EXPECT_TRUE(b.segment().owns());
  b = ShmTensor<float, 3>();
  EXPECT_FALSE(exists(name)) << "assigning over the owner did not remove its name";

  auto z = ShmTensor<std::uint8_t, 3>::create("zero", 0, 1920, 3);
  EXPECT_EQ(z.size(), 0);
  EXPECT_EQ(z.bytes(), 0u);
  EXPECT_EQ((ShmTensor<std::uint8_t, 3>::open(z.describe()).dimensions()), (std::array<Index, 3>{0, 1920, 3}));
  EXPECT_TRUE(contains(thrown<LimitError>([] { ShmTensor<double, 3>::create("neg", 2, -1, 3); }),
                       "shape [2x-1x3] has a negative dimension"));
}

// ---------------------------------------------------------------- float16

TEST(Float16, IsAnElementTypeOfItsOwn) {
  EXPECT_EQ(dtypeOf<Eigen::half>(), DType::F16);
  EXPECT_STREQ(dtypeName(DType::F16), "float16");
  EXPECT_EQ(dtypeSize(DType::F16), 2u);
  EXPECT_TRUE(dtypeValid(static_cast<std::uint8_t>(DType::F16)));
  EXPECT_FALSE(dtypeValid(static_cast<std::uint8_t>(DType::F16) + 1));
}

TEST(Float16, TravelsInAMessageAsAnArray) {
  const std::vector<Eigen::half> v{Eigen::half(1.5f), Eigen::half(-0.25f), Eigen::half(65504.0f)};
  const Array a = Array::fromVector(v);
  EXPECT_EQ(a.describe(), "float16[3]");
  Eigen::Matrix<Eigen::half, 2, 2> m;
  m << Eigen::half(1), Eigen::half(2), Eigen::half(3), Eigen::half(4);
  Buffer wire;
  encode(Message("halves", {{"v", a}, {"m", m}}), wire);
  const Message got = decode(wire.data(), wire.size());
  EXPECT_EQ(got.get<Array>("v").toVector<Eigen::half>(), v);
  EXPECT_EQ((got.get<Eigen::Matrix<Eigen::half, 2, 2>>("m")), m);
  EXPECT_EQ(thrown<TypeError>([&] { got.get<Array>("v").toVector<float>(); }),
            "array<float16> found, array<float32> wanted");
}

// ---------------------------------------------------------------- across fork

// The vision case: a full HD colour frame, described on a Channel; the
// backend opens it, paints it through channel views and answers; the
// frontend reads the paint in place.
TEST(ShmTensorAcrossFork, BackendPaintsAFullHdFrameTheFrontendReads) {
  auto [front, back] = Channel::makePair();
  const pid_t pid = forkChild([&, &front = front, &back = back] {
    front.close();
    const auto m = back.recv(test::slow(10s));
    if (!m) return 2;
    auto f = ShmTensor<std::uint8_t, 3>::open(m->get<Value>("frame"));
    if (f.dimensions() != std::array<Index, 3>{1080, 1920, 3} || f.segment().owns()) return 3;
    f.channel(0).setConstant(200);
    f.channel(1).setZero();
    f.channel(2).setConstant(10);
    f.tensor()(540, 960, 1) = 255;  // one green pixel in the middle
    back.send(Message("painted", {{"pixels", f.dimensions()[0] * f.dimensions()[1]}}));
    return 0;
  });
  back.close();
  auto frame = ShmTensor<std::uint8_t, 3>::create("hd", 1080, 1920, 3);
  EXPECT_EQ(frame.bytes(), 1080u * 1920 * 3);
  front.send(Message("paint", {{"frame", frame.describe()}}));
  const auto reply = front.recv(test::slow(10s));
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->get<std::int64_t>("pixels"), 1080 * 1920);
  EXPECT_EQ(exitCodeOf(waitChild(pid, 10s)), 0);
  EXPECT_EQ(frame.channel(0).cast<std::int64_t>().sum(), 200LL * 1080 * 1920);
  EXPECT_EQ(frame.channel(1).cast<std::int64_t>().sum(), 255);
  EXPECT_EQ(frame.channel(2).cast<std::int64_t>().sum(), 10LL * 1080 * 1920);
  EXPECT_EQ(frame.plane(540)(960, 1), 255);
  EXPECT_EQ(frame.data()[(540 * 1920 + 960) * 3 + 1], 255);  // row-major HWC, as numpy and OpenCV lay it out
}

}  // namespace
}  // namespace forklift
