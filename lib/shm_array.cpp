#include "forklift/shm_array.hpp"

#include "shm_descriptor.hpp"

namespace forklift::detail {

namespace {

std::string shapeText(ArrayShape s) { return std::to_string(s.rows) + "x" + std::to_string(s.cols); }

}  // namespace

ArrayShape checkArraySegment(const SharedMemory& shm, DType dtype, Layout layout) {
  checkElementType(shm, dtype);
  const auto shape = shm.shape();
  if (shape.size() != 1 && shape.size() != 2)
    throw ShmFormatError(segmentWhat(shm.name()) + " has rank " + std::to_string(shape.size()) +
                         "; ShmArray needs rank 1 or 2 (ShmTensor opens any rank)");
  checkLayout(shm, layout, "ShmArray");
  return shape.size() == 1 ? ArrayShape{shape[0], 1} : ArrayShape{shape[0], shape[1]};
}

SharedMemory openDescribedArray(const Value& descriptor, DType dtype, Layout layout, ArrayShape& shape) {
  DescriptorReader d(descriptor);
  const ArrayShape described{d.get<std::int64_t>("rows"), d.get<std::int64_t>("cols")};
  // rows and cols say all a matrix needs; shape, when given, is checked too.
  const auto describedShape = d.getOptional<std::vector<std::int64_t>>("shape");
  const bool rank1 = describedShape && describedShape->size() == 1;
  SharedMemory shm = d.open(dtype, layout, !rank1, "ShmArray");
  shape = checkArraySegment(shm, dtype, layout);
  if (shape.rows != described.rows || shape.cols != described.cols)
    throwShapeMismatch(d.name(), shape, described, "the descriptor says");
  if (describedShape && *describedShape != shm.shape())
    throw ShmFormatError(segmentWhat(d.name()) + " has shape " + detail::shapeText(shm.shape()) +
                         ", the descriptor says " + detail::shapeText(*describedShape));
  return shm;
}

Value describeArray(const SharedMemory& shm) { return describeArraySegment(shm, "ShmArray"); }

void throwShapeMismatch(const std::string& name, ArrayShape have, ArrayShape want, const char* whose) {
  throw ShmFormatError(segmentWhat(name) + " is " + shapeText(have) + ", " + whose + " " + shapeText(want));
}

}  // namespace forklift::detail
