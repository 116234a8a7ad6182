// STUB until the ci branch lands.
#pragma once
#include <dirent.h>
#include <unistd.h>
namespace forklift::detail {
inline int otherThreads() {
  int n = 0;
  for (int i = 0; i < 20; ++i) {
    n = 0;
    if (DIR* d = ::opendir("/proc/self/task")) {
      while (dirent* e = ::readdir(d))
        if (e->d_name[0] != '.') ++n;
      ::closedir(d);
    }
    if (n <= 1) break;
    ::usleep(500);
  }
  return n - 1;
}
}  // namespace forklift::detail
