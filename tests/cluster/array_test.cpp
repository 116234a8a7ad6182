// tests/cluster/array_test: forklift arrays in cluster messages, under the
// real launcher:
//
//   mpirun --oversubscribe --allow-run-as-root -np 3 array_test
//
// Rank 0 is the driver, ranks 1 and 2 agents. Every rank runs the World
// cases in the same order (a sync between cases keeps their messages apart),
// then the agents serve a cluster::Pool whose task takes an array and
// returns a new one. Arrays are filled with a seeded pattern on one side and
// checksummed on the other. Each rank counts its failed checks and exits 1
// when it has any (so mpirun does); the driver prints a line per case and
// "N passed, N failed".
//
// The arrays cross in chunks of ARRAY_TEST_CHUNK bytes (1 MiB unless set),
// so a 16 MiB array is several chunks. The driver takes arrays of at most
// 24 MiB (WorldOptions::arrays.maxBytes on rank 0), so an agent's 32 MiB one
// is refused there and drained.
#include <dirent.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/world.hpp"
#include "forklift/message.hpp"
#include "forklift/shm_array.hpp"
#include "forklift/shm_tensor.hpp"

using namespace forklift;
using cluster::World;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

int rank_for_log = -1;
int failed_checks = 0;

#define CHECK(cond)                                                                                        \
  do {                                                                                                     \
    if (!(cond)) {                                                                                         \
      std::fprintf(stderr, "rank %d: %s:%d: CHECK(%s) failed\n", rank_for_log, __FILE__, __LINE__, #cond); \
      ++failed_checks;                                                                                     \
    }                                                                                                      \
  } while (0)

constexpr std::size_t kDriverMaxArray = std::size_t{24} << 20;

double slowdown() {
  const char* s = std::getenv("FORKLIFT_TEST_SLOWDOWN");
  const double f = s ? std::atof(s) : 1.0;
  return f >= 1.0 ? f : 1.0;
}
Clock::duration slow(Clock::duration d) {
  return std::chrono::duration_cast<Clock::duration>(d * slowdown());
}

// ---- patterns and checksums -------------------------------------------------

void fill(void* p, std::size_t n, std::uint64_t seed) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  auto* b = static_cast<unsigned char*>(p);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(b + i, &x, 8);
  }
  for (; i < n; ++i) b[i] = static_cast<unsigned char>(x >> (8 * (i % 8)));
}

std::int64_t checksum(const void* p, std::size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  std::uint64_t h = 1469598103934665603ull;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, b + i, 8);
    h = (h ^ w) * 1099511628211ull;
  }
  for (; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return static_cast<std::int64_t>(h ^ n);
}

template <class T, int R, Layout L = Layout::RowMajor>
ShmTensor<T, R, L> made(const std::string& hint, const std::array<Eigen::Index, R>& dims, std::uint64_t seed) {
  auto t = ShmTensor<T, R, L>::create(hint, dims);
  fill(t.data(), t.bytes(), seed);
  return t;
}

template <class T, int R, Layout L>
std::int64_t sumOf(const ShmTensor<T, R, L>& t) {
  return checksum(t.data(), t.bytes());
}

// Opens `v` as the receiving side does (ShmTensor::open) and checks its
// shape, its bytes and that it is a new anonymous array of this process.
template <class T, int R, Layout L = Layout::RowMajor>
bool arrives(const Value& v, const std::array<Eigen::Index, R>& dims, std::int64_t sum) {
  try {
    auto t = ShmTensor<T, R, L>::open(v);
    const bool ok = t.dimensions() == dims && sumOf(t) == sum && t.segment().anonymous() &&
                    t.segment().creatorPid() == ::getpid();
    if (!ok)
      std::fprintf(stderr, "rank %d: array %s arrived as %s, checksum %s\n", rank_for_log, t.name().c_str(),
                   t.segment().describe().c_str(), sumOf(t) == sum ? "right" : "WRONG");
    return ok;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: an array did not open: %s\n", rank_for_log, e.what());
    return false;
  }
}

// ---- leak accounting -------------------------------------------------------

struct Resources {
  int fds = 0;       // open descriptors
  int memfds = 0;    // of which memfds
  int mappings = 0;  // mappings of forklift's anonymous segments
  std::set<std::string> devShm;
  std::multiset<std::string> memfdNames;
  bool operator==(const Resources& o) const {
    return fds == o.fds && memfds == o.memfds && mappings == o.mappings && devShm == o.devShm;
  }
};

