// Tutorial step 7: a manager and N workers (the demo).
//
// The hierarchy of step 6, in code:
//
//   Demo (the manager, main process)
//     IN:  "ready" messages from the workers
//     SUB: WorkerProcess-1 .. WorkerProcess-N
//            UP: Message "ready", getArray()
//            IN: doWork()
//
// Each worker owns a shared-memory array (server side created here, before
// the fork; client side opened in its preRun__). The manager hands a job to
// every idle worker; the worker computes into its array and answers "ready";
// the manager reads the result straight from the array and hands out the
// next job. Ctrl-C stops everything in order; a worker that dies is
// reported, its job goes to another worker, and the rest keep going.
//
//   07_manager [--workers N] [--rounds R] [--seconds S] [--size K]
//   (rounds 0: until Ctrl-C or the time is up)
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <forklift.hpp>
#include <string>
#include <vector>

namespace {

// What job j computes into element i: cheap to check, not free to compute.
double expected(int job, Eigen::Index i) { return std::sin(0.001 * static_cast<double>(i) + job) * (job % 7 + 1); }

class WorkerProcess : public forklift::MessageProcess {
 public:
  WorkerProcess(int index, Eigen::Index size)
      : MessageProcess("worker-" + std::to_string(index)),
        index_(index),
        array_(forklift::ShmArray<double>::create("w" + std::to_string(index), size, 1)) {
    command("doWork", &WorkerProcess::c__doWork, {"job"});
  }

  // Frontend (the manager's side).
  void doWork(int job) { send("doWork", {{"job", job}}); }
  const forklift::ShmArray<double>& getArray() const { return array_; }
  int index() const { return index_; }

 private:
  // Backend.
  void preRun__() override { client_ = forklift::ShmArray<double>::open(array_.name()); }
  void postRun__() override { client_ = {}; }

  void c__doWork(int job) {
    auto v = client_.matrix();
    for (Eigen::Index i = 0; i < v.rows(); ++i) v(i, 0) = expected(job, i);
    sendOut__(forklift::Message("ready", {{"job", job}}));
  }

  int index_;
  forklift::ShmArray<double> array_;
  forklift::ShmArray<double> client_;
};

class Demo : public forklift::Manager {
 public:
  Demo(int workers, int rounds, Eigen::Index size) : rounds_(rounds) {
    for (int i = 1; i <= workers; ++i) workers_.push_back(&emplace<WorkerProcess>(i, size));
  }

  int jobsDone() const { return done_; }

 protected:
  // After every worker has started: hand out the first jobs.
  void startThreads() override {
    t0_ = std::chrono::steady_clock::now();
    for (auto* w : workers_) std::printf("%s started, pid %d\n", w->name().c_str(), w->pid());
    for (auto* w : workers_) giveWork(*w);
  }

  void handleMessage(forklift::MessageProcess& p, forklift::Message& m) override {
    auto& w = static_cast<WorkerProcess&>(p);
    if (m.command() != "ready") return;
    const int job = m.get<int>("job");
    inFlight_[static_cast<std::size_t>(w.index())] = -1;
    // The result is read in place from the worker's shared memory.
    const auto v = w.getArray().matrix();
    bool ok = true;
    for (Eigen::Index i = 0; i < v.rows(); i += 97) ok = ok && v(i, 0) == expected(job, i);
    ++done_;
    if (!ok) ++wrong_;
    std::printf("result of job %d from %s: sum %.6f%s\n", job, w.name().c_str(), v.sum(), ok ? "" : " WRONG");
    if (rounds_ > 0 && done_ >= rounds_) {
      requestStop();
      return;
    }
    giveWork(w);
  }

  void handleExit(forklift::MessageProcess& p, const forklift::ExitStatus& s) override {
    if (stopping()) return;
    auto& w = static_cast<WorkerProcess&>(p);
    const int lost = inFlight_[static_cast<std::size_t>(w.index())];
    std::erase(workers_, &w);
    std::printf("%s ended: %s; %zu workers left\n", w.name().c_str(), s.describe().c_str(), workers_.size());
    if (workers_.empty()) {
      requestStop();
      return;
    }
    if (lost >= 0) {  // its job goes to someone else
      pending_.push_back(lost);
      for (auto* other : workers_)
        if (inFlight_[static_cast<std::size_t>(other->index())] < 0) giveWork(*other);
    }
  }

  void close() override {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    std::printf("summary: %d jobs done, %d wrong, %zu workers left, %.2f s\n", done_, wrong_, workers_.size(), secs);
  }

 private:
  void giveWork(WorkerProcess& w) {
    if (stopping()) return;  // results still arriving during shutdown are counted, nothing more
    if (rounds_ > 0 && next_ >= rounds_ && pending_.empty()) return;
    int job;
    if (!pending_.empty()) {
      job = pending_.front();
      pending_.pop_front();
    } else {
      job = next_++;
    }
    if (inFlight_.size() <= static_cast<std::size_t>(w.index())) inFlight_.resize(static_cast<std::size_t>(w.index()) + 1, -1);
    inFlight_[static_cast<std::size_t>(w.index())] = job;
    w.doWork(job);
  }

  std::vector<WorkerProcess*> workers_;
  std::vector<int> inFlight_ = std::vector<int>(1, -1);  // job per worker index, -1 idle
  std::deque<int> pending_;                              // jobs of workers that died
  int rounds_;
  int next_ = 0;
  int done_ = 0;
  int wrong_ = 0;
  std::chrono::steady_clock::time_point t0_;
};

int intArg(int argc, char** argv, const char* name, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  forklift::formatLogger(spdlog::level::info);
  const int workers = intArg(argc, argv, "--workers", 4);
  const int rounds = intArg(argc, argv, "--rounds", 40);
  const int seconds = intArg(argc, argv, "--seconds", 60);
  const int size = intArg(argc, argv, "--size", 100000);
  if (workers < 1 || rounds < 0 || seconds < 1 || size < 1) {
    std::fprintf(stderr, "usage: %s [--workers N>=1] [--rounds R>=0] [--seconds S>=1] [--size K>=1]\n", argv[0]);
    return 2;
  }
  std::printf("demo: pid %d, %d workers, %s, at most %d s\n", ::getpid(), workers,
              rounds ? (std::to_string(rounds) + " jobs").c_str() : "jobs until Ctrl-C", seconds);
  Demo demo(workers, rounds, size);
  demo.after(std::chrono::seconds(seconds), [&] { demo.requestStop(); });
  const int code = demo.run();
  return code;
}
