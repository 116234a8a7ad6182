"""Python backends: forklift.MessageProcess subclasses whose backend is a fork of the interpreter."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import forklift

SLOW = float(os.environ.get("FORKLIFT_TEST_SLOWDOWN", "1"))

# Set by Python's at-fork hook in a forked child: a backend must run it
# (PyOS_AfterFork_Child), as os.fork() does.
FORKED_AS = None


def _after_in_child():
    global FORKED_AS
    FORKED_AS = os.getpid()


os.register_at_fork(after_in_child=_after_in_child)


class Pinger(forklift.MessageProcess):
    def preRun__(self):
        self.started_in = os.getpid()

    def c__ping(self, x):
        return x + 1

    def c__where(self):
        return os.getpid()

    def c__started_in(self):
        return self.started_in

    def c__raise(self, text):
        raise ValueError(text)

    def c__sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def c__frames(self, n):
        for i in range(n):
            self.sendOut__("frame", index=i, pixels=np.full((2, 3), i, dtype=np.uint16))

    def c__total(self, array):
        return float(np.asarray(array).sum())

    def c__nothing(self):
        return {1, 2}  # a set has no forklift form

    def c__tick(self, n, period):
        count = [0]

        def tick():
            count[0] += 1
            self.sendOut__("tick", n=count[0])
            if count[0] == n:
                self.cancel__(timer)
                self.after__(0, lambda: self.sendOut__("done"))
        timer = self.every__(period, tick)
        return timer

    def c__quit(self):
        self.stopLoop__()

    def c__forked_as(self):
        return FORKED_AS

    def c__call_myself(self):
        return self.call("ping", x=1)  # a frontend method, on the backend side


@pytest.fixture
def pinger():
    p = Pinger("pinger")
    p.start()
    yield p
    p.stop(timeout=1.0)


def test_handlers_run_in_the_fork_with_their_fields(pinger):
    assert pinger.call("ping", x=41) == 42
    assert pinger.call("where") == pinger.pid != os.getpid()
    assert pinger.call("started_in") == pinger.pid  # preRun__ ran in the backend
    assert pinger.call("total", array=np.arange(5, dtype=np.float32)) == 10.0
    assert [pinger.call_async("ping", x=i).result(5 * SLOW) for i in range(5)] == [1, 2, 3, 4, 5]


def test_the_backend_ran_pythons_at_fork_hooks(pinger):
    assert pinger.call("forked_as") == pinger.pid
    assert FORKED_AS is None  # not in the frontend


def test_a_frontend_method_in_a_handler_raises_at_once(pinger):
    with pytest.raises(forklift.RemoteError, match="call"):
        pinger.call("call_myself", timeout=5 * SLOW)
    assert pinger.call("ping", x=2) == 3


def test_four_python_threads_call_one_python_backend(pinger):
    errors = []

    def worker(k):
        try:
            for i in range(25):
                assert pinger.call("ping", x=k * 100 + i) == k * 100 + i + 1
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30 * SLOW)
    assert not errors and not any(t.is_alive() for t in threads)


def test_a_raising_handler_is_a_remote_error_and_the_backend_serves_on(pinger):
    with pytest.raises(forklift.RemoteError, match="ValueError: no good"):
        pinger.call("raise", text="no good")
    with pytest.raises(forklift.RemoteError, match="x"):
        pinger.call("ping")  # a missing field: Python's TypeError, in the backend
    with pytest.raises(forklift.RemoteError, match="set"):
        pinger.call("nothing")
    with pytest.raises(forklift.RemoteError, match="nosuch"):
        pinger.call("nosuch")
    assert pinger.call("ping", x=1) == 2


def test_send_out_reaches_recv(pinger):
    pinger.send("frames", n=3)
    for i in range(3):
        cmd, fields = pinger.recv(timeout=5 * SLOW)
        assert cmd == "frame" and fields["index"] == i and (fields["pixels"] == i).all()
        assert fields["pixels"].dtype == np.uint16


def test_send_out_and_timers_on_the_frontend_side_are_refused(pinger):
    with pytest.raises(forklift.Error, match="sendOut__"):
        pinger.sendOut__("frame", index=0)
    with pytest.raises(forklift.Error, match="after__"):
        pinger.after__(0, lambda: None)


def test_timers_in_the_backend(pinger):
    pinger.call("tick", n=3, period=0.01)
    got = [pinger.recv(timeout=5 * SLOW) for _ in range(4)]
    assert got == [("tick", {"n": 1}), ("tick", {"n": 2}), ("tick", {"n": 3}), ("done", {})]
    assert pinger.recv(timeout=0.1) is None  # cancelled
    with pytest.raises(forklift.RemoteError, match="1 ms"):
        pinger.call("tick", n=1, period=0)
    assert pinger.call("ping", x=1) == 2


def test_stop_loop_ends_the_backend_cleanly(pinger):
    pinger.call("quit")
    status = pinger.wait_stop(timeout=5 * SLOW)
    assert status.ok, str(status)
    with pytest.raises(forklift.PeerClosed):
        pinger.recv(timeout=1)


def test_sigkill_mid_call_is_process_died_within_a_second(pinger):
    timer = threading.Timer(0.2, os.kill, (pinger.pid, signal.SIGKILL))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(forklift.ProcessDied) as info:
            pinger.call("sleep", seconds=30, timeout=60)
    finally:
        timer.join()
    assert time.monotonic() - t0 < 0.2 + 1.0 * SLOW
    assert info.value.status.signal == signal.SIGKILL


def test_stop_runs_post_run_and_exits_cleanly():
    with Pinger("clean") as p:
        assert p.call("ping", x=0) == 1
    s = p.stop()
    assert s.ok, str(s)


def test_start_from_another_thread_is_refused():
    p = Pinger("threaded")
    errors = []

    def run():
        try:
            p.start()
        except forklift.Error as e:
            errors.append(str(e))
    t = threading.Thread(target=run)
    t.start()
    t.join(10 * SLOW)
    assert len(errors) == 1 and "main thread" in errors[0]
    assert not p.alive


EXIT_SCRIPT = """
import sys, forklift
class Writer(forklift.MessageProcess):
    def postRun__(self):
        with open(sys.argv[1], "w") as f:
            f.write("postRun__ ran")
