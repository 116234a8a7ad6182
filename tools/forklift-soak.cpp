// forklift-soak - forklift at full speed for a bounded time, under fire
//
//   forklift-soak [--seconds S] [--workers N] [--kill-every K]
//
// N workers (default 16) take pipelined calls, sends and array handoffs as
// fast as one frontend thread can give them, for S seconds (default 600);
// beside them a FunctionPool of 4 workers takes tasks, and a producer
// backend streams checksummed frames through a ring (drop-oldest) that the
// frontend drains. Every K seconds (default 3) a random worker is killed
// with SIGKILL, every fourth time a pool worker instead; the frontend sees
// the death on its next request and starts the worker again, the pool
// replaces its own.
// At the end it prints the totals and checks:
//   - every reply and every pool task came back exactly once, with the value
//     asked for; every ring frame arrived intact, in order (drops counted);
//   - open descriptors, child processes and /dev/shm entries are back to
//     their start values;
//   - RSS stayed flat after the warm-up (the first fifth of the run): it
//     grew by less than 8 MiB.
// Exit status 0 when every check holds, 1 otherwise, 2 for a usage error.
#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <forklift.hpp>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr Eigen::Index kArrayLength = 64 * 1024;  // 512 KiB of doubles

class Worker : public forklift::MessageProcess {
 public:
  Worker(int index, std::string array)
      : MessageProcess("soak-" + std::to_string(index)), label_(std::move(array)) {
    command("echo", &Worker::c__echo, {"seq"});
    command("tick", &Worker::c__tick);
    command("ticks", &Worker::c__ticks);
    command("sum", &Worker::c__sum);
  }

 protected:
  void preRun__() override { array_ = forklift::ShmArray<double>::open(label_); }

 private:
  std::int64_t c__echo(std::int64_t seq) { return seq; }
  void c__tick() { ++ticks_; }
  std::int64_t c__ticks() { return ticks_; }
  double c__sum() { return array_.matrix().sum(); }

  std::string label_;
  forklift::ShmArray<double> array_;
  std::int64_t ticks_ = 0;
};

// Streams 64 KiB frames into a ring: each frame's bytes are its number's
// low byte, the number in user(0), a checksum in user(1).
class Producer : public forklift::MessageProcess {
 public:
  explicit Producer(forklift::RingBuffer& ring) : MessageProcess("soak-producer"), ring_(ring) {
    command("produce", &Producer::c__produce, {"n"});
  }

 protected:
  void preRun__() override { writer_ = ring_.writer(); }

 private:
  void c__produce(int n) {
    for (int i = 0; i < n; ++i) {
      forklift::WriteSlot slot = writer_.reserve(1s);
      ++frame_;
      std::memset(slot.data(), static_cast<int>(frame_ & 0xff), slot.capacity());
      slot.setUser(0, frame_);
      slot.setUser(1, static_cast<std::int64_t>(slot.capacity()) * (frame_ & 0xff));
      slot.commit();
    }
  }

  forklift::RingBuffer& ring_;
  forklift::RingWriter writer_;
  std::int64_t frame_ = 0;
};

// One worker and the array it reads, made again after each kill.
struct Slot {
  int index = 0;
  forklift::ShmArray<double> array;
  std::unique_ptr<Worker> worker;
  std::int64_t sentTicks = 0;  // since its last start

  void start() {
    worker.reset();
    array = forklift::ShmArray<double>::create("soak", kArrayLength);
    worker = std::make_unique<Worker>(index, array.name());
    worker->start();
    sentTicks = 0;
  }
};

struct Totals {
  std::uint64_t calls = 0, sends = 0, handoffs = 0, kills = 0, restarts = 0, lost = 0, wrong = 0, deaths = 0;
  std::uint64_t tasks = 0, frames = 0, drops = 0;
};

int countFds() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (const dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n - 1;  // the listing's own
}

// What the open descriptors are, for a report when their count moved.
void listFds() {
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (const dirent* e = ::readdir(d)) {
      if (e->d_name[0] == '.') continue;
      char target[256] = {};
      if (::readlink(("/proc/self/fd/" + std::string(e->d_name)).c_str(), target, sizeof target - 1) > 0)
        std::printf("  fd %s -> %s\n", e->d_name, target);
    }
    ::closedir(d);
  }
}

