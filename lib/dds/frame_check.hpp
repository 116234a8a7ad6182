// Internal: whether a received sample may go into a ring of `format`.
#pragma once

#include <string>

#include "forklift/ring_buffer.hpp"
#include "frame.h"

namespace forklift::dds::detail {

// "" when `f` fits the ring (see subscriber.hpp for the rules), else why
// not, in words for lastRejection(). Reads only the sample's own lengths
// (Cyclone checked them against the bytes received).
std::string checkFrame(const forklift_dds_Frame& f, const RingFormat& format);

}  // namespace forklift::dds::detail
