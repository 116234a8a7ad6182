// A user's module as python/README.md says to write one: a C++ backend,
// Echo, bound to Python with forklift::python::bindProcess in one line. The
// tests (test_frontend.py) drive it from Python.
#include <forklift/python.hpp>
#include <forklift/shm_tensor.hpp>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>

namespace {

class Echo : public forklift::MessageProcess {
 public:
  Echo(std::string name, int frameSide) : MessageProcess(std::move(name)), frameSide_(frameSide) {
    command("echo", &Echo::c__echo, {"value"});
    commandRaw("fields", [](const forklift::Message& m) { return forklift::Value(m.args()); });
    command("kind", &Echo::c__kind, {"value"});
    command("sleep", &Echo::c__sleep, {"seconds"});
    command("throw", &Echo::c__throw, {"text"});
    command("crash", &Echo::c__crash, {"signal"});
    command("frames", &Echo::c__frames, {"n"});
    command("shm_sum", &Echo::c__shmSum, {"array"});
    command("side", &Echo::c__side);
  }
  ~Echo() override { stop(); }  // in-process mode: stop before the members go (process.hpp)

 private:
  forklift::Value c__echo(forklift::Value value) { return value; }
  std::string c__kind(forklift::Value value) { return forklift::Value::kindName(value.kind()); }
  double c__sleep(double seconds) {
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    return seconds;
  }
  void c__throw(std::string text) { throw std::runtime_error(text); }
  void c__crash(int sig) { ::kill(::getpid(), sig); }
  // n frames of frameSide x frameSide bytes, frame i filled with i.
  void c__frames(int n) {
    for (int i = 0; i < n; ++i) {
      const auto side = static_cast<std::int64_t>(frameSide_);
      forklift::Array a(forklift::DType::U8, {side, side},
                        forklift::Bytes(static_cast<std::size_t>(side * side), static_cast<std::uint8_t>(i)));
      sendOut__(forklift::Message("frame", {{"index", i}, {"pixels", std::move(a)}}));
    }
  }
  // A shared-memory array of doubles, opened from its descriptor: returns
  // its sum and writes 42 into its first element (seen by the frontend).
  double c__shmSum(forklift::Value array) {
    auto t = forklift::ShmTensor<double, 1>::open(array);
    double sum = 0;
    for (Eigen::Index i = 0; i < t.size(); ++i) sum += t.tensor()(i);
    t.tensor()(0) = 42;
    return sum;
  }
  // The backend's pid, to tell it from the frontend's.
  std::int64_t c__side() const { return ::getpid(); }

  int frameSide_;
};

}  // namespace

PYBIND11_MODULE(example_module, m) {
  forklift::python::bindProcess<Echo, std::string, int>(m, "Echo");
}