int countEntries(const char* dir) {
  int n = 0;
  if (DIR* d = ::opendir(dir)) {
    while (const dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

int countChildren() {
  int n = 0;
  const std::string me = std::to_string(::getpid());
  if (DIR* d = ::opendir("/proc")) {
    while (const dirent* e = ::readdir(d)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      FILE* f = std::fopen(("/proc/" + std::string(e->d_name) + "/stat").c_str(), "r");
      if (!f) continue;
      char buf[512] = {};
      const size_t got = std::fread(buf, 1, sizeof buf - 1, f);
      std::fclose(f);
      const char* close = std::strrchr(buf, ')');
      if (got == 0 || !close) continue;
      char state = 0;
      int ppid = 0;
      if (std::sscanf(close + 1, " %c %d", &state, &ppid) == 2 && std::to_string(ppid) == me) ++n;
    }
    ::closedir(d);
  }
  return n;
}

long rssKiB() {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "VmRSS:", 6) == 0) kib = std::atol(line + 6);
  std::fclose(f);
  return kib;
}

int usage() {
  std::fputs("usage: forklift-soak [--seconds S] [--workers N] [--kill-every K]\n", stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  int seconds = 600, workers = 16;
  double killEvery = 3.0;
  for (int i = 1; i < argc; ++i) {
    if (i + 1 >= argc) return usage();
    if (std::strcmp(argv[i], "--seconds") == 0) seconds = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--workers") == 0) workers = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--kill-every") == 0) killEvery = std::atof(argv[++i]);
    else return usage();
  }
  if (seconds < 1 || workers < 1 || !(killEvery > 0)) return usage();

  forklift::formatLogger(spdlog::level::warn);
  {
    // libuv keeps one pipe pair for signals for the life of the process,
    // made when a loop first watches a signal (the pool's Manager does):
    // made here, before the start values are taken.
    forklift::Manager first;
    first.post([&] { first.requestStop(); });
    first.run();
  }
  const int fds0 = countFds(), children0 = countChildren(), shm0 = countEntries("/dev/shm");
  Totals t;
  long rssGrowth = 0;
  std::mt19937 rng(12345);
  {
    std::vector<Slot> slots(static_cast<std::size_t>(workers));
    for (int i = 0; i < workers; ++i) {
      slots[static_cast<std::size_t>(i)].index = i;
      slots[static_cast<std::size_t>(i)].start();
    }
    auto ring = forklift::RingBuffer::create("soak-ring", 16, 64 * 1024, forklift::RingPolicy::DropOldest);
    Producer producer(ring);
    producer.start();
    forklift::RingReader reader = ring.reader();
    std::int64_t lastFrame = 0;
    forklift::PoolOptions po;
    po.workers = 4;
    po.restartLimit = 1000000;  // the soak kills on purpose
    forklift::FunctionPool<std::int64_t(std::int64_t)> pool([](std::int64_t x) { return 3 * x + 1; }, po);
    const auto t0 = Clock::now();
    const auto end = t0 + std::chrono::seconds(seconds);
    const auto warm = t0 + std::chrono::seconds(seconds) / 5;
    long rssWarm = -1;
    auto nextKill = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(killEvery));
    std::int64_t seq = 0;
    std::uint64_t round = 0;
    auto lastReport = t0;
    while (Clock::now() < end) {
      if (rssWarm < 0 && Clock::now() >= warm) rssWarm = rssKiB();
      if (Clock::now() >= nextKill) {
        if (t.kills % 4 == 3) {
          ::kill(pool.pool().worker(rng() % 4).pid(), SIGKILL);  // the pool replaces it
        } else {
          slots[rng() % slots.size()].worker->signal(SIGKILL);
        }
        ++t.kills;
        nextKill += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(killEvery));
      }
      for (auto& s : slots) {
        try {
          // Eight pipelined calls, each checked against its own number.
          std::vector<std::pair<std::int64_t, forklift::CallFuture>> calls;
          for (int k = 0; k < 8; ++k) {
            ++seq;
            calls.emplace_back(seq, s.worker->callAsync("echo", {{"seq", seq}}));
          }
          for (int k = 0; k < 4; ++k, ++s.sentTicks, ++t.sends) s.worker->send("tick");
          for (auto& [want, f] : calls) {
            const auto got = f.get().as<std::int64_t>();
            ++t.calls;
            if (got != want) ++t.wrong;
          }
          // A handoff: fill, then the worker sums what it sees.
          if (round % 4 == 0) {
            const double v = static_cast<double>(round % 1000);
            s.array.matrix().setConstant(v);
            const double sum = s.worker->call("sum").as<double>();
            ++t.handoffs;
            if (sum != v * static_cast<double>(kArrayLength)) ++t.wrong;
          }
          // Sends are not lost either: the worker counted every one.
          if (round % 16 == 0 && s.worker->call("ticks").as<std::int64_t>() != s.sentTicks) ++t.lost;
        } catch (const forklift::PeerClosed&) {
          ++t.deaths;  // killed: start it again (stop reaps it)
          s.worker->stop();
          s.start();
          ++t.restarts;
        }
      }
      // The pool: a batch of tasks, each result checked (a task whose worker
      // was killed runs again).
      {
        std::vector<std::pair<std::int64_t, forklift::TaskFuture<std::int64_t>>> tasks;
        for (int k = 0; k < 16; ++k) {
          ++seq;
          tasks.emplace_back(seq, pool.submit(seq));
        }
        for (auto& [x, f] : tasks) {
          ++t.tasks;
          try {
            if (f.get() != 3 * x + 1) ++t.wrong;
          } catch (const forklift::WorkerDied&) {
            ++t.deaths;  // killed twice in a row: its retry is used up
          }
        }
      }
      // The ring: more frames, then everything that is there.
      producer.send("produce", {{"n", 8}});
      while (auto f = reader.tryNext()) {
        const std::int64_t n = f->user(0);
        const auto* b = reinterpret_cast<const unsigned char*>(f->data());
        std::int64_t sum = 0;
        for (std::size_t i = 0; i < f->bytes(); i += 4096) sum += b[i];
        if (n <= lastFrame || !f->intact() || f->user(1) != static_cast<std::int64_t>(f->bytes()) * (n & 0xff) ||
            sum != static_cast<std::int64_t>(f->bytes() / 4096) * (n & 0xff))
          ++t.wrong;
        lastFrame = n;
        ++t.frames;
      }
      ++round;
      if (Clock::now() - lastReport >= 10s) {
        lastReport = Clock::now();
        std::printf("soak: %3.0f s  calls %llu  sends %llu  handoffs %llu  kills %llu  rss %ld KiB\n",
                    std::chrono::duration<double>(lastReport - t0).count(), static_cast<unsigned long long>(t.calls),
                    static_cast<unsigned long long>(t.sends), static_cast<unsigned long long>(t.handoffs),
                    static_cast<unsigned long long>(t.kills), rssKiB());
        std::fflush(stdout);
      }
    }
    const long rssEnd = rssKiB();
    t.drops = reader.stats().drops;
    std::vector<forklift::MessageProcess*> all;
    for (auto& s : slots) all.push_back(s.worker.get());
    all.push_back(&producer);
    forklift::MessageProcess::stopAll(all, 2000ms);
    slots.clear();
    pool.pool().stop();

    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::printf(
        "soak: %.0f s, %d workers: %llu calls (%.0f/s), %llu sends, %llu array handoffs, %llu kills, %llu restarts\n",
        secs, workers, static_cast<unsigned long long>(t.calls), static_cast<double>(t.calls) / secs,
        static_cast<unsigned long long>(t.sends), static_cast<unsigned long long>(t.handoffs),
        static_cast<unsigned long long>(t.kills), static_cast<unsigned long long>(t.restarts));
    std::printf("soak: pool: %llu tasks, %zu workers replaced; ring: %llu frames, %llu dropped\n",
                static_cast<unsigned long long>(t.tasks), pool.pool().restarts(),
                static_cast<unsigned long long>(t.frames), static_cast<unsigned long long>(t.drops));
    std::printf("soak: RSS %ld KiB after warm-up, %ld KiB at the end\n", rssWarm, rssEnd);
    rssGrowth = rssWarm > 0 ? rssEnd - rssWarm : 0;
  }
  const int fds1 = countFds(), children1 = countChildren(), shm1 = countEntries("/dev/shm");
  std::printf("soak: descriptors %d -> %d, child processes %d -> %d, /dev/shm entries %d -> %d\n", fds0, fds1,
              children0, children1, shm0, shm1);
  const bool rssFlat = rssGrowth < 8 * 1024;
  const bool ok = t.wrong == 0 && t.lost == 0 && rssFlat && fds1 == fds0 && children1 == children0 && shm1 == shm0;
  if (!rssFlat) std::printf("FAIL: RSS grew by %ld KiB after the warm-up\n", rssGrowth);
  if (fds1 != fds0) listFds();
  if (t.wrong) std::printf("FAIL: %llu wrong replies or sums\n", static_cast<unsigned long long>(t.wrong));
  if (t.lost) std::printf("FAIL: %llu workers lost sends\n", static_cast<unsigned long long>(t.lost));
  std::printf("%s\n", ok ? "soak: ok" : "soak: FAILED");
  return ok ? 0 : 1;
}
