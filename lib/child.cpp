#include "child.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/single_threaded.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <spdlog/logger.h>
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define FORKLIFT_ON_VALGRIND() (RUNNING_ON_VALGRIND != 0)
#else
#define FORKLIFT_ON_VALGRIND() false
#endif

#include "forklift/error.hpp"
#include "fork_server.hpp"
#include "metrics.hpp"
#include "posix.hpp"
#include "proc_title.hpp"
#include "seams.hpp"
#include "threads.hpp"

namespace forklift {

// ---------------------------------------------------------------- ExitStatus

namespace {

std::string signalName(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

const char* exitCodeMeaning(int code) {
  switch (code) {
    case kExitPreRunFailed: return "preRun__ failed";
    case kExitPostRunFailed: return "postRun__ failed";
    case kExitBackendFailed: return "the backend failed";
    case kExitCorruptStream: return "the command stream was corrupt";
    case kExitOutOfDescriptors: return "out of file descriptors";
    default: return nullptr;
  }
}

}  // namespace

std::string ExitStatus::describe() const {
  std::string s;
  switch (how) {
    case How::Running: return "still running";
    case How::NotStarted: return "not started";
    case How::Abandoned: return "stuck in-process backend thread abandoned";
    case How::Unknown:
      s = serverLost ? "ended with an unknown status (its fork server died first, and its death kills every "
                       "backend it forked)"
                     : "ended with an unknown status (reaped elsewhere: is SIGCHLD ignored?)";
      break;
    case How::Exited:
      s = "exited with code " + std::to_string(code);
      if (const char* m = exitCodeMeaning(code)) s = s + " (" + m + ")";
      break;
    case How::Signaled: s = "killed by " + signalName(signal); break;
  }
  if (escalation == 1) s += " (after SIGTERM)";
  if (escalation == 2) s += " (after SIGKILL)";
  return s;
}

namespace detail {

// ---------------------------------------------------------------- frontend descriptors

namespace {

std::mutex g_fdsMutex;
std::vector<int> g_frontendFds;  // guarded by g_fdsMutex
struct Range {
  void* base;
  std::size_t bytes;
};
std::vector<Range> g_frontendMaps;  // guarded by g_fdsMutex

}  // namespace

namespace frontend_fds {

void add(std::initializer_list<int> fds) {
  std::lock_guard lock(g_fdsMutex);
  for (int fd : fds)
    if (fd >= 0) g_frontendFds.push_back(fd);
}

void remove(std::initializer_list<int> fds) {
  std::lock_guard lock(g_fdsMutex);
  for (int fd : fds)
    if (fd >= 0) std::erase(g_frontendFds, fd);
}

std::vector<int> snapshot() {
  std::lock_guard lock(g_fdsMutex);
  return g_frontendFds;
}

}  // namespace frontend_fds

namespace frontend_maps {

bool add(void* base, std::size_t bytes) noexcept {
  std::lock_guard lock(g_fdsMutex);
  try {
    g_frontendMaps.push_back({base, bytes});
    return true;
  } catch (const std::bad_alloc&) {
    return false;
  }
}

void remove(void* base) noexcept {
  std::lock_guard lock(g_fdsMutex);
  std::erase_if(g_frontendMaps, [base](const Range& r) { return r.base == base; });
}

std::vector<std::pair<std::uintptr_t, std::size_t>> snapshot() {
  std::lock_guard lock(g_fdsMutex);
  std::vector<std::pair<std::uintptr_t, std::size_t>> out;
  for (const Range& r : g_frontendMaps) out.emplace_back(reinterpret_cast<std::uintptr_t>(r.base), r.bytes);
  return out;
}

}  // namespace frontend_maps

// ---------------------------------------------------------------- pid

namespace {

std::atomic<pid_t> g_pid{0};

}  // namespace

pid_t currentPid() noexcept {
  static const bool renewed = [] {
    // Any fork through libc (ours or the user's) renews the cache.
    ::pthread_atfork(nullptr, nullptr, [] { g_pid = ::getpid(); });
    return true;
  }();
  (void)renewed;
  pid_t p = g_pid.load(std::memory_order_relaxed);
  if (p == 0) {
    p = ::getpid();
    g_pid = p;
  }
  return p;
}

// ---------------------------------------------------------------- status

std::optional<ExitStatus> Child::poll() { return poll(Deadline(kRelayWait)); }

std::optional<ExitStatus> Child::poll(const Deadline& statusBy) {
  std::lock_guard lock(reapMutex_);
  if (status_) return status_;
  if (!waitFor(deathFd(), POLLIN, Deadline(Timeout::zero()))) return std::nullopt;
  std::optional<ExitStatus> s = reapEnded(statusBy);
  if (!s) {
    ExitStatus unknown{ExitStatus::How::Unknown};
    unknown.escalation = escalation_;
    return unknown;  // not kept: the relay may still come
  }
  s->escalation = escalation_;
  status_ = s;
  return status_;
}

ExitStatus Child::wait(Timeout timeout) {
  if (auto s = poll()) return *s;
  // Any number of threads may wait on the descriptor at once; only the
  // reaping itself is serialised (in poll).
  if (!waitFor(deathFd(), POLLIN, Deadline(timeout))) {
    if (auto s = poll()) return *s;  // abandoned meanwhile
    return ExitStatus{ExitStatus::How::Running};
  }
  if (auto s = poll()) return *s;
  return ExitStatus{ExitStatus::How::Running};
}

ExitStatus Child::waitWithin(const Deadline& d) {
  if (auto s = poll(d)) return *s;
  if (!waitFor(deathFd(), POLLIN, d)) {
    if (auto s = poll(d)) return *s;
    return ExitStatus{ExitStatus::How::Running};
  }
  if (auto s = poll(d)) return *s;
  return ExitStatus{ExitStatus::How::Running};
}

void Child::signal(int sig) {
  if (poll()) return;
  if (sig == SIGTERM) {
    int cur = escalation_;
    while (cur < 1 && !escalation_.compare_exchange_weak(cur, 1)) {
    }
  }
  if (sig == SIGKILL) escalation_ = 2;
  sendSignal(sig);
}

void Child::abandon() {
  std::lock_guard lock(reapMutex_);
  if (status_) return;
  if (detachThread()) status_ = ExitStatus{ExitStatus::How::Abandoned};
}

// ---------------------------------------------------------------- fork

namespace {
std::atomic<bool> g_forceDeathPipe{false};
}  // namespace

// Whether this kernel (or sandbox, or valgrind) gives pidfds. Asked at
// every fork (one cheap system call), so a seam a test swaps acts at once.
bool pidfdsWork() {
  if (g_forceDeathPipe.load(std::memory_order_relaxed)) return false;
  UniqueFd self(syscalls.pidfdOpen(::getpid(), 0));
  return self.valid() || (errno != ENOSYS && errno != EPERM);
}

// Threads besides the caller. A thread that was just joined can stay listed
// for a moment while the kernel finishes its exit: look again briefly.
// glibc clears __libc_single_threaded at the first pthread_create and never
// sets it again in this process: while it is set no thread was ever made
// (short of a raw clone, which glibc does not support either), and the
// walk of /proc/self/task (a descriptor, five system calls: 9-15 us before
// each fork on this machine) is not needed.
int otherThreads() {
  if (__libc_single_threaded) return 0;
  int n = countUserThreads() - 1;
  for (int i = 0; n > 0 && i < 20; ++i) {
    ::usleep(500);
    n = countUserThreads() - 1;
  }
  return n;
}

namespace {

// glibc 2.36's <sys/pidfd.h> lacks C linkage for C++; the raw system call
// is as simple (pidfd_open is in seams.cpp).
int pidfdSignal(int pidfd, int sig) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

// glibc 2.36's idtype_t has no P_PIDFD yet (and <linux/wait.h> clashes
// with <sys/wait.h>); the kernel's number is 3.
const idtype_t kPidfd = static_cast<idtype_t>(3);

ExitStatus statusFromSiginfo(const siginfo_t& info) {
  ExitStatus s;
  if (info.si_code == CLD_EXITED) {
    s.how = ExitStatus::How::Exited;
    s.code = info.si_status;
  } else {
    s.how = ExitStatus::How::Signaled;
    s.signal = info.si_status;
  }
  return s;
}

// `deathFd` is the child's pidfd, or, where pidfds are missing, the read
// end of a pipe whose only write end the child holds: the kernel closes it
// when the child dies, and the read end reports POLLHUP.
class ForkedChild final : public Child {
 public:
  ForkedChild(pid_t pid, UniqueFd deathFd, bool isPidfd)
      : pid_(pid), pidfd_(std::move(deathFd)), isPidfd_(isPidfd) {
    frontend_fds::add({pidfd_.get()});
  }
  ~ForkedChild() override {
    frontend_fds::remove({pidfd_.get()});
    // A child that was never reaped would stay a zombie: the owner always
    // stops it first, so this only runs for one that ended.
    poll();
  }
  pid_t pid() const noexcept override { return pid_; }
  int deathFd() const noexcept override { return pidfd_.get(); }

