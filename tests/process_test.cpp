#include "forklift/process.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "child.hpp"
#include "forklift/sync.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using test::exitCodeOf;
using test::forkChild;
using test::waitChild;

using test::contains;
const auto errorOf = [](auto&& fn) { return test::thrown(fn); };

// A process with one command per behaviour under test.
class EchoProcess : public MessageProcess {
 public:
  explicit EchoProcess(std::string name = "echo", ProcessOptions o = {}) : MessageProcess(std::move(name), std::move(o)) {
    command("square", &EchoProcess::c__square, {"x"});
    command("greet", &EchoProcess::c__greet, {"who", "times"});
    command("pid", &EchoProcess::c__pid);
    command("boom", &EchoProcess::c__boom, {"what"});
    command("nothing", &EchoProcess::c__nothing);
    command("chatter", &EchoProcess::c__chatter, {"n"});
    command("later", &EchoProcess::c__later, {"ms", "value"});
    command("drop", &EchoProcess::c__drop);
    command("sleep", &EchoProcess::c__sleep, {"ms"});
    command("spin", &EchoProcess::c__spin);
    command("flood", &EchoProcess::c__flood, {"bytes"});
    command("tick", &EchoProcess::c__tick, {"period_ms", "count"});
    command("watch", &EchoProcess::c__watch);
    command("set", &EchoProcess::c__set, {"event_index"});
    command("ignore_term", &EchoProcess::c__ignoreTerm);
    command("comm", &EchoProcess::c__comm);
    commandRaw("raw", [](const Message& m) { return Value(static_cast<std::int64_t>(m.args().size())); });
  }

  Event userEvent;       // made before fork: the backend watches it
  Event postRunEvent;    // set by postRun__
  EventGroup events{4};
  bool failPreRun = false;

 private:
  void preRun__() override {
    if (failPreRun) throw std::runtime_error("no GPU today");
  }
  void postRun__() override { postRunEvent.set(); }

