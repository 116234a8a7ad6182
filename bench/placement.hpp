// forklift benchmarks - where the processes of a benchmark run
//
// Every contender is pinned the same way: the frontend (parent) on one CPU,
// the backend (child) on another, or both on one. FORKLIFT_BENCH_CPUS says
// which: "0,1" (the default on a machine with two or more CPUs) or "0,0".
#pragma once

#include <sched.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

namespace forklift::bench {

struct Placement {
  int frontend = 0;
  int backend = 1;
  std::string describe() const {
    return "frontend on CPU " + std::to_string(frontend) + ", backend on CPU " + std::to_string(backend);
  }
};

inline Placement placement() {
  Placement p;
  if (std::thread::hardware_concurrency() < 2) p.backend = 0;
  if (const char* env = std::getenv("FORKLIFT_BENCH_CPUS")) {
    if (std::sscanf(env, "%d,%d", &p.frontend, &p.backend) != 2) std::fprintf(stderr, "bad FORKLIFT_BENCH_CPUS\n");
  }
  return p;
}

inline void pinTo(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  ::sched_setaffinity(0, sizeof set, &set);
}

}  // namespace forklift::bench
