#include "forklift/process.hpp"

#include <cxxabi.h>
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <typeindex>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#include "backend.hpp"
#include "forklift/log.hpp"
#include "proc_title.hpp"

namespace forklift {

namespace {

// Frontend ends of every running backend's channels (and their pidfds). A
// newly forked backend closes them all: it must not hold another backend's
// channel open, or that backend would never see EOF when the frontend dies.
std::mutex g_registryMutex;
std::vector<int> g_frontendFds;

void registerFds(std::initializer_list<int> fds) {
  std::lock_guard lock(g_registryMutex);
  for (int fd : fds)
    if (fd >= 0) g_frontendFds.push_back(fd);
}

void unregisterFds(std::initializer_list<int> fds) {
  std::lock_guard lock(g_registryMutex);
  for (int fd : fds) std::erase(g_frontendFds, fd);
}

// glibc 2.36's <sys/pidfd.h> lacks C linkage for C++; the raw system calls
// are as simple.
int pidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }
int pidfdSignal(int pidfd, int sig) { return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0)); }

int countThreads() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/task")) {
    while (dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') ++n;
    ::closedir(d);
  }
  return n;
}

bool envInProcess() {
  const char* v = std::getenv("FORKLIFT_IN_PROCESS");
  if (!v) return false;
  const std::string s = v;
  return s == "1" || s == "true" || s == "yes" || s == "on";
}

// "MyProcess" for any MyProcess, whatever its namespace. Demangling costs
// more than forking a small process, so each class is demangled once.
std::string className(const std::type_info& t) {
  static std::mutex m;
  static std::unordered_map<std::type_index, std::string> cache;
  std::lock_guard lock(m);
  auto it = cache.find(t);
  if (it != cache.end()) return it->second;
  int status = 0;
  char* demangled = abi::__cxa_demangle(t.name(), nullptr, nullptr, &status);
  std::string cls = status == 0 && demangled ? demangled : t.name();
  std::free(demangled);
  if (auto p = cls.rfind("::"); p != std::string::npos) cls = cls.substr(p + 2);
  return cache.emplace(t, cls).first->second;
}

std::string signalName(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? std::string("SIG") + abbrev : "signal " + std::to_string(sig);
}

// Resets what a child inherits from the frontend's signal setup: handlers
// (they point into frontend logic), ignored signals, and the blocked mask.
// Asking first and writing only what differs is the cheapest way to know
// (cheaper than parsing /proc/self/status), and most signals need no write.
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
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
}

ExitStatus statusFromWait(int st) {
  ExitStatus s;
  if (WIFEXITED(st)) {
    s.how = ExitStatus::How::Exited;
    s.code = WEXITSTATUS(st);
  } else if (WIFSIGNALED(st)) {
    s.how = ExitStatus::How::Signaled;
    s.signal = WTERMSIG(st);
  }
  return s;
}

}  // namespace

// ---------------------------------------------------------------- ExitStatus

std::string ExitStatus::describe() const {
  std::string s;
  switch (how) {
    case How::Running: return "still running";
    case How::NotStarted: return "not started";
    case How::Abandoned: return "stuck in-process backend thread abandoned";
    case How::Exited: s = "exited with code " + std::to_string(code); break;
    case How::Signaled: s = "killed by " + signalName(signal); break;
  }
  if (escalation == 1) s += " (after SIGTERM)";
  if (escalation == 2) s += " (after SIGKILL)";
  return s;
}

// ---------------------------------------------------------------- Reply

Reply& Reply::operator=(Reply&& o) noexcept {
  if (this != &o) {
    if (wanted()) reject("the reply was replaced before it was answered");
    backend_ = std::move(o.backend_);
    id_ = std::exchange(o.id_, 0);
  }
  return *this;
}

Reply::~Reply() {
  if (wanted()) reject("the handler dropped its reply without answering");
}

void Reply::resolve(Value v) {
  if (!wanted()) return;
  const std::uint64_t id = std::exchange(id_, 0);
  if (auto b = backend_.lock()) b->answer(id, true, std::move(v), {});
}

void Reply::reject(const std::string& error) {
  if (!wanted()) return;
  const std::uint64_t id = std::exchange(id_, 0);
  try {
    if (auto b = backend_.lock()) b->answer(id, false, {}, error);
  } catch (const std::exception&) {
    // Called from destructors: a reply that cannot be queued is lost with
    // the channel, and the caller's call() ends on its own timeout or EOF.
  }
}

// ---------------------------------------------------------------- construction

MessageProcess::MessageProcess(std::string name, ProcessOptions options)
    : name_(std::move(name)), fullName_(name_), options_(std::move(options)) {}

