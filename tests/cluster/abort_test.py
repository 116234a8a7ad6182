#!/usr/bin/env python3
"""Runs abort_test under mpirun: the job ends non-zero within 10 s, the
aborting rank logged why, and no process of the job is left."""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from leftovers import procs_running  # noqa: E402

mpirun, exe = sys.argv[1], sys.argv[2]
failures = []
# Rank 1 throws with its World alive; then the driver throws while its
# Pool's task hangs (the Pool must not wait for it while unwinding).
for mode, rank in (([], 1), (["pool"], 0)):
    t0 = time.monotonic()
    p = subprocess.run([mpirun, "--oversubscribe", "--allow-run-as-root", "-np", "3", exe] + mode,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    out = p.stdout
    print(out)
    name = mode[0] if mode else "world"
    if p.returncode == 0:
        failures.append(f"{name}: mpirun exited 0")
    if elapsed > 10:
        failures.append(f"{name}: the job took {elapsed:.1f} s to end (bound 10 s)")
    if f"rank {rank}" not in out or "exception unwound: MPI_Abort" not in out:
        failures.append(f"{name}: no log line of rank {rank}'s MPI_Abort")
    if out.count(" up\n") != 3:
        failures.append(f"{name}: not every rank started")
    print(f"{name}: job ended in {elapsed:.2f} s with code {p.returncode}")
time.sleep(0.5)
left = procs_running(exe)
if left:
    failures.append(f"processes left: {left}")
for f in failures:
    print("FAILED:", f)
print(f"{0 if failures else 1} passed, {1 if failures else 0} failed")
sys.exit(1 if failures else 0)
