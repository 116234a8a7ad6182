// forklift benchmarks - MessageProcess against the kernel's limits
//
// call() round trip and send() rate of a small message, the codec's share of
// a call (BM_CodecRoundTrip, one process), calls from several
// frontend threads at once, start until ready and stop, each beside the
// same operation done with raw system calls between a parent and a forked
// child, pinned the same way.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <forklift.hpp>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "control.hpp"
#include "metrics.hpp"
#include "placement.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using forklift::bench::pinTo;
using forklift::bench::placement;

class BenchProcess : public forklift::MessageProcess {
 public:
  // `pin`: move the backend to its CPU in preRun__. The start benchmark
  // leaves it where fork put it, as the bare fork reference does.
  explicit BenchProcess(bool pin = true, forklift::Transport transport = forklift::Transport::Socket,
                        std::chrono::microseconds spin = {})
      : MessageProcess("bench", options(transport, spin)), pin_(pin) {
    command("ping", &BenchProcess::c__ping, {"parameter"});
    command("count", &BenchProcess::c__count, {"parameter"});
    command("total", &BenchProcess::c__total);
    command("square", &BenchProcess::c__square, {"x"});
  }

 private:
  static forklift::ProcessOptions options(forklift::Transport transport, std::chrono::microseconds spin) {
    forklift::ProcessOptions o;
    o.transport = transport;
    o.spin = spin;
    return o;
  }
  void preRun__() override {
    if (pin_) pinTo(placement().backend);
  }
  std::string c__ping(std::string parameter) { return parameter; }
  void c__count(const std::string&) { ++count_; }
  std::int64_t c__total() { return std::exchange(count_, 0); }
  std::int64_t c__square(std::int64_t x) { return x * x; }
  bool pin_;
  std::int64_t count_ = 0;
};

// The size of one framed ping on forklift's wire, so the raw references
// move the same number of bytes.
std::size_t pingFrameBytes() {
  forklift::Message m("ping", {{"parameter", "gotcha!"}});
  m.setId(1);
  forklift::Buffer b;
  forklift::Channel::encodeFrame(m, b, forklift::Limits{});
  return b.size();
}

void percentiles(benchmark::State& state, std::vector<double>& us) {
  if (us.empty()) return;
  std::sort(us.begin(), us.end());
  state.counters["p50_us"] = us[us.size() / 2];
  state.counters["p99_us"] = us[std::min(us.size() - 1, us.size() * 99 / 100)];
}

void callRoundTrip(benchmark::State& state, forklift::Transport transport, std::chrono::microseconds spin = {}) {
  pinTo(placement().frontend);
  BenchProcess p(true, transport, spin);
  p.start();
  std::vector<double> us;
  us.reserve(1 << 20);
  for (auto _ : state) {
    const auto t0 = Clock::now();
    benchmark::DoNotOptimize(p.call("ping", {{"parameter", "gotcha!"}}));
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  percentiles(state, us);
  state.SetLabel(placement().describe());
  p.stop();
}
// Over the socket pair, and over the shared-memory queues.
void BM_CallRoundTrip(benchmark::State& state) { callRoundTrip(state, forklift::Transport::Socket); }
void BM_CallRoundTripShm(benchmark::State& state) { callRoundTrip(state, forklift::Transport::SharedMemory); }
// ... and with both sides spinning up to 50 us before they sleep
// (ProcessOptions::spin), beside BM_RawSpinRoundTrip. Meant for one CPU
// each; on one shared CPU it shows what spinning costs there.
void BM_CallRoundTripShmSpin(benchmark::State& state) {
  callRoundTrip(state, forklift::Transport::SharedMemory, std::chrono::microseconds(50));
}
BENCHMARK(BM_CallRoundTrip)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_CallRoundTripShm)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_CallRoundTripShmSpin)->Unit(benchmark::kMicrosecond)->UseRealTime();

// What the live counters (lib/metrics.hpp) add to one message: the counts a
// Channel makes when it encodes and decodes one frame. Beside the call round
// trip above, it shows that publishing metrics costs nothing measurable.
void BM_MetricsPerMessage(benchmark::State& state) {
  for (auto _ : state) {
    forklift::detail::countMessageOut();
    forklift::detail::countMessageIn();
  }
}
BENCHMARK(BM_MetricsPerMessage)->Unit(benchmark::kNanosecond)->UseRealTime();