  double c__square(double x) { return x * x; }
  std::string c__greet(std::string who, int times) {
    std::string s;
    for (int i = 0; i < times; ++i) s += "hello " + who + ";";
    return s;
  }
  std::int64_t c__pid() { return ::getpid(); }
  void c__boom(std::string what) { throw std::runtime_error(what); }
  void c__nothing() {}
  int c__chatter(int n) {
    for (int i = 0; i < n; ++i) sendOut__(Message("chat", {{"i", i}}));
    return n;
  }
  void c__later(int ms, std::string value, Reply reply) {
    auto shared = std::make_shared<Reply>(std::move(reply));
    after__(Timeout(ms), [shared, value] { shared->resolve(value); });
  }
  void c__drop(Reply) {}  // drops the reply: the caller hears an error
  void c__sleep(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
  void c__spin() {
    for (;;) ::pause();
  }
  // Sends until sendOut__ refuses; returns how many went out.
  std::int64_t c__flood(int bytes) {
    std::int64_t sent = 0;
    try {
      for (;;) {
        sendOut__(Message("blob", {{"seq", sent}, {"data", std::string(static_cast<std::size_t>(bytes), 'x')}}));
        ++sent;
      }
    } catch (const TimeoutError&) {
    }
    return sent;
  }
  void c__tick(int periodMs, int count) {
    auto n = std::make_shared<int>(0);
    auto id = std::make_shared<std::uint64_t>(0);
    *id = every__(Timeout(periodMs), [this, n, id, count] {
      sendOut__(Message("tick", {{"n", ++*n}}));
      if (*n == count) cancel__(*id);
    });
  }
  void c__watch() {
    watch__(userEvent.fd(), [this](int) {
      userEvent.clear();
      sendOut__(Message("seen"));
    });
  }
  void c__set(std::size_t eventIndex) { events.set(eventIndex); }
  void c__ignoreTerm() { ::signal(SIGTERM, SIG_IGN); }
  std::string c__comm() {
    std::ifstream f("/proc/self/comm");
    std::string s;
    std::getline(f, s);
    return s;
  }
};

// call() hands over the reply's value with CallResult::take: moved, so a
// reply of megabytes is not copied on its way to the caller.
TEST(CallResult, TakeMovesTheValueOutAndRethrowsAnError) {
  CallResult r(Value(Bytes(1 << 20, 7)));
  const std::uint8_t* at = r.get().getIf<Bytes>()->data();
  const Value v = r.take();
  ASSERT_NE(v.getIf<Bytes>(), nullptr);
  EXPECT_EQ(v.getIf<Bytes>()->data(), at);  // the same buffer: not a copy
  EXPECT_EQ(v.getIf<Bytes>()->size(), 1u << 20);
  EXPECT_EQ(r.get().kind(), Value::Kind::Nil);
  CallResult failed(std::make_exception_ptr(RemoteError("it broke")));
  EXPECT_THROW(failed.take(), RemoteError);
}

TEST(Process, SendRunsTheHandlerInTheBackend) {
  EchoProcess p;
  p.start();
  EXPECT_GT(p.pid(), 0);
  EXPECT_NE(p.pid(), ::getpid());
  EXPECT_TRUE(p.isAlive());
  EXPECT_EQ(p.call("pid", {}, test::slow(5s)).as<std::int64_t>(), p.pid());
  p.send("chatter", {{"n", 2}});
  EXPECT_EQ(p.recv(test::slow(5s))->get<int>("i"), 0);
  EXPECT_EQ(p.recv(test::slow(5s))->get<int>("i"), 1);
  const ExitStatus s = p.stop(test::slow(5s));
  EXPECT_TRUE(s.ok()) << s.describe();
  EXPECT_FALSE(p.isAlive());
}

// ProcessOptions::spin: both sides poll the queue before they sleep. Calls,
// output, timers and stop must all still work (a spinning backend that
// forgot libuv's timers or the stop bell would hang here); over a socket
// the option does nothing.
TEST(Process, SpinningSidesServeCallsOutputTimersAndStopPromptly) {
  for (Transport t : {Transport::SharedMemory, Transport::Socket}) {
    ProcessOptions o;
    o.transport = t;
    o.spin = std::chrono::microseconds(200);
    EchoProcess p("spinner", o);
    p.start();
    for (int i = 0; i < 2000; ++i) ASSERT_EQ(p.call("square", {{"x", i}}).as<double>(), double(i) * i);
    EXPECT_EQ(p.call("later", {{"ms", 30}, {"value", "timer"}}).as<std::string>(), "timer");
    p.send("chatter", {{"n", 50}});
    for (int i = 0; i < 50; ++i) ASSERT_EQ(p.recv(test::slow(5s))->get<int>("i"), i);
    std::this_thread::sleep_for(20ms);  // both sides past their spin, asleep
    EXPECT_EQ(p.call("square", {{"x", 3}}).as<double>(), 9.0);
    const auto t0 = std::chrono::steady_clock::now();
    const ExitStatus s = p.stop(test::slow(5s));
    EXPECT_TRUE(s.ok()) << s.describe();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(1s));
  }
}

// process.hpp: a start past the open-file limit fails with EMFILE saying
// so, leaves nothing open, and the backends already running keep serving.
// In a child, whose limit the test may lower.
// process.hpp: a running backend holds 12 descriptors in the frontend over
// shared memory and 5 over the socket, and gives all of them back.
class BareProcess : public MessageProcess {
 public:
  explicit BareProcess(ProcessOptions o) : MessageProcess("fds", std::move(o)) {
    command("twice", &BareProcess::c__twice, {"x"});
  }
  ~BareProcess() override { stop(); }

 private:
  std::int64_t c__twice(std::int64_t x) { return 2 * x; }
};

