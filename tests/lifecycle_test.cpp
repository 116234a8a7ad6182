// The lifecycle promises of MessageProcess, each tried the way a careless or
// hostile user would: wrong side, many threads, dying backends, lying
// frames, statuses that cannot be known.
#include "forklift/process.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <set>
#include <thread>
#include <vector>

#include "backend.hpp"
#include "forklift/detail/fd.hpp"
#include "forklift/log.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::contains;

std::string errorOf(const std::function<void()>& fn) { return test::thrown(fn); }

long msSince(Clock::time_point t0) {
  return static_cast<long>(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count());
}

class Worker : public MessageProcess {
 public:
  explicit Worker(std::string name = "worker", ProcessOptions o = {}) : MessageProcess(std::move(name), std::move(o)) {
    command("square", &Worker::c__square, {"x"});
    command("later", &Worker::c__later, {"ms", "value"});
    command("sleep", &Worker::c__sleep, {"ms"});
    command("misuse", &Worker::c__misuse, {"method"});
    command("chatter", &Worker::c__chatter, {"n"});
    command("boom", &Worker::c__boom);
    command("segv", &Worker::c__segv);
    command("spawn_holder", &Worker::c__spawnHolder);
    command("throw_in_timer", &Worker::c__throwInTimer);
    command("misuse_in_timer", &Worker::c__misuseInTimer);
    command("blob", &Worker::c__blob, {"data"});
    command("received", &Worker::c__received);
    command("reject_later", &Worker::c__rejectLater);
  }
  bool misuseInPreRun = false;
  bool failPostRun = false;
  bool dieInPreRun = false;
  int sleepInPreRunMs = 0;

 private:
  void preRun__() override {
    if (misuseInPreRun) send("square", {{"x", 1}});
    if (dieInPreRun) ::raise(SIGKILL);
    if (sleepInPreRunMs) std::this_thread::sleep_for(std::chrono::milliseconds(sleepInPreRunMs));
  }
  void postRun__() override {
    if (failPostRun) throw std::runtime_error("postRun__ fails on purpose");
  }
  double c__square(double x) { return x * x; }
  void c__later(int ms, std::string value, Reply reply) {
    auto r = std::make_shared<Reply>(std::move(reply));
    after__(Timeout(ms), [r, value] { r->resolve(value); });
  }
  void c__sleep(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
  // Calls a frontend method on the backend side; returns what it threw.
  std::string c__misuse(std::string method) {
    return errorOf([&] {
      if (method == "send") send("square", {{"x", 1}});
      if (method == "call") call("square", {{"x", 1}}, test::slow(1s));
      if (method == "callAsync") callAsync("square", {{"x", 1}});
      if (method == "stop") stop(test::slow(1s));
      if (method == "requestStop") requestStop();
      if (method == "recv") recv(test::slow(1s));
      if (method == "start") start();
    });
  }
  void c__chatter(int n) {
    for (int i = 0; i < n; ++i) sendOut__(Message("chat", {{"i", i}}));
  }
  void c__boom() { throw std::runtime_error("boom on purpose"); }
  void c__segv() { ::raise(SIGSEGV); }
  // A helper process that holds the backend's channels open and dies with
  // the backend (its parent).
  std::int64_t c__spawnHolder() {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::sleep(30);
      ::_exit(0);
    }
    return pid;
  }
  void c__throwInTimer() {
    after__(1ms, [] { throw 42; });
  }
  void c__misuseInTimer() {
    after__(1ms, [this] { sendOut__(Message("misuse", {{"error", errorOf([this] { send("square"); })}})); });
  }
  void c__blob(Bytes data) { received_ += static_cast<std::int64_t>(data.size()); }
  std::int64_t c__received() { return received_; }
  void c__rejectLater(Reply reply) {
    auto r = std::make_shared<Reply>(std::move(reply));
    after__(1ms, [r] { r->reject("rejected later"); });
  }
  std::int64_t received_ = 0;
};

// ---------------------------------------------------------------- 1. wrong side

