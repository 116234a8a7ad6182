// Tutorial step 4: shared memory, created before the fork.
//
// The frontend creates the array ("server side") in the constructor, before
// start(). The backend, forked after it, holds it too and opens it by its
// label in preRun__ ("client side"), and lets go of it in postRun__. Both see the same pages through an Eigen map:
// what the backend writes, the frontend reads, with no copy. A SyncIndex
// tells the frontend when the writing is done.
#include <cstdio>
#include <forklift.hpp>
#include <iostream>
#include <string>

class MyProcess : public forklift::MessageProcess {
 public:
  explicit MyProcess(std::string name)
      : MessageProcess(std::move(name)),
        events_(4),
        array_(forklift::ShmArray<double>::create("tutorial", 3, 4)) {  // server side
    command("fill", &MyProcess::c__fill, {"value", "event_index"});
  }

  // Frontend: returns when the backend has written the array.
  void fill(double value) {
    forklift::SyncIndex sync(events_, *this);
    send("fill", {{"value", value}, {"event_index", sync.index()}});
  }
  const forklift::ShmArray<double>& array() const { return array_; }

 private:
  // Backend: the client side of the array.
  void preRun__() override { client_ = forklift::ShmArray<double>::open(array_.name()); }
  void postRun__() override { client_ = {}; }

  void c__fill(double value, std::size_t event_index) {
    auto m = client_.matrix();  // Eigen::Map over the shared pages
    for (Eigen::Index i = 0; i < m.rows(); ++i)
      for (Eigen::Index j = 0; j < m.cols(); ++j) m(i, j) = value + 10.0 * static_cast<double>(i) + static_cast<double>(j);
    std::printf("c__fill: wrote %ld x %ld values starting at %g\n", static_cast<long>(m.rows()),
                static_cast<long>(m.cols()), value);
    std::fflush(stdout);
    events_.set(event_index);
  }

  forklift::EventGroup events_;
  forklift::ShmArray<double> array_;   // frontend: creates the name and removes it
  forklift::ShmArray<double> client_;  // backend: opens the name, never removes it
};

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines of both sides in time order, even through a pipe
  forklift::formatLogger(spdlog::level::info);
  MyProcess p("my-process");
  std::printf("array %s: %ld x %ld doubles, %zu bytes\n", p.array().name().c_str(), static_cast<long>(p.array().rows()),
              static_cast<long>(p.array().cols()), p.array().bytes());
  p.start();
  p.fill(1.0);
  std::cout << "frontend sees:\n" << p.array().matrix() << std::endl;
  p.fill(100.0);
  std::cout << "frontend sees after the second fill:\n" << p.array().matrix() << std::endl;
  const forklift::ExitStatus status = p.stop();
  std::printf("backend %s\n", status.describe().c_str());
  return status.ok() ? 0 : 1;
}