 private:
  std::optional<ExitStatus> reapEnded(const Deadline&) override {
    siginfo_t info{};
    // By pidfd, not by pid: a pid reaped elsewhere can be reused, even by
    // another child of ours.
    int r = isPidfd_ ? retryEintr([&] { return ::waitid(kPidfd, static_cast<id_t>(pidfd_.get()), &info, WEXITED); })
                     : (errno = EINVAL, -1);
    if (r < 0 && errno == EINVAL) {
      // Kernels before 5.4 know no P_PIDFD; the pid is still ours while
      // it is a zombie.
      r = retryEintr([&] { return ::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED); });
    }
    if (r < 0 || info.si_pid == 0) return ExitStatus{ExitStatus::How::Unknown};
    return statusFromSiginfo(info);
  }
  // By pid only without a pidfd: a pid is ours until we reap it.
  void sendSignal(int sig) override {
    if (isPidfd_) pidfdSignal(pidfd_.get(), sig);
    else ::kill(pid_, sig);
  }

  pid_t pid_;
  UniqueFd pidfd_;
  bool isPidfd_;
};

// What a child inherits from the frontend's signal setup: handlers (they
// point into frontend logic) and ignored signals go back to the defaults.
// Asking first and writing only what differs is the cheapest way to know,
// and most signals need no write.
void resetSignals() {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    struct sigaction old {};
    if (::sigaction(sig, nullptr, &old) != 0) continue;  // reserved numbers
    if (old.sa_handler != SIG_DFL) ::sigaction(sig, &dfl, nullptr);
  }
}

// The pids whose SIGTERM a backend that leaves its stopping to its
// frontend obeys: its parent, and a served child's frontend (it signals
// through a pidfd). SIGTERM from anyone else -- a service manager or a
// terminal signalling the whole process group, which reaches the frontend
// too -- is ignored: the frontend stops its backends in order, as for
// Ctrl-C, instead of finding them dead (and a pool replacing them).
pid_t g_termFrom[2] = {0, 0};

void onGroupSigterm(int, siginfo_t* info, void*) {
  const pid_t from = info ? info->si_pid : 0;
  if (from == 0 || (from != g_termFrom[0] && from != g_termFrom[1])) return;
  // Obeyed: the default action, once this handler returns (SIGTERM is
  // blocked while it runs). Both calls are async-signal-safe.
  ::signal(SIGTERM, SIG_DFL);
  ::raise(SIGTERM);
}

// Runs in the child, signals still blocked, before anything else.
// `deathWrite`: the write end of its death pipe (-1 with pidfds).
void setUpChild(const ChildSetup& setup, pid_t parent, int deathWrite) {
  // The parent may have died between fork and prctl: then nobody would
  // send the death signal.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
  resetSignals();
  if (setup.ignoreSigint) {
    ::signal(SIGINT, SIG_IGN);
    g_termFrom[0] = parent;
    g_termFrom[1] = setup.termFrom;
    struct sigaction term {};
    term.sa_sigaction = onGroupSigterm;
    term.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&term.sa_mask);
    ::sigaction(SIGTERM, &term, nullptr);
  }
  // Other backends' channels, inherited through fork. The list is cleared
  // too: the numbers are free again here and will be reused.
  for (int fd : g_frontendFds) ::close(fd);
  g_frontendFds.clear();
  // Its own death pipe stays open here but must not outlive it in its own
  // children: listed, they close it like any frontend descriptor.
  if (deathWrite >= 0) g_frontendFds.push_back(deathWrite);
  // Other backends' queues: MADV_DONTFORK kept them out of this process
  // already; unmapping the empty ranges tells valgrind so (see frontend_maps).
  // Only under valgrind, which keeps the ranges for itself: elsewhere a
  // range is a hole here, and a runtime's mapping made since the fork (a
  // sanitizer's, a large malloc in an atfork handler) may sit in it by now;
  // unmapping it crashed a starting worker under ThreadSanitizer.
  if (FORKLIFT_ON_VALGRIND())
    for (const Range& r : g_frontendMaps) ::munmap(r.base, r.bytes);
  g_frontendMaps.clear();
  setProcessTitle(setup.comm, setup.title);
  setMetricsIdentity("backend", setup.title);
  sigset_t none;
  sigemptyset(&none);
  ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
}

[[noreturn]] void runChildBody(const std::function<int()>& body, const std::string& who) {
  int code = kExitBackendFailed;
  try {
    code = body();
  } catch (const SystemError& e) {
    std::fprintf(stderr, "%s: backend failed: %s\n", who.c_str(), e.what());
    if (e.code().value() == EMFILE) code = kExitOutOfDescriptors;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: backend failed: %s\n", who.c_str(), e.what());
  } catch (...) {
    std::fprintf(stderr, "%s: backend failed with a non-standard exception\n", who.c_str());
  }
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);  // _exit does not flush stdio
  ::_exit(code);
}

