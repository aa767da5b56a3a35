"""Compressing pretrained weights with libmasa (numpy): Matrix PCA, the
grouping planner, calibration statistics and the whitened low-rank residual.

The functions follow include/masa/compress.h (the reference documentation);
shapes use the library's row-vector convention, W of shape (d_in, d_out)
(PyTorch's nn.Linear stores the transpose: pass ``linear.weight.T``).

    import numpy as np, masa
    from masa import compression as mc
    ctx = masa.Context()
    mats = [np.asarray(w, np.float32) for w in layer_weights]   # L x (d_in, d_out)
    g = mc.gram(ctx, mats)
    plan = mc.plan_groups(ctx, g, mats[0].shape, budget=len(mats) * mats[0].size // 3)
    pca = mc.matrix_pca(ctx, mats[0:4], n_atoms=2)
    calib = mc.Calibration(ctx, dim=mats[0].shape[0]); calib.accumulate(x_rows)
    res = mc.residual_lowrank(ctx, mats[0], rank=16, w_hat=pca.reconstruction(0), calib=calib)

Errors raise :class:`masa.MasaError` subclasses with the library's message;
argument types and shapes are checked here first (TypeError / ValueError).
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, byref, c_double, c_size_t, c_uint64, c_void_p
from typing import NamedTuple, Optional, Sequence

import numpy as np

from . import _lib
from ._arrays import FLOAT32, float32_array, size_arg
from ._handle import Handle
from .core import Coefficients, Dictionary, _check_context

FLOAT64 = np.dtype(np.float64)


class calib_p(c_void_p):
    pass


# Result structs: the fields of compress.h, then spare bytes so a newer
# library (a larger struct) never writes past them.
_TAIL_BYTES = 256


class _PcaResultFields(Structure):
    _fields_ = [
        ("size", c_size_t),
        ("rank", c_size_t),
        ("total_energy", c_double),
        ("captured_energy", c_double),
        ("residual_energy", c_double),
    ]


class _GroupPlanResultFields(Structure):
    _fields_ = [
        ("size", c_size_t),
        ("n_groups", c_size_t),
        ("params", c_size_t),
        ("error", c_double),
        ("total_energy", c_double),
    ]


class _ResidualResultFields(Structure):
    _fields_ = [
        ("size", c_size_t),
        ("error_before", c_double),
        ("error_after", c_double),
        ("dropped", c_double),
        ("jitter", c_double),
    ]


def _result(fields):
    """A zeroed result struct whose size field is the size this binding
    knows (the library fills what it knows of that)."""
    s = fields()
    s.size = ctypes.sizeof(fields)
    return s


_status = ctypes.c_int
_dp = POINTER(c_double)
_szp = POINTER(c_size_t)
_ctx = _lib.context_p

SIGNATURES = {
    "masa_gram": (_status, [_ctx, c_size_t, c_size_t, c_size_t, c_void_p, c_void_p, c_size_t]),
    "masa_gram_eigenvalues": (_status, [_ctx, c_size_t, c_void_p, c_size_t, c_void_p]),
    "masa_pca_result_default": (None, [POINTER(_PcaResultFields), c_size_t]),
    "masa_matrix_pca": (
        _status,
        [_ctx, c_size_t, c_size_t, c_size_t, c_void_p, c_void_p, c_size_t, c_size_t,
         c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, POINTER(_PcaResultFields)],
    ),
    "masa_group_plan_result_default": (None, [POINTER(_GroupPlanResultFields), c_size_t]),
    "masa_group_plan": (
        _status,
        [_ctx, c_size_t, c_void_p, c_size_t, c_size_t, c_size_t, c_void_p, c_void_p,
         c_size_t, POINTER(_GroupPlanResultFields)],
    ),
    "masa_group_plan_fixed": (
        _status,
        [_ctx, c_size_t, c_void_p, c_size_t, c_size_t, c_size_t, c_size_t, c_void_p,
         c_void_p, POINTER(_GroupPlanResultFields)],
    ),
    "masa_calib_create": (_status, [_ctx, c_size_t, POINTER(calib_p)]),
    "masa_calib_create_from_data": (
        _status, [_ctx, c_size_t, c_void_p, c_uint64, POINTER(calib_p)]),
    "masa_calib_destroy": (None, [calib_p]),
    "masa_calib_accumulate": (_status, [calib_p, c_void_p, c_size_t]),
    "masa_calib_merge": (_status, [calib_p, calib_p]),
    "masa_calib_shape": (_status, [calib_p, _szp, POINTER(c_uint64)]),
    "masa_calib_data": (c_void_p, [calib_p]),
    "masa_residual_result_default": (None, [POINTER(_ResidualResultFields), c_size_t]),
    "masa_residual_lowrank": (
        _status,
        [_ctx, c_size_t, c_size_t, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p,
         c_size_t, c_void_p, c_size_t, POINTER(_ResidualResultFields)],
    ),
}

# The library with these functions declared (once, on first use).
_c = _lib.lazy_declarations(
    {name: (restype, argtypes, restype is _status)
     for name, (restype, argtypes) in SIGNATURES.items()}, "compression")

def _float64_array(a, name, shape=None):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != FLOAT64:
        raise TypeError(f"{name} must have dtype float64, got {a.dtype}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not a.flags.c_contiguous or not a.flags.aligned:
        raise ValueError(f"{name} must be C-contiguous and aligned (numpy.ascontiguousarray)")
    return a


def _stack(mats, name="mats"):
    """(pointer array, list of checked arrays, (rows, cols)) for a sequence
    of equally shaped 2-D float32 arrays or one 3-D array."""
    if isinstance(mats, np.ndarray) and mats.ndim == 3:
        float32_array(mats, name)
        arrays = list(mats)
    else:
        arrays = list(mats)
    if not arrays:
        raise ValueError(f"{name} is empty")
    shape = None
    for i, m in enumerate(arrays):
        float32_array(m, f"{name}[{i}]", shape=(None, None) if shape is None else shape)
        shape = m.shape
    ptrs = (c_void_p * len(arrays))(*[m.ctypes.data for m in arrays])
    return ptrs, arrays, shape


# ---------------------------------------------------------------- Gram, PCA


def gram(context, mats) -> np.ndarray:
    """G[i, j] = <W_i, W_j>_F of the matrices (float64, shape (L, L)),
    accumulated in float64 through BLIS."""
    ctx = _check_context(context)
    ptrs, arrays, (rows, cols) = _stack(mats)
    n = len(arrays)
    out = np.empty((n, n), dtype=FLOAT64)
    _c().masa_gram(ctx, n, rows, cols, ptrs, out.ctypes.data, out.size)
    return out


def gram_eigenvalues(context, g) -> np.ndarray:
    """All eigenvalues of a symmetric Gram (lower triangle read), descending.
    A sub-block (e.g. ``g[a:b, a:b]``) may be passed as a view."""
    ctx = _check_context(context)
    if not isinstance(g, np.ndarray) or g.dtype != FLOAT64:
        raise TypeError("g must be a float64 numpy.ndarray")
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g must be square, got shape {g.shape}")
    if g.strides[1] != 8 or g.strides[0] % 8 or g.strides[0] < 8 * g.shape[1]:
        g = np.ascontiguousarray(g)
    n = g.shape[0]
    out = np.empty(n, dtype=FLOAT64)
    _c().masa_gram_eigenvalues(ctx, n, g.ctypes.data, g.strides[0] // 8, out.ctypes.data)
    return out


class PcaResult(NamedTuple):
    """Matrix PCA of one group: atoms (S, rows, cols) orthonormal under the
    Frobenius inner product, coefficients (L, S), every eigenvalue of the
    group's Gram (descending), and the energies (float64)."""

    atoms: np.ndarray
    coefficients: np.ndarray
    eigenvalues: np.ndarray
    rank: int
    total_energy: float
    captured_energy: float
    residual_energy: float

    def reconstruction(self, layer: int) -> np.ndarray:
        """W^_l = sum_s c[l, s] D_s (float32, computed by numpy)."""
        c = self.coefficients[layer].astype(np.float64)
        return np.tensordot(c, self.atoms.astype(np.float64), axes=1).astype(np.float32)

    def to_masa(self, context):
        """(Dictionary, Coefficients) wrapping this result's arrays, ready for
        Layer.set_masa (layer l of the group is row l of the table)."""
        return Dictionary(context, data=self.atoms), Coefficients(context, data=self.coefficients)


