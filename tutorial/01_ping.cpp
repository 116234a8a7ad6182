// Tutorial step 1: send a message to a forked process.
//
// The frontend method ping() sends Message("ping", parameter=...) over the
// intercom; the backend's loop finds the handler registered for "ping" and
// runs c__ping in the forked process.
#include <unistd.h>

#include <cstdio>
#include <forklift.hpp>
#include <string>

class MyProcess : public forklift::MessageProcess {
 public:
  explicit MyProcess(std::string name) : MessageProcess(std::move(name)) {
    command("ping", &MyProcess::c__ping, {"parameter"});
  }

  // Frontend: runs in the main process.
  void ping(const std::string& parameter) { send("ping", {{"parameter", parameter}}); }

 private:
  // Backend: runs in the forked process.
  void c__ping(std::string parameter) {
    std::printf("c__ping: %s (backend, pid %d)\n", parameter.c_str(), ::getpid());
    std::fflush(stdout);
  }
};

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines of both sides in time order, even through a pipe
  forklift::formatLogger(spdlog::level::info);
  MyProcess p("my-process");
  p.start();
  std::printf("frontend pid %d started the backend, pid %d\n", ::getpid(), p.pid());
  p.ping("gotcha!");
  p.ping("and again!");
  const forklift::ExitStatus status = p.stop();  // the pings are handled before the stop
  std::printf("backend %s\n", status.describe().c_str());
  return status.ok() ? 0 : 1;
}