Resources resources() {
  Resources r;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    const int self = ::dirfd(d);
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] == '.' || std::atoi(e->d_name) == self) continue;
      ++r.fds;
      char link[256] = {};
      const std::string path = std::string("/proc/self/fd/") + e->d_name;
      if (::readlink(path.c_str(), link, sizeof link - 1) > 0 && std::strncmp(link, "/memfd:", 7) == 0) {
        ++r.memfds;
        r.memfdNames.insert(link);
      }
    }
    ::closedir(d);
  }
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);)
    if (line.find("/memfd:anon.") != std::string::npos) ++r.mappings;
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d))
      if (std::strncmp(e->d_name, "fk.", 3) == 0) r.devShm.insert(e->d_name);  // forklift's; MPI's come and go
    ::closedir(d);
  }
  return r;
}

std::string text(const Resources& r) {
  return std::to_string(r.fds) + " fds, " + std::to_string(r.memfds) + " memfds, " + std::to_string(r.mappings) +
         " segment mappings, " + std::to_string(r.devShm.size()) + " names in /dev/shm";
}

// The MPI thread lets a sent array go when it sees the send complete: wait
// (bounded) until the counts are back to `base`.
bool backTo(const Resources& base, Clock::duration bound) {
  const auto until = Clock::now() + slow(bound);
  Resources now = resources();
  while (!(now == base) && Clock::now() < until) {
    std::this_thread::sleep_for(10ms);
    now = resources();
  }
  if (!(now == base)) {
    std::string extra;
    for (const auto& n : now.memfdNames)
      if (now.memfdNames.count(n) > base.memfdNames.count(n)) extra += " " + n;
    for (const auto& n : now.devShm)
      if (!base.devShm.count(n)) extra += " /dev/shm/" + n;
    for (const auto& n : base.devShm)
      if (!now.devShm.count(n)) extra += " (gone: /dev/shm/" + n + ")";
    std::fprintf(stderr, "rank %d: resources: %s, at the start %s; new:%s\n", rank_for_log, text(now).c_str(),
                 text(base).c_str(), extra.substr(0, 600).c_str());
  }
  return now == base;
}

// ---- messages --------------------------------------------------------------

std::map<int, std::deque<Message>> stash;

Message expectFrom(World& w, int from, const std::string& command) {
  std::optional<Message> got;
  if (auto& q = stash[from]; !q.empty()) {
    got = std::move(q.front());
    q.pop_front();
  }
  const auto deadline = Clock::now() + slow(30s);
  while (!got && Clock::now() < deadline) {
    auto left = std::chrono::duration_cast<Timeout>(deadline - Clock::now());
    auto r = w.recv(std::max(left, Timeout(1)));
    if (!r) continue;
    if (r->source != from)
      stash[r->source].push_back(std::move(r->message));
    else
      got = std::move(r->message);
  }
  if (!got) {
    std::fprintf(stderr, "rank %d: no '%s' from rank %d in time\n", w.rank(), command.c_str(), from);
    ++failed_checks;
    return Message();
  }
  if (got->command() != command) {
    std::fprintf(stderr, "rank %d: wanted '%s' from rank %d, got %s\n", w.rank(), command.c_str(), from,
                 got->toString().substr(0, 200).c_str());
    ++failed_checks;
  }
  return std::move(*got);
}

bool holdsFd(const Value& v) {
  if (v.getIf<Fd>()) return true;
  if (const List* l = v.getIf<List>()) return std::any_of(l->begin(), l->end(), holdsFd);
  if (const Map* m = v.getIf<Map>())
    return std::any_of(m->begin(), m->end(), [](const auto& kv) { return holdsFd(kv.second); });
  return false;
}

// Array messages this rank sent to each rank: the sequence number the next
// one carries (what a forged header must say to be taken for a World's).
std::map<int, std::uint64_t> arrayMessagesTo;

void send(World& w, int dest, const Message& m) {
  w.send(dest, m);
  if (std::any_of(m.args().begin(), m.args().end(), [](const auto& kv) { return holdsFd(kv.second); }))
    ++arrayMessagesTo[dest];
}

// ---- cases -----------------------------------------------------------------

// This rank's counters when the case began (taken before any message of
// the case could come: see sync).
World::Stats atCaseStart;