def matrix_pca(context, mats, n_atoms: int, gram: Optional[np.ndarray] = None) -> PcaResult:
    """Matrix PCA of the matrices (one projection type, one group of
    consecutive layers) with n_atoms atoms. ``gram``: the group's Gram if
    already computed (any row stride: a sub-block view of a whole-model Gram
    works), else computed here."""
    ctx = _check_context(context)
    ptrs, arrays, (rows, cols) = _stack(mats)
    n = len(arrays)
    S = size_arg(n_atoms, "n_atoms")
    gram_ptr, ld = None, 0
    if gram is not None:
        if not isinstance(gram, np.ndarray) or gram.dtype != FLOAT64:
            raise TypeError("gram must be a float64 numpy.ndarray")
        if gram.shape != (n, n):
            raise ValueError(f"gram must have shape {(n, n)}, got {gram.shape}")
        if gram.strides[1] != 8 or gram.strides[0] % 8:
            gram = np.ascontiguousarray(gram)
        gram_ptr, ld = gram.ctypes.data, gram.strides[0] // 8
    atoms = np.empty((S, rows, cols), dtype=FLOAT32)
    coefs = np.empty((n, S), dtype=FLOAT32)
    w = np.empty(n, dtype=FLOAT64)
    res = _result(_PcaResultFields)
    _c().masa_matrix_pca(ctx, n, rows, cols, ptrs, gram_ptr, ld, S, atoms.ctypes.data,
                         atoms.size, coefs.ctypes.data, coefs.size, w.ctypes.data, byref(res))
    return PcaResult(atoms, coefs, w, int(res.rank), res.total_energy, res.captured_energy,
                     res.residual_energy)


