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
    // A value it cannot read is an error, not the default in silence.
    char rest = 0;
    if (std::sscanf(env, "%d,%d%c", &p.frontend, &p.backend, &rest) != 2 || p.frontend < 0 || p.backend < 0) {
      std::fprintf(stderr,
                   "environment variable FORKLIFT_BENCH_CPUS='%s' is not a value forklift knows; it takes two CPU "
                   "numbers, the frontend's and the backend's, e.g. 0,1\n",
                   env);
      std::exit(2);
    }
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
