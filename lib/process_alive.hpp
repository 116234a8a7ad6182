// forklift - is a process still there? (internal)
//
// One answer for every place that asks about a pid it did not fork and so
// cannot wait for: a ring's peer (lib/ring_buffer.cpp), a named segment's
// creator (lib/shm.cpp, forklift-shm).
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/types.h>

#include <cerrno>

#include "forklift/detail/fd.hpp"
#include "posix.hpp"

namespace forklift::detail {

// True while `pid` is a process that has not ended. A zombie has ended (a
// pidfd of it is readable). Without pidfds (ENOSYS on old kernels, EPERM in
// some sandboxes), kill(pid, 0) answers: then a zombie looks alive until it
// is reaped, and EPERM means alive, someone else's. `pidfdOpen` is
// pidfd_open(pid, 0) (a seam: tests make pidfds missing). 0 and negative
// pids are no process (kill would ask a process group).
template <class PidfdOpen>
bool processAlive(pid_t pid, PidfdOpen&& pidfdOpen) noexcept {
  if (pid <= 0) return false;
  UniqueFd fd(pidfdOpen(pid));
  if (!fd) {
    if (errno == ESRCH) return false;
    return ::kill(pid, 0) == 0 || errno == EPERM;
  }
  pollfd p{fd.get(), POLLIN, 0};
  return retryEintr([&] { return ::poll(&p, 1, 0); }) == 0;
}

}  // namespace forklift::detail
