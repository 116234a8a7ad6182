// forklift - an owned file descriptor (internal)
//
// `UniqueFd` owns one descriptor. The empty state is -1. Move-only; the
// destructor closes without retrying on EINTR (Linux has released the
// descriptor even when close reports EINTR, and a retry could close a
// descriptor another thread just got).
//
// `waitFor` is the one bounded poll of a single descriptor that channels,
// the backend loop's output queue and the process reaper share.
#pragma once

#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <utility>

#include "forklift/error.hpp"
#include "forklift/timeout.hpp"

namespace forklift::detail {

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  explicit operator bool() const noexcept { return valid(); }
  int release() noexcept { return std::exchange(fd_, -1); }
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

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
