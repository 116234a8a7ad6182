// tests/cluster/world_test: cluster::World under the real launcher.
//
//   mpirun --oversubscribe --allow-run-as-root -np 3 world_test
//
// Every rank runs the same cases in the same order (the driver, rank 0,
// talks to every agent); each rank counts its own checks, the agents send
// their counts to the driver at the end, and the driver prints one line per
// case and "N passed, N failed" for the whole job. A rank with a failed check
// exits 1 (so mpirun does). The meson test sets FORKLIFT_CLUSTER_HOST=host{rank}
// (3 ranks = 3 hosts) and WORLD_TEST_RANKS=3.
#include <poll.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <optional>
#include <functional>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "forklift/cluster/world.hpp"
#include "forklift/fork_server.hpp"
#include "forklift/manager.hpp"

using forklift::Message;
using forklift::cluster::World;
using namespace std::chrono_literals;

namespace {

int failed_checks = 0;
int case_failures = 0;

#define CHECK(cond)                                                                                      \
  do {                                                                                                   \
    if (!(cond)) {                                                                                       \
      std::fprintf(stderr, "rank %d: %s:%d: CHECK(%s) failed\n", rank_for_log, __FILE__, __LINE__, #cond); \
      ++failed_checks;                                                                                   \
    }                                                                                                    \
  } while (0)

int rank_for_log = -1;

// Messages of other ranks that came while expectFrom waited for one rank.
std::map<int, std::deque<Message>> stash;

// A message from `from`, within 30 s (a failed check otherwise).
Message expectFrom(World& w, int from, const std::string& command) {
  std::optional<forklift::cluster::Received> r;
  if (auto& q = stash[from]; !q.empty()) {
    r = forklift::cluster::Received{from, std::move(q.front())};
    q.pop_front();
  }
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (!r) {
    auto left = std::chrono::duration_cast<forklift::Timeout>(deadline - std::chrono::steady_clock::now());
    if (left <= forklift::Timeout::zero()) break;
    r = w.recv(left);
    if (r && r->source != from) {
      stash[r->source].push_back(std::move(r->message));
      r.reset();
    }
  }
  if (!r) {
    std::fprintf(stderr, "rank %d: no '%s' from rank %d within 30 s\n", w.rank(), command.c_str(), from);
    ++failed_checks;
    return Message();
  }
  if (r->source != from || r->message.command() != command) {
    std::fprintf(stderr, "rank %d: wanted '%s' from rank %d, got %s from rank %d\n", w.rank(), command.c_str(), from,
                 r->message.toString().substr(0, 200).c_str(), r->source);
    ++failed_checks;
  }
  return std::move(r->message);
}

void threadTicks(int rank);

double sum(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); }

// ---- cases ------------------------------------------------------------------

void basics(World& w) {
  const char* want = std::getenv("WORLD_TEST_RANKS");
  if (want) CHECK(w.size() == std::atoi(want));
  CHECK(w.size() >= 2);
  CHECK(w.rank() >= 0 && w.rank() < w.size());
  CHECK(w.isDriver() == (w.rank() == 0));
  CHECK(static_cast<int>(w.hosts().size()) == w.size());
  CHECK(w.host() == w.hosts()[static_cast<std::size_t>(w.rank())]);
  if (const char* h = std::getenv("FORKLIFT_CLUSTER_HOST"); h && std::string(h) == "host{rank}") {
    for (int r = 0; r < w.size(); ++r) CHECK(w.host(r) == "host" + std::to_string(r));
  }
  bool threw = false;
  try {
    (void)w.host(w.size());
  } catch (const forklift::Error&) {
    threw = true;
  }
  CHECK(threw);
  CHECK(World::exists());
  // The World made the fork server before MPI_Init.
  CHECK(forklift::ForkServer::running());
}

void secondWorldRefused(World&) {
  bool threw = false;
  try {
    World again;
  } catch (const forklift::Error& e) {
    threw = std::string(e.what()).find("one exists already") != std::string::npos;
  }
  CHECK(threw);
  CHECK(World::exists());
}

void sendRefusesBadRank(World& w) {
  bool threw = false;
  try {
    w.send(w.size(), Message("x"));
  } catch (const forklift::Error&) {
    threw = true;
  }
  CHECK(threw);
}

// The driver sends every agent 500 pings (every 50th carries a 1 MiB array,
// one a 4 MiB one); each agent answers each with a pong carrying n * 2 and
// the array's sum. Order per pair of ranks is kept.
void pingPong(World& w) {
  constexpr int kN = 500;
  if (w.isDriver()) {
    for (int n = 0; n < kN; ++n) {
      for (int a = 1; a < w.size(); ++a) {
        Message m("ping", {{"n", n}});
        if (n % 50 == 0) {
          std::vector<double> big(n == 250 ? (4u << 20) / 8 : (1u << 20) / 8);
          for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<double>(i % 1000) + n;
          m.set("array", forklift::Value(big));
          m.set("sum", sum(big));
        }
        w.send(a, m);
      }
    }
    int got = 0, bad = 0;
    for (int a = 1; a < w.size(); ++a)
      for (int n = 0; n < kN; ++n) {
        Message r = expectFrom(w, a, "pong");
        if (r.command() != "pong") break;
        ++got;
        if (r.get<int>("n") != n || r.get<int>("twice") != 2 * n || !r.get<bool>("sum_ok", true) ||
            r.has("sum_ok") != (n % 50 == 0))
          ++bad;
      }
    CHECK(got == kN * (w.size() - 1));
    CHECK(bad == 0);
  } else {
    for (int n = 0; n < kN; ++n) {
      Message m = expectFrom(w, 0, "ping");
      Message reply("pong", {{"n", m.get<int>("n", -1)}, {"twice", 2 * m.get<int>("n", -1)}});
      if (m.has("array")) {
        auto v = m.get<std::vector<double>>("array");
        reply.set("sum_ok", std::fabs(sum(v) - m.get<double>("sum")) < 1e-6);
      }
      w.send(0, reply);
    }
  }
}

// Agents hand their messages to a Manager's loop (deliverTo, Manager::post)
// and answer from there; the driver reads from its inbox as before.
void managerDelivery(World& w) {
  constexpr int kN = 200;
  if (w.isDriver()) {
    for (int n = 0; n < kN; ++n)
      for (int a = 1; a < w.size(); ++a) w.send(a, Message("echo", {{"n", n}}));
    for (int a = 1; a < w.size(); ++a) w.send(a, Message("done"));
    for (int a = 1; a < w.size(); ++a) {
      int bad = 0;
      for (int n = 0; n < kN; ++n)
        if (expectFrom(w, a, "echoed").get<int>("n", -1) != n) ++bad;
      CHECK(bad == 0);
      CHECK(expectFrom(w, a, "loop_done").get<bool>("on_loop_thread", false));
    }

  } else {
    forklift::Manager::Options o;
    o.handleSignals = false;
    forklift::Manager manager(o);
    const auto loopThread = std::make_shared<std::thread::id>();
    bool allOnLoop = true;
    manager.post([&] { *loopThread = std::this_thread::get_id(); });
    w.deliverTo(manager, [&](int source, Message& m) {
      if (std::this_thread::get_id() != *loopThread) allOnLoop = false;
      if (m.command() == "done") {
        manager.requestStop();
        return;
      }
      w.send(source, Message("echoed", {{"n", m.get<int>("n")}}));
    });
    CHECK(manager.run() == 0);
    w.deliverToInbox();
    w.send(0, Message("loop_done", {{"on_loop_thread", allOnLoop}}));
  }
}

// Routes: each agent sends messages of three prefixes and plain ones, some
// before the driver routes (they wait in the inbox and move), some after;
// each mailbox gets exactly its own (the longest prefix wins), in order, its
// fd readable while one waits; the inbox keeps the rest; an unrouted prefix
// goes back to the inbox; a prefix routed twice or an empty one is refused.
void routes(World& w) {
  constexpr int kN = 20;
  if (w.isDriver()) {
    // Until every agent's "early_sent": its early messages came before it.
    // They go back to the inbox, in order, for route() to sort.
    std::vector<forklift::cluster::Received> early;
    int sent = 0;
    const auto until = std::chrono::steady_clock::now() + 30s;
    while (sent < w.size() - 1 && std::chrono::steady_clock::now() < until) {
      auto r = w.recv(1s);
      if (!r) continue;
      if (r->message.command() == "early_sent")
        ++sent;
      else
        early.push_back(std::move(*r));
    }
    CHECK(sent == w.size() - 1);
    for (auto& r : early) w.inbox().put(std::move(r));
    // The longer first: route() moves what waits by the routes of its time.
    auto camStats = w.route("cam.stats");
    auto cam = w.route("cam.");
    bool threw = false;
    try {
      (void)w.route("cam.");
    } catch (const forklift::Error&) {
      threw = true;
    }
    CHECK(threw);
    threw = false;
    try {
      (void)w.route("");
    } catch (const forklift::Error&) {
      threw = true;
    }
    CHECK(threw);
    for (int a = 1; a < w.size(); ++a) w.send(a, Message("send_late"));
    // Per agent: 2 * kN "cam.frame", 2 * kN "cam.stats.n", 2 * kN plain "plain".
    const std::size_t agents = static_cast<std::size_t>(w.size() - 1);
    std::vector<int> frames(static_cast<std::size_t>(w.size()), 0), stats(frames), plain(frames);
    bool inOrder = true, wrongBox = false;
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    std::vector<forklift::cluster::Received> others;  // the agents' "end_routes" (sync)
    auto take = [&](forklift::cluster::Mailbox& box, const std::string& want, std::vector<int>& seen) {
      while (auto r = box.tryRecv()) {
        if (&box == &w.inbox() && r->message.command().rfind("end_", 0) == 0) {
          others.push_back(std::move(*r));
          continue;
        }
        if (r->message.command() != want) wrongBox = true;
        auto& n = seen[static_cast<std::size_t>(r->source)];
        if (r->message.get<int>("n", -1) != n) inOrder = false;
        ++n;
      }
    };
    auto all = [&](const std::vector<int>& v) {
      for (std::size_t a = 1; a <= agents; ++a)
        if (v[a] != 2 * kN) return false;
      return true;
    };
    while (!(all(frames) && all(stats) && all(plain)) && std::chrono::steady_clock::now() < deadline) {
      pollfd p[3] = {{cam->fd(), POLLIN, 0}, {camStats->fd(), POLLIN, 0}, {w.fd(), POLLIN, 0}};
      ::poll(p, 3, 100);
      take(*cam, "cam.frame", frames);
      take(*camStats, "cam.stats.n", stats);
      take(w.inbox(), "plain", plain);
    }
    CHECK(all(frames));
    CHECK(all(stats));
    CHECK(all(plain));
    CHECK(inOrder);
    CHECK(!wrongBox);
    CHECK(cam->size() == 0 && camStats->size() == 0);
    for (auto& r : others) w.inbox().put(std::move(r));
    // Unrouted: "cam.stats..." now goes to "cam.", the longest left.
    w.unroute("cam.stats");
    w.send(1, Message("send_one_stat"));
    auto r = cam->recv(30s);
    CHECK(r && r->message.command() == "cam.stats.n");
    w.unroute("cam.");
  } else {
    auto send = [&](int from, int to) {
      for (int n = from; n < to; ++n) {
        w.send(0, Message("cam.frame", {{"n", n}}));
        w.send(0, Message("cam.stats.n", {{"n", n}}));
        w.send(0, Message("plain", {{"n", n}}));
      }
    };
    send(0, kN);
    w.send(0, Message("early_sent"));
    expectFrom(w, 0, "send_late");
    send(kN, 2 * kN);
    if (w.rank() == 1) {
      expectFrom(w, 0, "send_one_stat");
      w.send(0, Message("cam.stats.n", {{"n", 0}}));
    }
  }
}

// Rank 1 sends bytes that are no message, then a good one: the driver drops
// the garbage (counted), still gets the good one, and goes on.
void garbageRefused(World& w) {
  if (w.isDriver()) {
    // The garbage came first (order per pair of ranks), and is the only one.
    Message m = expectFrom(w, 1, "after_garbage");
    CHECK(w.stats().refused == 1);
  } else if (w.rank() == 1) {
    forklift::cluster::detail::sendRaw(w, 0, {'\xc1', 'g', 'a', 'r', 'b', 'a', 'g', 'e'});
    w.send(0, Message("after_garbage"));
  }
}

double cpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);  // every thread of the process: ours and Open MPI's
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// Every rank idles with its World up and measures the CPU its whole process
// uses (its MPI thread, Open MPI's threads): for 0.9 s just after the last
// message (the MPI thread sleeps up to maxBackoff, 2 ms), then for 3 s once
// it is idle (past idleAfter: sleeps up to idleBackoff, 10 ms). The idle
// rank must stay within 1 % of one CPU; WORLD_TEST_IDLE_LIMIT (percent)
// overrides the bound (the sanitizers').
void idleCpu(World& w) {
  double limit = 1.0;
  if (const char* l = std::getenv("WORLD_TEST_IDLE_LIMIT")) limit = std::atof(l);
  if (w.isDriver())
    for (int a = 1; a < w.size(); ++a) w.send(a, Message("idle"));
  else
    expectFrom(w, 0, "idle");
  auto measure = [&](double seconds, double& wakeupsPerS) {
    const auto wakeups0 = w.stats().wakeups;
    const double c0 = cpuSeconds();
    const auto t0 = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    wakeupsPerS = static_cast<double>(w.stats().wakeups - wakeups0) / wall;
    return 100.0 * (cpuSeconds() - c0) / wall;
  };
  std::this_thread::sleep_for(50ms);  // the last sends are done
  double shortWakeups = 0, idleWakeups = 0;
  const double shortPct = measure(0.9, shortWakeups);
  std::this_thread::sleep_for(600ms);  // past idleAfter
  threadTicks(w.rank());
  const double pct = measure(3.0, idleWakeups);
  threadTicks(w.rank());
  if (w.isDriver()) {
    auto line = [](int rank, double sp, double sw, double ip, double iw) {
      std::printf("idle CPU: rank %d: %.2f %% of a CPU when idle (%.0f MPI-thread wake-ups/s); "
                  "%.2f %% (%.0f/s) in the second after a message\n",
                  rank, ip, iw, sp, sw);
    };
    line(0, shortPct, shortWakeups, pct, idleWakeups);
    for (int a = 1; a < w.size(); ++a) {
      Message m = expectFrom(w, a, "idle_cpu");
      line(a, m.get<double>("short", -1), m.get<double>("short_wakeups", -1), m.get<double>("pct", -1),
           m.get<double>("wakeups", -1));
    }
    std::fflush(stdout);
  } else {
    w.send(0, Message("idle_cpu", {{"pct", pct}, {"wakeups", idleWakeups}, {"short", shortPct},
                                   {"short_wakeups", shortWakeups}}));
  }
  CHECK(pct <= limit);
}

