// Tutorial step 8: streaming frames through a shared-memory ring.
//
// A camera backend writes 1280x720x3 colour frames into a ring of array
// slots, a frame counter and the capture time in each slot's metadata. The
// frontend reads them in place in a Manager loop, woken by the ring's
// doorbell (an eventfd the loop watches beside the worker's messages), and
// prints frames/s, drops and the latency from capture to the reader, p50
// and p99. Nothing is copied and there is no message per frame: the
// Manager's readRing runs the ring's drain/arm protocol and calls back per
// frame.
//
//   08_streaming [--seconds S] [--fps F]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <forklift.hpp>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;

std::int64_t nowNs() {
  // steady_clock is CLOCK_MONOTONIC, the ring's clock, the same in every process.
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class Camera : public forklift::MessageProcess {
 public:
  static constexpr int kHeight = 720, kWidth = 1280;

  Camera()
      : MessageProcess("camera"),
        // Server side, before the fork: 8 frames; a slow reader loses the
        // oldest frames, the camera never waits.
        ring_(forklift::RingBuffer::createArray<std::uint8_t>("frames", 8, {kHeight, kWidth, 3},
                                                             forklift::RingPolicy::DropOldest)) {
    command("stream", &Camera::c__stream, {"fps"});
  }
  ~Camera() override { stop(); }

  // Frontend.
  void stream(int fps) { send("stream", {{"fps", fps}}); }
  forklift::RingBuffer& ring() { return ring_; }

 private:
  // Backend: this side writes.
  void preRun__() override { writer_ = ring_.writer(); }
  void postRun__() override { writer_ = {}; }

  void c__stream(int fps) {
    every__(std::chrono::milliseconds(1000 / std::max(fps, 1)), [this] { grab(); });
  }

  void grab() {
    forklift::WriteSlot slot = writer_.reserve(1s);
    const std::int64_t captured = nowNs();
    ++frame_;
    // "Capture": a grey frame whose level is the counter, a white column
    // that moves along.
    auto img = slot.tensor<std::uint8_t, 3>();
    std::memset(slot.data(), static_cast<int>(frame_ % 200), slot.capacity());
    const int x = static_cast<int>(frame_ % kWidth);
    for (int y = 0; y < kHeight; ++y)
      for (int c = 0; c < 3; ++c) img(y, x, c) = 255;
    slot.setUser(0, frame_);
    slot.setTimestampNs(captured);
    slot.commit();
  }

  forklift::RingBuffer ring_;
  forklift::RingWriter writer_;
  std::int64_t frame_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  double seconds = 3;
  int fps = 100;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--seconds") seconds = std::atof(argv[i + 1]);
    else if (a == "--fps") fps = std::atoi(argv[i + 1]);
  }

  forklift::Manager manager;
  Camera& camera = manager.emplace<Camera>();
  manager.startProcesses();  // fork first, then attach this side
  forklift::RingReader reader = camera.ring().reader();
  std::printf("ring: %s\n", reader.format().describe().c_str());

  std::vector<std::int64_t> latencyNs;
  latencyNs.reserve(static_cast<std::size_t>(seconds * fps * 2) + 16);
  std::int64_t frames = 0, lastFrame = 0, bad = 0;
  // The Manager reads the ring on its loop: on the doorbell it hands every
  // committed frame to this callback, then arms the doorbell again (even
  // when the callback throws: that is logged and the next frames come).
  manager.readRing(
      reader,
      [&](forklift::ReadSlot& slot) {
        const auto img = slot.tensor<std::uint8_t, 3>();
        const std::int64_t n = slot.user(0);
        const bool looksRight = img(0, 0, 0) == n % 200 || (n % Camera::kWidth == 0);
        if (n <= lastFrame || !looksRight || !slot.intact()) ++bad;
        lastFrame = n;
        ++frames;
        latencyNs.push_back(nowNs() - slot.timestampNs());
      },
      // The camera gone (it died, or detached) once its last frames were
      // read; at the shutdown it detaches as it stops, which is expected.
      [&](const forklift::Error& e) {
        if (!manager.stopping()) std::printf("the camera's ring ended: %s\n", e.what());
      });

  const auto t0 = std::chrono::steady_clock::now();
  camera.stream(fps);
  manager.after(std::chrono::milliseconds(static_cast<long>(seconds * 1000)), [&] { manager.requestStop(); });
  const int rc = manager.run();
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::sort(latencyNs.begin(), latencyNs.end());
  auto pct = [&](double p) {
    if (latencyNs.empty()) return std::int64_t{0};
    return latencyNs[static_cast<std::size_t>(p * static_cast<double>(latencyNs.size() - 1))] / 1000;
  };
  std::printf("received %lld frames in %.1f s: %.1f frames/s, %llu dropped\n", static_cast<long long>(frames), elapsed,
              static_cast<double>(frames) / elapsed, static_cast<unsigned long long>(reader.stats().drops));
  std::printf("latency p50 %lld us, p99 %lld us\n", static_cast<long long>(pct(0.5)),
              static_cast<long long>(pct(0.99)));
  if (bad == 0) std::printf("every frame intact: counters increasing, pixels as painted\n");
  else std::printf("%lld frames were not as painted\n", static_cast<long long>(bad));
  std::printf("camera exited: %s\n", camera.waitStop(forklift::Timeout::zero()).describe().c_str());
  return rc == 0 && bad == 0 ? 0 : 1;
}