// Forks on behalf of threads other than the main one (see startForked). Its
// thread waits, holding no lock, with every signal blocked; it is left out
// of the thread count, so forks from the main thread are not refused
// because of it. A forked child starts without it (it is the only thread
// there, and the main one).
class Forker {
 public:
  static Forker& instance() {
    static Forker* f = [] {
      auto* forker = new Forker;  // never destroyed: the thread may outlive static destructors
      ::pthread_atfork(nullptr, nullptr, [] { instance().resetInChild(); });
      return forker;
    }();
    return *f;
  }

  // Runs `job` on the forking thread and returns its result, with errno.
  pid_t run(const std::function<pid_t()>& job) {
    std::unique_lock lock(mutex_);
    if (!started_) start();
    jobDone_.wait(lock, [&] { return job_ == nullptr && finished_ == nullptr; });  // one fork at a time
    job_ = &job;
    hasJob_.notify_all();
    jobDone_.wait(lock, [&] { return finished_ == &job; });
    finished_ = nullptr;
    jobDone_.notify_all();
    errno = err_;
    return result_;
  }

 private:
  void start() {
    sigset_t all, old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);  // the thread inherits this mask
    std::thread([this] { loop(); }).detach();
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    started_ = true;
  }
  void loop() {
    setForkerThread(::gettid());
    std::unique_lock lock(mutex_);
    for (;;) {
      hasJob_.wait(lock, [&] { return job_ != nullptr; });
      const std::function<pid_t()>* job = job_;
      lock.unlock();
      const pid_t pid = (*job)();  // the child never comes back
      const int err = errno;
      lock.lock();
      result_ = pid;
      err_ = err;
      finished_ = job;
      job_ = nullptr;
      jobDone_.notify_all();
    }
  }
  // The child has no forking thread: the next fork from a thread starts one.
  void resetInChild() {
    new (&mutex_) std::mutex;
    new (&hasJob_) std::condition_variable;
    new (&jobDone_) std::condition_variable;
    started_ = false;
    job_ = nullptr;
    finished_ = nullptr;
    setForkerThread(0);
  }

  std::mutex mutex_;
  std::condition_variable hasJob_, jobDone_;
  bool started_ = false;
  const std::function<pid_t()>* job_ = nullptr;
  const std::function<pid_t()>* finished_ = nullptr;
  pid_t result_ = -1;
  int err_ = 0;
};

}  // namespace

