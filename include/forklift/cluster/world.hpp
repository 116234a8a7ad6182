// forklift::cluster - World: this process as one rank of an MPI job
//
// forklift across hosts runs on MPI (issue 22): `mpirun -np N prog`,
// `mpirun --hostfile`, Slurm's `srun --mpi=pmix` start one SPMD binary; rank 0
// is the driver (the user's main), every other rank an agent that serves it.
// A `World` is that rank: it initialises MPI, tells which rank this is, how
// many there are and on which host each runs, and carries forklift `Message`s
// between ranks.
//
//   int main() {
//     forklift::cluster::World world;           // MPI_Init_thread, host names
//     if (world.isDriver()) {
//       world.send(1, forklift::Message("hello", {{"n", 1}}));
//       auto r = world.recv(std::chrono::seconds(5));   // {source, message}
//     } else {
//       auto r = world.recv(forklift::kForever); ...
//     }
//   }                                           // MPI_Finalize (collective)
//
// The MPI thread. MPI is not pollable (no descriptor says "a message came"),
// so one thread per rank owns MPI: it calls MPI_Init_thread itself, asking for
// MPI_THREAD_FUNNELED (the calling thread is then MPI's main thread; a library
// that provides less throws MpiError), makes every MPI call after that, and
// calls MPI_Finalize. It never blocks inside MPI: it posts sends with
// MPI_Isend, completes them with MPI_Test, and takes messages on forklift's
// tag with MPI_Improbe + MPI_Mrecv (a matched probe: the exact size first, then
// the receive of exactly that message; MPI-3, so MPICH works too). When a turn
// moved nothing it spins for `WorldOptions::spin` (1 ms: a task's trip
// through an agent and back fits in it, so neither side's MPI thread sleeps
// in the middle; bench/compare's cluster table, on this 2-vCPU VM: one task
// at a time 72 us against 5.6 ms with a 50 us spin, and 3.8 times the
// tasks/s), then sleeps: 10 us at first,
// doubling up to `WorldOptions::maxBackoff` (2 ms; mpi4py.futures' back-off),
// back to the start after any progress. After `idleAfter` (1 s) with nothing
// sent or received the sleeps grow on up to `idleBackoff` (10 ms): a wake-up
// costs about 26 us of CPU on a 2-vCPU VM even with no MPI call at all (a
// timed wait alone), so 2 ms sleeps cost 1.2 % of a CPU there, 10 ms ones
// 0.3 %. The price: the first message to a rank idle for a second waits up
// to 10 ms more; a task of a second or more pays at most 1 % for it. A send
// wakes the thread at once (a condition variable), whatever its sleep.
// While an array's bytes move (see "Arrays") the sleeps stay at 10 us: a
// large MPI message crosses shared memory in fragments, each waiting for
// both sides' next MPI call.
// tests/cluster measures an idle rank (every thread of the process): about
// 0.4 % of a CPU on that VM, 0.8-1.5 % in the second after a message.
//
// Messages. `send(rank, message)` encodes the message on the caller's thread
// (TypeError, LimitError there) and queues it to the MPI thread; it returns
// at once. Messages from one rank to another arrive in the order sent. Each
// received message goes to one Mailbox (mailbox.hpp): the one `route(prefix)`
// gave for its command's longest routed prefix, else this World's inbox,
// which `recv`/`tryRecv` read, whose `fd()` (an eventfd) is readable while
// one waits, so any loop can watch it, and which `deliverTo(manager, fn)`
// hands to a forklift Manager's loop (`Manager::post`), in order. Bytes on
// forklift's tag that do not decode (a rank sending garbage) are logged,
// counted (`stats().refused`) and dropped; the rank goes on. Mailboxes have
// no bound: a rank that never reads one keeps what comes. Messages that come
// while the World ends (see "The end") wait in their mailboxes; those the
// World's own inbox held are dropped with it.
//
// Arrays. A forklift shared-memory array (ShmArray, ShmTensor: any dtype,
// float16 included, rank 1 to 8, either layout) travels as its describe()
// value, anywhere in a message (an argument, a list item, a map entry, at
// any depth), exactly as to a backend on one host:
//
//   world.send(1, Message("frame", {{"image", frame.describe()}}));
//   // rank 1:  auto f = ShmTensor<std::uint8_t, 3>::open(m.get<Value>("image"));
//
// Its bytes cross MPI once, straight from the sender's pages (no copy into
// the message): the message carries a placeholder (dtype, shape, layout, byte
// size, the array's name hint), and the bytes follow as MPI messages of at
// most `WorldOptions::arrays.chunk` bytes on a second tag. The receiving
// rank's MPI thread makes a new anonymous array of that dtype, shape and
// layout and receives the bytes into its pages; the message is delivered,
// in its order among the others from that rank, once the array is whole,
// with the placeholder replaced by the new array's describe(). Open it there
// with ShmTensor/ShmArray::open, in place, or hand it on to a local worker:
// it is a shared-memory array of that host like any other, freed when the
// last descriptor and mapping of it go. An array with no element crosses too.
// The sender's segment stays mapped by the World until its bytes are sent,
// whatever the caller does with its own array; but they are read while the
// MPI thread sends them, after send() returned: do not write the array until
// the peer said it has it (or send a new array each time). A named array
// (ShmName::named) is not sent: its descriptor has no memfd, and it travels
// as the plain map it is (its name means nothing on another host).
//
// Only arrays cross: a message holding any other descriptor (a socket, a
// pipe, an eventfd, a segment of raw bytes) throws TypeError at send, naming
// the argument. One message carries at most Limits::maxFds arrays (64 by
// default; LimitError), each of at most `arrays.maxBytes` and together
// `arrays.maxBytesPerMessage` (LimitError at send). The receiver checks
// every placeholder against its own limits before it allocates: a header
// that is not what a World sends (a size that does not match dtype x shape,
// a negative or absurd dimension, a rank outside 1..8, a chunk size or count
// that does not fit, a table cut short, a sequence number out of order) is
// refused, logged and counted in stats().refused, and nothing of what comes
// after it is taken for its bytes; one that is well formed but over this
// rank's limits, or whose array cannot be made (no memory: SystemError) is
// refused likewise, and its bytes are received into a buffer of one chunk
// and dropped; a chunk of another size than announced refuses its message
// and drains the rest. The rank goes on serving, and no torn array is ever
// delivered. A peer is trusted this far: a header that a World could have
// sent (well formed, in sequence) is taken to be followed by its bytes.
//
// Forks. Open MPI starts threads of its own in MPI_Init, and forking after it
// "could result in memory corruption" (Open MPI's warning); forklift forks
// nothing after threads started anyway unless a fork server serves it. So a
// World makes (or shares) this process's ForkServer BEFORE it initialises MPI
// (`WorldOptions::forkServer`, on by default): make the objects and pools whose
// workers must be started or replaced later first, then the World. Its
// constructor therefore needs a process that runs one thread
// (forklift::ForkServer's rule: Error otherwise) unless a server runs already
// or forkServer is off. A worker forked by the server never ran MPI_Init: user
// code runs in forklift workers, never inside an MPI rank.
//
// Once per process. MPI is initialised at most once per process and cannot
// be again after MPI_Finalize, so a second World, alive or after the first
// ended, throws Error; so does a World in a process where something else
// initialised MPI.
//
// The end. The destructor is collective, as MPI_Finalize is: it stops taking
// sends, completes the ones queued, then waits (still receiving, so no peer's
// send hangs) until every rank's World ended (MPI_Ibarrier), lets the
// receives of array bytes still posted finish (a message still waiting for
// chunks no rank sent, after a forged header, is dropped with a warning),
// then calls MPI_Finalize. A World destroyed while an exception unwinds the stack
// (std::uncaught_exceptions) calls MPI_Abort instead: a rank that fails must
// not strand the others in the barrier (Boost.MPI's rule); mpirun then ends
// the whole job non-zero. An MPI call that fails on the MPI thread is logged
// with the routine's name and aborts the job likewise. A copy of a World in a
// forked child does nothing when destroyed.
//
// Hosts. `hosts()[r]` is rank r's MPI_Get_processor_name, gathered once
// (MPI_Allgather) at the start. For tests on one machine, the environment
// variable FORKLIFT_CLUSTER_HOST replaces this rank's name, its "{rank}"
// replaced by the rank: FORKLIFT_CLUSTER_HOST=host{rank} makes 3 ranks 3 hosts.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "forklift/cluster/mailbox.hpp"
#include "forklift/error.hpp"
#include "forklift/message.hpp"
#include "forklift/timeout.hpp"

