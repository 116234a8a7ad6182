#include "forklift/log.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "forklift/detail/fd.hpp"
#include "forklift/error.hpp"
#include "forklift/process.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using test::contains;
using test::CaptureStderr;
using test::readFile;
using test::TempDir;
namespace fs = std::filesystem;

std::size_t count(const std::string& text, const std::string& part) {
  std::size_t n = 0;
  for (auto p = text.find(part); p != std::string::npos; p = text.find(part, p + 1)) ++n;
  return n;
}

// A path no one can create, root included (the check runs as root in CI,
// where "/nonexistent-dir/x.log" would simply be created): its "directory"
// is a regular file.
std::string uncreatablePath(const TempDir& dir) {
  const fs::path blocker = dir.path() / "plain-file";
  std::ofstream(blocker) << "not a directory\n";
  return (blocker / "x.log").string();
}

TEST(Log, CheckLogFileNamesThePathAndTheReason) {
  TempDir dir;
  const std::string path = uncreatablePath(dir);
  const std::string what = test::thrown<Error>([&] { checkLogFile(path); });
  EXPECT_TRUE(contains(what, "cannot open log file '" + path + "'"));
  EXPECT_TRUE(contains(what, std::strerror(ENOTDIR)));
}

TEST(Log, CheckLogFileCreatesTheFileAndItsDirectoriesAndKeepsWhatIsThere) {
  TempDir dir;
  const fs::path path = dir.path() / "a" / "b" / "x.log";
  EXPECT_NO_THROW(checkLogFile(path.string()));
  EXPECT_TRUE(fs::is_regular_file(path));
  EXPECT_EQ(fs::file_size(path), 0u);
  std::ofstream(path) << "kept\n";
  EXPECT_NO_THROW(checkLogFile(path.string()));
  EXPECT_EQ(readFile(path), "kept\n");
  EXPECT_NO_THROW(checkLogFile(""));  // no log file: nothing to check
}

TEST(Log, MakeLoggerFallsBackToStderrWithOneWarning) {
  TempDir dir;
  const std::string path = uncreatablePath(dir);
  CaptureStderr err(dir);
  std::shared_ptr<spdlog::logger> log;
  ASSERT_NO_THROW(log = makeLogger("Test.fallback", path));
  log->info("still logging");
  log->flush();
  const std::string text = err.text();
  EXPECT_EQ(count(text, "cannot open log file '" + path + "'"), 1u) << text;
  EXPECT_TRUE(contains(text, "; logging to stderr only")) << text;
  EXPECT_TRUE(contains(text, "[Test.fallback] [pid " + std::to_string(::getpid()) + "] [info] still logging")) << text;
  EXPECT_EQ(log->sinks().size(), 1u);
}

TEST(Log, LoggingToDevFullNeverThrowsAndIsReportedWithoutFlooding) {
  TempDir dir;
  CaptureStderr err(dir);
  const auto log = makeLogger("Test.full", "/dev/full");
  ASSERT_EQ(log->sinks().size(), 2u);
  for (int i = 0; i < 100; ++i) {
    EXPECT_NO_THROW(log->error("line {}", i));  // error: flushed, and the flush fails
    EXPECT_NO_THROW(log->info("info {}", i));
  }
  EXPECT_NO_THROW(log->flush());
  const std::string text = err.text();
  EXPECT_TRUE(contains(text, "[Test.full] [pid " + std::to_string(::getpid()) + "] [error] logging failed: "));
  EXPECT_TRUE(contains(text, std::strerror(ENOSPC)));
  // At most once a second: far fewer reports than failures.
  EXPECT_LT(count(text, "logging failed"), 10u) << text;
  EXPECT_TRUE(contains(text, "line 99")) << "the stderr sink stopped too";
}

