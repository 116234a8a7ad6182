// kill -9 of either side at every stage of a backend's life. The victim
// says where it is (a byte on a pipe) and then waits there, so each kill
// lands exactly at its stage, not at a guessed moment. The survivor must
// report the death within its bound; afterwards no process, descriptor or
// segment remains.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "forklift/pool.hpp"
#include "forklift/process.hpp"
#include "forklift/shm_array.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::contains;

enum class Stage : char { PreRun = 'p', Handler = 'h', Writing = 'w', PostRun = 's' };

const char* stageName(Stage s) {
  switch (s) {
    case Stage::PreRun: return "before preRun__ ends";
    case Stage::Handler: return "inside a handler, during a call";
    case Stage::Writing: return "while writing an array";
    case Stage::PostRun: return "during stop (postRun__)";
  }
  return "?";
}

// A backend that reports reaching `stage` on `out` (its pid, then the
// stage byte) and then waits there for the kill.
class Victim : public MessageProcess {
 public:
  // allowThreads: the test's killer thread runs while the backend starts;
  // it only polls, reads and kills.
  Victim(Stage stage, int out, std::string array)
      : MessageProcess("victim", withThreads()), stage_(stage), out_(out), label_(std::move(array)) {
    command("work", &Victim::c__work);
  }

 protected:
  void preRun__() override {
    array_ = ShmArray<double>::open(label_);
    if (stage_ == Stage::PreRun) arrive();
  }
  void postRun__() override {
    if (stage_ == Stage::PostRun) arrive();
  }

 private:
  static ProcessOptions withThreads() {
    ProcessOptions o;
    o.allowThreads = true;
    return o;
  }
  void c__work() {
    if (stage_ == Stage::Handler) arrive();
    if (stage_ == Stage::Writing) {
      auto m = array_.matrix();
      for (Eigen::Index i = 0; i < m.rows() / 2; ++i) m(i, 0) = -1.0;  // half written
      arrive();
    }
  }
  // Says where it is, then waits to be killed (bounded: a test that forgot
  // to kill must not hang).
  void arrive() {
    const char msg[1 + sizeof(pid_t)] = {static_cast<char>(stage_)};
    const pid_t me = ::getpid();
    char buf[sizeof msg];
    std::memcpy(buf, msg, 1);
    std::memcpy(buf + 1, &me, sizeof me);
    if (::write(out_, buf, sizeof buf) != static_cast<ssize_t>(sizeof buf)) ::_exit(3);
    std::this_thread::sleep_for(20s);
    ::_exit(4);
  }

  Stage stage_;
  int out_;
  std::string label_;
  ShmArray<double> array_;
};

// Reads "stage byte, pid" from `fd` within 10 s; the pid, or 0.
pid_t awaitArrival(int fd, Stage want) {
  pollfd p{fd, POLLIN, 0};
  char buf[1 + sizeof(pid_t)];
  if (::poll(&p, 1, static_cast<int>(test::slowMs(10000))) != 1 || ::read(fd, buf, sizeof buf) != static_cast<ssize_t>(sizeof buf)) return 0;
  if (buf[0] != static_cast<char>(want)) return 0;
  pid_t pid = 0;
  std::memcpy(&pid, buf + 1, sizeof pid);
  return pid;
}

bool gone(pid_t pid, std::chrono::milliseconds within) {
  detail::UniqueFd pfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pfd) return errno == ESRCH;
  pollfd p{pfd.get(), POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(within.count())) == 1;
}

struct Pipe {
  detail::UniqueFd r, w;
  Pipe() {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) throw SystemError(errno, "pipe");
    r.reset(p[0]);
    w.reset(p[1]);
  }
};

// ---------------------------------------------------------------- the backend dies

class BackendKilled : public ::testing::TestWithParam<Stage> {};

TEST_P(BackendKilled, TheFrontendReportsItWithinItsBoundAndNothingRemains) {
  const Stage stage = GetParam();
  SCOPED_TRACE(stageName(stage));
  const int fdsBefore = test::openFdCount();
  {
    Pipe pipe;
    auto array = ShmArray<double>::create("victim", 1000, 1);
    array.matrix().setConstant(1.0);
    Victim v(stage, pipe.w.get(), array.name());
    std::thread killer([&] {
      if (const pid_t pid = awaitArrival(pipe.r.get(), stage)) ::kill(pid, SIGKILL);
    });
    std::string error;
    bool died = false;
    ExitStatus status;
    const auto t0 = Clock::now();
    try {
      v.start();
      if (stage == Stage::Handler || stage == Stage::Writing) v.call("work", {}, test::slow(5000ms));
      status = v.stop(test::slow(5000ms));
    } catch (const ProcessDied& e) {
      died = true;
      error = e.what();
      status = v.stop(test::slow(2000ms));
    }
    killer.join();
    const auto took = Clock::now() - t0;
    EXPECT_LT(took, test::slow(3s)) << "the death was not seen at once";
    if (stage == Stage::PostRun) {
      EXPECT_FALSE(died);  // stop itself reports it
    } else {
      EXPECT_TRUE(died);
      EXPECT_TRUE(contains(error, "killed by SIGKILL")) << error;
    }
    // A failed start leaves nothing to stop; otherwise stop says how it ended.
    if (stage != Stage::PreRun) {
      EXPECT_TRUE(status.how == ExitStatus::How::Signaled && status.signal == SIGKILL) << status.describe();
    }
    // The frontend's side of the array is intact, the half-written part too.
    EXPECT_EQ(array.matrix()(999, 0), 1.0);
    if (stage == Stage::Writing) {
      EXPECT_EQ(array.matrix()(0, 0), -1.0);
    }
  }
  EXPECT_FALSE(test::hasChildren());
  EXPECT_EQ(test::openFdCount(), fdsBefore);
}

