#!/usr/bin/python3
"""The valkka-multiprocess mechanism, rebuilt for forklift's benchmarks.

This is our own small re-implementation of how valkka-multiprocess works, made
from its description (it does not import the library):

* ``MessageProcess`` is a ``multiprocessing.Process`` started with the *fork*
  start method. The frontend (the main process) and the backend (the forked
  child) talk over one duplex ``multiprocessing.Pipe``.
* Commands are pickled ``MessageObject(command, **kwargs)`` instances. The
  backend loop ``select``s on its end of the pipe and dispatches each message
  to the method ``c__<command>(**kwargs)``. Replies come back over the pipe.
* Bulk data goes through ``multiprocessing.shared_memory.SharedMemory`` seen as
  a numpy array: the server side is created in the frontend, the client side is
  opened by name in the backend (in ``preRun__``, i.e. after the fork). The
  handoff is signalled with a command over the pipe and answered over the pipe.

Run it to measure the figures forklift compares itself with (one invocation):
rtt_small, send_rate, start_ready, stop and handoff_<size>. It prints a JSON
document on stdout and progress on stderr. The frontend is pinned to the first
CPU of --cpus and the backend to the second.
"""

import argparse
import json
import multiprocessing
import os
import select
import signal
import statistics
import sys
import time
from multiprocessing import shared_memory

import numpy as np

CONTENDER = "python-valkka"
_ctx = multiprocessing.get_context("fork")


