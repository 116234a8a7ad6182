#include "forklift/dds/publisher.hpp"

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

#include "entity.hpp"
#include "forklift/error.hpp"
#include "frame.h"
#include "qos.hpp"

namespace forklift::dds {

static_assert(kRingUserInts == 4, "frame.idl carries 4 user integers, as a ring slot");

namespace detail {

struct PublisherState {
  RingFormat format;
  StreamOptions options;
  std::vector<std::int64_t> shape;  // the sample's shape points here
  // Parents first: they are deleted last (entity.hpp).
  Entity participant;
  Entity topic;
  Entity writer;
  // The writer's handle for other threads (stats, matching, acks): the pump
  // may delete the writer meanwhile, and Cyclone answers a deleted handle
  // with an error, never touches freed memory.
  std::atomic<dds_entity_t> writerHandle{0};

  std::atomic<std::uint64_t> published{0};
  std::atomic<std::uint64_t> writeTimeouts{0};
  std::chrono::steady_clock::time_point lastAssert{};

  std::thread pump;
  std::atomic<bool> stopping{false};
  std::atomic<bool> running{false};
  mutable std::mutex m;
  std::string pumpError;  // guarded by m

  // One sample, pointing at `data` (DDS serializes it before dds_write
  // returns). `retry`: Block writes that time out are tried again until
  // stop(); otherwise a timeout is a TimeoutError.
  void write(const std::byte* data, std::size_t n, std::int64_t ts, const std::array<std::int64_t, 4>& user,
             bool retry) {
    if (!writer) throw Error("publish(): the publisher's DDS writer is gone (its pumped ring's writer left)");
    if (n > format.slotBytes)
      throw LimitError("publish(): " + std::to_string(n) + " bytes do not fit a slot of " +
                       std::to_string(format.slotBytes));
    if (format.dtype) {
      std::size_t need = dtypeSize(*format.dtype);
      for (const auto a : format.shape) need *= static_cast<std::size_t>(a);
      if (n != need)
        throw LimitError("publish(): " + std::to_string(n) + " bytes, but a frame of " + format.describe() +
                         " has " + std::to_string(need));
    }
    forklift_dds_Frame f{};
    f.seq = published.load(std::memory_order_relaxed) + 1;
    f.timestampNs = ts != 0 ? ts : forklift::detail::monotonicNs();
    for (std::size_t i = 0; i < 4; ++i) f.user[i] = user[i];
    f.dtype = format.dtype ? static_cast<std::uint8_t>(*format.dtype) : 0;
    f.layout = format.dtype ? static_cast<std::uint8_t>(format.layout) : 0;
    f.shape._buffer = shape.data();
    f.shape._length = f.shape._maximum = static_cast<std::uint32_t>(shape.size());
    f.shape._release = false;
    // The slot owns the bytes (Cyclone's throughput example does the same).
    f.payload._buffer = reinterpret_cast<std::uint8_t*>(const_cast<std::byte*>(data));
    f.payload._length = f.payload._maximum = static_cast<std::uint32_t>(n);
    f.payload._release = false;
    for (;;) {
      const dds_return_t rc = dds_write(writer.get(), &f);
      if (rc == DDS_RETCODE_TIMEOUT) {
        writeTimeouts.fetch_add(1, std::memory_order_relaxed);
        if (retry && !stopping.load(std::memory_order_relaxed)) continue;
        throw TimeoutError("publish(): the subscribers made no room within " +
                           std::to_string(options.blockTimeout.count()) + " ms (Block)");
      }
      check(rc, "dds_write");
      break;
    }
    published.fetch_add(1, std::memory_order_relaxed);
    lastAssert = std::chrono::steady_clock::now();
  }

  void assertAlive() {
    if (!writer) return;
    check(dds_assert_liveliness(writer.get()), "dds_assert_liveliness");
    lastAssert = std::chrono::steady_clock::now();
  }