pid_t forkBackend(const ChildSetup& setup, const std::function<int()>& body, int deathWrite, int closeInChild) {
  prepareProcessTitle();  // once per process: the child then reads no /proc for its title
  std::fflush(nullptr);  // or the child would flush the frontend's buffered output a second time
  std::cout.flush();
  const pid_t parent = ::getpid();
  // Never returns in the child; in the parent, the pid (or -1 and errno).
  auto forkHere = [&]() -> pid_t {
    // Signals stay blocked across the fork: a handler of the frontend must
    // not run in the child before its dispositions are reset.
    sigset_t all;
    sigset_t old;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid;
    {
      // The registry's lock is held by this thread across the fork, so the
      // child inherits it unlocked-by-nobody-else and can use the list.
      std::lock_guard lock(g_fdsMutex);
      pid = syscalls.fork();
      if (pid == 0) {
        if (closeInChild >= 0) ::close(closeInChild);
        setUpChild(setup, parent, deathWrite);
      }
    }
    if (pid == 0) runChildBody(body, setup.title);
    const int forkErr = errno;
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    errno = forkErr;
    return pid;
  };
  // PR_SET_PDEATHSIG fires when the forking *thread* ends: a thread other
  // than the main one hands the fork to forklift's forking thread, which
  // lives as long as the process.
  return ::gettid() == parent ? forkHere() : Forker::instance().run(forkHere);
}

