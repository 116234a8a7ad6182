#include "forklift/log.hpp"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <atomic>

namespace forklift {

namespace {

constexpr const char* kPattern = "[%H:%M:%S.%e] [%n] [pid %P] [%^%l%$] %v";
std::atomic<int> g_level{spdlog::level::info};

}  // namespace

void formatLogger(spdlog::level::level_enum level) {
  g_level = level;
  spdlog::set_pattern(kPattern);
  spdlog::set_level(level);
}

void checkLogFile(const std::string&) {}

std::shared_ptr<spdlog::logger> makeLogger(const std::string& name, const std::string& file) {
  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  if (!file.empty()) sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(file));
  auto logger = std::make_shared<spdlog::logger>(name, sinks.begin(), sinks.end());
  logger->set_pattern(kPattern);
  logger->set_level(static_cast<spdlog::level::level_enum>(g_level.load()));
  logger->flush_on(spdlog::level::warn);
  return logger;
}

}  // namespace forklift
