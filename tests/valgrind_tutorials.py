#!/usr/bin/env python3
"""Every tutorial program under valgrind's memcheck: no invalid access, no
use of uninitialised memory, no definite leak, in the frontend and in its
forked backends (memcheck follows a fork). Valgrind knows no pidfd_open, so
this also runs forklift's death-pipe fallback for real.

  valgrind_tutorials.py --results DIR NAME=EXE[,ARG...] ...
"""
import argparse
import os
import subprocess
import sys
import time
from xml.sax.saxutils import escape

ap = argparse.ArgumentParser()
ap.add_argument("--results")
ap.add_argument("programs", nargs="+")
a = ap.parse_args()

cases = []
for spec in a.programs:
    name, _, cmd = spec.partition("=")
    argv = cmd.split(",")
    t0 = time.monotonic()
    r = subprocess.run(["valgrind", "--error-exitcode=97", "--leak-check=full", "--errors-for-leak-kinds=definite", "--show-leak-kinds=definite",
                        "-q", *argv], capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    reports = [l for l in r.stderr.splitlines() if l.startswith("==")]
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
