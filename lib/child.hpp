// forklift - the life of one backend: start, set-up, reaping, escalation (internal)
//
// `Child` owns one backend from its start to its reaping, whatever runs it:
// a forked process (the normal case) or a thread of the frontend (the
// in-process debug mode). The strategy is chosen once, in `Child::start`;
// nothing outside this unit asks which one runs.
//
// A third strategy serves the start from the fork server (fork_server.hpp):
// when the process runs one that holds a copy of the recipe (`served`), the
// server forks the child and relays its status; the frontend holds the
// pidfd the server opened (or its death pipe), so waits, signals and the
// ladder work on it unchanged.
//
// Forked children are set up here and nowhere else: signals stay blocked
// across the fork (so no handler of the frontend runs in the child before
// its dispositions are reset, as libuv does), dispositions go back to their
// defaults, the child dies with its parent (PR_SET_PDEATHSIG, checked
// against the race with the parent's own exit), the frontend ends of the
// other backends' channels are closed (`FrontendFds`), and the process
// gets its title. No lock of the frontend is held across the fork.
//
// Reaping is serialised: the status is read once, by whichever thread gets
// there first, and every later caller gets the same answer. A status that
// cannot be known (the child was reaped elsewhere: SIGCHLD ignored, or a
// handler of the user's that calls wait) is reported as How::Unknown, never
// invented.
//
// `stopChildren` is the one escalation ladder (request, wait, SIGTERM, wait,
// SIGKILL, wait), used by MessageProcess::stop for one backend and by the
// Manager for all its workers against one deadline.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/exit_status.hpp"
#include "forklift/timeout.hpp"

namespace spdlog {
class logger;
}

namespace forklift::detail {

// The frontend ends of every running backend's channels in this process. A
// newly forked backend closes them all: it must not hold another backend's
// channel open, or that backend would never see EOF when the frontend dies.
// The list is exact: a descriptor is added when its channel is made and
// removed when it is closed, and a child clears the list it inherited.
namespace frontend_fds {
void add(std::initializer_list<int> fds);
void remove(std::initializer_list<int> fds);
// The registry as it is now (tests: nothing stale after a failed start).
std::vector<int> snapshot();
}  // namespace frontend_fds

// The frontend's shared-memory queues of every running backend, mapped
// MADV_DONTFORK so that backends forked later do not inherit them. Under
// valgrind a newly forked backend also unmaps these ranges (where the
// kernel mapped nothing; elsewhere a runtime may have mapped something new
// there since the fork, so it does not):
// valgrind knows no MADV_DONTFORK and would otherwise take the ranges for
// mapped memory of the child, and its leak check at the child's exit then
// faults once per 8-byte word of every earlier backend's queues (seconds per
// backend, growing with their number). Exact like the list above.
namespace frontend_maps {
// Records [base, base+bytes); false when it could not (out of memory).
bool add(void* base, std::size_t bytes) noexcept;
void remove(void* base) noexcept;
// The ranges listed now, as {base, bytes} (tests).
std::vector<std::pair<std::uintptr_t, std::size_t>> snapshot();
}  // namespace frontend_maps

// This process's pid, cached (and renewed in a forked child).
pid_t currentPid() noexcept;

// Where pidfds are missing (kernels before 5.3, sandboxes that refuse
// pidfd_open, valgrind), a forked child is watched through a death pipe
// instead: it holds the only write end, and the frontend's read end hangs up
// when it dies. Tests force that way here (set it while no backend starts).
void useDeathPipeForTests(bool on) noexcept;

// What the fork server needs to start a backend instead of a fork of this
// process: the recipe it runs (fork_server.hpp) and the child's ends of its
// descriptors (they travel with SCM_RIGHTS; the caller still owns them).
struct ServedStart {
  std::uint64_t recipe = 0;
  std::uint64_t arg = 0;
  int cmdFd = -1;
  int outFd = -1;
  int bellFd = -1;
  std::string payload;  // for the served child (fork_server.hpp, "Payloads")
};

struct ChildSetup {
  std::string comm;          // 15 characters of /proc/pid/comm
  std::string title;         // what ps -o args shows
  // The backend ignores SIGINT, and SIGTERM from anyone but its parent and
  // `termFrom`: a signal to the whole process group reaches the frontend
  // too, which stops its backends in order (see setUpChild).
  bool ignoreSigint = false;
  pid_t termFrom = 0;        // a served child's frontend (the fork server's parent)
  bool inProcess = false;    // run the body in a thread instead
  bool allowThreads = false; // fork although other threads run
  // A start through the fork server waits for its answer until then.
  Deadline startBy{kForever};
  // Served by the fork server when one runs that knows the recipe; else
  // `body` runs in a fork of this process.
  std::optional<ServedStart> served;
};

// Threads of this process besides the caller (and forklift's forking thread).
int otherThreads();

// Whether pidfds work here (false where they are missing, or forced off).
bool pidfdsWork();

// Forks a child that is set up as every backend is, then leaves with
// _exit(body()). `deathWrite` is the write end of its death pipe (-1 with
// pidfds; the child keeps it, the caller closes its copy); the child closes
// `closeInChild` (the pipe's read end, or -1) first. Returns the pid,
// or -1 and errno. Forks on forklift's forking thread when called from
// another thread than the main one. No thread check: the caller's.
pid_t forkBackend(const ChildSetup& setup, const std::function<int()>& body, int deathWrite, int closeInChild = -1);

class Child {
 public:
  // Runs `body` in a forked child (it leaves with _exit(body())) or in a
  // thread. Throws Error when forking is refused (other threads run), and
  // SystemError when the fork or its pidfd fails (nothing is left behind).
  // `log` gives the logger for the warning of a fork with allowThreads;
  // called only then (making a logger costs more than the rest of a
  // start's frontend work before the fork).
  static std::unique_ptr<Child> start(const ChildSetup& setup, std::function<int()> body,
                                      const std::function<spdlog::logger&()>& log);

