#include "ring_loop.hpp"

#include <string>
#include <utility>

#include "forklift/shm.hpp"
#include "ring_state.hpp"

namespace forklift::detail {

namespace {

class RingLoop : public std::enable_shared_from_this<RingLoop> {
 public:
  RingLoop(LoopSources& sources, RingReader reader, std::function<void(ReadSlot&)> onSlot,
           std::function<void(const Error&)> onEnd, std::shared_ptr<spdlog::logger> log)
      : sources_(&sources), reader_(std::move(reader)), state_(RingReaderAccess::state(reader_)),
        onSlot_(std::move(onSlot)), onEnd_(std::move(onEnd)), log_(std::move(log)) {}

  void start() {
    auto self = shared_from_this();
    bell_ = reader_.fd();
    sources_->watch(bell_, [self](int) { self->turn(); }, false);
    // The first turn runs on the loop: slots committed before now, and the arming.
    startTimer_ = sources_->addTimer(Timeout::zero(), Timeout::zero(), [self] {
      self->startTimer_ = 0;
      self->turn();
    });
  }

 private:
  void turn() {
    if (ended_) return;
    try {
      reader_.drainDoorbell();
      for (;;) {
        while (state_->held < state_->maxHeld) {
          std::optional<ReadSlot> s = reader_.tryNext();
          if (!s) break;
          deliver(*s);
          if (ended_) return;
        }
        if (state_->held >= state_->maxHeld) {
          state_->ringOnRelease = true;  // the next release rings the doorbell
          // A dead writer's pidfd stays readable: looked at again after that release.
          if (reader_.writerGone()) {
            dropWriterWatch();
            return;
          }
          break;
        }
        if (!reader_.arm()) continue;
        if (!reader_.writerGone()) break;
        // Gone, and nothing waits: next() says how (ProcessDied, PeerClosed).
        if (std::optional<ReadSlot> s = reader_.next(Timeout::zero())) deliver(*s);
        if (ended_) return;
      }
      watchWriter();
    } catch (const Error& e) {
      end(e);
    } catch (const std::exception& e) {
      end(Error(e.what()));
    }
  }

  void deliver(ReadSlot& s) {
    const std::uint64_t seq = s.sequence();
    try {
      onSlot_(s);
    } catch (const std::exception& e) {
      log_->error("readRing: the callback threw on frame {} of {}: {}; the slot is released, reading goes on", seq,
                  state_->core->what(), e.what());
    } catch (...) {
      log_->error("readRing: the callback threw on frame {} of {}: a non-standard exception; the slot is released, "
                  "reading goes on",
                  seq, state_->core->what());
    }
    s.release();  // unless the callback kept it (moved it out)
  }

  // The writer's pidfd, watched through a duplicate of ours; re-made when
  // another writer attached. Without pidfds a timer looks.
  void watchWriter() {
    const int fd = state_->writer.pollFd();
    if (state_->writer.pid != watchedPid_ || state_->writer.epoch != watchedEpoch_) {
      dropWriterWatch();
      watchedPid_ = state_->writer.pid;
      watchedEpoch_ = state_->writer.epoch;
      if (fd >= 0) {
        writerFd_ = Fd::dup(fd).take();
        auto self = shared_from_this();
        sources_->watch(writerFd_.get(), [self](int) { self->turn(); }, false);
      }
    }
    if (state_->writer.noPidfd && timer_ == 0) {
      auto self = shared_from_this();
      timer_ = sources_->addTimer(std::chrono::milliseconds(kPeerCheckMillis),
                                  std::chrono::milliseconds(kPeerCheckMillis), [self] { self->turn(); });
    }
  }

  void dropWriterWatch() {
    if (writerFd_) {
      sources_->unwatch(writerFd_.get());
      writerFd_.reset();
    }
  }

  void end(const Error& e) {
    ended_ = true;
    state_->ringOnRelease = false;
    sources_->unwatch(bell_);
    dropWriterWatch();
    if (timer_) sources_->cancel(timer_);
    if (startTimer_) sources_->cancel(startTimer_);
    timer_ = startTimer_ = 0;
    if (onEnd_) {
      try {
        onEnd_(e);
      } catch (const std::exception& x) {
        log_->error("readRing: the end callback of {} threw: {}", state_->core->what(), x.what());
      } catch (...) {
        log_->error("readRing: the end callback of {} threw a non-standard exception", state_->core->what());
      }
      return;
    }
    if (dynamic_cast<const ProcessDied*>(&e) == nullptr && dynamic_cast<const PeerClosed*>(&e) != nullptr)
      log_->info("readRing: {}; reading ends", e.what());
    else
      log_->error("readRing: {}; reading ends", e.what());
  }

  LoopSources* sources_;
  RingReader reader_;
  std::shared_ptr<RingReaderState> state_;
  std::function<void(ReadSlot&)> onSlot_;
  std::function<void(const Error&)> onEnd_;
  std::shared_ptr<spdlog::logger> log_;
  int bell_ = -1;
  UniqueFd writerFd_;
  pid_t watchedPid_ = 0;
  std::uint32_t watchedEpoch_ = 0;
  std::uint64_t timer_ = 0;
  std::uint64_t startTimer_ = 0;
  bool ended_ = false;
};

}  // namespace

void readRingOn(LoopSources& sources, const RingReader& reader, std::function<void(ReadSlot&)> onSlot,
                std::function<void(const Error&)> onEnd, std::shared_ptr<spdlog::logger> log) {
  const auto& state = RingReaderAccess::state(reader);
  if (!state) throw Error("readRing: the RingReader is empty");
  if (!onSlot) throw Error("readRing: no slot callback given");
  auto loop = std::make_shared<RingLoop>(sources, RingReaderAccess::make(state), std::move(onSlot),
                                         std::move(onEnd), std::move(log));
  loop->start();
}

}  // namespace forklift::detail
