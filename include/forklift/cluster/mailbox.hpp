// forklift::cluster - Mailbox: where the messages a World received wait for
// the one consumer that reads them
//
// A World delivers every message it receives to exactly one mailbox: the
// World's own inbox (World::recv, tryRecv, fd, deliverTo) unless a consumer
// routed the message's command elsewhere with `World::route(prefix)`, which
// returns a mailbox of its own. That is how several parts of a program share
// one World without taking each other's messages: a cluster::Pool routes
// "__cluster_task", a remote backend its own commands, and the user's
// messages stay in the inbox.
//
//   auto box = world.route("camera.");          // "camera.frame", "camera.stats"
//   if (auto r = box->recv(std::chrono::seconds(1))) use(r->source, r->message);
//
// A mailbox is read in one of two ways at a time: by `recv`/`tryRecv` (its
// `fd()`, an eventfd, is readable while a message waits, so any event loop
// can watch it), or by a forklift Manager's loop after `deliverTo(manager,
// fn)`: every message, those waiting first, runs `fn(source, message)` there
// through Manager::post, in the order received. `deliverToInbox()` returns to
// the first way; when it returns, nothing more is posted to the manager.
// Messages posted to a manager whose loop ended do not run: end the exchange
// (deliverToInbox) before the manager goes.
//
// A mailbox has no bound: one that is never read keeps what comes. All its
// methods may be called from any thread; a message goes to one reader.
#pragma once

#include <functional>
#include <memory>
#include <optional>

#include "forklift/message.hpp"
#include "forklift/timeout.hpp"

namespace forklift {

class Manager;

namespace cluster {

struct Received {
  int source = -1;  // the rank that sent it
  Message message;
};

class World;

class Mailbox {
 public:
  Mailbox();  // an empty mailbox (the World makes them; tests may too)
  ~Mailbox();
  Mailbox(const Mailbox&) = delete;
  Mailbox& operator=(const Mailbox&) = delete;

  // The next message, if one waits.
  std::optional<Received> tryRecv();
  // Waits up to `timeout` for the next message; nullopt when none came.
  std::optional<Received> recv(Timeout timeout);
  // Readable while a message waits (an eventfd, counting messages).
  int fd() const noexcept;
  // Messages waiting (not those already posted to a manager).
  std::size_t size() const;

  void deliverTo(Manager& manager, std::function<void(int source, Message&)> fn);
  void deliverToInbox();

  // Hands `r` to the reader (the World's MPI thread calls it).
  void put(Received r);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cluster
}  // namespace forklift
