#include "alloc_counter.hpp"

#include <cstdlib>
#include <new>

namespace forklift::test {
std::atomic<bool> g_counting{false};
std::atomic<long> g_allocs{0};
std::atomic<long> g_allocBytes{0};
}  // namespace forklift::test

void* operator new(std::size_t n) {
  if (forklift::test::g_counting.load(std::memory_order_relaxed)) {
    forklift::test::g_allocs.fetch_add(1, std::memory_order_relaxed);
    forklift::test::g_allocBytes.fetch_add(static_cast<long>(n), std::memory_order_relaxed);
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