namespace {

std::unique_ptr<Child> startForked(const ChildSetup& setup, const std::function<int()>& body,
                                   const std::function<spdlog::logger&()>& log,
                                   const std::string& whyNotServed) {
  const int threads = otherThreads();
  if (threads > 0) {
    if (!setup.allowThreads)
      throw Error(setup.title + ": cannot fork: this process already runs " + std::to_string(threads + 1) +
                  " threads, and a forked child gets only the calling one (locks held by the others stay "
                  "locked forever). The fork server cannot start it either: " + whyNotServed +
                  ". Make the object (or the pool) before a forklift::ForkServer starts (Manager::runAsThread "
                  "starts one) and start that before any thread; or start forklift processes before starting "
                  "threads, or set ProcessOptions::allowThreads if you know every thread is fork-safe.");
    if (log)
      log().warn("forking while {} other threads run (allowThreads is set): the child gets only this thread; "
                "any lock another thread held at fork stays locked in the child",
                threads);
  }
  // Without pidfds, the death pipe: made before the fork, so the child
  // holds the only write end once this side closes its copy.
  UniqueFd deathRead, deathWrite;
  if (!pidfdsWork()) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0)
      throwErrno(setup.title + ": cannot make the pipe that watches the backend's death (pipe2)");
    deathRead.reset(p[0]);
    deathWrite.reset(p[1]);
  }
  const pid_t pid = forkBackend(setup, body, deathWrite.get(), deathRead.get());
  if (pid < 0) throwErrno(setup.title + ": cannot fork the backend (fork)");
  if (deathRead) {
    deathWrite.reset();
    return std::make_unique<ForkedChild>(pid, std::move(deathRead), false);
  }
  UniqueFd pidfd(syscalls.pidfdOpen(pid, 0));
  if (!pidfd) {
    // Without its pidfd nobody could watch the child's death: it goes now.
    const int err = errno;
    ::kill(pid, SIGKILL);
    retryEintr([&] { return ::waitpid(pid, nullptr, 0); });
    throw SystemError(err, setup.title + ": the backend was killed: cannot open its pidfd (pidfd_open" +
                               (err == ENOSYS ? std::string(", which needs Linux 5.3 or later and a sandbox that allows it")
                                              : std::string()) +
                               ")");
  }
  return std::make_unique<ForkedChild>(pid, std::move(pidfd), true);
}

// ---------------------------------------------------------------- served

// A child the fork server forked: not ours to reap. Its death is the pidfd
// the server opened before it could reap it (or its death pipe); its status
// is the one the server relays.
class ServedChild final : public Child {
 public:
  ServedChild(std::shared_ptr<ForkServerConn> server, ForkServerConn::Spawned s)
      : server_(std::move(server)), s_(std::move(s)) {
    frontend_fds::add({s_.deathFd.get()});
  }
  ~ServedChild() override {
    frontend_fds::remove({s_.deathFd.get()});
    poll();
    server_->forget(s_.id);
  }
  pid_t pid() const noexcept override { return s_.pid; }
  int deathFd() const noexcept override { return s_.deathFd.get(); }

 private:
  std::optional<ExitStatus> reapEnded(const Deadline& statusBy) override {
    return server_->takeStatus(s_.id, statusBy);
  }
  // By the server without a pidfd: the pid is its child until it reaps it.
  void sendSignal(int sig) override {
    if (s_.isPidfd) pidfdSignal(s_.deathFd.get(), sig);
    else server_->signal(s_.id, sig);
  }