w = Writer("writer")
w.start()
print(w.pid, flush=True)
# no stop(): the interpreter's exit stops it
"""


def test_interpreter_exit_stops_a_running_backend_in_order(tmp_path):
    import subprocess
    import sys
    mark = tmp_path / "mark"
    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(mark)], capture_output=True, text=True,
                         timeout=30 * SLOW)
    assert out.returncode == 0, out.stderr
    backend = int(out.stdout)
    assert mark.read_text() == "postRun__ ran"  # stopped (atexit), not killed with its parent
    assert not os.path.exists(f"/proc/{backend}")


def test_options_from_keywords():
    with pytest.raises(forklift.TypeError, match="call_timeout"):
        Pinger("bad", call_timeuot=1)
    with pytest.raises(forklift.TypeError, match="socket"):
        Pinger("bad", transport="pigeon")
    with Pinger("opts", call_timeout=0.1, stop_timeout=0.1, transport="socket") as p:
        with pytest.raises(forklift.TimeoutError):
            p.call("sleep", seconds=0.5 * SLOW)  # the option, not call()'s own default of 10 s
        p.send("sleep", seconds=30)
        t0 = time.monotonic()
        s = p.stop()
        assert s.signal == signal.SIGTERM and time.monotonic() - t0 < 2 * SLOW


def test_allow_threads_forks_beside_a_running_thread():
    done = threading.Event()
    t = threading.Thread(target=done.wait)
    t.start()
    try:
        with pytest.raises(forklift.Error, match="threads"):
            Pinger("refused").start()
        with Pinger("allowed", allow_threads=True) as p:
            assert p.call("ping", x=1) == 2
    finally:
        done.set()
        t.join()


def test_keyboard_interrupt_in_a_call_to_a_python_backend(pinger):
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pinger.call("sleep", seconds=30, timeout=60)
        assert time.monotonic() - t0 < 0.2 + 1.0 * SLOW
    finally:
        timer.cancel()
        timer.join()
    assert pinger.stop(timeout=0.1).escalation == 1  # still in the handler: SIGTERM