INSTANTIATE_TEST_SUITE_P(EveryStage, BackendKilled,
                         ::testing::Values(Stage::PreRun, Stage::Handler, Stage::Writing, Stage::PostRun));

// ---------------------------------------------------------------- the frontend dies

class FrontendKilled : public ::testing::TestWithParam<Stage> {};

// The frontend (a forked test child) is killed while its backend is at
// `stage`; the backend, parked there, must follow within 2 s.
TEST_P(FrontendKilled, TheBackendFollowsWithinTwoSeconds) {
  const Stage stage = GetParam();
  SCOPED_TRACE(stageName(stage));
  Pipe pipe;
  const pid_t frontend = test::forkChild([&] {
    pipe.r.reset();
    auto array = ShmArray<double>::create("victim", 1000, 1);
    Victim v(stage, pipe.w.get(), array.name());
    v.start();
    if (stage == Stage::Handler || stage == Stage::Writing) v.call("work", {}, test::slow(30000ms));
    v.stop(test::slow(30000ms));
    return 5;  // never reached: killed before
  });
  pipe.w.reset();
  const pid_t backend = awaitArrival(pipe.r.get(), stage);
  ::kill(frontend, SIGKILL);
  const auto status = test::waitChild(frontend, 5s);
  ASSERT_NE(backend, 0) << "the backend never reached its stage";
  ASSERT_TRUE(status && WIFSIGNALED(*status) && WTERMSIG(*status) == SIGKILL);
  EXPECT_TRUE(gone(backend, test::slow(2s))) << "the backend outlived its frontend";
  if (!gone(backend, 0ms)) ::kill(backend, SIGKILL);
}

INSTANTIATE_TEST_SUITE_P(EveryStage, FrontendKilled,
                         ::testing::Values(Stage::PreRun, Stage::Handler, Stage::Writing, Stage::PostRun));

// A frontend killed while its pool's workers are inside tasks: every worker
// follows within 2 s.
TEST(FrontendKilledDuringPoolTasks, EveryPoolWorkerFollowsWithinTwoSeconds) {
  Pipe pipe;
  const pid_t frontend = test::forkChild([&] {
    pipe.r.reset();
    PoolOptions po;
    po.workers = 3;
    FunctionPool<int(int)> pool(
        [](int x) {
          std::this_thread::sleep_for(20s);  // a long task: the kill comes first
          return x;
        },
        po);
    std::vector<TaskFuture<int>> tasks;
    for (int i = 0; i < 3; ++i) tasks.push_back(pool.submit(i));
    pool.pool().poll();  // hand the tasks out
    for (std::size_t i = 0; i < 3; ++i) {
      const pid_t w = pool.pool().worker(i).pid();
      if (::write(pipe.w.get(), &w, sizeof w) != sizeof w) return 3;
    }
    for (;;) ::pause();
  });
  pipe.w.reset();
  std::vector<pid_t> workers;
  pid_t w = 0;
  pollfd p{pipe.r.get(), POLLIN, 0};
  while (workers.size() < 3 && ::poll(&p, 1, static_cast<int>(test::slowMs(10000))) == 1 && ::read(pipe.r.get(), &w, sizeof w) == sizeof w)
    workers.push_back(w);
  ::kill(frontend, SIGKILL);
  test::waitChild(frontend, 5s);
  ASSERT_EQ(workers.size(), 3u);
  for (pid_t pid : workers) EXPECT_TRUE(gone(pid, test::slow(2s))) << "pool worker " << pid << " outlived its frontend";
}

// ---------------------------------------------------------------- a backend that will not stop

class Stubborn : public MessageProcess {
 public:
  Stubborn() : MessageProcess("stubborn") { command("spin", &Stubborn::c__spin); }

 private:
  void c__spin() {
    ::signal(SIGTERM, SIG_IGN);
    for (;;) std::this_thread::sleep_for(1ms);  // ignores the stop request too
  }
};

TEST(StopBound, ABackendThatIgnoresSigtermAndLoopsForeverIsStoppedWithinTheBound) {
  Stubborn s;
  s.start();
  s.send("spin");
  std::this_thread::sleep_for(50ms);
  const auto t0 = Clock::now();
  const ExitStatus status = s.stop(300ms);
  const auto took = Clock::now() - t0;
  // The ladder: 300 ms for the request, 500 ms after SIGTERM, then SIGKILL.
  EXPECT_LT(took, 800ms + test::slow(1200ms));
  EXPECT_TRUE(status.how == ExitStatus::How::Signaled && status.signal == SIGKILL) << status.describe();
  EXPECT_FALSE(test::hasChildren());
}

}  // namespace
}  // namespace forklift
