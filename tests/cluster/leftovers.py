"""What a cluster test's job may leave behind, found the same way by every
test: the processes running a program (ranks, fork servers, workers: by the
file they execute, not by command line, which a compiler building it would
match too) and the named segments (/dev/shm/fk.<pid>.*) of some pids."""
import os
import re


def procs_running(exe):
    real = os.path.realpath(exe)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.realpath(f"/proc/{pid}/exe") == real:
                found.append(int(pid))
        except OSError:
            pass
    return found


def shm_of(pids):
    """Named segments (/dev/shm/fk.<pid>.*) made by any of `pids`."""
    names = []
    for name in os.listdir("/dev/shm"):
        m = re.match(r"^fk\.(\d+)\.", name)
        if m and int(m.group(1)) in pids:
            names.append(name)
    return names
