// The pool tests' worker: one command per behaviour a pool must survive
// (an answer, a hang, a death, a death once, a failure, growth).
#pragma once

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "forklift/pool.hpp"
#include "forklift/process.hpp"

namespace forklift::test {

class Jobs : public MessageProcess {
 public:
  explicit Jobs(std::size_t i) : MessageProcess("jobs-" + std::to_string(i)) {
    command("square", &Jobs::c__square, {"x"});
    command("hang", &Jobs::c__hang);
    command("crash", &Jobs::c__crash);
    command("crash_once", &Jobs::c__crashOnce, {"path"});
    command("pid", &Jobs::c__pid);
    command("nap", &Jobs::c__nap, {"ms"});
    command("fail", &Jobs::c__fail);
    command("grow", &Jobs::c__grow, {"mib"});
  }

 private:
  double c__square(double x) { return x * x; }
  void c__hang() {
    for (;;) ::pause();
  }
  void c__crash() { ::kill(::getpid(), SIGKILL); }
  // Dies the first time (the file does not exist yet), answers the second.
  std::string c__crashOnce(std::string path) {
    if (std::FILE* f = std::fopen(path.c_str(), "r")) {
      std::fclose(f);
      return "second time";
    }
    if (std::FILE* f = std::fopen(path.c_str(), "w")) std::fclose(f);
    ::kill(::getpid(), SIGKILL);
    return "not reached";
  }
  int c__pid() { return static_cast<int>(::getpid()); }
  int c__nap(int ms) {
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return ms;
  }
  void c__fail() { throw std::runtime_error("this task fails"); }
  // Keeps `mib` MiB more, touched, so they count as resident.
  int c__grow(int mib) {
    ballast_.emplace_back(static_cast<std::size_t>(mib) << 20, 'x');
    return static_cast<int>(::getpid());
  }
  std::vector<std::string> ballast_;
};

inline WorkerPool::Factory jobs() {
  return [](std::size_t i) { return std::make_unique<Jobs>(i); };
}

}  // namespace forklift::test
