// forklift - ShmTensor: an array of any rank in shared memory, seen through Eigen
//
// `ShmTensor<T, Rank, L>` is a `SharedMemory` segment that holds a dense
// array of T (int8..uint64, float, double, or `Eigen::half` for float16)
// with Rank axes, 1 to 8, in layout L: row-major by default (numpy's C
// order, the last index fastest) or `Layout::ColMajor` (Eigen's and
// Fortran's order, the first index fastest). A colour frame is a
// `ShmTensor<std::uint8_t, 3>` of height x width x channels.
//
//   frontend:  auto f = ShmTensor<std::uint8_t, 3>::create("frame", 1080, 1920, 3);
//   backend:   auto f = ShmTensor<std::uint8_t, 3>::open(msg.get<Value>("frame"));
//
// Views, all over the same pages; nothing is copied:
//   tensor()          an `Eigen::TensorMap` of the whole array
//   matrix()          an `Eigen::Map`, for rank 1 (n x 1) and 2 only, as ShmArray's
//   plane(i...)       the matrix over the last two axes, the Rank-2 leading
//                     indices fixed: plane(y) of an HxWxC frame is its row y,
//                     a W x C matrix
//   channel(i..., c)  the matrix over the two axes before the last, with the
//                     Rank-3 leading indices and the last one fixed:
//                     channel(2) of an HxWxC frame is its third channel, an
//                     H x W matrix whose neighbours are C elements apart
// plane() and channel() are `Eigen::Map`s with an `Eigen::Stride<Dynamic,
// Dynamic>`, in L's storage order; an index out of range throws LimitError
// naming the segment. tensor() and matrix() do not check indices (Eigen
// asserts in debug builds).
//
// A ShmTensor of rank 1 or 2 and a ShmArray open each other's segments and
// descriptors: both are segments of kind "array". Naming (`ShmName`:
// anonymous by default), ownership, the empty moved-from state, the
// memory-ordering rule and the one-thread-at-a-time rule are ShmArray's;
// read them in shm_array.hpp.
//
// Opening checks the segment: a foreign or corrupt segment, another element
// type, another rank, another layout (rank 2 and more) or, when given,
// another shape throws ShmFormatError naming the segment, and so does a
// descriptor whose dtype, layout or rank differs from the receiving type; a
// missing name throws SystemError (ENOENT). A malformed descriptor (a
// field missing or of the wrong type) is a TypeError naming the segment.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "forklift/shm.hpp"
#include "forklift/shm_array.hpp"
#include "forklift/value.hpp"

namespace forklift {

namespace detail {
// Checks that `shm` holds `dtype` elements in `rank` axes, in `layout` when
// the rank is 2 or more; returns the shape. Throws ShmFormatError.
std::vector<std::int64_t> checkTensorSegment(const SharedMemory& shm, DType dtype, std::size_t rank, Layout layout);
// Opens the segment a descriptor names and checks both against each other
// and the receiving type. Throws TypeError, ShmFormatError, SystemError.
SharedMemory openDescribedTensor(const Value& descriptor, DType dtype, std::size_t rank, Layout layout);
Value describeTensor(const SharedMemory& shm);
// "shared memory segment '<name>' is 2x3x4, <whose> 2x3x5"
[[noreturn]] void throwTensorShapeMismatch(const std::string& name, const std::vector<std::int64_t>& have,
                                           const std::vector<std::int64_t>& want, const char* whose);
[[noreturn]] void throwIndexOutOfRange(const std::string& name, const char* view, std::size_t axis,
                                       std::int64_t index, std::int64_t extent);
}  // namespace detail

template <class T, int Rank, Layout L = Layout::RowMajor>
class ShmTensor : public detail::ShmView<T> {
  static_assert(detail::kShmElement<T>, "ShmTensor holds int8..uint64, float, double or Eigen::half");
  static_assert(Rank >= 1 && Rank <= static_cast<int>(detail::kShmMaxRank), "a ShmTensor has rank 1 to 8");
  using Base = detail::ShmView<T>;
  using Base::shm_;

