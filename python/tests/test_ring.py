"""Rings from Python: slots as numpy views in place, metadata, policies, doorbells; C++ on the other side."""

import asyncio
import gc
import os
import selectors
import time

import numpy as np
import pytest

import forklift

H, W, C = 720, 1280, 3
# Time bounds stretch by the factor the C++ tests use (tests/support.hpp).
SLOW = max(1.0, float(os.environ.get("FORKLIFT_TEST_SLOWDOWN", "1")))


def sums(frame):
    rows = frame.reshape(H, -1).sum(axis=1, dtype=np.int64)
    return int(rows.sum()), int((rows * np.arange(1, H + 1, dtype=np.int64)).sum())


def test_write_and_read_in_place_with_metadata():
    ring = forklift.create_ring(3, shape=(4, 5), dtype="float16")
    assert ring.slots == 3 and ring.shape == (4, 5) and ring.dtype == np.dtype("float16") and ring.policy == "block"
    w = ring.writer()
    r = forklift.open_ring(ring.describe()).reader()
    with w.reserve(timeout=1.0) as s:
        assert s.array.shape == (4, 5) and s.array.dtype == np.float16 and s.array.flags.writeable
        s.array[...] = np.arange(20).reshape(4, 5)
        s.set_user(0, -7)
        s.set_user(3, 1 << 40)
        s.timestamp_ns = 123456789
        seq = s.sequence
    s = r.next(timeout=1.0)
    assert s.sequence == seq == 1 and s.user == (-7, 0, 0, 1 << 40) and s.timestamp_ns == 123456789
    a = s.array
    assert not a.flags.writeable
    np.testing.assert_array_equal(a, np.arange(20).reshape(4, 5))
    with pytest.raises(forklift.Error, match="numpy view"):
        s.release()  # a view still lives
    del a
    s.release()
    assert r.next(timeout=0.05) is None
    assert r.stats()["consumed"] == 1 and w.stats()["committed"] == 1


def test_a_view_keeps_its_slot_held_after_the_slot_object_goes():
    ring = forklift.create_ring(2, slot_bytes=64)
    w, r = ring.writer(), ring.reader()
    w.push(b"hello", timeout=1.0, user=[5])
    w.push(b"later", timeout=1.0)  # the other slot waits in the delivery queue
    s = r.next(timeout=1.0)
    view = s.array
    assert bytes(view) == b"hello" and s.user[0] == 5
    del s
    gc.collect()
    assert r.held == 1, "the view's lease holds the slot"
    assert w.try_reserve() is None, "so the writer cannot have it"
    del view
    gc.collect()
    assert r.held == 0
    slot = w.try_reserve()
    assert slot is not None
    slot.abandon()
    with pytest.raises(forklift.Error, match="maxHeld|holds"):
        kept = r.next(timeout=1.0)
        r.next(timeout=1.0)
    del kept


def test_leaving_with_while_a_view_lives_raises_and_an_exception_abandons():
    ring = forklift.create_ring(2, slot_bytes=16)
    w, r = ring.writer(), ring.reader()
    with pytest.raises(forklift.Error, match="numpy view"):
        with w.reserve(timeout=1.0) as s:
            kept = s.array
    del kept
    s.abandon()
    with pytest.raises(ZeroDivisionError):
        with w.reserve(timeout=1.0) as s:
            s.array[:4] = 1
            1 / 0
    assert r.next(timeout=0.05) is None, "the slot was abandoned, not committed"
    with w.reserve(timeout=1.0) as s:
        s.set_bytes(4)
        s.array[:4] = [1, 2, 3, 4]
    with r.next(timeout=1.0) as got:
        assert got.bytes == 4 and list(got.array) == [1, 2, 3, 4]


