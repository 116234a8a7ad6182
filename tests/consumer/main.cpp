// A user's program built against forklift's installed headers and library:
// one backend, one call, an orderly stop.
#include <forklift/process.hpp>

#include <cstdio>

class Squarer : public forklift::MessageProcess {
 public:
  explicit Squarer(std::string name) : MessageProcess(std::move(name)) {
    command("square", &Squarer::c__square, {"x"});
  }
  double square(double x) { return call("square", {{"x", x}}).as<double>(); }

 private:
  double c__square(double x) { return x * x; }
};

int main() {
  Squarer s("consumer");
  s.start();
  std::printf("consumer: 7 squared is %g\n", s.square(7));
  return s.stop().ok() ? 0 : 1;
}
