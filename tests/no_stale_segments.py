#!/usr/bin/env python3
"""Runs last: after the whole suite, /dev/shm holds no forklift segment whose
creator is gone. Every test process has exited by now, so a segment a test
leaked shows up here with a dead creator. Writes a GoogleTest-style XML file.

  no_stale_segments.py [--results DIR]
"""
import os
import sys


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main():
    results = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--results" else ""
    stale = []
    for name in sorted(os.listdir("/dev/shm")):
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "fk" and parts[1].isdigit() and not alive(int(parts[1])):
            stale.append(name)
    for s in stale:
        print(f"stale forklift segment: /dev/shm/{s}")
    print(f"{'FAIL' if stale else 'ok'}: {len(stale)} stale forklift segments in /dev/shm")
    if results:
        os.makedirs(results, exist_ok=True)
        body = "".join(f'<failure message="stale /dev/shm/{s}"/>' for s in stale)
        with open(os.path.join(results, "no_stale_segments.xml"), "w") as f:
            f.write(f'<?xml version="1.0"?>\n<testsuites tests="1" failures="{1 if stale else 0}" disabled="0" '
                    f'errors="0"><testsuite name="leaks" tests="1" failures="{1 if stale else 0}">'
                    f'<testcase name="no_stale_segments">{body}</testcase></testsuite></testsuites>\n')
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
