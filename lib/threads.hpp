// forklift - how many threads this process runs (internal)
//
// `MessageProcess::start()` refuses to fork while other threads run, because
// the child gets only the calling thread and every lock another thread holds
// stays locked. `countUserThreads()` is the count that check needs: the
// threads listed in /proc/self/task, minus the one background thread that
// ThreadSanitizer runs for itself (TSan makes its own state fork-safe, and
// without this every fork after the first thread would be refused).
//
// TSan's thread has no name of its own, and its signal mask is the one a
// user thread gets by blocking every signal, so it is recognised by its tid:
// in a TSan build this unit makes TSan start that thread while the library
// loads (by starting and joining a thread that does nothing) and records the
// thread that appeared; in a forked child it records the thread that TSan's
// fork handler, which runs before this unit's, has started again. If TSan's
// thread was already running when forklift loaded (a thread started by an
// earlier static initializer, or forklift loaded later by dlopen), it is not
// recognised and is counted like any other: start() then refuses with its
// usual error. Builds without TSan count every thread.
//
// forklift's own forking thread (see child.cpp) is not counted either: it
// holds no lock while it waits for work, so a fork from another thread
// cannot catch it holding one.
//
// Any thread may call it. It returns 0 when /proc/self/task cannot be read
// (no /proc mounted): the caller cannot tell then.
#pragma once

#include <sys/types.h>

namespace forklift::detail {

int countUserThreads();

// Leaves thread `tid` out of the count (0: none).
void setForkerThread(pid_t tid) noexcept;

}  // namespace forklift::detail
