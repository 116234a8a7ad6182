// Internal: the QoS of a forklift stream, from the ring's policy (one
// function, one switch; see forklift/dds/stream_options.hpp for the table).
#pragma once

#include "entity.hpp"
#include "forklift/dds/stream_options.hpp"
#include "forklift/ring_buffer.hpp"

namespace forklift::dds::detail {

// The same QoS serves the writer and the reader of a stream. LimitError
// for a lease under 10 ms or a zero depth with a zero-slot format.
Qos qosFor(RingPolicy policy, std::size_t slots, const StreamOptions& options);

// The policy a QoS made by qosFor stands for (the inverse; for tests).
RingPolicy policyOf(const dds_qos_t* qos);

}  // namespace forklift::dds::detail