 public:
  using Scalar = T;
  using Index = Eigen::Index;
  using Dimensions = std::array<Index, Rank>;
  static constexpr int kRank = Rank;
  static constexpr Layout kLayout = L;
  static constexpr int kEigenOrder = L == Layout::RowMajor ? Eigen::RowMajor : Eigen::ColMajor;

  using Tensor = Eigen::Tensor<T, Rank, kEigenOrder, Index>;
  // TensorMap takes (Options & Aligned16) == Aligned16 as "aligned", so
  // Aligned64 would read as unaligned. The payload is 64-byte aligned,
  // enough for any packet.
  using TensorMap = Eigen::TensorMap<Tensor, Eigen::Aligned16>;
  using ConstTensorMap = Eigen::TensorMap<const Tensor, Eigen::Aligned16>;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, kEigenOrder>;
  using MatrixMap = Eigen::Map<Matrix, Eigen::Aligned64>;
  using ConstMatrixMap = Eigen::Map<const Matrix, Eigen::Aligned64>;
  // Outer and inner stride, in elements, in the matrix's storage order.
  using PlaneStride = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
  using PlaneMap = Eigen::Map<Matrix, Eigen::Unaligned, PlaneStride>;
  using ConstPlaneMap = Eigen::Map<const Matrix, Eigen::Unaligned, PlaneStride>;

  ShmTensor() noexcept = default;  // empty
  ShmTensor(ShmTensor&& o) noexcept
      : Base(std::move(o)), dims_(std::exchange(o.dims_, Dimensions{})),
        strides_(std::exchange(o.strides_, Dimensions{})) {}
  ShmTensor& operator=(ShmTensor&& o) noexcept {
    if (this != &o) {
      Base::operator=(std::move(o));
      dims_ = std::exchange(o.dims_, Dimensions{});
      strides_ = std::exchange(o.strides_, Dimensions{});
    }
    return *this;
  }
  ShmTensor(const ShmTensor&) = delete;
  ShmTensor& operator=(const ShmTensor&) = delete;

  // Frontend: creates a zero-filled array of `dims`. Throws what
  // SharedMemory's create throws; LimitError for a negative dimension.
  static ShmTensor create(const ShmName& name, const Dimensions& dims) {
    return ShmTensor(SharedMemory(create_only, name, dtypeOf<T>(), std::vector<std::int64_t>(dims.begin(), dims.end()),
                                  L));
  }
  // The same with one argument per axis: create("frame", 1080, 1920, 3).
  template <class... I>
    requires(sizeof...(I) == Rank && (std::is_integral_v<I> && ...))
  static ShmTensor create(const ShmName& name, I... dims) {
    return create(name, Dimensions{static_cast<Index>(dims)...});
  }

  // Backend: opens by name; the shape comes from the segment's header.
  static ShmTensor open(const std::string& name) {
    SharedMemory shm(open_only, name);
    detail::checkTensorSegment(shm, dtypeOf<T>(), Rank, L);
    return ShmTensor(std::move(shm));
  }
  // Backend: opens by name and also checks the shape; ShmFormatError
  // ("... is 2x3x4, expected 2x3x5") when it differs.
  static ShmTensor open(const std::string& name, const Dimensions& expected) {
    ShmTensor t = open(name);
    if (t.dims_ != expected)
      detail::throwTensorShapeMismatch(name, {t.dims_.begin(), t.dims_.end()}, {expected.begin(), expected.end()},
                                       "expected");
    return t;
  }
  // Backend: opens from a describe() Value, and checks that the segment is
  // still the one described. (Exactly Value, so that open("fk.name") picks
  // the name overload.)
  template <class V>
    requires std::is_same_v<V, Value>
  static ShmTensor open(const V& descriptor) {
    return ShmTensor(detail::openDescribedTensor(descriptor, dtypeOf<T>(), Rank, L));
  }

  // A Map value that fits in a Message: {name, dtype ("uint8", ...), shape
  // (a list of Rank ints), layout, generation}, rows and cols for rank 1
  // and 2 (so that a ShmArray opens it too), and for an anonymous array fd,
  // a duplicate of its descriptor.
  Value describe() const { return detail::describeTensor(shm_); }

