#include "threads.hpp"

#include <dirent.h>
#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)  // gcc
#define FORKLIFT_TSAN 1
#elif defined(__has_feature)  // clang
#if __has_feature(thread_sanitizer)
#define FORKLIFT_TSAN 1
#endif
#endif

namespace forklift::detail {

namespace {

// The sanitizer's own thread, 0 when there is none or it is not known.
std::atomic<pid_t> g_sanitizerTid{0};

template <class Fn>
void forEachThread(Fn fn) {
  std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir("/proc/self/task"), ::closedir);
  if (!dir) return;
  while (const dirent* e = ::readdir(dir.get()))
    if (e->d_name[0] != '.') fn(static_cast<pid_t>(std::atoi(e->d_name)));
}

#ifdef FORKLIFT_TSAN

std::vector<pid_t> listThreads() {
  std::vector<pid_t> tids;
  forEachThread([&](pid_t tid) { tids.push_back(tid); });
  return tids;
}

// TSan starts its thread on the first pthread_create: create one, and take
// the thread that appeared and is not the one just joined (a joined thread
// can stay listed for a moment).
pid_t startSanitizerThread() {
  const std::vector<pid_t> before = listThreads();
  pid_t joined = 0;
  std::thread([&joined] { joined = ::gettid(); }).join();
  pid_t found = 0;
  for (pid_t tid : listThreads()) {
    bool old = tid == joined;
    for (pid_t b : before) old = old || tid == b;
    if (!old) found = tid;
  }
  return found;
}

// Only the forking thread survives fork, and TSan's child handler
// (registered when TSan started, so it runs before this one) has started
// its thread again, unless the parent ran other threads: then it has not.
void findSanitizerThreadInChild() {
  const pid_t self = ::gettid();
  pid_t found = 0;
  forEachThread([&](pid_t tid) {
    if (tid != self) found = tid;
  });
  g_sanitizerTid.store(found, std::memory_order_relaxed);
}

[[maybe_unused]] const bool g_sanitizerThreadKnown = [] {
  g_sanitizerTid.store(startSanitizerThread(), std::memory_order_relaxed);
  ::pthread_atfork(nullptr, nullptr, findSanitizerThreadInChild);
  return true;
}();

#endif  // FORKLIFT_TSAN

}  // namespace

std::atomic<pid_t> g_forkerTid{0};

int countUserThreads() {
  const pid_t skip = g_sanitizerTid.load(std::memory_order_relaxed);
  const pid_t forker = g_forkerTid.load(std::memory_order_relaxed);
  int n = 0;
  forEachThread([&](pid_t tid) {
    if (tid != skip && tid != forker) ++n;
  });
  return n;
}

void setForkerThread(pid_t tid) noexcept { g_forkerTid.store(tid, std::memory_order_relaxed); }

}  // namespace forklift::detail