TEST(Lifecycle, FrontendMethodsOnTheBackendSideThrowAtOnce) {
  Worker p;
  p.start();
  for (const char* method : {"send", "call", "callAsync", "stop", "requestStop", "recv", "start"}) {
    const auto t0 = Clock::now();
    const std::string e = p.call("misuse", {{"method", method}}, test::slow(5s)).as<std::string>();
    EXPECT_LT(msSince(t0), test::slowMs(2000)) << method;
    EXPECT_TRUE(contains(e, std::string("Worker.worker: ") + method +
                                "() is a frontend method and was called on the backend side"))
        << e;
  }
  // From a timer of the backend, too.
  p.send("misuse_in_timer");
  auto m = p.recv(test::slow(5s));
  ASSERT_TRUE(m);
  EXPECT_TRUE(contains(m->get<std::string>("error"), "send() is a frontend method and was called on the backend side"));
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Lifecycle, FrontendMethodInPreRunFailsStartWithAClearError) {
  Worker p;
  p.misuseInPreRun = true;
  const int fds = test::openFdCount();
  EXPECT_TRUE(contains(errorOf([&] { p.start(); }), "send() is a frontend method and was called on the backend side"));
  EXPECT_FALSE(p.isAlive());
  EXPECT_EQ(test::openFdCount(), fds);  // a failed start leaves no descriptor
  EXPECT_FALSE(test::hasChildren());
}

TEST(Lifecycle, BackendMethodsOnTheFrontendSideThrow) {
  class Sneaky : public Worker {
   public:
    std::string tryIt() {
      return errorOf([this] { sendOut__(Message("x")); });
    }
  } p;
  p.start();
  EXPECT_EQ(p.tryIt(), "Sneaky.worker: sendOut__ is a backend method and was called on the frontend side");
  p.stop(test::slow(5s));
}

// ---------------------------------------------------------------- 2. threads

