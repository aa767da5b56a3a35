"""numpy argument checks, done before any C call.

Wrong type or dtype -> TypeError; wrong shape, layout, alignment,
writeability or overlapping buffers -> ValueError.
"""

from __future__ import annotations

import operator
import threading

import numpy as np

FLOAT32 = np.dtype(np.float32)
_SIZE_MAX = 2**64 - 1


def size_arg(value, name):
    """A non-negative integer that fits size_t (ctypes would wrap -1)."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if v < 0 or v > _SIZE_MAX:
        raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return v


def seed_arg(value, name="seed"):
    return size_arg(value, name)  # uint64_t has the same range


def float32_array(a, name, shape=None, writeable=False):
    """Check that `a` is a float32, C-contiguous, aligned numpy array of the
    given shape (None entries match any size). Returns `a` unchanged."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != FLOAT32:
        raise TypeError(f"{name} must have dtype float32 (native byte order), got {a.dtype}")
    if shape is not None:
        if a.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(a.shape, shape)
        ):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    if not a.flags.aligned:
        raise ValueError(f"{name} is not aligned for float32")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return a


def pointer(a):
    """Address of a checked array's first element."""
    return a.ctypes.data


def check_no_overlap(named_arrays):
    """ValueError if any two of the (name, array) pairs share memory."""
    items = [(n, a) for n, a in named_arrays if a is not None]
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            if np.may_share_memory(items[i][1], items[j][1]):
                raise ValueError(f"{items[i][0]} and {items[j][0]} must not overlap")


class _Scratch(threading.local):
    buf = None


_scratch = _Scratch()


def workspace(nbytes):
    """A per-thread scratch buffer of at least nbytes (float-aligned), reused
    across calls. Calls on one thread never overlap, so sharing it between
    layers is safe; other threads get their own."""
    need = max(1, (nbytes + 3) // 4)
    buf = _scratch.buf
    if buf is None or buf.size < need:
        buf = np.empty(need, dtype=FLOAT32)
        _scratch.buf = buf
    return buf


def release_workspace():
    """Free this thread's scratch buffer."""
    _scratch.buf = None
