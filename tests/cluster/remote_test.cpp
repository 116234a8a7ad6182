// tests/cluster/remote_test: remote backends (cluster/remote.hpp) under
// mpirun -np 3: the driver starts registered MessageProcess classes on the
// two agents and checks every promise of the header; the agents serve until
// the driver's Pool finalizes. Prints "N passed, N failed".
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/remote.hpp"
#include "forklift/cluster/world.hpp"

using namespace forklift;
using namespace std::chrono_literals;

namespace {

int failures = 0, passes = 0;

void check(bool ok, const std::string& what) {
  std::printf("[ %s ] %s\n", ok ? "    OK" : "FAILED", what.c_str());
  std::fflush(stdout);
  (ok ? passes : failures)++;
}

// Bounds on how long something may take, scaled as tests/support.hpp does.
double slowdown() {
  const char* s = std::getenv("FORKLIFT_TEST_SLOWDOWN");
  const double f = s ? std::atof(s) : 1.0;
  return f >= 1.0 ? f : 1.0;
}
std::int64_t slowMs(std::int64_t ms) { return static_cast<std::int64_t>(static_cast<double>(ms) * slowdown()); }

std::int64_t msSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
}

template <class E, class Fn>
std::string failsWith(Fn&& fn) {
  try {
    fn();
    return "(no error)";
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(other error) ") + e.what();
  }
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

bool readable(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

class Camera : public MessageProcess {
 public:
  Camera(std::string name, std::string device, int fps)
      : MessageProcess(std::move(name)), device_(std::move(device)), fps_(fps) {
    command("info", &Camera::c__info);
    command("add", &Camera::c__add, {"a", "b"});
    command("sleep", &Camera::c__sleep, {"ms"});
    command("emit", &Camera::c__emit, {"n"});
    command("throws", &Camera::c__throws);
    command("crash", &Camera::c__crash);
    command("stubborn", &Camera::c__stubborn);
    command("quit", &Camera::c__quit, {"code"});
  }

 private:
  Map c__info() {
    return {{"device", device_}, {"fps", fps_}, {"pid", static_cast<std::int64_t>(::getpid())}};
  }
  int c__add(int a, int b) { return a + b; }
  void c__sleep(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
  void c__emit(int n) {
    for (int i = 0; i < n; ++i) sendOut__(Message("frame", {{"i", i}}));
  }
  void c__throws() { throw std::runtime_error("thrown on purpose"); }
  void c__crash() { ::raise(SIGSEGV); }
  void c__quit(int code) { ::_exit(code); }
  void c__stubborn() {
    ::signal(SIGTERM, SIG_IGN);
    for (;;) ::pause();
  }
  std::string device_;
  int fps_;
};

class Broken : public MessageProcess {
 public:
  explicit Broken(std::string name) : MessageProcess(std::move(name)) { throw Error("Broken refuses to be made"); }
};

// A backend whose preRun__ takes 1.5 s.
class SlowStart : public MessageProcess {
 public:
  explicit SlowStart(std::string name) : MessageProcess(std::move(name)) { command("ping", &SlowStart::c__ping); }

 private:
  void preRun__() override { std::this_thread::sleep_for(1500ms); }
  int c__ping() { return 1; }
};

class NeverDefined : public MessageProcess {
 public:
  explicit NeverDefined(std::string name) : MessageProcess(std::move(name)) {}
};

Map camArgs(const std::string& device) { return {{"device", device}, {"fps", 30}}; }

bool gone(pid_t pid) {
  for (int i = 0; i < slowMs(3000); ++i) {
    if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
    std::this_thread::sleep_for(1ms);
  }
  return false;
}

}  // namespace

int main() {
  cluster::defineProcess<Camera, std::string, int>("Camera", {"device", "fps"});
  cluster::defineProcess<Broken>("Broken");
  cluster::defineProcess<SlowStart>("SlowStart");
  const std::string twice = failsWith<Error>([] { cluster::defineProcess<Broken>("Camera"); });
  cluster::Agent agent;  // then the Agent, then the World (remote.hpp, "Registering")
  cluster::World world;
  if (!world.isDriver()) return agent.serve(world);

  check(has(twice, "'Camera' is defined already"), "a class name defined twice: " + twice);
  std::string e = failsWith<Error>([] { cluster::defineProcess<Broken>("Late"); });
  check(has(e, "before the World"), "a class defined after the World: " + e);
  e = failsWith<Error>([&] { cluster::RemoteHost h(world); });
  check(has(e, "driver"), "no RemoteHost on the driver: " + e);

  std::vector<pid_t> pids;
  {
    cluster::Pool pool(world);  // its finalize() ends the agents' serve()

    // A backend on each agent, by rank and by host name.
    auto cam1 = cluster::start<Camera>(world, 1, "cam1", camArgs("/dev/video1"));
    auto cam2 = cluster::start<Camera>(world, world.host(2), "cam2", camArgs("/dev/video2"));
    pids = {cam1.pid(), cam2.pid()};
    const Message i1("info", cam1.call("info").as<Map>());
    const Message i2("info", cam2.call("info").as<Map>());
    check(i1.get<std::string>("device") == "/dev/video1" && i1.get<int>("fps") == 30 &&
              i1.get<std::int64_t>("pid") == cam1.pid() && cam1.rank() == 1,
          "cam1 runs on " + cam1.host() + " with its constructor's arguments: " + cam1.fullName());
    check(i2.get<std::string>("device") == "/dev/video2" && i2.get<std::int64_t>("pid") == cam2.pid() &&
              cam2.rank() == 2 && cam2.host() == world.host(2),
          "cam2 runs on " + cam2.host() + ": " + cam2.fullName());
    check(cam1.call("add", {{"a", 2}, {"b", 3}}).as<int>() == 5, "call returns the handler's result");

    // A figure, not a check: a call's round trip, driver -> agent -> backend and back.
    {
      std::vector<double> us;
      for (int i = 0; i < 200; ++i) {
        const auto c0 = std::chrono::steady_clock::now();
        (void)cam1.call("add", {{"a", i}, {"b", 1}});
        us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - c0).count());
      }
      std::sort(us.begin(), us.end());
      std::printf("figure: remote call round trip: median %.0f us, 90th percentile %.0f us (200 calls)\n", us[100],
                  us[180]);
    }

    // send + recv of sendOut__ messages; fd() readable exactly while one waits.
    check(!readable(cam1.fd(), 0), "fd() not readable with nothing waiting");
    cam1.send("emit", {{"n", 5}});
    bool inOrder = readable(cam1.fd(), static_cast<int>(slowMs(5000)));
    for (int i = 0; i < 5 && inOrder; ++i) {
      auto m = cam1.recv(Timeout(slowMs(5000)));
      inOrder = m && m->command() == "frame" && m->get<int>("i") == i;
    }
    check(inOrder, "5 sendOut__ messages came in order, fd() readable first");
    check(!readable(cam1.fd(), 0) && !cam1.tryRecv(), "fd() not readable once they were read");

    // A send that fails in the backend: CommandError through recv().
    cam1.send("nope");
    e = failsWith<CommandError>([&] { (void)cam1.recv(Timeout(slowMs(5000))); });
    check(has(e, "nope") && has(e, "host1"), "an unknown command sent: CommandError from recv: " + e);

    // A call past its timeout; the backend serves after.
    auto t0 = std::chrono::steady_clock::now();
    e = failsWith<TimeoutError>([&] { cam1.call("sleep", {{"ms", 1500}}, Timeout(300)); });
    const auto timedOut = msSince(t0);
    check(has(e, "timed out") && timedOut >= 300 && timedOut < 1500,
          "a call past its 300 ms timeout: TimeoutError after " + std::to_string(timedOut) + " ms: " + e);
    check(cam1.call("add", {{"a", 1}, {"b", 1}}).as<int>() == 2, "the backend serves after the timeout");

    // callAsync: several in flight, each its own result.
    std::vector<cluster::RemoteFuture> fs;
    for (int i = 0; i < 10; ++i) fs.push_back(cam2.callAsync("add", {{"a", i}, {"b", i}}));
    bool right = true;
    for (int i = 9; i >= 0; --i) right = right && fs[static_cast<std::size_t>(i)].get().as<int>() == 2 * i;
    check(right, "10 callAsync in flight, each result right (read in reverse order)");
    auto slowF = cam2.callAsync("sleep", {{"ms", 200}});
    const bool notYet = !slowF.ready();
    check(notYet && slowF.wait(Timeout(slowMs(5000))) && slowF.result().ok(),
          "a future is not ready before its reply, then is");
    auto lateF = cam1.callAsync("sleep", {{"ms", 1000}}, Timeout(100));  // not cam2: it crashes next
    e = failsWith<TimeoutError>([&] { lateF.get(); });
    check(has(e, "timed out"), "a future past its timeout: TimeoutError: " + e);

    // A handler that throws: RemoteError with its text; it goes on.
    e = failsWith<RemoteError>([&] { cam1.call("throws"); });
    check(has(e, "thrown on purpose") && has(e, "cam1"), "a handler that throws: RemoteError: " + e);
    e = failsWith<RemoteError>([&] { cam1.call("add", {{"a", "two"}, {"b", 1}}); });
    check(has(e, "'a'"), "a call with an argument of the wrong type: RemoteError: " + e);
    check(cam1.call("add", {{"a", 20}, {"b", 22}}).as<int>() == 42, "the backend serves after the errors");

    // A crash: ProcessDied with its signal, seen within a second.
    t0 = std::chrono::steady_clock::now();
    e = failsWith<ProcessDied>([&] { cam2.call("crash"); });
    const auto seen = msSince(t0);
    check(has(e, "SIGSEGV") && cam2.exitStatus().how == ExitStatus::How::Signaled &&
              cam2.exitStatus().signal == SIGSEGV && !cam2.isAlive(),
          "a crash: ProcessDied with its status: " + e);
    check(seen < slowMs(1000), "the crash was seen by the driver within 1 s: " + std::to_string(seen) + " ms");
    std::printf("figure: crash seen by the driver %lld ms after the call was made\n", static_cast<long long>(seen));
    check(readable(cam2.fd(), static_cast<int>(slowMs(5000))), "fd() is readable for the end");
    e = failsWith<ProcessDied>([&] { (void)cam2.recv(Timeout(slowMs(5000))); });
    check(has(e, "died"), "recv after the crash: ProcessDied: " + e);
    e = failsWith<ProcessDied>([&] { cam2.call("add", {{"a", 1}, {"b", 1}}); });
    check(has(e, "SIGSEGV"), "a call after the crash: ProcessDied at once: " + e);
    check(cam2.stop().signal == SIGSEGV, "stop() after the crash returns its status");

    // A backend that leaves with _exit(9) in a handler: ProcessDied with its code.
    {
      auto quitter = cluster::start<Camera>(world, 1, "quitter", camArgs("/dev/null"));
      pids.push_back(quitter.pid());
      e = failsWith<ProcessDied>([&] { quitter.call("quit", {{"code", 9}}); });
      check(has(e, "exited with code 9") && quitter.exitStatus().how == ExitStatus::How::Exited &&
                quitter.exitStatus().code == 9,
            "a backend that calls _exit(9): ProcessDied: " + e);
    }

    // A backend that ignores SIGTERM: stop() escalates to SIGKILL.
    auto stubborn = cluster::start<Camera>(world, 2, "stubborn", camArgs("/dev/null"));
    pids.push_back(stubborn.pid());
    stubborn.send("stubborn");
    std::this_thread::sleep_for(100ms);  // the handler runs and ignores SIGTERM
    t0 = std::chrono::steady_clock::now();
    const ExitStatus st = stubborn.stop(Timeout(200));
    const auto stopMs = msSince(t0);
    check(st.how == ExitStatus::How::Signaled && st.signal == SIGKILL && st.escalation == 2,
          "stop() of a backend that ignores SIGTERM escalates to SIGKILL: " + st.describe() + " after " +
              std::to_string(stopMs) + " ms");
    check(stopMs >= 700 && stopMs < slowMs(5000), "the ladder took its 200 ms + 500 ms, then killed");

    // Bad input at start: clear errors, the agent keeps serving.
    e = failsWith<Error>([&] { (void)cluster::RemoteProcess(world, 1, "Nope", "x"); });
    check(has(e, "no process class 'Nope'") && has(e, "host1"), "an unknown class: " + e);
    e = failsWith<Error>([&] { (void)cluster::RemoteProcess(world, 1, "Camera", "x", {{"device", "d"}, {"fps", "thirty"}}); });
    check(has(e, "'fps'") && !has(e, "preRun__"), "a constructor argument of the wrong type, refused before a fork: " + e);
    e = failsWith<Error>([&] { (void)cluster::RemoteProcess(world, 2, "Camera", "x", {{"fps", 1}}); });
    check(has(e, "'device'"), "a missing constructor argument: " + e);
    e = failsWith<Error>([&] { (void)cluster::RemoteProcess(world, 2, "Broken", "x"); });
    check(has(e, "Broken refuses to be made"), "a constructor that throws in the backend: " + e);
    e = failsWith<Error>([&] { (void)cluster::RemoteProcess(world, 7, "Camera", "x", camArgs("d")); });
    check(has(e, "no agent"), "a rank that is no agent: " + e);
    e = failsWith<Error>([&] { (void)cluster::start<Camera>(world, "nohost", "x", camArgs("d")); });
    check(has(e, "no agent runs on host 'nohost'"), "a host with no agent: " + e);
    e = failsWith<Error>([&] {
      (void)cluster::RemoteProcess(world, 1, "Camera", "x", {{"device", std::string(100u << 10, 'd')}, {"fps", 1}});
    });
    check(has(e, "over the fork server's limit"), "constructor arguments over the fork server's limit: " + e);
    e = failsWith<Error>([&] { (void)cluster::start<NeverDefined>(world, 1, "x"); });
    check(has(e, "was not defined"), "a class never defined: " + e);
    auto again = cluster::start<Camera>(world, 2, "again", camArgs("/dev/video9"));
    pids.push_back(again.pid());
    check(Message("info", again.call("info").as<Map>()).get<std::string>("device") == "/dev/video9",
          "the agent starts backends after the bad starts");

    // A send the backend does not read within sendTimeout: CommandError from
    // recv() saying it was not delivered; the backend is stopped as any other.
    {
      cluster::RemoteOptions o;
      o.sendTimeout = Timeout(300);
      cluster::RemoteProcess busy(world, 2, "Camera", "busy", camArgs("/dev/null"), o);
      pids.push_back(busy.pid());
      busy.send("sleep", {{"ms", 2000}});
      busy.send("add", {{"a", Bytes(8u << 20, 7)}, {"b", 1}});  // more than its socket holds
      e = failsWith<CommandError>([&] { (void)busy.recv(Timeout(slowMs(5000))); });
      check(has(e, "could not be delivered") && has(e, "'add'"), "a send not read within sendTimeout: " + e);
      const ExitStatus sb = busy.stop(Timeout(slowMs(3000)));
      check(sb.ended(), "the busy backend stopped: " + sb.describe());
    }

    // A slow start (preRun__ of 1.5 s) on rank 1 does not hold up cam1 there.
    {
      std::string slowStarted;
      std::thread starter([&] {
        try {
          cluster::RemoteProcess slow(world, 1, "SlowStart", "slow");
          slowStarted = slow.call("ping").as<int>() == 1 ? "ok" : "wrong reply";
        } catch (const std::exception& x) {
          slowStarted = x.what();
        }
      });
      std::this_thread::sleep_for(300ms);  // the start is under way
      std::int64_t longest = 0;
      for (int i = 0; i < 5; ++i) {
        const auto c0 = std::chrono::steady_clock::now();
        (void)cam1.call("add", {{"a", i}, {"b", i}});
        longest = std::max(longest, msSince(c0));
      }
      starter.join();
      check(slowStarted == "ok", "a backend with a slow preRun__ starts: " + slowStarted);
      check(longest < 1000, "calls to another backend of that agent meanwhile: the longest took " +
                                std::to_string(longest) + " ms");
      cluster::RemoteOptions o;
      o.startTimeout = Timeout(200);
      e = failsWith<Error>([&] { (void)cluster::RemoteProcess(world, 1, "SlowStart", "late", {}, o); });
      check(has(e, "not ready within 200 ms"), "a start past its startTimeout: " + e);
    }

    // Calls from several threads at once, each matched to its own reply.
    std::vector<std::thread> callers;
    std::atomic<int> matched{0};
    for (int t = 0; t < 4; ++t)
      callers.emplace_back([&, t] {
        for (int i = 0; i < 50; ++i)
          if (again.call("add", {{"a", i}, {"b", 1000 * t}}).as<int>() == i + 1000 * t) ++matched;
      });
    for (auto& c : callers) c.join();
    check(matched == 200, "4 threads x 50 calls, each its own reply: " + std::to_string(matched.load()));

    // A backend the driver never stops: the agent's RemoteHost stops it when
    // the agent's serve() ends (leaked on purpose: its destructor would stop it).
    auto* orphan = new cluster::RemoteProcess(world, 1, "Camera", "orphan", camArgs("/dev/null"));
    pids.push_back(orphan->pid());

    // An orderly stop: exit 0, recv says PeerClosed (not ProcessDied).
    check(cam1.exitStatus().how == ExitStatus::How::Running && cam1.isAlive(), "exitStatus() is Running before the end");
    cam1.send("emit", {{"n", 2}});
    const ExitStatus s1 = cam1.stop();
    check(s1.ok(), "stop(): " + s1.describe());
    int before = 0;
    for (; before < 2; ++before)
      if (!cam1.recv(Timeout(slowMs(5000)))) break;
    e = failsWith<PeerClosed>([&] { (void)cam1.recv(Timeout(slowMs(5000))); });
    check(before == 2 && has(e, "stopped") && !has(e, "(other"),
          "after stop, the messages sent before, then PeerClosed: " + e);
    e = failsWith<ProcessDied>([&] { cam1.send("add", {{"a", 1}, {"b", 1}}); });
    check(has(e, "stopped"), "a send after stop: ProcessDied: " + e);
    // `again` is left running: the agent stops it when finalize() ends its
    // serve(), and reports that end.
    pool.finalize();
    const ExitStatus sa = again.stop();
    check(sa.ok() && !again.isAlive(), "a backend left running is stopped by its agent's end: " + sa.describe());
  }
  // Nothing is left behind on the hosts (one machine here: the pids are ours to see).
  bool allGone = true;
  for (pid_t p : pids) allGone = allGone && gone(p);
  check(allGone, "every backend process has ended");

  std::printf("%d passed, %d failed\n", passes, failures);
  std::fflush(stdout);
  return failures == 0 ? 0 : 1;
}
