// bench/cluster_bench - issue 22's figures: forklift's cluster::Pool on one
// machine, and the MPI limit it is set beside.
//
// One SPMD program, started by the real launcher, 3 ranks (the driver and two
// agents of --workers workers each, 1 by default: 2 workers in all, as the
// peers in bench/peers/cluster_peer.py have):
//
//   mpirun --oversubscribe -np 3 build/bench/cluster_bench [--mode M] [options]
//
//   --mode pool      (default) through cluster::Pool: empty tasks/s, a batch
//                    submitted at once then waited for (the pool keeps
//                    2 tasks per worker in flight: pipelined) and one at a
//                    time (each a round trip); the agents' idle CPU; 1 MiB
//                    and 16 MiB array tasks (a forklift ShmArray argument, a
//                    same-size array returned), or "unavailable: <why>" when
//                    arrays cannot cross MPI yet.
//   --mode pingpong  the limit: plain MPI_Send/MPI_Recv ping-pong between
//                    rank 0 and rank 1 (8 B, 1 MiB, 16 MiB); no World.
//   --mode startup   only makes the Pool and prints when it was ready
//                    (bench/compare times the job from mpirun's start).
//   --tasks N (2000) --repetitions R (5) --workers W (1)
//   --idle-seconds S (3) --idle-settle S (1)
//   --spin-us U, --max-backoff-us U: the MPI thread's WorldOptions (their
//                    defaults unless given), to see what the back-off costs
//
// Rank 0 prints one JSON object a line on stdout:
//   {"figure": "cluster_tasks_batch", "unit": "task/s", "median": ..,
//    "p99": .., "min": .., "max": .., "n": ..}
// Percentiles are nearest-rank, over every operation timed (a round trip) or
// every repetition (a batch). p99 is always the slow tail: for a time, its
// 99th percentile; for a rate, the rate of the 99th-percentile slow one (with
// 5 repetitions, the slowest). A figure that could not be measured:
//   {"figure": "cluster_array_1MiB_serial", "unavailable": "<reason>"}.
#include <dirent.h>
#include <mpi.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/world.hpp"
#include "forklift/shm_array.hpp"

using namespace forklift;
using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  std::string mode = "pool";
  int tasks = 2000;
  int repetitions = 5;
  std::size_t workers = 1;
  double idleSeconds = 3.0;
  double idleSettle = 1.0;
  cluster::WorldOptions world;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--mode")
      o.mode = v;
    else if (k == "--tasks")
      o.tasks = std::max(1, std::stoi(v));
    else if (k == "--repetitions")
      o.repetitions = std::max(1, std::stoi(v));
    else if (k == "--workers")
      o.workers = static_cast<std::size_t>(std::max(1, std::stoi(v)));
    else if (k == "--idle-seconds")
      o.idleSeconds = std::stod(v);
    else if (k == "--idle-settle")
      o.idleSettle = std::stod(v);
    else if (k == "--spin-us")
      o.world.spin = std::chrono::microseconds(std::stoll(v));
    else if (k == "--max-backoff-us")
      o.world.maxBackoff = std::chrono::microseconds(std::stoll(v));
    else
      throw Error("cluster_bench: unknown option " + k);
  }
  return o;
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Nearest-rank percentile of `v` (0 < p <= 1).
double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

std::string quote(const std::string& s) {
  std::string q = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      q += '\\';
      q += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      q += ' ';
    } else {
      q += c;
    }
  }
  return q + "\"";
}

