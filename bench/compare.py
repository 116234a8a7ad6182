#!/usr/bin/env python3
"""forklift against its limits and its peers, in one run.

Runs, one after the other on the same machine and with the same CPU
placement:
  - forklift's Google Benchmark programs (build/bench/*_bench), which also
    measure the references: raw socketpair and eventfd round trips (the
    eventfd one also waiting as a hang-proof end must: in epoll on the
    eventfd and the peer's pidfd) and the raw one-way rate (the kernel
    limit), one-process fill-then-read and memcpy (the memory limit), bare
    fork until ready (the process limit);
  - the peers (bench/peers/run): the valkka-multiprocess mechanism in Python
    and Eclipse iceoryx;
  - the pools: build/bench/pool_bench (empty tasks through a FunctionPool of
    1, 2, 4, 8 workers, and a bare call() as the reference) beside Python's
    multiprocessing.Pool and concurrent.futures.ProcessPoolExecutor running
    the same empty tasks (bench/peers/pool_peer.py, Debian's python3), once
    per run: the pools are not pinned.
  - the cluster (issue 22): build/bench/cluster_bench under mpirun -np 3
    (the driver and two agents of one worker): empty tasks through
    cluster::Pool, 1 MiB and 16 MiB array tasks, the agents' idle CPU, and
    start-up until the pool is ready (timed from the launch), beside
    mpi4py.futures and Dask distributed doing the same
    (bench/peers/cluster_peer.py) and a raw MPI_Send/MPI_Recv ping-pong (the
    arrays' limit). A peer that fails is run once more, then shown as
    failed with its reason. Unpinned.
Every figure is a median over repetitions. Writes bench/results/<date>.json,
bench/results/<date>.md (the tables), <date>-<placement>-handoff.png and
-rtt.png, and refreshes the tables in README.md between its markers. The
placements' run is made twice: both processes of every contender on one
CPU, and one CPU each. `--only cluster` (or any of same, split, pool,
cluster) runs those sections only and writes <date>-<sections>.{json,md}.

  bench/compare [--repetitions N] [--placements same,split] [--only SECTIONS] [--no-peers] [--no-readme]
                [--no-pool] [--no-cluster]
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "bench")
SIZES_KIB = [64, 1024, 16384, 131072]
SIZE_NAMES = {64: "64KiB", 1024: "1MiB", 16384: "16MiB", 131072: "128MiB"}
RING_FRAME_KIB = [64, 1024, 6144]
RING_NAMES = {64: "64KiB", 1024: "1MiB", 6144: "6MiB"}
PIPELINE_KIB = [64, 1024, 16384]


def log(msg):
    print(f"compare: {msg}", file=sys.stderr, flush=True)


def run_gbench(exe, reps, env, timeout=300):
    """Runs one Google Benchmark binary; returns {run_name: {stat: entry}}."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [os.path.join(BUILD, exe), f"--benchmark_repetitions={reps}", "--benchmark_report_aggregates_only=true",
           "--benchmark_min_time=0.3", f"--benchmark_out={out}", "--benchmark_out_format=json"]
    log(" ".join(cmd[:1]) + " ...")
    subprocess.run(cmd, env=env, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    runs = {}
    for b in data["benchmarks"]:
        if b.get("run_type") != "aggregate":
            continue
        runs.setdefault(b["run_name"], {})[b["aggregate_name"]] = b
    return runs, data.get("context", {})


def find(runs, prefix):
    for name, stats in runs.items():
        if name == prefix or name.startswith(prefix + "/"):
            return stats
    raise KeyError(prefix)


def median_of(runs, prefix, key):
    entry = find(runs, prefix)["median"]
    return float(entry[key])


def time_us(runs, prefix):
    entry = find(runs, prefix)["median"]
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[entry["time_unit"]]
    return float(entry["real_time"]) * scale


def forklift_figures(reps, env):
    R = []

    def add(figure, contender, stat, value, unit):
        if value is not None:  # None: a benchmark that does not run in this placement
            R.append({"figure": figure, "contender": contender, "stat": stat, "value": value, "unit": unit})

    def maybe(fn):
        try:
            return fn()
        except KeyError:
            return None

    proc, ctx = run_gbench("process_bench", reps, env)
    for stat, key in (("median", "p50_us"), ("p99", "p99_us")):
        add("rtt_small", "forklift", stat, median_of(proc, "BM_CallRoundTrip", key), "us")
        add("rtt_small", "limit:socketpair", stat, median_of(proc, "BM_RawSocketpairRoundTrip", key), "us")
        add("rtt_small", "limit:eventfd", stat, median_of(proc, "BM_RawEventfdRoundTrip", key), "us")
        # ProcessOptions::transport = SharedMemory
        add("rtt_small_shm", "forklift", stat, median_of(proc, "BM_CallRoundTripShm", key), "us")
        add("rtt_small_shm", "limit:eventfd", stat, median_of(proc, "BM_RawEventfdRoundTrip", key), "us")
        # ... and beside the raw round trip that, like call(), sees its peer
        # die: each side waits in epoll_wait on its eventfd and a pidfd.
        add("rtt_small_shm", "limit:eventfd-watched", stat,
            median_of(proc, "BM_RawEventfdWatchedRoundTrip", key), "us")
        # ... with ProcessOptions::spin (50 us), beside a raw spinning round
        # trip on one shared cache line (run only with a CPU per side).
        add("rtt_small_spin", "forklift", stat, median_of(proc, "BM_CallRoundTripShmSpin", key), "us")
        add("rtt_small_spin", "limit:spin", stat, maybe(lambda: median_of(proc, "BM_RawSpinRoundTrip", key)), "us")
    # The codec's share of any call (one process, no transport): with the
    # raw spin above, the floor of a spinning call.
    add("codec_small", "forklift", "median", time_us(proc, "BM_CodecRoundTrip"), "us")
    add("send_rate", "forklift", "median", median_of(proc, "BM_SendRate", "items_per_second"), "msg/s")
    add("send_rate_shm", "forklift", "median", median_of(proc, "BM_SendRateShm", "items_per_second"), "msg/s")
    add("send_rate_shm", "limit:socketpair", "median", median_of(proc, "BM_RawSocketpairOneWay", "items_per_second"),
        "msg/s")
    add("send_rate", "limit:socketpair", "median", median_of(proc, "BM_RawSocketpairOneWay", "items_per_second"),
        "msg/s")
    # Calls from 1 and 4 frontend threads to one backend. The limit of calls
    # made one at a time: raw socketpair round trips per second.
    for n in (1, 4):
        add(f"call_threads_{n}", "forklift", "median",
            median_of(proc, f"BM_CallConcurrent/threads:{n}", "items_per_second"), "msg/s")
    add("call_threads_1", "limit:socketpair", "median", 1e6 / time_us(proc, "BM_RawSocketpairRoundTrip"), "msg/s")
    add("start_ready", "forklift", "median", time_us(proc, "BM_StartUntilReady"), "us")
    add("start_ready", "limit:fork", "median", time_us(proc, "BM_ForkUntilReady"), "us")
    add("stop", "forklift", "median", time_us(proc, "BM_StopIdle"), "us")
    # The live counters' cost per message (one frame out and one in), in µs
    # like the round trip it is part of.
    add("metrics_per_msg", "forklift", "median", time_us(proc, "BM_MetricsPerMessage"), "us")

    shm, _ = run_gbench("shm_bench", reps, env)
    for kib in SIZES_KIB:
        fig = "handoff_" + SIZE_NAMES[kib]
        # GB/s at the median iteration (as the peers report it), the median
        # over repetitions.
        add(fig, "forklift", "median", median_of(shm, f"BM_ShmHandoff/{kib}", "GBps_p50"), "GB/s")
        add(fig, "forklift-4arrays", "median", median_of(shm, f"BM_ShmHandoff4/{kib}", "GBps_p50"), "GB/s")
        add(fig, "limit:fill-then-read", "median", median_of(shm, f"BM_FillThenReadHeap/{kib}", "GBps_p50"), "GB/s")
        add(fig, "limit:memcpy", "median", median_of(shm, f"BM_Memcpy/{kib}", "GBps_p50"), "GB/s")
    # Creating (and destroying) a 1 MiB array, anonymous and named, beside a
    # bare memfd of the same size.
    add("create_1MiB_anonymous", "forklift", "median", time_us(shm, "BM_CreateArray1MiB/0"), "us")
    add("create_1MiB_named", "forklift", "median", time_us(shm, "BM_CreateArray1MiB/1"), "us")
    for fig in ("create_1MiB_anonymous", "create_1MiB_named"):
        add(fig, "limit:memfd", "median", time_us(shm, "BM_RawMemfd1MiB"), "us")

    # The ring (bench/ring_bench): frames through slots of 64 KiB to 6 MiB
    # beside memcpy of the same size, and the pipelined array handoff (the
    # frontend fills slot k+1 while the backend reads slot k) beside the
    # one-process fill-then-read. A pipeline is measured by its mean rate
    # (bytes over the frontend's whole time), and so is its limit here: an
    # iteration that waits for a free slot pays for the ones that did not,
    # so a median iteration would flatter it.
    ring, _ = run_gbench("ring_bench", reps, env)
    for kib in RING_FRAME_KIB:
        fig = "ring_frames_" + RING_NAMES[kib]
        for bench, who in (("BM_RingFrames", "forklift"), ("BM_RingMemcpy", "limit:memcpy")):
            add(fig, who, "median", median_of(ring, f"{bench}/{kib}", "bytes_per_second") / 1e9, "GB/s")
            add(fig + "_rate", who, "median", median_of(ring, f"{bench}/{kib}", "items_per_second"), "frames/s")
    # The reader's wake-up: a slot there and back through two rings, without
    # and with spinning, beside the raw eventfd round trip.
    for stat, key in (("median", "p50_us"), ("p99", "p99_us")):
        for fig, arg in (("ring_rtt", 0), ("ring_rtt_spin", 50)):
            add(fig, "forklift", stat, median_of(ring, f"BM_RingPingPong/{arg}", key), "us")
            add(fig, "limit:eventfd", stat, median_of(proc, "BM_RawEventfdRoundTrip", key), "us")
    for kib in PIPELINE_KIB:
        fig = "handoff_pipelined_" + SIZE_NAMES[kib]
        add(fig, "forklift", "median", median_of(ring, f"BM_RingHandoff/{kib}", "bytes_per_second") / 1e9, "GB/s")
        add(fig, "limit:fill-then-read", "median",
            median_of(shm, f"BM_FillThenReadHeap/{kib}", "bytes_per_second") / 1e9, "GB/s")

    mgr, _ = run_gbench("manager_bench", reps, env)
    for n in (1, 8, 64):
        add(f"fanin_{n}", "forklift", "median", median_of(mgr, f"BM_ManagerFanIn/{n}", "items_per_second"), "msg/s")
    return R, ctx


def peer_figures(cpus, same_cpu):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [os.path.join(ROOT, "bench", "peers", "run"), "--out", out]
    cmd += ["--same-cpu"] if same_cpu else ["--cpus", cpus]
    log("bench/peers/run ...")
    r = subprocess.run(cmd, timeout=600)
    try:
        with open(out) as f:
            data = json.load(f)
    except (OSError, ValueError):
        log(f"the peers wrote no results (exit {r.returncode})")
        return [], {"errors": [f"bench/peers/run exited {r.returncode} without results"]}
    finally:
        if os.path.exists(out):
            os.unlink(out)
    return data.get("results", []), data


POOL_WORKERS = (1, 2, 4, 8)


def pool_figures(reps):
    """Empty tasks per second: forklift's pool and Python's, unpinned."""
    R = []

    def add(figure, contender, value, unit):
        R.append({"figure": figure, "contender": contender, "stat": "median", "value": value, "unit": unit})

    pool, _ = run_gbench("pool_bench", reps, dict(os.environ))
    # The pool as a user gets it: PoolOptions' defaults (queue depth, transport).
    for n in POOL_WORKERS:
        add(f"pool_tasks_{n}", "forklift", median_of(pool, f"BM_PoolEmptyTasks/{n}", "items_per_second"), "task/s")
    add("pool_tasks_4_depth16", "forklift", median_of(pool, "BM_PoolEmptyTasksAtDepth/4/16", "items_per_second"),
        "task/s")
    one = median_of(pool, "BM_PoolEmptyTasksAtDepth/1/1", "items_per_second")
    add("pool_tasks_1_depth1", "forklift", one, "task/s")
    bare = median_of(pool, "BM_BareCallEmpty", "items_per_second")
    add("bare_call", "forklift", bare, "task/s")
    # What the pool adds to a call: one worker's time per task at depth 1
    # (each task a round trip) minus a bare call's, over the same transport.
    add("pool_overhead", "forklift", (1e6 / one) - (1e6 / bare), "us")
    log("bench/peers/pool_peer.py ...")
    r = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "bench", "peers", "pool_peer.py"),
                        "--repetitions", str(reps)], capture_output=True, text=True, timeout=900)
    if r.returncode == 0:
        R += json.loads(r.stdout)["results"]
    else:
        log(f"the pool peer failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return R


def pool_table(results):
    by = {(r["figure"], r["contender"]): r["value"] for r in results}
    lines = ["| workers | forklift tasks/s | multiprocessing.Pool | forklift ÷ Pool | ProcessPoolExecutor | "
             "forklift ÷ Executor |", "|---:|---:|---:|---:|---:|---:|"]
    for n in POOL_WORKERS:
        fk, mp, fu = (by.get((f"pool_tasks_{n}", c)) for c in ("forklift", "python-mp-pool", "python-futures"))
        lines.append(f"| {n} | {fmt(fk, 'msg/s')} | {fmt(mp, 'msg/s')} | {fmt_ratio(speed_ratio(fk, mp, 'task/s'))} | "
                     f"{fmt(fu, 'msg/s')} | {fmt_ratio(speed_ratio(fk, fu, 'task/s'))} |")
    d16 = by.get(("pool_tasks_4_depth16", "forklift"))
    d1 = by.get(("pool_tasks_1_depth1", "forklift"))
    over = by.get(("pool_overhead", "forklift"))
    bare = by.get(("bare_call", "forklift"))
    lines.append("")
    lines.append(f"forklift with PoolOptions' defaults (queue depth 32, shared-memory transport, SCHED_OTHER workers). 4 workers with "
                 f"queue depth 16: {fmt(d16, 'msg/s')} tasks/s; 1 worker with queue depth 1 (every task a round "
                 f"trip): {fmt(d1, 'msg/s')} tasks/s. A bare call() of the same empty command (same transport): "
                 f"{fmt(bare, 'msg/s')} calls/s; the pool's own cost per task (1 worker, depth 1, minus a bare "
                 f"call): {fmt(over, 'us')} µs.")
    return "\n".join(lines)


# --- the cluster (issue 22): cluster::Pool under mpirun beside its peers ---------

CLUSTER_PEERS = (("mpi4py", "mpi4py.futures"), ("dask", "Dask distributed"))
CLUSTER_RANKS = 3  # the driver and two agents (or worker ranks) on this machine


def mpirun_cmd():
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if not mpirun:
        return None
    cmd = [mpirun, "--oversubscribe", "-np", str(CLUSTER_RANKS)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return cmd


def run_lines(cmd, timeout):
    """Runs `cmd` in its own session; returns (exit code or a reason, [JSON
    objects it printed], stderr's tail). On timeout the whole session is
    stopped (mpirun passes SIGTERM on to its ranks), then killed."""
    launched = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         cwd=ROOT)
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                out, err = p.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                out, err = "", ""
        rc = f"timed out after {timeout} s"
    objs = []
    for line in (out or "").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                objs.append(json.loads(line))
            except ValueError:
                pass
    return rc, objs, (err or "").strip()[-400:], launched


def cluster_figures(reps, tasks=2000):
    """Empty tasks, array tasks, start-up and idle CPU of cluster::Pool with two
    agents of one worker, the same through mpi4py.futures and Dask, and a raw
    MPI ping-pong (the arrays' limit), all on this machine, unpinned."""
    R, errors = [], []

    def add(figure, contender, obj):
        for stat in ("median", "p99"):
            if stat in obj:
                R.append({"figure": figure, "contender": contender, "stat": stat, "value": obj[stat],
                          "unit": obj["unit"], "n": obj.get("n")})

    def add_objs(contender, objs):
        for o in objs:
            if "unavailable" in o:
                R.append({"figure": o["figure"], "contender": contender, "unavailable": o["unavailable"]})
            elif "median" in o:
                add(o["figure"], contender, o)

    def attempt(contender, cmd, timeout, want):
        """Runs `cmd`, once more if it failed; the JSON objects, or None."""
        for n in (1, 2):
            rc, objs, err, launched = run_lines(cmd, timeout)
            reason = f"{contender}: exit {rc}" + (f": {err}" if err else "")
            if any(o.get("figure") == want for o in objs):
                if rc != 0:  # it measured, then failed: its figures stand, and why it failed is shown
                    errors.append(reason)
                return objs, launched
            log(f"cluster: {reason}" + (" (trying once more)" if n == 1 else ""))
        errors.append(reason)
        R.append({"figure": want, "contender": contender, "unavailable": reason})
        return None, None

    mpirun = mpirun_cmd()
    bench_exe = os.path.join(BUILD, "cluster_bench")
    peer = os.path.join(ROOT, "bench", "peers", "cluster_peer.py")
    if not mpirun:
        errors.append("no mpirun (openmpi-bin)")
        return R, errors
    fk_ok = os.path.exists(bench_exe)
    if not fk_ok:
        errors.append("build/bench/cluster_bench is not built (meson found no MPI, or -Dbench=false)")
    launchers = {"forklift": lambda mode: mpirun + [bench_exe, "--mode", mode, "--repetitions", str(reps),
                                                    "--tasks", str(tasks)],
                 "mpi4py": lambda mode: mpirun + ["/usr/bin/python3", "-m", "mpi4py.futures", peer, "mpi4py",
                                                  "--mode", mode, "--repetitions", str(reps), "--tasks", str(tasks)],
                 "dask": lambda mode: ["/usr/bin/python3", peer, "dask", "--mode", mode, "--repetitions", str(reps),
                                       "--tasks", str(tasks)]}
    contenders = (["forklift"] if fk_ok else []) + [c for c, _ in CLUSTER_PEERS]
    # The figures, one contender after the other.
    for c in contenders:
        log(f"cluster: {c} ...")
        objs, _ = attempt(c, launchers[c]("pool" if c == "forklift" else "bench"), 900, "cluster_tasks_batch")
        if objs:
            add_objs(c, objs)
    if fk_ok:
        # The same pool with the MPI threads spinning 1 ms (WorldOptions::spin;
        # 50 µs by default) before they sleep: what the back-off costs tasks.
        log("cluster: forklift, spin 1 ms ...")
        objs, _ = attempt("forklift", launchers["forklift"]("pool") + ["--spin-us", "1000", "--idle-seconds", "0.1",
                                                                     "--idle-settle", "0"], 900,
                          "cluster_tasks_batch")
        for o in objs or []:
            if o.get("figure") in SPIN_FIGURES and "median" in o:
                add(o["figure"] + "_spin", "forklift", o)
        log("cluster: raw MPI ping-pong ...")
        objs, _ = attempt("limit:mpi", mpirun + [bench_exe, "--mode", "pingpong", "--repetitions", str(reps)], 300,
                          "mpi_pingpong_1MiB")
        for o in objs or []:
            if "median" in o:
                # The ping-pong is the limit of the figure of the same size.
                fig = {"mpi_pingpong_8B_rtt": "cluster_task_rtt"}.get(o["figure"], o["figure"])
                for mode in ("serial", "batch"):
                    if fig.startswith("mpi_pingpong_"):
                        add(f"cluster_array_{fig[len('mpi_pingpong_'):]}_{mode}", "limit:mpi", o)
                    elif mode == "serial":
                        add(fig, "limit:mpi", o)
    # Start-up: from the launch until the pool (executor, client) is ready,
    # every contender launched `reps` times in turn.
    samples = {c: [] for c in contenders}
    for _ in range(reps):
        for c in contenders:
            objs, launched = attempt(c, launchers[c]("startup"), 180, "cluster_pool_ready")
            ready = [o["wallclock"] for o in objs or [] if o.get("figure") == "cluster_pool_ready"]
            if ready:
                samples[c].append(ready[0] - launched)
    for c, v in samples.items():
        if v:
            v = sorted(v)
            add("cluster_startup", c, {"median": statistics.median(v), "p99": v[-1], "unit": "s", "n": len(v)})
    return R, errors


SPIN_FIGURES = ("cluster_tasks_batch", "cluster_task_rtt")
CLUSTER_ROWS = [("cluster_tasks_batch", "empty tasks, 2,000 submitted at once"),
                ("cluster_task_rtt", "empty task, one at a time (round trip)"),
                ("cluster_tasks_batch_spin", "empty tasks, 2,000 at once; forklift's MPI threads spin 1 ms"),
                ("cluster_task_rtt_spin", "empty task, one at a time; forklift's MPI threads spin 1 ms"),
                ("cluster_array_1MiB_serial", "1 MiB array task, one at a time"),
                ("cluster_array_1MiB_batch", "1 MiB array tasks, 16 at once"),
                ("cluster_array_16MiB_serial", "16 MiB array task, one at a time"),
                ("cluster_array_16MiB_batch", "16 MiB array tasks, 4 at once"),
                ("cluster_startup", "start-up of the 3-rank job until the pool is ready"),
                ("cluster_idle_cpu_rank", "idle CPU of an agent rank (peers: of a worker process), every thread"),
                ("cluster_idle_cpu_agent_tree", "idle agent with its workers and fork server")]
CLUSTER_UNITS = {"task/s": ("tasks/s", lambda v: f"{v:,.0f}"), "us": ("µs", lambda v: f"{v:,.0f}" if v >= 10 else f"{v:.1f}"),
                 "B/s": ("GB/s", lambda v: f"{v / 1e9:.2f}"), "s": ("ms", lambda v: f"{v * 1e3:,.0f}"),
                 "%cpu": ("% of a CPU", lambda v: f"{v:.2f}")}


def cluster_table(results, errors=()):
    by, gone = {}, {}
    for r in results:
        if "unavailable" in r:
            gone[(r["figure"], r["contender"])] = r["unavailable"]
        else:
            by[(r["figure"], r["stat"], r["contender"])] = r

    def cell(fig, who):
        if who != "forklift":
            fig = fig.removesuffix("_spin")
        m, p = by.get((fig, "median", who)), by.get((fig, "p99", who))
        if not m:
            return "unavailable" if (fig, who) in gone else "—"
        unit, f = CLUSTER_UNITS.get(m["unit"], (m["unit"], lambda v: f"{v:.3g}"))
        return f"{f(m['value'])}" + (f" (p99 {f(p['value'])})" if p else "")

    def ratio(fig, who):
        m, o = by.get((fig, "median", "forklift")), by.get((fig.removesuffix("_spin"), "median", who))
        if not m or not o or fig.startswith("cluster_idle"):
            return "—"
        r = speed_ratio(m["value"], o["value"], "us" if m["unit"] in ("us", "s") else "rate")
        return f"{r:.2g}×" if r is not None and r < 0.1 else fmt_ratio(r)

    lines = ["| figure | unit | forklift | mpi4py.futures | forklift ÷ mpi4py | Dask | forklift ÷ Dask | "
             "MPI ping-pong (limit) | forklift ÷ limit |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fig, label in CLUSTER_ROWS:
        any_m = next((r for k, r in by.items() if k[0] == fig), None)
        if not any_m and not any(k[0] == fig for k in gone):
            continue
        unit = CLUSTER_UNITS.get(any_m["unit"], (any_m["unit"],))[0] if any_m else ""
        lines.append(f"| {label} | {unit} | {cell(fig, 'forklift')} | {cell(fig, 'mpi4py')} | {ratio(fig, 'mpi4py')} | "
                     f"{cell(fig, 'dask')} | {ratio(fig, 'dask')} | {cell(fig, 'limit:mpi')} | "
                     f"{ratio(fig, 'limit:mpi')} |")
    notes, reasons = [], {}
    for (fig, who), why in sorted(gone.items()):
        reasons.setdefault((who, why), []).append(fig)
    for (who, why), figs in reasons.items():
        notes.append(f"- {who}: {', '.join(figs)} unavailable: {why}")
    for e in errors:
        if not any(e in n for n in notes):
            notes.append(f"- {e}")
    goals = []
    for who, name in CLUSTER_PEERS:
        r = ratio("cluster_tasks_batch", who)
        goals.append(f"empty tasks/s ÷ {name}: {r} (goal ≥ 10×; with 1 ms of spinning: "
                     f"{ratio('cluster_tasks_batch_spin', who)})")
    for size in ("1MiB", "16MiB"):
        fig = f"cluster_array_{size}_serial"
        r = ratio(fig, "limit:mpi")
        if (fig, "forklift") in gone:
            r = "not measured (forklift's array tasks unavailable, below)"
        goals.append(f"{size} array task bytes/s ÷ MPI ping-pong: {r} (goal ≥ 0.8×)")
    idle = by.get(("cluster_idle_cpu_rank", "median", "forklift"))
    if idle:
        worst = by.get(("cluster_idle_cpu_rank", "p99", "forklift"), idle)["value"]
        goals.append(f"idle agent rank: {idle['value']:.2f} % of a CPU, the busier of the two {worst:.2f} % "
                     "(goal ≤ 1 %)")
    text = "\n".join(lines) + "\n\nGoals (issue 22): " + "; ".join(goals) + "."
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text

LOWER_IS_BETTER = {"us"}
ROWS = ["rtt_small:median", "rtt_small:p99", "rtt_small_shm:median", "rtt_small_shm:p99", "rtt_small_spin:median",
        "rtt_small_spin:p99", "codec_small:median", "send_rate:median",
        "send_rate_shm:median", "call_threads_1:median", "call_threads_4:median",
        "start_ready:median", "stop:median", "metrics_per_msg:median"] + \
       [f"handoff_{SIZE_NAMES[k]}:median" for k in SIZES_KIB] + \
       [f"handoff_{SIZE_NAMES[k]}:median:4arrays" for k in SIZES_KIB] + \
       [f"handoff_pipelined_{SIZE_NAMES[k]}:median" for k in PIPELINE_KIB] + \
       [f"ring_frames_{RING_NAMES[k]}:median" for k in RING_FRAME_KIB] + \
       [f"ring_frames_{RING_NAMES[k]}_rate:median" for k in RING_FRAME_KIB] + \
       ["ring_rtt:median", "ring_rtt:p99", "ring_rtt_spin:median", "ring_rtt_spin:p99"] + \
       ["create_1MiB_anonymous:median", "create_1MiB_named:median"] + \
       ["fanin_1:median", "fanin_8:median", "fanin_64:median"]
LIMIT_OF = {"rtt_small": "limit:socketpair", "send_rate": "limit:socketpair", "call_threads_1": "limit:socketpair",
            "start_ready": "limit:fork",
            "create_1MiB_anonymous": "limit:memfd", "create_1MiB_named": "limit:memfd",
            **{f"handoff_{SIZE_NAMES[k]}": "limit:fill-then-read" for k in SIZES_KIB},
            **{f"handoff_pipelined_{SIZE_NAMES[k]}": "limit:fill-then-read" for k in PIPELINE_KIB},
            **{f"ring_frames_{RING_NAMES[k]}{r}": "limit:memcpy" for k in RING_FRAME_KIB for r in ("", "_rate")},
            "ring_rtt": "limit:eventfd", "ring_rtt_spin": "limit:eventfd",
            # The shared-memory transport against what it replaces and what it uses.
            "rtt_small_shm": "limit:eventfd", "send_rate_shm": "limit:socketpair", "rtt_small_spin": "limit:spin"}
# Figures the peers measure under another name: the pipelined handoff is
# set beside their (synchronous, loaned-sample) handoff of the same size.
PEER_FIGURE_OF = {f"handoff_pipelined_{SIZE_NAMES[k]}": f"handoff_{SIZE_NAMES[k]}" for k in PIPELINE_KIB}
PEER_FIGURE_OF.update({"rtt_small_shm": "rtt_small", "send_rate_shm": "send_rate", "rtt_small_spin": "rtt_small_busy"})


def speed_ratio(fk, other, unit):
    """How many times faster forklift is than `other` (>1: forklift faster)."""
    if fk is None or other is None or fk == 0 or other == 0:
        return None
    return other / fk if unit in LOWER_IS_BETTER else fk / other


def fmt(v, unit):
    if v is None:
        return "—"
    if unit == "msg/s":
        return f"{v / 1e3:,.0f} k"
    if unit == "frames/s":
        return f"{v:,.0f}"
    if unit == "GB/s":
        return f"{v:.2f}"
    if v < 1:
        return f"{v:.3f}"
    return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}×"


def table(results):
    by = {}
    for r in results:
        by[(r["figure"], r["stat"], r["contender"])] = r
    lines = ["| figure | unit | forklift | limit | forklift ÷ limit | python-valkka | forklift ÷ python | iceoryx | forklift ÷ iceoryx |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        fig, stat, *variant = row.split(":")
        fk = by.get((fig, stat, "forklift-4arrays" if variant else "forklift"))
        if not fk:
            continue
        unit = fk["unit"]
        lim_name = LIMIT_OF.get(fig)
        lim = by.get((fig, stat, lim_name)) if lim_name else None
        peer_fig = PEER_FIGURE_OF.get(fig, fig)
        py = by.get((peer_fig, stat, "python-valkka"))
        ix = by.get((peer_fig, stat, "iceoryx"))
        v = lambda e: e["value"] if e else None
        label = fig if stat == "median" else f"{fig} ({stat})"
        if variant:
            label = f"{fig}, 4 arrays in turn"
            py = None  # the Python mechanism uses one array
        lines.append(f"| {label} | {unit} | {fmt(v(fk), unit)} | {fmt(v(lim), unit)} | "
                     f"{fmt_ratio(speed_ratio(v(fk), v(lim), unit))} | {fmt(v(py), unit)} | "
                     f"{fmt_ratio(speed_ratio(v(fk), v(py), unit))} | {fmt(v(ix), unit)} | "
                     f"{fmt_ratio(speed_ratio(v(fk), v(ix), unit))} |")
        if fig == "metrics_per_msg":
            rtt = by.get(("rtt_small", "median", "forklift"))
            if rtt and fk["value"]:
                share = 100.0 * 2 * fk["value"] / rtt["value"]  # a call is two messages
                lines.append(f"| metrics share of one call (rtt_small) | % | {share:.2f} % | — | — | — | — | — | — |")
        if fig == "rtt_small_shm":
            watched = by.get((fig, stat, "limit:eventfd-watched"))
            lines.append(f"| {label}, limit: raw eventfd watching the peer's death (epoll + pidfd) | {unit} | "
                         f"{fmt(v(fk), unit)} | {fmt(v(watched), unit)} | "
                         f"{fmt_ratio(speed_ratio(v(fk), v(watched), unit))} | — | — | — | — |")
        if fig == "call_threads_4":
            one = by.get(("call_threads_1", "median", "forklift"))
            ratio = speed_ratio(v(fk), v(one), unit)
            lines.append(f"| call_threads_4 ÷ call_threads_1 | × | {fmt_ratio(ratio)} | — | — | — | — | — | — |")
    return "\n".join(lines)


def plots(results, stem, placement):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["figure"], r["stat"], r["contender"]): r["value"] for r in results}
    # Handoff throughput against array size.
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    xs = [k * 1024 for k in SIZES_KIB]
    series = [("forklift", "forklift ShmArray handoff (one array)", "o-", "tab:blue"),
              ("forklift-4arrays", "forklift, 4 arrays in turn", "o:", "tab:cyan"),
              ("limit:fill-then-read", "one process, no IPC (memory limit)", "s--", "tab:gray"),
              ("limit:memcpy", "memcpy", ":", "tab:olive"),
              ("python-valkka", "Python valkka mechanism (shared_memory + numpy)", "^-", "tab:orange"),
              ("iceoryx", "iceoryx loaned sample", "D-", "tab:green")]
    for contender, label, style, color in series:
        pts = [(x, by.get((f"handoff_{SIZE_NAMES[k]}", "median", contender))) for x, k in zip(xs, SIZES_KIB)]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([SIZE_NAMES[k].replace("KiB", " KiB").replace("MiB", " MiB") for k in SIZES_KIB])
    ax.set_xlabel("array size (float64)")
    ax.set_ylabel("throughput, GB/s (higher is better)")
    ax.set_title(f"Fill in place, hand off, read every element\n({placement})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "-handoff.png")
    plt.close(fig)

    # Round-trip latency.
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    bars = [("forklift", "forklift call()"), ("limit:socketpair", "raw socketpair"), ("limit:eventfd", "raw eventfd"),
            ("iceoryx", "iceoryx (WaitSet)"), ("python-valkka", "Python valkka mechanism")]
    names, med, p99 = [], [], []
    for contender, label in bars:
        m = by.get(("rtt_small", "median", contender))
        if m is None:
            continue
        names.append(label)
        med.append(m)
        p99.append(by.get(("rtt_small", "p99", contender)) or m)
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], med, height=0.4, left=1, color="tab:blue", label="median")
    ax.barh([y + 0.2 for y in ys], p99, height=0.4, left=1, color="tab:orange", alpha=0.6, label="p99")
    for y, m, p in zip(ys, med, p99):
        ax.text(m * 1.05, y - 0.2, f"{m:.0f}", va="center", fontsize=8)
        ax.text(p * 1.05, y + 0.2, f"{p:.0f}", va="center", fontsize=8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(left=1, right=max(p99) * 3)
    ax.set_xlabel("round trip of a small message, µs (log scale, lower is better)")
    ax.set_title(f"Request/reply round trip between two processes\n({placement})", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "-rtt.png")
    plt.close(fig)


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


PLACEMENTS = {"same": ("0,0", "both processes pinned to CPU 0"),
              "split": ("0,1", "frontend pinned to CPU 0, backend to CPU 1")}


def update_readme(sections, date, mach, pool_md=None):
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if begin not in text or end not in text:
        log("README.md has no benchmark markers; not updated")
        return
    block = [f"{begin}\nMeasured {date} on {mach['cpus']} × {mach['cpu']} (Linux {mach['kernel']}, "
             f"{mach['memory_gib']} GiB). Every contender is pinned the same way; the run is repeated for two "
             "placements. Ratios are forklift's speed divided by the other's (above 1: forklift is faster); "
             "the limits are the same operation done with raw system calls or in one process."]
    for key, label, md, stem_rel in sections:
        block.append(f"\n**{label}**\n\n{md}\n\n![handoff throughput, {label}]({stem_rel}-handoff.png)\n"
                     f"![round trip, {label}]({stem_rel}-rtt.png)")
    if pool_md:
        block.append(f"\n**pools, empty tasks (not pinned)**\n\n{pool_md}\n")
    block.append(end)
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(pre + "\n".join(block) + post)


def update_readme_cluster(md, date, mach, load=None):
    """The cluster's table, between its own markers (a section of its own, so
    a run of only the cluster leaves the other tables as they are)."""
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    begin, end = "<!-- bench-cluster:begin -->", "<!-- bench-cluster:end -->"
    if begin not in text or end not in text:
        log("README.md has no cluster benchmark markers; not updated")
        return
    shared = f" (load average {load[0]:.1f} when it began: the machine was shared)" if load else ""
    block = (f"{begin}\nMeasured {date} on {mach['cpus']} × {mach['cpu']} (Linux {mach['kernel']}), one run{shared}, "
             "not pinned; medians, and p99 (the slow tail) in parentheses. Ratios are forklift's speed divided by "
             f"the other's (above 1: forklift is faster).\n\n{md}\n{end}")
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(pre + block + post)


SECTIONS = ("same", "split", "pool", "cluster")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--placements", default="same,split", help="same (both on CPU 0), split (CPU 0 and 1)")
    ap.add_argument("--only", default="", help="run only these sections, comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--no-pool", action="store_true")
    ap.add_argument("--no-cluster", action="store_true")
    a = ap.parse_args()
    only = [x for x in a.only.split(",") if x]
    for x in only:
        if x not in SECTIONS:
            ap.error(f"--only: unknown section '{x}' (sections: {', '.join(SECTIONS)})")
    wanted = lambda x: x in only if only else True  # noqa: E731
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    # A run of some sections only has files of its own, so it does not
    # replace a whole run's.
    name = date + ("-" + "-".join(only) if only else "")
    mach = machine()
    outdir = os.path.join(ROOT, "bench", "results")
    os.makedirs(outdir, exist_ok=True)
    doc = {"date": date, "machine": mach, "load_average_at_start": os.getloadavg(),
           "repetitions": a.repetitions, "placements": {}}
    if only:
        doc["sections"] = only
    sections = []
    for key in a.placements.split(","):
        if not wanted(key):
            continue
        cpus, label = PLACEMENTS[key]
        log(f"placement {key}: {label}")
        env = dict(os.environ, FORKLIFT_BENCH_CPUS=cpus)
        results, ctx = forklift_figures(a.repetitions, env)
        peers = {}
        if not a.no_peers:
            pr, peers = peer_figures(cpus, key == "same")
            results += pr
        stem = os.path.join(outdir, f"{date}-{key}")
        plots(results, stem, label)
        md = table(results)
        doc["placements"][key] = {"cpus": cpus, "placement": label, "peer_errors": peers.get("errors", []),
                                  "gbench_context": {k: ctx.get(k) for k in ("num_cpus", "mhz_per_cpu",
                                                                               "library_build_type")},
                                  "results": results}
        sections.append((key, label, md, os.path.relpath(stem, ROOT)))
        print(f"\n{label}\n\n{md}\n", flush=True)
    if not a.no_pool and wanted("pool"):
        log("pools: empty tasks, unpinned")
        pr = pool_figures(a.repetitions)
        doc["pool"] = {"placement": "unpinned", "results": pr}
        pmd = pool_table(pr)
        print(f"\nPools, empty tasks (unpinned)\n\n{pmd}\n", flush=True)
    if not a.no_cluster and wanted("cluster"):
        log("cluster: cluster::Pool under mpirun beside mpi4py.futures and Dask, unpinned")
        doc["cluster"] = {"placement": "unpinned", "ranks": CLUSTER_RANKS, "load_average_at_start": os.getloadavg()}
        cr, cerr = cluster_figures(a.repetitions)
        doc["cluster"].update({"errors": cerr, "results": cr})
        doc["cluster"]["load_average_at_end"] = os.getloadavg()
        cmd = cluster_table(cr, cerr)
        print(f"\nCluster, 3 ranks on this machine (unpinned)\n\n{cmd}\n", flush=True)
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(outdir, f"{name}.md"), "w") as f:
        f.write(f"# forklift benchmarks, {date}\n\n{mach['cpus']} × {mach['cpu']}, Linux {mach['kernel']}. "
                "Ratios: forklift's speed ÷ the other's (above 1: forklift is faster).\n")
        for key, label, md, stem_rel in sections:
            f.write(f"\n## {label}\n\n{md}\n")
        if "pool" in doc:
            f.write(f"\n## Pools, empty tasks (unpinned)\n\n{pool_table(doc['pool']['results'])}\n")
        if "cluster" in doc:
            f.write(f"\n## Cluster, 3 ranks on this machine (unpinned)\n\n"
                    f"{cluster_table(doc['cluster']['results'], doc['cluster']['errors'])}\n")
    if not a.no_readme:
        # The main block is the placements' (and the pools'): refreshed only
        # by a run that measured them.
        if sections:
            update_readme(sections, date, mach, pool_table(doc["pool"]["results"]) if "pool" in doc else None)
        if "cluster" in doc:
            update_readme_cluster(cluster_table(doc["cluster"]["results"], doc["cluster"]["errors"]), date, mach,
                                  doc["cluster"]["load_average_at_start"])
    log(f"wrote bench/results/{name}.json, {name}.md" + (" and the plots" if sections else ""))
    for key, _, _, _ in sections:
        errs = doc["placements"][key]["peer_errors"]
        if errs:
            log(f"peer errors ({key}): {errs}")
    if "cluster" in doc and doc["cluster"]["errors"]:
        log(f"cluster errors: {doc['cluster']['errors']}")

if __name__ == "__main__":
    main()