TEST(Process, ABackendHoldsTheDescriptorsTheHeaderSays) {
  if (std::getenv("FORKLIFT_TRANSPORT")) GTEST_SKIP() << "FORKLIFT_TRANSPORT overrides the transport of each case";
  for (const auto& [transport, expected] : {std::pair{Transport::SharedMemory, 12}, std::pair{Transport::Socket, 5}}) {
    ProcessOptions o;
    o.transport = transport;
    const int before = test::openFdCount();
    {
      BareProcess p(o);
      p.start();
      EXPECT_EQ(p.call("twice", {{"x", 21}}).as<std::int64_t>(), 42);
      EXPECT_EQ(test::openFdCount() - before, expected) << (transport == Transport::Socket ? "socket" : "shm");
    }  // stopped and destroyed: every descriptor is given back
    EXPECT_EQ(test::openFdCount(), before);
  }
}

// Reports, in its backend, what it inherited of the frontend's list of
// hidden queues and whether an address is mapped.
class MapsProcess : public MessageProcess {
 public:
  MapsProcess() : MessageProcess("maps", over(Transport::SharedMemory)) {
    command("listed", &MapsProcess::c__listed);
    command("mapped", &MapsProcess::c__mapped, {"at"});
  }
  ~MapsProcess() override { stop(); }

 private:
  static ProcessOptions over(Transport t) {
    ProcessOptions o;
    o.transport = t;
    return o;
  }
  std::int64_t c__listed() { return static_cast<std::int64_t>(detail::frontend_maps::snapshot().size()); }
  // The mapping that holds `at` ("device inode path" of its maps line),
  // "" when nothing does: the range freed by the unmap may hold another
  // mapping by now (ASan's, say), but never the earlier backend's queues.
  std::string c__mapped(std::int64_t at) {
    std::istringstream maps(test::readFile("/proc/self/maps"));
    for (std::string line; std::getline(maps, line);) {
      const auto from = std::stoull(line.substr(0, line.find('-')), nullptr, 16);
      const auto to = std::stoull(line.substr(line.find('-') + 1), nullptr, 16);
      if (static_cast<std::uint64_t>(at) < from || static_cast<std::uint64_t>(at) >= to) continue;
      std::istringstream fields(line);
      std::string range, perms, offset, device, inode, path;
      fields >> range >> perms >> offset >> device >> inode;
      std::getline(fields, path);
      return device + " " + inode + path;
    }
    return "";
  }
};

// A backend forked after another holds none of the other's shared-memory
// queues (MADV_DONTFORK), and forklift unmaps their ranges in it too:
// valgrind knows no MADV_DONTFORK and took them for mapped memory, and its
// leak check at each later backend's exit faulted once per word of them
// (tests/valgrind_tutorials.py --whole-scan holds that under valgrind).
// The list of hidden ranges is exact: one per running backend (its two
// channels' queues are one mapping), none left once it is destroyed, none
// inherited.
TEST(Process, ALaterBackendInheritsNoneOfAnEarlierBackendsQueues) {
  if (std::getenv("FORKLIFT_TRANSPORT")) GTEST_SKIP() << "FORKLIFT_TRANSPORT overrides the transport of each case";
  const auto before = detail::frontend_maps::snapshot();
  {
    MapsProcess first;
    first.start();
    auto listed = detail::frontend_maps::snapshot();
    ASSERT_EQ(listed.size(), before.size() + 1) << "the command and the output queues, in one mapping";
    MapsProcess second;
    second.start();
    EXPECT_EQ(detail::frontend_maps::snapshot().size(), before.size() + 2);
    EXPECT_EQ(second.call("listed").as<std::int64_t>(), 0) << "a backend inherits no list";
    auto mapping = [](MapsProcess& p, std::uintptr_t at) {
      return p.call("mapped", {{"at", static_cast<std::int64_t>(at)}}).as<std::string>();
    };
    for (const auto& [base, bytes] : listed) {
      const std::string queues = mapping(first, base);
      ASSERT_NE(queues, "") << "its own queues";
      EXPECT_NE(mapping(second, base), queues);
      EXPECT_NE(mapping(second, base + bytes - 1), queues);
    }
  }
  EXPECT_EQ(detail::frontend_maps::snapshot(), before);
}

