"""Shared-memory arrays as numpy views: create, open, describe, interop with C++, validation."""

import gc
import os
import weakref

import numpy as np
import pytest

import forklift

DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "float16"]
SHAPES = [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2), (1, 2, 1, 2, 3), (2, 1, 1, 2, 1, 2), (1, 1, 2, 1, 1, 2, 3),
          (2, 1, 1, 1, 1, 1, 2, 3)]


def pattern(shape, dtype, mod):
    return (np.arange(int(np.prod(shape))) % mod).astype(dtype).reshape(shape)


def test_exceptions_form_a_hierarchy():
    assert issubclass(forklift.ProcessDied, forklift.PeerClosed)
    assert issubclass(forklift.StreamCorrupt, forklift.DecodeError)
    assert issubclass(forklift.CommandError, forklift.RemoteError)
    assert issubclass(forklift.TimeoutError, forklift.Error) and issubclass(forklift.TimeoutError, TimeoutError)
    assert issubclass(forklift.SystemError, OSError) and issubclass(forklift.TypeError, TypeError)
    for cls in (forklift.ShmFormatError, forklift.ShmNameError, forklift.LimitError):
        assert issubclass(cls, forklift.Error)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_rank_is_a_view_of_the_same_pages(dtype):
    for shape in SHAPES:
        a = forklift.create(shape, dtype)
        assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags.c_contiguous
        a[...] = pattern(shape, dtype, 97)
        b = forklift.open(forklift.describe(a))  # another mapping of the same segment
        assert b.ctypes.data != a.ctypes.data
        np.testing.assert_array_equal(b, pattern(shape, dtype, 97))
        b[...] = pattern(shape, dtype, 89)
        np.testing.assert_array_equal(a, pattern(shape, dtype, 89))


def test_fortran_order_and_buffer_protocol():
    a = forklift.create((3, 4), "float64", order="F")
    assert a.flags.f_contiguous and not a.flags.c_contiguous
    seg = forklift.segment(a)
    assert seg.order == "F" and forklift.describe(a)["layout"] == "column-major"
    m = memoryview(seg)
    assert m.format == "d" and m.shape == (3, 4) and m.strides == (8, 24)
    h = memoryview(forklift.segment(forklift.create((2, 2), "float16")))
    assert h.format == "e" and h.itemsize == 2


def test_the_view_keeps_the_mapping_alive():
    a = forklift.create((1000,), "int64", name="alive")
    seg = weakref.ref(forklift.segment(a))
    part = a[10:20]
    del a
    gc.collect()
    assert seg() is not None, "a slice still needs the mapping"
    part[:] = 5
    assert forklift.describe(part)["shape"] == [1000]
    del part
    gc.collect()
    assert seg() is None, "the last view gone, the segment goes"


def test_anonymous_by_fd_and_by_label():
    a = forklift.create((4, 4), "uint16", name="byfd")
    a[...] = pattern((4, 4), "uint16", 97)
    seg = forklift.segment(a)
    assert seg.anonymous and seg.name.startswith("anon.") and seg.fd >= 0
    assert not [n for n in os.listdir("/dev/shm") if seg.name in n], "anonymous: nothing in /dev/shm"
    fd = os.dup(seg.fd)
    try:
        b = forklift.open(fd)  # duplicated: the caller keeps fd
        np.testing.assert_array_equal(b, a)
        os.fstat(fd)
    finally:
        os.close(fd)
    np.testing.assert_array_equal(forklift.open(seg.name), a)  # a label this process holds
    with pytest.raises(forklift.ShmFormatError, match="holds uint16, not float32"):
        forklift.open(seg.fd, dtype="float32")
    with pytest.raises(forklift.ShmFormatError, match="is 4x4, expected 4x5"):
        forklift.open(seg.fd, shape=(4, 5))


def test_named_segments_by_name_and_their_owner_removes_the_name():
    a = forklift.create((2, 3), "float32", name="pytest", named=True)
    seg = forklift.segment(a)
    name = seg.name
    assert name.startswith("fk.") and os.path.exists("/dev/shm/" + name) and seg.owns
    a[...] = 1.5
    b = forklift.open(name, dtype="float32", shape=(2, 3))
    assert not forklift.segment(b).owns
    assert float(b.sum()) == 9.0
    del a, seg
    gc.collect()
    assert not os.path.exists("/dev/shm/" + name), "the owner removed its name"
    assert float(b.sum()) == 9.0, "an open mapping outlives the name"
    with pytest.raises(forklift.SystemError) as e:
        forklift.open(name)
    assert e.value.errno == 2


