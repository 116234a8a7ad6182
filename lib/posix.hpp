// forklift - small POSIX helpers shared by the library (internal)
//
// `throwErrno` turns errno into the SystemError of the API edge.
// `retryEintr` is the one retry loop for system calls interrupted by a
// signal (never used for close: see detail/fd.hpp). `waitFor` is the one
// bounded poll of a single descriptor that channels, the backend loop's
// output queue, events and the reaper share. `processDead` is the one test
// of whether a pid that is not our child still runs (a segment's creator, a
// ring's peer).
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <string>
#include <string_view>

#include "forklift/detail/fd.hpp"
#include "forklift/error.hpp"
#include "forklift/timeout.hpp"

namespace forklift::detail {

// Throws SystemError(errno, what). errno is read first, before anything else
// can overwrite it.
[[noreturn]] void throwErrno(const std::string& what);

// Retries a system call while it fails with EINTR.
template <class F>
auto retryEintr(F&& f) {
  for (;;) {
    auto r = f();
    if (r != -1 || errno != EINTR) return r;
  }
}

// Waits until `events` (POLLIN, POLLOUT) are ready on fd, or an error or
// hang-up is; false when the deadline passes first. EINTR waits again for
// the time left. Throws SystemError if poll itself fails.
inline bool waitFor(int fd, short events, const Deadline& d) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, d.pollMillis());
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) throwErrno("cannot poll descriptor " + std::to_string(fd));
  }
}

// True when `pid` is gone or a zombie (a zombie holds nothing any more).
// `openPidfd(pid)` is pidfd_open (callers with a seam pass theirs); where
// pidfds are missing (ENOSYS, EPERM in some sandboxes) it asks kill(pid, 0),
// which cannot tell a zombie: then only a pid that is gone is dead. A pid
// of 0 or less is never a live process.
template <class OpenPidfd>
bool processDead(pid_t pid, OpenPidfd&& openPidfd) noexcept {
  if (pid <= 0) return true;
  UniqueFd fd(openPidfd(pid));
  if (!fd && (errno == ENOSYS || errno == EPERM)) return ::kill(pid, 0) != 0 && errno == ESRCH;
  if (!fd) return errno == ESRCH;
  pollfd p{fd.get(), POLLIN, 0};
  return retryEintr([&] { return ::poll(&p, 1, 0); }) > 0;
}
inline bool processDead(pid_t pid) noexcept {
  return processDead(pid, [](pid_t p) { return static_cast<int>(::syscall(SYS_pidfd_open, p, 0)); });
}

// Whether `fd` is an eventfd (the kernel's name of its file), for a
// descriptor a peer hands over as a doorbell: a pipe or a socket in its
// place would block a read that an eventfd never blocks (a doorbell is
// cleared without a poll first), a regular file would always read ready.
inline bool isEventfd(int fd) noexcept {
  char path[32];
  char target[32];
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  const ssize_t n = ::readlink(path, target, sizeof target - 1);
  if (n < 0) return false;
  target[n] = '\0';
  return std::string_view(target) == "anon_inode:[eventfd]";
}

}  // namespace forklift::detail
