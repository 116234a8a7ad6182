#include "forklift/dds/subscriber.hpp"

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "entity.hpp"
#include "forklift/error.hpp"
#include "frame.h"
#include "frame_check.hpp"
#include "qos.hpp"

namespace forklift::dds {

namespace detail {

namespace {
constexpr std::size_t kTakeBatch = 16;
}

struct SubscriberState {
  RingBuffer* ring = nullptr;
  RingFormat format;
  StreamOptions options;
  RingWriter writer;  // attached while a publisher lives (and at first)
  // Parents first: they are deleted last (entity.hpp).
  Entity participant;
  Entity topic;
  Entity reader;
  Entity readCond;
  Entity guard;
  Entity waitset;

  std::thread thread;
  std::atomic<bool> stopping{false};
  std::atomic<std::size_t> alive{0};
  std::unordered_map<dds_instance_handle_t, std::uint64_t> lastSeq;  // thread only

  mutable std::mutex m;
  SubscriberStats stats;      // guarded by m
  std::string lastRejection;  // guarded by m

  void reject(std::string why, bool sequence) {
    const std::lock_guard lock(m);
    ++(sequence ? stats.rejectedSequence : stats.rejectedFormat);
    lastRejection = std::move(why);
  }

  void count(std::uint64_t SubscriberStats::*field, std::uint64_t n = 1) {
    const std::lock_guard lock(m);
    stats.*field += n;
  }

  // The sequence check, then the format check; a sample passing both is
  // copied into a slot. A sequence above the writer's last counts what it
  // skipped even when the format then rejects the sample.
  void handle(const forklift_dds_Frame& f, const dds_sample_info_t& info) {
    count(&SubscriberStats::received);
    const auto it = lastSeq.find(info.publication_handle);
    if (it != lastSeq.end() && f.seq <= it->second) {
      reject("frame " + std::to_string(f.seq) + ": not above the writer's last, " + std::to_string(it->second), true);
      return;
    }
    if (f.seq == 0) {
      reject("frame 0: sequence numbers start at 1", true);
      return;
    }
    if (it == lastSeq.end()) {
      count(&SubscriberStats::missedAtJoin, f.seq - 1);
      lastSeq.emplace(info.publication_handle, f.seq);
    } else {
      count(&SubscriberStats::lost, f.seq - it->second - 1);
      it->second = f.seq;
    }
    std::string why = checkFrame(f, format);
    if (!why.empty()) {
      reject(std::move(why), false);
      return;
    }
    WriteSlot slot;
    try {
      if (!writer.valid()) attach();
      if (format.policy == RingPolicy::Block) {
        while (!slot) {
          try {
            slot = writer.reserve(std::chrono::milliseconds(50));
          } catch (const TimeoutError&) {
            if (stopping.load(std::memory_order_relaxed)) throw;
          }
        }
      } else {
        slot = writer.reserve(std::chrono::milliseconds(0));
      }
    } catch (const std::exception& e) {
      // Stopped while the ring was full, its reader is gone, or another
      // writer holds the ring.
      const std::lock_guard lock(m);
      ++stats.undelivered;
      lastRejection = "frame " + std::to_string(f.seq) + ": no slot: " + e.what();
      return;
    }
    if (f.payload._length > 0) std::memcpy(slot.data(), f.payload._buffer, f.payload._length);
    slot.setBytes(f.payload._length);
    slot.setTimestampNs(f.timestampNs);
    for (std::size_t i = 0; i < 4; ++i) slot.setUser(i, f.user[i]);
    slot.commit();
    count(&SubscriberStats::delivered);
  }

  void attach() { writer = ring->writer(); }

  void takeAll() {
    for (;;) {
      void* samples[kTakeBatch] = {};
      dds_sample_info_t infos[kTakeBatch];
      const dds_return_t n = check(dds_take(reader.get(), samples, infos, kTakeBatch, kTakeBatch), "dds_take");
      if (n == 0) return;
      // The samples are Cyclone's loan until returned, whatever happens.
      struct Loan {
        dds_entity_t r;
        void** s;
        dds_return_t n;
        ~Loan() { (void)dds_return_loan(r, s, n); }
      } loan{reader.get(), samples, n};
      for (dds_return_t i = 0; i < n; ++i) {
        if (infos[i].valid_data) handle(*static_cast<const forklift_dds_Frame*>(samples[i]), infos[i]);
      }
    }
  }

