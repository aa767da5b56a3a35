"""Make the package importable from a source checkout (no install needed)
and provide shared fixtures."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)  # bindings/python
if PKG_ROOT not in sys.path:
    sys.path.insert(0, PKG_ROOT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def ctx():
    import masa

    c = masa.Context(n_threads=2)
    yield c
    c.close()


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)