def test_bad_arguments_are_clear_exceptions():
    with pytest.raises(forklift.TypeError, match="cannot live in shared memory"):
        forklift.create((2,), "complex128")
    with pytest.raises(forklift.TypeError, match="cannot live in shared memory"):
        forklift.create((2,), "bool")
    with pytest.raises(TypeError, match="native byte order"):
        forklift.create((2,), ">i4")
    with pytest.raises(forklift.TypeError, match="rank 1 to 8"):
        forklift.create((1,) * 9, "uint8")
    with pytest.raises(forklift.ShmNameError):
        forklift.create((2,), "uint8", name="no/slash", exact=True)
    with pytest.raises(forklift.TypeError):
        forklift.open(3.5)
    with pytest.raises(forklift.LimitError, match="negative dimension"):
        forklift.create((2, -1), "uint8")
    with pytest.raises(forklift.LimitError, match="too large"):
        forklift.create((1 << 40, 1 << 40), "uint8")
    assert forklift.create((3, 0), "float32").shape == (3, 0)


FINALIZED = r"""
import forklift, sys
a = forklift.create((100, 100), "float64", name="fin", named=True)
print(forklift.segment(a).name, flush=True)
ring = forklift.create_ring(2, shape=(8,), dtype="int32")
w, r = ring.writer(), ring.reader()
w.push(bytes(32), timeout=1)
held = r.next(timeout=1).array      # a slot held by a live view at exit
cycle = [a]; cycle.append(cycle)    # and a segment only a cycle holds
"""


def test_interpreter_exit_with_live_views_is_clean():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", FINALIZED], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    name = out.stdout.strip()
    assert name.startswith("fk.")
    # The creator's Segment went at finalization, and its name with it.
    assert not os.path.exists("/dev/shm/" + name)


def test_forged_and_wrong_segments_raise_never_crash(tmp_path):
    # A file that is no memfd, an unsealed memfd, a memfd of garbage.
    path = tmp_path / "plain"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(forklift.ShmFormatError, match="not sealed"):
            forklift.open(fd)
    finally:
        os.close(fd)
    fd = os.memfd_create("forged", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, os.urandom(8192))
        with pytest.raises(forklift.ShmFormatError, match="not sealed"):
            forklift.open(fd)
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        with pytest.raises(forklift.ShmFormatError):
            forklift.open(fd)
    finally:
        os.close(fd)
    with pytest.raises(forklift.SystemError, match="descriptor 987"):
        forklift.open(987)
    # A named file in /dev/shm that is not forklift's.
    name = f"fk.{os.getpid()}.forged"
    with open("/dev/shm/" + name, "wb") as f:
        f.write(b"\x7fELF" + os.urandom(4092))
    try:
        with pytest.raises(forklift.ShmFormatError):
            forklift.open(name)
    finally:
        os.unlink("/dev/shm/" + name)
    # Descriptors that lie: another dtype, shape, generation; fields missing.
    a = forklift.create((2, 3), "int32")
    d = forklift.describe(a)
    for key, value, err in [("dtype", "float32", forklift.ShmFormatError), ("shape", [3, 2], forklift.ShmFormatError),
                            ("shape", [6], forklift.ShmFormatError), ("generation", 1, forklift.ShmFormatError),
                            ("dtype", "complex64", forklift.TypeError), ("shape", "2x3", forklift.TypeError)]:
        with pytest.raises(err):
            forklift.open({**d, key: value})
    for key in ("name", "dtype", "shape", "layout"):
        with pytest.raises(forklift.TypeError):
            forklift.open({k: v for k, v in d.items() if k != key})
    with pytest.raises(forklift.TypeError):
        forklift.open({**d, "fd": "seven"})



