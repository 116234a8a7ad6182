// Tutorial step 9, last part: a video pipeline as one Manager program.
//
// Three camera backends (step 8) write 720x1280x3 frames into rings. One
// Manager loop reads every ring (Manager::readRing) and hands every 5th
// frame to a pool of 3 detectors that lives on the same loop
// (FunctionPool(manager, ...)). A detector reads the frame where the camera
// wrote it: the loop's reader keeps the slot (RingReaderOptions::maxHeld)
// until the detector's result comes, and the detector views that slot of
// the camera's ring in place (RingBuffer::view). No frame is copied from
// camera to detector.
//
// Two detections go wrong on purpose: one crashes its worker (abort), one
// hangs past the 300 ms task timeout. The pool reports each, replaces the
// worker, and the pipeline goes on; the slot is given back either way.
// The program ends when every camera has sent its frames.
//
//   09_video_pipeline [--frames N] [--fps F] [--task-timeout MS]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <forklift.hpp>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;

constexpr int kCameras = 3, kHeight = 720, kWidth = 1280;
constexpr std::int64_t kEvery = 5;       // every 5th frame goes to a detector
constexpr std::int64_t kCrashAt = 50;    // camera 1's 50th frame crashes its detector
constexpr std::int64_t kHangAt = 100;    // camera 2's 100th frame hangs its detector

class Camera : public forklift::MessageProcess {
 public:
  explicit Camera(int id)
      : MessageProcess("cam" + std::to_string(id)),
        // Server side, before the fork: 8 frames; a slow reader loses the
        // oldest, the camera never waits.
        ring_(forklift::RingBuffer::createArray<std::uint8_t>("frames", 8, {kHeight, kWidth, 3},
                                                             forklift::RingPolicy::DropOldest)) {
    command("stream", &Camera::c__stream, {"fps"});
  }
  ~Camera() override { stop(); }

  // Frontend.
  void stream(int fps) { send("stream", {{"fps", fps}}); }
  forklift::RingBuffer& ring() { return ring_; }

 private:
  // Backend.
  void preRun__() override { writer_ = ring_.writer(); }
  void postRun__() override { writer_ = {}; }
  void c__stream(int fps) {
    every__(std::chrono::milliseconds(1000 / std::max(fps, 1)), [this] { grab(); });
  }
  void grab() {
    forklift::WriteSlot slot = writer_.reserve(1s);
    ++frame_;
    // "Capture": every pixel is the frame's number modulo 256.
    slot.tensor<std::uint8_t, 3>().setConstant(static_cast<std::uint8_t>(frame_ % 256));
    slot.setUser(0, frame_);
    slot.commit();
  }

  forklift::RingBuffer ring_;
  forklift::RingWriter writer_;
  std::int64_t frame_ = 0;
};

// The cameras, made before the pool: a detector is a fork of this process,
// so it has the same Camera objects and their rings mapped.
std::vector<Camera*> cameras;

// Runs in a detector (a forked worker): a look at the frame in slot
// `index` of a camera's ring, read in place.
double detect(int camera, std::int64_t index, std::int64_t sequence, std::int64_t frame) {
  if (camera == 1 && frame == kCrashAt) std::abort();                       // a bug in a detector
  if (camera == 2 && frame == kHangAt) std::this_thread::sleep_for(1h);    // a detector that hangs
  const forklift::RingSlotView view =
      cameras[static_cast<std::size_t>(camera)]->ring().view(static_cast<std::uint32_t>(index),
                                                            static_cast<std::uint64_t>(sequence));
  // The "detection": the mean level over every 8th row and column, read
  // in place (a real detector would run a network on the frame here).
  const auto img = view.tensor<std::uint8_t, 3>();
  const Eigen::array<Eigen::Index, 3> every8{8, 8, 1};
  const Eigen::Tensor<double, 0, Eigen::RowMajor> mean = img.stride(every8).cast<double>().mean();
  if (!view.intact()) throw forklift::Error("the frame was overwritten while it was read");
  return mean();
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t lastFrame = 200;  // per camera
  int fps = 50;
  long taskTimeoutMs = 300;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--frames") lastFrame = std::atoll(argv[i + 1]);
    else if (a == "--fps") fps = std::atoi(argv[i + 1]);
    else if (a == "--task-timeout") taskTimeoutMs = std::atol(argv[i + 1]);
  }

  forklift::Manager manager;
  for (int c = 0; c < kCameras; ++c) cameras.push_back(&manager.emplace<Camera>(c));
  manager.startProcesses();

  // The detectors, on the manager's loop: a result, a death or a timeout is
  // handled in the turn that sees it. No retries: a frame that breaks its
  // detector is reported, not tried again.
  forklift::PoolOptions po;
  po.workers = 3;
  po.taskTimeout = std::chrono::milliseconds(taskTimeoutMs);
  po.retries = 0;
  forklift::FunctionPool<double(int, std::int64_t, std::int64_t, std::int64_t)> detectors(manager, detect, po);

  // A frame handed to a detector stays in its ring until the result comes.
  struct Held {
    int camera;
    std::int64_t frame;
    forklift::ReadSlot slot;
  };
  std::map<std::uint64_t, Held> held;
  std::int64_t frames = 0, detected = 0, wrong = 0, failed = 0;

  detectors.pool().onResult([&](const forklift::TaskInfo& task, const forklift::CallResult& r) {
    auto it = held.find(task.id);
    if (it == held.end()) return;
    Held& h = it->second;
    if (r.ok()) {
      ++detected;
      if (r.get().as<double>() != static_cast<double>(h.frame % 256)) ++wrong;
    } else if (!manager.stopping()) {  // at the end, the tasks left fail with PoolBroken
      ++failed;
      std::printf("cam%d frame %lld: %s\n", h.camera, static_cast<long long>(h.frame), r.what().c_str());
    }
    held.erase(it);  // the slot goes back to the camera
  });
  detectors.pool().onWorkerEvent([&](const forklift::WorkerEvent& e) {
    if (e.kind == forklift::WorkerEvent::Kind::Restarted)
      std::printf("detector %zu replaced by a new process\n", e.index);
  });

  std::vector<std::int64_t> newest(kCameras, 0);
  for (int c = 0; c < kCameras; ++c) {
    // Up to 3 frames of each camera may wait for a detector at once; with
    // 3 held, reading that ring pauses until one comes back.
    const forklift::RingReader reader = cameras[static_cast<std::size_t>(c)]->ring().reader(forklift::RingReaderOptions{3});
    manager.readRing(reader, [&, c](forklift::ReadSlot& slot) {
      ++frames;
      const std::int64_t n = slot.user(0);
      newest[static_cast<std::size_t>(c)] = n;
      if (std::all_of(newest.begin(), newest.end(), [&](std::int64_t f) { return f >= lastFrame; }))
        manager.requestStop();
      if (n % kEvery != 0) return;
      auto f = detectors.submit(c, slot.index(), static_cast<std::int64_t>(slot.sequence()), n);
      held.emplace(f.id(), Held{c, n, std::move(slot)});  // kept: the slot stays the camera's frame
    });
  }

  for (Camera* cam : cameras) cam->stream(fps);
  const int rc = manager.run();

  std::printf("read %lld frames from %d cameras; %lld detections, %lld wrong, %lld failed; detectors replaced: %zu\n",
              static_cast<long long>(frames), kCameras, static_cast<long long>(detected),
              static_cast<long long>(wrong), static_cast<long long>(failed), detectors.pool().restarts());
  return rc == 0 && wrong == 0 ? 0 : 1;
}