MessageProcess::~MessageProcess() {
  if (onBackendSide()) return;  // the backend side never stops itself from here
  if (started_ && !status_) {
    try {
      const ExitStatus s = stop(options_.stopTimeout);
      if (!s.ok()) logger().warn("stopped by the destructor: {}", s.describe());
    } catch (const std::exception& e) {
      logger().error("destructor could not stop the backend: {}", e.what());
    }
  }
  if (thread_.joinable()) thread_.detach();  // only an abandoned in-process backend gets here
  unregisterFds({cmd_.fd(), out_.fd(), death_.get()});
}

void MessageProcess::commandRaw(std::string name, std::function<Value(const Message&)> handler) {
  handlers_[std::move(name)] = [h = std::move(handler)](MessageProcess&, const Message& m, Reply&) { return h(m); };
}

std::string MessageProcess::whoAmI() const { return fullName_; }

namespace {
// The process object whose backend runs on this thread (in the forked child:
// its only thread), so a method can tell which side of the fork calls it.
thread_local const MessageProcess* t_backendOf = nullptr;
}  // namespace

bool MessageProcess::onBackendSide() const noexcept { return t_backendOf == this; }

spdlog::logger& MessageProcess::logger() {
  if (onBackendSide() && backend_) return backend_->log();
  if (!frontendLog_) frontendLog_ = makeLogger(fullName_);
  return *frontendLog_;
}

// ---------------------------------------------------------------- start

void MessageProcess::start() {
  std::lock_guard lock(mutex_);
  if (started_ && !status_) throw Error(fullName_ + ": already started");
  // A stopped process may start again: forget the last run.
  unregisterFds({cmd_.fd(), out_.fd(), death_.get()});
  cmd_ = Channel();
  out_ = Channel();
  death_.reset();
  status_.reset();
  escalation_ = 0;
  stopRequested_ = false;
  started_ = false;

  fullName_ = className(typeid(*this)) + "." + name_;
  frontendLog_.reset();  // made on first use, under the new name
  if (envInProcess()) options_.inProcess = true;

  auto [cmdFront, cmdBack] = Channel::makePair(options_.limits);
  auto [outFront, outBack] = Channel::makePair(options_.limits);
  cmd_ = std::move(cmdFront);
  out_ = std::move(outFront);
  // fd() readable means "a message is waiting": read one frame at a time.
  out_.setReadMode(ReadMode::OneFrame);

  if (options_.inProcess) {
    death_ = detail::UniqueFd(::eventfd(0, EFD_CLOEXEC));
    if (!death_) detail::throwErrno(fullName_ + ": cannot create the in-process death event");
    started_ = true;
    thread_ = std::thread([this, cmd = std::move(cmdBack), out = std::move(outBack)]() mutable {
      threadCode_ = runBackend(std::move(cmd), std::move(out));
      const std::uint64_t one = 1;
      [[maybe_unused]] auto r = ::write(death_.get(), &one, sizeof one);
    });
  } else {
    int threads = countThreads();
    // A thread that was just joined can stay listed for a moment while the
    // kernel finishes its exit: look again briefly before refusing.
    for (int i = 0; threads > 1 && i < 20; ++i) {
      ::usleep(500);
      threads = countThreads();
    }
    if (threads > 1) {
      if (!options_.allowThreads)
        throw Error(fullName_ + ": cannot fork: this process already runs " + std::to_string(threads) +
                    " threads, and a forked child gets only the calling one (locks held by the others stay "
                    "locked forever). Start forklift processes before starting threads, or set "
                    "ProcessOptions::allowThreads if you know every thread is fork-safe.");
      logger().warn("forking while {} threads run (allowThreads is set): the child gets only this thread; "
                         "any lock another thread held at fork stays locked in the child",
                         threads);
    }
    std::fflush(nullptr);  // or the child would flush the frontend's buffered output a second time
    std::cout.flush();
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) detail::throwErrno(fullName_ + ": cannot fork");
    if (pid == 0) {
      cmd_.close();
      out_.close();
      // The parent may have died between fork and prctl: then nobody would
      // send the death signal.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(1);
      runChild(std::move(cmdBack), std::move(outBack));
    }
    pid_ = pid;
    cmdBack.close();
    outBack.close();
    started_ = true;
    death_ = detail::UniqueFd(pidfdOpen(pid));
    if (!death_) {
      const int err = errno;
      ::kill(pid, SIGKILL);
      reap(Timeout(5000));
      throw SystemError(err, fullName_ + ": cannot open a pidfd for the backend");
    }
  }
  registerFds({cmd_.fd(), out_.fd(), death_.get()});

  // Wait for "__ready" (or "__failed") from the backend.
  std::optional<Message> m;
  try {
    m = cmd_.recv(options_.startTimeout);
  } catch (const PeerClosed&) {
    const ExitStatus s = reap(Timeout(2000));
    throw ProcessDied(fullName_ + ": the backend died while starting (" + s.describe() + ")");
  }
  if (!m) {
    const std::string took = std::to_string(options_.startTimeout.count());
    const ExitStatus s = killNow();
    throw TimeoutError(fullName_ + ": the backend was not ready within " + took + " ms (" + s.describe() + ")");
  }
  if (m->command() == "__failed") {
    const std::string why = m->get<std::string>("error", "unknown error");
    const ExitStatus s = reap(Timeout(2000));
    throw Error(fullName_ + ": preRun__ failed in the backend: " + why + " (" + s.describe() + ")");
  }
  if (m->command() != "__ready") throw Error(fullName_ + ": unexpected first message '" + m->command() + "'");
  if (frontendLog_) frontendLog_->debug("backend ready, pid {}", pid_);
}

