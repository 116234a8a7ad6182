#include "forklift/process.hpp"

#include <cxxabi.h>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <typeindex>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#include "backend.hpp"
#include "child.hpp"
#include "control.hpp"
#include "fork_server.hpp"
#include "forklift/log.hpp"
#include "posix.hpp"
#include "requests.hpp"
#include "seams.hpp"
#include "timeout_text.hpp"

namespace forklift {

namespace {

// forklift's environment variables. A value not known is an Error naming
// the variable and the values it takes (a typo must not silently choose
// the default).
[[noreturn]] void unknownEnvValue(const char* var, const std::string& value, const char* takes) {
  throw Error(std::string("environment variable ") + var + "='" + value + "' is not a value forklift knows; it takes " +
              takes);
}

// FORKLIFT_IN_PROCESS=1|0 (also true/false, yes/no, on/off; empty is unset).
bool envInProcess() {
  const char* v = std::getenv("FORKLIFT_IN_PROCESS");
  if (!v || !*v) return false;
  const std::string s = v;
  if (s == "1" || s == "true" || s == "yes" || s == "on") return true;
  if (s == "0" || s == "false" || s == "no" || s == "off") return false;
  unknownEnvValue("FORKLIFT_IN_PROCESS", s, "1, true, yes, on (in-process) or 0, false, no, off");
}

// FORKLIFT_TRANSPORT=shm|socket overrides ProcessOptions::transport (to run
// a program, or the whole test suite, over the other one); empty is unset.
Transport transportFor(const ProcessOptions& o) {
  const char* v = std::getenv("FORKLIFT_TRANSPORT");
  if (!v || !*v) return o.transport;
  const std::string s = v;
  if (s == "shm" || s == "shared" || s == "sharedmemory") return Transport::SharedMemory;
  if (s == "socket") return Transport::Socket;
  unknownEnvValue("FORKLIFT_TRANSPORT", s, "shm (also shared, sharedmemory) or socket, in lower case");
}

void registerFds(const std::vector<int>& fds) {
  for (int fd : fds) detail::frontend_fds::add({fd});
}

void unregisterFds(const std::vector<int>& fds) {
  for (int fd : fds) detail::frontend_fds::remove({fd});
}

// The descriptors of `mine` that `theirs` does not share (a shared-memory
// pair's doorbells are one descriptor in both ends).
std::vector<int> ownFds(const Channel& mine, const Channel& theirs) {
  std::vector<int> own;
  const std::vector<int> other = theirs.descriptors();
  for (int fd : mine.descriptors())
    if (std::find(other.begin(), other.end(), fd) == other.end()) own.push_back(fd);
  return own;
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

// The process object whose backend runs on this thread (in the forked child:
// its main thread), so a method can tell which side of the fork calls it.
thread_local const MessageProcess* t_backendOf = nullptr;

// The descriptors this process holds: /proc/self/fd, or, when even that
// cannot be opened (no descriptor left), a look at each number below the
// limit.
std::size_t openDescriptors(rlim_t limit) {
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    std::size_t n = 0;
    while (const dirent* e = ::readdir(dir))
      if (e->d_name[0] != '.') ++n;
    ::closedir(dir);
    return n - 1;  // the directory's own
  }
  std::size_t n = 0;
  const int top = static_cast<int>(std::min<rlim_t>(limit == 0 ? 1024 : limit, 1u << 20));
  for (int fd = 0; fd < top; ++fd)
    if (::fcntl(fd, F_GETFD) >= 0) ++n;
  return n;
}

// Lifecycle lines are debug level; making a logger costs more than a small
// start, so none is made unless they would be written.
bool lifecycleLogged() { return spdlog::default_logger_raw()->should_log(spdlog::level::debug); }

}  // namespace

// ---------------------------------------------------------------- construction

MessageProcess::MessageProcess(std::string name, ProcessOptions options)
    : name_(std::move(name)), fullName_(name_), options_(std::move(options)) {
  // What a fork server started from now on runs to start this object.
  detail::recipes::bindOwn(this, [this](detail::ServedCall& c) { return detail::runServed(*this, c); });
}

MessageProcess::~MessageProcess() {
  detail::recipes::forget(this);
  if (onBackendSide()) return;  // the backend side never stops itself from here
  unregisterFds(out_.descriptors());
  if (state_.load() != State::Running) return;
  if (child_ && !child_->forked() && !child_->ended()) {
    // In-process: the subclass is gone already, and its handlers with it.
    destroying_ = true;
    logger().error("destroyed while its in-process backend runs: the backend runs no more handlers, timers or "
                   "postRun__; call stop() in the subclass's destructor");
  }
  // Ended already (stopped, or died and seen): nothing for the destructor
  // to report, only to clean up.
  const bool endedBefore = child_ && child_->ended();
  try {
    const ExitStatus s = stop(options_.stopTimeout);
    if (!s.ok() && !destroying_ && !endedBefore) logger().warn("stopped by the destructor: {}", s.describe());
  } catch (const std::exception& e) {
    logger().error("destructor could not stop the backend: {}", e.what());
  }
}

void MessageProcess::addHandler(std::string name, Handler h) {
  if (detail::control::reserved(name))
    throw Error(name_ + ": command name '" + name + "' is reserved (names starting with __ are forklift's)");
  handlers_[std::move(name)] = std::move(h);
}

void MessageProcess::commandRaw(std::string name, std::function<Value(const Message&)> handler) {
  addHandler(std::move(name), [h = std::move(handler)](MessageProcess&, const Message& m, Reply&) { return h(m); });
}

bool MessageProcess::onBackendSide() const noexcept {
  if (t_backendOf == this) return true;
  // Any thread of a forked backend (one its preRun__ started, say).
  return frontendPid_ != 0 && detail::currentPid() != frontendPid_;
}

void MessageProcess::frontendOnly(const char* method) const {
  if (onBackendSide())
    throw Error(fullName_ + ": " + method +
                "() is a frontend method and was called on the backend side (from a handler, preRun__, a timer or "
                "a backend thread); the backend talks to the frontend with sendOut__ and replies");
}

detail::Backend& MessageProcess::backendSide(const char* method) {
  if (!onBackendSide() || !backend_)
    throw Error(fullName_ + ": " + method + " is a backend method and was called on the frontend side");
  return *backend_;
}

spdlog::logger& MessageProcess::logger() {
  if (onBackendSide() && backend_) return backend_->log();
  std::lock_guard lock(logMutex_);
  if (!frontendLog_) frontendLog_ = makeLogger(fullName_);
  return *frontendLog_;
}

// ---------------------------------------------------------------- start

void MessageProcess::start() {
  frontendOnly("start");
  State idle = State::Idle;
  if (state_.load() == State::Running && child_ && child_->ended()) {
    // A stopped (or dead) process may start again: forget the last run.
    state_ = State::Idle;
  }
  if (!state_.compare_exchange_strong(idle, State::Starting)) throw Error(fullName_ + ": already started");
  std::vector<int> cmdFds;
  int bellFd = -1;
  try {
    if (requests_) requests_->close({true, "restarted", nullptr});
    requests_.reset();
    unregisterFds(out_.descriptors());
    out_ = Channel();
    child_.reset();
    stopRequested_ = false;
    pid_ = -1;

    fullName_ = className(typeid(*this)) + "." + name_;
    {
      std::lock_guard lock(logMutex_);
      frontendLog_.reset();  // made on first use, under the new name
    }
    if (envInProcess()) options_.inProcess = true;
    if (!options_.logFile.empty()) checkLogFile(options_.logFile);

    // A backend forked by the fork server talks over the socket: the queues'
    // memory reaches a child only through a fork of this process.
    const auto recipe = detail::recipes::bound(this);
    const bool served = !options_.inProcess && recipe && detail::Child::wouldServe(recipe->key);
    const bool shared = transportFor(options_) == Transport::SharedMemory && !served;
    // 0 is the smallest queue (a page); past kMaxQueueBytes the size would
    // not round to a power of two (it looped for good past 2^63).
    if (options_.queueBytes > ProcessOptions::kMaxQueueBytes)
      throw LimitError(fullName_ + ": ProcessOptions::queueBytes is " + std::to_string(options_.queueBytes) +
                       ", over the largest queue of " + std::to_string(ProcessOptions::kMaxQueueBytes) + " bytes");
    const std::size_t q = std::max<std::size_t>(options_.queueBytes, 1);
    // Over shared memory both channels' queues are one mapping: an mmap of
    // shared memory (a tmpfs object) and its munmap cost about 45 us here
    // (a loop of 2,000), more than all the rest of a channel's set-up.
    auto [cmdPair, outPair] =
        shared ? Channel::makeSharedPairs(options_.limits, q, q, 0, q)
               : std::pair<Channel::Pair, Channel::Pair>{Channel::makePair(options_.limits), Channel::makePair(options_.limits)};
    auto& [cmdFront, cmdBack] = cmdPair;
    auto& [outFront, outBack] = outPair;
    // Negative is no spin, more than kMaxSpin is kMaxSpin (in nanoseconds
    // the largest values overflowed).
    const auto spin = std::clamp(options_.spin, std::chrono::microseconds::zero(),
                                 std::chrono::duration_cast<std::chrono::microseconds>(ProcessOptions::kMaxSpin));
    for (Channel* c : {&cmdFront, &cmdBack, &outFront}) c->setSpin(spin);
    // fd() readable means "a message is waiting": read one frame at a time.
    outFront.setReadMode(ReadMode::OneFrame);
    // Backends forked later must not hold these (see frontend_fds); the
    // Requests and out_ remove them when they close them. What both ends
    // share (doorbells) is registered once this backend has its copy.
    std::vector<int> own = ownFds(cmdFront, cmdBack);
    const std::vector<int> ownOut = ownFds(outFront, outBack);
    own.insert(own.end(), ownOut.begin(), ownOut.end());
    registerFds(own);
    std::vector<int> sharedFds = cmdFront.descriptors();
    const std::vector<int> outFds = outFront.descriptors();
    sharedFds.insert(sharedFds.end(), outFds.begin(), outFds.end());
    std::erase_if(sharedFds, [&own](int fd) { return std::find(own.begin(), own.end(), fd) != own.end(); });
    cmdFds = cmdFront.descriptors();  // a failure from here on must remove them from the registry
    out_ = std::move(outFront);
    // The stop bell is one object on both sides; later backends close it.
    detail::UniqueFd stopBell(detail::syscalls.eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!stopBell) detail::throwErrno(fullName_ + ": cannot create the stop bell (eventfd)");
    const int bell = stopBell.get();
    frontendPid_ = detail::currentPid();

    detail::ChildSetup setup;
    // One deadline for the whole start: the fork server's answer (when it
    // serves the start) and "__ready".
    setup.startBy = Deadline(options_.startTimeout);
    setup.comm = name_;
    setup.title = "forklift: " + fullName_;
    setup.ignoreSigint = options_.ignoreSigint;
    setup.inProcess = options_.inProcess;
    setup.allowThreads = options_.allowThreads;
    auto back = std::make_shared<std::pair<Channel, Channel>>(std::move(cmdBack), std::move(outBack));
    if (recipe)
      setup.served =
          detail::ServedStart{recipe->key, recipe->arg, back->first.fd(), back->second.fd(), bell, recipe->payload};
    // Until the Requests own them, a failed start removes these itself.
    bellFd = bell;
    child_ = detail::Child::start(
        setup, [this, back, bell] { return runBackend(std::move(back->first), std::move(back->second), bell); },
        [this]() -> spdlog::logger& { return logger(); });
    back.reset();  // forked: the child has its ends; in-process: the thread does
    detail::frontend_fds::add({bell});
    registerFds(sharedFds);
    if (child_->forked()) {
      cmdFront.hideFromLaterForks();
      out_.hideFromLaterForks();
    }
    pid_ = child_->forked() ? child_->pid() : ::getpid();
    if (lifecycleLogged()) logger().debug("started, pid {}{}", pid_, child_->forked() ? "" : " (in-process thread)");

    out_.watchPeer(child_->deathFd());
    cmdFront.watchPeer(child_->deathFd());
    awaitReady(cmdFront, setup.startBy);
    requests_ = std::make_shared<detail::Requests>(
        std::move(cmdFront), std::move(stopBell), child_->deathFd(),
        detail::Requests::Hooks{fullName_, [this](const Deadline& d) { return endedHow(d); },
                                [this] { return stopRequested_.load(); }});
    state_ = State::Running;
    if (lifecycleLogged()) logger().debug("ready");
  } catch (...) {
    // Nothing of the failed start stays: the child is ended and reaped,
    // the channels closed; start() may be called again.
    if (child_ && !child_->ended()) {
      child_->signal(SIGKILL);
      child_->abandon();
      child_->wait(Timeout(5000));
    }
    if (child_ && child_->ended()) child_.reset();  // its status is in the error
    unregisterFds(out_.descriptors());
    out_ = Channel();
    if (!requests_) {  // closed with their owners here
      unregisterFds(cmdFds);
      detail::frontend_fds::remove({bellFd});
    }
    state_ = State::Idle;
    rethrowOutOfDescriptors();
    throw;
  }
}

// Wherever a start runs out of descriptors (the channels' socketpairs, the
// queues' doorbells or epoll sets, the stop bell, the pidfd), the error
// says the same: which backend, how many descriptors this process holds
// and its limit, and the two remedies process.hpp names. Other errors go
// on as they are.
void MessageProcess::rethrowOutOfDescriptors() {
  try {
    throw;
  } catch (const SystemError& e) {
    if (e.code().value() != EMFILE) throw;
    rlimit lim{};
    const bool known = ::getrlimit(RLIMIT_NOFILE, &lim) == 0;
    const std::string limit =
        !known || lim.rlim_cur == RLIM_INFINITY ? std::string("unknown") : std::to_string(lim.rlim_cur);
    throw SystemError(EMFILE, fullName_ + ": cannot start the backend: out of file descriptors (this process holds " +
                                  std::to_string(openDescriptors(known ? lim.rlim_cur : 0)) +
                                  ", its limit RLIMIT_NOFILE is " + limit +
                                  "; a start takes up to 17 more while it sets up and its running backend keeps 12, "
                                  "over the socket 9 and 5; raise the limit with ulimit -n or setrlimit, or choose "
                                  "the socket transport, ProcessOptions::transport = Transport::Socket or "
                                  "FORKLIFT_TRANSPORT=socket)");
  }
}

// Waits for "__ready" (or "__failed") from the backend; on failure the
// child has ended or is killed, and the error says how.
void MessageProcess::awaitReady(Channel& cmd, const Deadline& d) {
  std::optional<Message> m;
  try {
    m = cmd.recv(d.forever() ? kForever : std::chrono::ceil<Timeout>(d.remaining()));
  } catch (const PeerClosed&) {
    // A backend that closed its channel and lives on is killed: the start
    // failed (the catch in start() kills what still runs). One that ran out
    // of descriptors fails the start as the frontend's running out does.
    const std::string how = endedHow(d);
    if (const auto s = child_->poll(); s && s->how == ExitStatus::How::Exited && s->code == kExitOutOfDescriptors)
      throw SystemError(EMFILE, fullName_ + ": the backend ran out of file descriptors while starting");
    throw ProcessDied(fullName_ + ": the backend died while starting (" + how + ")");
  }
  if (!m) {
    child_->signal(SIGKILL);
    child_->abandon();
    const ExitStatus s = child_->wait(Timeout(5000));
    throw TimeoutError(fullName_ + ": the backend was not ready within " + ms(options_.startTimeout) + " (" +
                       s.describe() + ")");
  }
  if (m->command() == detail::control::kFailed) {
    const std::string why = m->get<std::string>("error", "unknown error");
    throw Error(fullName_ + ": preRun__ failed in the backend: " + why + " (" + endedHow(d) + ")");
  }
  if (m->command() != detail::control::kReady)
    throw Error(fullName_ + ": unexpected first message '" + m->command() + "'");
}

// Runs on the backend side (child or thread). Exit codes in exit_status.hpp.
int MessageProcess::runBackend(Channel cmd, Channel out, int stopBell) {
  t_backendOf = this;
  detail::BackendConfig config;
  config.who = fullName_;
  for (auto& entry : handlers_) {
    const Handler& h = entry.second;
    config.commands.emplace(entry.first, [this, &h](const Message& m, Reply& r) { return h(*this, m, r); });
  }
  config.outQueueBytes = options_.outQueueBytes;
  config.outWait = options_.outWait;
  config.makeLog = [this] { return makeLogger(fullName_, options_.logFile); };
  config.userGone = &destroying_;
  config.stopBell = stopBell;
  backend_ = std::make_shared<detail::Backend>(std::move(config), std::move(cmd), std::move(out));
  detail::Backend& b = *backend_;
  int code = 0;
  std::string failure;
  try {
    preRun__();
  } catch (const std::exception& e) {
    failure = e.what();
  } catch (...) {
    failure = "a non-standard exception";
  }
  if (!failure.empty()) {
    b.log().error("preRun__ failed: {}", failure);
    b.sendFailed(failure);
    backend_.reset();
    return kExitPreRunFailed;
  }
  b.sendReady();
  if (b.logs(spdlog::level::debug)) b.log().debug("running, pid {}", ::getpid());
  b.run();
  if (!b.userGone()) {
    try {
      postRun__();
    } catch (const std::exception& e) {
      b.log().error("postRun__ failed: {}", e.what());
      code = kExitPostRunFailed;
    } catch (...) {
      b.log().error("postRun__ failed: a non-standard exception");
      code = kExitPostRunFailed;
    }
  }
  if (b.corrupt()) code = kExitCorruptStream;
  b.flush(Timeout(1000));
  if (b.logs(spdlog::level::debug)) b.log().debug("leaving with code {}", code);
  backend_.reset();
  return code;
}

// The served child's copy of the object is the one the fork server holds;
// it learns here what start() sets up before an ordinary fork.
int detail::runServed(MessageProcess& p, ServedCall& c) {
  p.frontendPid_ = c.frontendPid;
  p.fullName_ = className(typeid(p)) + "." + p.name_;
  return p.runBackend(Channel(c.cmdFd, p.options_.limits), Channel(c.outFd, p.options_.limits), c.bellFd);
}

// ---------------------------------------------------------------- frontend commands

// The calls of the running backend. A reference: requests_ changes only in
// start(), which no other frontend method may overlap.
detail::Requests& MessageProcess::requests(const char* method, const std::string& command) {
  frontendOnly(method);
  if (state_.load() != State::Running || !requests_)
    throw Error(fullName_ + ": " + method + " '" + command + "' before start or after stop");
  return *requests_;
}

void MessageProcess::send(const std::string& command, Map args) { send(Message(command, std::move(args))); }

void MessageProcess::send(Message m) { requests("send", m.command()).send(m, options_.sendTimeout); }

Value MessageProcess::call(const std::string& command, Map args) {
  return call(command, std::move(args), options_.callTimeout);
}

Value MessageProcess::call(const std::string& command, Map args, Timeout timeout) {
  detail::Requests& r = requests("call", command);
  Message m(command, std::move(args));
  auto slot = r.call(m, timeout, {}, true);
  r.wait(*slot, slot->deadline);
  return slot->result.take();  // the slot is ours alone now: no copy
}

CallFuture MessageProcess::callAsync(const std::string& command, Map args) {
  return callAsync(command, std::move(args), options_.callTimeout);
}

CallFuture MessageProcess::callAsync(const std::string& command, Map args, Timeout timeout) {
  detail::Requests& r = requests("callAsync", command);
  Message m(command, std::move(args));
  auto slot = r.call(m, timeout);
  return CallFuture(requests_, std::move(slot));
}

void MessageProcess::callAsync(const std::string& command, Map args, Timeout timeout,
                               std::function<void(CallResult)> onDone) {
  Message m(command, std::move(args));
  requests("callAsync", command).call(m, timeout, std::move(onDone));
}

int MessageProcess::fd() const noexcept { return out_.fd(); }
int MessageProcess::replyFd() const noexcept { return requests_ ? requests_->fd() : -1; }
int MessageProcess::deathFd() const noexcept { return child_ ? child_->deathFd() : -1; }

void MessageProcess::pumpReplies() {
  if (requests_) requests_->pump();
}

void MessageProcess::setCallbackDispatcher(std::function<void(std::function<void()>)> dispatch) {
  if (requests_) requests_->setDispatcher(std::move(dispatch));
}

std::optional<Deadline::Clock::time_point> MessageProcess::nextCallbackDeadline() {
  return requests_ ? requests_->nextCallbackDeadline() : std::nullopt;
}

std::optional<Message> MessageProcess::recv(Timeout timeout) {
  frontendOnly("recv");
  if (!out_.valid()) throw Error(fullName_ + ": recv before start");
  std::lock_guard lock(recvMutex_);
  std::optional<Message> m;
  const Deadline d(timeout);
  try {
    m = out_.recv(timeout);
  } catch (const StreamCorrupt&) {
    throw;
  } catch (const PeerClosed&) {
    throwEnded("recv", d);
  }
  if (m && m->command() == detail::control::kCommandError) {
    const std::string command = m->get<std::string>("command", "");
    throw CommandError(command, m->get<std::string>("error", fullName_ + ": '" + command + "' failed"));
  }
  return m;
}

// How the backend ended, waiting for its status until `d` at most (its
// channel's end comes a moment before its death). A backend that closed its
// channel and lives on (stopped, or hostile) is said to be so, at once
// past the caller's deadline: no wait here has a bound of its own.
std::string MessageProcess::endedHow(const Deadline& d) {
  if (!child_) return "ended";
  const Deadline upTo(std::min<Timeout>(kEndGrace, std::chrono::ceil<Timeout>(d.remaining())));
  const ExitStatus s = child_->waitWithin(upTo);
  // True of a backend that shut its channel and lives on, and of one caught
  // between its channel's end and its death (a pump, which waits for
  // nothing, often is): the status comes with the death (Manager: onExit).
  if (s.how == ExitStatus::How::Running) return "its channel ended while it still ran, pid " + std::to_string(pid_);
  return s.describe();
}

void MessageProcess::throwEnded(const std::string& during, const Deadline& d) {
  const std::string how = endedHow(d);
  if (stopRequested_) throw PeerClosed(fullName_ + ": the backend has stopped (" + how + ")");
  throw ProcessDied(fullName_ + ": the backend died during " + during + " (" + how + ")");
}

// ---------------------------------------------------------------- stop

void MessageProcess::requestStop() {
  frontendOnly("requestStop");
  if (state_.load() != State::Running || !requests_) return;
  if (stopRequested_.exchange(true)) return;
  if (lifecycleLogged()) logger().debug("stop requested");
  requests_->ringStop();
}

ExitStatus MessageProcess::waitStop(Timeout timeout) {
  frontendOnly("waitStop");
  if (state_.load() != State::Running || !child_) return ExitStatus{};
  const ExitStatus s = child_->wait(timeout);
  if (s.ended()) finishRun(s);
  return s;
}

// Once the backend ended: calls still waiting fail, the command channel
// closes. The output channel stays: its last messages can still be read.
void MessageProcess::finishRun(const ExitStatus& s) {
  if (requests_) requests_->close({stopRequested_, s.describe(), nullptr});
}

ExitStatus MessageProcess::stop() { return stop(options_.stopTimeout); }

ExitStatus MessageProcess::stop(Timeout timeout) {
  frontendOnly("stop");
  if (state_.load() != State::Running || !child_) return ExitStatus{};
  MessageProcess* self = this;
  stopAll(std::span<MessageProcess* const>(&self, 1), timeout);
  return child_->wait(Timeout::zero());
}

void MessageProcess::stopAll(std::span<MessageProcess* const> processes, Timeout timeout) {
  std::vector<detail::Child*> children;
  std::vector<MessageProcess*> running;
  for (MessageProcess* p : processes) {
    p->frontendOnly("stop");
    if (p->state_.load() != State::Running || !p->child_) continue;
    if (!p->child_->ended()) p->requestStop();  // everyone at once
    children.push_back(p->child_.get());
    running.push_back(p);
  }
  detail::stopChildren(children, detail::Ladder{timeout}, [&](detail::Child& c, int sig) {
    for (MessageProcess* p : running) {
      if (p->child_.get() != &c) continue;
      if (sig == SIGTERM)
        p->logger().warn("the backend did not stop within {}; sending SIGTERM", ms(timeout));
      else
        p->logger().warn("the backend ignored SIGTERM; sending SIGKILL");
    }
  });
  for (MessageProcess* p : running) {
    const ExitStatus s = p->child_->wait(Timeout::zero());
    if (s.how == ExitStatus::How::Abandoned && timeout > Timeout::zero())
      p->logger().error("the in-process backend did not stop within {} and a thread cannot be killed; abandoned it",
                        ms(timeout));
    else if (s.how == ExitStatus::How::Abandoned)  // stop(0): the caller chose not to wait (a pool's task timeout)
      p->logger().warn("the in-process backend was still running when stop was asked not to wait, and a thread "
                       "cannot be killed; abandoned it");
    if (s.ended()) p->finishRun(s);
    if (lifecycleLogged()) p->logger().debug("ended: {}", s.describe());
  }
}

void MessageProcess::signal(int sig) {
  frontendOnly("signal");
  if (state_.load() == State::Running && child_) child_->signal(sig);
}

bool MessageProcess::isAlive() const {
  frontendOnly("isAlive");
  if (state_.load() != State::Running || !child_) return false;
  return !detail::waitFor(child_->deathFd(), POLLIN, Deadline(Timeout::zero()));
}

// ---------------------------------------------------------------- backend API

void MessageProcess::sendOut__(const Message& m) { backendSide("sendOut__").sendOut(m); }

void MessageProcess::watch__(int fd, std::function<void(int)> onReady, bool writable) {
  backendSide("watch__").watch(fd, std::move(onReady), writable);
}

void MessageProcess::unwatch__(int fd) { backendSide("unwatch__").unwatch(fd); }

std::uint64_t MessageProcess::after__(Timeout delay, std::function<void()> fn) {
  return backendSide("after__").addTimer(delay, Timeout::zero(), std::move(fn));
}

std::uint64_t MessageProcess::every__(Timeout period, std::function<void()> fn) {
  if (period < Timeout(1)) throw Error(fullName_ + ": every__: the period must be 1 ms or more, not " + ms(period));
  return backendSide("every__").addTimer(period, period, std::move(fn));
}

void MessageProcess::cancel__(std::uint64_t timerId) { backendSide("cancel__").cancel(timerId); }

void MessageProcess::stopLoop__() { backendSide("stopLoop__").requestStop(); }

}  // namespace forklift