// The message codec alone, in one process: the ping call framed and
// decoded, then its reply framed and decoded, as a call() does over any
// transport. Beside the raw spinning round trip it is the floor of a
// spinning call(): that much CPU work stands between the two cache-line
// hops whatever carries the bytes.
void BM_CodecRoundTrip(benchmark::State& state) {
  using forklift::Channel;
  const forklift::Limits limits;
  forklift::Buffer wire;
  std::uint64_t id = 0;
  for (auto _ : state) {
    forklift::Message call("ping", {{"parameter", "gotcha!"}});
    call.setId(++id);
    wire.clear();
    Channel::encodeFrame(call, wire, limits);
    const forklift::Message in =
        forklift::decode(wire.data() + Channel::kHeaderBytes, wire.size() - Channel::kHeaderBytes, limits);
    forklift::Message reply{std::string(forklift::detail::control::kOk)};
    reply.args().emplace_back("value", in.get<std::string>("parameter"));
    reply.setId(in.id());
    wire.clear();
    Channel::encodeFrame(reply, wire, limits);
    forklift::Message back =
        forklift::decode(wire.data() + Channel::kHeaderBytes, wire.size() - Channel::kHeaderBytes, limits);
    benchmark::DoNotOptimize(back);
  }
}
BENCHMARK(BM_CodecRoundTrip)->Unit(benchmark::kNanosecond)->UseRealTime();

void sendRate(benchmark::State& state, forklift::Transport transport) {
  pinTo(placement().frontend);
  BenchProcess p(true, transport);
  p.start();
  std::int64_t sent = 0;
  for (auto _ : state) {
    p.send("count", {{"parameter", "gotcha!"}});
    ++sent;
  }
  // Every message counted by the backend before the clock stops.
  const auto total = p.call("total", {}, std::chrono::seconds(60)).as<std::int64_t>();
  if (total != sent) state.SkipWithError("the backend did not count every message");
  state.SetItemsProcessed(sent);
  state.SetLabel(placement().describe());
  p.stop();
}
void BM_SendRate(benchmark::State& state) { sendRate(state, forklift::Transport::Socket); }
void BM_SendRateShm(benchmark::State& state) { sendRate(state, forklift::Transport::SharedMemory); }
BENCHMARK(BM_SendRate)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_SendRateShm)->Unit(benchmark::kMicrosecond)->UseRealTime();

// N frontend threads call one backend as fast as they can. start() refuses
// to fork once other threads run, so the threads are made here, after
// start(), not by the library's ->Threads(N) (those exist before the body).
// They inherit the frontend's CPU. An iteration is a 10 ms window of their
// calls, timed by hand; calls and latencies count only inside the windows.
void BM_CallConcurrent(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  pinTo(placement().frontend);
  BenchProcess p;
  p.start();

  struct alignas(64) Worker {
    std::atomic<std::int64_t> calls{0};
    std::vector<double> us;
    bool failed = false;
  };
  std::vector<std::unique_ptr<Worker>> workers;
  std::atomic<bool> measuring{false}, done{false};
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    workers.push_back(std::make_unique<Worker>());
    workers.back()->us.reserve(1 << 20);
    threads.emplace_back([&p, &measuring, &done, w = workers.back().get(), i] {
      try {
        for (std::int64_t x = i; !done.load(std::memory_order_relaxed); ++x) {
          const auto t0 = Clock::now();
          if (p.call("square", {{"x", x}}).as<std::int64_t>() != x * x) w->failed = true;
          if (measuring.load(std::memory_order_relaxed)) {
            w->us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
            w->calls.fetch_add(1, std::memory_order_relaxed);
          }
        }
      } catch (const std::exception&) {
        w->failed = true;
      }
    });
  }
  const auto calls = [&] {
    std::int64_t c = 0;
    for (auto& w : workers) c += w->calls.load(std::memory_order_relaxed);
    return c;
  };

  for (auto _ : state) {
    const auto t0 = Clock::now();
    measuring.store(true, std::memory_order_relaxed);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    measuring.store(false, std::memory_order_relaxed);
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  done = true;
  for (auto& t : threads) t.join();

  std::vector<double> us;
  bool failed = false;
  for (auto& w : workers) {
    us.insert(us.end(), w->us.begin(), w->us.end());
    failed = failed || w->failed;
  }
  if (failed) state.SkipWithError("a call failed or returned a wrong square");
  state.SetItemsProcessed(calls());
  percentiles(state, us);
  state.SetLabel(placement().describe());
  p.stop();
}
BENCHMARK(BM_CallConcurrent)->ArgName("threads")->Arg(1)->Arg(4)->Unit(benchmark::kMicrosecond)->UseManualTime();

// ---- the kernel limit: raw bytes between a parent and a forked child -------

// A forked child on the backend's CPU that runs `body` and leaves with
// _exit; reaped when this object goes.
struct RawChild {
  explicit RawChild(const std::function<int()>& body) {
    pid = ::fork();
    if (pid == 0) {
      pinTo(placement().backend);
      ::_exit(body());
    }
  }
  pid_t pid = -1;
  void join() {
    if (pid > 0) {
      int st;
      ::waitpid(pid, &st, 0);
    }
    pid = -1;
  }
  ~RawChild() { join(); }
};

