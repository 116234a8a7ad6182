"""Driver of forklift's benchmark peers (started by bench/peers/run).

Builds the iceoryx peer if needed, runs the python-valkka peer, starts RouDi,
runs the iceoryx peer figure by figure, stops RouDi and removes what it and
the peers leave behind, then writes one JSON document:

  {"placement": "...", "cpus": [0, 1],
   "results": [{"figure": "rtt_small", "contender": "python-valkka",
                "stat": "median", "value": 63.2, "unit": "us"}, ...],
   "errors": ["..."]}

"errors" is empty when every peer ran; the exit status is then 0, else 1 (the
JSON is written in both cases). Progress goes to stderr.
"""

import argparse
import ctypes
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PYTHON = "/usr/bin/python3"  # Debian's, where python3-numpy lives
ROUDI_READY = "RouDi is ready for clients"

# figure label, bytes, warm-up, iterations (scaled by --scale)
IOX_HANDOFFS = [
    ("64KiB", 64 << 10, 200, 3000),
    ("1MiB", 1 << 20, 30, 400),
    ("16MiB", 16 << 20, 5, 60),
    ("128MiB", 128 << 20, 3, 12),
]


def log(*args):
    print("peers:", *args, file=sys.stderr, flush=True)


class PeerError(Exception):
    pass


def run_group(cmd, timeout, what, env=None):
    """Run cmd in its own process group and return its (stdout, stderr).
    Output goes to temporary files, not pipes, so a straggler that keeps them
    open cannot hold us; when the leader has exited, or on timeout, whatever
    is left of the group is ended."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True, env=env)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            end_group(proc)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        raise PeerError("%s: timed out after %d s; stderr tail: %s" % (what, timeout, tail(stderr)))
    if proc.returncode != 0:
        raise PeerError("%s: exit status %s; stderr tail: %s" % (what, proc.returncode, tail(stderr)))
    return stdout, stderr


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def end_group(proc):
    """TERM then KILL what is left of the process group we created for proc
    (its pgid is its pid); nothing is sent when the group is already empty."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        reap_group(proc)
        if not group_alive(proc.pid):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            reap_group(proc)
            if not group_alive(proc.pid):
                return
            time.sleep(0.05)


