// forklift - Value: the dynamically typed argument of a message
//
// A `Value` is one of: nil, bool, 64-bit signed int, double, string, bytes,
// list, map (string keys, insertion order kept), a small typed numeric
// `Array` (element type + shape + data, row-major like numpy's default) or
// an open file descriptor (`Fd`). Values are what travel inside a
// `Message`; bulk data belongs in shared memory, not here.
//
// An `Fd` owns its descriptor, shared by its copies (so Values and Messages
// stay copyable): the last copy to go closes it. `take()` moves the
// descriptor out of every copy at once, for code that wants it for itself.
// Only a `Channel` carries descriptors (SCM_RIGHTS, see channel.hpp); the
// receiver gets its own descriptors for the same open files, close-on-exec,
// owned by the received Message until taken. A descriptor travels once per
// place it appears in a message.
//
// Conversions out of a Value (`as<T>()`) are strict: an int widens to a
// double, but nothing narrows silently. An int that does not fit the asked
// integer type, a double asked as an int, or a string asked as a number throws
// `TypeError` saying what was found and what was wanted.
//
// Eigen matrices and `std::vector` of arithmetic types convert to and from
// `Array`. The Eigen support is duck-typed (anything with `rows()`, `cols()`,
// `operator()(i, j)` and a `Scalar`), so this header does not include Eigen.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/error.hpp"

namespace forklift {

// Element type of an Array. The numbering is part of the wire format.
// F16 is IEEE half precision, `Eigen::half`; this header does not include
// Eigen, so dtypeOf<Eigen::half>() is defined in shm_array.hpp.
enum class DType : std::uint8_t {
  I8 = 1, U8, I16, U16, I32, U32, I64, U64, F32, F64, F16,
};

const char* dtypeName(DType t) noexcept;   // "int8", ..., "float64", "float16"
std::size_t dtypeSize(DType t) noexcept;   // bytes per element
bool dtypeValid(std::uint8_t raw) noexcept;

template <class T>
constexpr DType dtypeOf() {
  using U = std::remove_cv_t<T>;
  static_assert(std::is_arithmetic_v<U> && !std::is_same_v<U, bool>,
                "forklift arrays hold arithmetic types other than bool");
  if constexpr (std::is_floating_point_v<U>) {
    static_assert(sizeof(U) == 4 || sizeof(U) == 8, "float or double only");
    return sizeof(U) == 4 ? DType::F32 : DType::F64;
  } else if constexpr (std::is_signed_v<U>) {
    return sizeof(U) == 1 ? DType::I8 : sizeof(U) == 2 ? DType::I16
         : sizeof(U) == 4 ? DType::I32 : DType::I64;
  } else {
    return sizeof(U) == 1 ? DType::U8 : sizeof(U) == 2 ? DType::U16
         : sizeof(U) == 4 ? DType::U32 : DType::U64;
  }
}

using Bytes = std::vector<std::uint8_t>;

// A small typed numeric array: dtype, shape, row-major data.
class Array {
 public:
  static constexpr std::size_t kMaxRank = 8;

  Array() = default;
  // Throws TypeError when data.size() != product(shape) * dtypeSize(dtype)
  // or the rank exceeds kMaxRank.
  Array(DType dtype, std::vector<std::int64_t> shape, Bytes data);

  template <class T>
  static Array fromVector(const std::vector<T>& v) {
    Bytes data(v.size() * sizeof(T));
    if (!v.empty()) std::memcpy(data.data(), v.data(), data.size());
    return Array(dtypeOf<T>(), {static_cast<std::int64_t>(v.size())}, std::move(data));
  }

