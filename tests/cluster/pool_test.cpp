// tests/cluster/pool_test: cluster::Pool, Agent and define() under
// mpirun -np 3 (the driver and two agents of 2 workers each). The driver
// checks; the agents serve until it finalizes. Prints "N passed, N failed".
//
//   cluster_pool_test       accounting, map, failures on one host, retries,
//                           suspend/resume, bad input
//   cluster_pool_test out   the restart limit takes host1 out, host2 does
//                           the work; then host2 out too: PoolBroken
//   cluster_pool_test start misuse at start-up; agents that never say hello
//
// Bounds on how long something may take are multiplied by
// FORKLIFT_TEST_SLOWDOWN (tests/support.hpp's rule).
#include <errno.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/world.hpp"

using namespace forklift;
using namespace std::chrono_literals;

namespace {

int failures = 0, passes = 0;
std::set<pid_t> workerPids;  // every worker a result came from (one machine: checked gone at the end)

void check(bool ok, const std::string& what) {
  std::printf("[ %s ] %s\n", ok ? "    OK" : "FAILED", what.c_str());
  std::fflush(stdout);
  (ok ? passes : failures)++;
}

Timeout slow(Timeout t) {
  const char* v = std::getenv("FORKLIFT_TEST_SLOWDOWN");
  const double f = v ? std::max(1.0, std::atof(v)) : 1.0;
  return Timeout(static_cast<std::int64_t>(static_cast<double>(t.count()) * f));
}

template <class E>
std::string failsWith(cluster::ClusterFuture f) {
  try {
    f.get();
    return "";
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(other error) ") + e.what();
  }
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The rank of this process (a worker inherits its agent's environment).
int myRank() {
  for (const char* v : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"})
    if (const char* s = std::getenv(v)) return std::atoi(s);
  return -1;
}

std::int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void defineAll() {
  cluster::define("square", [](const List& a) { return Value(a.at(0).as<double>() * a.at(0).as<double>()); });
  cluster::define("pid", [](const List&) { return Value(static_cast<std::int64_t>(getpid())); });
  cluster::define("segv", [](const List&) -> Value {
    raise(SIGSEGV);
    return Value();
  });
  cluster::define("hangAll", [](const List&) -> Value {
    std::this_thread::sleep_for(60s);
    return Value();
  });
  cluster::define("throws", [](const List&) -> Value { throw std::runtime_error("on purpose"); });
  cluster::define("big", [](const List& a) { return Value(std::string(a.at(0).as<std::size_t>(), 'x')); });
  // On rank args[0] it misbehaves as args[1] says; elsewhere it returns the rank.
  cluster::define("onRank", [](const List& a) -> Value {
    if (myRank() == a.at(0).as<int>()) {
      const auto how = a.at(1).as<std::string>();
      if (how == "segv") raise(SIGSEGV);
      if (how == "exit0") _exit(0);
      if (how == "hang") std::this_thread::sleep_for(60s);
    }
    return Value(myRank());
  });
  // Sleeps args[0] ms; returns when it started (steady clock, one machine).
  cluster::define("sleepMs", [](const List& a) {
    const auto start = nowNs();
    std::this_thread::sleep_for(std::chrono::milliseconds(a.at(0).as<std::int64_t>()));
    return Value(start);
  });
}

// Polls the pool until `done` or the bound passes.
template <class F>
bool eventually(cluster::Pool& pool, Timeout bound, F done) {
  const auto end = std::chrono::steady_clock::now() + bound;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    pool.poll();
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// The agent's side of the bad-input test: on "test.misbehave" from the
// driver (the World's inbox is the program's while the agent serves) it sends
// garbage and wrong "__cluster_" messages to the driver, then "test.sent".
void misbehaveOnRequest(cluster::World& world) {
  for (;;) {
    auto r = world.recv(kForever);
    if (!r || r->message.command() == "test.quit") return;
    if (r->message.command() != "test.misbehave") continue;
    cluster::detail::sendRaw(world, 0, {'\xc1', 'n', 'o', 'p', 'e'});                         // undecodable
    world.send(0, Message("__cluster_result", {{"id", 987654}, {"ok", true}, {"worker", 0}}));  // unknown task
    world.send(0, Message("__cluster_result", {{"id", "seven"}, {"ok", true}}));               // ill-typed
    world.send(0, Message("__cluster_result", {{"ok", false}}));                               // missing fields
    world.send(0, Message("__cluster_hello", {{"workers", 2}, {"host", "again"}}));            // a hello twice
    world.send(0, Message("__cluster_out", {{"reason", 5}, {"ids", List{}}}));                 // ill-typed: stays in
    world.send(0, Message("__cluster_replaced", {{"replacements", -3}}));                     // a false count
    world.send(0, Message("__cluster_nonsense"));                                              // no such command
    world.send(0, Message("test.sent"));
  }
}
constexpr std::size_t kWrongPerAgent = 7;  // the "__cluster_" messages above
// What the driver sends each agent that is wrong (see the bad input case).
constexpr std::size_t kWrongToAgent = 4;

void mainPhase(cluster::World& world) {
  cluster::PoolOptions po;
  po.restartLimit = 100;  // this phase's failures on host1 must not take it out
  po.taskTimeout = slow(1000ms);  // the pool's default: every task here but "hangAll" takes far less
  cluster::Pool pool(world, po);

  // 2,000 tasks over both agents: every future once, every result right,
  // the progress callback once per task.
  {
    std::vector<int> calls(2001, 0);
    std::size_t callbacks = 0, badPlace = 0, maxInFlight = 0;
    pool.onResult([&](const cluster::TaskEnd& e, const CallResult& r) {
      ++callbacks;
      if (e.id < calls.size()) ++calls[e.id];
      if (!r.ok() || e.place.rank < 1 || e.place.host != world.host(e.place.rank) || e.attempts != 1) ++badPlace;
      for (const auto& h : pool.hostStats()) maxInFlight = std::max(maxInFlight, h.inFlight);
    });
    std::vector<cluster::ClusterFuture> fs;
    for (int i = 0; i < 2000; ++i) fs.push_back(pool.submit("square", {Value(static_cast<double>(i))}));
    int right = 0;
    std::set<std::string> hosts;
    for (int i = 0; i < 2000; ++i) {
      auto& f = fs[static_cast<std::size_t>(i)];
      if (f.get().as<double>() == static_cast<double>(i) * i) ++right;
      hosts.insert(f.place().host);
      workerPids.insert(f.place().pid);
    }
    const bool once = std::all_of(calls.begin() + 1, calls.end(), [](int c) { return c == 1; });
    check(right == 2000 && pool.completed() == 2000 && pool.submitted() == 2000 && pool.failedTasks() == 0,
          "2000 squares right: " + std::to_string(right) + ", completed " + std::to_string(pool.completed()));
    check(callbacks == 2000 && once && badPlace == 0,
          "the progress callback ran once per task (" + std::to_string(callbacks) + "), each with its place");
    check(maxInFlight >= 3 && maxInFlight <= 4,
          "at most tasksPerWorker x workers = 4 tasks in flight on a host; the most seen: " +
                                std::to_string(maxInFlight));
    const auto per = pool.perRank();
    const auto stats = pool.hostStats();
    check(hosts.size() == 2 && per.size() == 3 && per[1] >= 400 && per[2] >= 400 && per[1] + per[2] == 2000 &&
              stats.size() == 2 && stats[0].ran == per[1] && stats[1].ran == per[2] && stats[0].inFlight == 0,
          "both agents ran a fair share: rank 1 " + std::to_string(per.at(1)) + ", rank 2 " +
              std::to_string(per.at(2)));
    pool.onResult(nullptr);
  }

  // ready() looks without waiting; the callback may not wait on the pool.
  {
    bool refusedToWait = false;
    pool.onResult([&](const cluster::TaskEnd&, const CallResult&) {
      try {
        pool.wait();
      } catch (const Error&) {
        refusedToWait = true;
      }
    });
    auto f = pool.submit("sleepMs", {Value(std::int64_t{200})});
    const bool notYet = !f.ready();
    const bool then = eventually(pool, slow(5000ms), [&] { return f.ready(); });
    check(notYet && then && refusedToWait,
          "ready() is false while the task runs, then true; waiting from the callback throws");
    pool.onResult(nullptr);
  }

  // The place of a task: the worker's pid is the one the task saw.
  {
    auto p = pool.submit("pid", {});
    const auto pid = p.get().as<std::int64_t>();
    check(p.place().pid == pid && p.place().rank > 0 && p.place().host == world.host(p.place().rank),
          "a result says its host, rank, worker and pid (" + p.place().host + ", worker " +
              std::to_string(p.place().worker) + ", pid " + std::to_string(pid) + ")");
  }

  // map: results in input order; a failure is thrown after all ended.
  {
    std::vector<List> args;
    for (int i = 0; i < 300; ++i) args.push_back({Value(static_cast<double>(i))});
    const auto r = pool.map("square", args);
    bool inOrder = r.size() == 300;
    for (std::size_t i = 0; inOrder && i < r.size(); ++i) inOrder = r[i].as<double>() == double(i) * double(i);
    check(inOrder, "map: 300 results in input order");
    args[10] = {Value("ten")};
    args[20] = {Value("twenty")};
    const auto before = pool.completed();
    std::string e;
    try {
      pool.map("square", args);
    } catch (const RemoteError& x) {
      e = x.what();
    }
    check(has(e, "string found") && pool.completed() == before + 300,
          "map throws the first failed task's error once all 300 ended: " + e);
  }

  // Errors of the function, and bad arguments.
  {
    std::string e = failsWith<RemoteError>(pool.submit("nope", {}));
    check(has(e, "no function 'nope'") && has(e, "host"), "unknown function: RemoteError: " + e);
    e = failsWith<RemoteError>(pool.submit("throws", {}));
    check(has(e, "on purpose") && has(e, "worker"), "a function that throws: RemoteError: " + e);
    e = failsWith<RemoteError>(pool.submit("square", {Value("seven")}));
    check(has(e, "string found, double wanted"), "an argument of the wrong type: RemoteError: " + e);
    e = failsWith<Error>(pool.submit("square", {Value(std::string(std::size_t{17} << 20, 'x'))}));
    check(has(e, "cannot be sent") && has(e, "limit"), "arguments over the limits: Error: " + e.substr(0, 300));
    TaskOptions once;
    once.retries = 0;
    const auto t0 = std::chrono::steady_clock::now();
    e = failsWith<TaskTimeout>(pool.submitWith("hangAll", {}, once));
    const auto took = std::chrono::steady_clock::now() - t0;
    check(has(e, "ran longer than its timeout of " + std::to_string(po.taskTimeout.count()) + " ms") &&
              took >= po.taskTimeout && took < po.taskTimeout + slow(5000ms),
          "the pool's default timeout: TaskTimeout: " + e);
    e = failsWith<RemoteError>(pool.submit("big", {Value(std::int64_t{17} << 20)}));
    check(has(e, "exceeds the limit") && has(e, "on host host"),
          "a result over the limits: RemoteError: " + e.substr(0, 300));
  }

  // Segfault, hang past the timeout, _exit(0) on host1 only, no retries:
  // those that ran on host1 fail saying where and how, the others return 2.
  {
    const auto before = pool.hostStats();
    const Timeout timeout(400);  // far more than a task that does not hang takes
    struct Case {
      const char* how;
      int n;
    };
    std::size_t lost = 0, ok2 = 0, total = 0;
    std::string sample;
    for (const Case c : {Case{"segv", 4}, Case{"hang", 4}, Case{"exit0", 4}}) {
      std::vector<cluster::ClusterFuture> fs;
      TaskOptions o;
      o.retries = 0;
      o.timeout = timeout;
      for (int i = 0; i < c.n; ++i) fs.push_back(pool.submitWith("onRank", {Value(1), Value(c.how)}, o));
      for (auto& f : fs) {
        ++total;
        const CallResult& r = f.result();
        if (r.ok()) {
          ok2 += r.get().as<int>() == 2 && f.place().rank == 2;
          continue;
        }
        const std::string what = r.what();
        bool right = f.place().rank == 1 && f.place().pid > 0 && has(what, "on host host1 (rank 1), worker ");
        try {
          std::rethrow_exception(r.error());
        } catch (const WorkerDied& x) {
          const std::string how = c.how;
          right = right && ((how == "segv" && x.status().signal == SIGSEGV && has(what, "SIGSEGV")) ||
                            (how == "exit0" && x.status().how == ExitStatus::How::Exited && x.status().code == 0));
        } catch (const TaskTimeout&) {
          right = right && std::string(c.how) == "hang";
        } catch (...) {
          right = false;
        }
        if (!right) std::printf("  wrong failure: %s\n", what.c_str());
        lost += right;
        if (sample.empty() || std::string(c.how) == "exit0") sample = what;
      }
    }
    check(lost >= 3 && lost + ok2 == total,
          std::to_string(lost) + " of " + std::to_string(total) + " failed on host1 with host, worker, status; " +
              std::to_string(ok2) + " ran on host2: " + sample);
    // Replacements: the agents' own counts, one per worker lost there.
    auto replaced = [&](std::size_t i) { return pool.hostStats()[i].replacements - before[i].replacements; };
    const bool settled = eventually(pool, slow(5000ms), [&] { return replaced(0) == lost; });
    const auto after = pool.hostStats();
    check(settled && replaced(1) == 0 && after[0].failed - before[0].failed == lost &&
              after[1].failed == before[1].failed && after[0].serving && after[1].serving,
          "replacements: host1 " + std::to_string(replaced(0)) + " (" + std::to_string(lost) + " lost), host2 " +
              std::to_string(replaced(1)));
  }

  // With retries (the default, 1), each of those succeeds on host2.
  {
    std::vector<cluster::ClusterFuture> fs;
    for (const char* how : {"segv", "hang", "exit0"})
      for (int i = 0; i < 4; ++i) fs.push_back(pool.submit("onRank", {Value(1), Value(how)}, Timeout(400)));
    std::size_t on2 = 0;
    for (auto& f : fs) {
      const CallResult& r = f.result();
      on2 += r.ok() && r.get().as<int>() == 2 && f.place().rank == 2;
      if (!r.ok()) std::printf("  failed: %s\n", r.what().c_str());
    }
    check(on2 == fs.size(), "with a retry every task that failed on host1 succeeded on host2: " +
                                std::to_string(on2) + " of " + std::to_string(fs.size()));
    // Retries exhausted: the error lists every attempt and where it ran
    // (the retry on the other host).
    const std::string e = failsWith<WorkerDied>(pool.submit("segv", {}));
    check(has(e, "'segv' on host host") && has(e, "; attempt 2 of 2 on host host") && has(e, "host1 (rank 1)") &&
              has(e, "host2 (rank 2)") && has(e, "SIGSEGV"),
          "a task that crashed on both hosts: WorkerDied: " + e);
  }

  // suspend(): the tasks running finish, no other starts until resume().
  // 8 tasks of 300 ms on 4 workers: without the suspension the second 4
  // would start within the 600 ms it lasts.
  {
    pool.wait();
    std::vector<cluster::ClusterFuture> fs;
    for (int i = 0; i < 8; ++i) fs.push_back(pool.submit("sleepMs", {Value(std::int64_t{300})}));
    pool.poll();
    const auto before = pool.completed();
    pool.suspend();
    bool threw = false;
    try {
      pool.wait();
    } catch (const Error&) {
      threw = true;
    }
    std::size_t queuedThrew = 0;  // the tasks the agents gave back: their waits throw
    for (auto& f : fs) {
      try {
        f.wait(1ms);
      } catch (const Error&) {
        ++queuedThrew;
      }
    }
    eventually(pool, 600ms, [] { return false; });
    const auto during = pool.completed() - before;
    const auto resumedAt = nowNs();
    pool.resume();
    const bool all = pool.wait(slow(10000ms));
    std::size_t startedBefore = 0;
    for (auto& f : fs) startedBefore += f.get().as<std::int64_t>() <= resumedAt;
    check(all && !pool.suspended() && startedBefore <= 4 && during <= 4 && threw && queuedThrew >= 4 &&
              queuedThrew == 8 - startedBefore,
          "suspend: " + std::to_string(startedBefore) +
              " of 8 tasks started before resume() (at most one per worker), " +
              std::to_string(during) + " ended while suspended; wait() while suspended with tasks queued threw: " +
              std::to_string(threw) + ", so did the waits of the " + std::to_string(queuedThrew) + " queued");
  }

  // Bad input: wrong "__cluster_" messages both ways; everyone goes on.
  {
    const auto refusedBefore = pool.refused();
    const auto garbageBefore = world.stats().refused;
    for (int r = 1; r < world.size(); ++r) {
      world.send(r, Message("__cluster_task", {{"fn", "square"}}));                    // no id
      world.send(r, Message("__cluster_task", {{"id", 555555}, {"fn", 7}}));           // ill-typed: answered
      world.send(r, Message("__cluster_bogus"));                                       // no such command
      world.send(r, Message("__cluster_config", {{"restart_limit", "many"}}));          // ill-typed
      cluster::detail::sendRaw(world, r, {'\x93', '\xff', 'x'});                          // undecodable
      world.send(r, Message("test.misbehave"));
    }
    int sent = 0;
    const auto end = std::chrono::steady_clock::now() + slow(5000ms);
    while (sent < world.size() - 1 && std::chrono::steady_clock::now() < end)
      if (auto r = world.recv(100ms); r && r->message.command() == "test.sent") ++sent;
    // Each agent's answer to the ill-typed task is a result for a task that
    // is not running: refused too.
    const auto expected = (kWrongPerAgent + 1) * static_cast<std::size_t>(world.size() - 1);
    const bool counted = eventually(pool, slow(5000ms), [&] { return pool.refused() - refusedBefore >= expected; });
    const auto stats = pool.hostStats();
    check(sent == world.size() - 1 && counted && pool.refused() - refusedBefore == expected &&
              world.stats().refused - garbageBefore == static_cast<std::uint64_t>(world.size() - 1) &&
              stats[0].serving && stats[1].serving,
          "wrong cluster messages refused and counted: " + std::to_string(pool.refused() - refusedBefore) +
              " (expected " + std::to_string(expected) + "), undecodable " +
              std::to_string(world.stats().refused - garbageBefore) + "; both hosts serve");
    std::vector<List> args(100, List{Value(3.0)});
    const auto r = pool.map("square", args);
    check(std::all_of(r.begin(), r.end(), [](const Value& v) { return v.as<double>() == 9.0; }),
          "100 tasks after the bad input: right");
  }

  // A figure, not a check: small tasks per second through both agents.
  {
    const auto s0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 2000; ++i) pool.submit("square", {Value(1.0)});
    pool.wait();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count();
    std::printf("figure: 2000 tasks in %.3f s: %.0f tasks/s over 2 agents of 2 workers\n", secs, 2000 / secs);
  }
  pool.finalize();
}

void outPhase(cluster::World& world) {
  cluster::PoolOptions po;
  po.restartLimit = 2;  // the 3rd worker lost in a row takes a host out
  cluster::Pool pool(world, po);
  std::size_t ends = 0, attempts = 0;
  int maxAttempts = 0;
  pool.onResult([&](const cluster::TaskEnd& e, const CallResult&) {
    ++ends;
    attempts += static_cast<std::size_t>(e.attempts);
    maxAttempts = std::max(maxAttempts, e.attempts);
  });

  // Host1 crashes every task: it goes out, host2 runs all of them.
  std::vector<cluster::ClusterFuture> fs;
  for (int i = 0; i < 20; ++i) fs.push_back(pool.submit("onRank", {Value(1), Value("segv")}));
  std::size_t on2 = 0;
  for (auto& f : fs) {
    on2 += f.result().ok() && f.get().as<int>() == 2 && f.place().rank == 2;
    workerPids.insert(f.place().pid);
  }
  auto s = pool.hostStats();
  check(on2 == 20 && ends == 20 && maxAttempts <= 2, "host2 finished all 20 tasks: " + std::to_string(on2));
  check(!s[0].serving && has(s[0].reason, "in a row") && s[1].serving && s[0].inFlight == 0,
        "host1 is out of the rotation: " + s[0].reason);
  check(s[0].failed >= 3 && s[0].failed <= 3 + 1 && s[0].ran == s[0].failed,
        "host1 lost " + std::to_string(s[0].failed) + " workers before it was out (limit 2, a 2nd worker may be busy)");
  // Each failure on host1 cost one retry; the tasks it gave back unstarted cost none.
  check(attempts == 20 + s[0].failed && s[1].ran == 20,
        "attempts: " + std::to_string(attempts) + " = 20 tasks + " + std::to_string(s[0].failed) +
            " retries; host2 ran " + std::to_string(s[1].ran));
  const bool settled = eventually(pool, slow(5000ms), [&] { return pool.hostStats()[0].replacements == s[0].failed; });
  check(settled && pool.hostStats()[1].replacements == 0,
        "replacements as the agents count them: host1 " + std::to_string(pool.hostStats()[0].replacements) +
            ", host2 " + std::to_string(pool.hostStats()[1].replacements));
  // More tasks go to host2 only.
  std::vector<List> args(50, List{Value(1), Value("segv")});
  const auto r = pool.map("onRank", args);
  check(std::all_of(r.begin(), r.end(), [](const Value& v) { return v.as<int>() == 2; }),
        "50 more tasks all ran on host2");

  // Now host2 crashes every task too: its local pool breaks (a crash loop);
  // with no host left every task waiting fails with PoolBroken and submit
  // throws it.
  TaskOptions o;
  o.retries = 0;
  fs.clear();
  for (int i = 0; i < 12; ++i) fs.push_back(pool.submitWith("onRank", {Value(2), Value("segv")}, o));
  std::size_t died = 0, broken = 0;
  std::string brokenText;
  for (auto& f : fs) {
    try {
      f.get();
    } catch (const WorkerDied&) {
      ++died;
    } catch (const PoolBroken& e) {
      ++broken;
      brokenText = e.what();
    } catch (...) {
    }
  }
  check(!pool.hostStats()[1].serving && has(pool.hostStats()[1].reason, "its local pool broke"),
        "host2 is out: " + pool.hostStats()[1].reason);
  check(died >= 1 && broken >= 1 && died + broken == 12 && has(brokenText, "every host is out") &&
            has(brokenText, "host1") && has(brokenText, "host2"),
        std::to_string(died) + " died on host2, " + std::to_string(broken) + " PoolBroken: " + brokenText);
  std::string e;
  try {
    pool.submit("square", {Value(1.0)});
  } catch (const PoolBroken& x) {
    e = x.what();
  }
  check(has(e, "every host is out"), "submit with no host left: PoolBroken: " + e);
  pool.finalize();
  e.clear();
  try {
    pool.submit("square", {Value(1.0)});
  } catch (const PoolBroken&) {
  } catch (const Error& x) {
    e = x.what();
  }
  check(has(e, "finalized"), "submit after finalize: Error: " + e);
}

// Start-up and misuse: a Pool on an agent rank, serve() on the driver, a
// Pool whose agents never say hello.
void startPhase(cluster::World& world, cluster::Agent& agent) {
  std::string e;
  try {
    agent.serve(world);
  } catch (const Error& x) {
    e = x.what();
  }
  check(has(e, "rank 0 is the driver"), "Agent::serve on the driver: Error: " + e);
  cluster::PoolOptions po;
  po.startTimeout = 500ms;
  e.clear();
  const auto t0 = std::chrono::steady_clock::now();
  try {
    cluster::Pool pool(world, po);
  } catch (const TimeoutError& x) {
    e = x.what();
  }
  const auto took = std::chrono::steady_clock::now() - t0;
  check(has(e, "2 agent(s) did not say hello within 500 ms") && took >= 500ms && took < 500ms + slow(5000ms),
        "agents that never say hello: TimeoutError: " + e);
  for (int r = 1; r < world.size(); ++r) world.send(r, Message("test.quit"));
}

// The agents' side of the start phase: they do not serve.
int notServing(cluster::World& world) {
  std::string e;
  try {
    cluster::Pool pool(world);
  } catch (const Error& x) {
    e = x.what();
  }
  auto r = world.recv(slow(60000ms));
  if (!has(e, "only the driver") || !r || r->message.command() != "test.quit") {
    std::printf("FAILED: rank %d: a Pool on an agent rank: %s\n", world.rank(), e.c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string phase = argc > 1 ? argv[1] : "";
  const bool out = phase == "out";
  defineAll();
  cluster::AgentOptions ao;
  // The main phase loses many workers on host1 on purpose: its local pool's
  // crash-loop limit must not take it out (the out phase tests that).
  if (!out) ao.pool.restartLimit = 1000;
  // The out phase: host2's local pool breaks at its 2nd death (a crash loop).
  if (out && myRank() == 2) ao.pool.restartLimit = 1;
  cluster::Agent agent(ao);  // before the World: workers forked before MPI_Init
  {
    cluster::World world;
    if (!world.isDriver() && phase == "start") return notServing(world);
    if (!world.isDriver()) {
      std::thread hook([&world] { misbehaveOnRequest(world); });
      const int rc = agent.serve(world);
      world.send(world.rank(), Message("test.quit"));
      hook.join();
      const std::size_t expected = out ? 0 : kWrongToAgent;
      const std::uint64_t garbage = out ? 0 : 1;
      if (agent.refused() != expected || world.stats().refused != garbage) {
        std::printf("FAILED: rank %d refused %zu wrong messages and %llu undecodable, expected %zu and %llu\n",
                    world.rank(), agent.refused(), static_cast<unsigned long long>(world.stats().refused), expected,
                    static_cast<unsigned long long>(garbage));
        return 1;
      }
      return rc;
    }
    if (phase == "start")
      startPhase(world, agent);
    else if (out)
      outPhase(world);
    else
      mainPhase(world);
  }  // every rank's World ended: each agent's serve() returned and stopped its workers
  std::size_t alive = 0;
  const auto end = std::chrono::steady_clock::now() + slow(5000ms);
  do {
    alive = 0;
    for (pid_t p : workerPids) alive += p > 0 && (kill(p, 0) == 0 || errno != ESRCH);
    if (alive) std::this_thread::sleep_for(20ms);
  } while (alive && std::chrono::steady_clock::now() < end);
  check((phase == "start" || workerPids.size() >= 2) && alive == 0,
        "no worker left once the job ended: " + std::to_string(workerPids.size()) + " seen, " + std::to_string(alive) +
            " alive");
  std::printf("%d passed, %d failed\n", passes, failures);
  std::fflush(stdout);
  return failures == 0 ? 0 : 1;
}
