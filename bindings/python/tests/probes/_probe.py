"""Shared set-up of the issue-19 probes: each probe is a script run in its
own process (by test_safety.py natively, by scripts/hardening.sh under
valgrind) that exits 0 only when every case ended in a correct result or a
clear error; a crash or a hang fails it from outside."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
for path in (os.path.dirname(TESTS), TESTS):  # the package, then helpers
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402

import masa  # noqa: E402
from helpers import assert_close, build_layer, reference_grads  # noqa: E402,F401


# Under valgrind (scripts/hardening.sh sets PROBE_QUICK=1) loops run fewer
# times: every case still runs, the races just get fewer chances.
QUICK = os.environ.get("PROBE_QUICK") == "1"


def reps(n):
    return max(2, n // 10) if QUICK else n


def x_of(rng, batch=2, seq=4, d=8):
    return rng.standard_normal((batch, seq, d)).astype(np.float32)


def expect_raises(kind, call, what, match=None):
    try:
        call()
    except kind as e:
        if match is not None and match not in str(e):
            raise AssertionError(f"{what}: {type(e).__name__} without {match!r}: {e}") from e
        return e
    raise AssertionError(f"{what}: no {kind.__name__} raised")


def done(name):
    print(f"{name}: ok")
    sys.stdout.flush()