void MessageProcess::runChild(Channel cmd, Channel out) {
  resetSignals();
  if (options_.ignoreSigint) ::signal(SIGINT, SIG_IGN);
  detail::setProcessTitle(name_, "forklift: " + fullName_);
  {
    // Other backends' channels and pidfds, inherited through fork.
    std::lock_guard lock(g_registryMutex);
    for (int fd : g_frontendFds) ::close(fd);
  }
  death_.release();  // not ours to close (the registry closed it, or it never existed)
  int code = 5;
  try {
    code = runBackend(std::move(cmd), std::move(out));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: backend failed: %s\n", fullName_.c_str(), e.what());
  } catch (...) {
    std::fprintf(stderr, "%s: backend failed\n", fullName_.c_str());
  }
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);  // _exit does not flush stdio
  ::_exit(code);
}

// Runs on the backend side (child or thread). Exit codes: 0 normal, 3
// preRun__ failed, 4 postRun__ failed.
int MessageProcess::runBackend(Channel cmd, Channel out) {
  t_backendOf = this;
  backend_ = std::make_shared<detail::Backend>(*this, std::move(cmd), std::move(out),
                                               [this] { return makeLogger(fullName_, options_.logFile); });
  detail::Backend& b = *backend_;
  int code = 0;
  try {
    preRun__();
  } catch (const std::exception& e) {
    b.log().error("preRun__ failed: {}", e.what());
    b.sendFailed(e.what());
    backend_.reset();
    return 3;
  } catch (...) {
    b.sendFailed("a non-standard exception");
    backend_.reset();
    return 3;
  }
  b.sendReady();
  b.run();
  try {
    postRun__();
  } catch (const std::exception& e) {
    b.log().error("postRun__ failed: {}", e.what());
    code = 4;
  } catch (...) {
    code = 4;
  }
  b.flush(Timeout(1000));
  backend_.reset();
  return code;
}

// ---------------------------------------------------------------- frontend commands

void MessageProcess::send(const std::string& command, Map args) { send(Message(command, std::move(args))); }

void MessageProcess::send(Message m) {
  std::lock_guard lock(mutex_);
  if (!started_ || status_) throw Error(fullName_ + ": send '" + m.command() + "' before start or after stop");
  m.setId(0);
  try {
    cmd_.send(m, options_.sendTimeout);
  } catch (const PeerClosed&) {
    died("send '" + m.command() + "'");
  }
}

Value MessageProcess::call(const std::string& command, Map args) {
  return call(command, std::move(args), options_.callTimeout);
}

Value MessageProcess::call(const std::string& command, Map args, Timeout timeout) {
  std::lock_guard lock(mutex_);
  if (!started_ || status_) throw Error(fullName_ + ": call '" + command + "' before start or after stop");
  const Deadline d(timeout);
  Message m(command, std::move(args));
  const std::uint64_t id = ++nextId_;
  m.setId(id);
  try {
    cmd_.send(m, timeout);
  } catch (const PeerClosed&) {
    died("call '" + command + "'");
  }
  for (;;) {
    std::optional<Message> r;
    try {
      r = cmd_.recv(d.forever() ? kForever : std::chrono::ceil<Timeout>(d.remaining()));
    } catch (const PeerClosed&) {
      died("call '" + command + "'");
    }
    if (!r)
      throw TimeoutError(fullName_ + ": call '" + command + "' got no reply within " + std::to_string(timeout.count()) +
                         " ms");
    if (r->id() != id) continue;  // the late reply of an earlier call that timed out
    if (r->command() == "__ok") return r->get<Value>("value", Value());
    throw RemoteError(r->get<std::string>("error", "unknown remote error"));
  }
}

std::optional<Message> MessageProcess::recv(Timeout timeout) {
  if (!out_.valid()) throw Error(fullName_ + ": recv before start");
  try {
    return out_.recv(timeout);
  } catch (const PeerClosed&) {
    if (stopRequested_) throw PeerClosed(fullName_ + ": the backend has stopped");
    std::lock_guard lock(mutex_);
    died("recv");
  }
}

