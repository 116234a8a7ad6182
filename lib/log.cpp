#include "forklift/log.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <mutex>

#include "forklift/detail/fd.hpp"
#include "forklift/error.hpp"
#include "posix.hpp"

namespace forklift {

namespace {

constexpr const char* kPattern = "[%H:%M:%S.%e] [%n] [pid %P] [%^%l%$] %v";
std::atomic<int> g_level{spdlog::level::info};

// Creates the missing directories above `path` (as spdlog's file sink
// does, mode 0755 before umask). Returns 0 or the errno of the mkdir that
// failed.
int makeParents(const std::string& path) {
  for (auto slash = path.find('/', 1); slash != std::string::npos; slash = path.find('/', slash + 1)) {
    const std::string dir = path.substr(0, slash);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) return errno;
  }
  return 0;
}

// The error handler of every forklift logger. spdlog's default one also
// catches a failing sink, but shares one once-a-second limit among all
// loggers of the process, so one broken file could hide another logger's
// report. This one limits per logger and writes with write(2): no stdio
// buffer, nothing that throws.
class SinkFailureReporter {
 public:
  explicit SinkFailureReporter(std::string name) : name_(std::move(name)) {}

  void operator()(const std::string& what) noexcept {
    try {
      std::lock_guard lock(mutex_);
      const auto now = std::chrono::steady_clock::now();
      if (reported_ && now - last_ < std::chrono::seconds(1)) {
        ++unshown_;
        return;
      }
      char line[1024];
      int n = std::snprintf(line, sizeof line, "[%s] [pid %d] [error] logging failed: %s", name_.c_str(),
                            static_cast<int>(::getpid()), what.c_str());
      if (n < 0) return;
      n = std::min<int>(n, sizeof line - 80);  // room for the suffix below
      if (unshown_ > 0)
        n += std::snprintf(line + n, sizeof line - n, " (and %llu more failures not shown)",
                           static_cast<unsigned long long>(unshown_));
      line[n++] = '\n';
      [[maybe_unused]] const ssize_t w = ::write(STDERR_FILENO, line, static_cast<std::size_t>(n));
      reported_ = true;
      last_ = now;
      unshown_ = 0;
    } catch (...) {
      // Nowhere left to report to.
    }
  }

 private:
  std::string name_;
  std::mutex mutex_;
  bool reported_ = false;
  std::chrono::steady_clock::time_point last_{};
  unsigned long long unshown_ = 0;
};

}  // namespace

namespace detail {
spdlog::level::level_enum newLoggerLevel() noexcept { return static_cast<spdlog::level::level_enum>(g_level.load()); }
}  // namespace detail

void formatLogger(spdlog::level::level_enum level) {
  g_level = level;
  spdlog::set_pattern(kPattern);
  spdlog::set_level(level);
}

void checkLogFile(const std::string& path) {
  if (path.empty()) return;
  const std::string what = "cannot open log file '" + path + "'";
  if (const int err = makeParents(path); err != 0) throw SystemError(err, what);
  const detail::UniqueFd fd(
      detail::retryEintr([&] { return ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666); }));
  if (!fd) throw SystemError(errno, what);
}

std::shared_ptr<spdlog::logger> makeLogger(const std::string& name, const std::string& file) {
  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  std::string fileError;
  if (!file.empty()) {
    try {
      checkLogFile(file);  // our message, and no five spdlog retries for a path that is plainly bad
      sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(file));
    } catch (const std::exception& e) {
      fileError = e.what();
    }
  }
  auto logger = std::make_shared<spdlog::logger>(name, sinks.begin(), sinks.end());
  logger->set_pattern(kPattern);
  logger->set_level(static_cast<spdlog::level::level_enum>(g_level.load()));
  logger->flush_on(spdlog::level::warn);
  auto reporter = std::make_shared<SinkFailureReporter>(name);
  logger->set_error_handler([reporter](const std::string& what) { (*reporter)(what); });
  if (!fileError.empty()) logger->warn("{}; logging to stderr only", fileError);
  return logger;
}

}  // namespace forklift