// The file was fine when the logger was made, then writes to it start to
// fail (here: the file size limit, EFBIG). Run in a child: it changes
// rlimits and signal dispositions. Its stderr goes to a pipe, which the size
// limit does not touch.
TEST(Log, AFileThatBecomesUnwritableDoesNotStopTheLogger) {
  TempDir dir;
  const fs::path path = dir.path() / "limited.log";
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  detail::UniqueFd readEnd(fds[0]), writeEnd(fds[1]);
  const pid_t pid = test::forkChild([&] {
    ::dup2(writeEnd.get(), STDERR_FILENO);
    const auto log = makeLogger("Test.limited", path.string());
    log->warn("before the limit");  // warn and above are flushed at once
    ::signal(SIGXFSZ, SIG_IGN);
    rlimit lim{};
    ::getrlimit(RLIMIT_FSIZE, &lim);
    lim.rlim_cur = static_cast<rlim_t>(fs::file_size(path));
    if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) return 2;
    try {
      for (int i = 0; i < 20; ++i) log->error("after the limit {}", i);
      log->flush();
    } catch (...) {
      return 3;
    }
    return 0;
  });
  writeEnd.reset();
  EXPECT_EQ(test::exitCodeOf(test::waitChild(pid, 10s)), 0);
  std::string text;  // the child has exited: the pipe holds all it wrote
  char buf[4096];
  for (ssize_t n; (n = ::read(readEnd.get(), buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
  EXPECT_TRUE(contains(text, "[Test.limited] [pid " + std::to_string(pid) + "] [error] logging failed: "));
  EXPECT_TRUE(contains(text, std::strerror(EFBIG)));
  EXPECT_TRUE(contains(text, "after the limit 19")) << "the stderr sink stopped too";
  const std::string log = readFile(path);
  EXPECT_TRUE(contains(log, "before the limit"));
  EXPECT_FALSE(contains(log, "after the limit")) << log;
}

class Pinger : public MessageProcess {
 public:
  explicit Pinger(std::string name, ProcessOptions o) : MessageProcess(std::move(name), std::move(o)) {
    command("ping", &Pinger::c__ping);
  }

 private:
  std::string c__ping() { return "pong"; }
};

// Whether `pid` holds a descriptor of `path` open.
bool holdsOpen(pid_t pid, const fs::path& path) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec))
    if (fs::read_symlink(e.path(), ec) == path) return true;
  return false;
}

// Each side makes its logger at its first line (log.hpp): a backend that
// has logged nothing has not opened its log file; its first line (an
// unknown command is an error line) opens it and lands in it.
TEST(Log, ABackendOpensItsLogFileAtItsFirstLineNotAtItsStart) {
  TempDir dir;
  CaptureStderr err(dir);
  ProcessOptions o;
  o.logFile = (dir.path() / "backend.log").string();
  Pinger p("lazy", o);
  p.start();
  EXPECT_EQ(p.call("ping", {}, test::slow(5s)).as<std::string>(), "pong");
  EXPECT_FALSE(holdsOpen(p.pid(), o.logFile)) << "a logger was made by an ordinary start and call";
  p.send("nope");
  EXPECT_EQ(p.call("ping", {}, test::slow(5s)).as<std::string>(), "pong");  // after the error line
  EXPECT_TRUE(holdsOpen(p.pid(), o.logFile));
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
  EXPECT_TRUE(contains(readFile(o.logFile), "unknown command 'nope'")) << readFile(o.logFile);
}

// The issue: a backend whose log file fails dies at its first error line.
TEST(Log, ABackendWhoseLogFileFailsKeepsServing) {
  TempDir dir;
  CaptureStderr err(dir);  // the backend inherits it
  ProcessOptions o;
  o.logFile = "/dev/full";
  Pinger p("full", o);
  p.start();
  p.send("nope");  // an unknown command: an error line, flushed at once
  EXPECT_EQ(p.call("ping", {}, test::slow(5s)).as<std::string>(), "pong");
  const pid_t pid = p.pid();
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
  const std::string text = err.text();
  EXPECT_TRUE(contains(text, "[Pinger.full] [pid " + std::to_string(pid) + "] [error] logging failed: ")) << text;
}

}  // namespace
}  // namespace forklift
