"""A C++ backend driven from Python: example_module.Echo, bound with forklift/python.hpp's bindProcess."""

import asyncio
import gc
import math
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import forklift
import example_module as em

SLOW = float(os.environ.get("FORKLIFT_TEST_SLOWDOWN", "1"))


def gone(pid, within=0.0):
    """True once no process `pid` is left (ended and reaped), waiting up to `within` seconds."""
    deadline = time.monotonic() + within
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def echo():
    e = em.Echo("echo", 4)
    e.start()
    yield e
    e.stop(timeout=1.0)


VALUES = [None, True, False, 0, -1, 2**63 - 1, -2**63, 1.5, -0.0, math.inf, "", "héllo ✓", b"", b"\x00\xff" * 100,
          [], [1, [2, [3, "x"]]], {}, {"a": {"b": [1, None, b"z"]}, "": 2}]


@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:30] for v in VALUES])
def test_values_round_trip_with_their_types(echo, value):
    got = echo.call("echo", value=value)
    assert got == value
    assert type(got) is type(value)
    if isinstance(value, dict):
        assert list(got) == list(value)  # order kept


def test_nan_and_tuple_and_numpy_scalars(echo):
    assert math.isnan(echo.call("echo", value=math.nan))
    assert echo.call("echo", value=(1, "a")) == [1, "a"]
    got = echo.call("echo", value=[np.int64(3), np.float32(1.5), np.bool_(True)])
    assert got == [3, 1.5, True] and [type(v) for v in got] == [int, float, bool]


DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_arrays_round_trip(echo, dtype):
    rng = np.random.default_rng(7)
    for shape in [(5,), (3, 4), (2, 3, 4)]:
        a = (rng.random(shape) * 100).astype(dtype)
        got = echo.call("echo", value=a)
        assert isinstance(got, np.ndarray) and got.dtype == a.dtype and got.shape == a.shape
        assert np.array_equal(got, a)
    f = np.asfortranarray(np.arange(12, dtype=dtype).reshape(3, 4))
    assert np.array_equal(echo.call("echo", value=f), f)
    strided = np.arange(20, dtype=dtype)[::3]
    assert np.array_equal(echo.call("echo", value=strided), strided)


def test_fields_by_keyword_and_dict(echo):
    assert echo.call("fields", a=1, b=[2]) == {"a": 1, "b": [2]}
    # Fields named like call()'s own parameters go in the dict.
    assert echo.call("fields", {"timeout": 3, "command": "x"}, c=1) == {"timeout": 3, "command": "x", "c": 1}
    with pytest.raises(forklift.TypeError, match="given twice"):
        echo.call("fields", {"a": 1}, a=2)


@pytest.mark.parametrize("bad", [2**63, {1, 2}, object(), np.zeros(3, dtype=bool), np.zeros(2, dtype=complex),
                                 {1: "int key"}])
def test_a_value_without_a_forklift_form_is_refused_and_the_backend_serves_on(echo, bad):
    with pytest.raises(forklift.TypeError) as info:
        echo.call("echo", value=bad)
    assert "value" in str(info.value)
    with pytest.raises(forklift.TypeError):
        echo.send("echo", value=bad)
    assert echo.call("echo", value=1) == 1
    assert echo.recv(timeout=0.05) is None  # nothing was sent


def test_a_whole_shared_memory_array_travels_as_its_descriptor(echo):
    a = forklift.create(5, "float64")
    a[:] = 2
    assert echo.call("kind", value=a) == "map"
    assert echo.call("shm_sum", array=a) == 10.0
    assert a[0] == 42  # written by the backend, in the same pages
    # A slice of it is not the whole segment: a copy, an Array.
    assert echo.call("kind", value=a[1:]) == "array"
    assert echo.call("kind", value=np.zeros(3)) == "array"


def test_remote_error_carries_the_backend_message_and_the_backend_serves_on(echo):
    with pytest.raises(forklift.RemoteError, match="c__throw threw: the sky fell") as info:
        echo.call("throw", text="the sky fell")
    assert type(info.value) is forklift.RemoteError
    with pytest.raises(forklift.RemoteError, match="nosuch"):
        echo.call("nosuch")
    with pytest.raises(forklift.RemoteError, match="seconds"):
        echo.call("sleep", seconds="long")
    assert echo.call("echo", value="still here") == "still here"


def test_timeout_is_forklift_and_builtin_timeout_error(echo):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        echo.call("sleep", seconds=0.5 * SLOW, timeout=0.1)
    assert isinstance(info.value, forklift.TimeoutError)
    assert time.monotonic() - t0 < 0.5 * SLOW
    assert echo.call("echo", value=5, timeout=10 * SLOW) == 5  # after the sleep