  // Any Eigen dense matrix or vector (or anything with the same surface).
  // The result has shape {rows, cols} and row-major data, whatever the
  // storage order of the source.
  template <class M>
  static Array fromMatrix(const M& m) {
    using T = typename M::Scalar;
    const auto rows = static_cast<std::int64_t>(m.rows());
    const auto cols = static_cast<std::int64_t>(m.cols());
    Bytes data(static_cast<std::size_t>(rows * cols) * sizeof(T));
    T* out = reinterpret_cast<T*>(data.data());
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) std::memcpy(out + i * cols + j, &m(i, j), sizeof(T));
    return Array(dtypeOf<T>(), {rows, cols}, std::move(data));
  }

  // Throws TypeError when the element type is not T.
  template <class T>
  std::vector<T> toVector() const {
    checkDType(dtypeOf<T>());
    std::vector<T> v(count());
    if (!v.empty()) std::memcpy(v.data(), data_.data(), data_.size());
    return v;
  }

  // Rank 2 gives rows x cols; rank 1 gives a column (n x 1); a fixed-size
  // target must match the shape exactly. Throws TypeError otherwise.
  template <class M>
  M toMatrix() const {
    using T = typename M::Scalar;
    checkDType(dtypeOf<T>());
    const auto [rows, cols] = matrixShape();
    checkFixedShape(M::RowsAtCompileTime, M::ColsAtCompileTime, rows, cols);
    M m;
    m.resize(rows, cols);
    const T* in = reinterpret_cast<const T*>(data_.data());
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) std::memcpy(&m(i, j), in + i * cols + j, sizeof(T));
    return m;
  }

  DType dtype() const noexcept { return dtype_; }
  const std::vector<std::int64_t>& shape() const noexcept { return shape_; }
  std::size_t count() const noexcept;  // number of elements
  const Bytes& data() const noexcept { return data_; }
  std::string describe() const;  // "float64[3x4]"

  bool operator==(const Array& o) const {
    return dtype_ == o.dtype_ && shape_ == o.shape_ && data_ == o.data_;
  }

 private:
  void checkDType(DType wanted) const;
  std::pair<std::int64_t, std::int64_t> matrixShape() const;
  static void checkFixedShape(int fixedRows, int fixedCols, std::int64_t rows, std::int64_t cols);

  DType dtype_ = DType::F64;
  std::vector<std::int64_t> shape_{0};
  Bytes data_;
};

// An open file descriptor as a message argument. Copies share one owned
// descriptor; the last copy closes it. Thread-safe like a shared_ptr: copies
// may be used from different threads, and take() hands the descriptor to
// exactly one caller.
class Fd {
 public:
  Fd() noexcept = default;  // empty: get() == -1
  // Adopts `fd` (an empty UniqueFd makes an empty Fd).
  explicit Fd(detail::UniqueFd fd);
  // A close-on-exec duplicate of `fd`, which the caller keeps. Throws
  // SystemError when `fd` is not open or no descriptor is left.
  static Fd dup(int fd);

  // The descriptor, -1 when empty or taken. Valid while a copy holds it.
  int get() const noexcept;
  bool valid() const noexcept { return get() >= 0; }
  // Moves the descriptor out of this Fd and of all its copies; empty when
  // it was taken already.
  detail::UniqueFd take() const noexcept;

  // The same descriptor: copies of one Fd (two empty Fds are equal too).
  bool operator==(const Fd& o) const noexcept { return state_ == o.state_ || (!valid() && !o.valid()); }

 private:
  struct State;
  std::shared_ptr<State> state_;
};

class Value;
using List = std::vector<Value>;
// A map keeps its keys in insertion order; lookups are linear, which is the
// fast choice for the handful of arguments a message carries.
using Map = std::vector<std::pair<std::string, Value>>;

namespace detail {
template <class T>
struct IsStdVector : std::false_type {};
template <class T, class A>
struct IsStdVector<std::vector<T, A>> : std::true_type {};

template <class M>
concept MatrixLike = requires(const M& m) {
  typename M::Scalar;
  { m.rows() } -> std::convertible_to<std::ptrdiff_t>;
  { m.cols() } -> std::convertible_to<std::ptrdiff_t>;
  M::RowsAtCompileTime;
};
}  // namespace detail

