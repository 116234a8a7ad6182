// forklift - a ring's reader read by a libuv loop (internal; Manager::readRing)
//
// The drain/arm protocol of RingReader::fd(), run by the library so that no
// user code sits between the drain and the arming: on the doorbell (and
// once at the start), every slot the ring holds goes to the callback, then
// the reader arms; arm() false means a slot came meanwhile, so it drains
// again. What the callback throws is logged and its slot released; the next
// slots come as always. A callback may keep a slot by moving it out: once
// the reader holds its maxHeld, the loop stops taking and asks the reader
// to ring its own doorbell at the next release (RingReaderState::
// ringOnRelease). The writer's pidfd (a duplicate, re-made when a new
// writer attaches; a timer where pidfds are missing) is watched beside the
// doorbell: once the writer is gone and its last slots were read, or the
// ring is corrupt, `onEnd` gets the error and both watches end.
#pragma once

#include <spdlog/spdlog.h>

#include <functional>
#include <memory>

#include "forklift/error.hpp"
#include "forklift/ring_buffer.hpp"
#include "loop_sources.hpp"

namespace forklift::detail {

struct RingReaderAccess {
  static const std::shared_ptr<RingReaderState>& state(const RingReader& r) { return r.s_; }
  static RingReader make(std::shared_ptr<RingReaderState> s) { return RingReader(std::move(s)); }
};

void readRingOn(LoopSources& sources, const RingReader& reader, std::function<void(ReadSlot&)> onSlot,
                std::function<void(const Error&)> onEnd, std::shared_ptr<spdlog::logger> log);

}  // namespace forklift::detail