def test_process_died_during_a_call_has_the_signal(echo):
    t0 = time.monotonic()
    with pytest.raises(forklift.ProcessDied) as info:
        echo.call("crash", signal=signal.SIGSEGV, timeout=30)
    assert time.monotonic() - t0 < 1.0 * SLOW
    st = info.value.status
    assert isinstance(st, forklift.ExitStatus)
    assert st.how == "signaled" and st.signal == signal.SIGSEGV and not st.ok
    assert "SIGSEGV" in str(info.value)
    assert isinstance(info.value, forklift.PeerClosed)
    assert not echo.alive and gone(echo.pid)
    with pytest.raises(forklift.ProcessDied):
        echo.call("echo", value=1)


def test_process_died_during_recv(echo):
    echo.send("crash", signal=signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(forklift.ProcessDied) as info:
        echo.recv(timeout=30)
    assert time.monotonic() - t0 < 1.0 * SLOW
    assert info.value.status.signal == signal.SIGKILL
    assert echo.stop().signal == signal.SIGKILL


def test_send_failure_comes_back_from_recv_as_command_error(echo):
    echo.send("throw", text="late")
    echo.send("frames", n=1)
    with pytest.raises(forklift.CommandError, match="late") as info:
        echo.recv(timeout=5 * SLOW)
    assert info.value.command == "throw"
    cmd, fields = echo.recv(timeout=5 * SLOW)
    assert cmd == "frame" and fields["index"] == 0


def test_recv_gives_sendout_messages_in_order(echo):
    echo.call("frames", n=5)
    for i in range(5):
        cmd, fields = echo.recv(timeout=5 * SLOW)
        assert cmd == "frame" and fields["index"] == i
        assert fields["pixels"].shape == (4, 4) and fields["pixels"].dtype == np.uint8
        assert (fields["pixels"] == i).all()
    t0 = time.monotonic()
    assert echo.recv(timeout=0.1) is None
    assert time.monotonic() - t0 >= 0.09


def test_call_async_futures(echo):
    slow = echo.call_async("sleep", seconds=0.3)
    quick = [echo.call_async("echo", value=i) for i in range(10)]
    assert not slow.done()
    with pytest.raises(forklift.TimeoutError):
        slow.result(timeout=0.01)
    assert [f.result(5 * SLOW) for f in quick] == list(range(10))
    assert slow.result(5 * SLOW) == 0.3 and slow.done()
    assert slow.result() == 0.3  # again
    bad = echo.call_async("throw", text="async boom")
    with pytest.raises(forklift.RemoteError, match="async boom"):
        bad.result(5 * SLOW)
    short = echo.call_async("sleep", seconds=0.5, timeout=0.05)
    with pytest.raises(forklift.TimeoutError):
        short.result()  # the call's own timeout
    died = echo.call_async("crash", signal=signal.SIGABRT)
    with pytest.raises(forklift.ProcessDied) as info:
        died.result(5 * SLOW)
    assert info.value.status.signal == signal.SIGABRT


def test_four_threads_call_one_backend(echo):
    errors = []

    def worker(k):
        try:
            for i in range(50):
                assert echo.call("echo", value=[k, i]) == [k, i]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30 * SLOW)
    assert not errors and not any(t.is_alive() for t in threads)


def test_fileno_with_selectors(echo):
    with selectors.DefaultSelector() as sel:
        sel.register(echo.fileno(), selectors.EVENT_READ)
        assert sel.select(timeout=0.05) == []
        echo.send("frames", n=1)
        assert len(sel.select(timeout=5 * SLOW)) == 1
        assert echo.recv(timeout=0)[0] == "frame"
        assert sel.select(timeout=0.05) == []


def test_fileno_with_asyncio(echo):
    async def main():
        loop = asyncio.get_running_loop()
        got = []
        done = loop.create_future()

        def readable():
            while (m := echo.recv(timeout=0)) is not None:
                got.append(m[1]["index"])
            if len(got) == 3 and not done.done():
                done.set_result(None)
        loop.add_reader(echo.fileno(), readable)
        try:
            echo.send("frames", n=3)
            await asyncio.wait_for(done, 5 * SLOW)
        finally:
            loop.remove_reader(echo.fileno())
        return got
    assert asyncio.run(main()) == [0, 1, 2]