  void liveliness() {
    dds_liveliness_changed_status_t st{};
    check(dds_get_liveliness_changed_status(reader.get(), &st), "dds_get_liveliness_changed_status");
    const std::size_t before = alive.exchange(st.alive_count);
    if (st.alive_count == 0 && before > 0) {
      // What they published is in the ring; local readers now see PeerClosed
      // (counted first, so a reader woken by it finds the count true).
      count(&SubscriberStats::publishersLost);
      writer = RingWriter();
    } else if (st.alive_count > 0 && !writer.valid()) {
      try {
        attach();
      } catch (const std::exception& e) {
        // Another writer took the ring meanwhile: frames count as undelivered
        // until it leaves (handle() tries again).
        const std::lock_guard lock(m);
        lastRejection = std::string("cannot attach as the ring's writer: ") + e.what();
      }
    }
  }

  void run() {
    try {
      while (!stopping.load()) {
        check(dds_waitset_wait(waitset.get(), nullptr, 0, DDS_INFINITY), "dds_waitset_wait");
        if (stopping.load()) break;
        takeAll();
        liveliness();
      }
    } catch (const std::exception& e) {
      const std::lock_guard lock(m);
      lastRejection = std::string("the subscriber's thread stopped: ") + e.what();
    }
  }
};

}  // namespace detail

Subscriber::Subscriber(const std::string& topic, RingBuffer& ring, StreamOptions options)
    : s_(std::make_unique<detail::SubscriberState>()) {
  detail::SubscriberState& s = *s_;
  s.ring = &ring;
  s.format = ring.format();
  s.options = options;
  const detail::Qos qos = detail::qosFor(s.format.policy, s.format.slots, options);
  s.attach();
  s.participant = detail::Entity(dds_create_participant(options.domain, nullptr, nullptr), "dds_create_participant");
  s.topic = detail::Entity(dds_create_topic(s.participant.get(), &forklift_dds_Frame_desc, topic.c_str(), nullptr, nullptr),
                           "dds_create_topic");
  s.reader = detail::Entity(dds_create_reader(s.participant.get(), s.topic.get(), qos.get(), nullptr), "dds_create_reader");
  detail::check(dds_set_status_mask(s.reader.get(), DDS_LIVELINESS_CHANGED_STATUS), "dds_set_status_mask");
  s.readCond = detail::Entity(dds_create_readcondition(s.reader.get(), DDS_ANY_STATE), "dds_create_readcondition");
  s.guard = detail::Entity(dds_create_guardcondition(s.participant.get()), "dds_create_guardcondition");
  s.waitset = detail::Entity(dds_create_waitset(s.participant.get()), "dds_create_waitset");
  detail::check(dds_waitset_attach(s.waitset.get(), s.reader.get(), 0), "dds_waitset_attach");
  detail::check(dds_waitset_attach(s.waitset.get(), s.readCond.get(), 1), "dds_waitset_attach");
  detail::check(dds_waitset_attach(s.waitset.get(), s.guard.get(), 2), "dds_waitset_attach");
  s.thread = std::thread([st = s_.get()] { st->run(); });
}

Subscriber::~Subscriber() {
  s_->stopping.store(true);
  (void)dds_set_guardcondition(s_->guard.get(), true);
  if (s_->thread.joinable()) s_->thread.join();
  s_->writer = RingWriter();
}

std::size_t Subscriber::publishersAlive() const { return s_->alive.load(); }

bool Subscriber::waitForPublishers(std::size_t n, Timeout timeout) const {
  const Deadline d(timeout);
  for (;;) {
    if (publishersAlive() == n) return true;
    if (d.expired()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

SubscriberStats Subscriber::stats() const {
  const std::lock_guard lock(s_->m);
  return s_->stats;
}

std::string Subscriber::lastRejection() const {
  const std::lock_guard lock(s_->m);
  return s_->lastRejection;
}

}  // namespace forklift::dds