TEST(Process, StartingPastTheDescriptorLimitIsAClearErrorAndLeaksNothing) {
  const pid_t pid = test::forkChild([] {
    test::ScopedFdLimit limit(96);
    if (!limit.ok()) return 10;
    std::vector<std::unique_ptr<EchoProcess>> running;
    std::string error;
    bool inStart = false;  // it ran out in start(), not in a constructor's Event
    for (int i = 0; i < 96 && error.empty(); ++i) {
      std::unique_ptr<EchoProcess> p;
      try {
        p = std::make_unique<EchoProcess>("fd" + std::to_string(i));  // its Events take descriptors too
      } catch (const Error& e) {
        error = e.what();
        break;
      }
      const int before = test::openFdCount();
      try {
        p->start();
        running.push_back(std::move(p));
      } catch (const Error& e) {
        error = e.what();
        inStart = true;
        if (test::openFdCount() != before) return 11;  // the failed start left descriptors open
      } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected: %s\n", e.what());
        return 16;
      }
    }
    // The one text of a start out of descriptors, wherever it ran out
    // (edges_test tries every place): the backend, the limit, the remedies.
    if (error.find("Too many open files") == std::string::npos ||
        (inStart &&
         (error.find(": cannot start the backend: out of file descriptors (this process holds ") == std::string::npos ||
          error.find("its limit RLIMIT_NOFILE is 96;") == std::string::npos ||
          error.find("ulimit -n") == std::string::npos ||
          error.find("FORKLIFT_TRANSPORT=socket") == std::string::npos))) {
      std::fprintf(stderr, "the error: %s\n", error.c_str());
      return 12;
    }
    if (running.size() < 3) return 13;
    for (auto& p : running)
      if (p->call("square", {{"x", 2}}, test::slow(5s)).as<double>() != 4.0) return 14;
    for (auto& p : running)
      if (!p->stop(test::slow(5s)).ok()) return 15;
    return 0;
  });
  EXPECT_EQ(test::exitCodeOf(test::waitChild(pid, 60s)), 0);
}

// A backend that never runs out of commands still runs its timers: ticks
// every 10 ms arrive while the frontend keeps sending (a loop that ran
// libuv only when idle would deliver none of them during the flood).
TEST(Process, TimersRunWhileCommandsKeepComing) {
  EchoProcess p("busy");
  p.start();
  p.send("tick", {{"period_ms", 10}, {"count", 5}});
  const auto t0 = std::chrono::steady_clock::now();
  int ticks = 0;
  // Commands without a pause until every tick came (or 10 s passed).
  while (ticks < 5 && std::chrono::steady_clock::now() - t0 < test::slow(10s)) {
    for (int i = 0; i < 50; ++i) p.send("nothing", {});
    while (auto m = p.recv(Timeout::zero())) ticks += m->command() == "tick";
  }
  EXPECT_EQ(ticks, 5) << "ticks seen during 10 s of commands";
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Process, CallReturnsWhatTheHandlerReturns) {
  EchoProcess p;
  p.start();
  EXPECT_EQ(p.call("square", {{"x", 3}}, test::slow(5s)).as<double>(), 9.0);
  EXPECT_EQ(p.call("greet", {{"who", "bob"}, {"times", 2}}, test::slow(5s)).as<std::string>(), "hello bob;hello bob;");
  EXPECT_TRUE(p.call("nothing", {}, test::slow(5s)).isNil());
  EXPECT_EQ(p.call("raw", {{"a", 1}, {"b", 2}}, test::slow(5s)).as<int>(), 2);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Process, NamesItselfClassDotName) {
  EchoProcess p("my-process");
  p.start();
  EXPECT_EQ(p.fullName(), "EchoProcess.my-process");
  EXPECT_EQ(p.call("comm", {}, test::slow(5s)).as<std::string>(), "my-process");
  std::ifstream f("/proc/" + std::to_string(p.pid()) + "/comm");
  std::string comm;
  std::getline(f, comm);
  EXPECT_EQ(comm, "my-process");
  p.stop(test::slow(5s));
}

