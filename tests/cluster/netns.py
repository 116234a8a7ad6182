"""Fake hosts for the cluster's tests: network namespaces this test makes,
joined by a bridge in a namespace of their own, so the host's own network
is never touched.

    with Hosts(3) as hosts:          # fk<pid>a, fk<pid>b, fk<pid>c + fk<pid>br
        hosts.mpirun_argv(mpirun, exe, ...)   # run it with hosts.run(...)

Each host namespace has loopback up and one veth whose peer is on the
bridge; the addresses are 198.18.0.1, .2, ... (198.18.0.0/15 is set aside
for network benchmarks, RFC 2544) and the bridge has 198.18.0.254, where
mpirun runs. An `rsh` agent script replaces ssh: it runs the command in the
host's namespace (`ip netns exec`) with its own host name (`unshare -u`;
Open MPI tells hosts apart by name). Each namespace gets an /etc/hosts of its
own (`ip netns exec` bind-mounts /etc/netns/<ns>/hosts), so the names
resolve only there. Leaving the `with` block kills whatever still runs in
the namespaces and removes everything made; `stale()` names what an earlier
run whose process is dead left behind, `remove_stale()` removes it.
"""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

NET = "198.18.0"
BRIDGE_ADDR = NET + ".254"
_NAME = re.compile(r"^fk(\d+)(br|[a-z])$")


class Skip(Exception):
    """Why this machine cannot run the test (the caller exits 77)."""


def _ip(*args, check=True):
    p = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stdout.strip()}")
    return p


def namespaces():
    p = _ip("netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def pids_in(ns):
    p = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _kill_all_in(ns):
    for pid in pids_in(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stale():
    """Namespaces of this helper whose creating process is dead."""
    return [ns for ns in namespaces() if (m := _NAME.match(ns)) and not _alive(int(m.group(1)))]


def remove_stale():
    gone = []
    for ns in stale():
        _kill_all_in(ns)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        gone.append(ns)
    for d in os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else []:
        m = _NAME.match(d)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(f"/etc/netns/{d}", ignore_errors=True)
    return gone


def check_can_run():
    """Raises Skip with the reason when namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise Skip("not root: making network namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN")
    if shutil.which("ip") is None:
        raise Skip("no `ip` (iproute2)")
    if shutil.which("unshare") is None:
        raise Skip("no `unshare` (util-linux)")
    if not os.path.exists("/proc/self/ns/net"):
        raise Skip("the kernel has no network namespaces")
    probe = f"fk{os.getpid()}z"
    p = _ip("netns", "add", probe, check=False)
    if p.returncode != 0:
        raise Skip(f"cannot make a network namespace: {p.stdout.strip()}")
    q = _ip("-n", probe, "link", "add", "probe0", "type", "bridge", check=False)
    _ip("netns", "del", probe, check=False)
    if q.returncode != 0:
        raise Skip(f"cannot make a bridge in a namespace: {q.stdout.strip()}")


class Hosts:
    def __init__(self, count):
        self.base = f"fk{os.getpid()}"
        self.names = [self.base + chr(ord("a") + i) for i in range(count)]
        self.bridge_ns = self.base + "br"
        self.addrs = [f"{NET}.{i + 1}" for i in range(count)]
        self.made = []
        self.dir = None

    def __enter__(self):
        try:
            self._make()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def _add_ns(self, ns):
        self.made.append(ns)  # first: an `ip` killed half-way leaves an entry too
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _make(self):
        self.dir = tempfile.mkdtemp(prefix=self.base + ".")
        self.made_etc_netns = not os.path.isdir("/etc/netns")
        self._add_ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "addr", "add", BRIDGE_ADDR + "/24", "dev", "br0")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addrs)):
            self._add_ns(ns)
            # Both ends made inside namespaces of ours: the host's never sees them.
            port = f"port{i}"
            _ip("-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", addr + "/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(self.addrs, self.names))
        hosts += f"{BRIDGE_ADDR} {self.bridge_ns}\n"
        for ns in self.made:
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write(hosts)
        self.hostfile = os.path.join(self.dir, "hosts")
        with open(self.hostfile, "w") as f:
            f.write("".join(f"{n} slots=1\n" for n in self.names))
        # Open MPI runs `<agent> [options] <host> <command words...>`, the
        # words meant for a remote shell.
        self.agent = os.path.join(self.dir, "netns-rsh")
        allowed = "|".join(self.names)
        with open(self.agent, "w") as f:
            f.write(f"""#!/bin/sh
# rsh agent of a forklift test: runs the command in the host's namespace.
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host="$1"; shift
case "$host" in
  {allowed}) ;;
  *) echo "netns-rsh: $host is not a namespace of this test" >&2; exit 255 ;;
esac
exec ip netns exec "$host" unshare -u sh -c 'hostname "$1" && exec /bin/sh -c "$2"' netns-rsh "$host" "$*"
""")
        os.chmod(self.agent, 0o700)
        # The bridge answers from every host's namespace before MPI starts.
        for ns in self.names:
            p = _ip("netns", "exec", ns, "ping", "-c", "1", "-W", "5", BRIDGE_ADDR, check=False) \
                if shutil.which("ping") else None
            if p is not None and p.returncode != 0:
                raise RuntimeError(f"{ns} does not reach the bridge: {p.stdout.strip()}")

    def mpirun_argv(self, mpirun, program, extra_mca=()):
        """The command that runs `program` (a list) on every host, from the
        bridge's namespace."""
        net = NET + ".0/24"
        return ["ip", "netns", "exec", self.bridge_ns, mpirun, "--allow-run-as-root",
                "--hostfile", self.hostfile, "-np", str(len(self.names)),
                "--mca", "plm_rsh_agent", self.agent,
                "--mca", "plm_rsh_no_tree_spawn", "1",
                "--mca", "oob_tcp_if_include", net,
                "--mca", "btl", "tcp,self",
                "--mca", "btl_tcp_if_include", net,
                *extra_mca, *program]

    def port_bytes(self):
        """Bytes each host's veth moved through the bridge (rx + tx of its
        port), by host name."""
        out = {}
        for i, ns in enumerate(self.names):
            total = 0
            for way in ("rx_bytes", "tx_bytes"):
                p = _ip("netns", "exec", self.bridge_ns, "cat", f"/sys/class/net/port{i}/statistics/{way}")
                total += int(p.stdout.strip())
            out[ns] = total
        return out

    def leftovers(self):
        """Processes still running in the namespaces, by namespace."""
        return {ns: pids_in(ns) for ns in self.made if pids_in(ns)}

    def remove(self):
        for ns in reversed(self.made):
            _kill_all_in(ns)
        deadline = time.monotonic() + 10
        while any(pids_in(ns) for ns in self.made) and time.monotonic() < deadline:
            time.sleep(0.05)
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self.made = []
        if getattr(self, "made_etc_netns", False):
            try:
                os.rmdir("/etc/netns")  # only when empty: another run may use it now
            except OSError:
                pass
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
