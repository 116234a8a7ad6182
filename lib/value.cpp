#include "forklift/value.hpp"

#include <fcntl.h>

#include <atomic>
#include <cerrno>
#include <cstdio>

namespace forklift {

const char* dtypeName(DType t) noexcept {
  switch (t) {
    case DType::I8: return "int8";
    case DType::U8: return "uint8";
    case DType::I16: return "int16";
    case DType::U16: return "uint16";
    case DType::I32: return "int32";
    case DType::U32: return "uint32";
    case DType::I64: return "int64";
    case DType::U64: return "uint64";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::F16: return "float16";
  }
  return "invalid";
}

std::size_t dtypeSize(DType t) noexcept {
  switch (t) {
    case DType::I8: case DType::U8: return 1;
    case DType::I16: case DType::U16: case DType::F16: return 2;
    case DType::I32: case DType::U32: case DType::F32: return 4;
    case DType::I64: case DType::U64: case DType::F64: return 8;
  }
  return 0;
}

bool dtypeValid(std::uint8_t raw) noexcept {
  return raw >= static_cast<std::uint8_t>(DType::I8) && raw <= static_cast<std::uint8_t>(DType::F16);
}

// ---------------------------------------------------------------- Array

Array::Array(DType dtype, std::vector<std::int64_t> shape, Bytes data)
    : dtype_(dtype), shape_(std::move(shape)), data_(std::move(data)) {
  if (!dtypeValid(static_cast<std::uint8_t>(dtype)))
    throw TypeError("array: invalid element type " + std::to_string(static_cast<int>(dtype)));
  if (shape_.size() > kMaxRank)
    throw TypeError("array: rank " + std::to_string(shape_.size()) + " exceeds the maximum " +
                    std::to_string(kMaxRank));
  // Overflow-checked product: a shape must describe exactly the bytes given.
  std::uint64_t n = 1;
  for (std::int64_t d : shape_) {
    if (d < 0) throw TypeError("array: negative dimension in shape");
    if (d != 0 && n > std::numeric_limits<std::uint64_t>::max() / static_cast<std::uint64_t>(d))
      throw TypeError("array: shape overflows");
    n *= static_cast<std::uint64_t>(d);
  }
  if (n > std::numeric_limits<std::uint64_t>::max() / dtypeSize(dtype) ||
      n * dtypeSize(dtype) != data_.size())
    throw TypeError("array: " + describe() + " needs " + std::to_string(n) + " elements of " +
                    std::to_string(dtypeSize(dtype)) + " bytes, got " + std::to_string(data_.size()) +
                    " bytes");
}

std::size_t Array::count() const noexcept {
  std::size_t n = 1;
  for (std::int64_t d : shape_) n *= static_cast<std::size_t>(d);
  return n;
}

std::string Array::describe() const {
  std::string s = dtypeName(dtype_);
  s += '[';
  for (std::size_t i = 0; i < shape_.size(); ++i) {
    if (i) s += 'x';
    s += std::to_string(shape_[i]);
  }
  s += ']';
  return s;
}

void Array::checkDType(DType wanted) const {
  if (wanted != dtype_)
    throw TypeError(std::string("array<") + dtypeName(dtype_) + "> found, array<" + dtypeName(wanted) +
                    "> wanted");
}

std::pair<std::int64_t, std::int64_t> Array::matrixShape() const {
  if (shape_.size() == 2) return {shape_[0], shape_[1]};
  if (shape_.size() == 1) return {shape_[0], 1};
  throw TypeError("array " + describe() + " has rank " + std::to_string(shape_.size()) +
                  ", a matrix wants rank 1 or 2");
}

void Array::checkFixedShape(int fixedRows, int fixedCols, std::int64_t rows, std::int64_t cols) {
  if ((fixedRows >= 0 && fixedRows != rows) || (fixedCols >= 0 && fixedCols != cols))
    throw TypeError("array of " + std::to_string(rows) + "x" + std::to_string(cols) +
                    " does not fit a fixed-size matrix of " +
                    (fixedRows >= 0 ? std::to_string(fixedRows) : std::string("N")) + "x" +
                    (fixedCols >= 0 ? std::to_string(fixedCols) : std::string("N")));
}

// ---------------------------------------------------------------- Fd

// The one descriptor all copies of an Fd share. Atomic so that take() on
// one copy and get() on another, in two threads, do not race.
struct Fd::State {
  explicit State(int fd) noexcept : fd(fd) {}
  ~State() { detail::UniqueFd last(fd.load()); }  // closes what nobody took
  State(const State&) = delete;
  State& operator=(const State&) = delete;
  std::atomic<int> fd;
};

Fd::Fd(detail::UniqueFd fd) {
  if (fd) state_ = std::make_shared<State>(fd.release());
}

Fd Fd::dup(int fd) {
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw SystemError(errno, "cannot duplicate descriptor " + std::to_string(fd));
  return Fd(detail::UniqueFd(copy));
}

int Fd::get() const noexcept { return state_ ? state_->fd.load() : -1; }

detail::UniqueFd Fd::take() const noexcept {
  return detail::UniqueFd(state_ ? state_->fd.exchange(-1) : -1);
}

// ---------------------------------------------------------------- Value

Value::Value(const Value&) = default;
Value::Value(Value&&) noexcept = default;
Value& Value::operator=(const Value&) = default;
Value& Value::operator=(Value&&) noexcept = default;
Value::~Value() = default;

const char* Value::kindName(Kind k) noexcept {
  switch (k) {
    case Kind::Nil: return "nil";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Double: return "double";
    case Kind::String: return "string";
    case Kind::Bytes: return "bytes";
    case Kind::List: return "list";
    case Kind::Map: return "map";
    case Kind::Array: return "array";
    case Kind::Fd: return "fd";
  }
  return "invalid";
}

std::string Value::typeName() const {
  if (auto a = std::get_if<forklift::Array>(&v_)) return "array " + a->describe();
  return kindName(kind());
}

detail::UniqueFd Value::takeFd() const {
  const auto* f = std::get_if<forklift::Fd>(&v_);
  if (!f) mismatch("fd");
  return f->take();
}

void Value::mismatch(const char* wanted) const {
  throw TypeError(typeName() + " found, " + wanted + " wanted");
}

std::int64_t Value::intInRange(std::int64_t lo, std::uint64_t hi, const char* wanted) const {
  const auto* p = std::get_if<std::int64_t>(&v_);
  if (!p) mismatch(wanted);
  const std::int64_t v = *p;
  if (v < lo || (v > 0 && static_cast<std::uint64_t>(v) > hi))
    throw TypeError("int " + std::to_string(v) + " found, " + wanted + " wanted (out of range)");
  return v;
}

std::string Value::toString() const {
  switch (kind()) {
    case Kind::Nil: return "nil";
    case Kind::Bool: return std::get<bool>(v_) ? "true" : "false";
    case Kind::Int: return std::to_string(std::get<std::int64_t>(v_));
    case Kind::Double: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%g", std::get<double>(v_));
      return buf;
    }
    case Kind::String: return '"' + std::get<std::string>(v_) + '"';
    case Kind::Bytes: return "bytes[" + std::to_string(std::get<forklift::Bytes>(v_).size()) + "]";
    case Kind::List: {
      std::string s = "[";
      const auto& l = std::get<forklift::List>(v_);
      for (std::size_t i = 0; i < l.size(); ++i) s += (i ? ", " : "") + l[i].toString();
      return s + "]";
    }
    case Kind::Map: {
      std::string s = "{";
      const auto& m = std::get<forklift::Map>(v_);
      for (std::size_t i = 0; i < m.size(); ++i) s += (i ? ", " : "") + m[i].first + ": " + m[i].second.toString();
      return s + "}";
    }
    case Kind::Array: return std::get<forklift::Array>(v_).describe();
    case Kind::Fd: {
      const int fd = std::get<forklift::Fd>(v_).get();
      return fd < 0 ? std::string("fd(empty)") : "fd(" + std::to_string(fd) + ")";
    }
  }
  return "?";
}

}  // namespace forklift