// Rates (units ending in "/s") are better high: their slow tail is low.
void emit(const std::string& figure, const std::string& unit, const std::vector<double>& v,
          const std::string& note = "") {
  const bool rate = unit.size() > 2 && unit.compare(unit.size() - 2, 2, "/s") == 0;
  std::printf("{\"figure\": %s, \"unit\": %s, \"median\": %.6g, \"p99\": %.6g, \"min\": %.6g, \"max\": %.6g, \"n\": %zu",
              quote(figure).c_str(), quote(unit).c_str(), percentile(v, 0.5), percentile(v, rate ? 0.01 : 0.99),
              *std::min_element(v.begin(), v.end()), *std::max_element(v.begin(), v.end()), v.size());
  if (!note.empty()) std::printf(", \"note\": %s", quote(note).c_str());
  std::printf("}\n");
  std::fflush(stdout);
}

void unavailable(const std::string& figure, const std::string& why) {
  std::printf("{\"figure\": %s, \"unavailable\": %s}\n", quote(figure).c_str(), quote(why).c_str());
  std::fflush(stdout);
}

std::string sizeName(std::size_t bytes) {
  return bytes >= (1u << 20) ? std::to_string(bytes >> 20) + "MiB" : std::to_string(bytes) + "B";
}

// --- CPU time of a process tree, from /proc --------------------------------

// Nanoseconds on a CPU of every thread of `pid` (/proc/<pid>/task/*/schedstat,
// whose first field is the thread's run time in ns: finer than stat's ticks).
std::uint64_t cpuNs(pid_t pid) {
  std::uint64_t sum = 0;
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = opendir(dir.c_str());
  if (!d) return 0;
  while (const dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream f(dir + "/" + e->d_name + "/schedstat");
    std::uint64_t ns = 0;
    if (f >> ns) sum += ns;
  }
  closedir(d);
  return sum;
}

// `root` and every process below it (an agent rank, its workers and its fork
// server).
std::vector<pid_t> tree(pid_t root) {
  std::multimap<pid_t, pid_t> children;
  if (DIR* d = opendir("/proc")) {
    while (const dirent* e = readdir(d)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      std::ifstream f(std::string("/proc/") + e->d_name + "/stat");
      std::string line;
      std::getline(f, line);
      const auto close = line.rfind(')');
      if (close == std::string::npos) continue;
      std::istringstream rest(line.substr(close + 2));
      char state = 0;
      pid_t ppid = 0;
      if (rest >> state >> ppid) children.emplace(ppid, static_cast<pid_t>(std::atoi(e->d_name)));
    }
    closedir(d);
  }
  std::vector<pid_t> out{root};
  for (std::size_t i = 0; i < out.size(); ++i) {
    auto [b, e] = children.equal_range(out[i]);
    for (auto it = b; it != e; ++it) out.push_back(it->second);
  }
  return out;
}

// --- the pool -----------------------------------------------------------------

// Agents tell the driver their pid before serving (for the idle figure), and
// wait for its go, so the Pool's hello is never taken by this exchange.
constexpr const char* kPid = "bench_pid";
constexpr const char* kGo = "bench_go";

std::vector<pid_t> agentPids(cluster::World& world) {
  std::vector<pid_t> pids(static_cast<std::size_t>(world.size()), -1);
  int got = 0;
  const auto until = Clock::now() + std::chrono::seconds(60);
  while (got < world.size() - 1) {
    if (Clock::now() > until) throw TimeoutError("cluster_bench: the agents did not send their pids within 60 s");
    auto r = world.recv(Timeout(1000));
    if (!r || r->message.command() != kPid) continue;
    pids[static_cast<std::size_t>(r->source)] = static_cast<pid_t>(r->message.get<std::int64_t>("pid"));
    ++got;
  }
  for (int r = 1; r < world.size(); ++r) world.send(r, Message(kGo));
  return pids;
}

double wallClock() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// Every future ended well (checked after the timing).
void checkAll(std::vector<cluster::ClusterFuture>& fs) {
  for (auto& f : fs)
    if (!f.result().ok()) f.get();  // throws the task's error
}

