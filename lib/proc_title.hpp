// forklift - the backend's name in `ps -o args` and htop, not only in comm
//
// `setProcessTitle(comm, title)` is for a freshly forked backend: it sets the
// 15-character comm (prctl PR_SET_NAME; `ps -o comm`, `top`) and rewrites the
// argv area so /proc/self/cmdline, which `ps -o args` and htop show, reads
// `title`. The technique is setproctitle's and PostgreSQL's: the kernel
// placed the argv strings and then the environ strings back to back; that
// memory is overwritten. Before anything is written, every string the process
// can still reach through a pointer into it is copied to the heap:
// program_invocation_name and _short_name, main's argv array (found through
// /proc/self/stat's startstack), and, only when the title does not fit in
// the argv strings alone, the environ strings (`environ` becomes a heap
// array, so getenv/setenv keep working). A pointer an earlier getenv
// returned, kept by someone, is the one thing that cannot be redirected;
// that is why the environ area is used only when needed.
//
// The title is cut to fit the area and one page (the most the kernel shows).
// The area is trusted only when program_invocation_name, /proc/self/cmdline
// and /proc/self/stat (arg_start..env_end) agree -- or, in a child forked
// after prepareProcessTitle (below), when program_invocation_name is at the
// kernel's arg_start and the argv strings end exactly at its arg_end, read
// from memory without opening /proc; otherwise, or when an allocation
// fails, only comm is set. The function never throws and never
// crashes the process over a title.
//
// Call it only while the process has one thread (right after fork): it
// replaces `environ`, which another thread's getenv could be reading. A
// second call (say, in a backend's own backend, forked from one that already
// set its title) reuses the area found by the first.
#pragma once

#include <string>

namespace forklift::detail {

void setProcessTitle(const std::string& comm, const std::string& title) noexcept;

// Before a fork, in the process that forks: reads the kernel's bounds of
// the area (/proc/self/stat) once per process, so that setProcessTitle in
// every child forked from then on opens nothing (a child that lowered its
// descriptor limit to what it holds still gets its title). Thread-safe; a
// no-op after the first call and in a process whose title was set.
void prepareProcessTitle() noexcept;

// For tests: how the argv+environ area is found. `procStat` is what
// setProcessTitle uses; `walkStrings` is its fallback when /proc/self/stat
// does not show the area (it follows the environ strings from the end of
// /proc/self/cmdline instead).
enum class TitleAreaSource { procStat, walkStrings };
void setProcessTitle(const std::string& comm, const std::string& title, TitleAreaSource source) noexcept;

}  // namespace forklift::detail
