// forklift::cluster: what the two sides of a remote backend share (internal):
// the messages' names, the class registry, an ExitStatus on the wire.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <typeindex>
#include <unordered_map>

#include "forklift/cluster/remote.hpp"
#include "forklift/exit_status.hpp"
#include "forklift/message.hpp"

namespace spdlog {
class logger;
}

namespace forklift::cluster::wire {

std::shared_ptr<spdlog::logger> remoteLog();

// Commands to an agent; replies and out-messages to the driver begin with
// kProc + the backend's id + ".r." or ".o." (World::route on each side).
inline constexpr const char* kProc = "__cluster_proc.";
inline const std::string kStart = std::string(kProc) + "start";
inline const std::string kSend = std::string(kProc) + "send";
inline const std::string kCall = std::string(kProc) + "call";
inline const std::string kStop = std::string(kProc) + "stop";

inline std::string replyPrefix(std::uint64_t id) { return kProc + std::to_string(id) + ".r."; }
inline std::string outPrefix(std::uint64_t id) { return kProc + std::to_string(id) + ".o."; }

inline std::int64_t toMs(Timeout t) { return static_cast<std::int64_t>(t.count()); }

// The classes defineProcess registered (the fork server holds a copy).
struct ClassEntry {
  detail::CheckArgs check;
  detail::MakeProcess make;
};
struct Registry {
  std::mutex mu;
  std::map<std::string, ClassEntry> classes;
  std::unordered_map<std::type_index, std::string> names;
  std::uint64_t recipe = 0;  // the fork server's recipe, made with the first class
};
Registry& registry();

ExitStatus statusFrom(const Message& m);
void putStatus(Message& m, const ExitStatus& s);

}  // namespace forklift::cluster::wire