// Between cases: every agent's messages of a case reach the driver before
// the next case begins, so no case reads another's.
void sync(World& w, const char* name) {
  if (w.isDriver()) {
    for (int a = 1; a < w.size(); ++a) expectFrom(w, a, std::string("end_") + name);
    for (int a = 1; a < w.size(); ++a) w.send(a, Message(std::string("go_") + name));
  } else {
    w.send(0, Message(std::string("end_") + name));
    expectFrom(w, 0, std::string("go_") + name);
  }
}

// Per thread CPU ticks (FORKLIFT_CLUSTER_THREADS=1: where an idle rank's time goes).
void threadTicks(int rank) {
  if (!std::getenv("WORLD_TEST_THREADS")) return;
  char cmd[256];
  std::snprintf(cmd, sizeof cmd,
                "for t in /proc/%d/task/*; do echo \"rank %d $(cat $t/comm): $(cut -d' ' -f14,15 $t/stat)\"; done",
                static_cast<int>(getpid()), rank);
  if (std::system(cmd) != 0) std::fprintf(stderr, "threadTicks failed\n");
}

struct Case {
  const char* name;
  void (*fn)(World&);
};

const Case kCases[] = {
    {"basics", basics},
    {"second_world_refused", secondWorldRefused},
    {"send_refuses_bad_rank", sendRefusesBadRank},
    {"ping_pong", pingPong},
    {"manager_delivery", managerDelivery},
    {"routes", routes},
    {"garbage_refused", garbageRefused},
    {"idle_cpu", idleCpu},
};

}  // namespace

