#include "fork_server.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <thread>
#include <unordered_set>
#include <vector>

#include "forklift/error.hpp"
#include "forklift/fork_server.hpp"
#include "posix.hpp"
#include "seams.hpp"

namespace forklift::detail {

// ---------------------------------------------------------------- recipes

namespace {

struct Bound {
  std::uint64_t own = 0;  // the recipe the object registered for itself
  std::uint64_t key = 0;
  std::uint64_t arg = 0;
  std::string payload;
};

struct Recipes {
  std::mutex mu;
  std::uint64_t next = 1;
  std::unordered_map<std::uint64_t, Recipe> byKey;
  std::unordered_map<const void*, Bound> objects;
};

Recipes& registry() {
  static Recipes* r = [] {
    auto* made = new Recipes;  // never destroyed: objects unregister during static destruction
    // Nobody holds the lock across a fork: a child can register at once.
    ::pthread_atfork([] { registry().mu.lock(); }, [] { registry().mu.unlock(); },
                     [] { registry().mu.unlock(); });
    return made;
  }();
  return *r;
}

}  // namespace

namespace recipes {

std::uint64_t add(Recipe r) {
  Recipes& g = registry();
  std::lock_guard lock(g.mu);
  const std::uint64_t key = g.next++;
  g.byKey.emplace(key, std::move(r));
  return key;
}

void remove(std::uint64_t key) {
  Recipes& g = registry();
  std::lock_guard lock(g.mu);
  g.byKey.erase(key);
}

std::uint64_t nextKey() {
  Recipes& g = registry();
  std::lock_guard lock(g.mu);
  return g.next;
}

void bind(const void* object, std::uint64_t key, std::uint64_t arg, std::string payload) {
  if (payload.size() > kMaxRecipePayload)
    throw LimitError("forklift: a recipe's payload of " + std::to_string(payload.size()) +
                     " bytes is over the fork server's limit of " + std::to_string(kMaxRecipePayload) + " bytes");
  Recipes& g = registry();
  std::lock_guard lock(g.mu);
  Bound& b = g.objects[object];
  b.key = key;
  b.arg = arg;
  b.payload = std::move(payload);
}

void bindOwn(const void* object, Recipe r) {
  Recipes& g = registry();
  std::lock_guard lock(g.mu);
  const std::uint64_t key = g.next++;
  g.byKey.emplace(key, std::move(r));
  g.objects[object] = Bound{key, key, 0, {}};
}

void forget(const void* object) {
  Recipes& g = registry();
  std::lock_guard lock(g.mu);
  auto it = g.objects.find(object);
  if (it == g.objects.end()) return;
  if (it->second.own) g.byKey.erase(it->second.own);
  g.objects.erase(it);
}

std::optional<Binding> bound(const void* object) {
  Recipes& g = registry();
  std::lock_guard lock(g.mu);
  auto it = g.objects.find(object);
  if (it == g.objects.end()) return std::nullopt;
  return Binding{it->second.key, it->second.arg, it->second.payload};
}

}  // namespace recipes

// ---------------------------------------------------------------- wire

namespace {

// One record per SOCK_SEQPACKET message; a spawn request is followed by the
// title's bytes and the payload's, and carries 3 descriptors, a spawn reply
// 1 (when err is 0).
struct Wire {
  char type = 0;          // 'S' spawn, 'K' signal; 'P' spawned, 'X' exited
  std::uint8_t flag = 0;  // S: ignore SIGINT; P: the descriptor is a pidfd
  std::int32_t a = 0;     // S: frontend pid; K: signal; P: errno; X: si_code
  std::int32_t b = 0;     // P: pid; X: si_status
  std::uint64_t id = 0;   // S: recipe; K, P, X: spawn id
  std::uint64_t arg = 0;  // S: the recipe's argument
  std::uint32_t titleBytes = 0;  // S: the tail's first bytes; the payload follows
  char comm[16] = {};     // S
  char what[32] = {};     // P: the call that failed
};

constexpr std::size_t kMaxTitle = 1024;
constexpr std::size_t kMaxTail = kMaxTitle + kMaxRecipePayload;

void copyTo(char* dst, std::size_t size, const std::string& s) {
  const std::size_t n = std::min(size - 1, s.size());
  std::memcpy(dst, s.data(), n);
  dst[n] = '\0';
}

ssize_t sendWire(int sock, const Wire& w, const std::string& tail, const int* fds, int nfds, int flags = 0) {
  iovec iov[2] = {{const_cast<Wire*>(&w), sizeof w}, {const_cast<char*>(tail.data()), tail.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = tail.empty() ? 1 : 2;
  alignas(cmsghdr) char control[CMSG_SPACE(3 * sizeof(int))] = {};
  if (nfds > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(static_cast<std::size_t>(nfds) * sizeof(int));
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(static_cast<std::size_t>(nfds) * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds, static_cast<std::size_t>(nfds) * sizeof(int));
  }
  return retryEintr([&] { return ::sendmsg(sock, &msg, MSG_NOSIGNAL | flags); });
}

// Reads one message; received descriptors go to `fds` (owned, close-on-exec).
// Returns the bytes read (0 at EOF) or -1.
ssize_t recvWire(int sock, Wire& w, std::string* tail, std::vector<UniqueFd>& fds) {
  // Only requests have a tail (the server's reads); replies are records alone.
  std::vector<char> buf(tail ? kMaxTail : 0);
  iovec iov[2] = {{&w, sizeof w}, {buf.data(), buf.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = tail ? 2 : 1;
  alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  const ssize_t r = retryEintr([&] { return ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); });
  if (r <= 0) return r;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);
    }
  }
  if (static_cast<std::size_t>(r) < sizeof w) {
    errno = EPROTO;  // every message starts with a whole record
    return -1;
  }
  if (tail) tail->assign(buf.data(), static_cast<std::size_t>(r) - sizeof w);
  return r;
}

// ---------------------------------------------------------------- the server

// One spawn: answers with 'P' (and the child's death descriptor).
void serveSpawn(int sock, const Wire& req, const std::string& tail, std::vector<UniqueFd>& fds,
                std::unordered_map<pid_t, std::uint64_t>& children, std::uint64_t& nextId) {
  Wire reply;
  reply.type = 'P';
  reply.id = nextId++;
  auto fail = [&](int err, const char* what) {
    reply.a = err;
    copyTo(reply.what, sizeof reply.what, what);
    sendWire(sock, reply, {}, nullptr, 0);
  };
  if (fds.size() != 3) return fail(EINVAL, "descriptors");
  if (req.titleBytes > tail.size()) return fail(EINVAL, "title");
  const std::string title = tail.substr(0, req.titleBytes);
  const Recipe* recipe = nullptr;
  {
    Recipes& g = registry();
    auto it = g.byKey.find(req.id);
    if (it != g.byKey.end()) recipe = &it->second;
  }
  if (!recipe) return fail(ENOENT, "recipe");
  ChildSetup setup;
  setup.comm = std::string(req.comm, strnlen(req.comm, sizeof req.comm));
  setup.title = title;
  setup.ignoreSigint = req.flag != 0;
  setup.termFrom = ::getppid();  // the frontend: it signals its served children through pidfds
  UniqueFd deathRead, deathWrite;
  const bool pidfds = pidfdsWork();
  if (!pidfds) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) return fail(errno, "pipe2");
    deathRead.reset(p[0]);
    deathWrite.reset(p[1]);
  }
  ServedCall call{fds[0].get(), fds[1].get(), fds[2].get(), static_cast<pid_t>(req.a), req.arg,
                  tail.substr(req.titleBytes)};
  const pid_t pid = forkBackend(setup, [&] { return (*recipe)(call); }, deathWrite.get(), deathRead.get());
  const int forkErr = errno;
  fds.clear();
  deathWrite.reset();
  if (pid < 0) return fail(forkErr, "fork");
  UniqueFd death = pidfds ? UniqueFd(syscalls.pidfdOpen(pid, 0)) : std::move(deathRead);
  if (!death) {
    const int err = errno;
    ::kill(pid, SIGKILL);
    retryEintr([&] { return ::waitpid(pid, nullptr, 0); });
    return fail(err, "pidfd_open");
  }
  children[pid] = reply.id;
  reply.flag = pidfds ? 1 : 0;
  reply.b = pid;
  const int fd = death.get();
  sendWire(sock, reply, {}, &fd, 1);
}

