#include "forklift/manager.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <thread>

#include "forklift/shm_array.hpp"
#include "forklift/sync.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

class Blaster : public MessageProcess {
 public:
  explicit Blaster(std::string name) : MessageProcess(std::move(name)) {
    command("blast", &Blaster::c__blast, {"n"});
    command("spin", &Blaster::c__spin);
    command("tick", &Blaster::c__tick, {"period_ms"});
    command("blast_and_die", &Blaster::c__blastAndDie, {"n", "bytes"});
    command("job", &Blaster::c__job, {"n"});
    command("square_later", &Blaster::c__squareLater, {"x", "ms"});
  }

 private:
  void c__blast(int n) {
    for (int i = 0; i < n; ++i) sendOut__(Message("seq", {{"i", i}}));
    sendOut__(Message("done"));
  }
  // Sends n messages and dies at once; the test sends few enough that all
  // of them fit in the socket buffer (nothing left in the backend queue).
  void c__blastAndDie(int n, int bytes) {
    for (int i = 0; i < n; ++i)
      sendOut__(Message("seq", {{"i", i}, {"pad", std::string(static_cast<std::size_t>(bytes), 'x')}}));
    ::kill(::getpid(), SIGKILL);
  }
  void c__spin() {
    for (;;) ::pause();
  }
  // A job: odd numbers fail.
  void c__job(int n) {
    if (n % 2) throw std::runtime_error("job " + std::to_string(n) + " is odd");
    sendOut__(Message("result", {{"n", n}}));
  }
  void c__squareLater(double x, int ms, Reply reply) {
    auto r = std::make_shared<Reply>(std::move(reply));
    after__(Timeout(ms), [r, x] { r->resolve(x * x); });
  }
  void c__tick(int periodMs) {
    every__(Timeout(periodMs), [this] { sendOut__(Message("tick")); });
  }
};

TEST(Manager, SixtyFourWorkersThousandMessagesEachAllArriveInOrder) {
  constexpr int kWorkers = 64, kMessages = 1000;
  Manager m;
  std::map<const MessageProcess*, int> next;
  int done = 0;
  bool disorder = false;
  for (int i = 0; i < kWorkers; ++i) m.emplace<Blaster>("w" + std::to_string(i));
  m.onMessage([&](MessageProcess& w, Message& msg) {
    if (msg.command() == "seq") {
      if (msg.get<int>("i") != next[&w]) disorder = true;
      ++next[&w];
    } else if (msg.command() == "done" && ++done == kWorkers) {
      m.requestStop();
    }
  });
  m.after(0ms, [&] {
    for (std::size_t i = 0; i < m.size(); ++i) m.worker(i).send("blast", {{"n", kMessages}});
  });
  m.after(test::slow(60s), [&] { m.requestStop(); });  // a bound, not a pass
  EXPECT_EQ(m.run(), 0);
  EXPECT_EQ(done, kWorkers);
  EXPECT_FALSE(disorder);
  ASSERT_EQ(next.size(), static_cast<std::size_t>(kWorkers));
  for (const auto& [w, n] : next) EXPECT_EQ(n, kMessages) << w->name();
  EXPECT_FALSE(test::hasChildren());
}