// 16 MiB each way between the driver and both agents; the receiver opens
// the array as a ShmTensor and as a ShmArray, writes through one and reads
// through the other (the same pages).
void bigBothWays(World& w) {
  const auto s0 = atCaseStart;
  if (w.isDriver()) {
    auto a = made<double, 2>("big", {2048, 1024}, 1);
    for (int r = 1; r < w.size(); ++r) send(w, r, Message("big", {{"array", a.describe()}, {"sum", sumOf(a)}}));
    for (int r = 1; r < w.size(); ++r) {
      Message m = expectFrom(w, r, "big_back");
      CHECK(m.get<bool>("ok", false));
      CHECK((arrives<float, 2, Layout::ColMajor>(m.get<Value>("array", Value()), {1024, 4096},
                                                 m.get<std::int64_t>("sum", 0))));
    }
    CHECK(w.stats().arraysReceived - s0.arraysReceived == static_cast<std::uint64_t>(w.size() - 1));
  } else {
    Message m = expectFrom(w, 0, "big");
    const Value v = m.get<Value>("array", Value());
    bool ok = arrives<double, 2>(v, {2048, 1024}, m.get<std::int64_t>("sum", 0));
    try {
      auto t = ShmTensor<double, 2>::open(v);
      t.tensor()(100, 7) = 42.5;
      auto same = ShmArray<double>::open(v);
      ok = ok && same.matrix()(100, 7) == 42.5 && same.data() != t.data();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank %d: %s\n", w.rank(), e.what());
      ok = false;
    }
    CHECK(ok);
    auto back = made<float, 2, Layout::ColMajor>("back", {1024, 4096}, 10 + static_cast<std::uint64_t>(w.rank()));
    send(w, 0, Message("big_back", {{"ok", ok}, {"array", back.describe()}, {"sum", sumOf(back)}}));
    CHECK(w.stats().arraysReceived - s0.arraysReceived == 1);
  }
}

// A figure, not a check: 16 MiB from the driver to rank 1 until rank 1 has
// it open (its small ack back included), median of 7; the first round also
// checks the bytes.
void throughput(World& w) {
  constexpr int kRounds = 7;
  constexpr std::size_t kBytes = std::size_t{16} << 20;
  if (w.isDriver()) {
    auto a = made<std::uint8_t, 1>("tp", {static_cast<Eigen::Index>(kBytes)}, 3);
    const auto sum = sumOf(a);
    std::vector<double> ms;
    for (int i = 0; i < kRounds; ++i) {
      const auto t0 = Clock::now();
      send(w, 1, Message("tp", {{"array", a.describe()}}));
      Message ack = expectFrom(w, 1, "tp_ack");
      ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      if (i == 0) CHECK(ack.get<std::int64_t>("sum", 0) == sum);
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[kRounds / 2];
    const char* chunk = std::getenv("ARRAY_TEST_CHUNK");
    std::printf("figure: a 16 MiB array driver -> agent, until the agent has it: median %.2f ms (min %.2f) = "
                "%.0f MB/s (chunks of %s bytes)\n",
                med, ms.front(), static_cast<double>(kBytes) / 1e6 / (med / 1e3), chunk ? chunk : "1048576");
    std::fflush(stdout);
  } else if (w.rank() == 1) {
    for (int i = 0; i < kRounds; ++i) {
      Message m = expectFrom(w, 0, "tp");
      std::int64_t sum = 0;
      try {
        auto t = ShmTensor<std::uint8_t, 1>::open(m.get<Value>("array"));
        if (i == 0) sum = sumOf(t);  // once: the figure is the transfer's
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", w.rank(), e.what());
      }
      send(w, 0, Message("tp_ack", {{"sum", sum}}));
    }
  }
}

// Every dtype family, ranks 1, 2, 3, 5 and 8, both layouts, at any depth of
// the message; the agent checks them and sends them all back (its own new
// arrays), and the driver checks those.
struct Mixed {
  ShmTensor<Eigen::half, 1> h1 = made<Eigen::half, 1>("h1", {1001}, 21);
  ShmTensor<std::uint8_t, 2, Layout::ColMajor> u2c = made<std::uint8_t, 2, Layout::ColMajor>("u2c", {33, 17}, 22);
  ShmTensor<double, 3> d3 = made<double, 3>("d3", {4, 5, 6}, 23);
  ShmTensor<std::uint8_t, 5, Layout::ColMajor> u5c =
      made<std::uint8_t, 5, Layout::ColMajor>("u5c", {2, 3, 4, 5, 6}, 24);
  ShmTensor<double, 5> d5 = made<double, 5>("d5", {3, 1, 4, 1, 5}, 25);
  ShmTensor<Eigen::half, 2, Layout::ColMajor> h2c = made<Eigen::half, 2, Layout::ColMajor>("h2c", {7, 9}, 26);
  ShmTensor<Eigen::half, 3, Layout::ColMajor> h3c = made<Eigen::half, 3, Layout::ColMajor>("h3c", {3, 4, 5}, 27);
  ShmTensor<double, 1, Layout::ColMajor> d1c = made<double, 1, Layout::ColMajor>("d1c", {50}, 28);
  ShmTensor<std::int32_t, 8> i8 = made<std::int32_t, 8>("i8", {2, 1, 2, 1, 3, 1, 2, 2}, 29);

  Message message(const std::string& command) const {
    return Message(command, {{"h1", h1.describe()},
                             {"list", List{1, u2c.describe(), Map{{"deep", List{d3.describe()}}}}},
                             {"map", Map{{"u5c", u5c.describe()}, {"x", "text"}}},
                             {"d5", d5.describe()},
                             {"h2c", h2c.describe()},
                             {"h3c", h3c.describe()},
                             {"d1c", d1c.describe()},
                             {"i8", i8.describe()},
                             {"sums", std::vector<std::int64_t>{sumOf(h1), sumOf(u2c), sumOf(d3), sumOf(u5c),
                                                                sumOf(d5), sumOf(h2c), sumOf(h3c), sumOf(d1c),
                                                                sumOf(i8)}}});
  }
};

// Checks a Mixed message as it arrived; counts the arrays that did.
int checkMixed(const Message& m) {
  int ok = 0;
  try {
    const auto s = m.get<std::vector<std::int64_t>>("sums");
    const List list = m.get<List>("list");
    const Map map = m.get<Value>("map").as<Map>();
    const List deep = list.at(2).as<Map>().at(0).second.as<List>();
    CHECK(list.at(0).as<int>() == 1);
    CHECK(map.at(1).second.as<std::string>() == "text");
    ok += arrives<Eigen::half, 1>(m.get<Value>("h1"), {1001}, s.at(0));
    ok += arrives<std::uint8_t, 2, Layout::ColMajor>(list.at(1), {33, 17}, s.at(1));
    ok += arrives<double, 3>(deep.at(0), {4, 5, 6}, s.at(2));
    ok += arrives<std::uint8_t, 5, Layout::ColMajor>(map.at(0).second, {2, 3, 4, 5, 6}, s.at(3));
    ok += arrives<double, 5>(m.get<Value>("d5"), {3, 1, 4, 1, 5}, s.at(4));
    ok += arrives<Eigen::half, 2, Layout::ColMajor>(m.get<Value>("h2c"), {7, 9}, s.at(5));
    ok += arrives<Eigen::half, 3, Layout::ColMajor>(m.get<Value>("h3c"), {3, 4, 5}, s.at(6));
    ok += arrives<double, 1, Layout::ColMajor>(m.get<Value>("d1c"), {50}, s.at(7));
    ok += arrives<std::int32_t, 8>(m.get<Value>("i8"), {2, 1, 2, 1, 3, 1, 2, 2}, s.at(8));
    // A matrix view opens what a rank-2 tensor sent, and a rank-1 one.
    ok += ShmArray<Eigen::half, Layout::ColMajor>::open(m.get<Value>("h2c")).rows() == 7;
    ok += ShmArray<double>::open(m.get<Value>("d1c")).rows() == 50;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank_for_log, e.what());
  }
  return ok;
}