def test_block_waits_and_times_out():
    ring = forklift.create_ring(2, slot_bytes=8)
    w, r = ring.writer(), ring.reader()
    w.push(b"a", timeout=1.0)
    w.push(b"b", timeout=1.0)
    assert w.try_reserve() is None
    t0 = time.monotonic()
    with pytest.raises(forklift.TimeoutError):
        w.reserve(timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 2.0 * SLOW
    with pytest.raises(TimeoutError):  # the builtin too
        w.push(b"c", timeout=0.01)
    assert r.stats()["drops"] == 0


def test_push_takes_contiguous_buffers_only():
    ring = forklift.create_ring(4, slot_bytes=64)
    w, r = ring.writer(), ring.reader()
    grid = np.arange(16, dtype=np.uint8).reshape(4, 4)
    w.push(grid, timeout=1.0, user=[1, 2, 3, 4])
    with pytest.raises(forklift.TypeError, match="C-contiguous"):
        w.push(grid[:, ::2], timeout=1.0)
    with pytest.raises(forklift.TypeError, match="C-contiguous"):
        w.push(grid.T, timeout=1.0)
    with pytest.raises(forklift.LimitError):
        w.push(bytes(65), timeout=1.0)
    with pytest.raises(forklift.Error):
        w.push(b"x", timeout=1.0, user=[0] * 5)
    with r.next(timeout=1.0) as s:
        assert s.bytes == 16 and s.user == (1, 2, 3, 4)
        assert bytes(s.array) == grid.tobytes()
    assert r.next(timeout=0) is None


@pytest.mark.parametrize("policy,first", [("drop-oldest", 4), ("keep-latest", 6)])
def test_drop_policies_count_their_drops(policy, first):
    ring = forklift.create_ring(3, slot_bytes=8, policy=policy)
    w, r = ring.writer(), ring.reader()
    for i in range(6):
        w.push(bytes([i]), timeout=0, user=[i])
    assert ring.stats()["committed"] == 6
    s = r.next(timeout=1.0)
    assert s.sequence == first and s.user[0] == first - 1
    s.release()
    assert r.stats()["drops"] > 0


def test_the_doorbell_in_selectors():
    ring = forklift.create_ring(2, slot_bytes=8)
    w, r = ring.writer(), ring.reader()
    sel = selectors.DefaultSelector()
    sel.register(r.fileno(), selectors.EVENT_READ)
    try:
        assert r.arm() is True
        assert sel.select(timeout=0.05) == []
        w.push(b"x", timeout=1.0)
        assert sel.select(timeout=1.0), "the commit rang the armed reader"
        r.drain_doorbell()
        with r.try_next() as s:
            assert bytes(s.array[:1]) == b"x"
        assert r.try_next() is None
    finally:
        sel.close()


def test_the_doorbells_in_select_poll_reader_and_blocked_writer():
    import select
    ring = forklift.create_ring(2, slot_bytes=8)
    w, r = ring.writer(), ring.reader()
    p = select.poll()
    p.register(r.fileno(), select.POLLIN)
    p.register(w.fileno(), select.POLLIN)
    assert r.arm() is True
    w.push(b"1", timeout=1.0)
    w.push(b"2", timeout=1.0)
    assert dict(p.poll(1000)).get(r.fileno()) == select.POLLIN
    r.drain_doorbell()
    w.drain_doorbell()  # the protocol: drain, try, then arm (an attach may have rung it)
    assert w.try_reserve() is None and w.arm() is True, "full: the writer arms for room"
    assert w.fileno() not in dict(p.poll(50))
    r.next(timeout=1.0).release()
    assert dict(p.poll(1000)).get(w.fileno()) == select.POLLIN, "a returned slot rang the blocked writer"
    w.drain_doorbell()
    s = w.try_reserve()
    assert s is not None
    s.abandon()


DEADLOCK = r"""
import threading, forklift
ring = forklift.create_ring(2, slot_bytes=8)
w, r = ring.writer(), ring.reader()
got = []
def read():
    for _ in range(200):
        with r.next(timeout=None) as s:   # waits with the GIL released
            got.append(bytes(s.array[:1]))
t = threading.Thread(target=read)
t.start()
for i in range(200):
    w.push(bytes([i % 256]), timeout=None)  # waits with the GIL released too
t.join()
assert got == [bytes([i % 256]) for i in range(200)]
print("ok")
"""


def test_waits_release_the_gil_for_other_threads():
    import subprocess
    import sys
    try:  # in a child: a wait that held the GIL would hang, not fail
        out = subprocess.run([sys.executable, "-c", DEADLOCK], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("DEADLOCK, most likely: a ring wait kept the GIL")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_bad_ring_descriptors(peer):
    ring = forklift.create_ring(2, slot_bytes=8)
    d = ring.describe()
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(forklift.TypeError, match="not an eventfd"):
            forklift.open_ring({**d, "readerBell": rfd})
    finally:
        os.close(rfd)
        os.close(wfd)
    with pytest.raises(forklift.Error):
        forklift.open_ring({**d, "slots": 3})
    arr = forklift.create((8,), "uint8")
    with pytest.raises(forklift.ShmFormatError):
        forklift.open_ring({**d, "segment": forklift.describe(arr)})
    with pytest.raises(forklift.TypeError):
        forklift.open_ring({k: v for k, v in d.items() if k != "writerBell"})
    with pytest.raises(forklift.ShmFormatError):  # a ring is not an array
        forklift.open(d["segment"]["fd"])


def test_cpp_writer_python_reader_asyncio_checksummed_frames(peer):
    frames = 1000
    p = peer("ring-write", frames, 4, "block")
    ring = forklift.open_ring(p.recv_descriptor())
    assert ring.shape == (H, W, C) and ring.dtype == np.uint8
    r = ring.reader()
    p.send_byte()  # attached: go

    async def read_all():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        seen = []

        def on_doorbell():
            r.drain_doorbell()
            while True:
                while (s := r.try_next()) is not None:
                    a = s.array
                    assert sums(a) == s.user[:2], f"frame {s.user[2]} is not what the writer summed"
                    seen.append(s.user[2])
                    del a
                    s.release()
                if len(seen) == frames:
                    if not done.done():
                        done.set_result(None)
                    return
                if r.arm():
                    return

        loop.add_reader(r.fileno(), on_doorbell)
        try:
            on_doorbell()  # arms, or reads what came first
            await asyncio.wait_for(done, 120)
        finally:
            loop.remove_reader(r.fileno())
        return seen

    t0 = time.monotonic()
    seen = asyncio.run(read_all())
    elapsed = time.monotonic() - t0
    assert seen == list(range(frames))
    assert r.stats()["drops"] == 0
    p.send_byte()
    code, out = p.finish()
    assert code == 0, out
    assert f"wrote {frames} frames, committed {frames}, drops 0" in out
    print(f"{frames} frames of {H}x{W}x{C} C++ -> Python in {elapsed:.2f} s")


def test_python_writer_cpp_reader_checksummed_frames(peer):
    frames = 1000
    ring = forklift.create_ring(4, shape=(H, W, C), dtype="uint8")
    w = ring.writer()
    p = peer("ring-read", frames)
    p.send_descriptor(ring.describe())
    assert p.recv_byte() == b"x"  # attached
    base = np.random.default_rng(7).integers(0, 256, size=(H, W, C), dtype=np.uint8)
    for f in range(frames):
        with w.reserve(timeout=20.0) as s:
            a = s.array
            np.add(base, np.uint8(f % 256), out=a)
            total, weighted = sums(a)
            del a
            s.set_user(0, total)
            s.set_user(1, weighted)
            s.set_user(2, f)
    assert p.recv_byte(timeout=60) == b"x"
    code, out = p.finish()
    assert code == 0, out
    assert f"read {frames} frames, checksums ok" in out
    assert ring.stats()["consumed"] == frames


WAITER = r"""
import sys, forklift
ring = forklift.create_ring(2, slot_bytes=8)
w, r = ring.writer(), ring.reader()
w.push(b"a", timeout=1)
w.push(b"b", timeout=1)
print("blocking", flush=True)
try:
    if sys.argv[1] == "reserve":
        w.reserve(timeout=None)      # full: waits for good
    else:
        r.next(timeout=1.0).release(); r.next(timeout=1.0).release()
        r.next(timeout=None)         # empty: waits for good
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("wait", ["reserve", "next"])
def test_ctrl_c_ends_a_wait_without_timeout(wait):
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", WAITER, wait], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    try:
        assert proc.stdout.readline().strip() == "blocking"
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 1.0 * SLOW
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and out.strip() == "interrupted", out


def test_a_killed_cpp_writer_ends_the_readers_wait(peer):
    import signal
    p = peer("ring-write", 1000000, 4, "block")
    ring = forklift.open_ring(p.recv_descriptor())
    r = ring.reader()
    p.send_byte()
    for _ in range(3):
        with r.next(timeout=10) as s:
            a = s.array
            assert sums(a) == s.user[:2]
            del a
    p.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(forklift.ProcessDied):
        while True:  # what it committed before dying is still read
            s = r.next(timeout=10)
            assert s is not None, "the death ended the wait, not the timeout"
            s.release()
    assert time.monotonic() - t0 < 1.0 * SLOW
    assert r.writer_gone()


def test_a_role_waiting_in_one_thread_is_not_used_by_another():
    import threading
    ring = forklift.create_ring(4, slot_bytes=8)
    w, r = ring.writer(), ring.reader(max_held=2)
    w.push(b"1", timeout=1.0)
    first = r.next(timeout=1.0)
    got = []
    t = threading.Thread(target=lambda: got.append(r.next(timeout=10.0)))
    t.start()
    deadline = time.monotonic() + 5
    while True:  # until the thread is in its wait
        try:
            r.try_next()
        except forklift.Error as e:
            assert "waiting in another thread" in str(e)
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(forklift.Error, match="waiting in another thread"):
        r.stats()
    first.release()  # handed to the waiting thread, which releases it after its wait
    w.push(b"2", timeout=1.0)
    t.join(10)
    assert not t.is_alive() and got[0] is not None
    assert r.held == 1 and r.stats()["consumed"] == 1
    assert bytes(got[0].array[:1]) == b"2"
    got[0].release()
    assert r.held == 0
