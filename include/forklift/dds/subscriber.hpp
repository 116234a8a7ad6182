// forklift::dds - Subscriber: a DDS topic's frames written into a local ring.
//
// A Subscriber attaches as the writer of a local ring and copies every
// sample of `topic` (from Publishers on this host or others) into a slot:
// payload, timestamp and user integers as published. Local consumers read
// that ring exactly as any other (RingReader, Manager::readRing, the Python
// module): in place, behind the ring's doorbell. The ring numbers its slots
// itself (1, 2, ... in commit order); the timestamp is the publishing
// host's CLOCK_MONOTONIC, comparable only on that host.
//
// One thread: the subscriber's waitset thread takes samples, checks them,
// reserves a slot, copies and commits. With a Block ring it waits for room
// (the local reader pushes back on DDS, and DDS on the publisher); with the
// drop policies the ring drops as it always does (RingStats::drops).
//
// What is checked, and rejected (counted, the reason kept in
// lastRejection(), the stream goes on; never a torn or partial slot):
//   - dtype: not 0 (raw bytes) or a forklift DType, or not the ring's;
//   - shape: rank over 8, a negative axis, or not the ring's shape (and
//     layout: row- or column-major, not the ring's);
//   - payload: for an array ring, not exactly dtype size * shape; for a raw
//     ring, larger than a slot;
//   - sequence: not above the last one from the same DDS writer (backwards
//     or repeated).
//
// Counters (stats()), per subscriber, exact once the stream is quiet:
//   received = delivered + undelivered + rejectedFormat + rejectedSequence
//   for each writer, its last sequence number seen
//            = delivered + undelivered + rejectedFormat + lost + missedAtJoin
//   (summed over writers). `lost`: numbers skipped inside a writer's stream
//   (a best-effort network loss, or DDS history overwritten before the
//   subscriber took it, DropOldest/KeepLatest); `missedAtJoin`: the numbers
//   before the first sample this subscriber got from a writer (it joined
//   late). Frames never sent again after the last one seen are not counted
//   anywhere. The ring counts its own drops (ring.stats().drops).
//
// Death and joining: liveliness (StreamOptions::lease). When the last live
// publisher of the topic dies, hangs past its lease or is deleted, the
// subscriber detaches from the ring: local readers get every frame
// committed so far, then PeerClosed, as when a local ring's writer
// detaches. When a publisher is alive again (a restarted one, or another),
// the subscriber attaches again as the ring's writer and frames flow on (a
// RingReader that saw PeerClosed may simply call next() again). At
// construction it attaches at once, before any publisher is seen.
//
// Errors: DdsError for a failed Cyclone call; Error when the ring has a live
// writer already (a Subscriber is the ring's only writer). Should another
// writer take the ring while no publisher lives, frames count as
// undelivered until it leaves. A Cyclone call failing in the thread stops
// it, and lastRejection() says so ("the subscriber's thread stopped: ...").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "forklift/dds/stream_options.hpp"
#include "forklift/ring_buffer.hpp"
#include "forklift/timeout.hpp"

namespace forklift::dds {

struct SubscriberStats {
  std::uint64_t received = 0;          // samples taken from DDS
  std::uint64_t delivered = 0;         // committed into the ring
  std::uint64_t undelivered = 0;       // no slot: a Block ring still full at stop, or its reader gone
  std::uint64_t rejectedFormat = 0;    // payload, dtype or shape wrong (see above)
  std::uint64_t rejectedSequence = 0;  // sequence not above the writer's last
  std::uint64_t lost = 0;              // sequence numbers skipped inside a writer's stream
  std::uint64_t missedAtJoin = 0;      // sequence numbers before the first one seen
  std::uint64_t publishersLost = 0;    // times the last live publisher went away
};

namespace detail {
struct SubscriberState;
}

class Subscriber {
 public:
  // Attaches as `ring`'s writer, joins DDS and starts the waitset thread.
  // `ring` must outlive the Subscriber.
  Subscriber(const std::string& topic, RingBuffer& ring, StreamOptions options = {});
  // Stops the thread and detaches from the ring (local readers: PeerClosed).
  ~Subscriber();
  Subscriber(const Subscriber&) = delete;
  Subscriber& operator=(const Subscriber&) = delete;

  // Publishers alive now (DDS liveliness).
  std::size_t publishersAlive() const;
  // Waits until exactly n publishers are alive (n may be 0); false after
  // `timeout`.
  bool waitForPublishers(std::size_t n, Timeout timeout) const;

  SubscriberStats stats() const;
  // Why the last sample was rejected ("" when none was).
  std::string lastRejection() const;

 private:
  std::unique_ptr<detail::SubscriberState> s_;
};

}  // namespace forklift::dds