namespace forklift {

class Manager;

namespace cluster {

// An MPI routine returned an error: `routine()` names it ("MPI_Isend"),
// `code()` is its return code, what() both and MPI's own words.
class MpiError : public Error {
 public:
  MpiError(std::string routine, int code, const std::string& what)
      : Error(what), routine_(std::move(routine)), code_(code) {}
  const std::string& routine() const noexcept { return routine_; }
  int code() const noexcept { return code_; }

 private:
  std::string routine_;
  int code_;
};

// How large the forklift arrays a message carries may be (see "Arrays").
// The sender throws LimitError past them; the receiver refuses a header past
// its own before it allocates anything.
struct ArrayLimits {
  std::uint64_t maxBytes = std::uint64_t{4} << 30;             // one array
  std::uint64_t maxBytesPerMessage = std::uint64_t{16} << 30;  // all arrays of one message
  // Arrays cross in MPI messages of at most this many bytes (4 KiB to
  // 64 MiB; Error otherwise): counts stay far below INT_MAX, and a refused
  // array is drained through a buffer of this size.
  std::size_t chunk = std::size_t{64} << 20;
};

struct WorldOptions {
  // Make (or share) this process's ForkServer before MPI_Init (see "Forks").
  bool forkServer = true;
  // Of every message sent and received (forklift/message.hpp).
  Limits limits;
  // Of the forklift arrays in them (see "Arrays").
  ArrayLimits arrays;
  // The MPI thread's back-off when a turn moved nothing: it spins this long,
  // then sleeps 10 us, 20 us, ... up to maxBackoff between turns; once
  // nothing moved for idleAfter, up to idleBackoff (see "The MPI thread").
  std::chrono::microseconds spin{1000};
  std::chrono::microseconds maxBackoff{2000};
  std::chrono::microseconds idleBackoff{10000};
  std::chrono::milliseconds idleAfter{1000};
};

class World;

namespace detail {
// For tests: queues `bytes` for rank `dest` as they are, on forklift's tag
// (a rank sending garbage, or a forged array header).
void sendRaw(World& world, int dest, std::vector<char> bytes);
// For tests: queues an array message made by hand: `header` numbered in
// this World's sequence to `dest` (as a World numbers its own), then
// `chunks` as they are on the arrays' tag (e.g. one of another size than
// the header announced).
void sendRawArrays(World& world, int dest, std::vector<char> header, std::vector<std::vector<char>> chunks);
struct Outgoing;  // one queued send (world.cpp)
}  // namespace detail

class World {
 public:
  // Makes the fork server (WorldOptions::forkServer), starts the MPI thread,
  // which initialises MPI and gathers the host names; returns when that is
  // done. Throws Error for a second World, MpiError when MPI provides less
  // than MPI_THREAD_FUNNELED or a call fails.
  explicit World(WorldOptions options = {});
  // Collective (see "The end").
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  // Rank 0: the user's main; the other ranks are agents.
  bool isDriver() const noexcept { return rank_ == 0; }
  const std::string& host() const noexcept { return hosts_[static_cast<std::size_t>(rank_)]; }
  const std::string& host(int rank) const;  // Error when out of range
  const std::vector<std::string>& hosts() const noexcept { return hosts_; }

