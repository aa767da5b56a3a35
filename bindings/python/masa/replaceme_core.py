"""ReplaceMe's numerical core (masa/replaceme.h) for numpy arrays.

* :class:`LinearEstimator` -- X^T X and X^T (target - offset) accumulated in
  float64 from float32 batches, mergeable, ridge solve by Cholesky.
* :class:`CosineEstimator` -- Adam on 1 - mean cos(offset + X T, target) from
  T = I (steps on given batches, or seeded epochs over all rows).
* :func:`merge_linear_map` -- W_down <- W_down T in the row-vector or the
  nn.Linear layout.

The command-line pipeline is :mod:`masa.replaceme`. Inputs are float32
C-contiguous arrays (checked before any C call); outputs are new arrays.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, byref, c_double, c_float, c_int, c_size_t, c_ubyte
from ctypes import c_uint64, c_void_p

import numpy as np

from . import _lib
from ._arrays import FLOAT32, float32_array, pointer, seed_arg, size_arg
from ._handle import Handle
from .core import Context, _check_context, default_context

MERGE_ROW_VECTOR = 0  # W (d_ff x d), output h W
MERGE_NN_LINEAR = 1  # W (d x d_ff), nn.Linear's weight, output h W^T


class estimator_p(c_void_p):
    pass


class cosine_p(c_void_p):
    pass


class _CosineOptionsFields(Structure):
    _fields_ = [
        ("size", c_size_t),
        ("epochs", c_size_t),
        ("batch_rows", c_size_t),
        ("learning_rate", c_float),
        ("beta1", c_float),
        ("beta2", c_float),
        ("eps", c_float),
        ("seed", c_uint64),
    ]


class CosineOptions(_CosineOptionsFields):
    _fields_ = [("_tail", c_ubyte * _lib._TAIL_BYTES)]


_lib.KNOWN_SIZES[CosineOptions] = ctypes.sizeof(_CosineOptionsFields)

_S = c_int
_D = POINTER(c_double)
_SIGNATURES = {
    "masa_linear_estimator_create": (
        _S, [_lib.context_p, c_size_t, c_size_t, POINTER(estimator_p)], True),
    "masa_linear_estimator_destroy": (None, [estimator_p], False),
    "masa_linear_estimator_shape": (
        _S, [estimator_p, POINTER(c_size_t), POINTER(c_size_t)], True),
    "masa_linear_estimator_accumulate": (
        _S, [estimator_p, c_size_t, c_void_p, c_void_p, c_void_p], True),
    "masa_linear_estimator_merge": (_S, [estimator_p, estimator_p], True),
    "masa_linear_estimator_reset": (_S, [estimator_p], True),
    "masa_linear_estimator_rows": (_S, [estimator_p, POINTER(c_uint64)], True),
    "masa_linear_estimator_stats": (_S, [estimator_p, c_void_p, c_void_p], True),
    "masa_linear_estimator_solve": (_S, [estimator_p, c_double, c_void_p], True),
    "masa_cosine_options_default": (None, [POINTER(CosineOptions), c_size_t], False),
    "masa_cosine_estimator_create": (
        _S,
        [_lib.context_p, c_size_t, c_size_t, POINTER(CosineOptions), POINTER(cosine_p)],
        True,
    ),
    "masa_cosine_estimator_destroy": (None, [cosine_p], False),
    "masa_cosine_estimator_transform": (_S, [cosine_p, c_void_p], True),
    "masa_cosine_estimator_set_transform": (_S, [cosine_p, c_void_p], True),
    "masa_cosine_estimator_steps": (_S, [cosine_p, POINTER(c_uint64)], True),
    "masa_cosine_estimator_loss": (
        _S, [cosine_p, c_size_t, c_void_p, c_void_p, c_void_p, _D], True),
    "masa_cosine_estimator_step": (
        _S, [cosine_p, c_size_t, c_void_p, c_void_p, c_void_p, _D], True),
    "masa_cosine_estimator_fit": (
        _S, [cosine_p, c_size_t, c_void_p, c_void_p, c_void_p, c_void_p], True),
    "masa_merge_linear_map": (
        _S, [_lib.context_p, c_int, c_size_t, c_size_t, c_void_p, c_void_p, c_void_p],
        True),
}

# The loaded libmasa with this module's functions declared (once).
_c = _lib.lazy_declarations(_SIGNATURES, "ReplaceMe")

def _rows(x, target, offset, d_in, d_out):
    """Checks a batch: x (rows, d_in), target and offset (rows, d_out)."""
    float32_array(x, "x", (None, d_in))
    rows = x.shape[0]
    float32_array(target, "target", (rows, d_out))
    if offset is not None:
        float32_array(offset, "offset", (rows, d_out))
    return rows


def _ptr(a):
    return None if a is None else pointer(a)


class LinearEstimator(Handle):
    """Least-squares estimator of T (d_in x d_out) with X T ~ target - offset.

    ``accumulate(m, l, y)`` for ReplaceMe (M, L, Y rows), then
    ``solve(alpha)`` gives T = (M^T M + alpha I)^-1 M^T (L - Y).
    """

    def __init__(self, d_in, d_out, context: Context | None = None):
        ctx = context or default_context()
        self.d_in, self.d_out = size_arg(d_in, "d_in"), size_arg(d_out, "d_out")
        out = estimator_p()
        _c().masa_linear_estimator_create(_check_context(ctx), self.d_in, self.d_out, byref(out))
        self._init_handle(out, _c().masa_linear_estimator_destroy, [ctx])
        ctx._adopt(self)

    def accumulate(self, x, target, offset=None) -> "LinearEstimator":
        rows = _rows(x, target, offset, self.d_in, self.d_out)
        _c().masa_linear_estimator_accumulate(
            self._handle(), rows, _ptr(x), _ptr(target), _ptr(offset))
        return self

    def merge(self, other: "LinearEstimator") -> "LinearEstimator":
        """self += other (statistics and row count)."""
        if not isinstance(other, LinearEstimator):
            raise TypeError("other must be a LinearEstimator")
        _c().masa_linear_estimator_merge(self._handle(), other._handle())
        return self

    def reset(self) -> "LinearEstimator":
        _c().masa_linear_estimator_reset(self._handle())
        return self

    @property
    def rows(self) -> int:
        n = c_uint64()
        _c().masa_linear_estimator_rows(self._handle(), byref(n))
        return n.value

    def stats(self):
        """(X^T X, X^T Z) as new float64 arrays."""
        xtx = np.empty((self.d_in, self.d_in))
        xtz = np.empty((self.d_in, self.d_out))
        _c().masa_linear_estimator_stats(self._handle(), xtx.ctypes.data, xtz.ctypes.data)
        return xtx, xtz

    def solve(self, alpha=0.0) -> np.ndarray:
        """T (d_in x d_out, float32) = (X^T X + alpha I)^-1 X^T Z."""
        t = np.empty((self.d_in, self.d_out), dtype=FLOAT32)
        _c().masa_linear_estimator_solve(self._handle(), float(alpha), t.ctypes.data)
        return t


def cosine_options(epochs=None, batch_rows=None, learning_rate=None, beta1=None,
                   beta2=None, eps=None, seed=None) -> CosineOptions:
    """The library's defaults with the given fields changed."""
    opt = _lib.init_struct(CosineOptions, _c().masa_cosine_options_default)
    for name, value in (("epochs", epochs), ("batch_rows", batch_rows)):
        if value is not None:
            setattr(opt, name, size_arg(value, name))
    for name, value in (("learning_rate", learning_rate), ("beta1", beta1),
                        ("beta2", beta2), ("eps", eps)):
        if value is not None:
            setattr(opt, name, float(value))
    if seed is not None:
        opt.seed = seed_arg(seed)
    return opt