void BM_RawSocketpairRoundTrip(benchmark::State& state) {
  pinTo(placement().frontend);
  const std::size_t n = pingFrameBytes();
  int sv[2];
  ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
  RawChild child([&] {
    ::close(sv[0]);
    std::vector<char> buf(n);
    for (;;) {
      if (::read(sv[1], buf.data(), n) <= 0) return 0;
      if (::write(sv[1], buf.data(), n) < 0) return 1;
    }
  });
  ::close(sv[1]);
  std::vector<char> buf(n, 'x');
  std::vector<double> us;
  us.reserve(1 << 20);
  for (auto _ : state) {
    const auto t0 = Clock::now();
    if (::write(sv[0], buf.data(), n) < 0 || ::read(sv[0], buf.data(), n) <= 0) state.SkipWithError("io");
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  ::close(sv[0]);
  percentiles(state, us);
  state.SetLabel(placement().describe());
}
BENCHMARK(BM_RawSocketpairRoundTrip)->Unit(benchmark::kMicrosecond)->UseRealTime();

// An epoll set on a doorbell and on the peer's pidfd.
struct WatchSet {
  WatchSet(int bell, pid_t peer)
      : set(::epoll_create1(EPOLL_CLOEXEC)), death(static_cast<int>(::syscall(SYS_pidfd_open, peer, 0))) {
    for (int fd : {bell, death}) {
      epoll_event e{};
      e.events = EPOLLIN;
      e.data.fd = fd;
      ::epoll_ctl(set, EPOLL_CTL_ADD, fd, &e);
    }
  }
  ~WatchSet() {
    ::close(set);
    ::close(death);
  }
  WatchSet(const WatchSet&) = delete;
  WatchSet& operator=(const WatchSet&) = delete;
  const int set, death;
};

// Waits for the doorbell and returns what it held: 0 when the read failed
// or, watched, when the peer died or 10 s passed.
std::uint64_t awaitBell(int bell, const std::optional<WatchSet>& watch) {
  if (watch) {
    epoll_event ev[2];
    int n;
    do {
      n = ::epoll_wait(watch->set, ev, 2, 10'000);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) return 0;
    for (int i = 0; i < n; ++i)
      if (ev[i].data.fd != bell) return 0;  // the peer died
  }
  std::uint64_t v = 0;
  return ::read(bell, &v, sizeof v) == sizeof v ? v : 0;
}

// Ping-pong over two eventfds: 1 rings, 2 tells the child to leave. Bare,
// each side blocks in read() on its eventfd, which never returns if the
// peer is killed. Watched, each side waits as a hang-proof end must: in
// epoll_wait with a deadline on its eventfd and the peer's pidfd, then
// drains the eventfd. That is the least a round trip that sees its peer's
// death pays, and so the floor under call() over shared memory.
void eventfdRoundTrip(benchmark::State& state, bool watched) {
  pinTo(placement().frontend);
  const int ping = ::eventfd(0, EFD_CLOEXEC), pong = ::eventfd(0, EFD_CLOEXEC);
  const pid_t parent = ::getpid();
  RawChild child([&] {
    std::optional<WatchSet> watch;
    if (watched) watch.emplace(ping, parent);
    const std::uint64_t one = 1;
    for (;;) {
      const std::uint64_t v = awaitBell(ping, watch);
      if (v != 1) return v == 2 ? 0 : 1;
      if (::write(pong, &one, sizeof one) != sizeof one) return 1;
    }
  });
  std::optional<WatchSet> watch;
  if (watched) watch.emplace(pong, child.pid);
  std::vector<double> us;
  us.reserve(1 << 20);
  std::uint64_t v = 1;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    v = 1;
    if (::write(ping, &v, sizeof v) != sizeof v || awaitBell(pong, watch) != 1) state.SkipWithError("io");
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  v = 2;
  [[maybe_unused]] auto r = ::write(ping, &v, sizeof v);
  child.join();
  percentiles(state, us);
  state.SetLabel(placement().describe());
  ::close(ping);
  ::close(pong);
}
void BM_RawEventfdRoundTrip(benchmark::State& state) { eventfdRoundTrip(state, false); }
BENCHMARK(BM_RawEventfdRoundTrip)->Unit(benchmark::kMicrosecond)->UseRealTime();
void BM_RawEventfdWatchedRoundTrip(benchmark::State& state) { eventfdRoundTrip(state, true); }
BENCHMARK(BM_RawEventfdWatchedRoundTrip)->Unit(benchmark::kMicrosecond)->UseRealTime();

// The limit of a spinning round trip: one shared cache line each way, both
// sides polling it. Only with a CPU per side (on one CPU each side would
// spin through its whole time slice).
void BM_RawSpinRoundTrip(benchmark::State& state) {
  if (placement().frontend == placement().backend) {
    state.SkipWithError("spinning needs a CPU per side");
    return;
  }
  pinTo(placement().frontend);
  void* page = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) {
    state.SkipWithError("mmap");
    return;
  }
  auto* ping = new (page) std::atomic<std::uint64_t>(0);
  auto* pong = new (static_cast<char*>(page) + 64) std::atomic<std::uint64_t>(0);
  constexpr std::uint64_t kEnd = ~std::uint64_t{0};
  RawChild child([&] {
    for (std::uint64_t seen = 0;;) {
      std::uint64_t v;
      while ((v = ping->load(std::memory_order_acquire)) == seen) __builtin_ia32_pause();
      if (v == kEnd) return 0;
      seen = v;
      pong->store(v, std::memory_order_release);
    }
  });
  std::vector<double> us;
  us.reserve(1 << 20);
  std::uint64_t i = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    ping->store(++i, std::memory_order_release);
    while (pong->load(std::memory_order_acquire) != i) __builtin_ia32_pause();
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  ping->store(kEnd, std::memory_order_release);
  percentiles(state, us);
  state.SetLabel(placement().describe());
  child.join();  // before the page goes
  ::munmap(page, 4096);
}
BENCHMARK(BM_RawSpinRoundTrip)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_RawSocketpairOneWay(benchmark::State& state) {
  pinTo(placement().frontend);
  const std::size_t n = pingFrameBytes();
  int sv[2];
  ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
  RawChild child([&] {
    ::close(sv[0]);
    // Reads greedily like forklift's backend, counts whole messages, and
    // answers one byte when told the total.
    std::vector<char> buf(64 << 10);
    std::uint64_t bytes = 0;
    for (;;) {
      const ssize_t r = ::read(sv[1], buf.data(), buf.size());
      if (r <= 0) return 0;
      bytes += static_cast<std::uint64_t>(r);
      if (bytes % n != 0 || buf[static_cast<std::size_t>(r) - 1] != 'E') continue;
      const char ack = 'A';
      if (::write(sv[1], &ack, 1) != 1) return 1;
    }
  });
  ::close(sv[1]);
  std::vector<char> msg(n, 'x');
  for (auto _ : state)
    if (::write(sv[0], msg.data(), n) < 0) state.SkipWithError("io");
  msg.back() = 'E';  // the end marker: one more message, then wait for the ack
  char ack;
  if (::write(sv[0], msg.data(), n) < 0 || ::read(sv[0], &ack, 1) != 1) state.SkipWithError("io");
  ::close(sv[0]);
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(placement().describe());
}
BENCHMARK(BM_RawSocketpairOneWay)->Unit(benchmark::kMicrosecond)->UseRealTime();

// ---- the process limit ------------------------------------------------------

void startUntilReady(benchmark::State& state, forklift::Transport transport) {
  pinTo(placement().frontend);
  for (auto _ : state) {
    BenchProcess p(false, transport);
    const auto t0 = Clock::now();
    p.start();
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
    p.stop();
  }
}
void BM_StartUntilReady(benchmark::State& state) { startUntilReady(state, forklift::Transport::Socket); }
BENCHMARK(BM_StartUntilReady)->Unit(benchmark::kMicrosecond)->UseManualTime();
// The same over the shared-memory queues (the default transport): three
// more doorbells, an epoll set and the queues' mapping to set up.
void BM_StartUntilReadyShm(benchmark::State& state) { startUntilReady(state, forklift::Transport::SharedMemory); }
BENCHMARK(BM_StartUntilReadyShm)->Unit(benchmark::kMicrosecond)->UseManualTime();

void BM_StopIdle(benchmark::State& state) {
  pinTo(placement().frontend);
  for (auto _ : state) {
    BenchProcess p(false);
    p.start();
    const auto t0 = Clock::now();
    const auto s = p.stop();
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
    if (!s.ok()) state.SkipWithError("stop failed");
  }
}
BENCHMARK(BM_StopIdle)->Unit(benchmark::kMicrosecond)->UseManualTime();

void BM_ForkUntilReady(benchmark::State& state) {
  pinTo(placement().frontend);
  for (auto _ : state) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) state.SkipWithError("pipe");
    const auto t0 = Clock::now();
    const pid_t pid = ::fork();
    if (pid == 0) {
      const char c = 'r';
      [[maybe_unused]] auto r = ::write(fds[1], &c, 1);
      ::_exit(0);
    }
    char c;
    if (::read(fds[0], &c, 1) != 1) state.SkipWithError("read");
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - t0).count());
    int st;
    ::waitpid(pid, &st, 0);
    ::close(fds[0]);
    ::close(fds[1]);
  }
}
BENCHMARK(BM_ForkUntilReady)->Unit(benchmark::kMicrosecond)->UseManualTime();

}  // namespace

BENCHMARK_MAIN();