void emptyTasks(cluster::Pool& pool, const Options& o) {
  std::vector<double> rates;
  for (int rep = 0; rep < o.repetitions; ++rep) {
    std::vector<cluster::ClusterFuture> fs;
    fs.reserve(static_cast<std::size_t>(o.tasks));
    const auto t0 = Clock::now();
    for (int i = 0; i < o.tasks; ++i) fs.push_back(pool.submit("empty", {}));
    pool.wait();
    rates.push_back(o.tasks / seconds(Clock::now() - t0));
    checkAll(fs);
  }
  emit("cluster_tasks_batch", "task/s", rates,
       std::to_string(o.tasks) + " empty tasks submitted at once, then waited for");

  // One at a time: every task a round trip driver -> agent -> worker -> back.
  std::vector<double> rtt;
  const int serial = std::max(1, o.tasks / 4);
  for (int rep = 0; rep < o.repetitions; ++rep) {
    for (int i = 0; i < serial; ++i) {
      const auto t0 = Clock::now();
      pool.submit("empty", {}).get();
      rtt.push_back(seconds(Clock::now() - t0) * 1e6);
    }
  }
  emit("cluster_task_rtt", "us", rtt, "one empty task at a time, submit to result");
}

void idleCpu(cluster::World& world, const std::vector<pid_t>& pids, const Options& o) {
  std::this_thread::sleep_for(std::chrono::duration<double>(o.idleSettle));
  std::vector<double> rank, whole;
  std::vector<std::vector<pid_t>> trees;
  std::vector<std::uint64_t> rank0, tree0;
  for (int r = 1; r < world.size(); ++r) {
    const pid_t p = pids[static_cast<std::size_t>(r)];
    trees.push_back(tree(p));
    rank0.push_back(cpuNs(p));
    std::uint64_t s = 0;
    for (pid_t q : trees.back()) s += cpuNs(q);
    tree0.push_back(s);
  }
  const auto t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(o.idleSeconds));
  const double wall = seconds(Clock::now() - t0);
  for (std::size_t i = 0; i < trees.size(); ++i) {
    const pid_t p = pids[i + 1];
    rank.push_back(100.0 * static_cast<double>(cpuNs(p) - rank0[i]) * 1e-9 / wall);
    std::uint64_t s = 0;
    for (pid_t q : trees[i]) s += cpuNs(q);
    whole.push_back(100.0 * static_cast<double>(s - tree0[i]) * 1e-9 / wall);
  }
  char note[160];
  std::snprintf(note, sizeof note, "%% of one CPU, every thread, over %.1f s from %.1f s after the last task; one value per agent",
                o.idleSeconds, o.idleSettle);
  emit("cluster_idle_cpu_rank", "%cpu", rank, note);
  std::string sizes;
  for (const auto& t : trees) sizes += (sizes.empty() ? "" : ", ") + std::to_string(t.size());
  emit("cluster_idle_cpu_agent_tree", "%cpu", whole,
       std::string(note) + "; the rank and every process below it (workers, fork server): " + sizes + " processes");
}

// The array task: reads its argument in place and returns a same-size array
// with the same bytes (a copy made in the worker).
Value echoArray(const List& a) {
  auto in = ShmArray<std::uint8_t>::open(a.at(0));
  auto out = ShmArray<std::uint8_t>::create("bench-echo", in.rows());
  std::memcpy(out.data(), in.data(), in.bytes());
  return out.describe();
}

// An array task that did not end in time (it still runs somewhere).
struct NoResult : Error {
  using Error::Error;
};

// One array task: true when its result came back right; throws its error,
// NoResult when none came within `timeout`.
bool arrayRoundTrip(cluster::Pool& pool, const ShmArray<std::uint8_t>& in, Timeout timeout) {
  auto f = pool.submit("echo_array", {in.describe()});
  if (!f.wait(timeout)) throw NoResult("no result within " + std::to_string(timeout.count()) + " ms");
  auto out = ShmArray<std::uint8_t>::open(f.get());
  const auto n = static_cast<std::size_t>(in.size());
  return static_cast<std::size_t>(out.size()) == n && out.data()[0] == in.data()[0] &&
         out.data()[n - 1] == in.data()[n - 1];
}

