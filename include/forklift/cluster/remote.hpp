// forklift::cluster - remote backends: a MessageProcess subclass started on
// another host, driven from the driver with MessageProcess's API
//
//   class Camera : public forklift::MessageProcess {
//    public:
//     Camera(std::string name, std::string device, int fps);   // name first
//     ...                                                        // c__ handlers
//   };
//
//   int main() {
//     forklift::cluster::defineProcess<Camera, std::string, int>("Camera", {"device", "fps"});
//     forklift::cluster::Agent agent;               // then the Agent, then the World
//     forklift::cluster::World world;
//     if (!world.isDriver()) return agent.serve(world);
//     auto cam = forklift::cluster::start<Camera>(world, 1, "cam0", {{"device", "/dev/video0"}, {"fps", 30}});
//     forklift::Value frame = cam.call("grab");     // runs Camera::c__grab on rank 1's host
//     cam.stop();                                   // how it ended, as a local stop() says
//   }
//
// Registering. `defineProcess<P, A...>(className, {argNames...})` says how to
// make a P from a map of constructor arguments: P(name, args[argNames[0]]
// as A0, ...), read as a c__ handler's parameters are (Message::get). Define
// every class before the World exists (Error otherwise, and when a fork
// server runs already or the name is taken): the agent's fork server, made by
// the World before MPI_Init, must hold the registry.
//
// How an agent starts one after MPI_Init. The agent's rank runs threads (MPI
// does), so it may not fork. It holds a plain frontend handle of its own
// (a MessageProcess with no commands, named `name`) bound to one fork-server
// recipe that cluster registers with the first defineProcess; the start
// carries the class name and the arguments to the server as the binding's
// payload (lib/fork_server.hpp, "Payloads"), and the server's child makes the
// P there, from the registry it inherited, and runs its backend. So user code
// (the constructor included) runs only in that forked child, never in an MPI
// rank, and the agent's handle watches, signals and stops the child as any
// served backend. The arguments are checked against the types in the agent
// first (no fork for a wrong one). A constructor that throws in the child
// fails the start with its message. The constructor runs once, in the child:
// resources it makes (shared memory) are the backend's; the agent's handle
// shares none of them. ProcessOptions a class sets for itself apply to its
// backend; the agent's handle uses RemoteOptions.
//
// Hosting. The agent serves remote backends on a thread of its own
// (RemoteHost, which Agent::serve makes), beside its pool: commands come
// through World::route("__cluster_proc."), and the thread polls every
// backend's out channel, replies and pidfd, and forwards what comes. A start
// (preRun__ included) and a stop's ladder run on threads of their own, so
// the other backends are served meanwhile; a send to a backend that does not
// read occupies the host's thread up to RemoteOptions::sendTimeout, and the
// other backends of that agent wait that long.
//
// The driver's handle, RemoteProcess, keeps MessageProcess's semantics:
//   - call(command, args[, timeout]): what the handler returned; RemoteError
//     with the backend's text (the handler threw, an unknown command, bad
//     arguments); TimeoutError at the timeout, counted on the driver (the
//     backend goes on serving; a late reply goes to no one); ProcessDied as
//     soon as the agent reports the backend's death, with its status.
//   - callAsync: a RemoteFuture, the same outcomes as a CallResult.
//   - send: fire and forget, queued at once. Throws ProcessDied when the
//     driver knows the backend ended. A failure in the backend (unknown
//     command, bad argument, the handler threw), or at the agent (the
//     backend did not read within RemoteOptions::sendTimeout, it died, the
//     message was refused), comes back through recv() as a CommandError
//     naming the command, in order with the messages: the difference from a
//     local send is that its TimeoutError and ProcessDied come this way.
//   - recv / tryRecv / fd(): the messages the backend sent with sendOut__,
//     in order; fd() (an eventfd) is readable exactly while one (or an
//     error, or the end) waits. After the end: the messages sent before,
//     then PeerClosed (asked to stop) or ProcessDied (died by itself).
//   - stop(timeout): the agent runs the local MessageProcess::stop ladder
//     (ask, wait `timeout`, SIGTERM, 500 ms, SIGKILL) and the driver returns
//     the ExitStatus it reports (escalation included); How::Running, logged,
//     when no end was reported within `timeout` + 10 s (the ladder's graces
//     and the travel). The destructor stops a running backend
//     (RemoteOptions::stopTimeout) and logs what fails.
//   - exitStatus(): the status once ended (ExitStatus::How::Running before).
// A start fails with Error naming the class, the host and the reason: an
// unknown class, a wrong or missing constructor argument (TypeError's text),
// a constructor or preRun__ that threw, no fork server on the agent; the
// agent goes on serving. Every error's text names the backend, its host and
// rank. Waits are bounded by their timeouts whatever the agent does. A
// start that timed out on the driver is followed by a stop, so a backend
// that starts late is ended; what it sent meanwhile reaches no
// RemoteProcess (the World's inbox, or the Pool's route, which drops it).
//
// A death: a backend that crashes or _exits kills its forked process only;
// its agent sees the pidfd at once and the driver learns it within the
// World's latency (about 10 ms for an idle World). An agent rank that dies
// aborts the whole job (Open MPI 4.1 has no fault tolerance): the driver's
// waits then end with the job.
//
// Threads: a RemoteProcess's methods may be called from several threads at
// once (calls are matched by id; recv is serialised). It must not outlive
// its World.
#pragma once

