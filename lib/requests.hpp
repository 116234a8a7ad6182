// forklift - the frontend's calls in flight on one command channel (internal)
//
// `Requests` owns the frontend end of a backend's command channel for one
// run of the backend: it sends commands and calls, and routes each reply to
// its call by id. Calls are pipelined: any number may wait at once, from any
// number of threads, and no lock is held while a thread waits.
//
// Reading replies needs no thread of its own (a frontend must stay free of
// threads to fork): one waiting thread at a time is the reader. It polls the
// channel, the backend's death descriptor and a wake-up event (over shared
// memory: the channel's epoll set, which holds the death descriptor, and
// close() rings the channel's doorbell), reads every reply there is and
// completes their calls; the others sleep on a condition
// variable until their call is complete or the reader leaves, and then one
// of them reads. A loop (the Manager) reads with `pump()` when the channel
// is readable.
//
// The end: when the backend's death descriptor fires and the channel holds
// nothing more, or the channel ends, every call still waiting completes at
// once with ProcessDied; `close(error)` does the same for a stop.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "forklift/call_future.hpp"
#include "forklift/channel.hpp"
#include "forklift/detail/fd.hpp"

namespace forklift::detail {

struct CallSlot {
  std::uint64_t id = 0;
  std::string command;
  Deadline deadline{kForever};
  Timeout timeout{0};
  std::function<void(CallResult)> callback;  // empty for futures and blocking calls
  // guarded by Requests::mutex_
  bool done = false;
  CallResult result;
};

class Requests : public std::enable_shared_from_this<Requests> {
 public:
  struct Hooks {
    std::string who;  // "MyProcess.name", for messages
    // How the backend ended, for the error of calls that it outlived
    // (waits for the status until the caller's deadline at most, never a
    // bound of its own: a peer that closed its channel may live on,
    // stopped); called once, on the reading thread.
    std::function<std::string(const Deadline&)> describeEnd;
    // True once the frontend asked the backend to stop.
    std::function<bool()> stopRequested;
  };

  // `stopBell` is the eventfd the backend watches for a stop request.
  Requests(Channel cmd, UniqueFd stopBell, int deathFd, Hooks hooks);
  ~Requests();
  Requests(const Requests&) = delete;
  Requests& operator=(const Requests&) = delete;

  int fd() const noexcept { return cmd_.fd(); }

  // Sends a command without reply (id 0). Throws like MessageProcess::send.
  void send(Message& m, Timeout timeout);
  // Sends a call; the slot completes with the reply or an error.
  // `callerWaits`: the caller waits for the reply at once (a blocking
  // call), so when no other thread reads, the reply may come without a
  // doorbell ring (Channel::holdRings).
  std::shared_ptr<CallSlot> call(Message& m, Timeout timeout, std::function<void(CallResult)> callback = {},
                                 bool callerWaits = false);
  // Rings the backend's stop bell: it handles the commands already in the
  // channel, then ends its loop. A bell, not a message: it cannot wait
  // behind a stuck send nor be swallowed by a cut or corrupt frame.
  void ringStop() noexcept;

  // Waits until `s` is done or `d` passes (reading replies meanwhile); true
  // when done.
  bool wait(CallSlot& s, const Deadline& d);
  bool done(const CallSlot& s);
  // Forgets a call (its late reply is discarded).
  void forget(const CallSlot& s);

  // Reads the replies that are there, without blocking; completes their
  // calls and the expired ones. For loops, when fd() is readable or a
  // deadline passed. Returns at once if another thread is reading.
  void pump();
  // Earliest deadline of a callback call, for a loop's timer.
  std::optional<Deadline::Clock::time_point> nextCallbackDeadline();

  // How the conversation ended: the backend stopped or died (`how` is its
  // status), or `error` (a corrupt stream) ended it.
  struct End {
    bool stopped = false;
    std::string how;
    std::exception_ptr error;
  };
  // Completes every waiting call with the error of `end` (ProcessDied
  // naming the call), and every later call fails at once. Wakes the reader.
  void close(End end);

  // Where callbacks run: a loop sets a dispatcher that queues them to its
  // own thread; without one they run on the reading thread.
  void setDispatcher(std::function<void(std::function<void()>)> dispatch);

 private:
  enum class Read : std::uint8_t { Wait, NoWait };
  // One turn as the reader: waits (bounded) for the channel, the death
  // descriptor or a wake-up, then reads everything there is.
  void readTurn(const Deadline& d, Read how);
  // Completes `s` (caller holds mutex_); its callback goes to `ready`.
  void complete(CallSlot& s, CallResult r, std::vector<std::function<void()>>& ready);
  void expire(std::vector<std::function<void()>>& ready);  // caller holds mutex_
  void closeLocked(End end, std::vector<std::function<void()>>& ready);
  void run(std::vector<std::function<void()>>& ready);
  End endOfPeer(const Deadline& d);  // the backend ended: how (its status waited for until `d`)
  // The error of a call or send of `command`: `during` one in flight, or
  // one made after the end.
  std::exception_ptr endError(const End& end, const char* what, const std::string& command, bool during) const;
  void throwIfClosed(const char* what, const std::string& command);

  Hooks hooks_;
  Channel cmd_;
  UniqueFd stopBell_;
  int deathFd_;
  UniqueFd wake_;  // socket transport only: close() wakes the reader's poll

  // One sender at a time (frames stay whole), waited for with a deadline.
  // Uncontended, taking the turn is one try_lock. (Not a timed_mutex:
  // ThreadSanitizer does not follow pthread_mutex_clocklock.)
  class SendTurn;
  std::mutex sendMutex_;
  std::uint64_t nextId_ = 0;  // guarded by the send turn

  std::mutex mutex_;
  std::condition_variable cv_;
  bool reading_ = false;  // a thread is the reader
  std::unordered_map<std::uint64_t, std::shared_ptr<CallSlot>> pending_;
  std::optional<End> closed_;
  std::atomic<bool> closedFlag_{false};  // closed_ is set: checked without the lock
  // Callback calls in flight: a loop asks for their deadline before every
  // wait, and most of the time there are none.
  std::atomic<int> callbacks_{0};
  std::function<void(std::function<void()>)> dispatch_;
};

}  // namespace forklift::detail
