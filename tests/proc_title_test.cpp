#include "proc_title.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>

#include "forklift/detail/fd.hpp"
#include "forklift/process.hpp"
#include "posix.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using detail::TitleAreaSource;
using detail::UniqueFd;
using test::contains;
using test::readFile;

std::string firstLine(const std::string& path) {
  std::string s = readFile(path);
  return s.substr(0, s.find('\n'));
}

// What `ps` shows as the command line of pid (-ww: never cut to a width).
std::string psArgs(pid_t pid) {
  const std::string cmd = "ps -ww -o args= -p " + std::to_string(pid);
  std::FILE* f = ::popen(cmd.c_str(), "r");
  if (f == nullptr) return "(popen failed)";
  std::string out;
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  ::pclose(f);
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

struct Pipe {
  UniqueFd r, w;
  Pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) std::abort();
    r.reset(fds[0]);
    w.reset(fds[1]);
  }
};

// Reads what the other side wrote until it closes its end, or 10 s pass.
std::string readUntilClosed(int fd) {
  std::string out;
  char buf[1024];
  const Deadline deadline(test::slow(10s));
  for (;;) {
    if (!detail::waitFor(fd, POLLIN, deadline)) return out + "(timed out)";
    const ssize_t n = detail::retryEintr([&] { return ::read(fd, buf, sizeof buf); });
    if (n <= 0) return out;
    out.append(buf, static_cast<std::size_t>(n));
  }
}

// A forked child runs `inChild` (which sets a title and returns "" or what
// went wrong), reports, and stays alive until the parent has looked at it
// from outside: the parent's /proc/<pid>/cmdline and ps must show `expected`.
void expectTitleSeenFromOutside(const std::function<std::string()>& inChild, const std::string& expected) {
  Pipe report, done;
  const pid_t pid = test::forkChild([&] {
    report.r.reset();
    done.w.reset();
    const std::string problem = inChild();
    const std::string msg = problem.empty() ? "ok" : problem;
    [[maybe_unused]] ssize_t w = ::write(report.w.get(), msg.data(), msg.size());
    report.w.reset();
    readUntilClosed(done.r.get());  // the parent has looked
    return 0;
  });
  report.w.reset();
  done.r.reset();
  // The child closes its end only after it wrote, so this is its whole report.
  EXPECT_EQ(readUntilClosed(report.r.get()), "ok");
  EXPECT_EQ(readFile("/proc/" + std::to_string(pid) + "/cmdline"), expected + '\0');
  EXPECT_EQ(psArgs(pid), expected);
  done.w.reset();
  EXPECT_EQ(test::exitCodeOf(test::waitChild(pid, 10s)), 0);
}

// A title longer than this binary's own argv strings: it needs the environ
// area too.
std::string longTitle() {
  const std::size_t argLen = readFile("/proc/self/cmdline").size();
  return "forklift: LongTitle." + std::string(argLen + 40, 'y') + ".end";
}

// Checks, in the child, what must still work after a long title moved the
// environ strings. `before` is environ[0] as it was.
std::string checkAfterMove(const std::string& envBefore, const std::string& nameBefore, const std::string& exeBefore) {
  const auto eq = envBefore.find('=');
  if (eq == std::string::npos) return "environ[0] has no '=': " + envBefore;
  const char* v = std::getenv(envBefore.substr(0, eq).c_str());
  if (v == nullptr || envBefore.substr(eq + 1) != v) return "getenv lost " + envBefore;
  if (environ[0] != nullptr && envBefore != environ[0]) return "environ[0] changed to " + std::string(environ[0]);
  if (::setenv("FORKLIFT_TITLE_TEST", "still works", 1) != 0 ||
      std::string(std::getenv("FORKLIFT_TITLE_TEST")) != "still works")
    return "setenv after the move failed";
  if (nameBefore != program_invocation_name) return "program_invocation_name is now " + std::string(program_invocation_name);
  if (std::string(program_invocation_short_name) != nameBefore.substr(nameBefore.rfind('/') + 1))
    return "program_invocation_short_name is now " + std::string(program_invocation_short_name);
  char exe[4096] = {};
  if (::readlink("/proc/self/exe", exe, sizeof exe - 1) < 0 || exeBefore != exe) return "/proc/self/exe changed";
  return "";
}

std::string exePath() {
  char exe[4096] = {};
  return ::readlink("/proc/self/exe", exe, sizeof exe - 1) < 0 ? "" : exe;
}

TEST(ProcTitle, ALongTitleShowsInCmdlineAndPsAndTheEnvironmentStillWorks) {
  const std::string title = longTitle();
  ASSERT_GT(readFile("/proc/self/environ").size(), 100u) << "too small an environment to hold the title";
  const std::string env0 = environ[0], name = program_invocation_name, exe = exePath();
  expectTitleSeenFromOutside(
      [&] {
        char** const oldEnviron = environ;
        detail::setProcessTitle("long-title", title);
        if (environ == oldEnviron) return std::string("environ was not moved to the heap");
        return checkAfterMove(env0, name, exe);
      },
      title);
}

TEST(ProcTitle, AShortTitleLeavesTheEnvironmentWhereItIs) {
  expectTitleSeenFromOutside(
      [] {
        char** const oldEnviron = environ;
        detail::setProcessTitle("short", "forklift: T.x");
        return environ == oldEnviron ? std::string() : std::string("environ moved for a title that fits in argv");
      },
      "forklift: T.x");
}

