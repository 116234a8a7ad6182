#!/usr/bin/env python3
"""Runs netns_prog with every rank in a network namespace of its own (fake
hosts that really are separate network stacks; see netns.py), mpirun in a
fourth one beside the bridge, MPI's traffic over TCP (btl tcp,self) on
198.18.0.0/24 only. Passes when the job exits 0 with every check of the
program passed, the three ranks printed three different network namespaces,
the agents' veths carried the job's bytes, and nothing is left: no
namespace, no process in them or of the program, no /dev/shm segment.

With KILL_EXE (kill_prog), a second job on the same hosts loses one: every
process in the second host's namespace is killed (SIGKILL) while tasks run.
mpirun must end non-zero within 5 s, no process be left in any namespace,
and what the driver printed be right.

  netns_test.py MPIRUN EXE [KILL_EXE]

Exits 77 (skipped) with the reason when this machine cannot make network
namespaces (not root, no iproute2).
"""
import os
import re
import selectors
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import netns  # noqa: E402
from leftovers import procs_running, shm_of  # noqa: E402
from slowdown import slow  # noqa: E402


def wait_empty(hosts):
    """Waits (up to slow(3) s) until no process runs in the namespaces;
    returns those still there."""
    stop = time.monotonic() + slow(3)
    left = hosts.leftovers()
    while left and time.monotonic() < stop:
        time.sleep(0.05)
        left = hosts.leftovers()
    return left


def lose_a_host(hosts, mpirun, exe, failures):
    """Runs kill_prog on the hosts and, once the driver printed 50 results,
    kills every process in the second host's namespace at once (its MPI
    daemon, its agent rank, that rank's fork server and workers): a host
    lost. The job must end non-zero within 5 s (scaled), leave no process in
    any namespace, and the driver's printed results must be right, each
    once. Returns the seconds from the kill to mpirun's exit, or None."""
    argv = hosts.mpirun_argv(mpirun, [exe, "--tasks", "2000", "--ms", "20"])
    env = {k: v for k, v in os.environ.items() if k != "FORKLIFT_CLUSTER_HOST"}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                         start_new_session=True, env=env)
    lines, results, killed_at, took = [], 0, None, None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + slow(60)
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                if p.poll() is not None:
                    break
                continue
            line = p.stdout.readline()
            if line == "":
                break
            lines.append(line)
            results += line.startswith("result ")
            if killed_at is None and results >= 50:
                victims = netns.pids_in(hosts.names[1])
                for pid in victims:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed_at = time.monotonic()
                print(f"killed every process of host {hosts.names[1]}: {victims}")
        p.wait(timeout=max(0.1, deadline - time.monotonic()))
        if killed_at is not None:
            took = time.monotonic() - killed_at
    except subprocess.TimeoutExpired:
        failures.append("the job with a lost host did not end")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        lines += p.stdout.readlines()
        sel.close()
        p.stdout.close()
    out = "".join(lines)
    print("\n".join(line for line in out.splitlines() if not line.startswith("result "))[-3000:])
    if killed_at is None:
        failures.append(f"the host was never killed ({results} results)")
    if p.returncode == 0:
        failures.append("mpirun exited 0 after a host was lost")
    if took is not None and took > slow(5):
        failures.append(f"mpirun ended {took:.2f} s after the host was lost (bound {slow(5):.1f} s)")
    seen = set()
    for m in re.finditer(r"^result (\d+) (-?\d+) rank (\d+)$", out, re.M):
        i, v = int(m.group(1)), int(m.group(2))
        if i in seen or v != i * i:
            failures.append(f"a wrong or repeated result after a host was lost: {m.group(0)}")
        seen.add(i)
    if len(seen) < 50:
        failures.append(f"only {len(seen)} results printed, 50 were read before the host was lost")
    left = wait_empty(hosts)
    if left:
        failures.append(f"processes left in the namespaces after a host was lost: {left}")
        for pids in left.values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    print(f"host lost: {len(seen)} results printed, mpirun exited {p.returncode}"
          + (f" {took:.2f} s after the kill" if took is not None else ""))
    return took


