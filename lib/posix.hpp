// forklift - small POSIX helpers shared by the library (internal)
//
// `throwErrno` turns errno into the SystemError of the API edge.
// `retryEintr` is the one retry loop for system calls interrupted by a
// signal (never used for close: see detail/fd.hpp). `waitFor` is the one
// bounded poll of a single descriptor that channels, the backend loop's
// output queue, events and the reaper share.
#pragma once

#include <poll.h>

#include <cerrno>
#include <string>

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

}  // namespace forklift::detail