  // Queues `m` for rank `dest` (itself included) and returns. From any
  // thread. Throws Error for a rank out of range or after the end began,
  // TypeError/LimitError when `m` cannot be encoded (descriptors, limits).
  void send(int dest, const Message& m);

  // The inbox: the mailbox (mailbox.hpp) of every received message whose
  // command no route() takes. These five call its methods of the same names.
  std::optional<Received> tryRecv();
  // Waits up to `timeout` for the next message; nullopt when none came.
  std::optional<Received> recv(Timeout timeout);
  // Readable while a received message waits in the inbox (an eventfd).
  int fd() const noexcept;
  void deliverTo(Manager& manager, std::function<void(int source, Message&)> fn);
  void deliverToInbox();
  Mailbox& inbox() noexcept;

  // From now on, received messages whose command begins with `prefix` go to
  // the returned mailbox, not to the inbox (the longest prefix routed wins);
  // those of that prefix that wait in the inbox move there, in order. Error
  // for an empty prefix or one routed already. From any thread.
  std::shared_ptr<Mailbox> route(const std::string& prefix);
  // Messages of `prefix` go to the inbox again (those waiting in its mailbox
  // stay there). No effect for a prefix not routed.
  void unroute(const std::string& prefix);

  struct Stats {
    std::uint64_t sent = 0;      // messages whose send completed
    std::uint64_t received = 0;  // messages decoded and delivered
    std::uint64_t refused = 0;   // received messages refused (bad bytes, bad array headers): dropped
    std::uint64_t arraysSent = 0;      // arrays whose bytes left with a message counted in `sent`
    std::uint64_t arraysReceived = 0;  // arrays that came whole in a message counted in `received`
    std::uint64_t wakeups = 0;   // turns of the MPI thread after a sleep
  };
  Stats stats() const;

  // True while a World exists in this process.
  static bool exists() noexcept;

 private:
  friend void detail::sendRaw(World&, int, std::vector<char>);
  friend void detail::sendRawArrays(World&, int, std::vector<char>, std::vector<std::vector<char>>);
  void queue(detail::Outgoing out, const std::string& command);
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = -1;
  int size_ = 0;
  std::vector<std::string> hosts_;
};

}  // namespace cluster
}  // namespace forklift