  // True when a start naming `recipe` would go through the fork server now.
  static bool wouldServe(std::uint64_t recipe);

  virtual ~Child() = default;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  virtual pid_t pid() const noexcept = 0;  // -1 for a thread
  bool forked() const noexcept { return pid() > 0; }
  // Readable once the child has ended: a pidfd, or an eventfd for a thread.
  virtual int deathFd() const noexcept = 0;

  // How it ended, reaping it when it has; nullopt while it runs. A served
  // child's status is relayed by the fork server: poll() waits up to
  // kRelayWait for it (part of the ladder's kill grace), poll(statusBy)
  // until `statusBy`; a status not relayed by then is Unknown, and is not
  // kept (a later poll may still get the real one).
  std::optional<ExitStatus> poll();
  std::optional<ExitStatus> poll(const Deadline& statusBy);
  static constexpr Timeout kRelayWait = std::chrono::seconds(5);
  // Waits up to `timeout` for the end; How::Running when it did not.
  ExitStatus wait(Timeout timeout);
  // The same against a deadline that bounds the status's relay too: for
  // waits on behalf of a caller's timeout (a call that saw the channel end).
  ExitStatus waitWithin(const Deadline& d);
  bool ended() { return poll().has_value(); }

  // Sends a signal (no effect on a thread or an ended child). SIGTERM and
  // SIGKILL are recorded as escalation in the status.
  void signal(int sig);
  // Gives up on a thread that does not end (status Abandoned); a forked
  // child is killed instead, so this does nothing for one.
  void abandon();

 protected:
  Child() = default;
  // Reads the status of an ended child, once (the caller holds reapMutex_);
  // nullopt when it did not come by `statusBy` (a served child's relay).
  virtual std::optional<ExitStatus> reapEnded(const Deadline& statusBy) = 0;
  virtual void sendSignal(int sig) = 0;
  virtual bool detachThread() { return false; }

  std::atomic<int> escalation_{0};

 private:
  std::mutex reapMutex_;
  std::optional<ExitStatus> status_;  // guarded by reapMutex_
};

// The ladder. Every child in `children` has been asked to stop (or is about
// to end by itself). Waits up to `grace` for all of them against one
// deadline, then sends SIGTERM to those still running and waits `termGrace`,
// then SIGKILL and `killGrace`. Thread children cannot be signalled: they
// are abandoned after `grace`. `onEscalate(child, sig)` is told before each
// signal (for the log). Returns when every child ended or the ladder ran
// out; each child's status is then in `poll()`.
struct Ladder {
  Timeout grace;
  Timeout termGrace = std::chrono::milliseconds(500);
  Timeout killGrace = std::chrono::seconds(5);
};
void stopChildren(std::span<Child* const> children, const Ladder& ladder,
                  const std::function<void(Child&, int sig)>& onEscalate);

}  // namespace forklift::detail