TEST(Manager, KilledWorkerIsReportedAtOnceAndTheOthersGoOn) {
  Manager m;
  auto& victim = m.emplace<Blaster>("victim");
  m.emplace<Blaster>("survivor-1");
  m.emplace<Blaster>("survivor-2");
  Clock::time_point killedAt, reportedAt;
  ExitStatus reported;
  std::map<std::string, int> ticksAfterDeath;
  m.onExit([&](MessageProcess& w, const ExitStatus& s) {
    if (&w == &victim) {
      reportedAt = Clock::now();
      reported = s;
      m.after(test::slow(200ms), [&] { m.requestStop(); });  // long enough for 6 of the survivors' 10 ms ticks
    }
  });
  m.onMessage([&](MessageProcess& w, Message&) {
    if (reportedAt != Clock::time_point{}) ++ticksAfterDeath[w.name()];
  });
  m.after(0ms, [&] {
    for (std::size_t i = 0; i < m.size(); ++i) m.worker(i).send("tick", {{"period_ms", 10}});
  });
  m.after(100ms, [&] {
    killedAt = Clock::now();
    ::kill(victim.pid(), SIGKILL);
  });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);  // the survivors stopped cleanly
  EXPECT_EQ(reported.how, ExitStatus::How::Signaled);
  EXPECT_EQ(reported.signal, SIGKILL);
  EXPECT_LT(reportedAt - killedAt, test::slow(100ms));
  EXPECT_GT(ticksAfterDeath["survivor-1"], 5);
  EXPECT_GT(ticksAfterDeath["survivor-2"], 5);
  EXPECT_EQ(ticksAfterDeath.count("victim"), 0u);
}

// Everything a worker sent before it died reaches onMessage, in order, and
// before onExit; more than one greedy read's worth is in the socket.
TEST(Manager, MessagesSentBeforeDeathAllArriveBeforeTheExit) {
  constexpr int kMessages = 30;
  Manager m;
  auto& w = m.emplace<Blaster>("dying");
  int next = 0;
  bool disorder = false;
  int seenAtExit = -1;
  m.onMessage([&](MessageProcess&, Message& msg) {
    if (msg.get<int>("i") != next) disorder = true;
    ++next;
  });
  m.onExit([&](MessageProcess&, const ExitStatus&) {
    seenAtExit = next;
    m.requestStop();
  });
  m.after(0ms, [&] {
    w.send("blast_and_die", {{"n", kMessages}, {"bytes", 4000}});
    // Keep the loop busy until the worker is dead: its messages and its
    // death are then ready at the same wake-up.
    std::this_thread::sleep_for(300ms);
  });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_FALSE(disorder);
  EXPECT_EQ(seenAtExit, kMessages);
}

TEST(Manager, UserDescriptorsAndTimersInterleaveWithWorkerMessages) {
  Manager m;
  auto& w = m.emplace<Blaster>("ticker");
  Event userEvent;
  std::string seen;  // one letter per event: w(orker), f(d), t(imer)
  // Until each kind came 21 times (about 150 ms here), not for a fixed
  // time: a slower machine takes longer, not fewer turns.
  const auto count = [&](char c) { return std::count(seen.begin(), seen.end(), c); };
  m.onMessage([&](MessageProcess&, Message&) { seen += 'w'; });
  m.watch(userEvent.fd(), [&](int) {
    userEvent.clear();
    seen += 'f';
  });
  m.every(7ms, [&] {
    seen += 't';
    userEvent.set();
    if (count('w') > 20 && count('f') > 20 && count('t') > 20) m.requestStop();
  });
  m.after(0ms, [&] { w.send("tick", {{"period_ms", 5}}); });
  m.after(test::slow(5s), [&] { m.requestStop(); });  // the bound, if a kind stopped coming
  EXPECT_EQ(m.run(), 0);
  // All three kinds, and they take turns rather than coming in blocks.
  EXPECT_GT(std::count(seen.begin(), seen.end(), 'w'), 20) << seen;
  EXPECT_GT(std::count(seen.begin(), seen.end(), 'f'), 20) << seen;
  EXPECT_GT(std::count(seen.begin(), seen.end(), 't'), 20) << seen;
  const std::string firstHalf = seen.substr(0, seen.size() / 2);
  EXPECT_NE(firstHalf.find('w'), std::string::npos);
  EXPECT_NE(firstHalf.find('f'), std::string::npos);
  EXPECT_NE(firstHalf.find('t'), std::string::npos);
}