// The server's life: requests in, exit statuses out, until EOF. Statuses
// are sent without blocking and queued while the frontend does not read
// (it may be blocked sending a request): the server always reads requests.
int serveForever(int sock) {
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  ::pthread_sigmask(SIG_BLOCK, &chld, nullptr);
  UniqueFd sfd(::signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sfd) return 1;
  // Its children close both (they are set up as every backend is).
  frontend_fds::add({sock, sfd.get()});
  std::unordered_map<pid_t, std::uint64_t> children;
  std::deque<Wire> statuses;  // not sent yet
  std::uint64_t nextId = 1;
  auto flush = [&] {
    while (!statuses.empty()) {
      if (sendWire(sock, statuses.front(), {}, nullptr, 0, MSG_DONTWAIT) < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK;
      statuses.pop_front();
    }
    return true;
  };
  for (;;) {
    const short out = statuses.empty() ? 0 : POLLOUT;
    pollfd p[2] = {{sock, static_cast<short>(POLLIN | out), 0}, {sfd.get(), POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return 1;
    }
    if (p[1].revents & POLLIN) {
      signalfd_siginfo si;
      while (::read(sfd.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
      }
      for (;;) {
        siginfo_t info{};
        if (::waitid(P_ALL, 0, &info, WEXITED | WNOHANG) < 0 || info.si_pid == 0) break;
        auto it = children.find(info.si_pid);
        if (it == children.end()) continue;
        Wire x;
        x.type = 'X';
        x.id = it->second;
        x.a = info.si_code;
        x.b = info.si_status;
        children.erase(it);
        statuses.push_back(x);
      }
    }
    if (!flush()) return 1;
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      Wire req;
      std::string tail;
      std::vector<UniqueFd> fds;
      const ssize_t r = recvWire(sock, req, &tail, fds);
      if (r == 0) return 0;  // the frontend is gone: so are we, and our children with us
      if (r < 0) {
        if (errno == EAGAIN) continue;
        return 1;
      }
      if (req.type == 'S') {
        serveSpawn(sock, req, tail, fds, children, nextId);
      } else if (req.type == 'K') {
        for (const auto& [pid, id] : children)
          if (id == req.id) ::kill(pid, req.a);
      }
    }
  }
}

// ---------------------------------------------------------------- this process's server

struct Global {
  std::mutex mu;
  std::shared_ptr<ForkServerConn> conn;
  int handles = 0;
  Global* parent = nullptr;  // a forked child keeps its parent's, untouched (and reachable)
};

Global*& global() {
  static Global* g = [] {
    // A forked child has no server: its parent's is not its own.
    ::pthread_atfork(nullptr, nullptr, [] {
      auto* fresh = new Global;
      fresh->parent = global();
      global() = fresh;
    });
    return new Global;
  }();
  return g;
}

ExitStatus statusOf(int code, int status) {
  ExitStatus s;
  if (code == CLD_EXITED) {
    s.how = ExitStatus::How::Exited;
    s.code = status;
  } else {
    s.how = ExitStatus::How::Signaled;
    s.signal = status;
  }
  return s;
}

std::shared_ptr<ForkServerConn> startServer() {
  if (const int threads = otherThreads(); threads > 0)
    throw Error("forklift::ForkServer: cannot start the fork server: this process already runs " +
                std::to_string(threads + 1) +
                " threads, and the server must be forked while it runs one (it would inherit locks the others "
                "hold). Start it before any thread: Manager::runAsThread starts one itself before its thread.");
  int sv[2];
  if (syscalls.socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
    throwErrno("forklift::ForkServer: cannot create the fork server's socketpair");
  UniqueFd front(sv[0]);
  UniqueFd back(sv[1]);
  // Backends forked later (and the server itself) close the frontend's end.
  frontend_fds::add({front.get()});
  const std::uint64_t firstUnknown = recipes::nextKey();
  ChildSetup setup;
  setup.comm = "fork-server";
  setup.title = "forklift: fork server";
  setup.ignoreSigint = true;  // Ctrl-C reaches the process group; the frontend decides
  const int serverEnd = back.get();
  const pid_t pid = forkBackend(setup, [serverEnd] { return serveForever(serverEnd); }, -1);
  const int err = errno;
  back.reset();
  if (pid < 0) {
    frontend_fds::remove({front.get()});
    throw SystemError(err, "forklift::ForkServer: cannot fork the fork server (fork)");
  }
  return std::make_shared<ForkServerConn>(pid, std::move(front), firstUnknown);
}

}  // namespace

std::shared_ptr<ForkServerConn> currentForkServer() {
  Global* g = global();
  std::lock_guard lock(g->mu);
  return g->conn;
}

// ---------------------------------------------------------------- the connection

ForkServerConn::ForkServerConn(pid_t pid, UniqueFd sock, std::uint64_t firstUnknownKey)
    : pid_(pid), sock_(std::move(sock)), firstUnknown_(firstUnknownKey) {}

ForkServerConn::~ForkServerConn() {
  std::lock_guard lock(mu_);
  shutDown();
}

void ForkServerConn::shutDown() {
  if (!sock_) return;
  frontend_fds::remove({sock_.get()});
  sock_.reset();  // EOF: the server leaves
  reapServer(Timeout(2000));
  if (!reaped_) {
    ::kill(pid_, SIGKILL);
    reapServer(Timeout(2000));
  }
  if (!lost_) lost_ = "the fork server (pid " + std::to_string(pid_) + ") was stopped (its last ForkServer was released)";
}

void ForkServerConn::retire() {
  std::lock_guard lock(mu_);
  retiring_ = true;
  while (!lost_ && readOne(Deadline(Timeout::zero()), nullptr, nullptr, nullptr) == Read::Status) {
  }
  if (live_.empty()) shutDown();
}

void ForkServerConn::reapServer(Timeout timeout) {
  const Deadline d(timeout);
  while (!reaped_) {
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_ || (r < 0 && errno == ECHILD)) {
      reaped_ = true;
      if (r == pid_ && !lost_) {
        const ExitStatus s =
            WIFEXITED(status) ? statusOf(CLD_EXITED, WEXITSTATUS(status)) : statusOf(CLD_KILLED, WTERMSIG(status));
        lost_ = "the fork server (pid " + std::to_string(pid_) + ") " + s.describe();
      }
      return;
    }
    if (d.expired()) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

void ForkServerConn::markLost(const std::string& why) {
  if (lost_) return;
  reapServer(Timeout(1000));
  const std::string how = lost_ ? *lost_ : "the fork server (pid " + std::to_string(pid_) + ") " + why;
  lost_ = how + "; every backend it forked died with it";
}

ForkServerConn::Read ForkServerConn::readOne(const Deadline& d, Spawned* reply, int* err, std::string* what) {
  if (lost_ || !sock_) return Read::Lost;
  if (!waitFor(sock_.get(), POLLIN, d)) return Read::Timeout;
  Wire w;
  std::vector<UniqueFd> fds;
  const ssize_t r = recvWire(sock_.get(), w, nullptr, fds);
  if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
    markLost(r == 0 ? "closed its socket" : std::string("cannot be read: ") + std::strerror(errno));
    return Read::Lost;
  }
  if (r < 0) return Read::Timeout;
  if (w.type == 'X') {
    statuses_[w.id] = statusOf(w.a, w.b);
    live_.erase(w.id);
    if (retiring_ && live_.empty()) shutDown();  // its last child is gone
    return Read::Status;
  }
  if (w.type != 'P' || !reply) return Read::Status;  // nothing else comes; a reply nobody asked for is dropped
  reply->id = w.id;
  reply->pid = w.b;
  reply->isPidfd = w.flag != 0;
  *err = w.a;
  *what = std::string(w.what, strnlen(w.what, sizeof w.what));
  if (w.a == 0) {
    if (fds.size() != 1) {
      *err = EPROTO;
      *what = "the reply's descriptor";
    } else {
      reply->deathFd = std::move(fds[0]);
    }
  }
  return Read::Spawned;
}

std::optional<std::string> ForkServerConn::lost() {
  std::lock_guard lock(mu_);
  // Statuses (or EOF) waiting are read now, so a dead server is seen.
  while (!lost_ && readOne(Deadline(Timeout::zero()), nullptr, nullptr, nullptr) == Read::Status) {
  }
  return lost_;
}

ForkServerConn::Spawned ForkServerConn::spawn(const ChildSetup& setup, const ServedStart& s) {
  std::lock_guard lock(mu_);
  const std::string who = setup.title + ": ";
  if (lost_) throw Error(who + "cannot start it through the fork server: " + *lost_);
  Wire req;
  req.type = 'S';
  req.flag = setup.ignoreSigint ? 1 : 0;
  req.a = ::getpid();
  req.id = s.recipe;
  req.arg = s.arg;
  copyTo(req.comm, sizeof req.comm, setup.comm);
  if (s.payload.size() > kMaxRecipePayload)
    throw LimitError(who + "the start's payload of " + std::to_string(s.payload.size()) +
                     " bytes is over the fork server's limit of " + std::to_string(kMaxRecipePayload) + " bytes");
  std::string tail = setup.title.substr(0, kMaxTitle);
  req.titleBytes = static_cast<std::uint32_t>(tail.size());
  tail += s.payload;
  const int fds[3] = {s.cmdFd, s.outFd, s.bellFd};
  if (sendWire(sock_.get(), req, tail, fds, 3) < 0) {
    const int e = errno;
    markLost(std::string("cannot be written to: ") + std::strerror(e));
    throw Error(who + "cannot start it through the fork server: " + *lost_);
  }
  // The start's own deadline (ProcessOptions::startTimeout), not one of
  // ours: a stopped or slow server fails the start when the caller said.
  const Deadline& d = setup.startBy;
  for (;;) {
    Spawned out;
    int err = 0;
    std::string what;
    switch (readOne(d, &out, &err, &what)) {
      case Read::Status: continue;
      case Read::Lost: throw Error(who + "cannot start it through the fork server: " + *lost_);
      case Read::Timeout:
        throw TimeoutError(who + "the fork server (pid " + std::to_string(pid_) +
                           ") did not answer within the start's timeout");
      case Read::Spawned:
        if (err == ENOENT && what == "recipe")
          throw Error(who + "the fork server has no recipe for it (it was made after the server started)");
        if (err != 0)
          throw SystemError(err, who + "the fork server cannot start the backend (" + what + ")");
        live_.insert(out.id);
        return out;
    }
  }
}

std::optional<ExitStatus> ForkServerConn::takeStatus(std::uint64_t id, const Deadline& d) {
  std::lock_guard lock(mu_);
  for (;;) {
    if (auto it = statuses_.find(id); it != statuses_.end()) {
      const ExitStatus s = it->second;
      statuses_.erase(it);
      return s;
    }
    if (lost_) {
      ExitStatus s{ExitStatus::How::Unknown};
      s.serverLost = true;
      return s;
    }
    if (readOne(d, nullptr, nullptr, nullptr) == Read::Timeout) return std::nullopt;
  }
}

void ForkServerConn::signal(std::uint64_t id, int sig) {
  std::lock_guard lock(mu_);
  if (lost_) return;
  Wire k;
  k.type = 'K';
  k.id = id;
  k.a = sig;
  sendWire(sock_.get(), k, {}, nullptr, 0);
}

void ForkServerConn::forget(std::uint64_t id) {
  std::lock_guard lock(mu_);
  statuses_.erase(id);
}

}  // namespace forklift::detail

// ---------------------------------------------------------------- the handle

namespace forklift {

ForkServer::ForkServer() : owner_(::getpid()) {
  detail::Global* g = detail::global();
  std::shared_ptr<detail::ForkServerConn> dead;
  std::lock_guard lock(g->mu);
  if (!g->conn || g->conn->lost()) {
    dead = std::move(g->conn);
    g->conn = detail::startServer();
  }
  ++g->handles;
}

ForkServer::~ForkServer() {
  if (::getpid() != owner_) return;  // a forked child's copy
  std::shared_ptr<detail::ForkServerConn> last;
  detail::Global* g = detail::global();
  {
    std::lock_guard lock(g->mu);
    if (g->handles > 0 && --g->handles == 0) last = std::move(g->conn);
  }
  // Outside the lock: the server ends now, or once the last backend it
  // forked has ended (its status relayed).
  if (last) last->retire();
}

bool ForkServer::running() {
  auto conn = detail::currentForkServer();
  return conn && !conn->lost();
}

pid_t ForkServer::pid() {
  auto conn = detail::currentForkServer();
  return conn && !conn->lost() ? conn->pid() : -1;
}

}  // namespace forklift
