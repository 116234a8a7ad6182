// Tutorial step 2: send a message and wait until the backend has done it.
//
// An EventGroup is made in the constructor, before the fork, so both sides
// hold the same events. The frontend reserves one (SyncIndex), sends its
// index with the message, and waits at the end of the scope until the
// backend sets it. The wait has a timeout and ends at once if the backend
// dies.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <forklift.hpp>
#include <string>
#include <thread>

class MyProcess : public forklift::MessageProcess {
 public:
  explicit MyProcess(std::string name) : MessageProcess(std::move(name)), events_(10) {
    command("ping", &MyProcess::c__ping, {"parameter", "event_index"});
  }

  // Frontend: returns only when the backend has handled the ping.
  void ping(const std::string& parameter) {
    forklift::SyncIndex sync(events_, *this, std::chrono::seconds(5));
    send("ping", {{"parameter", parameter}, {"event_index", sync.index()}});
  }  // <- waits here

 private:
  // Backend.
  void c__ping(std::string parameter, std::size_t event_index) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // some work
    std::printf("c__ping: %s, work done\n", parameter.c_str());
    std::fflush(stdout);
    events_.set(event_index);
  }

  forklift::EventGroup events_;
};

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines of both sides in time order, even through a pipe
  forklift::formatLogger(spdlog::level::info);
  MyProcess p("my-process");
  p.start();
  const auto t0 = std::chrono::steady_clock::now();
  p.ping("gotcha!");
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  std::printf("frontend: ping returned after the backend's work (%lld ms)\n", static_cast<long long>(ms.count()));
  const forklift::ExitStatus status = p.stop();
  std::printf("backend %s\n", status.describe().c_str());
  return status.ok() ? 0 : 1;
}
