// forklift - ForkServer: backends forked safely after threads have started
//
// A fork of a process that runs threads gets only the calling thread, and
// every lock another thread held stays locked in the child; so start()
// refuses to fork then (unless ProcessOptions::allowThreads). The fork
// server is Python's forkserver start method in C++: a small process forked
// while this one still runs a single thread, that stays single-threaded and
// forks backends on request, from then on, whatever threads this process
// starts.
//
// C++ cannot send code, so the server runs only what it has a copy of: it
// is a fork of this process, and it holds every MessageProcess object and
// every WorkerPool factory that existed when it started, as they were then.
// A start of such an object (or of a worker of such a pool) goes through the
// server whenever it runs: the server's child runs the server's copy of the
// object (a restart starts from the state the object had when the server
// started: nothing the frontend changed later reaches it) or makes the worker
// with the server's copy of the pool's factory. Everything else, an object
// made after the server started or a pool after WorkerPool::factoryChanged,
// is forked from this process as before: refused while other threads run,
// with an error saying why the server could not serve it.
//
// How to turn it on: make a `ForkServer` after the objects and pools and
// before the first thread, and keep it while backends may start.
// `Manager::runAsThread` does that itself before its thread exists (see
// Manager::Options::forkServer; it keeps it until stopThread). The handles
// share one server per process; once the last is released, the server ends
// as soon as every backend it forked has ended (at once when none runs). Its backends are watched, signalled and stopped as any other (their
// pidfds come from the server, their exit statuses are relayed by it).
//
// Deaths: the server dies with this process (PR_SET_PDEATHSIG and EOF on
// its socket) and its backends die with the server; a backend whose server
// died is reported ended with an Unknown status saying so, and a start that
// needs the dead server throws Error naming its death. It keeps what this
// process had open when it started (shared memory made before, which its
// backends inherit like directly forked ones), except the channels of the
// backends that ran then.
//
// Misuse: constructing the first handle while other threads run throws
// Error (the server itself must be forked single-threaded); a handle is
// released in the process that made it (a forked child's copy does nothing).
#pragma once

#include <sys/types.h>

namespace forklift {

class ForkServer {
 public:
  // Starts this process's fork server, or shares the running one (a dead
  // one is replaced). Throws Error when one must be started and other
  // threads run, SystemError when the fork or its socket fails.
  ForkServer();
  ~ForkServer();
  ForkServer(const ForkServer&) = delete;
  ForkServer& operator=(const ForkServer&) = delete;

  // A server runs and answers (false once it died).
  static bool running();
  // Its pid, or -1.
  static pid_t pid();

 private:
  pid_t owner_;
};

}  // namespace forklift