  void runPump(RingReader reader) {
    const auto every = options.lease / 4;
    std::string why;
    try {
      while (!stopping.load(std::memory_order_relaxed)) {
        auto s = reader.next(std::chrono::milliseconds(50));
        if (s) {
          std::array<std::int64_t, 4> user{};
          for (std::size_t i = 0; i < 4; ++i) user[i] = s->user(i);
          try {
            write(s->data(), s->bytes(), s->timestampNs(), user, true);
          } catch (const TimeoutError&) {
            break;  // stop() came while a Block write waited
          }
        } else if (std::chrono::steady_clock::now() - lastAssert >= every) {
          assertAlive();
        }
      }
    } catch (const std::exception& e) {
      why = e.what();
    }
    if (!why.empty()) {
      // The source is gone: so is this publisher, at once, for its subscribers.
      writerHandle.store(0);
      writer.reset();
      const std::lock_guard lock(m);
      pumpError = why;
    }
    running.store(false);
  }
};

}  // namespace detail

Publisher::Publisher(const std::string& topic, const RingFormat& format, StreamOptions options)
    : s_(std::make_unique<detail::PublisherState>()) {
  s_->format = format;
  s_->options = options;
  s_->shape = format.shape;
  const detail::Qos qos = detail::qosFor(format.policy, format.slots, options);
  s_->participant = detail::Entity(dds_create_participant(options.domain, nullptr, nullptr), "dds_create_participant");
  s_->topic = detail::Entity(dds_create_topic(s_->participant.get(), &forklift_dds_Frame_desc, topic.c_str(), nullptr, nullptr),
                     "dds_create_topic");
  s_->writer = detail::Entity(dds_create_writer(s_->participant.get(), s_->topic.get(), qos.get(), nullptr), "dds_create_writer");
  s_->writerHandle.store(s_->writer.get());
  s_->lastAssert = std::chrono::steady_clock::now();
}

Publisher::~Publisher() { stop(); }

void Publisher::publish(const ReadSlot& slot) {
  if (pumping()) throw Error("publish(): the publisher is pumping a ring");
  std::array<std::int64_t, 4> user{};
  for (std::size_t i = 0; i < 4; ++i) user[i] = slot.user(i);
  s_->write(slot.data(), slot.bytes(), slot.timestampNs(), user, false);
}

void Publisher::publish(std::span<const std::byte> payload, const FrameMeta& meta) {
  if (pumping()) throw Error("publish(): the publisher is pumping a ring");
  s_->write(payload.data(), payload.size(), meta.timestampNs, meta.user, false);
}

void Publisher::assertAlive() {
  if (pumping()) throw Error("assertAlive(): the publisher is pumping a ring");
  s_->assertAlive();
}

void Publisher::start(RingReader reader) {
  if (pumping()) throw Error("start(): the publisher is pumping a ring already");
  if (!reader.valid()) throw Error("start(): an empty RingReader");
  const RingFormat& f = reader.format();
  if (f.dtype != s_->format.dtype || f.shape != s_->format.shape || f.slotBytes > s_->format.slotBytes)
    throw Error("start(): the ring holds " + f.describe() + ", the publisher " + s_->format.describe());
  stop();
  s_->stopping.store(false);
  {
    const std::lock_guard lock(s_->m);
    s_->pumpError.clear();
  }
  s_->running.store(true);
  s_->pump = std::thread([s = s_.get(), r = std::move(reader)]() mutable { s->runPump(std::move(r)); });
}

void Publisher::stop() {
  s_->stopping.store(true);
  if (s_->pump.joinable()) s_->pump.join();
}

bool Publisher::pumping() const { return s_->running.load(); }

std::string Publisher::pumpError() const {
  const std::lock_guard lock(s_->m);
  return s_->pumpError;
}

namespace {
bool deleted(dds_return_t rc) { return rc == DDS_RETCODE_BAD_PARAMETER || rc == DDS_RETCODE_ALREADY_DELETED; }
}  // namespace

std::size_t Publisher::subscribers() const {
  const dds_entity_t w = s_->writerHandle.load();
  if (w == 0) return 0;
  dds_publication_matched_status_t st{};
  const dds_return_t rc = dds_get_publication_matched_status(w, &st);
  if (deleted(rc)) return 0;
  detail::check(rc, "dds_get_publication_matched_status");
  return st.current_count;
}

bool Publisher::waitForSubscribers(std::size_t n, Timeout timeout) const {
  const Deadline d(timeout);
  for (;;) {
    if (subscribers() >= n) return true;
    if (d.expired()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

bool Publisher::waitForAcks(Timeout timeout) const {
  const dds_entity_t w = s_->writerHandle.load();
  if (w == 0) return true;
  const dds_duration_t t = timeout == kForever ? DDS_INFINITY : DDS_MSECS(timeout.count());
  const dds_return_t rc = dds_wait_for_acks(w, t);
  if (rc == DDS_RETCODE_TIMEOUT) return false;
  if (deleted(rc)) return true;
  detail::check(rc, "dds_wait_for_acks");
  return true;
}

PublisherStats Publisher::stats() const {
  return {s_->published.load(std::memory_order_relaxed), s_->writeTimeouts.load(std::memory_order_relaxed)};
}

const RingFormat& Publisher::format() const { return s_->format; }

}  // namespace forklift::dds
