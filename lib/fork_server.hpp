// forklift - the fork server's recipes and its frontend connection (internal)
//
// Recipes are what the fork server can run: functions registered in this
// process before the server forked, so the server holds copies of them. Each
// MessageProcess registers one for itself when it is made (it runs the
// object's backend) and binds itself to it; a WorkerPool registers its
// factory once and binds each worker it makes to it (with the worker's
// place as the argument). A key is known to a server when it was registered
// before the server started; keys are never reused, so a changed recipe gets
// a key no server knows. The registry is safe from any thread and across
// forks (its lock is taken around every fork).
//
// `ForkServerConn` is this process's end of the server's socket (a
// SOCK_SEQPACKET pair): `spawn` sends a request with the child's channel
// ends and gets back a pid and the pidfd the server opened before it could
// reap the child (or its death pipe); exit statuses come on the same socket,
// by spawn id, and are kept until their child asks (`takeStatus`). One
// thread talks to the server at a time (a mutex); no wait is unbounded.
// Served children hold the connection (shared_ptr); once no ForkServer
// handle does (`retire`), the server ends when its last child's status came.
//
// Payloads: a binding may carry bytes (up to kMaxRecipePayload) that travel
// with each start to the served child (`ServedCall::payload`): one recipe
// registered before the server started can then make objects the server has
// no copy of, from a description (the cluster's remote backends: a class
// name and constructor arguments). Only a served start carries it: a start
// the server cannot serve runs the object's own backend in a fork of this
// process, so a caller that needs the payload checks `Child::wouldServe`.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "child.hpp"
#include "forklift/detail/fd.hpp"
#include "forklift/exit_status.hpp"
#include "forklift/timeout.hpp"

namespace forklift {
class MessageProcess;
}

namespace forklift::detail {

// What a served child gets: its descriptors and the recipe's argument.
struct ServedCall {
  int cmdFd = -1;
  int outFd = -1;
  int bellFd = -1;
  pid_t frontendPid = 0;
  std::uint64_t arg = 0;
  std::string payload;  // the binding's bytes (see "Payloads")
};
// The most bytes a binding's payload may hold (it travels in one datagram).
inline constexpr std::size_t kMaxRecipePayload = 60u << 10;

// Runs in the served child; returns the exit code.
using Recipe = std::function<int(ServedCall&)>;

namespace recipes {
std::uint64_t add(Recipe r);
void remove(std::uint64_t key);
// The next key to be given (a server started now knows the keys below it).
std::uint64_t nextKey();
// `object` starts through `key` with `arg` and `payload` (LimitError past
// kMaxRecipePayload bytes; the binding is unchanged then).
void bind(const void* object, std::uint64_t key, std::uint64_t arg, std::string payload = {});
// Registers a recipe owned by `object` and binds the object to it.
void bindOwn(const void* object, Recipe r);
// Unbinds `object` and removes the recipe it owns.
void forget(const void* object);
struct Binding {
  std::uint64_t key;
  std::uint64_t arg;
  std::string payload;
};
std::optional<Binding> bound(const void* object);
}  // namespace recipes

// Runs `p`'s backend in a served child (process.cpp).
int runServed(MessageProcess& p, ServedCall& c);

class ForkServerConn {
 public:
  struct Spawned {
    std::uint64_t id = 0;
    pid_t pid = -1;
    UniqueFd deathFd;
    bool isPidfd = true;
  };

  ForkServerConn(pid_t pid, UniqueFd sock, std::uint64_t firstUnknownKey);
  ~ForkServerConn();  // ends the server (EOF) and reaps it
  ForkServerConn(const ForkServerConn&) = delete;
  ForkServerConn& operator=(const ForkServerConn&) = delete;

  pid_t pid() const noexcept { return pid_; }
  bool knows(std::uint64_t recipe) const noexcept { return recipe != 0 && recipe < firstUnknown_; }
  // Why it cannot serve any more (it died), or nullopt while it answers.
  std::optional<std::string> lost();
  // Starts a child (Error, SystemError or TimeoutError naming `setup.title`).
  Spawned spawn(const ChildSetup& setup, const ServedStart& s);
  // The relayed status of an ended child, waiting until `d` for it;
  // Unknown when it cannot come (the server died: `serverLost`), nullopt
  // when it did not come in time (the server is slow or stopped).
  std::optional<ExitStatus> takeStatus(std::uint64_t id, const Deadline& d);
  // For children watched without a pidfd: the server signals its child.
  void signal(std::uint64_t id, int sig);
  void forget(std::uint64_t id);
  // No handle wants it any more: it ends now, or when the last child it
  // forked has ended and its status came.
  void retire();

 private:
  enum class Read : std::uint8_t { Status, Spawned, Timeout, Lost };
  Read readOne(const Deadline& d, Spawned* reply, int* err, std::string* what);  // mu_ held
  void markLost(const std::string& why);                                        // mu_ held
  void reapServer(Timeout timeout);                                              // mu_ held
  void shutDown();                                                               // mu_ held

  const pid_t pid_;
  UniqueFd sock_;
  const std::uint64_t firstUnknown_;
  std::mutex mu_;
  std::unordered_map<std::uint64_t, ExitStatus> statuses_;
  std::optional<std::string> lost_;
  std::unordered_set<std::uint64_t> live_;  // spawned, no status yet
  bool retiring_ = false;
  bool reaped_ = false;
};

// This process's fork server, or null.
std::shared_ptr<ForkServerConn> currentForkServer();

}  // namespace forklift::detail
