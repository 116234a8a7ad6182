#include "forklift/shm_tensor.hpp"

#include "shm_descriptor.hpp"

namespace forklift::detail {

std::vector<std::int64_t> checkTensorSegment(const SharedMemory& shm, DType dtype, std::size_t rank, Layout layout) {
  checkElementType(shm, dtype);
  auto shape = shm.shape();
  if (shape.size() != rank)
    throw ShmFormatError(segmentWhat(shm.name()) + " has rank " + std::to_string(shape.size()) +
                         ", this ShmTensor has rank " + std::to_string(rank));
  checkLayout(shm, layout, "ShmTensor");
  return shape;
}

SharedMemory openDescribedTensor(const Value& descriptor, DType dtype, std::size_t rank, Layout layout) {
  DescriptorReader d(descriptor);
  const auto described = d.get<std::vector<std::int64_t>>("shape");
  if (described.size() != rank)
    d.mismatch("shape " + shapeText(described) + " has rank " + std::to_string(described.size()) +
           ", this ShmTensor has rank " + std::to_string(rank));
  SharedMemory shm = d.open(dtype, layout, rank >= 2, "ShmTensor");
  const auto shape = checkTensorSegment(shm, dtype, rank, layout);
  if (shape != described) throwTensorShapeMismatch(d.name(), shape, described, "the descriptor says");
  return shm;
}

Value describeTensor(const SharedMemory& shm) { return describeArraySegment(shm, "ShmTensor"); }

void throwTensorShapeMismatch(const std::string& name, const std::vector<std::int64_t>& have,
                              const std::vector<std::int64_t>& want, const char* whose) {
  throw ShmFormatError(segmentWhat(name) + " is " + shapeText(have) + ", " + whose + " " + shapeText(want));
}

void throwIndexOutOfRange(const std::string& name, const char* view, std::size_t axis, std::int64_t index,
                          std::int64_t extent) {
  throw LimitError(segmentWhat(name) + ": " + view + "() index " + std::to_string(index) + " on axis " +
                   std::to_string(axis) + " is out of range, the axis has length " + std::to_string(extent));
}

}  // namespace forklift::detail