TEST(Manager, SigintShutsDownInOrder) {
  Manager m;
  for (int i = 0; i < 4; ++i) m.emplace<Blaster>("w" + std::to_string(i));
  std::vector<ExitStatus> exits;
  m.onExit([&](MessageProcess&, const ExitStatus& s) { exits.push_back(s); });
  m.runAsThread();
  ASSERT_TRUE(test::eventually([&] { return m.running(); }, 5s));
  for (std::size_t i = 0; i < m.size(); ++i) EXPECT_TRUE(m.worker(i).isAlive());
  const auto t0 = Clock::now();
  ::kill(::getpid(), SIGINT);
  ASSERT_TRUE(test::eventually([&] { return !m.running(); }, 5s));
  EXPECT_EQ(m.stopThread(), 0);
  EXPECT_LT(Clock::now() - t0, test::slow(2s));
  ASSERT_EQ(exits.size(), 4u);
  for (const auto& s : exits) EXPECT_TRUE(s.ok()) << s.describe();
  EXPECT_FALSE(test::hasChildren());
}

TEST(Manager, ShutdownEscalatesOnAStuckWorker) {
  Manager::Options o;
  o.stopTimeout = 200ms;
  Manager m(o);
  auto& stuck = m.emplace<Blaster>("stuck");
  m.emplace<Blaster>("fine");
  std::map<std::string, ExitStatus> exits;
  m.onExit([&](MessageProcess& w, const ExitStatus& s) { exits[w.name()] = s; });
  m.after(0ms, [&] {
    stuck.send("spin");
    m.after(50ms, [&] { m.requestStop(); });
  });
  const auto t0 = Clock::now();
  EXPECT_EQ(m.run(), 1);
  EXPECT_LT(Clock::now() - t0, 250ms + test::slow(2750ms));  // 50 ms, the 200 ms stop timeout, SIGTERM
  EXPECT_EQ(exits["stuck"].signal, SIGTERM);
  EXPECT_EQ(exits["stuck"].escalation, 1);
  EXPECT_TRUE(exits["fine"].ok());
}

// The MainContext way: subclass, workers in the constructor, threads after
// the processes.
class Context : public Manager {
 public:
  Context() {
    for (int i = 0; i < 3; ++i) workers.push_back(&emplace<Blaster>("ctx" + std::to_string(i)));
  }
  std::vector<Blaster*> workers;
  bool startedBeforeThreads = false;
  bool closedAfterWorkers = false;
  int messages = 0;

 protected:
  void startThreads() override {
    startedBeforeThreads = true;
    for (auto* w : workers) startedBeforeThreads = startedBeforeThreads && w->isAlive();
    for (auto* w : workers) w->send("blast", {{"n", 10}});
  }
  void handleMessage(MessageProcess&, Message& m) override {
    if (m.command() == "seq" && ++messages == 30) requestStop();
  }
  void close() override {
    closedAfterWorkers = true;
    for (auto* w : workers) closedAfterWorkers = closedAfterWorkers && !w->isAlive();
  }
};

TEST(Manager, SubclassedLikeMainContext) {
  Context c;
  c.after(test::slow(10s), [&] { c.requestStop(); });
  EXPECT_EQ(c.run(), 0);
  EXPECT_TRUE(c.startedBeforeThreads);
  EXPECT_TRUE(c.closedAfterWorkers);
  EXPECT_EQ(c.messages, 30);
}

// Nothing fails silently: four jobs, two of them fail.
TEST(Manager, ErrorsOfSentCommandsAreReportedNotLost) {
  Manager m;
  auto& w = m.emplace<Blaster>("jobs");
  std::vector<int> results;
  std::vector<std::string> errors;
  m.onMessage([&](MessageProcess&, Message& msg) {
    if (msg.command() == "result") results.push_back(msg.get<int>("n"));
    if (results.size() + errors.size() == 4) m.requestStop();
  });
  m.onError([&](MessageProcess& worker, const std::string& command, const std::string& what) {
    EXPECT_EQ(&worker, &w);
    EXPECT_EQ(command, "job");
    errors.push_back(what);
    if (results.size() + errors.size() == 4) m.requestStop();
  });
  m.after(0ms, [&] {
    for (int n = 1; n <= 4; ++n) w.send("job", {{"n", n}});
  });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_EQ(results, (std::vector<int>{2, 4}));
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_EQ(errors[0], "Blaster.jobs: c__job threw: job 1 is odd");
  EXPECT_EQ(errors[1], "Blaster.jobs: c__job threw: job 3 is odd");
}

