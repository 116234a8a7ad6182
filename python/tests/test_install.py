"""`import forklift` from an installed prefix, moved after the install (the rpath is $ORIGIN-relative)."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

BUILD = os.environ.get("FORKLIFT_BUILD")

PROBE = r"""
import forklift, numpy as np
a = forklift.create((3, 4), "float16")
a[...] = 2
b = forklift.open(forklift.describe(a))
assert float(b.sum()) == 24.0
maps = open("/proc/self/maps").read()
libs = {l.split()[-1] for l in maps.splitlines() if "libforklift" in l}
print(forklift.__file__)
print(*sorted(libs))
"""


@pytest.mark.skipif(not BUILD, reason="FORKLIFT_BUILD (the build tree) is set by meson test")
def test_installed_tree_imports_after_a_move(tmp_path):
    # The installed files of the runtime: the library, the tools (built by a
    # full build, as tools/dev test makes), the module and the package.
    missing = [t for t in ("forklift-shm", "forklift-ps", "forklift-soak")
               if not os.path.exists(os.path.join(BUILD, "tools", t))]
    if missing:
        pytest.skip(f"the build tree is not fully built (no tools/{missing[0]}): ninja -C {BUILD}")
    stage = tmp_path / "stage"
    subprocess.run(["meson", "install", "-C", BUILD, "--no-rebuild", "--quiet", "--tags", "runtime,python-runtime",
                    "--destdir", str(stage)], check=True, capture_output=True, timeout=120)
    moved = tmp_path / "moved"
    shutil.move(str(stage), str(moved))
    inits = glob.glob(str(moved / "**" / "forklift" / "__init__.py"), recursive=True)
    assert len(inits) == 1, inits
    site = os.path.dirname(os.path.dirname(inits[0]))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    env["PYTHONPATH"] = site
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=30,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    init, libs = out.stdout.splitlines()
    assert init == inits[0]
    assert libs and all(lib.startswith(str(moved)) for lib in libs.split()), libs