void dtypesRanksLayouts(World& w) {
  if (w.isDriver()) {
    Mixed mixed;
    for (int r = 1; r < w.size(); ++r) send(w, r, mixed.message("mixed"));
    for (int r = 1; r < w.size(); ++r) {
      Message back = expectFrom(w, r, "mixed_back");
      CHECK(back.get<int>("agent_ok", 0) == 11);
      CHECK(checkMixed(back) == 11);
    }
  } else {
    Message m = expectFrom(w, 0, "mixed");
    const int ok = checkMixed(m);
    CHECK(ok == 11);
    Message back("mixed_back", m.args());  // the agent's own arrays, back
    back.set("agent_ok", ok);
    send(w, 0, back);
  }
}

// Arrays with no element (one axis 0) cross, and come back.
void emptyArrays(World& w) {
  auto check = [](const Message& m) {
    return arrives<float, 2>(m.get<Value>("a"), {0, 5}, m.get<std::int64_t>("sa")) &&
           arrives<double, 1>(m.get<Value>("b"), {0}, m.get<std::int64_t>("sb")) &&
           arrives<std::uint8_t, 3, Layout::ColMajor>(m.get<Value>("c"), {2, 0, 3}, m.get<std::int64_t>("sc"));
  };
  if (w.isDriver()) {
    auto a = made<float, 2>("e2", {0, 5}, 1);
    auto b = made<double, 1>("e1", {0}, 1);
    auto c = made<std::uint8_t, 3, Layout::ColMajor>("e3", {2, 0, 3}, 1);
    for (int r = 1; r < w.size(); ++r)
      send(w, r, Message("empty", {{"a", a.describe()}, {"b", b.describe()}, {"c", c.describe()},
                                   {"sa", sumOf(a)}, {"sb", sumOf(b)}, {"sc", sumOf(c)}}));
    for (int r = 1; r < w.size(); ++r) CHECK(check(expectFrom(w, r, "empty_back")));
  } else {
    Message m = expectFrom(w, 0, "empty");
    CHECK(check(m));
    send(w, 0, Message("empty_back", m.args()));
  }
}

