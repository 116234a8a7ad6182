// Counts calls of the global operator new while g_counting is set. The
// replacement operators live in their own translation unit so the compiler
// cannot inline them into the callers.
#pragma once

#include <atomic>

namespace forklift::test {
extern std::atomic<bool> g_counting;
extern std::atomic<long> g_allocs;
}  // namespace forklift::test
