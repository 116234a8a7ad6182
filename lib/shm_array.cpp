#include "forklift/shm_array.hpp"

#include <optional>

namespace forklift::detail {

namespace {

std::string segmentWhat(const std::string& name) { return "shared memory segment '" + name + "'"; }

std::string shapeText(ArrayShape s) { return std::to_string(s.rows) + "x" + std::to_string(s.cols); }

// Descriptor fields; `where` names the descriptor in every message.
class DescriptorReader {
 public:
  explicit DescriptorReader(const Value& v) : where_("shared memory descriptor") {
    map_ = v.getIf<Map>();
    if (!map_) throw TypeError(where_ + ": " + v.typeName() + " found, map wanted");
  }

  void setName(const std::string& name) { where_ = "shared memory descriptor of '" + name + "'"; }

  const Value* find(const char* key) const {
    for (const auto& [k, v] : *map_)
      if (k == key) return &v;
    return nullptr;
  }

  template <class T>
  T get(const char* key) const {
    const Value* v = find(key);
    if (!v) throw TypeError(where_ + ": missing field '" + key + "'");
    return convert<T>(*v, key);
  }

  template <class T>
  std::optional<T> getOptional(const char* key) const {
    const Value* v = find(key);
    if (!v) return std::nullopt;
    return convert<T>(*v, key);
  }

  [[noreturn]] void fail(const std::string& what) const { throw TypeError(where_ + ": " + what); }

 private:
  template <class T>
  T convert(const Value& v, const char* key) const {
    try {
      return v.as<T>();
    } catch (const TypeError& e) {
      throw TypeError(where_ + ": field '" + key + "': " + e.what());
    }
  }

  const Map* map_;
  std::string where_;
};

}  // namespace

ArrayShape checkArraySegment(const SharedMemory& shm, DType dtype, Layout layout) {
  const std::string seg = segmentWhat(shm.name());
  const auto have = shm.dtype();
  if (!have) throw ShmFormatError(seg + " holds raw bytes, not " + dtypeName(dtype));
  if (*have != dtype) throw ShmFormatError(seg + " holds " + dtypeName(*have) + ", not " + dtypeName(dtype));
  const auto shape = shm.shape();
  if (shape.size() == 1) return {shape[0], 1};
  if (shape.size() != 2)
    throw ShmFormatError(seg + " has rank " + std::to_string(shape.size()) + "; ShmArray needs rank 1 or 2");
  if (shm.layout() != layout)
    throw ShmFormatError(seg + " is " + layoutName(shm.layout()) + ", this ShmArray is " + layoutName(layout));
  return {shape[0], shape[1]};
}

SharedMemory openDescribedArray(const Value& descriptor, DType dtype, Layout layout, ArrayShape& shape) {
  DescriptorReader d(descriptor);
  const auto name = d.get<std::string>("name");
  d.setName(name);
  const auto dtypeText = d.get<std::string>("dtype");
  if (dtypeText != dtypeName(dtype)) d.fail("dtype " + dtypeText + ", this ShmArray holds " + dtypeName(dtype));
  const auto layoutText = d.get<std::string>("layout");
  if (layoutText != layoutName(layout)) d.fail("layout " + layoutText + ", this ShmArray is " + layoutName(layout));
  const ArrayShape described{d.get<std::int64_t>("rows"), d.get<std::int64_t>("cols")};
  const auto generation = d.getOptional<std::int64_t>("generation");

  SharedMemory shm(open_only, name);
  shape = checkArraySegment(shm, dtype, layout);
  if (shape.rows != described.rows || shape.cols != described.cols)
    throwShapeMismatch(name, shape, described, "the descriptor says");
  if (generation && static_cast<std::uint64_t>(*generation) != shm.generation())
    throw ShmFormatError(segmentWhat(name) + " was re-created after the descriptor was made (generation " +
                         std::to_string(shm.generation()) + ", the descriptor says " + std::to_string(*generation) +
                         ")");
  return shm;
}

Value describeArray(const SharedMemory& shm, ArrayShape shape) {
  if (!shm.valid() || !shm.dtype()) throw Error("cannot describe an empty ShmArray");
  return Map{{"name", shm.name()},
             {"dtype", dtypeName(*shm.dtype())},
             {"rows", shape.rows},
             {"cols", shape.cols},
             {"layout", layoutName(shm.layout())},
             {"generation", static_cast<std::int64_t>(shm.generation())}};
}

void throwShapeMismatch(const std::string& name, ArrayShape have, ArrayShape want, const char* whose) {
  throw ShmFormatError(segmentWhat(name) + " is " + shapeText(have) + ", " + whose + " " + shapeText(want));
}

}  // namespace forklift::detail