// 60 small arrays in one message; 65 are more descriptors than one message
// may carry (Limits::maxFds, 64): LimitError at send.
void manySmall(World& w) {
  constexpr int kN = 60;
  if (w.isDriver()) {
    std::vector<ShmTensor<std::uint8_t, 1>> arrays;
    List list;
    std::vector<std::int64_t> sums;
    for (int i = 0; i < kN; ++i) {
      arrays.push_back(made<std::uint8_t, 1>("s" + std::to_string(i), {i * 37 + 1}, 100 + static_cast<std::uint64_t>(i)));
      list.push_back(arrays.back().describe());
      sums.push_back(sumOf(arrays.back()));
    }
    for (int r = 1; r < w.size(); ++r) send(w, r, Message("many", {{"arrays", list}, {"sums", sums}}));
    for (int r = 1; r < w.size(); ++r) CHECK(expectFrom(w, r, "many_ok").get<int>("ok", -1) == kN);
    for (int i = kN; i < 65; ++i) {
      arrays.push_back(made<std::uint8_t, 1>("x", {3}, 1));
      list.push_back(arrays.back().describe());
    }
    bool limit = false;
    try {
      w.send(1, Message("too_many", {{"arrays", list}}));
    } catch (const LimitError& e) {
      limit = std::string(e.what()).find("descriptors") != std::string::npos;
    }
    CHECK(limit);
  } else {
    Message m = expectFrom(w, 0, "many");
    int ok = 0;
    try {
      const List list = m.get<List>("arrays");
      const auto sums = m.get<std::vector<std::int64_t>>("sums");
      for (int i = 0; i < kN && i < static_cast<int>(list.size()); ++i)
        ok += arrives<std::uint8_t, 1>(list[static_cast<std::size_t>(i)], {i * 37 + 1}, sums.at(static_cast<std::size_t>(i)));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank %d: %s\n", w.rank(), e.what());
    }
    send(w, 0, Message("many_ok", {{"ok", ok}}));
  }
}

// 150 messages each way between the driver and each agent: plain ones, ones
// with one array, ones with two (up to 1.5 MiB, so some are several chunks);
// they arrive in the order sent, every array whole.
void orderKept(World& w) {
  constexpr int kN = 150;
  auto sendAll = [&](int dest, std::uint64_t seed) {
    for (int n = 0; n < kN; ++n) {
      Message m("ordered", {{"n", n}});
      for (int k = 0; k < n % 4 - 1 + (n % 4 == 0); ++k) {
        const auto len = static_cast<Eigen::Index>((static_cast<std::size_t>(n) * 7919 * (k + 1)) % (3u << 19) + 1);
        auto a = made<std::uint8_t, 1>("o", {len}, seed + static_cast<std::uint64_t>(n * 2 + k));
        m.set("a" + std::to_string(k), a.describe());
        m.set("s" + std::to_string(k), sumOf(a));
        m.set("l" + std::to_string(k), static_cast<std::int64_t>(len));
      }  // the message holds the arrays; our views go
      send(w, dest, m);
    }
  };
  auto takeAll = [&](int from) {
    int bad = 0;
    for (int n = 0; n < kN; ++n) {
      Message m = expectFrom(w, from, "ordered");
      if (m.get<int>("n", -1) != n) ++bad;
      for (int k = 0; k < 2; ++k) {
        const std::string a = "a" + std::to_string(k);
        if (!m.has(a)) continue;
        if (!arrives<std::uint8_t, 1>(m.get<Value>(a), {m.get<std::int64_t>("l" + std::to_string(k))},
                                      m.get<std::int64_t>("s" + std::to_string(k))))
          ++bad;
      }
    }
    return bad;
  };
  if (w.isDriver()) {
    for (int r = 1; r < w.size(); ++r) sendAll(r, 1000);
    for (int r = 1; r < w.size(); ++r) {
      CHECK(takeAll(r) == 0);
      CHECK(expectFrom(w, r, "ordered_ok").get<int>("bad", -1) == 0);
    }
  } else {
    sendAll(0, 2000);
    send(w, 0, Message("ordered_ok", {{"bad", takeAll(0)}}));
  }
}