void MessageProcess::died(const std::string& during) {
  const ExitStatus s = reap(Timeout(1000));
  throw ProcessDied(fullName_ + ": the backend died during " + during + " (" + s.describe() + ")");
}

// ---------------------------------------------------------------- stop

void MessageProcess::requestStop() {
  std::lock_guard lock(mutex_);
  if (!started_ || status_ || stopRequested_) return;
  stopRequested_ = true;
  try {
    cmd_.send(Message("__stop"), Timeout(100));
  } catch (const Error&) {
    // Gone or not reading: waitStop and the escalation deal with it.
  }
}

// Waits for the end of the backend without escalating. Caller holds no lock
// or the mutex; it touches only the status and the death descriptor.
ExitStatus MessageProcess::reap(Timeout timeout) {
  if (status_) return *status_;
  if (!started_) return ExitStatus{};
  if (!detail::waitFor(death_.get(), POLLIN, Deadline(timeout))) return ExitStatus{ExitStatus::How::Running};
  ExitStatus s;
  if (options_.inProcess) {
    if (thread_.joinable()) thread_.join();
    s.how = ExitStatus::How::Exited;
    s.code = threadCode_;
  } else {
    int st = 0;
    pid_t w;
    do {
      w = ::waitpid(pid_, &st, 0);
    } while (w < 0 && errno == EINTR);
    s = w == pid_ ? statusFromWait(st) : ExitStatus{ExitStatus::How::Exited, 0};
  }
  s.escalation = escalation_;
  status_ = s;
  closeFrontend();
  return s;
}

void MessageProcess::signal(int sig) {
  if (!started_ || status_ || options_.inProcess) return;
  if (sig == SIGTERM) escalation_ = std::max(escalation_, 1);
  if (sig == SIGKILL) escalation_ = 2;
  pidfdSignal(death_.get(), sig);
}

void MessageProcess::closeFrontend() {
  // The out channel stays open: messages the backend sent before it ended
  // can still be read. The command channel has no more use.
  unregisterFds({cmd_.fd()});
  cmd_.close();
}

ExitStatus MessageProcess::killNow() {
  if (options_.inProcess) {
    if (thread_.joinable()) thread_.detach();
    status_ = ExitStatus{ExitStatus::How::Abandoned};
    closeFrontend();
    return *status_;
  }
  signal(SIGKILL);
  return reap(Timeout(10000));
}

ExitStatus MessageProcess::waitStop(Timeout timeout) { return reap(timeout); }

ExitStatus MessageProcess::stop() { return stop(options_.stopTimeout); }

ExitStatus MessageProcess::stop(Timeout timeout) {
  if (!started_) return ExitStatus{};
  if (status_) return *status_;
  requestStop();
  ExitStatus s = reap(timeout);
  if (s.how != ExitStatus::How::Running) return s;
  if (options_.inProcess) {
    logger().error("the in-process backend did not stop within {} ms and a thread cannot be killed; abandoning it",
                   timeout.count());
    return killNow();
  }
  logger().warn("the backend did not stop within {} ms; sending SIGTERM", timeout.count());
  signal(SIGTERM);
  s = reap(Timeout(500));
  if (s.how == ExitStatus::How::Running) {
    logger().warn("the backend ignored SIGTERM; sending SIGKILL");
    signal(SIGKILL);
    s = reap(Timeout(10000));
  }
  return s;
}

bool MessageProcess::isAlive() const {
  if (!started_ || status_) return false;
  return !detail::waitFor(death_.get(), POLLIN, Deadline(Timeout::zero()));
}

// ---------------------------------------------------------------- backend API

detail::Backend& MessageProcess::backendSide(const char* method) {
  if (!onBackendSide()) throw Error(fullName_ + ": " + method + " called on the frontend side");
  return *backend_;
}

void MessageProcess::sendOut__(const Message& m) {
  backendSide("sendOut__").sendOut(m);
}

void MessageProcess::watch__(int fd, std::function<void(int)> onReady, bool writable) {
  backendSide("watch__").watch(fd, std::move(onReady), writable);
}

void MessageProcess::unwatch__(int fd) {
  if (onBackendSide()) backend_->unwatch(fd);
}

std::uint64_t MessageProcess::after__(Timeout delay, std::function<void()> fn) {
  return backendSide("after__").addTimer(delay, Timeout::zero(), std::move(fn));
}

std::uint64_t MessageProcess::every__(Timeout period, std::function<void()> fn) {
  return backendSide("every__").addTimer(period, period, std::move(fn));
}

void MessageProcess::cancel__(std::uint64_t timerId) {
  if (onBackendSide()) backend_->cancel(timerId);
}

void MessageProcess::stopLoop__() {
  if (onBackendSide()) backend_->requestStop();
}

}  // namespace forklift
