// forklift::dds - Publisher: a ring's frames as samples of a DDS topic.
//
// A Publisher writes the frames of one ring format (RingFormat: slot size,
// dtype and shape when slots are arrays, policy) as samples of the DDS topic
// `topic` (type forklift::dds::Frame, lib/dds/frame.idl: payload, the slot's
// timestamp and user integers, dtype, shape, and the publisher's own
// sequence number 1, 2, 3, ...). A Subscriber on the same topic, on this
// host or another, writes them into its own ring.
//
// Three ways to feed it:
//   fed directly:     Publisher pub("camera", ring.format());
//                     pub.publish(slot);                   // a ReadSlot, or bytes + FrameMeta
//   on a Manager's loop (no thread of its own):
//                     manager.readRing(reader, [&](ReadSlot& s) { pub.publish(s); });
//                     manager.every(lease / 4, [&] { pub.assertAlive(); });
//                     (with Block, a publish may hold the loop up to blockTimeout,
//                     and one that times out throws: readRing logs it, the frame is lost)
//   pumping a ring:   pub.start(ring.reader());            // its one thread reads and publishes
//
// The sample points at the slot's bytes (no copy of ours); DDS serializes
// it before publish() returns, so the slot may be released at once.
//
// QoS: see stream_options.hpp (the format's policy picks it). Block: a
// publish() that finds the subscribers' history full waits up to
// StreamOptions::blockTimeout and then throws TimeoutError (fed directly),
// or tries again until stop() (pumping; counted in writeTimeouts). So a
// Block stream never drops a frame, and a slow subscriber slows the
// publisher and, behind it, the ring's writer.
//
// Liveliness: each frame asserts it; the pump thread asserts it every
// lease/4 while the ring is idle; fed directly, call assertAlive() at
// least once per lease while idle, or the subscribers report the publisher
// dead. When the pumped ring's writer detaches or dies, the pump ends
// (pumpError() says why) and the DDS writer is deleted: subscribers see
// the publisher leave at once, and this Publisher is done (publish() is an
// Error; make a new one for a new source). The destructor stops the pump
// and deletes the writer the same way.
//
// Threads: publish() and assertAlive() from one thread at a time, and not
// while pumping (Error). stats(), subscribers() and pumpError() from any
// thread.
//
// Errors: DdsError for a failed Cyclone call (no participant, a topic name
// DDS refuses); LimitError for a payload larger than the format's slot or
// of another size than an array format's dtype * shape; Error for a
// pumped ring of another format than the publisher's.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "forklift/dds/stream_options.hpp"
#include "forklift/ring_buffer.hpp"
#include "forklift/timeout.hpp"

namespace forklift::dds {

// The metadata of a frame fed directly.
struct FrameMeta {
  std::int64_t timestampNs = 0;  // 0: now (CLOCK_MONOTONIC of this host)
  std::array<std::int64_t, kRingUserInts> user{};
};

struct PublisherStats {
  std::uint64_t published = 0;      // samples written; also the last sequence number
  std::uint64_t writeTimeouts = 0;  // Block: writes that waited blockTimeout for room
};

namespace detail {
struct PublisherState;
}

class Publisher {
 public:
  // Joins DDS (a participant of options.domain) and creates the writer.
  Publisher(const std::string& topic, const RingFormat& format, StreamOptions options = {});
  ~Publisher();
  Publisher(const Publisher&) = delete;
  Publisher& operator=(const Publisher&) = delete;

  void publish(const ReadSlot& slot);
  void publish(std::span<const std::byte> payload, const FrameMeta& meta = {});
  void assertAlive();

  // Starts the pump thread on `reader` (its format must be the publisher's).
  void start(RingReader reader);
  // Stops the pump thread and waits for it: within 50 ms, or within
  // blockTimeout while a Block write waits for room (that frame is then not
  // published).
  void stop();
  bool pumping() const;
  // Why the pump ended by itself ("" while it runs or after stop()).
  std::string pumpError() const;

  // Subscribers matched now.
  std::size_t subscribers() const;
  // Waits until at least n subscribers matched; false after `timeout`.
  bool waitForSubscribers(std::size_t n, Timeout timeout) const;
  // Reliable policies: waits until every matched subscriber acknowledged
  // every sample; false after `timeout`. Best effort: true at once.
  bool waitForAcks(Timeout timeout) const;

  PublisherStats stats() const;
  const RingFormat& format() const;

 private:
  std::unique_ptr<detail::PublisherState> s_;
};

}  // namespace forklift::dds