class CosineEstimator(Handle):
    """Adam on 1 - mean cos(offset + X T, target) from T = I.

    Keyword options as :func:`cosine_options` (defaults: 10 epochs, lr 1e-4,
    1024 rows per batch, betas 0.9/0.999, eps 1e-8, seed 0).
    """

    def __init__(self, d_in, d_out, context: Context | None = None, **options):
        ctx = context or default_context()
        self.d_in, self.d_out = size_arg(d_in, "d_in"), size_arg(d_out, "d_out")
        opt = cosine_options(**options)
        self.epochs = opt.epochs
        out = cosine_p()
        _c().masa_cosine_estimator_create(
            _check_context(ctx), self.d_in, self.d_out, byref(opt), byref(out))
        self._init_handle(out, _c().masa_cosine_estimator_destroy, [ctx])
        ctx._adopt(self)

    @property
    def transform(self) -> np.ndarray:
        t = np.empty((self.d_in, self.d_out), dtype=FLOAT32)
        _c().masa_cosine_estimator_transform(self._handle(), t.ctypes.data)
        return t

    def set_transform(self, t) -> "CosineEstimator":
        """Starts from T = t and restarts Adam."""
        float32_array(t, "t", (self.d_in, self.d_out))
        _c().masa_cosine_estimator_set_transform(self._handle(), t.ctypes.data)
        return self

    @property
    def steps(self) -> int:
        n = c_uint64()
        _c().masa_cosine_estimator_steps(self._handle(), byref(n))
        return n.value

    def loss(self, x, target, offset=None) -> float:
        rows = _rows(x, target, offset, self.d_in, self.d_out)
        out = c_double()
        _c().masa_cosine_estimator_loss(
            self._handle(), rows, _ptr(x), _ptr(target), _ptr(offset), byref(out))
        return out.value

    def step(self, x, target, offset=None) -> float:
        """One Adam step on exactly these rows; returns the loss before it."""
        rows = _rows(x, target, offset, self.d_in, self.d_out)
        out = c_double()
        _c().masa_cosine_estimator_step(
            self._handle(), rows, _ptr(x), _ptr(target), _ptr(offset), byref(out))
        return out.value

    def fit(self, x, target, offset=None) -> np.ndarray:
        """The options' epochs of shuffled batches; returns each epoch's mean
        batch loss (float64, before the steps)."""
        rows = _rows(x, target, offset, self.d_in, self.d_out)
        losses = np.empty(self.epochs)
        _c().masa_cosine_estimator_fit(
            self._handle(), rows, _ptr(x), _ptr(target), _ptr(offset), losses.ctypes.data)
        return losses


