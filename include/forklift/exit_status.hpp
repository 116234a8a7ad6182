// forklift - ExitStatus: how a backend ended
//
// What `MessageProcess::stop()`, `waitStop()` and the Manager's exit events
// report. A status is read from the kernel once and never made up: when it
// cannot be known (the child was reaped by someone else, e.g. because the
// frontend ignores SIGCHLD), `how` is Unknown and `ok()` is false.
//
// The backend's own exit codes: 0 normal end, 3 preRun__ threw, 4
// postRun__ threw, 5 the backend failed outside any handler, 6 the command
// stream from the frontend was corrupt, 7 the backend ran out of file
// descriptors setting up (start() then fails as when the frontend runs
// out: SystemError, EMFILE). `describe()` names them.
#pragma once

#include <cstdint>
#include <string>

namespace forklift {

struct ExitStatus {
  enum class How : std::uint8_t {
    Running,    // not ended (yet): a wait timed out
    Exited,     // exit code in `code`
    Signaled,   // killed by `signal`
    Abandoned,  // in-process mode: a stuck backend thread was left behind
    NotStarted,
    Unknown,    // ended, but its status was taken by someone else
  };
  How how = How::NotStarted;
  int code = 0;
  int signal = 0;
  // The frontend had to send SIGTERM (1) or SIGKILL (2) to end it.
  int escalation = 0;
  // Unknown because the fork server that forked it died before relaying
  // its status (see forklift/fork_server.hpp).
  bool serverLost = false;

  bool ok() const noexcept { return how == How::Exited && code == 0; }
  bool ended() const noexcept { return how != How::Running && how != How::NotStarted; }
  // "exited with code 0", "exited with code 3 (preRun__ failed)",
  // "killed by SIGKILL (after SIGKILL)", "ended with an unknown status ...".
  std::string describe() const;
};

// Exit codes of a backend (see above).
inline constexpr int kExitPreRunFailed = 3;
inline constexpr int kExitPostRunFailed = 4;
inline constexpr int kExitBackendFailed = 5;
inline constexpr int kExitCorruptStream = 6;
inline constexpr int kExitOutOfDescriptors = 7;

}  // namespace forklift
