#!/usr/bin/env python3
"""forklift-ps against a running demo (tutorial step 7).

  forklift_ps_test.py PS_EXE DEMO_EXE

- the demo shows as a manager with its four workers indented under it, each
  a backend titled "forklift: WorkerProcess.worker-N" whose message counters
  grow while it works, and the demo's anonymous arrays with their content;
- --watch redraws until SIGINT and then exits 0;
- once the demo is gone, it is gone from the table too.
Exits non-zero with the reasons on failure.
"""
import re
import signal
import subprocess
import sys
import time
from slowdown import slow

ps_exe, demo_exe = sys.argv[1], sys.argv[2]
failures = []


def table():
    out = subprocess.run([ps_exe], capture_output=True, text=True, timeout=slow(20))
    if out.returncode != 0:
        failures.append(f"forklift-ps exited {out.returncode}: {out.stderr}")
    return out.stdout


def rows_of(text, pid):
    """The demo's own row and its indented backend rows, as lists of columns."""
    rows = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 12 and cols[0].isdigit() and cols[1] in ("manager", "backend", "frontend"):
            rows.append((line, cols))
    mine = [r for r in rows if int(r[1][0]) == pid]
    kids = [r for r in rows if r[0].startswith("  ") and r[1][1] == "backend" and "WorkerProcess.worker-" in r[0]]
    return mine, kids


demo = subprocess.Popen([demo_exe, "--rounds", "0", "--seconds", str(int(slow(30))), "--workers", "4"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    first = None
    deadline = time.monotonic() + slow(10)
    while time.monotonic() < deadline:
        text = table()
        mine, kids = rows_of(text, demo.pid)
        if mine and len(kids) >= 4:
            first = (text, mine, kids)
            break
        time.sleep(0.2)
    if not first:
        failures.append("the demo and its 4 workers never showed:\n" + text)
    else:
        text, mine, kids = first
        if mine[0][1][1] != "manager":
            failures.append(f"the demo's role is {mine[0][1][1]}, not manager")
        titles = sorted(re.search(r"WorkerProcess\.worker-\d+", k[0]).group(0) for k in kids)
        if titles != [f"WorkerProcess.worker-{i}" for i in range(1, 5)]:
            failures.append(f"worker titles: {titles}")
        if not re.search(r"segment anon\.%d\.\d+\.w1\s+\S+\s+array float64\[100000x1\]" % demo.pid, text):
            failures.append("the demo's array w1 is not listed with its content:\n" + text)
        time.sleep(1.0)
        _, kids_later = rows_of(table(), demo.pid)
        before = sum(int(k[1][5]) for k in kids)
        after = sum(int(k[1][5]) for k in kids_later)
        if not after > before > 0:
            failures.append(f"the workers' MSG-IN did not grow: {before} then {after}")

    watch = subprocess.Popen([ps_exe, "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(slow(1.0))  # at 0.2 s a redraw, a few redraws
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=slow(10))
    if watch.returncode != 0:
        failures.append(f"forklift-ps --watch ended with {watch.returncode} after SIGINT: {err}")
    if out.count("\x1b[H\x1b[2J") < 2 or out.count("PID ") < 2:
        failures.append("--watch did not redraw the table")
finally:
    demo.send_signal(signal.SIGINT)
    try:
        demo.wait(timeout=slow(10))
    except subprocess.TimeoutExpired:
        demo.kill()
        demo.wait()

deadline = time.monotonic() + slow(5)
while time.monotonic() < deadline:
    mine, kids = rows_of(table(), demo.pid)
    if not mine and not kids:
        break
    time.sleep(0.1)
else:
    failures.append("the demo is still listed after it ended")

for f in failures:
    print("FAIL:", f)
print("ok" if not failures else f"{len(failures)} failures")
sys.exit(1 if failures else 0)