TEST(Lifecycle, CallsFromSeveralThreadsArePipelined) {
  Worker p;
  p.start();
  // Four deferred replies of `ms` each: one after the other they would
  // take 4 ms at least; pipelined, about `ms`. What tells them apart is
  // that bound, not a margin: the test's own pace sets it, and a slower
  // machine (test::slow) gets a longer pace, so the overhead stays small
  // beside it.
  const std::int64_t ms = test::slowMs(400);
  std::vector<std::string> got(4);
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      got[static_cast<std::size_t>(i)] =
          p.call("later", {{"ms", ms}, {"value", "v" + std::to_string(i)}}, test::slow(5s)).as<std::string>();
    });
  for (auto& t : threads) t.join();
  EXPECT_LT(msSince(t0), 3 * ms);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(got[static_cast<std::size_t>(i)], "v" + std::to_string(i));
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Lifecycle, ManyThreadsManyCallsEachGetTheirOwnReply) {
  Worker p;
  p.start();
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      for (int k = 0; k < 500; ++k) {
        const double x = i * 1000 + k;
        if (p.call("square", {{"x", x}}, test::slow(5s)).as<double>() != x * x) ++wrong;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Lifecycle, StopReturnsWithinItsBoundWhileCallsWaitAndTheCallsEndAtOnce) {
  Worker p;
  p.start();
  std::string callError;
  long callEndedAt = -1;
  const auto t0 = Clock::now();
  std::thread caller([&] {
    callError = test::thrown<ProcessDied>([&] { p.call("sleep", {{"ms", 20000}}, test::slow(20s)); });
    callEndedAt = msSince(t0);
  });
  std::this_thread::sleep_for(100ms);  // the call is in the handler now
  const ExitStatus s = p.stop(500ms);
  const long stopTook = msSince(t0) - 100;
  caller.join();
  EXPECT_LT(stopTook, 500 + test::slowMs(1500));  // 500 ms, then SIGTERM ends the sleeping handler
  EXPECT_EQ(s.how, ExitStatus::How::Signaled);
  EXPECT_EQ(s.escalation, 1);
  EXPECT_LT(callEndedAt, 2500);
  EXPECT_TRUE(contains(callError, "Worker.worker: the backend stopped during call 'sleep' (killed by SIGTERM"))
      << callError;
}

TEST(Lifecycle, RecvFromTwoThreadsLosesNothing) {
  Worker p;
  p.start();
  constexpr int kN = 20000;
  p.send("chatter", {{"n", kN}});
  std::mutex m;
  std::set<int> seen;
  std::atomic<int> errors{0};
  auto reader = [&] {
    for (;;) {
      try {
        auto msg = p.recv(500ms);
        if (!msg) return;
        std::lock_guard lock(m);
        if (!seen.insert(msg->get<int>("i")).second) ++errors;
      } catch (const std::exception&) {
        ++errors;
      }
    }
  };
  std::thread a(reader), b(reader);
  a.join();
  b.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(seen.size(), static_cast<std::size_t>(kN));
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

// ---------------------------------------------------------------- 3. asynchronous calls

TEST(Lifecycle, CallAsyncReturnsFuturesThatCarryValuesAndErrors) {
  Worker p;
  p.start();
  CallFuture a = p.callAsync("later", {{"ms", 100}, {"value", "a"}});
  CallFuture b = p.callAsync("square", {{"x", 7}});
  CallFuture bad = p.callAsync("nope");
  CallFuture slow = p.callAsync("later", {{"ms", 5000}, {"value", "late"}}, 200ms);
  EXPECT_FALSE(a.ready());
  EXPECT_EQ(b.get().as<double>(), 49.0);
  EXPECT_EQ(a.get().as<std::string>(), "a");
  EXPECT_EQ(test::thrown<RemoteError>([&] { bad.get(); }), "Worker.worker: unknown command 'nope'");
  EXPECT_FALSE(slow.wait(50ms));
  EXPECT_EQ(test::thrown<TimeoutError>([&] { slow.get(); }), "Worker.worker: call 'later' got no reply within 200 ms");
  EXPECT_TRUE(b.ready());
  EXPECT_EQ(b.get().as<double>(), 49.0);  // again: the same value
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Lifecycle, CallAsyncCallbackRunsOnTheThreadThatReadsTheReply) {
  Worker p;
  p.start();
  std::atomic<int> done{0};
  std::string error;
  p.callAsync("square", {{"x", 3}}, test::slow(5s), [&](CallResult r) {
    EXPECT_EQ(r.get().as<double>(), 9.0);
    ++done;
  });
  p.callAsync("boom", {}, test::slow(5s), [&](CallResult r) {
    error = r.what();
    ++done;
  });
  // A blocking call reads the replies before its own and runs the callbacks.
  EXPECT_EQ(p.call("square", {{"x", 2}}, test::slow(5s)).as<double>(), 4.0);
  EXPECT_EQ(done.load(), 2);
  EXPECT_EQ(error, "Worker.worker: c__boom threw: boom on purpose");
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Lifecycle, FuturesOfADeadBackendFailAtOnce) {
  Worker p;
  p.start();
  CallFuture f = p.callAsync("sleep", {{"ms", 20000}}, test::slow(20s));
  std::this_thread::sleep_for(50ms);
  p.signal(SIGKILL);
  const auto t0 = Clock::now();
  EXPECT_TRUE(contains(test::thrown<ProcessDied>([&] { f.get(); }),
                       "Worker.worker: the backend died during call 'sleep' (killed by SIGKILL"));
  EXPECT_LT(msSince(t0), test::slowMs(1500));
  EXPECT_TRUE(contains(errorOf([&] { p.call("square", {{"x", 1}}, test::slow(5s)); }), "the backend died before call 'square'"));
  p.stop(test::slow(1s));
}

// ---------------------------------------------------------------- 5. every wait watches death

TEST(Lifecycle, CallAndRecvSeeDeathAtOnceWhenAHelperHoldsTheChannel) {
  Worker p;
  p.start();
  const auto holder = p.call("spawn_holder", {}, test::slow(5s)).as<std::int64_t>();
  ASSERT_GT(holder, 0);
  std::thread killer([&] {
    std::this_thread::sleep_for(200ms);
    p.signal(SIGKILL);
  });
  const auto t0 = Clock::now();
  EXPECT_TRUE(contains(test::thrown<ProcessDied>([&] { p.call("sleep", {{"ms", 20000}}, test::slow(20s)); }),
                       "the backend died during call 'sleep'"));
  EXPECT_LT(msSince(t0), test::slowMs(2000));
  killer.join();
  const auto t1 = Clock::now();
  EXPECT_THROW(p.recv(test::slow(10s)), ProcessDied);
  EXPECT_LT(msSince(t1), test::slowMs(2000));
  EXPECT_EQ(p.stop(test::slow(1s)).signal, SIGKILL);
  // The holder dies with its parent.
  EXPECT_TRUE(test::eventually([&] { return ::kill(static_cast<pid_t>(holder), 0) != 0; }, 5s));
}

// ---------------------------------------------------------------- 6. statuses never invented

TEST(Lifecycle, TwoThreadsStoppingAtOnceGetTheRealStatus) {
  for (int round = 0; round < 5; ++round) {
    Worker p;
    p.failPostRun = true;
    p.start();
    ExitStatus a, b;
    std::thread t1([&] { a = p.stop(test::slow(5s)); });
    std::thread t2([&] { b = p.stop(test::slow(5s)); });
    t1.join();
    t2.join();
    EXPECT_EQ(a.how, ExitStatus::How::Exited);
    EXPECT_EQ(a.code, kExitPostRunFailed) << a.describe();
    EXPECT_EQ(b.code, kExitPostRunFailed) << b.describe();
    EXPECT_FALSE(a.ok());
    EXPECT_EQ(a.describe(), "exited with code 4 (postRun__ failed)");
  }
}

TEST(Lifecycle, AStatusTakenElsewhereIsUnknownNotOk) {
  struct sigaction old {};
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  ::sigaction(SIGCHLD, &ign, &old);  // the kernel reaps our children itself
  ExitStatus s;
  {
    Worker p;
    p.start();
    p.send("segv");
    s = p.stop(test::slow(5s));
  }
  ::sigaction(SIGCHLD, &old, nullptr);
  EXPECT_EQ(s.how, ExitStatus::How::Unknown) << s.describe();
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(contains(s.describe(), "unknown status"));
}

// ---------------------------------------------------------------- 7. errors of sent commands

TEST(Lifecycle, ErrorsOfSentCommandsReachTheFrontendInOrder) {
  Worker p;
  p.start();
  p.send("chatter", {{"n", 1}});
  p.send("nope");
  p.send("square", {{"x", "three"}});
  p.send("boom");
  p.send("chatter", {{"n", 1}});
  EXPECT_EQ(p.recv(test::slow(5s))->command(), "chat");
  try {
    p.recv(test::slow(5s));
    FAIL() << "no error";
  } catch (const CommandError& e) {
    EXPECT_EQ(e.command(), "nope");
    EXPECT_EQ(std::string(e.what()), "Worker.worker: unknown command 'nope'");
  }
  try {
    p.recv(test::slow(5s));
    FAIL() << "no error";
  } catch (const CommandError& e) {
    EXPECT_EQ(e.command(), "square");
    EXPECT_TRUE(contains(e.what(), "argument 'x': string found, double wanted"));
  }
  EXPECT_EQ(test::thrown<CommandError>([&] { p.recv(test::slow(5s)); }), "Worker.worker: c__boom threw: boom on purpose");
  EXPECT_EQ(p.recv(test::slow(5s))->command(), "chat");
  EXPECT_FALSE(p.recv(100ms));
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

// ---------------------------------------------------------------- more promises of process.hpp

TEST(Lifecycle, ABackendThatDiesWhileStartingIsProcessDied) {
  Worker p;
  p.dieInPreRun = true;
  EXPECT_TRUE(contains(test::thrown<ProcessDied>([&] { p.start(); }),
                       "Worker.worker: the backend died while starting (killed by SIGKILL)"));
  EXPECT_FALSE(test::hasChildren());
}

TEST(Lifecycle, ABackendNotReadyInTimeIsKilledAndReported) {
  ProcessOptions o;
  o.startTimeout = 200ms;
  Worker p("slow", o);
  p.sleepInPreRunMs = 20000;
  const auto t0 = Clock::now();
  EXPECT_TRUE(contains(test::thrown<TimeoutError>([&] { p.start(); }),
                       "Worker.slow: the backend was not ready within 200 ms (killed by SIGKILL"));
  EXPECT_LT(msSince(t0), 200 + test::slowMs(2800));
  EXPECT_FALSE(test::hasChildren());
}

TEST(Lifecycle, RecvDeliversTheLastMessagesThenSaysHowTheBackendEnded) {
  {
    Worker p;
    p.start();
    p.call("chatter", {{"n", 3}}, test::slow(5s));
    EXPECT_TRUE(p.stop(test::slow(5s)).ok());
    for (int i = 0; i < 3; ++i) EXPECT_EQ(p.recv(test::slow(1s))->get<int>("i"), i);
    const std::string e = test::thrown<PeerClosed>([&] { p.recv(test::slow(1s)); });
    EXPECT_TRUE(contains(e, "the backend has stopped (exited with code 0)")) << e;
  }
  {
    Worker p;
    p.start();
    p.call("chatter", {{"n", 2}}, test::slow(5s));
    p.signal(SIGKILL);
    for (int i = 0; i < 2; ++i) EXPECT_EQ(p.recv(test::slow(1s))->get<int>("i"), i);
    EXPECT_TRUE(contains(test::thrown<ProcessDied>([&] { p.recv(test::slow(1s)); }), "the backend died during recv (killed by SIGKILL"));
    p.stop(test::slow(1s));
  }
}

TEST(Lifecycle, ASendWaitingForSpaceSeesTheDeathAtOnce) {
  ProcessOptions o;
  o.sendTimeout = test::slow(20s);
  Worker p("full", o);
  p.start();
  ASSERT_GT(p.call("spawn_holder", {}, 5s).as<std::int64_t>(), 0);
  p.send("sleep", {{"ms", 20000}});  // the backend stops reading
  std::thread killer([&] {
    std::this_thread::sleep_for(300ms);
    p.signal(SIGKILL);
  });
  const auto t0 = Clock::now();
  const Bytes chunk(1u << 20, 1);
  const std::string e = test::thrown<ProcessDied>([&] {
    for (int i = 0; i < 64; ++i) p.send("blob", {{"data", Value(chunk)}});
  });
  killer.join();
  EXPECT_LT(msSince(t0), 300 + test::slowMs(2700));
  EXPECT_TRUE(contains(e, "the backend died during send 'blob'")) << e;
  p.stop(test::slow(1s));
}

TEST(Lifecycle, ADeferredRejectOfASentCommandReachesRecv) {
  Worker p;
  p.start();
  p.send("reject_later");
  EXPECT_EQ(test::thrown<CommandError>([&] { p.recv(test::slow(5s)); }), "rejected later");
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(Lifecycle, CommandNamesStartingWithTwoUnderscoresAreReserved) {
  class Greedy : public MessageProcess {
   public:
    Greedy() : MessageProcess("greedy") {}
    std::string tryIt() {
      return errorOf([this] { command("__ready", &Greedy::c__x); });
    }
    void c__x() {}
  } g;
  EXPECT_EQ(g.tryIt(), "greedy: command name '__ready' is reserved (names starting with __ are forklift's)");
}

TEST(Lifecycle, StopAllStopsEveryoneAgainstOneDeadline) {
  Worker a("a"), b("b"), c("c");
  for (Worker* w : {&a, &b, &c}) w->start();
  b.send("sleep", {{"ms", 20000}});  // busy: needs SIGTERM
  std::vector<MessageProcess*> all{&a, &b, &c};
  const auto t0 = Clock::now();
  MessageProcess::stopAll(all, 300ms);
  EXPECT_LT(msSince(t0), 300 + test::slowMs(1700));  // one deadline, not three
  EXPECT_TRUE(a.waitStop(Timeout::zero()).ok());
  EXPECT_EQ(b.waitStop(Timeout::zero()).signal, SIGTERM);
  EXPECT_TRUE(c.waitStop(Timeout::zero()).ok());
}

// ---------------------------------------------------------------- 8, 9. refused and lying frames

Value nested(int depth) {
  Value v = 1;
  for (int i = 0; i < depth; ++i) v = Value(List{std::move(v)});
  return v;
}

TEST(Lifecycle, TooDeepOrTooLargeArgumentsFailAtOnceNotAtTheTimeout) {
  Worker p;
  p.start();
  const auto t0 = Clock::now();
  // A long call timeout: the errors must come from the encoder, well before
  // it (building a million-element list is slow under the sanitizers).
  EXPECT_TRUE(contains(test::thrown<LimitError>([&] { p.call("square", {{"x", nested(40)}}, test::slow(60s)); }), "deeper"));
  List many(static_cast<std::size_t>(p.options().limits.maxElements) + 1, Value(0));
  EXPECT_TRUE(contains(test::thrown<LimitError>([&] { p.call("square", {{"x", Value(many)}}, test::slow(60s)); }), "elements"));
  EXPECT_LT(msSince(t0), test::slowMs(30000));
  EXPECT_EQ(p.call("square", {{"x", 3}}, test::slow(5s)).as<double>(), 9.0);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

std::string header(std::uint32_t len) {
  std::string h = {'F', 'K', 2, 0};
  for (int i = 0; i < 4; ++i) h += static_cast<char>((len >> (8 * i)) & 0xff);
  return h;
}

TEST(Lifecycle, ALyingFrameHeaderEndsTheBackendWithAClearStatus) {
  if (test::overSharedMemory())
    GTEST_SKIP() << "writes raw bytes into the command socket, which over shared memory carries only descriptors "
                    "(tests/shm_channel_test.cpp puts garbage into the queue)";
  Worker p;
  p.start();
  const std::string lie = header(0xFFFFFFFFu);
  ASSERT_EQ(::write(p.replyFd(), lie.data(), lie.size()), static_cast<ssize_t>(lie.size()));
  const auto t0 = Clock::now();
  EXPECT_TRUE(contains(test::thrown<ProcessDied>([&] { p.call("square", {{"x", 2}}, test::slow(5s)); }), "command stream"));
  EXPECT_LT(msSince(t0), test::slowMs(4000));
  EXPECT_TRUE(contains(test::thrown<CommandError>([&] { p.recv(test::slow(5s)); }), "the command stream is corrupt"));
  const ExitStatus s = p.stop(test::slow(5s));
  EXPECT_EQ(s.code, kExitCorruptStream) << s.describe();
  EXPECT_EQ(s.escalation, 0);
}

TEST(Lifecycle, ATruncatedFrameNeedsNoSigtermToStop) {
  if (test::overSharedMemory())
    GTEST_SKIP() << "writes raw bytes into the command socket, which over shared memory carries only descriptors "
                    "(tests/shm_channel_test.cpp puts garbage into the queue)";
  Worker p;
  p.start();
  const std::string cut = header(100) + std::string(50, 'x');
  ASSERT_EQ(::write(p.replyFd(), cut.data(), cut.size()), static_cast<ssize_t>(cut.size()));
  try {
    p.call("square", {{"x", 2}}, test::slow(1s));  // eaten by the cut frame: a clear error within the timeout
  } catch (const Error&) {
  }
  // The stop request is a bell, not a frame: the cut frame cannot swallow it.
  const auto t0 = Clock::now();
  const ExitStatus s = p.stop(test::slow(5s));
  EXPECT_LT(msSince(t0), test::slowMs(2000));
  EXPECT_EQ(s.escalation, 0) << s.describe();
  EXPECT_EQ(s.how, ExitStatus::How::Exited) << s.describe();
}

// ---------------------------------------------------------------- 10. a send that timed out

TEST(Lifecycle, ASendThatTimedOutDoesNotBreakTheObject) {
  ProcessOptions o;
  o.sendTimeout = 200ms;
  Worker p("worker", o);
  p.start();
  p.send("sleep", {{"ms", 1500}});
  const Bytes big(8u << 20, 7);
  EXPECT_THROW(p.send("blob", {{"data", Value(big)}}), TimeoutError);
  std::this_thread::sleep_for(1500ms);  // the backend is idle again
  EXPECT_EQ(p.call("square", {{"x", 3}}, test::slow(10s)).as<double>(), 9.0);
  EXPECT_EQ(p.call("received", {}, test::slow(5s)).as<std::int64_t>(), static_cast<std::int64_t>(big.size()));
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

// ---------------------------------------------------------------- 11. backends that start backends

class Leaf : public MessageProcess {
 public:
  Leaf() : MessageProcess("leaf") { command("square", &Leaf::c__square, {"x"}); }

 private:
  double c__square(double x) { return x * x; }
};

class Middle : public MessageProcess {
 public:
  Middle() : MessageProcess("middle") { command("leaf_square", &Middle::c__leafSquare, {"x"}); }

 private:
  void preRun__() override {
    leaf_ = std::make_unique<Leaf>();
    leaf_->start();
  }
  void postRun__() override { leaf_.reset(); }
  double c__leafSquare(double x) { return leaf_->call("square", {{"x", x}}, test::slow(5s)).as<double>(); }
  std::unique_ptr<Leaf> leaf_;
};

TEST(Lifecycle, AThreeLevelHierarchyAfterTenSiblings) {
  std::vector<std::unique_ptr<Worker>> siblings;
  for (int i = 0; i < 10; ++i) {
    siblings.push_back(std::make_unique<Worker>("sibling-" + std::to_string(i)));
    siblings.back()->start();
  }
  const int fdsBefore = test::openFdCount();
  {
    Middle m;
    m.start();
    EXPECT_EQ(m.call("leaf_square", {{"x", 6}}, test::slow(10s)).as<double>(), 36.0);
    EXPECT_TRUE(m.stop(test::slow(5s)).ok());
  }
  EXPECT_EQ(test::openFdCount(), fdsBefore);
  for (auto& s : siblings) EXPECT_EQ(s->call("square", {{"x", 2}}, test::slow(5s)).as<double>(), 4.0);
  for (auto& s : siblings) EXPECT_TRUE(s->stop(test::slow(5s)).ok());
}

// ---------------------------------------------------------------- 12. any exception type

TEST(Lifecycle, AnyExceptionFromABackendTimerIsLoggedAndTheLoopGoesOn) {
  Worker p;
  p.start();
  p.send("throw_in_timer");
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(p.call("square", {{"x", 5}}, test::slow(5s)).as<double>(), 25.0);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

// ---------------------------------------------------------------- 13. an unusable log file

TEST(Lifecycle, AnUnusableLogFileFailsStartWithAClearError) {
  // A regular file as the parent directory: not even root can create it.
  const std::string parent = "/tmp/forklift-not-a-dir-" + std::to_string(::getpid());
  { std::ofstream(parent) << "x"; }
  ProcessOptions o;
  o.logFile = parent + "/backend.log";
  Worker p("logs", o);
  const std::string e = test::thrown<Error>([&] { p.start(); });
  ::unlink(parent.c_str());
  EXPECT_TRUE(contains(e, "cannot open log file '" + o.logFile + "'")) << e;
  EXPECT_FALSE(p.isAlive());
  EXPECT_FALSE(test::hasChildren());
}

// ---------------------------------------------------------------- 14. in-process without stop()

// Where stderr goes while a Collector lives. MessageProcess's destructor
// says in an error line that it runs no more user code; the blocking
// handler below waits for that line (not for a time), so the queued
// commands are still queued when the destruction has reached
// MessageProcess, however slow the machine.
std::atomic<const test::CaptureStderr*> gCollectorStderr{nullptr};
// Set once the blocking handler runs: the test destroys the object only
// then, so no handler can begin while the subclass is being destroyed.
std::atomic<bool> gCollectorBlocking{false};
constexpr char kNoMoreUserCode[] = "destroyed while its in-process backend runs";

bool baseDestructorStarted() {
  const test::CaptureStderr* err = gCollectorStderr.load();
  return err && err->text().find(kNoMoreUserCode) != std::string::npos;
}

class Collector : public MessageProcess {
 public:
  explicit Collector(ProcessOptions o) : MessageProcess("collector", std::move(o)) {
    command("add", &Collector::c__add, {"x"});
    command("count", &Collector::c__count);
    command("later", &Collector::c__later);
    command("block", &Collector::c__block, {"ms"});
  }
  // No stop() in a destructor of its own: the base class's is left to do it.

 private:
  void c__add(int x) { items_.push_back(std::to_string(x)); }
  std::int64_t c__count() { return static_cast<std::int64_t>(items_.size()); }
  void c__later() {
    after__(300ms, [this] { items_.push_back("timer"); });
  }
  // Busy without touching the object until the destructor of the base
  // class has said "no more user code" (at most 5 s), then `ms` more.
  void c__block(int ms) {
    gCollectorBlocking = true;
    const auto end = Clock::now() + test::slow(5s);
    while (!baseDestructorStarted() && Clock::now() < end) std::this_thread::sleep_for(1ms);
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  }
  void postRun__() override { items_.push_back("postRun"); }
  std::vector<std::string> items_;
};

// Once the object's destruction reaches MessageProcess, the backend runs no
// more of the subclass's code: no queued command, no timer, no postRun__.
// (A handler already running while the subclass's own destructor runs is
// the user's race: see process.hpp.)
TEST(Lifecycle, InProcessModeWithoutStopInTheSubclassRunsNoMoreUserCode) {
  for (int round = 0; round < 5; ++round) {
    ProcessOptions o;
    o.inProcess = true;
    const test::TempDir dir;
    const test::CaptureStderr err(dir);
    gCollectorStderr = &err;
    gCollectorBlocking = false;
    auto c = std::make_unique<Collector>(o);
    c->start();
    c->send("later");
    EXPECT_EQ(c->call("count", {}, test::slow(5s)).as<std::int64_t>(), 0);
    // Blocks until the destruction has reached MessageProcess, so the 100
    // sends below are queued behind it. Had it begun after the destruction
    // or ended before MessageProcess's part of it, a handler would race the
    // subclass's destructor (the user's race, which this test does not mean
    // to try).
    c->send("block", {{"ms", 20}});
    for (int i = 0; i < 100; ++i) c->send("add", {{"x", i}});
    const auto blockBy = Clock::now() + test::slow(5s);
    while (!gCollectorBlocking && Clock::now() < blockBy) std::this_thread::sleep_for(1ms);
    ASSERT_TRUE(gCollectorBlocking);
    const auto t0 = Clock::now();
    c.reset();  // ASan, TSan, UBSan: nothing touches the destroyed subclass
    EXPECT_LT(msSince(t0), test::slowMs(3000));
    gCollectorStderr = nullptr;
    EXPECT_TRUE(contains(err.text(), kNoMoreUserCode));
  }
}

// The backend's own guard, with no race to win: once the object is gone,
// what arrives is read to the end of the channel, in order, and no handler
// runs for it. (The test above shows the guard in place; this one would
// fail without it.)
TEST(Lifecycle, ABackendWhoseObjectIsGoneRunsNoHandler) {
  for (const bool gone : {false, true}) {
    auto [frontCmd, backCmd] = Channel::makePair();
    auto [backOut, frontOut] = Channel::makePair();
    std::atomic<bool> userGone{gone};
    int runs = 0;
    detail::BackendConfig config;
    config.who = "Test.gone";
    config.commands.emplace("add", [&runs](const Message&, Reply&) {
      ++runs;
      return Value();
    });
    config.makeLog = [] { return makeLogger("Test.gone"); };
    config.userGone = &userGone;
    const detail::UniqueFd stopBell(::eventfd(0, EFD_CLOEXEC));  // never rung here
    config.stopBell = stopBell.get();
    for (int i = 0; i < 3; ++i) frontCmd.send(Message("add"));
    frontCmd.close();  // the backend's loop ends after what was sent
    auto backend = std::make_shared<detail::Backend>(std::move(config), std::move(backCmd), std::move(backOut));
    backend->run();
    EXPECT_EQ(runs, gone ? 0 : 3) << (gone ? "object gone" : "object there");
  }
}

// ---------------------------------------------------------------- 15. logs

TEST(Lifecycle, TheLifecycleIsLoggedAtDebugLevelUnderTheFullName) {
  const test::TempDir dir;
  std::string log;
  pid_t pid = 0;
  {
    const test::CaptureStderr err(dir);
    formatLogger(spdlog::level::debug);
    {
      Worker p("logged");
      p.start();
      pid = p.pid();
      p.stop(test::slow(5s));
    }
    formatLogger(spdlog::level::info);
    log = err.text();
  }
  EXPECT_TRUE(contains(log, "[Worker.logged]"));
  EXPECT_TRUE(contains(log, "started, pid " + std::to_string(pid)));
  EXPECT_TRUE(contains(log, "ready"));
  EXPECT_TRUE(contains(log, "stop requested"));
  EXPECT_TRUE(contains(log, "ended: exited with code 0"));
}

}  // namespace
}  // namespace forklift