void arrayTasks(cluster::Pool& pool, const Options& o) {
  std::string why;  // set once arrays proved unavailable
  for (const std::size_t bytes : {std::size_t{1} << 20, std::size_t{16} << 20}) {
    const std::string name = "cluster_array_" + sizeName(bytes);
    if (!why.empty()) {
      unavailable(name + "_serial", why);
      unavailable(name + "_batch", why);
      continue;
    }
    auto in = ShmArray<std::uint8_t>::create("bench-in", static_cast<Eigen::Index>(bytes));
    for (std::size_t i = 0; i < bytes; ++i) in.data()[i] = static_cast<std::uint8_t>(i * 7 + 3);
    try {
      if (!arrayRoundTrip(pool, in, Timeout(60000))) throw Error("the returned array differs from the argument");
    } catch (const NoResult& e) {
      // The task still runs somewhere, so the pool cannot finalize, and its
      // destructor would wait for it: the figures are printed, and this rank
      // leaves; mpirun then ends the job, non-zero.
      for (const char* size : {"1MiB", "16MiB"})
        for (const char* mode : {"_serial", "_batch"})
          unavailable(std::string("cluster_array_") + size + mode, std::string("the first array task: ") + e.what());
      std::fprintf(stderr, "cluster_bench: an array task had no result within 60 s; ending the job\n");
      std::fflush(nullptr);
      _exit(3);
    } catch (const std::exception& e) {
      why = e.what();
      unavailable(name + "_serial", why);
      unavailable(name + "_batch", why);
      continue;
    }
    // One at a time, set beside the ping-pong: the bytes both ways per second.
    const int rounds = bytes > (1u << 20) ? 4 : 20;
    std::vector<double> rtt;
    for (int rep = 0; rep < o.repetitions; ++rep)
      for (int i = 0; i < rounds; ++i) {
        const auto t0 = Clock::now();
        if (!arrayRoundTrip(pool, in, Timeout(60000))) throw Error("the returned array differs from the argument");
        rtt.push_back(seconds(Clock::now() - t0));
      }
    std::vector<double> rate;
    for (double s : rtt) rate.push_back(2.0 * static_cast<double>(bytes) / s);
    emit(name + "_serial", "B/s", rate, "one task at a time; bytes both ways (argument + result) per second");
    // A batch over both agents at once.
    const int batch = bytes > (1u << 20) ? 4 : 16;
    std::vector<double> brate;
    for (int rep = 0; rep < o.repetitions; ++rep) {
      std::vector<cluster::ClusterFuture> fs;
      const auto t0 = Clock::now();
      for (int i = 0; i < batch; ++i) fs.push_back(pool.submit("echo_array", {in.describe()}));
      int right = 0;
      for (auto& f : fs) {
        auto out = ShmArray<std::uint8_t>::open(f.get());
        right += static_cast<std::size_t>(out.size()) == bytes;
      }
      brate.push_back(2.0 * static_cast<double>(bytes) * batch / seconds(Clock::now() - t0));
      if (right != batch) throw Error("an array task returned an array of another size");
    }
    emit(name + "_batch", "B/s", brate, std::to_string(batch) + " tasks submitted at once");
  }
}

