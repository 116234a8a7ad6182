"""Shared fixtures: every test leaves nothing in /dev/shm and no process behind."""

import gc
import os
import socket
import subprocess

import pytest

PEER = os.environ.get("FORKLIFT_PEER") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build", "python", "tests", "peer")


def _children():
    pid = os.getpid()
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return out


# The pids whose forklift segments a test may make: this process and the
# peers it started. Other programs' files in /dev/shm (other test runs on the
# machine) are none of a test's business: only names "fk.<one of these>."
# are looked at, and only those are cleaned.
PIDS = {os.getpid()}


def _ours():
    return {n for n in os.listdir("/dev/shm") if any(n.startswith(f"fk.{p}.") for p in PIDS)}


@pytest.fixture(autouse=True)
def leaves_nothing():
    shm_before = _ours()
    children_before = _children()
    yield
    gc.collect()
    gc.collect()
    left = _ours() - shm_before
    children = _children() - children_before
    for name in left:  # cleaned, so one failure does not fail the tests after it
        try:
            os.unlink("/dev/shm/" + name)
        except OSError:
            pass
    assert not left, f"left in /dev/shm: {sorted(left)}"
    assert not children, f"child processes left: {sorted(children)}"


class Peer:
    """The C++ peer (tests/peer.cpp) on the other end of a SOCK_SEQPACKET socket."""

    def __init__(self, *args):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([PEER, str(theirs.fileno()), *map(str, args)], pass_fds=[theirs.fileno()],
                                     stdout=subprocess.PIPE, text=True)
        PIDS.add(self.proc.pid)
        theirs.close()

    def recv_descriptor(self):
        import json
        import forklift
        data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16)
        owned = [forklift.Fd.adopt(fd) for fd in fds]

        def hook(d):
            return owned[d["__fd__"]] if set(d) == {"__fd__"} else d
        return json.loads(data.decode(), object_hook=hook)

    def send_descriptor(self, descriptor):
        import json
        import forklift
        fds = []

        def enc(v):
            if isinstance(v, forklift.Fd):
                fds.append(v.fileno())
                return {"__fd__": len(fds) - 1}
            if isinstance(v, dict):
                return {k: enc(e) for k, e in v.items()}
            if isinstance(v, list):
                return [enc(e) for e in v]
            return v
        text = json.dumps(enc(descriptor)).encode()
        socket.send_fds(self.sock, [text], fds)

    def send_byte(self):
        self.sock.send(b"x")

    def recv_byte(self, timeout=30):
        self.sock.settimeout(timeout)
        return self.sock.recv(1)

    def finish(self, timeout=60):
        out, _ = self.proc.communicate(timeout=timeout)
        self.sock.close()
        return self.proc.returncode, out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        self.sock.close()


@pytest.fixture
def peer():
    made = []

    def start(*args):
        p = Peer(*args)
        made.append(p)
        return p
    yield start
    for p in made:
        p.kill()


def pytest_unconfigure(config):
    """Copies the counts of pytest's <testsuite> onto the JUnit file's root.

    tools/dev counts test cases from the root element of every file in
    test-results/ (GoogleTest's <testsuites tests=...>); pytest leaves its
    root bare. Runs after the junitxml plugin wrote the file.
    """
    path = getattr(config.option, "xmlpath", None)
    if not path or not os.path.exists(path):
        return
    import xml.etree.ElementTree as ET
    tree = ET.parse(path)
    root = tree.getroot()
    if root.tag != "testsuites":
        return
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(sum(int(s.get(key, 0)) for s in root.iter("testsuite"))))
    tree.write(path, encoding="utf-8", xml_declaration=True)