# ---------------------------------------------------------------- grouping


class GroupPlan(NamedTuple):
    """Consecutive groups: group g covers layers [starts[g], starts[g+1])
    (the last one up to L) with atoms[g] atoms. params = sum_g S_g (N + L_g);
    error = the sum of the dropped eigenvalues (squared Frobenius error)."""

    starts: list
    atoms: list
    params: int
    error: float
    total_energy: float

    def groups(self, n_layers: int):
        """[(first, end, n_atoms), ...]"""
        ends = list(self.starts[1:]) + [n_layers]
        return [(s, e, a) for s, e, a in zip(self.starts, ends, self.atoms)]


def plan_groups(context, g, shape, budget: int, starts: Optional[Sequence[int]] = None) -> GroupPlan:
    """The groups and atoms per group with the smallest Matrix PCA error
    within ``budget`` parameters (atoms + coefficients), from the
    whole-model Gram ``g`` (L x L) of matrices of ``shape`` (rows, cols).
    With ``starts`` (the first layer of each group, e.g. KL-drift cuts) only
    the atoms per group are chosen."""
    ctx = _check_context(context)
    if not isinstance(g, np.ndarray) or g.dtype != FLOAT64:
        raise TypeError("g must be a float64 numpy.ndarray")
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g must be square, got shape {g.shape}")
    g = np.ascontiguousarray(g)
    L = g.shape[0]
    rows, cols = (size_arg(v, "shape") for v in shape)
    budget = size_arg(budget, "budget")
    res = _result(_GroupPlanResultFields)
    if starts is None:
        st = np.zeros(max(L, 1), dtype=np.uintp)
        at = np.zeros(max(L, 1), dtype=np.uintp)
        _c().masa_group_plan(ctx, L, g.ctypes.data, rows, cols, budget, st.ctypes.data,
                             at.ctypes.data, L, byref(res))
        n = int(res.n_groups)
        return GroupPlan([int(v) for v in st[:n]], [int(v) for v in at[:n]], int(res.params),
                         res.error, res.total_energy)
    st = np.array([size_arg(v, "starts") for v in starts], dtype=np.uintp)
    at = np.zeros(max(len(st), 1), dtype=np.uintp)
    _c().masa_group_plan_fixed(ctx, L, g.ctypes.data, rows, cols, budget, len(st),
                               st.ctypes.data if len(st) else None, at.ctypes.data,
                               byref(res))
    return GroupPlan([int(v) for v in st], [int(v) for v in at[:len(st)]], int(res.params),
                     res.error, res.total_energy)


# ---------------------------------------------------------------- calibration


