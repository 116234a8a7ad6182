// Tutorial step 3: send a message and receive an answer.
//
// The backend answers with sendOut__(Message("pong", ...)). The frontend
// waits with poll() on p.fd(), the descriptor that is readable while a
// message from the backend is waiting; any event loop can watch it beside
// its other descriptors. call() is the shortcut for one request and its
// reply.
#include <poll.h>

#include <cstdio>
#include <forklift.hpp>
#include <string>

class MyProcess : public forklift::MessageProcess {
 public:
  explicit MyProcess(std::string name) : MessageProcess(std::move(name)) {
    command("ping", &MyProcess::c__ping, {"parameter"});
    command("square", &MyProcess::c__square, {"x"});
  }

  // Frontend.
  void ping(const std::string& parameter) { send("ping", {{"parameter", parameter}}); }
  double square(double x) { return call("square", {{"x", x}}).as<double>(); }

 private:
  // Backend.
  void c__ping(std::string parameter) {
    std::printf("c__ping: %s\n", parameter.c_str());
    std::fflush(stdout);
    sendOut__(forklift::Message("pong", {{"result", "pudding"}}));
  }
  double c__square(double x) { return x * x; }
};

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines of both sides in time order, even through a pipe
  forklift::formatLogger(spdlog::level::info);
  MyProcess p("my-process");
  p.start();
  p.ping("gotcha!");

  pollfd pfd{p.fd(), POLLIN, 0};
  if (::poll(&pfd, 1, 5000) != 1) {
    std::printf("frontend: no answer within 5 s\n");
    return 1;
  }
  const forklift::Message pong = *p.tryRecv();
  std::printf("frontend got %s: result=%s\n", pong.command().c_str(), pong.get<std::string>("result").c_str());

  std::printf("frontend: square(7) = %g\n", p.square(7));
  const forklift::ExitStatus status = p.stop();
  std::printf("backend %s\n", status.describe().c_str());
  return status.ok() ? 0 : 1;
}