def test_stop_reports_how_it_ended_and_escalates():
    e = em.Echo("stopper", 1)
    with pytest.raises(forklift.Error, match="before start"):
        e.fileno()
    assert e.stop().how == "not started"
    e.start()
    pid = e.pid
    assert e.call("side") == pid != os.getpid()
    s = e.stop(timeout=1.0)
    assert s.ok and s.how == "exited" and s.code == 0 and s.escalation == 0
    assert e.stop().ok and gone(pid) and not e.alive
    e.start()  # again
    e.send("sleep", seconds=30)
    t0 = time.monotonic()
    s = e.stop(timeout=0.1)
    assert s.signal == signal.SIGTERM and s.escalation == 1
    assert time.monotonic() - t0 < 2.0 * SLOW


def test_with_starts_and_stops():
    with em.Echo("ctx", 1) as e:
        pid = e.pid
        assert e.alive and e.call("echo", value=1) == 1
    assert not e.alive and gone(pid)


def test_a_collected_object_stops_its_backend():
    e = em.Echo("collected", 1)
    e.start()
    pid = e.pid
    del e
    gc.collect()
    assert gone(pid)


def test_misuse_raises_forklift_errors():
    e = em.Echo("idle", 1)
    with pytest.raises(forklift.Error):
        e.call("echo", value=1)
    e.start()
    with pytest.raises(forklift.Error, match="already"):
        e.start()
    e.stop()


def test_start_refuses_while_a_python_thread_runs():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        e = em.Echo("threaded", 1)
        with pytest.raises(forklift.Error, match="threads"):
            e.start()
        assert not e.alive
    finally:
        stop.set()
        t.join()


def test_keyboard_interrupt_in_a_call():
    e = em.Echo("interrupted", 1)
    e.start()
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            e.call("sleep", seconds=30, timeout=60)
        assert time.monotonic() - t0 < 0.2 + 1.0 * SLOW
    finally:
        timer.cancel()
        timer.join()
        s = e.stop(timeout=0.2)
    assert s.escalation == 1  # it was still inside the handler


SCRIPT = textwrap.dedent("""
    import numpy, os, sys, time
    import forklift, example_module as em
    e = em.Echo("child", 1)
    e.start()
    print(e.pid, flush=True)
    t0 = time.monotonic()
    try:
        if sys.argv[1] == "call":
            e.call("sleep", seconds=60, timeout=120)
        else:
            e.recv(timeout=120)
    except KeyboardInterrupt:
        print(time.monotonic() - t0, flush=True)
        raise
""")


@pytest.mark.parametrize("wait", ["call", "recv"])
def test_ctrl_c_in_a_script_leaves_nothing_behind(wait):
    # numpy imported before the backend starts, as most programs do. At exit
    # the backend is stopped (atexit): one still in its handler after the
    # stop timeout (5 s) by SIGTERM.
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, wait], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        backend = int(p.stdout.readline())
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=5 + 10 * SLOW)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert "KeyboardInterrupt" in err, err
    assert 0.1 < float(out) < 0.2 + 1.0 * SLOW  # the wait ended at the Ctrl-C
    assert gone(backend, within=2 * SLOW)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith((f"fk.{p.pid}.", f"fk.{backend}."))]


def test_errors_are_forkliftss_own_classes():
    import forklift._forklift as fk
    assert forklift.RemoteError is fk.RemoteError
    assert issubclass(forklift.TimeoutError, TimeoutError)
    assert issubclass(forklift.ProcessDied, forklift.PeerClosed)
    assert issubclass(forklift.CommandError, forklift.RemoteError)


def test_a_descriptor_travels_both_ways(echo):
    r, w = os.pipe()
    try:
        got = echo.call("echo", value=forklift.Fd(w))
        assert isinstance(got, forklift.Fd) and got.fileno() != w
        os.write(got.fileno(), b"x")
        assert os.read(r, 1) == b"x"
        got.close()
    finally:
        os.close(r)
        os.close(w)


def test_waits_release_the_gil(echo):
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1
            time.sleep(0.001)
    t = threading.Thread(target=spin)
    t.start()
    try:
        before = count[0]
        echo.call("sleep", seconds=0.3)
        during_call = count[0] - before
        echo.send("sleep", seconds=0.3)
        before = count[0]
        assert echo.recv(timeout=0.3) is None
        during_recv = count[0] - before
    finally:
        stop.set()
        t.join()
    assert during_call > 10 and during_recv > 10


def test_a_future_keeps_its_process_and_serves_several_threads():
    def make():
        e = em.Echo("kept", 1)
        e.start()
        return e.call_async("sleep", seconds=0.2), e.pid
    f, pid = make()
    gc.collect()
    results = []
    threads = [threading.Thread(target=lambda: results.append(f.result(5 * SLOW))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10 * SLOW)
    assert results == [0.2, 0.2, 0.2]
    del f, threads
    gc.collect()
    assert gone(pid, within=5 * SLOW)  # the last reference went with the future
