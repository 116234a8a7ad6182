#!/usr/bin/python3
"""Python's pools running forklift's pool benchmark task: empty tasks.

The same task as bench/pool_bench.cpp's BM_PoolEmptyTasks (a function of one
int that returns it), submitted one by one and waited for, 2,000 per round,
with 1, 2, 4 and 8 workers: multiprocessing.Pool (apply_async) and
concurrent.futures.ProcessPoolExecutor (submit). Prints one JSON document:
{"results": [{"figure": "pool_tasks_4", "contender": "python-mp-pool",
"stat": "median", "value": tasks_per_second, "unit": "task/s"}, ...]}.

  pool_peer.py [--repetitions N] [--tasks T] [--workers 1,2,4,8]
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import statistics
import time


def task(x):
    return x


def mp_pool_round(pool, n):
    t0 = time.perf_counter()
    rs = [pool.apply_async(task, (i,)) for i in range(n)]
    wrong = sum(r.get(timeout=60) != i for i, r in enumerate(rs))
    dt = time.perf_counter() - t0
    assert wrong == 0
    return n / dt


def executor_round(ex, n):
    t0 = time.perf_counter()
    fs = [ex.submit(task, i) for i in range(n)]
    wrong = sum(f.result(timeout=60) != i for i, f in enumerate(fs))
    dt = time.perf_counter() - t0
    assert wrong == 0
    return n / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--workers", default="1,2,4,8")
    a = ap.parse_args()
    ctx = multiprocessing.get_context("fork")  # as forklift's workers start
    out = []
    for n in (int(w) for w in a.workers.split(",")):
        with ctx.Pool(n) as pool:
            mp_pool_round(pool, a.tasks)  # warm-up
            rates = [mp_pool_round(pool, a.tasks) for _ in range(a.repetitions)]
        out.append({"figure": f"pool_tasks_{n}", "contender": "python-mp-pool", "stat": "median",
                    "value": statistics.median(rates), "unit": "task/s"})
        with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) as ex:
            executor_round(ex, a.tasks)
            rates = [executor_round(ex, a.tasks) for _ in range(a.repetitions)]
        out.append({"figure": f"pool_tasks_{n}", "contender": "python-futures", "stat": "median",
                    "value": statistics.median(rates), "unit": "task/s"})
    print(json.dumps({"results": out}))


if __name__ == "__main__":
    main()