  TensorMap tensor() noexcept { return TensorMap(this->data(), dims_); }
  ConstTensorMap tensor() const noexcept { return ConstTensorMap(this->data(), dims_); }

  MatrixMap matrix() noexcept
    requires(Rank <= 2)
  {
    return MatrixMap(this->data(), dims_[0], Rank == 2 ? dims_[Rank - 1] : 1);
  }
  ConstMatrixMap matrix() const noexcept
    requires(Rank <= 2)
  {
    return ConstMatrixMap(this->data(), dims_[0], Rank == 2 ? dims_[Rank - 1] : 1);
  }

  // The matrix over the last two axes at the given leading indices.
  template <class... I>
    requires(Rank >= 2 && sizeof...(I) == Rank - 2 && (std::is_integral_v<I> && ...))
  PlaneMap plane(I... leading) {
    return view<PlaneMap>(this->data(), {static_cast<Index>(leading)...}, false, "plane");
  }
  template <class... I>
    requires(Rank >= 2 && sizeof...(I) == Rank - 2 && (std::is_integral_v<I> && ...))
  ConstPlaneMap plane(I... leading) const {
    return view<ConstPlaneMap>(this->data(), {static_cast<Index>(leading)...}, false, "plane");
  }
  // The matrix over axes Rank-3 and Rank-2 at the given leading indices and
  // last index c.
  template <class... I>
    requires(Rank >= 3 && sizeof...(I) == Rank - 2 && (std::is_integral_v<I> && ...))
  PlaneMap channel(I... indices) {
    return view<PlaneMap>(this->data(), {static_cast<Index>(indices)...}, true, "channel");
  }
  template <class... I>
    requires(Rank >= 3 && sizeof...(I) == Rank - 2 && (std::is_integral_v<I> && ...))
  ConstPlaneMap channel(I... indices) const {
    return view<ConstPlaneMap>(this->data(), {static_cast<Index>(indices)...}, true, "channel");
  }

  // data(), bytes(), name(), valid(), segment(): from detail::ShmView.
  const Dimensions& dimensions() const noexcept { return dims_; }
  // In elements, per axis: the dense strides of L.
  const Dimensions& strides() const noexcept { return strides_; }
  Index size() const noexcept {  // elements
    Index n = this->valid() ? 1 : 0;
    for (Index d : dims_) n *= d;
    return n;
  }
 private:
  static constexpr std::size_t kFixed = Rank >= 2 ? Rank - 2 : 0;  // indices plane() and channel() take

  explicit ShmTensor(SharedMemory shm) : Base(std::move(shm)) {
    const auto shape = shm_.shape();
    const auto strides = shm_.strides();
    for (int a = 0; a < Rank; ++a) {
      dims_[a] = static_cast<Index>(shape[a]);
      strides_[a] = static_cast<Index>(strides[a]);
    }
  }

  // plane(): the leading axes are fixed, the matrix is over the last two.
  // channel(): the leading axes and the last one are fixed, the matrix is
  // over the two before it.
  template <class M, class P>
  M view(P base, const std::array<Index, kFixed>& index, bool lastFixed, const char* what) const {
    Index offset = 0;
    for (std::size_t k = 0; k < kFixed; ++k) {
      const std::size_t axis = lastFixed && k + 1 == kFixed ? Rank - 1 : k;
      if (index[k] < 0 || index[k] >= dims_[axis])
        detail::throwIndexOutOfRange(this->name(), what, axis, index[k], dims_[axis]);
      offset += index[k] * strides_[axis];
    }
    const int row = lastFixed ? Rank - 3 : Rank - 2;
    const int col = row + 1;
    const Index rs = strides_[row];
    const Index cs = strides_[col];
    return M(base + offset, dims_[row], dims_[col], L == Layout::RowMajor ? PlaneStride(rs, cs) : PlaneStride(cs, rs));
  }

  Dimensions dims_{};
  Dimensions strides_{};
};

}  // namespace forklift
