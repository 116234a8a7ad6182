#include "frame_check.hpp"

#include <cstdint>

#include "forklift/value.hpp"

namespace forklift::dds::detail {

namespace {
std::string seqText(const forklift_dds_Frame& f) { return "frame " + std::to_string(f.seq) + ": "; }
}  // namespace

std::string checkFrame(const forklift_dds_Frame& f, const RingFormat& format) {
  const std::size_t bytes = f.payload._length;
  if (f.payload._length > 0 && f.payload._buffer == nullptr) return seqText(f) + "payload without bytes";
  if (f.dtype == 0) {
    if (f.shape._length != 0 || f.layout != 0) return seqText(f) + "raw bytes (dtype 0) with a shape or layout";
    if (format.dtype) return seqText(f) + "raw bytes, but the ring holds " + dtypeName(*format.dtype) + " arrays";
    if (bytes > format.slotBytes)
      return seqText(f) + std::to_string(bytes) + " bytes do not fit a slot of " + std::to_string(format.slotBytes);
    return {};
  }
  if (!dtypeValid(f.dtype)) return seqText(f) + "dtype " + std::to_string(f.dtype) + " is not a forklift dtype";
  const auto dtype = static_cast<DType>(f.dtype);
  if (f.shape._length == 0 || f.shape._length > forklift::detail::kRingMaxRank)
    return seqText(f) + "rank " + std::to_string(f.shape._length) + " is not 1 to 8";
  // The product, refusing negative axes and overflow before it is compared.
  std::uint64_t n = dtypeSize(dtype);
  for (std::uint32_t i = 0; i < f.shape._length; ++i) {
    const std::int64_t a = f.shape._buffer[i];
    if (a < 0) return seqText(f) + "axis " + std::to_string(i) + " is negative";
    const auto u = static_cast<std::uint64_t>(a);
    if (u != 0 && n > UINT64_MAX / u) return seqText(f) + "shape overflows";
    n *= u;
  }
  if (n != bytes)
    return seqText(f) + std::to_string(bytes) + " payload bytes, but " + dtypeName(dtype) + " of its shape needs " +
           std::to_string(n);
  if (!format.dtype || *format.dtype != dtype)
    return seqText(f) + dtypeName(dtype) + " arrays, but the ring holds " +
           (format.dtype ? std::string(dtypeName(*format.dtype)) + " arrays" : std::string("raw bytes"));
  if (f.layout != static_cast<std::uint8_t>(format.layout))
    return seqText(f) + "layout " + std::to_string(f.layout) + ", but the ring's arrays are " + layoutName(format.layout);
  bool same = f.shape._length == format.shape.size();
  for (std::uint32_t i = 0; same && i < f.shape._length; ++i) same = f.shape._buffer[i] == format.shape[i];
  if (!same) return seqText(f) + "its shape is not the ring's";
  if (bytes > format.slotBytes) return seqText(f) + "larger than a slot";
  return {};
}

}  // namespace forklift::dds::detail
