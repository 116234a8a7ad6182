// Where pidfds are missing (old kernels, sandboxes, valgrind), backends are
// watched through a death pipe. The promises stay the same: a death is seen
// at once, statuses are real, a backend's own helper does not hide its death.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "child.hpp"
#include "forklift/manager.hpp"
#include "forklift/process.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

class DeathPipe : public ::testing::Test {
 protected:
  void SetUp() override { detail::useDeathPipeForTests(true); }
  void TearDown() override {
    detail::useDeathPipeForTests(false);
    EXPECT_FALSE(test::hasChildren());
  }
};

class Sleeper : public MessageProcess {
 public:
  Sleeper() : MessageProcess("sleeper") {
    command("sleep", &Sleeper::c__sleep, {"ms"});
    command("exit", &Sleeper::c__exit, {"code"});
    command("helper", &Sleeper::c__helper);
  }

 private:
  void c__sleep(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }
  void c__exit(int code) { ::_exit(code); }
  // A child of the backend that outlives it (as a helper or a forked
  // library would): it must not hold the backend's death pipe open.
  int c__helper() {
    helper_ = std::make_unique<Sleeper>();
    helper_->start();
    return helper_->pid();
  }
  std::unique_ptr<Sleeper> helper_;
};

TEST_F(DeathPipe, ABackendKilledDuringACallIsSeenAtOnce) {
  Sleeper s;
  s.start();
  std::thread killer([&] {
    std::this_thread::sleep_for(100ms);
    ::kill(s.pid(), SIGKILL);
  });
  const auto t0 = Clock::now();
  EXPECT_TRUE(test::contains(test::thrown<ProcessDied>([&] { s.call("sleep", {{"ms", 10000}}); }),
                             "killed by SIGKILL"));
  killer.join();
  EXPECT_LT(Clock::now() - t0, test::slow(2s));
  const ExitStatus st = s.stop();
  EXPECT_EQ(st.how, ExitStatus::How::Signaled);
  EXPECT_EQ(st.signal, SIGKILL);
}

TEST_F(DeathPipe, ExitCodesAndTheStopLadderAreReal) {
  Sleeper a;
  a.start();
  a.send("exit", {{"code", 7}});
  EXPECT_TRUE(test::eventually([&] { return !a.isAlive(); }, 2s));
  const ExitStatus st = a.stop();
  EXPECT_EQ(st.how, ExitStatus::How::Exited);
  EXPECT_EQ(st.code, 7);

  Sleeper b;
  b.start();
  b.send("sleep", {{"ms", 60000}});
  const auto t0 = Clock::now();
  const ExitStatus sb = b.stop(200ms);  // busy: SIGTERM ends it
  EXPECT_LT(Clock::now() - t0, 200ms + test::slow(1800ms));
  EXPECT_EQ(sb.how, ExitStatus::How::Signaled) << sb.describe();
}

TEST_F(DeathPipe, TheBackendsOwnBackendDoesNotHideItsDeath) {
  Sleeper s;
  s.start();
  const int helper = s.call("helper").as<int>();
  ASSERT_GT(helper, 0);
  ::kill(s.pid(), SIGKILL);
  const auto t0 = Clock::now();
  EXPECT_THROW(s.call("sleep", {{"ms", 1}}, test::slow(5000ms)), ProcessDied);
  EXPECT_LT(Clock::now() - t0, test::slow(500ms)) << "the helper held the backend's death pipe";
  s.stop();
  // The helper follows its own frontend (PR_SET_PDEATHSIG); a zombie until
  // init reaps it, so look at its state.
  EXPECT_TRUE(test::eventually([&] {
    const std::string st = test::readFile("/proc/" + std::to_string(helper) + "/stat");
    return st.empty() || st.find(") Z") != std::string::npos;
  }, 2s));
}

TEST_F(DeathPipe, AManagerSeesAWorkerDie) {
  Manager m;
  auto& w = m.emplace<Sleeper>();
  std::optional<ExitStatus> seen;
  m.onExit([&](MessageProcess&, const ExitStatus& s) {
    seen = s;
    m.requestStop();
  });
  m.post([&] { ::kill(w.pid(), SIGKILL); });
  m.after(test::slow(5000ms), [&] { m.requestStop(); });  // the bound, if the death were missed
  const auto t0 = Clock::now();
  m.run();
  EXPECT_LT(Clock::now() - t0, test::slow(2s));
  ASSERT_TRUE(seen);
  EXPECT_EQ(seen->signal, SIGKILL);
}

}  // namespace
}  // namespace forklift