def log(*args):
    print("valkka:", *args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The mechanism
# --------------------------------------------------------------------------
class MessageObject:
    """A command with named arguments, pickled through the pipe."""

    def __init__(self, command, **kwargs):
        self.command = command
        self.kwargs = kwargs

    def __call__(self):
        return self.command

    def __getitem__(self, key):
        return self.kwargs[key]

    def __str__(self):
        return "<MessageObject %s %s>" % (self.command, self.kwargs)


class MessageProcess(_ctx.Process):
    """Frontend methods are plain; backend methods end in ``__`` or start
    with ``c__`` (command handlers, run in the forked child)."""

    select_timeout = 1.0

    def __init__(self, name="MessageProcess", cpu=None):
        super().__init__(name=name, daemon=True)
        self.cpu = cpu
        # made before the fork, so both sides have both ends
        self.front_pipe, self.back_pipe = _ctx.Pipe(duplex=True)
        self.loop = False

    # ---------------------------------------------------------- backend
    def run(self):
        self.frontend_pid = os.getppid()
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        self.preRun__()
        self.send_out__(MessageObject("ready", pid=os.getpid()))
        self.loop = True
        try:
            while self.loop:
                ready, _, _ = select.select([self.back_pipe], [], [], self.select_timeout)
                if not ready:
                    self.idle__()
                    continue
                try:
                    msg = self.back_pipe.recv()
                except EOFError:  # the frontend is gone
                    break
                self.route__(msg)
        finally:
            self.postRun__()

    def route__(self, msg):
        handler = getattr(self, "c__" + msg.command, None)
        if handler is None:
            print("backend: unknown command", msg.command, file=sys.stderr)
            return
        handler(**msg.kwargs)

    def send_out__(self, msg):
        self.back_pipe.send(msg)

    def preRun__(self):
        pass

    def postRun__(self):
        pass

    def idle__(self):
        if os.getppid() != self.frontend_pid:  # orphaned: leave
            self.loop = False

    def c__stop(self):
        self.loop = False

    # ---------------------------------------------------------- frontend
    def send_to_back(self, msg):
        self.front_pipe.send(msg)

    def recv_from_back(self, timeout=30.0):
        if not self.front_pipe.poll(timeout):
            raise TimeoutError("no answer from the backend of %s" % self.name)
        return self.front_pipe.recv()

    def wait_ready(self, timeout=30.0):
        msg = self.recv_from_back(timeout)
        if msg.command != "ready":
            raise RuntimeError("expected ready, got %s" % msg)
        return msg

    def stop(self, timeout=30.0):
        self.send_to_back(MessageObject("stop"))
        self.join(timeout)
        if self.is_alive():
            self.terminate()
            self.join(5)
            raise RuntimeError("backend of %s did not stop" % self.name)


class BenchProcess(MessageProcess):
    """The backend used by the benchmarks."""

    def __init__(self, name="BenchProcess", cpu=None, shm_name=None, n=0):
        super().__init__(name=name, cpu=cpu)
        self.shm_name = shm_name
        self.n = n

    # backend
    def preRun__(self):
        self.count = 0
        self.shm = None
        self.arr = None
        if self.shm_name is not None:
            # client side: open the frontend's segment by name
            self.shm = shared_memory.SharedMemory(name=self.shm_name, create=False)
            self.arr = np.ndarray((self.n,), dtype=np.float64, buffer=self.shm.buf)

    def postRun__(self):
        if self.shm is not None:
            self.arr = None
            self.shm.close()

    def c__ping(self, parameter=None):
        self.send_out__(MessageObject("pong", parameter=parameter))

    def c__count(self):
        self.count += 1

    def c__report(self):
        self.send_out__(MessageObject("counted", count=self.count))
        self.count = 0

    def c__check(self, value=None):
        total = float(self.arr.sum())  # reads every element
        self.send_out__(MessageObject("checked", ok=(total == value * self.n)))

    # frontend
    def ping(self, parameter):
        self.send_to_back(MessageObject("ping", parameter=parameter))
        return self.recv_from_back()


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------
def percentile(values, q):
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class Bench:
    def __init__(self, cpu_front, cpu_back, scale):
        self.cpu_front = cpu_front
        self.cpu_back = cpu_back
        self.scale = scale
        self.results = []
        self.live = []  # processes to clean up
        self.segments = []  # shared memory to unlink

    def n(self, count, minimum=3):
        return max(minimum, int(count * self.scale))

    def add(self, figure, stat, value, unit):
        self.results.append({"figure": figure, "contender": CONTENDER, "stat": stat,
                             "value": round(value, 4), "unit": unit})
        log("%-15s %-6s %12.4f %s" % (figure, stat, value, unit))

    def start(self, **kwargs):
        p = BenchProcess(cpu=self.cpu_back, **kwargs)
        self.live.append(p)
        p.start()
        p.wait_ready()
        return p

    def stop(self, p):
        p.stop()
        self.live.remove(p)

    def rtt_small(self):
        p = self.start(name="rtt")
        warm, iters = self.n(1000), self.n(20000, 100)
        lat = []
        clock = time.perf_counter_ns
        for i in range(warm + iters):
            t0 = clock()
            reply = p.ping("gotcha!")
            t1 = clock()
            if reply.command != "pong" or reply["parameter"] != "gotcha!":
                raise RuntimeError("bad reply %s" % reply)
            if i >= warm:
                lat.append((t1 - t0) / 1e3)
        self.stop(p)
        self.add("rtt_small", "median", statistics.median(lat), "us")
        self.add("rtt_small", "p99", percentile(lat, 0.99), "us")

    def send_rate(self):
        p = self.start(name="send")
        count = self.n(50000, 1000)
        rates = []
        for rep in range(4):  # the first one is a warm-up
            msg_count = MessageObject("count")
            t0 = time.perf_counter_ns()
            for _ in range(count):
                p.send_to_back(msg_count)
            p.send_to_back(MessageObject("report"))
            reply = p.recv_from_back()
            t1 = time.perf_counter_ns()
            if reply["count"] != count:
                raise RuntimeError("backend counted %s of %s" % (reply["count"], count))
            if rep > 0:
                rates.append(count / ((t1 - t0) / 1e9))
        self.stop(p)
        self.add("send_rate", "median", statistics.median(rates), "msg/s")

    def start_stop(self):
        starts = self.n(30, 5)
        ready_us, stop_us = [], []
        for _ in range(starts):
            p = BenchProcess(name="startstop", cpu=self.cpu_back)
            self.live.append(p)
            t0 = time.perf_counter_ns()
            p.start()
            p.wait_ready()
            t1 = time.perf_counter_ns()
            time.sleep(0.01)  # let the backend go idle in select()
            t2 = time.perf_counter_ns()
            p.stop()
            t3 = time.perf_counter_ns()
            self.live.remove(p)
            ready_us.append((t1 - t0) / 1e3)
            stop_us.append((t3 - t2) / 1e3)
        self.add("start_ready", "median", statistics.median(ready_us), "us")
        self.add("stop", "median", statistics.median(stop_us), "us")

    def handoff(self, label, nbytes, warm, iters):
        n = nbytes // 8
        name = "fl_peer_valkka_%d_%s" % (os.getpid(), label)
        # server side, created in the frontend before the fork
        shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        self.segments.append(shm)
        arr = np.ndarray((n,), dtype=np.float64, buffer=shm.buf)
        arr[:] = 0.0
        p = self.start(name="handoff", shm_name=name, n=n)
        times = []
        clock = time.perf_counter_ns
        for i in range(warm + iters):
            value = float(i % 1000 + 1)
            t0 = clock()
            arr[:] = value  # fill in place
            p.send_to_back(MessageObject("check", value=value))
            reply = p.recv_from_back()
            t1 = clock()
            if not reply["ok"]:
                raise RuntimeError("backend read a wrong value in %s" % label)
            if i >= warm:
                times.append((t1 - t0) / 1e9)
        self.stop(p)
        del arr
        self.release(shm)
        self.add("handoff_" + label, "median", nbytes / statistics.median(times) / 1e9, "GB/s")

    def release(self, shm):
        self.segments.remove(shm)
        shm.close()
        shm.unlink()

    def cleanup(self):
        for p in list(self.live):
            if p.is_alive():
                p.terminate()
            p.join(5)
        self.live.clear()
        for shm in list(self.segments):
            try:
                shm.close()
            except BufferError:
                pass
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        self.segments.clear()


HANDOFFS = [  # label, bytes, warm-up, iterations
    ("64KiB", 64 << 10, 200, 3000),
    ("1MiB", 1 << 20, 30, 400),
    ("16MiB", 16 << 20, 4, 60),
    ("128MiB", 128 << 20, 2, 12),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpus", default="0,1", help="frontend,backend CPUs (default 0,1)")
    ap.add_argument("--same-cpu", action="store_true", help="put both sides on the frontend CPU")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply iteration counts (e.g. 0.1 for a smoke run)")
    args = ap.parse_args()
    front, back = (int(c) for c in args.cpus.split(","))
    if args.same_cpu:
        back = front

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    os.sched_setaffinity(0, {front})
    bench = Bench(front, back, args.scale)
    placement = "frontend CPU %d, backend CPU %d" % (front, back)
    log(placement)
    try:
        bench.rtt_small()
        bench.send_rate()
        bench.start_stop()
        for label, nbytes, warm, iters in HANDOFFS:
            bench.handoff(label, nbytes, bench.n(warm, 1), bench.n(iters, 3))
    finally:
        bench.cleanup()
    json.dump({"placement": placement, "results": bench.results}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