TEST(ProcTitle, FindsTheAreaByWalkingTheStringsWithoutProcStat) {
  const std::string title = longTitle();
  const std::string env0 = environ[0], name = program_invocation_name, exe = exePath();
  expectTitleSeenFromOutside(
      [&] {
        detail::setProcessTitle("walked", title, TitleAreaSource::walkStrings);
        return checkAfterMove(env0, name, exe);
      },
      title);
}

TEST(ProcTitle, ASecondTitleReplacesTheFirstAndAForkedChildCanSetItsOwn) {
  expectTitleSeenFromOutside(
      [] {
        detail::setProcessTitle("first", longTitle());
        detail::setProcessTitle("second", "forklift: second");
        if (readFile("/proc/self/cmdline") != std::string("forklift: second") + '\0')
          return "after a second call: " + readFile("/proc/self/cmdline");
        // A grandchild starts from the claimed area and sets its own.
        Pipe r;
        const pid_t pid = test::forkChild([&] {
          detail::setProcessTitle("third", "forklift: third");
          const std::string got = readFile("/proc/self/cmdline");
          [[maybe_unused]] ssize_t w = ::write(r.w.get(), got.data(), got.size());
          return 0;
        });
        r.w.reset();
        const std::string got = readUntilClosed(r.r.get());
        if (test::exitCodeOf(test::waitChild(pid, 10s)) != 0) return std::string("the grandchild failed");
        if (got != std::string("forklift: third") + '\0') return "grandchild's cmdline: " + got;
        return std::string();
      },
      "forklift: second");
}

TEST(ProcTitle, ATitleIsCutToTheAreaAndToOnePage) {
  const std::string huge = "forklift: " + std::string(3 * 4096, 'z');
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t area = readFile("/proc/self/cmdline").size() + readFile("/proc/self/environ").size();
  expectTitleSeenFromOutside(
      [&] {
        detail::setProcessTitle("huge", huge);
        return std::string();
      },
      huge.substr(0, std::min(area, page) - 1));
}

// main's argv array, where the kernel put it: after argc, at /proc/self/stat's
// startstack (field 28).
char** mainArgv(long* argc) {
  const std::string s = readFile("/proc/self/stat");
  std::istringstream in(s.substr(s.rfind(')') + 2));
  std::string field;
  for (int i = 3; i <= 28; ++i) in >> field;
  const auto* start = reinterpret_cast<long*>(std::stoull(field));
  *argc = *start;
  return reinterpret_cast<char**>(const_cast<long*>(start + 1));
}

TEST(ProcTitle, MainsArgvStaysReadable) {
  const std::string cmdline = readFile("/proc/self/cmdline");
  expectTitleSeenFromOutside(
      [&] {
        long argc = 0;
        char** argv = mainArgv(&argc);
        detail::setProcessTitle("argv", longTitle());
        std::string seen;
        for (long i = 0; i < argc; ++i) seen += std::string(argv[i]) + '\0';
        if (seen != cmdline) return "main's argv now reads '" + seen + "'";
        if (argv[argc] != nullptr) return std::string("argv[argc] is not NULL");
        return std::string();
      },
      longTitle());
}

TEST(ProcTitle, CommIsTheGivenNameCutTo15Characters) {
  const pid_t pid = test::forkChild([] {
    detail::setProcessTitle("a-rather-long-process-name", "forklift: X.a-rather-long-process-name");
    return firstLine("/proc/self/comm") == "a-rather-long-p" ? 0 : 1;
  });
  EXPECT_EQ(test::exitCodeOf(test::waitChild(pid, 10s)), 0);
}

class TitledProcess : public MessageProcess {
 public:
  explicit TitledProcess(std::string name) : MessageProcess(std::move(name)) {
    command("cmdline", &TitledProcess::c__cmdline);
  }

 private:
  std::string c__cmdline() { return readFile("/proc/self/cmdline"); }
};

// prepareProcessTitle reads the area's bounds before the fork: a child then
// sets its title without opening anything. Here it cannot open anything
// (its descriptor limit is 0); reading /proc in the child, as before,
// left it with only its comm.
TEST(ProcTitle, AChildForkedAfterPreparingSetsItsTitleWithoutOpeningAFile) {
  detail::prepareProcessTitle();
  expectTitleSeenFromOutside(
      [] {
        rlimit lim{};
        if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return std::string("getrlimit failed");
        const rlimit none{0, lim.rlim_max};
        if (::setrlimit(RLIMIT_NOFILE, &none) != 0) return std::string("setrlimit failed");
        const bool opened = UniqueFd(::open("/proc/self/stat", O_RDONLY | O_CLOEXEC)).valid() || errno != EMFILE;
        if (!opened) detail::setProcessTitle("prepared", "forklift: prepared");
        // Back to the limit it had: poll refuses more descriptors than it.
        if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) return std::string("setrlimit back failed");
        if (opened) return std::string("the limit did not hold: /proc/self/stat could still be opened");
        return std::string();
      },
      "forklift: prepared");
}

TEST(ProcTitle, ABackendShowsForkliftClassDotNameInPs) {
  TitledProcess p("x");
  p.start();
  EXPECT_EQ(psArgs(p.pid()), "forklift: TitledProcess.x");
  EXPECT_EQ(p.call("cmdline", {}, test::slow(5s)).as<std::string>(), std::string("forklift: TitledProcess.x") + '\0');
  EXPECT_EQ(firstLine("/proc/" + std::to_string(p.pid()) + "/comm"), "x");
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

}  // namespace
}  // namespace forklift