def main():
    mpirun, exe = sys.argv[1], sys.argv[2]
    kill_exe = sys.argv[3] if len(sys.argv) > 3 else None
    lost = None
    # meson's timeout sends SIGTERM: unwind, so the cleanup still runs
    # (and is not cut short by a second one).
    def on_term(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    try:
        netns.check_can_run()
    except netns.Skip as e:
        print(f"skipped: {e}")
        return 77
    failures = []
    # What a run killed before its cleanup leaves is removed by the next: a
    # namespace named for a process that is gone (a child that exited).
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    planted = f"fk{child}a"
    try:
        subprocess.run(["ip", "netns", "add", planted], check=True, timeout=30)
        gone = netns.remove_stale()
        print(f"removed namespaces of processes that are gone: {gone}")
        if planted not in gone or planted in netns.namespaces():
            failures.append(f"a stale namespace {planted} was not removed: {netns.namespaces()}")
    finally:
        if planted in netns.namespaces():
            subprocess.run(["ip", "netns", "del", planted], timeout=30)
    out = ""
    took = None
    with netns.Hosts(3) as hosts:
        argv = hosts.mpirun_argv(mpirun, [exe, "--tasks", "200"])
        print(" ".join(argv))
        t0 = time.monotonic()
        # The ranks' host names are their namespaces' (the rsh agent sets
        # them), not the one-machine seam's.
        env = {k: v for k, v in os.environ.items() if k != "FORKLIFT_CLUSTER_HOST"}
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env=env)
        try:
            out, _ = p.communicate(timeout=slow(60))
            took = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, _ = p.communicate()
            failures.append(f"the job did not end within {slow(60)} s")
        print(out)
        if p.returncode != 0:
            failures.append(f"mpirun exited {p.returncode}")
        m = re.search(r"^(\d+) passed, (\d+) failed$", out, re.M)
        if not m or m.group(2) != "0" or m.group(1) == "0":
            failures.append("the driver's checks did not all pass")
        named = re.findall(r"^rank (\d) host (\S+) netns (net:\[\d+\]) pid \d+$", out, re.M)
        ranks = {r: n for r, _, n in named}
        if sorted(h for _, h, _ in named) != sorted(hosts.names):
            failures.append(f"the ranks' host names are not the namespaces': {named}")
        if len(ranks) != 3 or len(set(ranks.values())) != 3:
            failures.append(f"the ranks did not report 3 different network namespaces: {ranks}")
        own = os.readlink("/proc/self/ns/net")
        if own in ranks.values():
            failures.append(f"a rank ran in the host's network namespace {own}")
        pids = {int(x) for x in re.findall(r" pid (\d+)$", out, re.M)}
        # A host's veth is its namespace's only way out: each one carried
        # the job's traffic (launch, MPI's wire-up and the tasks).
        moved = hosts.port_bytes()
        print(f"bytes through the bridge by host: {moved}")
        if any(b < 200 for b in moved.values()):
            failures.append(f"a host's veth carried (almost) nothing: {moved}")
        left = wait_empty(hosts)
        if left:
            failures.append(f"processes left in the namespaces: {left}")
        if kill_exe:
            lost = lose_a_host(hosts, mpirun, kill_exe, failures)
    left_ns = [ns for ns in netns.namespaces() if ns.startswith(hosts.base)]
    if left_ns:
        failures.append(f"namespaces left: {left_ns}")
    if os.path.exists(f"/etc/netns/{hosts.names[0]}"):
        failures.append("/etc/netns entries left")
    left = procs_running(exe)
    if left:
        failures.append(f"processes of {exe} left: {left}")
    segs = shm_of(pids)
    if segs:
        failures.append(f"/dev/shm segments left: {segs}")
    if kill_exe and procs_running(kill_exe):
        failures.append(f"processes of {kill_exe} left: {procs_running(kill_exe)}")
    if took is not None:
        print(f"figure: the 3-host job over separate network stacks took {took:.2f} s")
    if lost is not None:
        print(f"figure: a host lost (every process of its namespace killed) to mpirun's exit: {lost:.2f} s")
    for f in failures:
        print("FAILED:", f)
    print(f"{0 if failures else 1} passed, {1 if failures else 0} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