def epoch_orders(rows, epochs, seed):
    """The row order of each epoch of CosineEstimator.fit (masa/replaceme.h's
    splitmix64 Fisher-Yates), for reproducing a fit elsewhere."""
    mask = (1 << 64) - 1
    state = seed & mask
    order = list(range(rows))
    out = []
    for _ in range(epochs):
        for i in range(rows - 1, 0, -1):
            state = (state + 0x9E3779B97F4A7C15) & mask
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            z ^= z >> 31
            j = z % (i + 1)
            order[i], order[j] = order[j], order[i]
        out.append(np.array(order))
    return out


def merge_linear_map(w, t, layout="nn.Linear", bias=None, context: Context | None = None):
    """W_down <- W_down T in place (and bias <- bias T).

    layout "nn.Linear": w is (d, d_ff) as PyTorch stores it (w <- T^T w);
    "row-vector": w is (d_ff, d) (w <- w T). t is (d, d).
    """
    ctx = context or default_context()
    if layout in ("nn.Linear", MERGE_NN_LINEAR):
        code = MERGE_NN_LINEAR
        float32_array(w, "w", (None, None), writeable=True)
        d, d_ff = w.shape
    elif layout in ("row-vector", MERGE_ROW_VECTOR):
        code = MERGE_ROW_VECTOR
        float32_array(w, "w", (None, None), writeable=True)
        d_ff, d = w.shape
    else:
        raise ValueError(f"layout must be 'nn.Linear' or 'row-vector', got {layout!r}")
    float32_array(t, "t", (d, d))
    if bias is not None:
        float32_array(bias, "bias", (d,), writeable=True)
    _c().masa_merge_linear_map(_check_context(ctx), code, d_ff, d, _ptr(w), _ptr(bias), _ptr(t))
    return w