#include <sys/types.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <typeinfo>
#include <utility>

#include "forklift/call_future.hpp"
#include "forklift/error.hpp"
#include "forklift/exit_status.hpp"
#include "forklift/message.hpp"
#include "forklift/process.hpp"
#include "forklift/timeout.hpp"

namespace forklift::cluster {

class World;

namespace detail {
using MakeProcess = std::function<std::unique_ptr<MessageProcess>(std::string name, const Message& args)>;
using CheckArgs = std::function<void(const Message& args)>;
void defineProcess(const std::string& className, std::type_index type, CheckArgs check, MakeProcess make);
// The class name `type` was defined as (Error when it was not).
std::string classNameOf(std::type_index type);
}  // namespace detail

// Registers P as `className`: P(name, A0, A1, ...) with the arguments named
// `argNames`, in order (see "Registering").
template <class P, class... A, std::size_t N>
void defineProcess(const std::string& className, const char* const (&argNames)[N]) {
  static_assert(std::is_base_of_v<MessageProcess, P>, "defineProcess: P must be a MessageProcess subclass");
  static_assert(sizeof...(A) == N, "defineProcess: give one name per constructor argument after the name");
  std::array<std::string, N> names;
  for (std::size_t i = 0; i < N; ++i) names[i] = argNames[i];
  auto read = [names](const Message& m) {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
      return std::tuple<A...>{m.get<A>(names[I])...};
    }(std::index_sequence_for<A...>{});
  };
  detail::defineProcess(
      className, std::type_index(typeid(P)), [read](const Message& m) { (void)read(m); },
      [read](std::string name, const Message& m) -> std::unique_ptr<MessageProcess> {
        return std::apply([&](auto&&... a) { return std::make_unique<P>(std::move(name), std::move(a)...); },
                          read(m));
      });
}
// P(name), with no other constructor argument.
template <class P>
void defineProcess(const std::string& className) {
  static_assert(std::is_base_of_v<MessageProcess, P>, "defineProcess: P must be a MessageProcess subclass");
  detail::defineProcess(
      className, std::type_index(typeid(P)), [](const Message&) {},
      [](std::string name, const Message&) -> std::unique_ptr<MessageProcess> {
        return std::make_unique<P>(std::move(name));
      });
}