int main() {
  int passed = 0, failed = 0;
  {
    forklift::cluster::WorldOptions o;
    if (const char* b = std::getenv("WORLD_TEST_MAX_BACKOFF_US")) o.maxBackoff = std::chrono::microseconds(std::atoi(b));
    World w(o);
    rank_for_log = w.rank();
    std::vector<int> caseFailed;
    for (const Case& c : kCases) {
      const int before = failed_checks;
      try {
        c.fn(w);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: case %s threw: %s\n", w.rank(), c.name, e.what());
        ++failed_checks;
      }
      caseFailed.push_back(failed_checks != before ? 1 : 0);
      sync(w, c.name);
    }
    // The job's summary: a case failed when it failed on any rank.
    if (w.isDriver()) {
      for (int a = 1; a < w.size(); ++a) {
        Message m = expectFrom(w, a, "summary");
        auto theirs = m.get<std::vector<std::int64_t>>("failed", {});
        for (std::size_t i = 0; i < caseFailed.size() && i < theirs.size(); ++i)
          if (theirs[i]) caseFailed[i] = 1;
        if (theirs.size() != caseFailed.size()) ++failed_checks;
      }
      for (std::size_t i = 0; i < caseFailed.size(); ++i) {
        std::printf("[ %s ] %s\n", caseFailed[i] ? "FAILED" : "    OK", kCases[i].name);
        (caseFailed[i] ? failed : passed)++;
      }
      std::printf("%d passed, %d failed (%d ranks)\n", passed, failed, w.size());
      std::fflush(stdout);
    } else {
      w.send(0, Message("summary", {{"failed", std::vector<std::int64_t>(caseFailed.begin(), caseFailed.end())}}));
    }
    case_failures = failed;
  }  // MPI_Finalize, with every rank
  return failed_checks == 0 && case_failures == 0 ? 0 : 1;
}