int poolMain(const Options& o) {
  cluster::define("empty", [](const List&) { return Value(); });
  cluster::define("echo_array", echoArray);
  cluster::AgentOptions ao;
  ao.workers = o.workers;
  cluster::Agent agent(ao);  // before the World: workers forked before MPI_Init
  cluster::World world(o.world);
  const bool startup = o.mode == "startup";
  if (!world.isDriver()) {
    if (!startup) {
      world.send(0, Message(kPid, {{"pid", static_cast<std::int64_t>(getpid())}}));
      if (!world.recv(Timeout(60000))) throw TimeoutError("cluster_bench: no go from the driver within 60 s");
    }
    return agent.serve(world);
  }
  std::vector<pid_t> pids;
  if (!startup) pids = agentPids(world);
  cluster::Pool pool(world);
  std::printf("{\"figure\": \"cluster_pool_ready\", \"unit\": \"s since the epoch\", \"wallclock\": %.6f}\n", wallClock());
  std::fflush(stdout);
  if (startup) {
    pool.finalize();
    return 0;
  }
  // Warm-up: both agents' workers have run tasks.
  std::vector<cluster::ClusterFuture> warm;
  for (int i = 0; i < 200; ++i) warm.push_back(pool.submit("empty", {}));
  pool.wait();
  checkAll(warm);
  warm.clear();
  idleCpu(world, pids, o);
  emptyTasks(pool, o);
  arrayTasks(pool, o);
  const auto per = pool.perRank();
  std::printf("{\"figure\": \"cluster_tasks_per_rank\", \"unit\": \"tasks\", \"ranks\": [%zu, %zu]}\n",
              per.size() > 1 ? per[1] : 0, per.size() > 2 ? per[2] : 0);
  std::fflush(stdout);
  pool.finalize();
  return 0;
}

// --- the limit: plain MPI ------------------------------------------------------

void check(const char* routine, int rc) {
  if (rc != MPI_SUCCESS) throw Error(std::string(routine) + " failed: " + std::to_string(rc));
}

int pingpongMain(int argc, char** argv, const Options& o) {
  check("MPI_Init", MPI_Init(&argc, &argv));
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size < 2) throw Error("cluster_bench --mode pingpong: needs 2 ranks or more");
  for (const std::size_t bytes : {std::size_t{8}, std::size_t{1} << 20, std::size_t{16} << 20}) {
    std::vector<char> buf(bytes, 1);
    const int n = static_cast<int>(bytes);
    const int rounds = bytes > (1u << 20) ? 8 : (bytes > 8 ? 40 : 2000);
    std::vector<double> rtt;
    for (int rep = -1; rep < o.repetitions; ++rep) {  // -1: warm-up
      for (int i = 0; i < rounds; ++i) {
        const auto t0 = Clock::now();
        if (rank == 0) {
          check("MPI_Send", MPI_Send(buf.data(), n, MPI_BYTE, 1, 7, MPI_COMM_WORLD));
          check("MPI_Recv", MPI_Recv(buf.data(), n, MPI_BYTE, 1, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
        } else if (rank == 1) {
          check("MPI_Recv", MPI_Recv(buf.data(), n, MPI_BYTE, 0, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
          check("MPI_Send", MPI_Send(buf.data(), n, MPI_BYTE, 0, 7, MPI_COMM_WORLD));
        }
        if (rep >= 0) rtt.push_back(seconds(Clock::now() - t0));
      }
    }
    if (rank == 0) {
      const std::string name = "mpi_pingpong_" + sizeName(bytes);
      if (bytes == 8) {
        std::vector<double> us;
        for (double s : rtt) us.push_back(s * 1e6);
        emit(name + "_rtt", "us", us, "raw MPI_Send/MPI_Recv round trip, rank 0 <-> rank 1");
      } else {
        std::vector<double> rate;
        for (double s : rtt) rate.push_back(2.0 * static_cast<double>(bytes) / s);
        emit(name, "B/s", rate, "raw MPI_Send/MPI_Recv ping-pong, rank 0 <-> rank 1; bytes both ways per second");
      }
    }
  }
  check("MPI_Finalize", MPI_Finalize());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    if (o.mode == "pingpong") return pingpongMain(argc, argv, o);
    if (o.mode == "pool" || o.mode == "startup") return poolMain(o);
    std::fprintf(stderr, "cluster_bench: unknown mode '%s' (pool, pingpong, startup)\n", o.mode.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cluster_bench: %s\n", e.what());
    return 1;
  }
}
