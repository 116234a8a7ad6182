#include "seams.hpp"

#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace forklift::detail {

namespace {

// glibc 2.36's <sys/pidfd.h> lacks C linkage for C++; the raw system call
// is as simple.
int pidfdOpenReal(pid_t pid, unsigned flags) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, flags)); }
int eventfdReal(unsigned initval, int flags) { return ::eventfd(initval, flags); }
int memfdCreateReal(const char* name, unsigned flags) { return ::memfd_create(name, flags); }

}  // namespace

Syscalls syscalls = {
    &::fork, &pidfdOpenReal, &::socketpair, &eventfdReal, &::sendmsg, &::recvmsg, &memfdCreateReal, &::shm_open, &::mmap,
};

}  // namespace forklift::detail