// Rank 1 forges array headers (detail::sendRaw, forklift's tag, no payload)
// that no World sends, each with the sequence number the driver expects
// next from it; the driver refuses every one without draining anything,
// counts them, and the next real array message from rank 1 arrives whole.
std::vector<char> forgedHeader(std::uint64_t seq, std::int64_t chunk, Map entry) {
  Buffer table;
  encode(Message("arrays", {{"chunk", chunk}, {"arrays", List{Value(std::move(entry))}}}), table);
  const int efd = ::eventfd(0, EFD_CLOEXEC);
  Buffer body;
  std::vector<int> fds;
  encode(Message("forged", {{"a", Value(Fd(detail::UniqueFd(efd)))}}), body, Limits{}, fds);
  std::vector<char> out(16);
  std::memcpy(out.data(), "FKA1", 4);
  for (int b = 0; b < 8; ++b) out[static_cast<std::size_t>(4 + b)] = static_cast<char>((seq >> (8 * b)) & 0xff);
  for (int b = 0; b < 4; ++b)
    out[static_cast<std::size_t>(12 + b)] = static_cast<char>((table.size() >> (8 * b)) & 0xff);
  out.insert(out.end(), table.data(), table.data() + table.size());
  out.insert(out.end(), body.data(), body.data() + body.size());
  return out;
}

Map entry(const char* dtype, List shape, std::int64_t bytes, std::int64_t chunks) {
  return Map{{"name", "anon.1.1.forged"}, {"dtype", dtype},   {"shape", std::move(shape)},
             {"layout", "row-major"},     {"bytes", bytes},   {"chunks", chunks}};
}

void forgedHeaders(World& w) {
  constexpr int kForged = 8;
  const std::int64_t chunk = 1 << 20;
  if (w.isDriver()) {
    const auto before = atCaseStart;
    Message m = expectFrom(w, 1, "after_forged");
    CHECK((arrives<std::uint8_t, 1>(m.get<Value>("a", Value()), {2 << 20}, m.get<std::int64_t>("sum", 0))));
    CHECK(w.stats().refused - before.refused == kForged);
  } else if (w.rank() == 1) {
    const std::uint64_t seq = arrayMessagesTo[0];
    const std::int64_t huge = std::int64_t{1} << 40;
    std::vector<std::vector<char>> forged = {
        // bytes that do not match dtype x shape
        forgedHeader(seq, chunk, entry("float64", {10, 10}, 100, 1)),
        // absurdly large: 2^80 elements
        forgedHeader(seq, chunk, entry("uint8", {huge, huge}, 0, 0)),
        // 1000 bytes in chunks of 1 MiB are 1 chunk, not 5
        forgedHeader(seq, chunk, entry("uint8", {1000}, 1000, 5)),
        // a negative dimension
        forgedHeader(seq, chunk, entry("int32", {-4, 2}, -32, 0)),
        // chunks larger than any World sends
        forgedHeader(seq, std::int64_t{1} << 30, entry("uint8", {16}, 16, 1)),
        // rank 9
        forgedHeader(seq, chunk, entry("uint8", {1, 1, 1, 1, 1, 1, 1, 1, 1}, 1, 1)),
        // a good header, out of sequence
        forgedHeader(seq + 1000, chunk, entry("uint8", {16}, 16, 1)),
    };
    std::vector<char> cut = forgedHeader(seq, chunk, entry("uint8", {16}, 16, 1));
    cut.resize(20);  // a table cut short
    forged.push_back(cut);
    CHECK(static_cast<int>(forged.size()) == kForged);
    for (auto& f : forged) cluster::detail::sendRaw(w, 0, std::move(f));
    auto a = made<std::uint8_t, 1>("good", {2 << 20}, 77);
    send(w, 0, Message("after_forged", {{"a", a.describe()}, {"sum", sumOf(a)}}));
  }
}

// The driver takes arrays of at most 24 MiB: rank 1's 32 MiB one is refused
// there before anything is allocated, its chunks drained, and the next
// message (with an array) arrives whole. The driver itself cannot send one
// over its own limit (LimitError at send).
void overLimitDrained(World& w) {
  if (w.isDriver()) {
    const auto before = atCaseStart;
    Message m = expectFrom(w, 1, "after_big");
    CHECK(m.get<int>("n", 0) == 7);
    CHECK((arrives<std::uint8_t, 1>(m.get<Value>("a", Value()), {1 << 20}, m.get<std::int64_t>("sum", 0))));
    const auto after = w.stats();
    CHECK(after.refused - before.refused == 1);
    CHECK(after.arraysReceived - before.arraysReceived == 1);
    auto big = ShmTensor<std::uint8_t, 1>::create("big", 32 << 20);
    bool limit = false;
    try {
      w.send(1, Message("too_big", {{"a", big.describe()}}));
    } catch (const LimitError& e) {
      limit = std::string(e.what()).find("arrays.maxBytes") != std::string::npos;
    }
    CHECK(limit);
  } else if (w.rank() == 1) {
    {
      auto big = made<std::uint8_t, 1>("big", {32 << 20}, 5);
      send(w, 0, Message("big", {{"a", big.describe()}}));
    }
    auto a = made<std::uint8_t, 1>("small", {1 << 20}, 6);
    send(w, 0, Message("after_big", {{"n", 7}, {"a", a.describe()}, {"sum", sumOf(a)}}));
  }
}

