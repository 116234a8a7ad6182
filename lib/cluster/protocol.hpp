// forklift::cluster: what the driver's Pool and the agents share (private):
// the names of their messages and how a failure's kind travels.
#pragma once

#include <exception>
#include <memory>
#include <string>

#include "forklift/log.hpp"
#include "forklift/pool.hpp"

namespace forklift::cluster::detail {

inline std::shared_ptr<spdlog::logger> poolLog() {
  static auto log = makeLogger("cluster.pool");
  return log;
}

// Every message of the pool and its agents begins so (World::route).
inline constexpr const char* kPrefix = "__cluster_";
inline constexpr const char* kHello = "__cluster_hello";
inline constexpr const char* kTask = "__cluster_task";
inline constexpr const char* kResult = "__cluster_result";
inline constexpr const char* kStop = "__cluster_stop";
inline constexpr const char* kConfig = "__cluster_config";      // {restart_limit}
inline constexpr const char* kSuspend = "__cluster_suspend";
inline constexpr const char* kResume = "__cluster_resume";
inline constexpr const char* kSuspended = "__cluster_suspended";  // {ids}: returned unstarted
inline constexpr const char* kOut = "__cluster_out";              // {reason, ids}
inline constexpr const char* kReturned = "__cluster_returned";    // {ids}: came after out
inline constexpr const char* kReplaced = "__cluster_replaced";    // {replacements, worker, pid}

// What kind of failure a local task's error is (travels as a word); a
// WorkerDied's status goes in `status`.
inline std::string kindOf(const std::exception_ptr& e, std::string& what, ExitStatus& status) {
  try {
    std::rethrow_exception(e);
  } catch (const TaskTimeout& x) {
    what = x.what();
    return "timeout";
  } catch (const WorkerDied& x) {
    what = x.what();
    status = x.status();
    return "died";
  } catch (const PoolBroken& x) {
    what = x.what();
    return "broken";
  } catch (const RemoteError& x) {
    what = x.what();
    return "remote";
  } catch (const std::exception& x) {
    what = x.what();
    return "error";
  }
}

}  // namespace forklift::cluster::detail