TEST(Process, HandlerErrorIsARemoteErrorAndTheBackendKeepsServing) {
  EchoProcess p;
  p.start();
  try {
    p.call("boom", {{"what", "kaboom"}}, test::slow(5s));
    FAIL() << "no error";
  } catch (const RemoteError& e) {
    EXPECT_EQ(std::string(e.what()), "EchoProcess.echo: c__boom threw: kaboom");
  }
  p.send("boom", {{"what", "ignored, logged"}});
  EXPECT_EQ(p.call("square", {{"x", 2}}, test::slow(5s)).as<double>(), 4.0);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Process, UnknownCommandAndBadArgumentsAreClearErrors) {
  EchoProcess p;
  p.start();
  EXPECT_EQ(errorOf([&] { p.call("nope", {}, test::slow(5s)); }), "EchoProcess.echo: unknown command 'nope'");
  EXPECT_EQ(errorOf([&] { p.call("square", {{"x", "three"}}, test::slow(5s)); }),
            "EchoProcess.echo: command 'square': argument 'x': string found, double wanted");
  EXPECT_EQ(errorOf([&] { p.call("square", {}, test::slow(5s)); }),
            "EchoProcess.echo: command 'square': argument 'x' is missing");
  EXPECT_EQ(errorOf([&] { p.call("greet", {{"who", "x"}, {"times", 1.5}}, test::slow(5s)); }),
            "EchoProcess.echo: command 'greet': argument 'times': double found, int32 wanted");
  EXPECT_THROW(p.call("nope", {}, test::slow(5s)), RemoteError);
  p.send("nope");
  p.send("square", {{"x", "bad"}});
  EXPECT_EQ(p.call("square", {{"x", 5}}, test::slow(5s)).as<double>(), 25.0);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Process, RepliesMatchRequestsWhileSendOutMessagesInterleave) {
  EchoProcess p;
  p.start();
  int chats = 0;
  for (int round = 1; round <= 50; ++round) {
    EXPECT_EQ(p.call("chatter", {{"n", round % 7}}, test::slow(5s)).as<int>(), round % 7);
    EXPECT_EQ(p.call("square", {{"x", round}}, test::slow(5s)).as<double>(), round * round);
    chats += round % 7;
  }
  int got = 0;
  while (auto m = p.recv(100ms)) {
    EXPECT_EQ(m->command(), "chat");
    ++got;
  }
  EXPECT_EQ(got, chats);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Process, DeferredReplyAndTheLateReplyOfATimedOutCall) {
  EchoProcess p;
  p.start();
  EXPECT_EQ(p.call("later", {{"ms", 20}, {"value", "done"}}, test::slow(5s)).as<std::string>(), "done");
  // Times out before the deferred reply; the reply arrives later and must
  // not be taken for the answer of the next call.
  EXPECT_THROW(p.call("later", {{"ms", 300}, {"value", "stale"}}, 50ms), TimeoutError);
  std::this_thread::sleep_for(400ms);
  EXPECT_EQ(p.call("square", {{"x", 6}}, test::slow(5s)).as<double>(), 36.0);
  EXPECT_EQ(errorOf([&] { p.call("drop", {}, test::slow(5s)); }), "c__drop dropped its reply without answering");
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Process, TimersAndWatchedDescriptorsRunOnTheBackendLoop) {
  EchoProcess p;
  p.start();
  p.call("tick", {{"period_ms", 10}, {"count", 3}}, test::slow(5s));
  for (int i = 1; i <= 3; ++i) {
    auto m = p.recv(test::slow(5s));
    ASSERT_TRUE(m);
    EXPECT_EQ(m->command(), "tick");
    EXPECT_EQ(m->get<int>("n"), i);
  }
  EXPECT_FALSE(p.recv(100ms));  // cancelled after 3
  p.call("watch", {}, test::slow(5s));
  p.userEvent.set();
  auto seen = p.recv(test::slow(5s));
  ASSERT_TRUE(seen);
  EXPECT_EQ(seen->command(), "seen");
  p.userEvent.set();
  EXPECT_EQ(p.recv(test::slow(5s))->command(), "seen");
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

// The frontend does not read: sendOut__ queues up to outQueueBytes, then
// waits outWait, then throws. Nothing is lost without an error, memory
// stays bounded, and the backend is not deadlocked.
TEST(Process, SendOutBackpressureIsBoundedAndReported) {
  ProcessOptions o;
  o.outQueueBytes = 256 << 10;
  o.outWait = 200ms;
  EchoProcess p("flood", o);
  p.start();
  const auto t0 = std::chrono::steady_clock::now();
  const std::int64_t sent = p.call("flood", {{"bytes", 16 << 10}}, test::slow(10s)).as<std::int64_t>();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(5s));
  EXPECT_GT(sent, 10);
  EXPECT_LT(sent, 200);  // socket buffer + 256 KiB queue, in 16 KiB messages
  // Every message the backend counted as sent arrives, in order.
  std::int64_t got = 0;
  while (auto m = p.recv(500ms)) {
    EXPECT_EQ(m->get<std::int64_t>("seq"), got);
    ++got;
  }
  EXPECT_EQ(got, sent);
  EXPECT_EQ(p.call("square", {{"x", 3}}, test::slow(5s)).as<double>(), 9.0);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Process, PreRunFailureFailsStart) {
  EchoProcess p;
  p.failPreRun = true;
  EXPECT_EQ(errorOf([&] { p.start(); }),
            "EchoProcess.echo: preRun__ failed in the backend: no GPU today (exited with code 3 (preRun__ failed))");
  EXPECT_FALSE(p.isAlive());
}

