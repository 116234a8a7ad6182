// forklift - system calls that tests can replace (internal)
//
// STYLE 10: a call that tests must make fail (ENOSPC, a short write, ENOSYS)
// goes through a pointer here, set to the real call. Tests swap a pointer
// for the length of one test, while no other thread uses that call; the
// library never changes them.
#pragma once

#include <sys/types.h>

namespace forklift::detail {

// Reserves a new segment's pages, with posix_fallocate's contract (returns
// 0 or an errno value).
using ShmFallocateFn = int (*)(int fd, off_t offset, off_t len);
extern ShmFallocateFn shmFallocate;

}  // namespace forklift::detail