TEST(Manager, AnUnhandledCommandErrorMakesRunReturnOne) {
  Manager m;
  auto& w = m.emplace<Blaster>("jobs");
  int results = 0;
  m.onMessage([&](MessageProcess&, Message&) {
    if (++results == 1) m.after(50ms, [&] { m.requestStop(); });
  });
  m.after(0ms, [&] {
    w.send("job", {{"n", 1}});
    w.send("job", {{"n", 2}});
  });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 1);
  EXPECT_EQ(results, 1);
}

// The loop calls its workers without blocking: callbacks run on the loop.
TEST(Manager, CallAsyncCallbacksRunOnTheLoop) {
  Manager m;
  auto& a = m.emplace<Blaster>("a");
  auto& b = m.emplace<Blaster>("b");
  std::thread::id loopThread;
  std::vector<std::string> order;
  bool allOnLoop = true;
  m.after(0ms, [&] {
    loopThread = std::this_thread::get_id();
    const auto t0 = Clock::now();
    a.callAsync("square_later", {{"x", 3}, {"ms", 200}}, test::slow(5s), [&](CallResult r) {
      allOnLoop = allOnLoop && std::this_thread::get_id() == loopThread;
      order.push_back("a=" + std::to_string(static_cast<int>(r.get().as<double>())));
    });
    b.callAsync("square_later", {{"x", 4}, {"ms", 50}}, test::slow(5s), [&](CallResult r) {
      allOnLoop = allOnLoop && std::this_thread::get_id() == loopThread;
      order.push_back("b=" + std::to_string(static_cast<int>(r.get().as<double>())));
    });
    b.callAsync("square_later", {{"x", 5}, {"ms", 5000}}, 300ms, [&](CallResult r) {
      allOnLoop = allOnLoop && std::this_thread::get_id() == loopThread;
      order.push_back(r.ok() ? "late ok" : "late: " + r.what());
      m.requestStop();
    });
    EXPECT_LT(Clock::now() - t0, test::slow(50ms));  // nothing above blocked the loop
  });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_TRUE(allOnLoop);
  EXPECT_EQ(order, (std::vector<std::string>{"b=16", "a=9", "late: Blaster.b: call 'square_later' got no reply within 300 ms"}));
}

TEST(Manager, AnyExceptionFromACallbackIsLoggedAndTheLoopGoesOn) {
  Manager m;
  m.emplace<Blaster>("w");
  int ticks = 0;
  m.after(1ms, [] { throw 42; });
  m.after(2ms, [] { throw std::runtime_error("a standard one"); });
  m.every(5ms, [&] {
    if (++ticks == 5) m.requestStop();
  });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_EQ(ticks, 5);
}

TEST(Manager, AMessageHandlerThatThrowsAnythingDoesNotStopTheLoop) {
  Manager m;
  auto& w = m.emplace<Blaster>("w");
  int seen = 0;
  m.onMessage([&](MessageProcess&, Message& msg) {
    ++seen;
    if (msg.command() == "done") {
      m.requestStop();
      return;
    }
    throw 42;
  });
  m.after(0ms, [&] { w.send("blast", {{"n", 10}}); });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_EQ(seen, 11);
}