  std::shared_ptr<ForkServerConn> server_;
  ForkServerConn::Spawned s_;
};

// ---------------------------------------------------------------- thread

// Shared with the thread, which may outlive the Child when abandoned.
struct ThreadEnd {
  UniqueFd event{syscalls.eventfd(0, EFD_CLOEXEC)};
  std::atomic<int> code{0};
};

class ThreadChild final : public Child {
 public:
  explicit ThreadChild(std::function<int()> body) : end_(std::make_shared<ThreadEnd>()) {
    if (!end_->event) throwErrno("cannot create the in-process death event");
    thread_ = std::thread([end = end_, body = std::move(body)] {
      int code = kExitBackendFailed;
      try {
        code = body();
      } catch (...) {
      }
      end->code = code;
      const std::uint64_t one = 1;
      [[maybe_unused]] auto r = ::write(end->event.get(), &one, sizeof one);
    });
  }
  ~ThreadChild() override {
    if (thread_.joinable()) thread_.detach();  // only an abandoned thread gets here
  }
  pid_t pid() const noexcept override { return -1; }
  int deathFd() const noexcept override { return end_->event.get(); }

 private:
  std::optional<ExitStatus> reapEnded(const Deadline&) override {
    if (thread_.joinable()) thread_.join();
    return ExitStatus{ExitStatus::How::Exited, end_->code.load()};
  }
  void sendSignal(int) override {}
  bool detachThread() override {
    if (thread_.joinable()) thread_.detach();
    return true;
  }

  std::shared_ptr<ThreadEnd> end_;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<Child> Child::start(const ChildSetup& setup, std::function<int()> body,
                                    const std::function<spdlog::logger&()>& log) {
  if (setup.inProcess) return std::make_unique<ThreadChild>(std::move(body));
  std::string whyNotServed = "the start names no recipe";
  if (setup.served) {
    std::shared_ptr<ForkServerConn> server = currentForkServer();
    if (!server) {
      whyNotServed = "no fork server runs in this process";
    } else if (auto lost = server->lost()) {
      whyNotServed = *lost;
    } else if (!server->knows(setup.served->recipe)) {
      whyNotServed = "the fork server (pid " + std::to_string(server->pid()) +
                     ") started before this object (or its pool's factory) was made or changed, so it has no "
                     "copy of it to run";
    } else {
      return std::make_unique<ServedChild>(server, server->spawn(setup, *setup.served));
    }
  }
  return startForked(setup, body, log, whyNotServed);
}

bool Child::wouldServe(std::uint64_t recipe) {
  std::shared_ptr<ForkServerConn> server = currentForkServer();
  return server && !server->lost() && server->knows(recipe);
}

void useDeathPipeForTests(bool on) noexcept { g_forceDeathPipe = on; }

// ---------------------------------------------------------------- the ladder

namespace {

// Waits until every child ended or the deadline passed; true when all did.
bool waitAll(std::span<Child* const> children, const Deadline& d) {
  std::vector<pollfd> fds;
  for (;;) {
    fds.clear();
    for (Child* c : children)
      if (!c->ended()) fds.push_back({c->deathFd(), POLLIN, 0});
    if (fds.empty()) return true;
    const int ms = d.pollMillis();
    if (ms == 0) return false;
    const int r = ::poll(fds.data(), fds.size(), ms);
    if (r < 0 && errno != EINTR) throwErrno("cannot poll the backends' exit");
  }
}

}  // namespace

void stopChildren(std::span<Child* const> children, const Ladder& ladder,
                  const std::function<void(Child&, int)>& onEscalate) {
  if (waitAll(children, Deadline(ladder.grace))) return;
  for (Child* c : children) {
    if (c->ended()) continue;
    if (!c->forked()) {
      c->abandon();  // a thread cannot be made to stop
      continue;
    }
    if (onEscalate) onEscalate(*c, SIGTERM);
    c->signal(SIGTERM);
  }
  if (waitAll(children, Deadline(ladder.termGrace))) return;
  for (Child* c : children) {
    if (c->ended()) continue;
    if (onEscalate) onEscalate(*c, SIGKILL);
    c->signal(SIGKILL);
  }
  waitAll(children, Deadline(ladder.killGrace));
}

}  // namespace detail
}  // namespace forklift
