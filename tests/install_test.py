#!/usr/bin/env python3
"""Installs the build into a temporary tree and uses it as a user would.

  install_test.py --meson MESON --build BUILDDIR --source SRCDIR [--results DIR]

Cases (each one a test case in the XML file the suite's summary counts):
  installed_tool_runs    `meson install --destdir` of the built tree; the
                         installed forklift-shm runs with no LD_LIBRARY_PATH
                         and loads the installed libforklift (not another);
  headers_installed      every public header of the source tree is installed;
  pkgconfig_consumer     tests/consumer, built against the installed tree
                         through pkg-config (PKG_CONFIG_PATH only: forklift.pc
                         is relocatable), runs and prints its result;
  subproject_configures  tests/consumer with forklift in subprojects/
                         configures (dependency('forklift') resolves to the
                         subproject's override). Not built: that would
                         compile the library again.
Nothing is rebuilt: the installed files are the build's own.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from slowdown import slow
from xml.sax.saxutils import escape, quoteattr


class Failed(Exception):
    pass


MESON = ["meson"]
BUILD = "."


def run(cmd, timeout, env=None, cwd=None):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=slow(timeout),
                       env=env, cwd=cwd)
    if p.returncode != 0:
        raise Failed(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stdout[-4000:]}")
    return p.stdout


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "PKG_CONFIG_PATH", "PKG_CONFIG_SYSROOT_DIR", "MESON_TESTTHREADS")}
    env.update(extra)
    return env


def build_option(name):
    out = subprocess.run(MESON + ["introspect", "--buildoptions", BUILD], stdout=subprocess.PIPE, text=True,
                         timeout=slow(60), check=True).stdout
    for o in json.loads(out):
        if o["name"] == name:
            return o["value"]
    return None


def sanitizer_options():
    # A sanitized library needs a sanitized program (its runtime comes first).
    s = build_option("b_sanitize")
    return [] if s in (None, "none") else ["-Db_sanitize=" + s, "-Db_lundef=false"]


def find_one(root, name):
    hits = [os.path.join(d, name) for d, _, files in os.walk(root) if name in files]
    if len(hits) != 1:
        raise Failed(f"expected one installed {name} under {root}, found {hits}")
    return hits[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meson", required=True)
    ap.add_argument("--build", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--results", default="")
    # Header folders of optional libraries this build does not make (e.g.
    # forklift/cluster without MPI): not installed, so not looked for.
    ap.add_argument("--not-built", action="append", default=[])
    a = ap.parse_args()
    meson = [a.meson] if not a.meson.endswith(".py") else [sys.executable, a.meson]
    global MESON, BUILD
    MESON, BUILD = meson, a.build

    tmp = tempfile.mkdtemp(prefix="forklift-install-")
    root = os.path.join(tmp, "root")
    state = {}
    cases = []

    def case(name, fn):
        t0 = time.monotonic()
        try:
            fn()
            cases.append((name, time.monotonic() - t0, None))
            print(f"ok: {name} ({time.monotonic() - t0:.1f} s)")
        except (Failed, subprocess.TimeoutExpired, OSError) as e:
            cases.append((name, time.monotonic() - t0, str(e)))
            print(f"FAIL: {name}: {e}")

    def installed_tool_runs():
        run(meson + ["install", "-C", a.build, "--destdir", root, "--no-rebuild", "--quiet"], 120)
        tool = find_one(root, "forklift-shm")
        pc = find_one(root, "forklift.pc")
        state.update(tool=tool, pc=pc, libdir=os.path.dirname(os.path.dirname(pc)))
        out = run([tool, "list"], 30, env=clean_env())
        if not out.startswith("NAME"):
            raise Failed(f"forklift-shm list printed no table:\n{out}")
        # The library it loads is the installed one, found through its rpath.
        ldd = run(["ldd", tool], 30, env=clean_env())
        lib = [l for l in ldd.splitlines() if "libforklift" in l]
        if len(lib) != 1 or os.path.realpath(state["libdir"]) not in os.path.realpath(lib[0].split("=>")[1].split()[0]):
            raise Failed(f"forklift-shm does not load the installed libforklift:\n{ldd}")
        # forklift-ps too: it prints its table header with no LD_LIBRARY_PATH.
        ps = run([find_one(root, "forklift-ps")], 30, env=clean_env())
        if not ps.startswith("PID"):
            raise Failed(f"the installed forklift-ps printed no table:\n{ps}")

    def headers_installed():
        if "pc" not in state:
            raise Failed("nothing installed")
        src_inc = os.path.join(a.source, "include")
        inc = find_one(root, "forklift.hpp")
        inc_dir = os.path.dirname(inc)
        missing = []
        for d, _, files in os.walk(src_inc):
            for f in files:
                if f.endswith(".hpp"):
                    rel = os.path.relpath(os.path.join(d, f), src_inc)
                    if any(rel.startswith(n.rstrip("/") + "/") for n in a.not_built):
                        continue
                    if not os.path.isfile(os.path.join(inc_dir, rel)):
                        missing.append(rel)
        if missing:
            raise Failed(f"headers not installed (include/forklift/meson.build): {sorted(missing)}")

    def pkgconfig_consumer():
        if "pc" not in state:
            raise Failed("nothing installed")
        src = os.path.join(tmp, "consumer")
        shutil.copytree(os.path.join(a.source, "tests", "consumer"), src)
        env = clean_env(PKG_CONFIG_PATH=os.path.dirname(state["pc"]))
        bdir = os.path.join(tmp, "consumer-build")
        run(meson + ["setup", bdir, src] + sanitizer_options(), 120, env=env)
        run(["ninja", "-C", bdir], 240, env=env)
        # The consumer's own binary has no rpath to the installed library
        # (a user's /usr/local install is in ld.so.conf; this tree is not).
        out = run([os.path.join(bdir, "consumer")], 30,
                  env=clean_env(LD_LIBRARY_PATH=state["libdir"]))
        if "consumer: 7 squared is 49" not in out:
            raise Failed(f"the consumer printed:\n{out}")

    def subproject_configures():
        src = os.path.join(tmp, "consumer-sub")
        shutil.copytree(os.path.join(a.source, "tests", "consumer"), src)
        os.makedirs(os.path.join(src, "subprojects"))
        os.symlink(os.path.abspath(a.source), os.path.join(src, "subprojects", "forklift"))
        out = run(meson + ["setup", "--wrap-mode=forcefallback", os.path.join(tmp, "consumer-sub-build"), src],
                  120, env=clean_env())
        if "Dependency forklift found: YES" not in out or "(overridden)" not in out:
            raise Failed(f"forklift was not used as a subproject:\n{out[-3000:]}")

    try:
        case("installed_tool_runs", installed_tool_runs)
        case("headers_installed", headers_installed)
        case("pkgconfig_consumer", pkgconfig_consumer)
        case("subproject_configures", subproject_configures)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    failures = sum(1 for c in cases if c[2])
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        body = ""
        for name, took, err in cases:
            fail = f"<failure message={quoteattr(err[:200])}>{escape(err)}</failure>" if err else ""
            body += f'<testcase name="{name}" time="{took:.3f}">{fail}</testcase>'
        with open(os.path.join(a.results, "install_test.xml"), "w") as f:
            f.write(f'<?xml version="1.0"?>\n<testsuites tests="{len(cases)}" failures="{failures}" disabled="0" '
                    f'errors="0"><testsuite name="install" tests="{len(cases)}" failures="{failures}">'
                    f'{body}</testsuite></testsuites>\n')
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
