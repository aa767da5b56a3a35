"""Issue 19: each probe in probes/ runs in its own process and must exit 0
(every case a correct result or a clear error): a crash (signal), a hang
(timeout) or a wrong result fails it. scripts/hardening.sh runs the same
probes under valgrind."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROBES = sorted(f for f in os.listdir(os.path.join(HERE, "probes")) if f.startswith("p"))


@pytest.mark.parametrize("probe", PROBES)
def test_probe(probe):
    if probe.startswith("p4") and not _have_torch():
        pytest.skip("needs torch")
    run = subprocess.run([sys.executable, os.path.join(HERE, "probes", probe)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (
        f"{probe} exited with {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}")
    assert run.stdout.strip().endswith(": ok"), run.stdout


def _have_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
