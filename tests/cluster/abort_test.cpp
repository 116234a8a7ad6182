// tests/cluster/abort_test: a rank whose World unwinds aborts the job.
//
// Run by abort_test.py under mpirun -np 3: rank 1 throws while its World
// lives; the World's destructor sees the exception unwinding and calls
// MPI_Abort instead of waiting for the others in the collective end. The
// other ranks wait for a message that never comes; mpirun must end them
// all, non-zero, within seconds (the script checks the time, the code and
// that no process is left).
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>

#include "forklift/cluster/pool.hpp"
#include "forklift/cluster/world.hpp"

// "pool": the driver throws while a task of its Pool hangs; the Pool's
// destructor must not wait for it, so the World unwinds and aborts the job.
int unwindThroughPool() {
  forklift::cluster::define("hang", [](const forklift::List&) -> forklift::Value {
    std::this_thread::sleep_for(std::chrono::seconds(600));
    return {};
  });
  forklift::cluster::AgentOptions o;
  o.workers = 1;
  forklift::cluster::Agent agent(o);
  try {
    forklift::cluster::World w;
    std::printf("rank %d of %d up\n", w.rank(), w.size());
    std::fflush(stdout);
    if (!w.isDriver()) return agent.serve(w);
    forklift::cluster::Pool pool(w);
    auto f = pool.submit("hang", {});
    if (f.wait(forklift::Timeout(300))) return 2;
    throw std::runtime_error("the driver fails while a task hangs");
  } catch (const std::exception& e) {
    std::printf("caught: %s\n", e.what());
    return 3;
  }
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "pool") return unwindThroughPool();
  try {
    forklift::cluster::World w;
    std::printf("rank %d of %d up\n", w.rank(), w.size());
    std::fflush(stdout);
    if (w.rank() == 1) throw std::runtime_error("rank 1 fails on purpose");
    (void)w.recv(forklift::kForever);  // never comes: only MPI_Abort ends this rank
    std::printf("rank %d: a message came, which nobody sent\n", w.rank());
    return 2;
  } catch (const std::exception& e) {
    std::printf("caught: %s\n", e.what());
    return 3;
  }
}