# --- the same with C++ on the other side (tests/peer.cpp) ---------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_makes_python_opens_by_descriptor(peer, dtype):
    for shape in SHAPES:
        p = peer("array-make", dtype, "-", *shape)
        d = p.recv_descriptor()
        assert isinstance(d["fd"], forklift.Fd) and d["dtype"] == dtype and d["shape"] == list(shape)
        a = forklift.open(d)
        np.testing.assert_array_equal(a, pattern(shape, dtype, 97))
        a[...] = pattern(shape, dtype, 89)
        p.send_byte()
        code, out = p.finish()
        assert code == 0, out
        assert out.startswith(f"verified {int(np.prod(shape))} elements of {dtype}["), out


@pytest.mark.parametrize("dtype", DTYPES)
def test_python_makes_cpp_opens_by_descriptor(peer, dtype):
    for shape in SHAPES:
        a = forklift.create(shape, dtype, name="tocpp")
        a[...] = pattern(shape, dtype, 97)
        p = peer("array-check")
        p.send_descriptor(forklift.describe(a))
        assert p.recv_byte() == b"x"
        np.testing.assert_array_equal(a, pattern(shape, dtype, 89))
        code, out = p.finish()
        assert code == 0, out


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float64"])
def test_python_makes_fortran_order_cpp_opens_it_column_major(peer, dtype):
    for shape in [(3, 4), (2, 3, 4), (2, 1, 3, 1, 2)]:
        a = forklift.create(shape, dtype, order="F")
        flat = a.T.reshape(-1)  # the pages in memory order (a view: a.T is C-contiguous)
        assert flat.base is not None and np.shares_memory(flat, a)
        flat[...] = pattern(flat.shape, dtype, 97)
        p = peer("array-check")
        p.send_descriptor(forklift.describe(a))
        assert p.recv_byte() == b"x"
        np.testing.assert_array_equal(flat, pattern(flat.shape, dtype, 89))
        code, out = p.finish()
        assert code == 0 and "column-major" in out, out


def test_python_makes_named_cpp_opens_by_name(peer):
    a = forklift.create((6, 7, 3), "float16", name="pytest", named=True)
    a[...] = pattern(a.shape, "float16", 97)
    p = peer("array-open-name", forklift.segment(a).name, "float16", 3)
    assert p.recv_byte() == b"x"
    np.testing.assert_array_equal(a, pattern(a.shape, "float16", 89))
    code, out = p.finish()
    assert code == 0 and "verified 126 elements of float16[6x7x3]" in out, out


def test_cpp_makes_named_python_opens_by_name(peer):
    name = f"fk.{os.getpid()}.pyname"
    p = peer("array-make", "int16", name, 4, 5)
    d = p.recv_descriptor()
    assert "fd" not in d and d["name"] == name
    a = forklift.open(name, dtype="int16", shape=(4, 5))
    np.testing.assert_array_equal(a, pattern((4, 5), "int16", 97))
    a[...] = pattern((4, 5), "int16", 89)
    p.send_byte()
    code, out = p.finish()
    assert code == 0, out
    assert not os.path.exists("/dev/shm/" + name), "the C++ creator removed its name"


def test_cpp_refuses_what_python_forged(peer):
    a = forklift.create((2, 3), "int32")
    p = peer("array-check")
    p.send_descriptor({**forklift.describe(a), "dtype": "float32"})
    code, out = p.finish()
    assert code == 1 and out.startswith("error: ") and "float32" in out, out


def test_a_forked_child_writes_the_same_pages_and_never_removes_the_name():
    a = forklift.create((4,), "int64", name="fork", named=True)
    name = forklift.segment(a).name
    pid = os.fork()
    if pid == 0:  # the child: its copy of the Segment does not own the name
        code = 1
        try:
            a[0] = 42
            assert not forklift.segment(a).owns
            del a
            gc.collect()
            code = 0 if os.path.exists("/dev/shm/" + name) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert a[0] == 42 and os.path.exists("/dev/shm/" + name)


def test_release_keeps_the_name_and_remove_takes_it():
    a = forklift.create((2,), "uint32", name="kept", named=True)
    seg = forklift.segment(a)
    name = seg.name
    seg.release()
    assert not seg.owns
    del a, seg
    gc.collect()
    assert os.path.exists("/dev/shm/" + name)
    b = forklift.open(name, dtype="uint32")
    assert forklift.Segment.remove(name) and not os.path.exists("/dev/shm/" + name)
    assert b.shape == (2,), "the mapping outlives the name"
    assert not forklift.Segment.remove(name)
