// forklift - what ShmArray and ShmTensor share (internal)
//
// Both typed views open the same kind of segment (ShmKind::Array) and travel
// as the same descriptor Value, {name, dtype, shape, [rows, cols,] layout,
// generation, [fd]}; rows and cols are there for rank 1 and 2 only, so that
// a matrix view opens the descriptor of any array it can see, and fd (the
// memfd) for anonymous segments only. The checks and
// the descriptor reading live here once, and every error names the segment.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "forklift/shm.hpp"
#include "forklift/value.hpp"

namespace forklift::detail {

// "shared memory segment '<name>'"
std::string segmentWhat(const std::string& name);
// "2x3x4"
std::string shapeText(const std::vector<std::int64_t>& shape);

// Throws ShmFormatError unless `shm` is an array segment of `dtype`.
void checkElementType(const SharedMemory& shm, DType dtype);
// Throws ShmFormatError when `shm` has rank 2 or more and another layout
// than `layout`; `view` names the asking type ("ShmArray", "ShmTensor").
void checkLayout(const SharedMemory& shm, Layout layout, const char* view);

// The descriptor of an array segment; `view` names the type in the error
// for an empty one.
Value describeArraySegment(const SharedMemory& shm, const char* view);

// Descriptor fields; `where` names the descriptor in every message.
class DescriptorReader {
 public:
  // Throws TypeError unless `v` is a map with a string "name". Keeps a
  // reference to `v`.
  explicit DescriptorReader(const Value& v);

  const std::string& name() const noexcept { return name_; }
  const Value* find(const char* key) const;

  template <class T>
  T get(const char* key) const {
    const Value* v = find(key);
    if (!v) fail(std::string("missing field '") + key + "'");
    return convert<T>(*v, key);
  }
  template <class T>
  std::optional<T> getOptional(const char* key) const {
    const Value* v = find(key);
    if (!v) return std::nullopt;
    return convert<T>(*v, key);
  }

  // Checks the dtype and, when `checkLayout`, the layout fields against the
  // receiving view (ShmFormatError), then opens the segment (by its
  // descriptor or name), checks its element type, and that it is the one
  // described (the generation, when the descriptor has one). The caller
  // checks shape, rank and layout.
  SharedMemory open(DType dtype, Layout layout, bool checkLayout, const char* view) const;

  // A malformed descriptor: TypeError.
  [[noreturn]] void fail(const std::string& what) const;
  // A well-formed descriptor of a segment the receiving view cannot use:
  // ShmFormatError.
  [[noreturn]] void mismatch(const std::string& what) const;

 private:
  template <class T>
  T convert(const Value& v, const char* key) const {
    try {
      return v.as<T>();
    } catch (const TypeError& e) {
      fail(std::string("field '") + key + "': " + e.what());
    }
  }

  const Value& value_;
  const Map* map_ = nullptr;
  std::string name_;
  std::string where_;
};

}  // namespace forklift::detail
