// forklift::dds - StreamOptions: how a Publisher or a Subscriber joins DDS.
//
// Both ends of a stream take the same options. The ring's overflow policy
// (RingFormat::policy) chooses the QoS, the same on both ends:
//
//   ring policy   DDS reliability   DDS history                  what a slow reader costs
//   KeepLatest    best effort       keep last 1                  frames, counted as lost
//   DropOldest    reliable          keep last `depth`            frames, counted as lost
//   Block         reliable          keep all, max_samples=depth  nothing: the publisher waits
//
// For Block the resource limit pushes back: a subscriber that does not take
// leaves its DDS history full, the writer's history fills in turn, and the
// publisher's write waits up to `blockTimeout` (then retries, or throws
// TimeoutError when fed directly). Give both ends rings of the same policy:
// a best-effort (KeepLatest) publisher does not match a reliable subscriber.
//
// Liveliness is MANUAL_BY_TOPIC with `lease`: every published frame asserts
// it, and an idle publisher asserts it on its own (its pump thread) or when
// the user calls Publisher::assertAlive(). A publisher process that dies or
// hangs is reported to its subscribers once `lease` passed without a frame
// or an assertion. A subscriber's lease must be at least its publishers'
// (DDS matches a writer with a shorter or equal lease only).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace forklift::dds {

struct StreamOptions {
  // The DDS domain (0..230); the default is Cyclone's: CYCLONEDDS_URI's
  // <Domain id>, else 0. Cyclone's configuration (interfaces, peers,
  // multicast) comes from CYCLONEDDS_URI.
  std::uint32_t domain = 0xffffffffu;
  // Liveliness lease, 10 ms or more (LimitError otherwise).
  std::chrono::milliseconds lease{1000};
  // DDS history depth for DropOldest and resource limit for Block; 0 means
  // the ring's slot count.
  std::size_t depth = 0;
  // Block: how long one DDS write may wait for subscribers to make room.
  std::chrono::milliseconds blockTimeout{1000};
};

}  // namespace forklift::dds