TEST(Process, SigkillDuringCallThrowsProcessDiedAtOnce) {
  EchoProcess p;
  p.start();
  const pid_t pid = p.pid();
  std::thread killer([pid] {
    std::this_thread::sleep_for(100ms);
    ::kill(pid, SIGKILL);
  });
  const auto t0 = std::chrono::steady_clock::now();
  try {
    p.call("sleep", {{"ms", 10000}}, test::slow(8s));
    FAIL() << "no error";
  } catch (const ProcessDied& e) {
    EXPECT_EQ(std::string(e.what()), "EchoProcess.echo: the backend died during call 'sleep' (killed by SIGKILL)");
  }
  killer.join();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(2s));
  EXPECT_THROW(p.send("square", {{"x", 1}}), Error);
  EXPECT_EQ(p.stop(test::slow(1s)).signal, SIGKILL);
}

TEST(Process, StopFinishesTheHandlerInProgressThenRunsPostRun) {
  EchoProcess p;
  p.start();
  p.send("sleep", {{"ms", 200}});
  const ExitStatus s = p.stop(test::slow(5s));
  EXPECT_TRUE(s.ok()) << s.describe();
  EXPECT_EQ(s.escalation, 0);
  EXPECT_TRUE(p.postRunEvent.isSet());
  EXPECT_EQ(p.stop(test::slow(5s)).how, ExitStatus::How::Exited);  // idempotent
}

TEST(Process, StopEscalatesToSigtermThenSigkill) {
  EchoProcess a("stuck");
  a.start();
  a.send("spin");
  ExitStatus s = a.stop(200ms);
  EXPECT_EQ(s.how, ExitStatus::How::Signaled);
  EXPECT_EQ(s.signal, SIGTERM);
  EXPECT_EQ(s.escalation, 1);
  EXPECT_EQ(s.describe(), "killed by SIGTERM (after SIGTERM)");

  EchoProcess b("stubborn");
  b.start();
  b.call("ignore_term", {}, test::slow(5s));
  b.send("spin");
  const auto t0 = std::chrono::steady_clock::now();
  s = b.stop(200ms);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 700ms + test::slow(2300ms));
  EXPECT_EQ(s.signal, SIGKILL);
  EXPECT_EQ(s.escalation, 2);
}

TEST(Process, DestructorStopsTheBackend) {
  pid_t pid;
  {
    EchoProcess p;
    p.start();
    pid = p.pid();
  }
  EXPECT_EQ(::kill(pid, 0), -1);  // gone and reaped
  EXPECT_FALSE(test::hasChildren());
}

