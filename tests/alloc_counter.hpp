// Counts calls of the global operator new, and the bytes they ask for,
// while g_counting is set. The
// replacement operators live in their own translation unit so the compiler
// cannot inline them into the callers.
#pragma once

#include <atomic>

namespace forklift::test {
extern std::atomic<bool> g_counting;
extern std::atomic<long> g_allocs;
extern std::atomic<long> g_allocBytes;  // bytes asked for by those calls
}  // namespace forklift::test
