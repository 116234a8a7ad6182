#!/usr/bin/python3
"""Python's cluster pools running bench/cluster_bench.cpp's tasks.

Two workers in all, as cluster_bench's two agents of one worker each:
  - mpi4py.futures' MPIPoolExecutor, 3 ranks (the driver and 2 workers):
      mpirun -np 3 /usr/bin/python3 -m mpi4py.futures cluster_peer.py mpi4py [options]
  - Dask distributed, LocalCluster(n_workers=2, threads_per_worker=1, processes=True):
      /usr/bin/python3 cluster_peer.py dask [options]

The same figures, under the same names and units, as cluster_bench prints
(one JSON object a line on stdout): the worker processes' idle CPU (every
thread, from /proc, as cluster_bench reads it), empty tasks submitted at once
then waited for (task/s over each repetition), one at a time (µs per round trip), 1 MiB
and 16 MiB numpy arrays as the argument and a same-size copy returned (bytes
both ways per second), and the wall-clock time when the executor was ready
(bench/compare subtracts the launch time). p99 is the slow tail, as in
cluster_bench: a time's 99th percentile, a rate's 1st.

  cluster_peer.py {mpi4py,dask} [--mode bench|startup] [--tasks N] [--repetitions R]
                  [--idle-seconds S] [--idle-settle S]
"""
import argparse
import json
import logging
import math
import os
import sys
import time
import warnings

import numpy


def empty():
    return None


def echo(a):
    return a.copy()


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def cpu_ns(pid):
    """Run time of every thread of `pid`, in ns (as cluster_bench reads it)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def idle_cpu(pids, a, what):
    """% of one CPU each worker process used while nothing was submitted."""
    time.sleep(a.idle_settle)
    before = {p: cpu_ns(p) for p in pids}
    t0 = time.perf_counter()
    time.sleep(a.idle_seconds)
    wall = time.perf_counter() - t0
    v = [100.0 * (cpu_ns(p) - before[p]) * 1e-9 / wall for p in pids]
    emit("cluster_idle_cpu_rank", "%cpu", v, f"% of one CPU, every thread, over {a.idle_seconds:.1f} s from "
         f"{a.idle_settle:.1f} s after the last task; one value per {what}")


def percentile(v, p):
    v = sorted(v)
    rank = math.ceil(p * len(v))
    return v[min(len(v) - 1, max(rank, 1) - 1)]


def emit(figure, unit, v, note=""):
    rate = unit.endswith("/s")
    d = {"figure": figure, "unit": unit, "median": percentile(v, 0.5), "p99": percentile(v, 0.01 if rate else 0.99),
         "min": min(v), "max": max(v), "n": len(v)}
    if note:
        d["note"] = note
    print(json.dumps(d), flush=True)


def ready():
    print(json.dumps({"figure": "cluster_pool_ready", "unit": "s since the epoch", "wallclock": time.time()}),
          flush=True)


def bench(submit, result, gather, a, pids, what):
    """submit(fn, *args) -> future; result(future) -> its value; gather(futures)
    -> their values (each peer's own way to wait for many; bounded waits);
    pids: the worker processes, whose idle CPU is measured."""
    for f in [submit(empty) for _ in range(200)]:  # warm-up
        result(f)
    idle_cpu(pids, a, what)
    rates = []
    for _ in range(a.repetitions):
        t0 = time.perf_counter()
        fs = [submit(empty) for _ in range(a.tasks)]
        gather(fs)
        rates.append(a.tasks / (time.perf_counter() - t0))
    emit("cluster_tasks_batch", "task/s", rates, f"{a.tasks} empty tasks submitted at once, then waited for")
    rtt = []
    for _ in range(a.repetitions):
        for _ in range(max(1, a.tasks // 4)):
            t0 = time.perf_counter()
            result(submit(empty))
            rtt.append((time.perf_counter() - t0) * 1e6)
    emit("cluster_task_rtt", "us", rtt, "one empty task at a time, submit to result")
    for size, name, rounds, batch in ((1 << 20, "1MiB", 20, 16), (16 << 20, "16MiB", 4, 4)):
        arr = (numpy.arange(size, dtype=numpy.uint64) * 7 + 3).astype(numpy.uint8)

        def right(out):
            return out.nbytes == size and out[0] == arr[0] and out[-1] == arr[-1]

        assert right(result(submit(echo, arr)))
        rate = []
        for _ in range(a.repetitions):
            for _ in range(rounds):
                t0 = time.perf_counter()
                ok = right(result(submit(echo, arr)))
                rate.append(2.0 * size / (time.perf_counter() - t0))
                assert ok
        emit(f"cluster_array_{name}_serial", "B/s", rate,
             "one task at a time; bytes both ways (argument + result) per second")
        rate = []
        for _ in range(a.repetitions):
            t0 = time.perf_counter()
            fs = [submit(echo, arr) for _ in range(batch)]
            ok = all(right(out) for out in gather(fs))
            rate.append(2.0 * size * batch / (time.perf_counter() - t0))
            assert ok
        emit(f"cluster_array_{name}_batch", "B/s", rate, f"{batch} tasks submitted at once")


def run_mpi4py(a):
    from mpi4py.futures import MPIPoolExecutor

    with MPIPoolExecutor() as ex:
        ex.bootup(wait=True)
        ready()
        if a.mode == "startup":
            return
        # Two tasks that overlap run on both worker ranks.
        pids = sorted({f.result(timeout=120) for f in [ex.submit(pid_after, 0.5) for _ in range(2)]})
        bench(ex.submit, lambda f: f.result(timeout=120), lambda fs: [f.result(timeout=120) for f in fs], a,
              pids, "worker rank")


def run_dask(a):
    from distributed import Client, LocalCluster, wait

    def gather(client, fs):
        wait(fs, timeout=120)
        return client.gather(fs)

    # Dask warns of every large argument in a task's graph; that is the
    # array figure, on purpose.
    warnings.simplefilter("ignore")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        ready()
        if a.mode == "startup":
            return
        bench(lambda fn, *args: client.submit(fn, *args, pure=False), lambda f: f.result(timeout=120),
              lambda fs: gather(client, fs), a, sorted(client.run(os.getpid).values()),
              "worker process (not its nanny, nor the scheduler)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=["mpi4py", "dask"])
    ap.add_argument("--mode", choices=["bench", "startup"], default="bench")
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--idle-seconds", type=float, default=3.0)
    ap.add_argument("--idle-settle", type=float, default=1.0)
    a = ap.parse_args()
    {"mpi4py": run_mpi4py, "dask": run_dask}[a.peer](a)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