TEST(Manager, PostRunsWorkOnTheLoopFromAnyThread) {
  Manager m;
  m.emplace<Blaster>("w");
  m.runAsThread();
  std::atomic<int> ran{0};
  std::atomic<bool> onOtherThread{false};
  const auto caller = std::this_thread::get_id();
  for (int i = 0; i < 100; ++i)
    m.post([&] {
      onOtherThread = std::this_thread::get_id() != caller;
      ++ran;
    });
  EXPECT_TRUE(test::eventually([&] { return ran.load() == 100; }, 5s));
  EXPECT_TRUE(onOtherThread.load());
  EXPECT_EQ(m.stopThread(), 0);
}

// Many threads post at once while the loop runs: every item runs exactly
// once, and the items of one thread in the order it posted them.
TEST(Manager, PostFromManyThreadsRunsEachItemOnceInOrderPerThread) {
  constexpr int kThreads = 8, kItems = 5000;
  Manager m;
  m.emplace<Blaster>("w");
  std::vector<std::vector<int>> seen(kThreads);  // touched on the loop thread only
  m.runAsThread();
  std::vector<std::thread> posters;
  for (int t = 0; t < kThreads; ++t)
    posters.emplace_back([&, t] {
      for (int i = 0; i < kItems; ++i) m.post([&, t, i] { seen[static_cast<std::size_t>(t)].push_back(i); });
    });
  for (auto& th : posters) th.join();
  std::atomic<bool> last{false};
  m.post([&] { last = true; });  // after every item above, by the order rule
  ASSERT_TRUE(test::eventually([&] { return last.load(); }, 10s));
  EXPECT_EQ(m.stopThread(), 0);
  for (int t = 0; t < kThreads; ++t) {
    const auto& v = seen[static_cast<std::size_t>(t)];
    ASSERT_EQ(v.size(), static_cast<std::size_t>(kItems)) << "thread " << t;
    bool inOrder = true;
    for (int i = 0; i < kItems; ++i) inOrder = inOrder && v[static_cast<std::size_t>(i)] == i;
    EXPECT_TRUE(inOrder) << "thread " << t;
  }
}

