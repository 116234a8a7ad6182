// forklift - system calls that tests can replace (internal)
//
// STYLE 10: a call that tests must make fail (ENOSPC, a short write, ENOSYS)
// goes through a pointer here, set to the real call. Tests swap a pointer
// for the length of one test (ScopedSeam), while no other thread uses that
// call; the library never changes them. A forked child inherits the
// pointers as they were at fork, so a test's seam acts in its backends too.
//
// Every failure a seam can inject must come out as an error that names the
// operation ("cannot fork", "cannot open a pidfd", "cannot create channel
// socketpair", ...) and leave no process or descriptor behind.
#pragma once

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <utility>

namespace forklift::detail {

// Reserves a new segment's pages, with posix_fallocate's contract (returns
// 0 or an errno value). Defined in shm.cpp.
using ShmFallocateFn = int (*)(int fd, off_t offset, off_t len);
extern ShmFallocateFn shmFallocate;

// The other calls, with the contracts of their namesakes (-1 and errno on
// failure). Defined in seams.cpp.
struct Syscalls {
  pid_t (*fork)();
  int (*pidfdOpen)(pid_t pid, unsigned flags);
  int (*socketpair)(int domain, int type, int protocol, int sv[2]);
  int (*eventfd)(unsigned initval, int flags);
  ssize_t (*sendmsg)(int fd, const msghdr* msg, int flags);
  ssize_t (*recvmsg)(int fd, msghdr* msg, int flags);
  // Shared memory (shm.cpp): memfd_create makes an anonymous segment; every
  // segment, anonymous or named, created or opened (rings included), is
  // mapped through this mmap (MAP_FAILED and errno on failure).
  int (*memfdCreate)(const char* name, unsigned flags);
  int (*shmOpen)(const char* name, int oflag, mode_t mode);  // named segments
  void* (*mmap)(void* addr, size_t len, int prot, int flags, int fd, off_t off);
};
extern Syscalls syscalls;

// Swaps one pointer for the life of the object (tests).
template <class Fn>
class ScopedSeam {
 public:
  ScopedSeam(Fn& slot, Fn replacement) : slot_(slot), old_(std::exchange(slot, replacement)) {}
  ~ScopedSeam() { slot_ = old_; }
  ScopedSeam(const ScopedSeam&) = delete;
  ScopedSeam& operator=(const ScopedSeam&) = delete;

 private:
  Fn& slot_;
  Fn old_;
};

}  // namespace forklift::detail
