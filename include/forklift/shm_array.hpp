// forklift - ShmArray: a typed 2-D array in shared memory, seen as an Eigen map
//
// `ShmArray<T, L>` is a `SharedMemory` segment that holds a rows x cols
// array of T (int8..uint64, float, double, or `Eigen::half` for float16) in
// layout L, row-major by default (numpy's default) or `Layout::ColMajor`
// (Eigen's default). Both sides see the same pages through `matrix()`, an
// `Eigen::Map`; nothing is copied. Arrays of rank 3 and more (images,
// batches) are `ShmTensor` (shm_tensor.hpp), over the same kind of segment.
//
//   frontend, before fork:  auto a = ShmArray<float>::create("frames", 480, 640);
//   backend, after fork:    auto a = ShmArray<float>::open(name);  // shape from the header
//                      or:  auto a = ShmArray<float>::open(msg.get<Value>("frames"));
//
// Naming (see shm.hpp): `create` takes a `ShmName`. A plain string is a
// hint, and the array is anonymous (a sealed memfd labelled
// "anon.<pid>.<n>.<hint>"): nothing is left behind however its processes
// die. A backend forked after `create` opens it by its label, `name()`; one
// that did not inherit it (an array made while the backend runs) opens
// `describe()`, which carries the descriptor in the message.
// `ShmName::named("frames")` makes /dev/shm/fk.<pid>.<n>.frames instead, and
// `ShmName::exact("fk.camera0")` that exact name (SystemError, EEXIST, when
// it is taken): for processes outside the tree, such as a Python reader.
//
// Ownership is SharedMemory's: the creating process removes a name when
// its ShmArray is destroyed; an opener, or a child forked from the creator,
// never does. The mapping outlives the name: removing it does not disturb a
// peer that has the array open. A moved-from ShmArray is empty: valid() is
// false, data() is nullptr, rows() and cols() are 0.
//
// Opening checks the segment: a foreign or corrupt segment, another element
// type, another layout, or a rank other than 1 or 2 throws ShmFormatError
// naming the segment, and so does a descriptor that says so; a missing name
// throws SystemError (ENOENT); a malformed descriptor is a TypeError. A
// ShmTensor of rank 1 or 2 opens the same segments and descriptors.
//
// Memory ordering: the array has no synchronisation of its own. For
// processes X and Y sharing an array, every write X makes to it before X
// sends a message on a `Channel` (or sets an event) is visible to Y after Y
// has received that message (or seen that event). Writes with no such
// message or event between them and the reader's access are a data race: the
// reader may see old values, or a mix of old and new. Hand the array over,
// do not share it while it is written.
//
// A ShmArray is used from one thread at a time, like the Eigen map it gives.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "forklift/shm.hpp"
#include "forklift/value.hpp"

namespace forklift {

// float16 elements. Here rather than in value.hpp, which does not include
// Eigen; Array::fromVector and Value's matrix conversion see it too.
template <>
constexpr DType dtypeOf<Eigen::half>() {
  return DType::F16;
}

namespace detail {
// The element types of ShmArray and ShmTensor.
template <class T>
inline constexpr bool kShmElement =
    (std::is_arithmetic_v<T> && !std::is_same_v<T, bool> && !std::is_const_v<T>) || std::is_same_v<T, Eigen::half>;

// What ShmArray and ShmTensor share: one segment of T elements and the
// accessors that only read it. Each view adds its shape.
template <class T>
class ShmView {
 public:
  T* data() noexcept { return static_cast<T*>(shm_.data()); }
  const T* data() const noexcept { return static_cast<const T*>(shm_.data()); }
  std::size_t bytes() const noexcept { return shm_.bytes(); }  // payload bytes
  const std::string& name() const noexcept { return shm_.name(); }
  bool valid() const noexcept { return shm_.valid(); }
  explicit operator bool() const noexcept { return valid(); }

  // The segment underneath: owns(), release(), creatorPid(), ...
  SharedMemory& segment() noexcept { return shm_; }
  const SharedMemory& segment() const noexcept { return shm_; }

 protected:
  ShmView() noexcept = default;
  explicit ShmView(SharedMemory shm) noexcept : shm_(std::move(shm)) {}
  ShmView(ShmView&&) noexcept = default;
  ShmView& operator=(ShmView&&) noexcept = default;
  ~ShmView() = default;

  SharedMemory shm_;
};

struct ArrayShape {
  std::int64_t rows = 0;
  std::int64_t cols = 0;
};
// Checks that `shm` holds `dtype` elements in rank 1 (n x 1) or rank 2,
// with `layout` when the rank is 2; returns the shape. Throws ShmFormatError.
ArrayShape checkArraySegment(const SharedMemory& shm, DType dtype, Layout layout);
// Opens the segment a descriptor (see ShmArray::describe) names and checks
// both. Throws TypeError for a malformed descriptor, ShmFormatError when the
// segment differs from it, SystemError when it cannot be opened.
SharedMemory openDescribedArray(const Value& descriptor, DType dtype, Layout layout, ArrayShape& shape);
Value describeArray(const SharedMemory& shm);
// "shared memory segment '<name>' is 3x4, <whose> 4x4"
[[noreturn]] void throwShapeMismatch(const std::string& name, ArrayShape have, ArrayShape want, const char* whose);
}  // namespace detail

template <class T, Layout L = Layout::RowMajor>
class ShmArray : public detail::ShmView<T> {
  static_assert(detail::kShmElement<T>, "ShmArray holds int8..uint64, float, double or Eigen::half");
  using Base = detail::ShmView<T>;
  using Base::shm_;

