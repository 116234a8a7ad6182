"""forklift for Python: shared-memory arrays and rings as numpy views.

Arrays
    a = forklift.create((480, 640), "float32")          # anonymous (a sealed memfd)
    b = forklift.create((3, 4), "uint8", named=True)     # /dev/shm/fk.<pid>.<n>.<hint>
    c = forklift.open(d)   # d: a descriptor dict (forklift.describe(a)), a name, or an int fd

Rings
    r = forklift.create_ring(4, shape=(720, 1280, 3), dtype="uint8", policy="drop-oldest")
    w = r.writer();  rd = forklift.open_ring(r.describe()).reader()   # usually in two processes
    with w.reserve(timeout=1.0) as s:          # commits on leaving, abandons on an exception
        s.array[...] = frame; s.set_user(0, 7)
    with rd.next(timeout=1.0) as s:            # released on leaving
        use(s.array, s.sequence, s.timestamp_ns, s.user)
    rd.fileno()   # the doorbell: selectors, select.poll, asyncio's loop.add_reader

Every array is a numpy.ndarray over the segment's own pages; its base chain
leads to a forklift.Segment, which keeps the mapping alive. describe() and
open() take and give the same descriptors as C++ ShmTensor::describe() and
ShmTensor::open(), so an array made in C++ opens here and the reverse.

C++ backends
    A user's pybind11 module binds a C++ MessageProcess subclass with one
    line, forklift::python::bindProcess<Camera, Args...>(m, "Camera")
    (forklift/python.hpp); its call_async() returns a forklift.CallFuture,
    its stop() a forklift.ExitStatus, and it raises the classes here.
"""

import numbers as _numbers

import numpy as _np

from . import _forklift
from ._forklift import (  # noqa: F401
    Error, SystemError, TypeError, DecodeError, StreamCorrupt, LimitError, TimeoutError,
    PeerClosed, ProcessDied, RemoteError, CommandError, ShmNameError, ShmFormatError,
    Fd, Segment, Ring, RingWriter, RingReader, WriteSlot, ReadSlot, CallFuture, ExitStatus,
)

__all__ = [
    "Error", "SystemError", "TypeError", "DecodeError", "StreamCorrupt", "LimitError", "TimeoutError",
    "PeerClosed", "ProcessDied", "RemoteError", "CommandError", "ShmNameError", "ShmFormatError",
    "Fd", "Segment", "create", "zeros", "open", "describe", "segment",
    "Ring", "RingWriter", "RingReader", "WriteSlot", "ReadSlot", "create_ring", "open_ring",
    "CallFuture", "ExitStatus", "MessageProcess",
]


class MessageProcess(_forklift._PyProcess):
    """A backend written in Python: a fork of this interpreter running forklift's loop.

        class Pinger(forklift.MessageProcess):
            def c__ping(self, x):          # backend side: runs in the fork
                return x + 1
        p = Pinger("pinger"); p.start(); p.call("ping", x=1)   # -> 2

    Each c__<command> method is a command; the message's fields are its
    keyword arguments, its return value the call's result, an exception it
    raises the caller's forklift.RemoteError (the backend serves on).
    preRun__/postRun__ run in the backend before and after its loop;
    sendOut__(command, **fields) there reaches the frontend's recv(). The
    frontend side is the same as a C++ backend's (forklift/python.hpp):
    call, call_async, send, recv, fileno, stop, with. start() runs from the
    main thread, while no other thread runs (forklift's fork rule).
    """

    def __init__(self, name, **options):
        """options: start_timeout, call_timeout, send_timeout, stop_timeout (seconds; None: forever),
        allow_threads, ignore_sigint (bools) and transport ("shm" or "socket"), as C++ ProcessOptions."""
        super().__init__(name, options)
        cls = type(self)
        self._register_commands(self, [n for n in dir(cls) if n.startswith("c__") and callable(getattr(cls, n))])


def _dtype_name(dtype):
    dt = _np.dtype(dtype)
    if not dt.isnative:
        raise TypeError(f"dtype {dt.str}: forklift arrays hold native byte order only")
    return dt.name


