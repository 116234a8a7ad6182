// Helpers shared by the multi-process tests: children that always leave with
// _exit, waits that always have a bound, and checks that a test left no
// process, descriptor or shared-memory segment behind.
#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace forklift::test {

// Time in tests is of two kinds.
//
// - A time that IS the behaviour under test: a timeout the test sets and
//   expects to fire, a lower bound ("not before 100 ms"), a period. It is
//   written as it is.
// - A bound on how long something may take: a wait that must end, a limit
//   on elapsed time, a timeout given to a call that must succeed. It is
//   written slow(x), where x holds at least 3 times over on the machines
//   the suite is tuned on (a fresh 2-vCPU machine with costlier system
//   calls, everything on one CPU, a CPU burner beside it), and slow()
//   multiplies it by ONE factor: FORKLIFT_TEST_SLOWDOWN (a number >= 1,
//   default 1). `tools/dev test-asan` and `test-tsan` set 3; set it yourself
//   for anything slower still (valgrind, an emulator). waitChild and
//   eventually take bounds, and apply slow() themselves.
//
// The Python tests read the same variable (run_program.py and the others).
double slowdown();
template <class Rep, class Period>
std::chrono::milliseconds slow(std::chrono::duration<Rep, Period> bound) {
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(bound).count();
  return std::chrono::milliseconds(static_cast<std::int64_t>(static_cast<double>(ms) * slowdown()));
}
// The same for a bound counted in milliseconds.
inline std::int64_t slowMs(std::int64_t ms) { return slow(std::chrono::milliseconds(ms)).count(); }

// Forks; the child runs `body` and leaves with _exit(its return value), or
// _exit(99) if it threw. Never returns in the child.
pid_t forkChild(const std::function<int()>& body);

// Waits for `pid` up to slow(timeout); returns the raw wait status, or
// nullopt after killing (SIGKILL) and reaping a child that did not end in
// time.
std::optional<int> waitChild(pid_t pid, std::chrono::milliseconds timeout);

// Exit code of a child that exited normally, or -1 (signalled, timed out).
int exitCodeOf(std::optional<int> status);

// Number of open descriptors of this process.
int openFdCount();

// True while this process has a child (running or zombie).
bool hasChildren();

// The whole file (a /proc file too), or "" when it cannot be read.
std::string readFile(const std::string& path);

// A fresh directory under /tmp, removed with everything in it.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Sends this process's stderr (descriptor 2, so sinks and children too) to
// a file in `dir` while alive.
class CaptureStderr {
 public:
  explicit CaptureStderr(const TempDir& dir);
  ~CaptureStderr();
  CaptureStderr(const CaptureStderr&) = delete;
  CaptureStderr& operator=(const CaptureStderr&) = delete;
  // What was written so far.
  std::string text() const;

 private:
  std::filesystem::path file_;
  int saved_ = -1;
};

// True when this run sends every message over shared-memory queues: the
// default transport, unless FORKLIFT_TRANSPORT=socket (as the *_socket test
// runs set) says otherwise.
bool overSharedMemory();

// Every interleaving of two parties' steps, for the doorbell models: a
// deterministic scheduler. `replay(schedule)` builds a fresh model and runs
// the schedule (true: the first party's step), returning nullptr when one
// of its steps could not run; `visit(model)` sees the model of every
// complete schedule, one that neither party can extend.
template <class Replay, class Visit>
void everySchedule(const Replay& replay, const Visit& visit, std::vector<bool>& schedule) {
  bool extended = false;
  for (const bool first : {true, false}) {
    schedule.push_back(first);
    if (replay(schedule)) {
      extended = true;
      everySchedule(replay, visit, schedule);
    }
    schedule.pop_back();
  }
  if (!extended) visit(*replay(schedule));
}
template <class Replay, class Visit>
void everySchedule(const Replay& replay, const Visit& visit) {
  std::vector<bool> schedule;
  everySchedule(replay, visit, schedule);
}

// Names in /dev/shm that forklift created (prefix "fk.").
std::vector<std::string> forkliftSegments();

// Passes when `text` contains `part`, and shows both when it does not.
inline ::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

// The message of the E thrown by fn, or a text that fails every check.
template <class E = std::exception, class Fn>
std::string thrown(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    if constexpr (std::is_same_v<E, std::exception>) {
      return e.what();
    } else {
      if (dynamic_cast<const E*>(&e) != nullptr) return e.what();
    }
    return std::string("(other exception type: ") + e.what() + ")";
  }
  return "(no exception)";
}

// Polls `pred` every millisecond until it holds or slow(timeout) passes.
bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds timeout);

// A payload of n bytes that depends on `seq` (a ring frame's, say), and a
// checksum of any n bytes: a reader checks what a writer filled.
void fillPayload(std::byte* p, std::size_t n, std::uint64_t seq);
std::int64_t checksum(const std::byte* p, std::size_t n);

// Lowers this process's soft RLIMIT_NOFILE to `limit` while alive and puts
// the old one back when destroyed. ok() is false when setrlimit refused.
class ScopedFdLimit {
 public:
  explicit ScopedFdLimit(long limit);
  ~ScopedFdLimit();
  ScopedFdLimit(const ScopedFdLimit&) = delete;
  ScopedFdLimit& operator=(const ScopedFdLimit&) = delete;
  bool ok() const { return ok_; }

 private:
  long saved_ = -1;
  bool ok_ = false;
};

// A thread of this process that waits, doing nothing, until the scope
// ends: the process runs threads (forks must go through a fork server).
class BusyThread {
 public:
  BusyThread()
      : thread_([this] {
          std::unique_lock lock(m_);
          cv_.wait(lock, [&] { return done_; });
        }) {}
  ~BusyThread() {
    {
      std::lock_guard lock(m_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace forklift::test
