// Tutorial step 5: shared memory on demand, while the backend runs.
//
// Any resource has a server side (made by the frontend) and a client side
// (opened by the backend). Here the frontend creates arrays after start(),
// so the backend did not inherit them: each one's description, which
// carries the segment's descriptor, travels in a message, and the backend
// opens its client side from it. When the frontend is done with an array it
// tells the backend to let go, then destroys its own side; the memory is
// freed once neither side holds it.
#include <cstdio>
#include <forklift.hpp>
#include <map>
#include <string>

class MyProcess : public forklift::MessageProcess {
 public:
  explicit MyProcess(std::string name) : MessageProcess(std::move(name)) {
    command("attach", &MyProcess::c__attach, {"array"});
    command("scale", &MyProcess::c__scale, {"name", "factor"});
    command("detach", &MyProcess::c__detach, {"name"});
  }

  // Frontend.
  void attach(const forklift::ShmArray<float>& a) { call("attach", {{"array", a.describe()}}); }
  double scale(const forklift::ShmArray<float>& a, double factor) {
    return call("scale", {{"name", a.name()}, {"factor", factor}}).as<double>();
  }
  void detach(const forklift::ShmArray<float>& a) { call("detach", {{"name", a.name()}}); }

 private:
  // Backend: client sides, by name.
  void c__attach(forklift::Value array) {
    auto a = forklift::ShmArray<float>::open(array);
    std::printf("c__attach: opened %s, %ld x %ld\n", a.name().c_str(), static_cast<long>(a.rows()),
                static_cast<long>(a.cols()));
    std::fflush(stdout);
    arrays_.emplace(a.name(), std::move(a));
  }
  // Scales the array in place and returns the new sum.
  double c__scale(std::string name, double factor) {
    auto m = arrays_.at(name).matrix();
    m *= static_cast<float>(factor);
    return static_cast<double>(m.sum());
  }
  void c__detach(std::string name) {
    arrays_.erase(name);
    std::printf("c__detach: closed %s\n", name.c_str());
    std::fflush(stdout);
  }

  std::map<std::string, forklift::ShmArray<float>> arrays_;
};

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  forklift::formatLogger(spdlog::level::info);
  MyProcess p("my-process");
  p.start();
  for (int round = 1; round <= 2; ++round) {
    // Server side, made now, long after the fork.
    auto a = forklift::ShmArray<float>::create("on-demand", 2, 3);
    a.matrix().setOnes();
    p.attach(a);
    const double sum = p.scale(a, 2.5 * round);
    std::printf("frontend: backend says the sum is %g; the frontend reads %g\n", sum,
                static_cast<double>(a.matrix().sum()));
    p.detach(a);
  }  // each array's server side goes here; the backend let go already
  const forklift::ExitStatus status = p.stop();
  std::printf("backend %s\n", status.describe().c_str());
  return status.ok() ? 0 : 1;
}
