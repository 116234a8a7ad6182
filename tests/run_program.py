#!/usr/bin/env python3
"""Runs a tutorial (or any) program and checks what it prints.

  run_program.py NAME EXE [--arg A]... [--expect REGEX]... [--proc NAME]
                 [--timeout S] [--results DIR]

Passes when the program exits 0 within the timeout, every --expect regex
matches a line of its stdout in the given order, no process named --proc
(its backends' name) is left running, and no /dev/shm/fk.<pid>.* segment of
the program is left behind. Writes a GoogleTest-style XML file so the suite's
summary counts it.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from slowdown import slow
from xml.sax.saxutils import escape


def procs_named(name):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == name[:15]:
                    found.append(int(pid))
        except OSError:
            pass
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("exe")
    ap.add_argument("--arg", action="append", default=[])
    ap.add_argument("--expect", action="append", default=[])
    ap.add_argument("--proc", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--results", default=os.environ.get("FORKLIFT_TEST_RESULTS", ""))
    a = ap.parse_args()
    a.timeout = slow(a.timeout)

    before = {n: set(procs_named(n)) for n in a.proc}
    failures = []
    t0 = time.monotonic()
    p = subprocess.Popen([a.exe] + a.arg, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        failures.append(f"did not finish within {a.timeout} s")
    took = time.monotonic() - t0
    if p.returncode != 0:
        failures.append(f"exit status {p.returncode}")
    lines = out.splitlines()
    i = 0
    for rx in a.expect:
        r = re.compile(rx)
        while i < len(lines) and not r.search(lines[i]):
            i += 1
        if i == len(lines):
            failures.append(f"no line matching {rx!r} (in order)")
            break
        i += 1
    deadline = time.monotonic() + slow(2)
    for n in a.proc:
        while True:
            left = set(procs_named(n)) - before[n]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if left:
            failures.append(f"processes named {n!r} left behind: {sorted(left)}")
    segs = [s for s in os.listdir("/dev/shm") if s.startswith(f"fk.{p.pid}.")]
    if segs:
        failures.append(f"segments left in /dev/shm: {segs}")

    sys.stdout.write(out)
    sys.stderr.write(err)
    for f in failures:
        print(f"FAIL {a.name}: {f}", file=sys.stderr)
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        with open(os.path.join(a.results, f"{a.name}.xml"), "w") as f:
            n = 1 if failures else 0
            body = "".join(f'<failure message="{escape(x, {chr(34): "&quot;"})}"/>' for x in failures)
            f.write(f'<?xml version="1.0"?>\n<testsuites tests="1" failures="{n}" disabled="0" errors="0">'
                    f'<testsuite name="programs" tests="1" failures="{n}">'
                    f'<testcase name="{escape(a.name)}" time="{took:.3f}">{body}</testcase>'
                    f'</testsuite></testsuites>\n')
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