class Value {
 public:
  enum class Kind : std::uint8_t { Nil, Bool, Int, Double, String, Bytes, List, Map, Array, Fd };

  Value() noexcept = default;
  // Out of line: copying and destroying the variant of every kind is code
  // each user file would otherwise compile again (build time).
  Value(const Value&);
  Value(Value&&) noexcept;
  Value& operator=(const Value&);
  Value& operator=(Value&&) noexcept;
  ~Value();
  Value(std::nullptr_t) noexcept {}
  Value(bool b) noexcept : v_(b) {}
  template <class I>
    requires(std::is_integral_v<I> && !std::is_same_v<I, bool> && !std::is_same_v<I, char>)
  Value(I i) : v_(toInt64(i)) {}
  Value(double d) noexcept : v_(d) {}
  Value(float f) noexcept : v_(static_cast<double>(f)) {}
  Value(const char* s) : v_(std::string(s)) {}
  Value(std::string s) noexcept : v_(std::move(s)) {}
  Value(std::string_view s) : v_(std::string(s)) {}
  Value(forklift::Bytes b) noexcept : v_(std::move(b)) {}
  Value(forklift::List l) noexcept : v_(std::move(l)) {}
  Value(forklift::Map m) noexcept : v_(std::move(m)) {}
  Value(forklift::Array a) noexcept : v_(std::move(a)) {}
  Value(forklift::Fd fd) noexcept : v_(std::move(fd)) {}
  Value(detail::UniqueFd fd) : v_(forklift::Fd(std::move(fd))) {}
  template <class T>
    requires std::is_arithmetic_v<T> && (!std::is_same_v<T, bool>)
  Value(const std::vector<T>& v) : v_(Array::fromVector(v)) {}
  template <detail::MatrixLike M>
  Value(const M& m) : v_(Array::fromMatrix(m)) {}

  Kind kind() const noexcept { return static_cast<Kind>(v_.index()); }
  bool isNil() const noexcept { return kind() == Kind::Nil; }
  // "int", "string", "array<float64>[3x4]", ...
  std::string typeName() const;
  static const char* kindName(Kind k) noexcept;

  // Strict conversion, see the header comment. Throws TypeError whose text
  // is "<found> found, <wanted> wanted" (callers add their context).
  template <class T>
  T as() const;

  // Direct access without conversion; nullptr when the kind differs.
  template <class T>
  const T* getIf() const noexcept {
    return std::get_if<T>(&v_);
  }
  template <class T>
  T* getIf() noexcept {
    return std::get_if<T>(&v_);
  }

  // The descriptor of an Fd value, moved out of it and of all its copies
  // (empty when taken already). Throws TypeError when this is not an Fd.
  detail::UniqueFd takeFd() const;

  bool operator==(const Value& o) const { return v_ == o.v_; }

  std::string toString() const;  // compact, for logs

