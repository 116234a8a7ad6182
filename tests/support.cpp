#include "support.hpp"

#include "forklift/process.hpp"

#include <sys/resource.h>
#include <algorithm>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

namespace forklift::test {

pid_t forkChild(const std::function<int()>& body) {
  std::fflush(nullptr);  // do not let the child flush the parent's buffered output twice
  const pid_t pid = ::fork();
  if (pid < 0) {
    std::perror("fork");
    std::abort();
  }
  if (pid == 0) {
    int code = 99;
    try {
      code = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child %d threw: %s\n", ::getpid(), e.what());
    } catch (...) {
      std::fprintf(stderr, "child %d threw\n", ::getpid());
    }
    ::_exit(code);
  }
  return pid;
}

double slowdown() {
  static const double factor = [] {
    const char* v = std::getenv("FORKLIFT_TEST_SLOWDOWN");
    if (!v || !*v) return 1.0;
    char* end = nullptr;
    const double f = std::strtod(v, &end);
    if (*end != '\0' || !(f >= 1.0) || f > 1000.0) {
      std::fprintf(stderr, "FORKLIFT_TEST_SLOWDOWN=%s: expected a number from 1 to 1000\n", v);
      std::abort();
    }
    return f;
  }();
  return factor;
}

std::optional<int> waitChild(pid_t pid, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + slow(timeout);
  for (;;) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return status;
    if (r < 0 && errno != EINTR) return std::nullopt;
    if (std::chrono::steady_clock::now() >= end) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return std::nullopt;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

int exitCodeOf(std::optional<int> status) {
  if (!status || !WIFEXITED(*status)) return -1;
  return WEXITSTATUS(*status);
}

int openFdCount() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return -1;
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') ++n;
  ::closedir(d);
  return n - 1;  // the directory stream itself
}

bool hasChildren() {
  siginfo_t info{};
  // P_ALL + WNOHANG + WNOWAIT: looks without reaping.
  const int r = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT | WSTOPPED | WCONTINUED);
  return !(r < 0 && errno == ECHILD);
}

std::string readFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<std::string> forkliftSegments() {
  std::vector<std::string> out;
  DIR* d = ::opendir("/dev/shm");
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.rfind("fk.", 0) == 0) out.push_back(name);
  }
  ::closedir(d);
  return out;
}

bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + slow(timeout);
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

namespace {

// After the whole binary ran: no child process may be left, running or
// zombie, and no forklift segment in /dev/shm may belong to this process.
class NoLeftoversEnvironment : public ::testing::Environment {
 public:
  void TearDown() override {
    EXPECT_FALSE(hasChildren()) << "a test left a child process behind";
    const std::string mine = "fk." + std::to_string(::getpid()) + ".";
    for (const auto& name : forkliftSegments())
      EXPECT_NE(name.rfind(mine, 0), 0u) << "a test left /dev/shm/" << name << " behind";
  }
};

[[maybe_unused]] ::testing::Environment* const kNoLeftovers =
    ::testing::AddGlobalTestEnvironment(new NoLeftoversEnvironment);

}  // namespace
bool overSharedMemory() {
  const char* v = std::getenv("FORKLIFT_TRANSPORT");
  if (!v) return ProcessOptions{}.transport == Transport::SharedMemory;
  return std::string(v) == "shm";
}

TempDir::TempDir() {
  char tmpl[] = "/tmp/forklift-test-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

CaptureStderr::CaptureStderr(const TempDir& dir) : file_(dir.path() / "stderr") {
  std::fflush(stderr);
  saved_ = ::dup(STDERR_FILENO);
  const int fd = ::open(file_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (saved_ < 0 || fd < 0) throw std::runtime_error("cannot capture stderr");
  ::dup2(fd, STDERR_FILENO);
  ::close(fd);
}

CaptureStderr::~CaptureStderr() {
  std::fflush(stderr);
  ::dup2(saved_, STDERR_FILENO);
  ::close(saved_);
}

std::string CaptureStderr::text() const {
  std::fflush(stderr);
  return readFile(file_);
}

void fillPayload(std::byte* p, std::size_t n, std::uint64_t seq) {
  std::uint64_t x = seq * 0x9e3779b97f4a7c15ull + 1;
  for (std::size_t i = 0; i < n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(p + i, &x, std::min<std::size_t>(8, n - i));
  }
}
std::int64_t checksum(const std::byte* p, std::size_t n) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i < n; i += 8) {
    std::uint64_t w = 0;
    std::memcpy(&w, p + i, std::min<std::size_t>(8, n - i));
    h = (h ^ w) * 1099511628211ull;
  }
  return static_cast<std::int64_t>(h & 0x7fffffffffffffffull);
}

ScopedFdLimit::ScopedFdLimit(long limit) {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  saved_ = static_cast<long>(lim.rlim_cur);
  lim.rlim_cur = static_cast<rlim_t>(limit);
  ok_ = ::setrlimit(RLIMIT_NOFILE, &lim) == 0;
}

ScopedFdLimit::~ScopedFdLimit() {
  if (!ok_) return;
  rlimit lim{};
  ::getrlimit(RLIMIT_NOFILE, &lim);
  lim.rlim_cur = static_cast<rlim_t>(saved_);
  ::setrlimit(RLIMIT_NOFILE, &lim);
}

}  // namespace forklift::test