// A header as a World sends it (in sequence, true to its sizes), whose
// second chunk is shorter than announced: the driver refuses the message
// (counted), drains its other chunks, and the next array message arrives.
void badChunk(World& w) {
  constexpr std::int64_t kChunk = 1 << 20;
  if (w.isDriver()) {
    const auto before = atCaseStart;
    Message m = expectFrom(w, 1, "after_bad_chunk");
    CHECK((arrives<std::uint8_t, 1>(m.get<Value>("a", Value()), {5000}, m.get<std::int64_t>("sum", 0))));
    const auto after = w.stats();
    CHECK(after.refused - before.refused == 1);
    CHECK(after.arraysReceived - before.arraysReceived == 1);
  } else if (w.rank() == 1) {
    ++arrayMessagesTo[0];  // numbered by the World
    cluster::detail::sendRawArrays(w, 0, forgedHeader(0, kChunk, entry("uint8", {3 * kChunk}, 3 * kChunk, 3)),
                                   {std::vector<char>(kChunk, 'a'), std::vector<char>(kChunk / 2, 'b'),
                                    std::vector<char>(kChunk, 'c')});
    auto a = made<std::uint8_t, 1>("good", {5000}, 78);
    send(w, 0, Message("after_bad_chunk", {{"a", a.describe()}, {"sum", sumOf(a)}}));
  }
}

// Descriptors that are no forklift array cannot cross: TypeError at send,
// saying so; the caller's descriptors stay open.
void notArrays(World& w) {
  if (!w.isDriver()) return;
  auto typeError = [&](const Message& m, const char* words) {
    try {
      w.send(1, m);
    } catch (const TypeError& e) {
      if (std::string(e.what()).find(words) != std::string::npos) return true;
      std::fprintf(stderr, "rank 0: TypeError without '%s': %s\n", words, e.what());
      return false;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank 0: another error: %s\n", e.what());
    }
    return false;
  };
  Fd event(detail::UniqueFd(::eventfd(0, EFD_CLOEXEC)));
  CHECK(typeError(Message("bare", {{"fd", event}}), "cannot cross hosts"));
  int p[2];
  CHECK(::pipe2(p, O_CLOEXEC) == 0);
  Fd readEnd{detail::UniqueFd(p[0])};
  Fd writeEnd{detail::UniqueFd(p[1])};
  CHECK(typeError(Message("pipe", {{"x", List{Map{{"name", "p"}, {"fd", readEnd}}}}}), "not a forklift array"));
  SharedMemory raw(create_only, "raw", 4096);
  CHECK(typeError(Message("raw", {{"seg", raw.descriptor()}}), "bytes segment"));
  // An array beside a bare descriptor: the whole message is refused.
  auto a = made<std::uint8_t, 1>("ok", {10}, 1);
  CHECK(typeError(Message("mixed", {{"a", a.describe()}, {"fd", writeEnd}}), "cannot cross hosts"));
  CHECK(event.valid() && readEnd.valid() && writeEnd.valid());
}

void sync(World& w, const char* name) {
  if (w.isDriver()) {
    for (int r = 1; r < w.size(); ++r) expectFrom(w, r, std::string("end_") + name);
    atCaseStart = w.stats();  // before any agent can send the next case's messages
    for (int r = 1; r < w.size(); ++r) w.send(r, Message(std::string("go_") + name));
  } else {
    atCaseStart = w.stats();
    w.send(0, Message(std::string("end_") + name));
    expectFrom(w, 0, std::string("go_") + name);
  }
}

struct Case {
  const char* name;
  void (*fn)(World&);
};

const Case kCases[] = {
    {"big_both_ways", bigBothWays},
    {"throughput", throughput},
    {"dtypes_ranks_layouts", dtypesRanksLayouts},
    {"empty_arrays", emptyArrays},
    {"many_small", manySmall},
    {"order_kept", orderKept},
    {"forged_headers", forgedHeaders},
    {"over_limit_drained", overLimitDrained},
    {"bad_chunk", badChunk},
    {"not_arrays", notArrays},
};

// The pool's task: opens its 16 MiB argument in the worker (forked on the
// agent's host), checks it, and returns a new 16 MiB array.
Value roundTrip(const List& args) {
  auto in = ShmTensor<float, 2>::open(args.at(0));
  const bool ok = in.dimensions() == std::array<Eigen::Index, 2>{2048, 2048} && sumOf(in) == args.at(1).as<std::int64_t>();
  auto out = made<std::uint32_t, 1>("result", {4 << 20}, static_cast<std::uint64_t>(args.at(2).as<std::int64_t>()));
  return Map{{"ok", ok}, {"array", out.describe()}, {"sum", sumOf(out)}};
}

}  // namespace