 private:
  template <class I>
  static std::int64_t toInt64(I i) {
    if constexpr (std::is_unsigned_v<I> && sizeof(I) >= sizeof(std::int64_t)) {
      if (i > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        throw TypeError("unsigned integer " + std::to_string(i) + " does not fit int64");
    }
    return static_cast<std::int64_t>(i);
  }
  [[noreturn]] void mismatch(const char* wanted) const;
  std::int64_t intInRange(std::int64_t lo, std::uint64_t hi, const char* wanted) const;

  std::variant<std::monostate, bool, std::int64_t, double, std::string, forklift::Bytes,
               forklift::List, forklift::Map, forklift::Array, forklift::Fd>
      v_;
};

namespace detail {
template <class T>
constexpr const char* typeNameOf() {
  if constexpr (std::is_same_v<T, bool>) return "bool";
  else if constexpr (std::is_same_v<T, std::int8_t>) return "int8";
  else if constexpr (std::is_same_v<T, std::uint8_t>) return "uint8";
  else if constexpr (std::is_same_v<T, std::int16_t>) return "int16";
  else if constexpr (std::is_same_v<T, std::uint16_t>) return "uint16";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "int32";
  else if constexpr (std::is_same_v<T, std::uint32_t>) return "uint32";
  else if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) return "int64";
  else if constexpr (std::is_integral_v<T>) return "uint64";
  else if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, std::string>) return "string";
  else if constexpr (std::is_same_v<T, Bytes>) return "bytes";
  else if constexpr (std::is_same_v<T, List>) return "list";
  else if constexpr (std::is_same_v<T, Map>) return "map";
  else if constexpr (std::is_same_v<T, Array>) return "array";
  else if constexpr (std::is_same_v<T, Fd>) return "fd";
  else if constexpr (std::is_same_v<T, Value>) return "value";
  else if constexpr (IsStdVector<T>::value) return "vector";
  else if constexpr (MatrixLike<T>) return "matrix";
  else return "unsupported type";
}
}  // namespace detail

template <class T>
T Value::as() const {
  if constexpr (std::is_same_v<T, Value>) {
    return *this;
  } else if constexpr (std::is_same_v<T, bool>) {
    if (auto p = std::get_if<bool>(&v_)) return *p;
    mismatch("bool");
  } else if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(intInRange(static_cast<std::int64_t>(std::numeric_limits<T>::min()),
                                     static_cast<std::uint64_t>(std::numeric_limits<T>::max()),
                                     detail::typeNameOf<T>()));
  } else if constexpr (std::is_floating_point_v<T>) {
    if (auto p = std::get_if<double>(&v_)) {
      if constexpr (sizeof(T) < sizeof(double)) {
        const double a = *p < 0 ? -*p : *p;
        if (a > static_cast<double>(std::numeric_limits<T>::max()) && a != std::numeric_limits<double>::infinity())
          mismatch("float (value out of range)");
      }
      return static_cast<T>(*p);
    }
    if (auto p = std::get_if<std::int64_t>(&v_)) return static_cast<T>(*p);  // widening
    mismatch(detail::typeNameOf<T>());
  } else if constexpr (std::is_same_v<T, std::string> || std::is_same_v<T, forklift::Bytes> ||
                       std::is_same_v<T, forklift::List> || std::is_same_v<T, forklift::Map> ||
                       std::is_same_v<T, forklift::Array> || std::is_same_v<T, forklift::Fd>) {
    if (auto p = std::get_if<T>(&v_)) return *p;
    mismatch(detail::typeNameOf<T>());
  } else if constexpr (detail::IsStdVector<T>::value) {
    using E = typename T::value_type;
    if constexpr (std::is_arithmetic_v<E> && !std::is_same_v<E, bool>) {
      if (auto p = std::get_if<forklift::Array>(&v_)) {
        if (p->dtype() != dtypeOf<E>() || p->shape().size() != 1)
          mismatch((std::string("array<") + dtypeName(dtypeOf<E>()) + "> of rank 1").c_str());
        return p->template toVector<E>();
      }
    }
    if (auto p = std::get_if<forklift::List>(&v_)) {
      T out;
      out.reserve(p->size());
      for (const Value& e : *p) out.push_back(e.as<E>());
      return out;
    }
    mismatch("list or array");
  } else if constexpr (detail::MatrixLike<T>) {
    if (auto p = std::get_if<forklift::Array>(&v_)) {
      if (p->dtype() != dtypeOf<typename T::Scalar>())
        mismatch((std::string("array<") + dtypeName(dtypeOf<typename T::Scalar>()) + ">").c_str());
      return p->template toMatrix<T>();
    }
    mismatch("array");
  } else {
    static_assert(sizeof(T) == 0, "Value::as<T>: T is not a supported argument type");
  }
}

}  // namespace forklift