class Calibration(Handle):
    """Calibration statistics C = X^T X (float64, dim x dim) of a
    projection's input rows, accumulated from float32 batches.

    Accumulate and merge need exclusive use of the object (a lock is the
    caller's business when hooks run on several threads); reading is free
    while nobody writes."""

    def __init__(self, context, dim: int, *, _from=None):
        ctx = _check_context(context)
        out = calib_p()
        C = _c()
        if _from is None:
            C.masa_calib_create(ctx, size_arg(dim, "dim"), byref(out))
        else:
            matrix, n_rows = _from
            C.masa_calib_create_from_data(ctx, size_arg(dim, "dim"), matrix.ctypes.data,
                                          n_rows, byref(out))
        self.context = context
        self._init_handle(out, C.masa_calib_destroy, [context])
        context._adopt(self)

    @classmethod
    def from_data(cls, context, matrix: np.ndarray, n_rows: int) -> "Calibration":
        """A copy of saved statistics (symmetric, finite float64 (dim, dim))."""
        _float64_array(matrix, "matrix")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {matrix.shape}")
        return cls(context, matrix.shape[0], _from=(matrix, size_arg(n_rows, "n_rows")))

    def accumulate(self, x: np.ndarray) -> "Calibration":
        """C += X^T X for rows x of shape (..., dim), float32 (leading axes
        are flattened: a (batch, seq, dim) activation works as is)."""
        dim = self.dim
        float32_array(x, "x")
        if x.ndim < 1 or x.shape[-1] != dim:
            raise ValueError(f"x must have last dimension {dim}, got shape {x.shape}")
        _c().masa_calib_accumulate(self._handle(), x.ctypes.data, x.size // dim)
        return self

    def merge(self, other: "Calibration") -> "Calibration":
        """self += other (matrices and row counts)."""
        if not isinstance(other, Calibration):
            raise TypeError("other must be a masa.compression.Calibration")
        _c().masa_calib_merge(self._handle(), other._handle())
        return self

    def _shape(self):
        d, n = c_size_t(), c_uint64()
        _c().masa_calib_shape(self._handle(), byref(d), byref(n))
        return d.value, n.value

    @property
    def dim(self) -> int:
        return self._shape()[0]

    @property
    def n_rows(self) -> int:
        return self._shape()[1]

    @property
    def matrix(self) -> np.ndarray:
        """A copy of C (float64, (dim, dim), symmetric)."""
        d = self.dim
        ptr = _c().masa_calib_data(self._handle())
        view = np.ctypeslib.as_array((c_double * (d * d)).from_address(ptr))
        return view.reshape(d, d).copy()

    def __repr__(self):
        if self.closed:
            return "<masa.compression.Calibration closed>"
        d, n = self._shape()
        return f"<masa.compression.Calibration dim={d} rows={n}>"


# ---------------------------------------------------------------- residual


class Residual(NamedTuple):
    """A (d_in, r) and B (r, d_out), float32, with E ~ A B; errors are
    whitened (||R^T E||_F^2 with C + jitter I = R R^T) or plain without C."""

    a: np.ndarray
    b: np.ndarray
    error_before: float
    error_after: float
    dropped: float
    jitter: float


def residual_lowrank(context, w: np.ndarray, rank: int, w_hat: Optional[np.ndarray] = None,
                     calib=None) -> Residual:
    """Rank-``rank`` factors of E = w - w_hat (or w) minimising
    ||X (E - A B)||_F with C = X^T X from ``calib`` (a Calibration or a
    float64 (d_in, d_in) array); calib None = plain truncated SVD."""
    ctx = _check_context(context)
    float32_array(w, "w", shape=(None, None))
    d_in, d_out = w.shape
    if w_hat is not None:
        float32_array(w_hat, "w_hat", shape=(d_in, d_out))
    r = size_arg(rank, "rank")
    keep = None
    if calib is None:
        c_ptr = None
    elif isinstance(calib, Calibration):
        if calib.dim != d_in:
            raise ValueError(f"calib has dim {calib.dim}, w has d_in {d_in}")
        keep = calib
        c_ptr = _c().masa_calib_data(calib._handle())
    else:
        _float64_array(calib, "calib", shape=(d_in, d_in))
        c_ptr = calib.ctypes.data
    a = np.empty((d_in, r), dtype=FLOAT32)
    b = np.empty((r, d_out), dtype=FLOAT32)
    res = _result(_ResidualResultFields)
    _c().masa_residual_lowrank(ctx, d_in, d_out, w.ctypes.data,
                               None if w_hat is None else w_hat.ctypes.data, c_ptr, r,
                               a.ctypes.data, a.size, b.ctypes.data, b.size, byref(res))
    del keep
    return Residual(a, b, res.error_before, res.error_after, res.dropped, res.jitter)


__all__ = [
    "Calibration", "GroupPlan", "PcaResult", "Residual", "gram", "gram_eigenvalues",
    "matrix_pca", "plan_groups", "residual_lowrank",
]
