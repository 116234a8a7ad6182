#include "shm_descriptor.hpp"

namespace forklift::detail {

std::string segmentWhat(const std::string& name) { return "shared memory segment '" + name + "'"; }

std::string shapeText(const std::vector<std::int64_t>& shape) {
  if (shape.empty()) return "[]";
  std::string s;
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s;
}

void checkElementType(const SharedMemory& shm, DType dtype) {
  const std::string seg = segmentWhat(shm.name());
  const auto have = shm.dtype();
  if (!have) throw ShmFormatError(seg + " holds raw bytes, not " + dtypeName(dtype));
  if (shm.kind() != ShmKind::Array)
    throw ShmFormatError(seg + " is a " + shmKindName(shm.kind()) + " segment, not an array");
  if (*have != dtype) throw ShmFormatError(seg + " holds " + dtypeName(*have) + ", not " + dtypeName(dtype));
}

void checkLayout(const SharedMemory& shm, Layout layout, const char* view) {
  if (shm.shape().size() >= 2 && shm.layout() != layout)
    throw ShmFormatError(segmentWhat(shm.name()) + " is " + layoutName(shm.layout()) + ", this " + view + " is " +
                         layoutName(layout));
}

Value describeArraySegment(const SharedMemory& shm, const char* view) {
  if (!shm.valid() || !shm.dtype()) throw Error(std::string("cannot describe an empty ") + view);
  const auto shape = shm.shape();
  List dims;
  for (std::int64_t d : shape) dims.emplace_back(d);
  Map m{{"name", shm.name()}, {"dtype", dtypeName(*shm.dtype())}, {"shape", std::move(dims)}};
  if (shape.size() == 1 || shape.size() == 2) {
    m.emplace_back("rows", shape[0]);
    m.emplace_back("cols", shape.size() == 2 ? shape[1] : 1);
  }
  m.emplace_back("layout", layoutName(shm.layout()));
  m.emplace_back("generation", static_cast<std::int64_t>(shm.generation()));
  if (shm.anonymous()) m.emplace_back("fd", Fd::dup(shm.fd()));
  return m;
}

DescriptorReader::DescriptorReader(const Value& v) : value_(v), where_("shared memory descriptor") {
  map_ = v.getIf<Map>();
  if (!map_) fail(v.typeName() + " found, map wanted");
  name_ = get<std::string>("name");
  where_ = "shared memory descriptor of '" + name_ + "'";
}

const Value* DescriptorReader::find(const char* key) const {
  for (const auto& [k, v] : *map_)
    if (k == key) return &v;
  return nullptr;
}

void DescriptorReader::fail(const std::string& what) const { throw TypeError(where_ + ": " + what); }

void DescriptorReader::mismatch(const std::string& what) const { throw ShmFormatError(where_ + ": " + what); }

SharedMemory DescriptorReader::open(DType dtype, Layout layout, bool checkLayout, const char* view) const {
  const auto dtypeText = get<std::string>("dtype");
  if (dtypeText != dtypeName(dtype))
    mismatch("dtype " + dtypeText + ", this " + view + " holds " + dtypeName(dtype));
  const auto layoutText = get<std::string>("layout");
  if (checkLayout && layoutText != layoutName(layout))
    mismatch("layout " + layoutText + ", this " + view + " is " + layoutName(layout));

  // Checks the generation first: a re-created segment may differ in
  // anything else.
  SharedMemory shm(open_only, value_);
  checkElementType(shm, dtype);
  return shm;
}

}  // namespace forklift::detail