struct RemoteOptions {
  Timeout startTimeout = std::chrono::seconds(10);  // the agent's start, preRun__ included
  Timeout callTimeout = std::chrono::seconds(10);   // default of call() and callAsync()
  Timeout sendTimeout = std::chrono::seconds(10);   // the agent waits this long for a busy backend
  Timeout stopTimeout = std::chrono::seconds(5);    // default of stop() and of the destructor
};

namespace detail {
struct RemoteCall;
struct RemoteCore;
}  // namespace detail

// One call in flight (RemoteProcess::callAsync). Movable; a dropped future
// forgets its call.
class RemoteFuture {
 public:
  RemoteFuture() = default;
  bool valid() const noexcept { return call_ != nullptr; }
  // True once the reply or an error is there (never blocks).
  bool ready();
  // Waits up to `timeout` (at most until the call's own deadline); true
  // when ready.
  bool wait(Timeout timeout);
  // Waits (bounded by the call's timeout) and returns the value or throws
  // what call() would.
  Value get();
  CallResult result();

 private:
  friend class RemoteProcess;
  std::shared_ptr<detail::RemoteCore> core_;
  std::shared_ptr<detail::RemoteCall> call_;
};

class RemoteProcess {
 public:
  // Starts class `className` named `name` on agent rank `rank` and returns
  // once its backend is ready (see "A start fails"). TimeoutError past
  // startTimeout (plus a second for the reply to travel).
  RemoteProcess(World& world, int rank, const std::string& className, std::string name, Map args = {},
                RemoteOptions options = {});
  ~RemoteProcess();
  RemoteProcess(RemoteProcess&&) noexcept;
  RemoteProcess& operator=(RemoteProcess&&) noexcept;
  RemoteProcess(const RemoteProcess&) = delete;
  RemoteProcess& operator=(const RemoteProcess&) = delete;

  void send(const std::string& command, Map args = {});
  void send(Message m);
  Value call(const std::string& command, Map args = {});
  Value call(const std::string& command, Map args, Timeout timeout);
  RemoteFuture callAsync(const std::string& command, Map args = {});
  RemoteFuture callAsync(const std::string& command, Map args, Timeout timeout);

  int fd() const noexcept;
  std::optional<Message> recv(Timeout timeout);
  std::optional<Message> tryRecv() { return recv(Timeout::zero()); }

  ExitStatus stop();
  ExitStatus stop(Timeout timeout);
  // Not ended, as far as the driver has heard.
  bool isAlive() const;
  // How it ended; How::Running while it runs.
  ExitStatus exitStatus() const;

  int rank() const noexcept;
  const std::string& host() const noexcept;
  pid_t pid() const noexcept;  // the backend's pid on its host
  // "Camera.cam0 on host1 (rank 1)".
  const std::string& fullName() const noexcept;

 private:
  std::shared_ptr<detail::RemoteCore> core_;
};

// The same start, with the class name P was defined as.
template <class P>
RemoteProcess start(World& world, int rank, std::string name, Map args = {}, RemoteOptions options = {}) {
  return RemoteProcess(world, rank, detail::classNameOf(std::type_index(typeid(P))), std::move(name),
                       std::move(args), options);
}
// On the first agent whose host is `host` (Error when none is).
int agentOn(const World& world, const std::string& host);
template <class P>
RemoteProcess start(World& world, const std::string& host, std::string name, Map args = {},
                    RemoteOptions options = {}) {
  return start<P>(world, agentOn(world, host), std::move(name), std::move(args), options);
}

// The agent's side: serves the driver's remote backends on a thread of its
// own from construction to destruction (Agent::serve makes one; see
// "Hosting"). The destructor stops every backend still running (the
// driver's stop timeout, or RemoteOptions' default) and reports each end.
// Error on the driver or when another RemoteHost serves this World.
class RemoteHost {
 public:
  explicit RemoteHost(World& world);
  ~RemoteHost();
  RemoteHost(const RemoteHost&) = delete;
  RemoteHost& operator=(const RemoteHost&) = delete;

  // Backends running on this host now.
  std::size_t size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace forklift::cluster