def reap_group(proc):
    """Reap the leader, then any orphan of its group that was reparented to us
    (we are a child subreaper), so an empty group reads as gone."""
    proc.poll()
    while True:
        try:
            pid, _ = os.waitpid(-proc.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def tail(text, n=600):
    text = (text or "").strip()
    return text[-n:] if text else "(empty)"


# --------------------------------------------------------------------------
def build_iceoryx(build_dir):
    """meson + ninja, standalone project in bench/peers/iceoryx."""
    bdir = os.path.join(build_dir, "iceoryx")
    if not os.path.exists(os.path.join(bdir, "build.ninja")):
        log("configuring the iceoryx peer in", bdir)
        run_group(["meson", "setup", bdir, os.path.join(HERE, "iceoryx")], 300, "meson setup")
    run_group(["ninja", "-C", bdir], 300, "ninja (iceoryx peer)")
    exe = os.path.join(bdir, "iox_peer")
    if not os.access(exe, os.X_OK):
        raise PeerError("iox_peer was not built")
    return exe


def run_valkka(args, front, back):
    log("python-valkka: running (frontend CPU %d, backend CPU %d)" % (front, back))
    cmd = [PYTHON, os.path.join(HERE, "valkka_mechanism.py"), "--cpus", "%d,%d" % (front, back),
           "--scale", str(args.scale)]
    out, err = run_group(cmd, 240, "python-valkka peer")
    sys.stderr.write(err)
    doc = json.loads(out)
    return doc["results"]


class RouDi:
    """Our own iox-roudi: started with our config, stopped and cleaned up."""

    def __init__(self, build_dir):
        self.log_path = os.path.join(build_dir, "roudi.log")
        self.proc = None

    def start(self):
        exe = shutil.which("iox-roudi") or "/usr/bin/iox-roudi"
        if os.path.exists("/dev/shm/iceoryx_mgmt"):
            raise PeerError("/dev/shm/iceoryx_mgmt exists: another RouDi may be running; not starting ours")
        config = os.path.join(HERE, "roudi_config.toml")
        logf = open(self.log_path, "w")
        log("starting", exe, "-c", config)
        self.proc = subprocess.Popen([exe, "-c", config, "-l", "warning"], stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        logf.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(self.log_path, errors="replace") as f:
                if ROUDI_READY in f.read():
                    return
            if self.proc.poll() is not None:
                raise PeerError("iox-roudi exited (%d) before it was ready: %s"
                                % (self.proc.returncode, tail(open(self.log_path).read())))
            time.sleep(0.05)
        raise PeerError("iox-roudi was not ready within 30 s")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # RouDi's orderly shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                end_group(self.proc)
                self.proc.wait()
        log("iox-roudi stopped (status %d)" % self.proc.returncode)
        self.proc = None


class Leftovers:
    """Remembers /dev/shm and /tmp before the peers run; afterwards removes
    what RouDi, the iceoryx runtimes and the valkka segments left, and only
    names that were not there before and that belong to iceoryx or to us:
    RouDi's segments iceoryx_mgmt and <user>, its /tmp/roudi socket and locks,
    and fl_peer_* (runtime sockets, valkka shared memory)."""

    def __init__(self):
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.before_shm = set(os.listdir("/dev/shm"))
        self.before_tmp = set(os.listdir("/tmp"))

    def clean(self):
        removed = []
        for name in set(os.listdir("/dev/shm")) - self.before_shm:
            if name in ("iceoryx_mgmt", self.user) or name.startswith("fl_peer_"):
                removed.append("/dev/shm/" + name)
        for name in set(os.listdir("/tmp")) - self.before_tmp:
            if name in ("roudi", "roudi.lock", "iox-unique-roudi.lock") or name.startswith("fl_peer_"):
                removed.append("/tmp/" + name)
        for path in removed:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if removed:
            log("removed leftovers:", " ".join(sorted(removed)))


def run_iceoryx(args, exe, roudi, front, back):
    results = []
    cpus = "%d,%d" % (front, back)

    def scaled(n, minimum):
        return str(max(minimum, int(n * args.scale)))

    roudi.start()
    jobs = [("rtt_small", ["rtt", "--warmup", scaled(1000, 10), "--iters", scaled(20000, 100)])]
    # Busy-polling needs a CPU per side: on a shared one each side spins
    # through its whole time slice, so it runs only when they differ.
    if front != back:
        jobs.append(("rtt_small_busy", ["rtt", "--busy", "--warmup", scaled(1000, 10), "--iters",
                                        scaled(20000, 100)]))
    for label, nbytes, warm, iters in IOX_HANDOFFS:
        jobs.append(("handoff_" + label, ["handoff", "--bytes", str(nbytes), "--warmup", scaled(warm, 3),
                                          "--iters", scaled(iters, 3)]))
    errors = []
    for figure, argv in jobs:
        log("iceoryx: %s (frontend CPU %d, backend CPU %d)" % (figure, front, back))
        try:
            out, _ = run_group([exe] + argv + ["--cpus", cpus], 120, "iceoryx " + figure)
        except PeerError as e:
            errors.append(str(e))
            log("FAILED:", e)
            continue
        for line in out.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            r["contender"] = "iceoryx"
            r = {k: r[k] for k in ("figure", "contender", "stat", "value", "unit")}
            results.append(r)
            log("  %-15s %-6s %12.4f %s" % (r["figure"], r["stat"], r["value"], r["unit"]))
    return results, errors


def main():
    ap = argparse.ArgumentParser(prog="bench/peers/run",
                                 description="Run forklift's benchmark peers and print their figures as JSON.")
    ap.add_argument("--out", metavar="FILE", help="write the JSON here instead of stdout")
    ap.add_argument("--cpus", default="0,1", metavar="A,B",
                    help="frontend (parent, publisher) CPU A and backend (child, subscriber) CPU B; default 0,1")
    ap.add_argument("--same-cpu", action="store_true", help="put both sides on CPU A")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every iteration count (0.1 for a quick smoke run)")
    ap.add_argument("--build-dir", default=os.path.join(REPO, "build-peers"),
                    help="where the iceoryx peer is built and RouDi logs (default: build-peers/ in the repo)")
    ap.add_argument("--only", choices=["python-valkka", "iceoryx"], help="run just one contender")
    ap.add_argument("--iox-peer", metavar="EXE",
                    help="use this iox_peer (e.g. from forklift's own meson build) instead of building one")
    args = ap.parse_args()

    try:
        front, back = (int(c) for c in args.cpus.split(","))
    except ValueError:
        ap.error("--cpus wants two CPU numbers, like 0,1")
    if args.same_cpu:
        back = front
    allowed = os.sched_getaffinity(0)
    for c in (front, back):
        if c not in allowed:
            ap.error("CPU %d is not available here (allowed: %s)" % (c, sorted(allowed)))
    placement = ("frontend (parent / publisher) on CPU %d, backend (child / subscriber) on CPU %d"
                 % (front, back))
    os.makedirs(args.build_dir, exist_ok=True)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    # Orphans of the peers (a backend whose frontend died) become our children,
    # so end_group can find and reap them.
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    t0 = time.monotonic()
    log(placement)
    results, errors = [], []
    leftovers = Leftovers()
    try:
        if args.only in (None, "python-valkka"):
            try:
                results += run_valkka(args, front, back)
            except (PeerError, ValueError, KeyError) as e:
                errors.append("python-valkka: %s" % e)
                log("FAILED:", e)

        if args.only in (None, "iceoryx"):
            roudi = RouDi(args.build_dir)
            try:
                exe = os.path.abspath(args.iox_peer) if args.iox_peer else build_iceoryx(args.build_dir)
                r, errs = run_iceoryx(args, exe, roudi, front, back)
                results += r
                errors += ["iceoryx: " + e for e in errs]
            except PeerError as e:
                errors.append("iceoryx: %s" % e)
                log("FAILED:", e)
            finally:
                roudi.stop()
    finally:
        leftovers.clean()

    doc = {"placement": placement, "cpus": [front, back], "results": results, "errors": errors}
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        log("wrote", args.out)
    else:
        sys.stdout.write(text)
    log("done in %.1f s%s" % (time.monotonic() - t0, ", with errors" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