// Restarting and replacing workers while running gives back every
// descriptor: the count returns to its value before the first restart.
TEST(Manager, RestartAndReplaceWhileRunningReleaseEveryDescriptor) {
  Manager m;
  auto& a = m.emplace<Blaster>("a");
  m.emplace<Blaster>("b");
  int fdsBefore = -1;
  int restarts = 0;
  std::vector<ExitStatus> exits;
  std::vector<pid_t> pids;
  m.onExit([&](MessageProcess&, const ExitStatus& s) { exits.push_back(s); });
  m.after(0ms, [&] {
    fdsBefore = test::openFdCount();
    for (int i = 0; i < 5; ++i) {
      m.restart(a);
      pids.push_back(a.pid());
      ++restarts;
    }
    for (int i = 0; i < 5; ++i) {
      auto& fresh = m.replace(m.worker(1), std::make_unique<Blaster>("b" + std::to_string(i)));
      pids.push_back(fresh.pid());
      EXPECT_TRUE(fresh.isAlive());
      EXPECT_EQ(&m.worker(1), &fresh);  // the same place
    }
    m.after(0ms, [&] {  // the closed handles are freed on the loop's next turn
      EXPECT_EQ(test::openFdCount(), fdsBefore);
      EXPECT_EQ(m.worker<Blaster>(0).call("square_later", {{"x", 3}, {"ms", 1}}).as<double>(), 9.0);
      m.requestStop();
    });
  });
  m.after(test::slow(30s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_EQ(restarts, 5);
  ASSERT_EQ(exits.size(), 12u);  // 10 while running, 2 at the end
  for (const auto& s : exits) EXPECT_TRUE(s.ok()) << s.describe();
  std::sort(pids.begin(), pids.end());
  EXPECT_EQ(std::unique(pids.begin(), pids.end()), pids.end());  // each a new process
  EXPECT_EQ(m.size(), 2u);
  EXPECT_FALSE(test::hasChildren());
}

// A worker removes itself from its own message handler and restarts itself
// from its exit handler: both wait until the handler returned.
TEST(Manager, RemoveAndRestartFromTheWorkersOwnHandlers) {
  Manager m;
  auto& quitter = m.emplace<Blaster>("quitter");
  auto& phoenix = m.emplace<Blaster>("phoenix");
  int messagesAfterRemove = 0;
  bool removed = false;
  int phoenixDeaths = 0;
  pid_t firstPid = phoenix.pid(), secondPid = 0;
  m.onMessage([&](MessageProcess& w, Message& msg) {
    if (&w != &quitter) return;
    if (removed) ++messagesAfterRemove;  // the rest of this read: still ours
    if (msg.command() == "seq" && msg.get<int>("i") == 0) {
      m.remove(w);
      removed = true;
      EXPECT_EQ(m.size(), 2u);  // not yet
    }
  });
  m.onExit([&](MessageProcess& w, const ExitStatus& s) {
    if (&w != &phoenix) return;
    if (++phoenixDeaths == 1) {
      EXPECT_EQ(s.signal, SIGKILL);
      m.restart(w);
      m.after(100ms, [&] {
        secondPid = phoenix.pid();
        EXPECT_TRUE(phoenix.isAlive());
        m.requestStop();
      });
    }
  });
  m.after(0ms, [&] {
    firstPid = phoenix.pid();
    quitter.send("blast", {{"n", 3}});
    ::kill(phoenix.pid(), SIGKILL);
  });
  m.after(test::slow(20s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_TRUE(removed);
  EXPECT_EQ(m.size(), 1u);
  EXPECT_EQ(&m.worker(0), &phoenix);
  EXPECT_NE(secondPid, 0);
  EXPECT_NE(secondPid, firstPid);
  EXPECT_EQ(phoenixDeaths, 2);  // the kill, then the end
  EXPECT_FALSE(test::hasChildren());
}

struct Counter {
  int messages = 0;
};

TEST(Manager, TypedWorkersAndPerWorkerDataWithoutCasts) {
  Manager m;
  m.emplace<Blaster>("a");
  m.emplace<Blaster>("b");
  m.onMessage([&](MessageProcess& w, Message& msg) {
    ++m.data<Counter>(w).messages;
    if (msg.command() == "done" && m.data<Counter>(m.worker(0)).messages == 3 &&
        m.data<Counter>(m.worker(1)).messages == 5)
      m.requestStop();
  });
  m.after(0ms, [&] {
    m.worker<Blaster>(0).send("blast", {{"n", 2}});
    m.as<Blaster>(m.worker(1)).send("blast", {{"n", 4}});
  });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_EQ(m.data<Counter>(m.worker(0)).messages, 3);
  EXPECT_EQ(m.data<Counter>(m.worker(1)).messages, 5);
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { m.data<int>(m.worker(0)); }),
                             "the data of Blaster.a is a forklift::(anonymous namespace)::Counter, not a int"));
  EXPECT_TRUE(test::contains(test::thrown<Error>([&] { m.worker<Manager>(0); }), "is not a forklift::Manager"));
  Blaster stranger("stranger");
  EXPECT_EQ(test::thrown<Error>([&] { m.remove(stranger); }),
            "Manager::remove: stranger is not a worker of this manager");
}

TEST(Manager, RunUntilDrivesTheLoopFromTheCaller) {
  Manager::Options o;
  o.handleSignals = false;
  Manager m(o);
  auto& w = m.emplace<Blaster>("w");
  int messages = 0;
  m.onMessage([&](MessageProcess&, Message&) { ++messages; });
  EXPECT_TRUE(m.runUntil([] { return true; }, 0ms));  // starts the workers
  EXPECT_TRUE(w.isAlive());
  w.send("blast", {{"n", 9}});
  EXPECT_TRUE(m.runUntil([&] { return messages == 10; }, test::slow(10s)));
  const auto t0 = Clock::now();
  EXPECT_FALSE(m.runUntil([] { return false; }, 50ms));
  EXPECT_GE(Clock::now() - t0, 50ms);
  m.after(0ms, [&] {
    EXPECT_TRUE(test::contains(test::thrown<Error>([&] { m.runUntil([] { return true; }, 0ms); }),
                               "loops do not nest"));
  });
  EXPECT_FALSE(m.runUntil([] { return false; }, 20ms));
  EXPECT_EQ(m.finish(), 0);
  EXPECT_FALSE(w.isAlive());
  EXPECT_FALSE(test::hasChildren());
}

// A zero timeout is one turn that does not wait (UV_RUN_NOWAIT): an owner
// with a loop of its own polls the manager so, and what is ready is handled.
TEST(Manager, RunUntilWithAZeroTimeoutRunsOneTurnWithoutWaiting) {
  Manager::Options o;
  o.handleSignals = false;
  Manager m(o);
  auto& w = m.emplace<Blaster>("w");
  int messages = 0;
  m.onMessage([&](MessageProcess&, Message&) { ++messages; });
  EXPECT_TRUE(m.runUntil([] { return true; }, 0ms));  // starts the workers
  // Nothing is ready: the turn does not wait.
  const auto t0 = Clock::now();
  EXPECT_FALSE(m.runUntil([] { return false; }, 0ms));
  EXPECT_LT(Clock::now() - t0, test::slow(1s));
  // A timer due now and posted work each run in one turn.
  bool timer = false, posted = false;
  m.after(0ms, [&] { timer = true; });
  m.post([&] { posted = true; });
  EXPECT_FALSE(m.runUntil([] { return false; }, 0ms));
  EXPECT_TRUE(timer);
  EXPECT_TRUE(posted);
  // Messages and a call's callback arrive through polls alone.
  w.send("blast", {{"n", 9}});
  double square = 0;
  w.callAsync("square_later", {{"x", 3.0}, {"ms", 1}}, test::slow(5s), [&](CallResult r) { square = r.get().as<double>(); });
  EXPECT_TRUE(test::eventually([&] { return m.runUntil([&] { return messages == 10 && square == 9.0; }, 0ms); }, 10s));
  EXPECT_EQ(messages, 10);
  EXPECT_EQ(square, 9.0);
  // A death too: the exit handler runs inside a poll.
  bool exited = false;
  m.onExit([&](MessageProcess&, const ExitStatus& s) { exited = s.how == ExitStatus::How::Signaled; });
  ::kill(w.pid(), SIGKILL);
  EXPECT_TRUE(test::eventually([&] { return m.runUntil([&] { return exited; }, 0ms); }, 10s));
  EXPECT_EQ(m.finish(), 0);
  EXPECT_FALSE(test::hasChildren());
}

// A worker that owns a shared-memory segment: replacing it removes the
// segment with the object.
class Owner : public MessageProcess {
 public:
  explicit Owner(std::string name)
      : MessageProcess(name), array_(ShmArray<double>::create(ShmName(name), 4, 4)) {}
  ~Owner() override { stop(); }

 private:
  ShmArray<double> array_;
};

TEST(Manager, AReplacedWorkersSegmentsGoWithIt) {
  Manager m;
  m.emplace<Owner>("owner-0");
  const std::string mine = "fk." + std::to_string(::getpid()) + ".";
  auto countMine = [&] {
    int n = 0;
    for (const auto& s : test::forkliftSegments()) n += s.rfind(mine, 0) == 0;
    return n;
  };
  int during = -1;
  m.after(0ms, [&] {
    for (int i = 1; i <= 3; ++i) m.replace(m.worker(0), std::make_unique<Owner>("owner-" + std::to_string(i)));
    during = countMine();
    m.requestStop();
  });
  m.after(test::slow(10s), [&] { m.requestStop(); });
  EXPECT_EQ(m.run(), 0);
  EXPECT_LE(during, 1);  // the last one's, unless segments have no names at all
  EXPECT_EQ(m.worker(0).name(), "owner-3");
}

}  // namespace
}  // namespace forklift