def create(shape, dtype="float64", *, name="", named=False, exact=False, order="C"):
    """A zero-filled shared-memory array as a numpy.ndarray.

    shape: an int or a tuple of 1 to 8 ints. name: a hint in the label of an
    anonymous segment (the default), or with named=True the hint of a
    generated name in /dev/shm, or with exact=True the name itself.
    """
    if isinstance(shape, _numbers.Integral):
        shape = (int(shape),)
    if named and exact:
        raise TypeError("create(): named and exact exclude each other")
    mode = "exact" if exact else "named" if named else "anonymous"
    return Segment.create([int(n) for n in shape], _dtype_name(dtype), name, mode, order).array()


zeros = create


def open(what, *, dtype=None, shape=None, order=None):  # noqa: A001 (forklift.open, as the C++ open)
    """Opens a shared-memory array as a numpy.ndarray over its pages.

    what: a descriptor dict (from describe() here or in C++), a name (in
    /dev/shm, or the label of an anonymous segment this process holds), or an
    int file descriptor of an anonymous segment (duplicated: the caller keeps
    its own). dtype, shape and order, when given, must match the segment
    (forklift.ShmFormatError otherwise).
    """
    dt = None if dtype is None else _dtype_name(dtype)
    sh = None if shape is None else [int(n) for n in ((shape,) if isinstance(shape, _numbers.Integral) else shape)]
    if isinstance(what, dict):
        seg = Segment.open_descriptor(what)
        arr = seg.array()
        if dt is not None and arr.dtype.name != dt:
            raise ShmFormatError(f"shared memory segment '{seg.name}' holds {arr.dtype.name}, not {dt}")
        if sh is not None and list(arr.shape) != sh:
            raise ShmFormatError(f"shared memory segment '{seg.name}' has shape {arr.shape}, expected {tuple(sh)}")
        return arr
    if isinstance(what, Fd):
        what = what.fileno()
    if isinstance(what, bool) or not isinstance(what, (str, _numbers.Integral)):
        raise TypeError(f"open(): a descriptor dict, a name or an int fd, not {type(what).__name__}")
    if isinstance(what, str):
        return Segment.open_name(what, dt, sh, order).array()
    return Segment.open_fd(int(what), dt, sh, order).array()


def segment(array):
    """The forklift.Segment under a numpy view (following its bases), or None."""
    obj = array
    while obj is not None:
        if isinstance(obj, Segment):
            return obj
        obj = getattr(obj, "base", None)
    return None


def describe(array):
    """The descriptor of the segment under `array`, as C++ ShmTensor::describe() makes it.

    For an anonymous segment its "fd" is a forklift.Fd, a duplicate the dict
    owns. The descriptor is the whole segment's, whatever slice `array` is.
    """
    seg = segment(array)
    if seg is None:
        raise TypeError("describe(): this array is not a view of forklift shared memory")
    return seg.describe()


def create_ring(slots, *, slot_bytes=None, shape=None, dtype=None, policy="block", name="", named=False, exact=False,
                order="C"):
    """A new ring of `slots` slots: of `slot_bytes` bytes each, or each an array of `shape` and `dtype`.

    policy: "block" (the writer waits for a free slot), "drop-oldest" or
    "keep-latest" (the writer never waits; the reader's stats() count drops).
    Naming as in create(): anonymous by default.
    """
    if named and exact:
        raise TypeError("create_ring(): named and exact exclude each other")
    mode = "exact" if exact else "named" if named else "anonymous"
    if isinstance(shape, _numbers.Integral):
        shape = (int(shape),)
    return Ring.create(slots, slot_bytes, None if shape is None else [int(n) for n in shape],
                       None if dtype is None else _dtype_name(dtype), policy, name, mode, order)


def open_ring(descriptor):
    """Opens a ring from its describe() dict, made here or in C++ (RingBuffer::describe())."""
    return Ring.open(descriptor)
