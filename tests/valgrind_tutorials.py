#!/usr/bin/env python3
"""Every tutorial program under valgrind's memcheck: no invalid access, no
use of uninitialised memory, no definite leak, in the frontend and in its
forked backends (memcheck follows a fork). Valgrind knows no pidfd_open, so
this also runs forklift's death-pipe fallback for real.

  valgrind_tutorials.py --results DIR [--whole-scan NAME]... NAME=EXE[,ARG...] ...

--whole-scan NAME: the program NAME runs verbosely (a log per process) and
every process's leak check must also have read all the memory it scanned.
Memory valgrind believes mapped but the kernel does not (a range a child did
not inherit: MADV_DONTFORK, which valgrind does not know) costs the scan a
fault per 8-byte word, seconds per backend: the cause of 07_manager's
workers that "did not stop within 5000 ms" under valgrind on a slower
machine. Memcheck reports it only when verbose: "Skipped N bytes due to read
errors".
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from slowdown import slow
from xml.sax.saxutils import escape

ap = argparse.ArgumentParser()
ap.add_argument("--results")
ap.add_argument("--whole-scan", action="append", default=[])
ap.add_argument("programs", nargs="+")
a = ap.parse_args()

memcheck = ["valgrind", "--error-exitcode=97", "--leak-check=full", "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite"]


def run_quiet(argv):
    """Errors of every process are the only lines memcheck prints with -q."""
    r = subprocess.run([*memcheck, "-q", *argv], capture_output=True, text=True, timeout=slow(600))
    return r, [l for l in r.stderr.splitlines() if l.startswith("==")]


def run_whole_scan(argv):
    """Verbose, one log per process: errors are the nonzero error summaries
    (definite leaks count as errors), and a scan that skipped bytes fails."""
    with tempfile.TemporaryDirectory(prefix="fk-vg-") as d:
        r = subprocess.run([*memcheck, "-v", f"--log-file={d}/%p.log", *argv], capture_output=True, text=True,
                           timeout=slow(600))
        reports = []
        for log in sorted(glob.glob(os.path.join(d, "*.log"))):
            with open(log, errors="replace") as f:
                lines = f.read().splitlines()
            summary = [l for l in lines if "ERROR SUMMARY:" in l]
            if any(not re.search(r"ERROR SUMMARY: 0 errors", l) for l in summary):
                reports += [l for l in lines if l.startswith("==") and " at 0x" not in l][-12:]
            reports += [l for l in lines if "due to read errors" in l]
    return r, reports


cases = []
for spec in a.programs:
    name, _, cmd = spec.partition("=")
    argv = cmd.split(",")
    t0 = time.monotonic()
    r, reports = (run_whole_scan if name in a.whole_scan else run_quiet)(argv)
    took = time.monotonic() - t0
    failure = None
    if r.returncode == 97 or reports:
        failure = "memcheck: " + " | ".join(reports[:12])
    elif r.returncode != 0:
        failure = f"exit status {r.returncode}: {r.stderr[-400:]}"
    print(f"{'FAIL' if failure else 'ok'}  {name}  ({took:.1f} s){'  ' + failure if failure else ''}")
    cases.append((name, took, failure))

failed = sum(1 for c in cases if c[2])
if a.results:
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "valgrind_tutorials.xml"), "w") as f:
        body = "".join(f'<testcase name="valgrind {escape(n)}" time="{t:.3f}">'
                       + (f'<failure message="{escape(x, {chr(34): "&quot;"})}"/>' if x else "") + "</testcase>"
                       for n, t, x in cases)
        f.write(f'<?xml version="1.0"?>\n<testsuites tests="{len(cases)}" failures="{failed}" disabled="0" errors="0">'
                f'<testsuite name="valgrind" tests="{len(cases)}" failures="{failed}">{body}</testsuite></testsuites>\n')
sys.exit(1 if failed else 0)