TEST(Process, BackendDiesWithItsParent) {
  // A grandchild test: our child starts a backend, reports its pid, and dies
  // without stopping it. As subreaper we inherit the orphan and can wait.
  ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t child = forkChild([&] {
    ::close(fds[0]);
    auto* p = new EchoProcess("orphan");  // never destroyed: the parent "crashes"
    p->start();
    const pid_t backend = p->pid();
    if (::write(fds[1], &backend, sizeof backend) != sizeof backend) return 2;
    ::_exit(0);
  });
  ::close(fds[1]);
  pid_t backend = -1;
  ASSERT_EQ(::read(fds[0], &backend, sizeof backend), static_cast<ssize_t>(sizeof backend));
  ::close(fds[0]);
  EXPECT_EQ(exitCodeOf(waitChild(child, 5s)), 0);
  const auto status = waitChild(backend, 2s);  // kills and reaps it if still running
  ASSERT_TRUE(status) << "the backend outlived its parent by more than 2 s";
  EXPECT_TRUE(WIFSIGNALED(*status) || WIFEXITED(*status));
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}

TEST(Process, ThousandStartStopCyclesLeaveNothingBehind) {
  const int fdsBefore = test::openFdCount();
  for (int i = 0; i < 1000; ++i) {
    EchoProcess p("cycle");
    p.start();
    const ExitStatus s = p.stop(test::slow(5s));
    ASSERT_TRUE(s.ok()) << "cycle " << i << ": " << s.describe();
  }
  EXPECT_EQ(test::openFdCount(), fdsBefore);
  EXPECT_FALSE(test::hasChildren());
}

TEST(Process, RestartAfterStop) {
  EchoProcess p;
  p.start();
  const pid_t first = p.pid();
  p.stop(test::slow(5s));
  p.start();
  EXPECT_NE(p.pid(), first);
  EXPECT_EQ(p.call("square", {{"x", 2}}, test::slow(5s)).as<double>(), 4.0);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Process, MisuseIsAClearError) {
  EchoProcess p;
  EXPECT_EQ(errorOf([&] { p.send("square", {{"x", 1}}); }), "echo: send 'square' before start or after stop");
  p.start();
  EXPECT_EQ(errorOf([&] { p.start(); }), "EchoProcess.echo: already started");
  p.stop(test::slow(5s));
  EXPECT_THROW(p.call("square", {{"x", 1}}, test::slow(1s)), Error);
}

TEST(Process, RefusesToForkWhenThreadsRun) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::thread t([&] {
    std::unique_lock lock(m);
    cv.wait(lock, [&] { return done; });
  });
  EchoProcess p;
  const std::string err = errorOf([&] { p.start(); });
  EXPECT_TRUE(contains(err, "EchoProcess.echo: cannot fork: this process already runs 2 threads")) << err;
  ProcessOptions o;
  o.allowThreads = true;
  EchoProcess q("allowed", o);
  q.start();  // with a loud warning
  EXPECT_EQ(q.call("square", {{"x", 4}}, test::slow(5s)).as<double>(), 16.0);
  EXPECT_TRUE(q.stop(test::slow(5s)).ok());
  {
    std::lock_guard lock(m);
    done = true;
  }
  cv.notify_all();
  t.join();
}

TEST(Process, SignalHandlersAreResetAndSigintCanBeIgnored) {
  struct sigaction sa {};
  sa.sa_handler = [](int) {};
  sigemptyset(&sa.sa_mask);
  struct sigaction old {};
  ::sigaction(SIGUSR1, &sa, &old);
  EchoProcess a("reset");
  a.start();
  ::kill(a.pid(), SIGUSR1);  // default action in the backend: terminate
  EXPECT_EQ(a.waitStop(test::slow(5s)).signal, SIGUSR1);
  ::sigaction(SIGUSR1, &old, nullptr);

  EchoProcess b("deaf");
  b.ignoreSigint();
  b.start();
  ::kill(b.pid(), SIGINT);
  EXPECT_EQ(b.call("square", {{"x", 3}}, test::slow(5s)).as<double>(), 9.0);
  EXPECT_TRUE(b.stop(test::slow(5s)).ok());

  EchoProcess c("hearing");
  c.start();
  ::kill(c.pid(), SIGINT);
  EXPECT_EQ(c.waitStop(test::slow(5s)).signal, SIGINT);
}

