"""The Python tests' side of tests/support.hpp's slow(): a bound on how long
something may take (a wait that must end, a limit on elapsed time) is
slow(x) seconds, x holding at least 3 times over on the machines the suite
is tuned on, scaled by FORKLIFT_TEST_SLOWDOWN (a number >= 1, default 1).
Times that are the behaviour under test, and pacing sleeps, are not scaled.
"""
import os


def _factor():
    v = os.environ.get("FORKLIFT_TEST_SLOWDOWN", "")
    if not v:
        return 1.0
    try:
        f = float(v)
    except ValueError:
        f = 0.0
    if not 1.0 <= f <= 1000.0:
        raise SystemExit(f"FORKLIFT_TEST_SLOWDOWN={v}: expected a number from 1 to 1000")
    return f


FACTOR = _factor()


def slow(seconds):
    return seconds * FACTOR
