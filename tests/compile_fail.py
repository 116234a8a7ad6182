#!/usr/bin/env python3
"""A compile-fail test: runs the compiler command after '--' and passes when
it fails with every --expect pattern (a regular expression) in its output."""
import argparse
import re
import subprocess
import sys

from slowdown import slow


def main():
    argv = sys.argv[1:]
    if '--' not in argv:
        sys.exit('usage: compile_fail.py --expect RE ... -- COMPILER ARGS...')
    cut = argv.index('--')
    parser = argparse.ArgumentParser()
    parser.add_argument('--expect', action='append', default=[])
    opts = parser.parse_args(argv[:cut])
    cmd = argv[cut + 1:]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=slow(300))
    out = r.stdout + r.stderr
    if r.returncode == 0:
        print('compiled, but must not:', ' '.join(cmd))
        return 1
    missing = [e for e in opts.expect if not re.search(e, out)]
    if missing:
        print(out)
        print('the compiler failed without saying:', missing)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
