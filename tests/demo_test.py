#!/usr/bin/env python3
"""The worker-manager demo (tutorial step 7) under the events it must survive.

  demo_test.py EXE [--results DIR]

- rounds: a bounded run finishes every job, right, and exits 0;
- sigint: Ctrl-C (SIGINT to the demo) ends it within slow(2) s with exit 0;
- sigkill: a worker killed with SIGKILL is reported and the others finish
  the jobs, its job included.
Each case also checks that no worker process and no /dev/shm segment of the
demo is left behind. Writes a GoogleTest-style XML file per case.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import time
from slowdown import slow
from xml.sax.saxutils import escape


def children_named(prefix):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().startswith(prefix):
                        found.append(int(pid))
            except OSError:
                pass
    return found


class Demo:
    def __init__(self, exe, *args):
        self.p = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines = []

    def wait_line(self, rx, timeout):
        r = re.compile(rx)
        end = time.monotonic() + slow(timeout)
        while time.monotonic() < end:
            line = self.p.stdout.readline()
            if not line:
                return None
            self.lines.append(line.rstrip("\n"))
            m = r.search(line)
            if m:
                return m
        return None

    def finish(self, timeout):
        try:
            out, err = self.p.communicate(timeout=slow(timeout))
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            return None, err
        self.lines += out.splitlines()
        return self.p.returncode, err


def leftovers(demo_pid, before):
    problems = []
    end = time.monotonic() + slow(2)
    left = set(children_named("worker-")) - before
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = set(children_named("worker-")) - before
    if left:
        problems.append(f"worker processes left: {sorted(left)}")
    segs = [s for s in os.listdir("/dev/shm") if s.startswith(f"fk.{demo_pid}.")]
    if segs:
        problems.append(f"segments left: {segs}")
    return problems


def case_rounds(exe):
    before = set(children_named("worker-"))
    d = Demo(exe, "--workers", "4", "--rounds", "40", "--size", "20000")
    code, err = d.finish(60)
    problems = []
    if code != 0:
        problems.append(f"exit {code}: {err[-2000:]}")
    results = [l for l in d.lines if l.startswith("result of job")]
    if len(results) < 40:
        problems.append(f"{len(results)} result lines, wanted 40")
    if any("WRONG" in l for l in results):
        problems.append("a wrong result")
    if not any(re.match(r"summary: 4\d jobs done, 0 wrong, 4 workers left", l) for l in d.lines):
        problems.append("no summary line with 40+ jobs, 0 wrong, 4 workers")
    return problems + leftovers(d.p.pid, before)


def case_sigint(exe):
    before = set(children_named("worker-"))
    d = Demo(exe, "--workers", "4", "--rounds", "0", "--seconds", "60", "--size", "20000")
    problems = []
    if not d.wait_line(r"^result of job", 30):
        problems.append("no result within 30 s")
    t0 = time.monotonic()
    d.p.send_signal(signal.SIGINT)
    code, err = d.finish(10)
    took = time.monotonic() - t0
    if code != 0:
        problems.append(f"exit {code} after SIGINT: {(err or '')[-2000:]}")
    if took > slow(2):
        problems.append(f"took {took:.2f} s to end after SIGINT")
    if not any(l.startswith("summary:") for l in d.lines):
        problems.append("no summary line")
    return problems + leftovers(d.p.pid, before)


def case_sigkill(exe):
    before = set(children_named("worker-"))
    d = Demo(exe, "--workers", "4", "--rounds", "400", "--size", "20000")
    problems = []
    m = d.wait_line(r"^worker-2 started, pid (\d+)$", 30)
    if not m:
        problems.append("no pid for worker-2")
        d.p.kill()
        d.finish(5)
        return problems
    if not d.wait_line(r"^result of job 20 ", 30):
        problems.append("no 20th result")
    os.kill(int(m.group(1)), signal.SIGKILL)
    code, err = d.finish(60)
    if code != 0:
        problems.append(f"exit {code}: {(err or '')[-2000:]}")
    if not any(re.match(r"^worker-2 ended: killed by SIGKILL; 3 workers left$", l) for l in d.lines):
        problems.append("the death of worker-2 was not reported")
    if not any(re.match(r"summary: 4\d\d jobs done, 0 wrong, 3 workers left", l) for l in d.lines):
        problems.append("the others did not finish all 400 jobs")
    return problems + leftovers(d.p.pid, before)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("exe")
    ap.add_argument("--results", default="")
    a = ap.parse_args()
    failed = 0
    cases = [("demo_rounds", case_rounds), ("demo_sigint", case_sigint), ("demo_sigkill", case_sigkill)]
    xml = []
    for name, fn in cases:
        t0 = time.monotonic()
        try:
            problems = fn(a.exe)
        except Exception as e:  # a broken case is a failure, not a crash of the runner
            problems = [f"{type(e).__name__}: {e}"]
        took = time.monotonic() - t0
        status = "ok" if not problems else "FAIL"
        print(f"{status} {name} ({took:.2f} s)")
        for p in problems:
            print(f"  {p}")
        failed += bool(problems)
        body = "".join(f'<failure message="{escape(p, {chr(34): "&quot;"})}"/>' for p in problems)
        xml.append(f'<testcase name="{name}" time="{took:.3f}">{body}</testcase>')
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        with open(os.path.join(a.results, "demo_test.xml"), "w") as f:
            f.write(f'<?xml version="1.0"?>\n<testsuites tests="{len(cases)}" failures="{failed}" disabled="0" '
                    f'errors="0"><testsuite name="demo" tests="{len(cases)}" failures="{failed}">'
                    + "".join(xml) + "</testsuite></testsuites>\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
