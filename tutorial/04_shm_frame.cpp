// Tutorial step 4, continued: a colour frame, an array of rank 3.
//
// A camera gives height x width x 3 bytes, laid out as numpy and OpenCV lay
// them out: row-major, the three channels of a pixel side by side. A
// ShmTensor holds an array of any rank. The frontend creates a full HD frame
// before start(); the backend, standing in for a camera process, paints it
// through tensor(); the frontend reads the same pages in place: one colour
// channel at a time through channel(c), one row through plane(y), single
// pixels through tensor().
#include <cstdint>
#include <cstdio>
#include <forklift.hpp>
#include <string>

using Frame = forklift::ShmTensor<std::uint8_t, 3>;  // height x width x channel

class Camera : public forklift::MessageProcess {
 public:
  explicit Camera(std::string name)
      : MessageProcess(std::move(name)), frame_(Frame::create("frame", 1080, 1920, 3)) {  // server side
    command("grab", &Camera::c__grab, {"number"});
  }

  // Frontend: returns when the backend has painted frame `number`.
  void grab(int number) { call("grab", {{"number", number}}); }
  const Frame& frame() const { return frame_; }

 private:
  // Backend: the client side, opened by name; the shape comes from the header.
  void preRun__() override { client_ = Frame::open(frame_.name()); }
  void postRun__() override { client_ = {}; }

  // A grey picture with a red 200 x 200 square that moves right by 100
  // pixels a frame.
  void c__grab(int number) {
    auto t = client_.tensor();  // an Eigen::TensorMap, indices (y, x, channel)
    t.setConstant(64);
    const int top = 400;
    const int left = 100 * number;
    for (int y = top; y < top + 200; ++y)
      for (int x = left; x < left + 200; ++x) {
        t(y, x, 0) = 255;
        t(y, x, 1) = 0;
        t(y, x, 2) = 0;
      }
    std::printf("c__grab: painted frame %d\n", number);
    std::fflush(stdout);
  }

  Frame frame_;   // frontend: creates the name and removes it
  Frame client_;  // backend: opens the name, never removes it
};

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  forklift::formatLogger(spdlog::level::info);
  Camera camera("camera");
  const Frame& f = camera.frame();
  std::printf("frame %s: %ld x %ld x %ld uint8, %zu bytes\n", f.name().c_str(), static_cast<long>(f.dimensions()[0]),
              static_cast<long>(f.dimensions()[1]), static_cast<long>(f.dimensions()[2]), f.bytes());
  camera.start();
  for (int number = 1; number <= 2; ++number) {
    camera.grab(number);
    // Channels are 1080 x 1920 Eigen maps whose neighbours are 3 bytes apart.
    const auto red = f.channel(0).array();
    const auto green = f.channel(1).array();
    const Eigen::ArrayXX<bool> isRed = red == std::uint8_t{255} && green == std::uint8_t{0};
    Eigen::Index top = 0;
    Eigen::Index left = 0;
    isRed.cast<int>().maxCoeff(&top, &left);  // the first red pixel
    std::printf("frontend: frame %d has %ld red pixels, the top left one at row %ld, column %ld\n", number,
                static_cast<long>(isRed.count()), static_cast<long>(top), static_cast<long>(left));
    // A row is plane(y), 1920 x 3: pixels by channels.
    const auto row = f.plane(500);
    std::printf("frontend: row 500 crosses the square for %ld pixels\n",
                static_cast<long>((row.col(0).array() == std::uint8_t{255}).count()));
    const auto t = f.tensor();
    std::printf("frontend: pixel (500, %ld) is (%d, %d, %d), pixel (0, 0) is (%d, %d, %d)\n", static_cast<long>(left),
                t(500, left, 0), t(500, left, 1), t(500, left, 2), t(0, 0, 0), t(0, 0, 1), t(0, 0, 2));
  }
  const forklift::ExitStatus status = camera.stop();
  std::printf("backend %s\n", status.describe().c_str());
  return status.ok() ? 0 : 1;
}
