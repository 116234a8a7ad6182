#include "metrics.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>

#include "child.hpp"

namespace forklift::detail {

namespace {

MetricsPage g_private{};  // when no page can be published
std::atomic<MetricsPage*> g_page{nullptr};
std::atomic<pid_t> g_pagePid{0};
int g_pageFd = -1;  // touched only while making a page, by one thread at a time
ino_t g_pageIno = 0;  // g_pageFd's inode: the program may have closed and reused the number
std::atomic_flag g_making = ATOMIC_FLAG_INIT;

std::int64_t nowMs() noexcept {
  timespec ts{};
  // The coarse clock is read from the vDSO without a fence: a few ns.
  ::clock_gettime(CLOCK_REALTIME_COARSE, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

void copyText(char* dst, std::size_t cap, std::string_view text) noexcept {
  const std::size_t n = std::min(cap - 1, text.size());
  std::memcpy(dst, text.data(), n);
  dst[n] = '\0';
}

MetricsPage* makePage(pid_t pid) noexcept {
  // The inherited page is the parent's: let go of it (never unmapped, as
  // another thread of the parent could not be using it here, but a stale
  // pointer read by a racing count must stay valid).
  struct stat st {};
  if (g_pageFd >= 0 && ::fstat(g_pageFd, &st) == 0 && st.st_ino == g_pageIno) ::close(g_pageFd);
  g_pageFd = -1;
  MetricsPage* page = &g_private;
  const int fd = ::memfd_create(kMetricsLabel, MFD_CLOEXEC);
  if (fd >= 0 && ::ftruncate(fd, sizeof(MetricsPage)) == 0) {
    void* p = ::mmap(nullptr, sizeof(MetricsPage), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p != MAP_FAILED) {
      page = new (p) MetricsPage{};
      g_pageFd = fd;
      struct stat st {};
      g_pageIno = ::fstat(fd, &st) == 0 ? st.st_ino : 0;
    }
  }
  if (g_pageFd < 0 && fd >= 0) ::close(fd);
  if (page == &g_private) {
    // A private page of a forked child still holds the parent's counts.
    page->messagesIn = 0;
    page->messagesOut = 0;
    page->calls = 0;
    page->errors = 0;
    page->ringDrops = 0;
  }
  page->pid = pid;
  copyText(page->role, sizeof page->role, "frontend");
  page->lastActivityMs.store(nowMs(), std::memory_order_relaxed);
  page->version = kMetricsVersion;
  page->bytes = sizeof(MetricsPage);
  std::atomic_ref<std::uint64_t>(page->magic).store(kMetricsMagic, std::memory_order_release);
  return page;
}

}  // namespace

// Made when the library loads, not at the first message: a program's count
// of open descriptors then never changes under it.
[[maybe_unused]] static const bool g_publishedAtLoad = (metrics(), true);

MetricsPage& metrics() noexcept {
  const pid_t pid = currentPid();
  MetricsPage* page = g_page.load(std::memory_order_acquire);
  if (page != nullptr && g_pagePid.load(std::memory_order_relaxed) == pid) [[likely]]
    return *page;
  // First count in this process: one thread makes the page, the others
  // count privately until it is there (a count or two may go unpublished).
  if (g_making.test_and_set(std::memory_order_acquire)) return g_private;
  page = g_page.load(std::memory_order_acquire);
  if (page == nullptr || g_pagePid.load(std::memory_order_relaxed) != pid) {
    page = makePage(pid);
    g_page.store(page, std::memory_order_release);
    g_pagePid.store(pid, std::memory_order_release);
  }
  g_making.clear(std::memory_order_release);
  return *page;
}

void setMetricsIdentity(std::string_view role, std::string_view name) noexcept {
  MetricsPage& m = metrics();
  copyText(m.role, sizeof m.role, role);
  copyText(m.name, sizeof m.name, name);
}

void countMessageIn() noexcept {
  MetricsPage& m = metrics();
  m.messagesIn.fetch_add(1, std::memory_order_relaxed);
  m.lastActivityMs.store(nowMs(), std::memory_order_relaxed);
}

void countMessageOut() noexcept {
  MetricsPage& m = metrics();
  m.messagesOut.fetch_add(1, std::memory_order_relaxed);
  m.lastActivityMs.store(nowMs(), std::memory_order_relaxed);
}

}  // namespace forklift::detail