TEST(Process, InProcessModeRunsTheSameLoopInAThread) {
  ProcessOptions o;
  o.inProcess = true;
  EchoProcess p("debug", o);
  p.start();
  EXPECT_EQ(p.call("pid", {}, test::slow(5s)).as<std::int64_t>(), ::getpid());
  EXPECT_EQ(errorOf([&] { p.call("boom", {{"what", "x"}}, test::slow(5s)); }), "EchoProcess.debug: c__boom threw: x");
  p.send("chatter", {{"n", 1}});
  EXPECT_EQ(p.recv(test::slow(5s))->command(), "chat");
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
  EXPECT_TRUE(p.postRunEvent.isSet());

  ::setenv("FORKLIFT_IN_PROCESS", "1", 1);
  EchoProcess q("debug-env");
  q.start();
  EXPECT_EQ(q.call("pid", {}, test::slow(5s)).as<std::int64_t>(), ::getpid());
  EXPECT_TRUE(q.stop(test::slow(5s)).ok());
  ::unsetenv("FORKLIFT_IN_PROCESS");
}

TEST(Process, BackendLogsToItsOwnFileWithItsPid) {
  const std::string path = "/tmp/forklift-test-" + std::to_string(::getpid()) + ".log";
  ProcessOptions o;
  o.logFile = path;
  EchoProcess p("logged", o);
  p.start();
  p.send("nope");  // logged as an error by the backend
  p.call("nothing", {}, test::slow(5s));
  const pid_t pid = p.pid();
  p.stop(test::slow(5s));
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string log = ss.str();
  EXPECT_TRUE(contains(log, "[EchoProcess.logged] [pid " + std::to_string(pid) + "]")) << log;
  EXPECT_TRUE(contains(log, "unknown command 'nope'")) << log;
  ::unlink(path.c_str());
}

TEST(Sync, SyncIndexWaitsForTheBackend) {
  EchoProcess p;
  p.start();
  {
    SyncIndex sync(p.events, p, test::slow(5s));
    p.send("set", {{"event_index", sync.index()}});
  }
  SyncIndex sync(p.events, p, test::slow(5s));
  p.send("set", {{"event_index", sync.index()}});
  EXPECT_NO_THROW(sync.wait());
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Sync, SyncIndexTimesOutAndWakesWhenTheBackendDies) {
  EchoProcess p;
  p.start();
  {
    SyncIndex sync(p.events, p, 50ms);
    EXPECT_THROW(sync.wait(), TimeoutError);  // nobody sets it
  }
  const pid_t pid = p.pid();
  std::thread killer([pid] {
    std::this_thread::sleep_for(100ms);
    ::kill(pid, SIGKILL);
  });
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(
      {
        SyncIndex sync(p.events, p, test::slow(10s));
        p.send("sleep", {{"ms", 5000}});
      },
      ProcessDied);
  killer.join();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(2s));
  p.stop(test::slow(1s));
}

TEST(Sync, EventGroupRetiresAbandonedIndices) {
  EventGroup g(2);
  const std::size_t a = g.reserve();
  const std::size_t b = g.reserve();
  EXPECT_NE(a, b);
  EXPECT_THROW(g.reserve(), Error);
  g.release(a);
  EXPECT_EQ(g.reserve(), a);
  g.retire(b);
  g.release(a);
  EXPECT_EQ(g.reserve(), a);
  EXPECT_THROW(g.reserve(), Error);  // b is never handed out again
  EXPECT_THROW(g.set(7), Error);
}

TEST(Sync, EventWorksAcrossFork) {
  Event e;
  const pid_t pid = forkChild([&] {
    e.set();
    return 0;
  });
  EXPECT_TRUE(e.wait(test::slow(5s)));
  EXPECT_FALSE(e.isSet());
  EXPECT_FALSE(e.wait(10ms));
  EXPECT_EQ(exitCodeOf(waitChild(pid, 5s)), 0);
}

}  // namespace
}  // namespace forklift