 public:
  using Scalar = T;
  using Index = Eigen::Index;
  static constexpr Layout kLayout = L;
  static constexpr int kEigenOrder = L == Layout::RowMajor ? Eigen::RowMajor : Eigen::ColMajor;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, kEigenOrder>;
  // The payload is 64-byte aligned, so Eigen may use its aligned loads.
  using MatrixMap = Eigen::Map<Matrix, Eigen::Aligned64>;
  using ConstMatrixMap = Eigen::Map<const Matrix, Eigen::Aligned64>;
  // Fixed-size view type; vectors get the storage order Eigen requires.
  template <int R, int C>
  using FixedMatrix = Eigen::Matrix<T, R, C,
                                    (R == 1 && C != 1)   ? Eigen::RowMajor
                                    : (C == 1 && R != 1) ? Eigen::ColMajor
                                                         : kEigenOrder>;

  ShmArray() noexcept = default;  // empty
  ShmArray(ShmArray&& o) noexcept : Base(std::move(o)), shape_(std::exchange(o.shape_, detail::ArrayShape{})) {}
  ShmArray& operator=(ShmArray&& o) noexcept {
    if (this != &o) {
      Base::operator=(std::move(o));
      shape_ = std::exchange(o.shape_, detail::ArrayShape{});
    }
    return *this;
  }
  ShmArray(const ShmArray&) = delete;
  ShmArray& operator=(const ShmArray&) = delete;

  // Frontend: creates a zero-filled rows x cols array. Throws what
  // SharedMemory's create throws; LimitError for a negative dimension.
  static ShmArray create(const ShmName& name, Index rows, Index cols) {
    SharedMemory shm(create_only, name, dtypeOf<T>(), {static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols)},
                     L);
    return ShmArray(std::move(shm), {rows, cols});
  }
  // Frontend: a 1-D array of n elements, seen as an n x 1 matrix.
  static ShmArray create(const ShmName& name, Index n) {
    SharedMemory shm(create_only, name, dtypeOf<T>(), {static_cast<std::int64_t>(n)}, L);
    return ShmArray(std::move(shm), {n, 1});
  }

  // Backend: opens by name; the shape comes from the segment's header.
  static ShmArray open(const std::string& name) {
    SharedMemory shm(open_only, name);
    const auto shape = detail::checkArraySegment(shm, dtypeOf<T>(), L);
    return ShmArray(std::move(shm), shape);
  }
  // Backend: opens by name and also checks the shape; ShmFormatError
  // ("... is 3x4, expected 4x4") when it differs.
  static ShmArray open(const std::string& name, Index rows, Index cols) {
    ShmArray a = open(name);
    if (a.rows() != rows || a.cols() != cols) detail::throwShapeMismatch(name, a.shape_, {rows, cols}, "expected");
    return a;
  }
  // Backend: opens from a describe() Value (e.g. a message argument), and
  // checks that the segment is still the one described. (A template taking
  // exactly Value, so that open("fk.name") picks the name overload.)
  template <class V>
    requires std::is_same_v<V, Value>
  static ShmArray open(const V& descriptor) {
    detail::ArrayShape shape;
    SharedMemory shm = detail::openDescribedArray(descriptor, dtypeOf<T>(), L, shape);
    return ShmArray(std::move(shm), shape);
  }

  // A Map value that fits in a Message: {name, dtype ("float64", ...),
  // shape (a list: [rows, cols], or [n] for rank 1), rows, cols, layout
  // ("row-major" / "column-major"), generation, and for an anonymous array
  // fd, a duplicate of its descriptor}.
  Value describe() const { return detail::describeArray(shm_); }

  MatrixMap matrix() noexcept { return MatrixMap(this->data(), shape_.rows, shape_.cols); }
  ConstMatrixMap matrix() const noexcept { return ConstMatrixMap(this->data(), shape_.rows, shape_.cols); }

  // A fixed-size view, e.g. fixed<3, 4>(). Throws ShmFormatError when the
  // array is not R x C.
  template <int R, int C>
  Eigen::Map<FixedMatrix<R, C>, Eigen::Aligned64> fixed() {
    if (shape_.rows != R || shape_.cols != C)
      detail::throwShapeMismatch(this->name(), shape_, {R, C}, "the fixed-size view wants");
    return Eigen::Map<FixedMatrix<R, C>, Eigen::Aligned64>(this->data());
  }

  // data(), bytes(), name(), valid(), segment(): from detail::ShmView.
  Index rows() const noexcept { return static_cast<Index>(shape_.rows); }
  Index cols() const noexcept { return static_cast<Index>(shape_.cols); }
  Index size() const noexcept { return rows() * cols(); }  // elements

 private:
  ShmArray(SharedMemory shm, detail::ArrayShape shape) noexcept : Base(std::move(shm)), shape_(shape) {}

  detail::ArrayShape shape_;
};

}  // namespace forklift