int main() {
  cluster::define("round_trip", roundTrip);
  cluster::Agent agent;  // before the World: its workers are forked before MPI_Init

  cluster::WorldOptions o;
  const char* chunk = std::getenv("ARRAY_TEST_CHUNK");
  o.arrays.chunk = chunk ? static_cast<std::size_t>(std::atoll(chunk)) : std::size_t{1} << 20;
  const char* launcherRank = std::getenv("OMPI_COMM_WORLD_RANK");
  if (launcherRank && std::string(launcherRank) == "0") o.arrays.maxBytes = kDriverMaxArray;
  World w(o);
  rank_for_log = w.rank();
  if (w.isDriver()) CHECK(w.size() == 3);

  // A first exchange with every rank opens MPI's connections; the resources
  // counted after it must be there again after every case.
  sync(w, "warm_up");
  const Resources base = resources();
  std::vector<int> caseFailed;
  for (const Case& c : kCases) {
    if (const char* only = std::getenv("ARRAY_TEST_ONLY"); only && std::string(only).find(c.name) == std::string::npos) continue;
    const int before = failed_checks;
    try {
      c.fn(w);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "rank %d: case %s threw: %s\n", w.rank(), c.name, e.what());
      ++failed_checks;
    }
    // After a first sync every message of the case was taken (so the bytes
    // of every array sent are through); before the second, no message of the
    // next case can wait in this rank's inbox.
    sync(w, c.name);
    CHECK(backTo(base, 5s));
    sync(w, (std::string("checked_") + c.name).c_str());
    caseFailed.push_back(failed_checks != before ? 1 : 0);
  }

  if (!w.isDriver()) {
    w.send(0, Message("summary", {{"failed", std::vector<std::int64_t>(caseFailed.begin(), caseFailed.end())}}));
    // The driver's Pool must see this agent's hello: not before the driver
    // took every summary.
    expectFrom(w, 0, "serve");
    const int rc = agent.serve(w);
    CHECK(rc == 0);
    CHECK(backTo(base, 5s));
    // Last, an array message whose bytes never come (in sequence, so the
    // driver takes it and waits for them): the driver's World must still
    // end (it drops the message), or mpirun's timeout fails the test.
    if (w.rank() == 1 && expectFrom(w, 0, "last").command() == "last")
      cluster::detail::sendRawArrays(w, 0, forgedHeader(0, 1 << 20, entry("uint8", {4096}, 4096, 1)), {});
    return failed_checks == 0 ? 0 : 1;
  }

  int passed = 0, failed = 0;
  for (int r = 1; r < w.size(); ++r) {
    auto theirs = expectFrom(w, r, "summary").get<std::vector<std::int64_t>>("failed", {});
    CHECK(theirs.size() == caseFailed.size());
    for (std::size_t i = 0; i < caseFailed.size() && i < theirs.size(); ++i)
      if (theirs[i]) caseFailed[i] = 1;
  }
  for (int r = 1; r < w.size(); ++r) w.send(r, Message("serve"));
  for (std::size_t i = 0; i < caseFailed.size(); ++i) {
    std::printf("[ %s ] %s\n", caseFailed[i] ? "FAILED" : "    OK", kCases[i].name);
    (caseFailed[i] ? failed : passed)++;
  }

  // End to end through cluster::Pool: the argument crosses to an agent and
  // into its forked worker, the worker's new array crosses back.
  {
    const int before = failed_checks;
    {
      cluster::Pool pool(w);
      auto in = made<float, 2>("task_in", {2048, 2048}, 55);
      std::vector<cluster::ClusterFuture> fs;
      for (int i = 0; i < 4; ++i) fs.push_back(pool.submit("round_trip", {in.describe(), sumOf(in), 60 + i}));
      std::set<int> ranks;
      for (auto& f : fs) {
        try {
          const Map r = f.get().as<Map>();
          CHECK(r.at(0).second.as<bool>());
          CHECK((arrives<std::uint32_t, 1>(r.at(1).second, {4 << 20}, r.at(2).second.as<std::int64_t>())));
          ranks.insert(f.place().rank);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "rank 0: a round trip failed: %s\n", e.what());
          ++failed_checks;
        }
      }
      CHECK(!ranks.empty());
      pool.finalize();
    }
    CHECK(backTo(base, 5s));
    w.send(1, Message("last"));  // rank 1 may now send what never ends
    const bool ok = failed_checks == before;
    std::printf("[ %s ] pool_round_trip\n", ok ? "    OK" : "FAILED");
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed (%d ranks)\n", passed, failed, w.size());
  std::fflush(stdout);
  return failed_checks == 0 && failed == 0 ? 0 : 1;
}
