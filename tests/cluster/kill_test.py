#!/usr/bin/env python3
"""kill -9 of an agent rank while tasks run (issue 22): Open MPI 4.1 has no
fault tolerance, so the job must end, non-zero, within 5 s, leave nothing
behind (no process of the program: ranks, fork servers, workers; no
/dev/shm segment), and the driver must have printed the results that came
before, each once and right. The /dev/shm files the ranks mapped before the
kill (Open MPI's shared-memory segments) must be gone too.

  kill_test.py MPIRUN EXE [--runs N]

Runs kill_prog under mpirun -np 3 once unkilled (it must finish every task
and exit 0), then N times (3 by default); each of those kills
rank 1 (its pid from the program's "rank 1 pid P") once the driver printed
50 results, and measures the time from the kill to mpirun's exit. Prints the
median. The 5 s bound is what the issue promises, scaled by
FORKLIFT_TEST_SLOWDOWN like every bound of the suite.
"""
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from leftovers import procs_running, shm_of  # noqa: E402
from slowdown import slow  # noqa: E402

BOUND = 5.0
RESULTS_BEFORE_KILL = 50
TASKS = 2000
running = []  # the job under way, ended if this script is


def end_running(*_):
    for p in running:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(143)


def procs_in_group(pgid):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == pgid:
                found.append(int(pid))
        except OSError:
            pass
    return found


def shm_mapped(pids):
    """Every /dev/shm file the processes map (Open MPI's shared-memory
    segments, forklift's named ones)."""
    files = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.split(maxsplit=5)[5].strip() if len(line.split(maxsplit=5)) == 6 else ""
                    if path.startswith("/dev/shm/"):
                        files.add(path.removesuffix(" (deleted)"))
        except OSError:
            pass
    return files


def one_run(mpirun, exe, failures):
    """One job, one kill; returns the seconds from the kill to mpirun's exit."""
    argv = [mpirun, "--oversubscribe", "--allow-run-as-root", "-np", "3", exe, "--tasks", str(TASKS), "--ms", "20"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                         start_new_session=True)
    running.append(p)
    lines = []
    rank_pids = {}
    mapped = set()
    results = 0
    killed_at = None
    ended_at = None
    deadline = time.monotonic() + slow(60)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    # Reads line by line (text mode, line-buffered): the kill goes out as
    # soon as the 50th result line is read.
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            if p.poll() is not None:
                break
            continue
        line = p.stdout.readline()
        if line == "":
            break
        lines.append(line)
        m = re.match(r"^rank (\d+) pid (\d+)$", line)
        if m:
            rank_pids[int(m.group(1))] = int(m.group(2))
        if line.startswith("result "):
            results += 1
        if killed_at is None and results >= RESULTS_BEFORE_KILL and 1 in rank_pids:
            mapped = shm_mapped(rank_pids.values())
            os.kill(rank_pids[1], signal.SIGKILL)
            killed_at = time.monotonic()
    try:
        p.wait(timeout=max(0.1, deadline - time.monotonic()))
        ended_at = time.monotonic()
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        failures.append("mpirun did not end within the run's bound")
    running.remove(p)
    lines += p.stdout.readlines()
    sel.close()
    p.stdout.close()
    out = "".join(lines)

    took = None
    if killed_at is None:
        failures.append(f"never killed: {results} results, ranks {rank_pids}\n{out[-3000:]}")
    elif ended_at is not None:
        took = ended_at - killed_at
        if took > slow(BOUND):
            failures.append(f"mpirun ended {took:.2f} s after the kill (bound {slow(BOUND):.1f} s)")
    if p.returncode == 0:
        failures.append("mpirun exited 0 after an agent rank was killed")
    if "all %d results" % TASKS in out:
        failures.append("the driver finished every task: the kill came too late to test anything")

    # What the driver printed: well-formed, each task once, every value right,
    # from both agents (the killed one too, before it died).
    seen = {}
    bad = []
    for m in re.finditer(r"^result (\d+) (-?\d+) rank (\d+)$", out, re.M):
        i, v, r = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if i in seen or v != i * i or r not in (1, 2) or i >= TASKS:
            bad.append(m.group(0))
        seen[i] = r
    errors = re.findall(r"^error \d+: .*$", out, re.M)
    if bad:
        failures.append(f"wrong or repeated results: {bad[:5]}")
    if errors:
        failures.append(f"tasks failed before the kill: {errors[:3]}")
    if len(seen) < RESULTS_BEFORE_KILL:
        failures.append(f"only {len(seen)} results printed, {RESULTS_BEFORE_KILL} were read before the kill")
    if set(seen.values()) != {1, 2}:
        failures.append(f"the printed results do not come from both agents: {sorted(set(seen.values()))}")
    if len(rank_pids) != 3:
        failures.append(f"not every rank said its pid: {rank_pids}")

    # Nothing left: the program's processes (the ranks, their fork servers,
    # the workers all run this binary), mpirun's group, their segments.
    stop = time.monotonic() + slow(3)
    left = procs_running(exe) + procs_in_group(p.pid)
    while left and time.monotonic() < stop:
        time.sleep(0.05)
        left = procs_running(exe) + procs_in_group(p.pid)
    if left:
        failures.append(f"processes left {slow(3):.0f} s after mpirun ended: {sorted(set(left))}")
        for pid in set(left):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    segs = shm_of(set(rank_pids.values())) + sorted(f for f in mapped if os.path.exists(f))
    if segs:
        failures.append(f"/dev/shm segments left: {segs}")
    tail = [line for line in out.splitlines() if not line.startswith("result ")]
    print("\n".join(tail[-12:]))
    print(f"/dev/shm files the ranks mapped before the kill (checked gone after): {sorted(mapped)}")
    print(f"run: {len(seen)} results printed (rank 1: {list(seen.values()).count(1)}, "
          f"rank 2: {list(seen.values()).count(2)}), mpirun exited {p.returncode}"
          + (f", {took:.2f} s after the kill" if took is not None else ""))
    return took


def main():
    mpirun, exe = sys.argv[1], sys.argv[2]
    # meson's timeout sends SIGTERM: unwind, so the cleanup still runs.
    signal.signal(signal.SIGTERM, end_running)
    runs = 3
    if "--runs" in sys.argv:
        runs = int(sys.argv[sys.argv.index("--runs") + 1])
    failures = []
    # The control: unkilled, the same program finishes every task and exits
    # 0, so what the killed runs show comes from the kill.
    p = subprocess.run([mpirun, "--oversubscribe", "--allow-run-as-root", "-np", "3", exe, "--tasks", "100", "--ms", "1"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=slow(60))
    n = len(set(re.findall(r"^result (\d+) ", p.stdout, re.M)))
    print(f"control run, nothing killed: exit {p.returncode}, {n} results")
    if p.returncode != 0 or n != 100 or "all 100 results" not in p.stdout:
        failures.append(f"the control run failed (exit {p.returncode}, {n} results):\n{p.stdout[-2000:]}")
    times = []
    for _ in range(runs):
        took = one_run(mpirun, exe, failures)
        if took is not None:
            times.append(took)
    if times:
        print(f"figure: kill -9 of an agent rank to mpirun's exit: median {statistics.median(times):.2f} s "
              f"of {len(times)} ({', '.join(f'{t:.2f}' for t in times)})")
    for f in failures:
        print("FAILED:", f)
    print(f"{0 if failures else 1} passed, {1 if failures else 0} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
