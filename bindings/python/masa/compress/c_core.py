"""The compression primitives on libmasa's C core (include/masa/compress.h):
Gram, Matrix PCA, grouping planner, calibration statistics and whitened
residual. The ctypes declarations of these functions live here (declared on
first use), apart from masa._lib's."""

from __future__ import annotations

from ctypes import POINTER, Structure, byref, sizeof, c_double, c_float, c_int, c_size_t, c_uint64, c_void_p

import numpy as np

from .. import _lib
from ..core import default_context

_status = c_int
_dp = POINTER(c_double)
_fp = POINTER(c_float)
_sp = POINTER(c_size_t)


class PcaResult(Structure):
    _fields_ = [("size", c_size_t), ("rank", c_size_t), ("total_energy", c_double),
                ("captured_energy", c_double), ("residual_energy", c_double)]


class GroupPlanResult(Structure):
    _fields_ = [("size", c_size_t), ("n_groups", c_size_t), ("params", c_size_t),
                ("error", c_double), ("total_energy", c_double)]


class ResidualResult(Structure):
    _fields_ = [("size", c_size_t), ("error_before", c_double), ("error_after", c_double),
                ("dropped", c_double), ("jitter", c_double)]


SIGNATURES = {
    "masa_gram": (_status, [c_void_p, c_size_t, c_size_t, c_size_t, POINTER(c_void_p), _dp, c_size_t], True),
    "masa_gram_eigenvalues": (_status, [c_void_p, c_size_t, _dp, c_size_t, _dp], True),
    "masa_matrix_pca": (_status, [c_void_p, c_size_t, c_size_t, c_size_t, POINTER(c_void_p), _dp, c_size_t,
                                  c_size_t, _fp, c_size_t, _fp, c_size_t, _dp, POINTER(PcaResult)], True),
    "masa_group_plan": (_status, [c_void_p, c_size_t, _dp, c_size_t, c_size_t, c_size_t, _sp, _sp,
                                  c_size_t, POINTER(GroupPlanResult)], True),
    "masa_group_plan_fixed": (_status, [c_void_p, c_size_t, _dp, c_size_t, c_size_t, c_size_t, c_size_t,
                                        _sp, _sp, POINTER(GroupPlanResult)], True),
    "masa_residual_lowrank": (_status, [c_void_p, c_size_t, c_size_t, _fp, _fp, _dp, c_size_t, _fp,
                                        c_size_t, _fp, c_size_t, POINTER(ResidualResult)], True),
    "masa_calib_create": (_status, [c_void_p, c_size_t, POINTER(c_void_p)], True),
    "masa_calib_destroy": (None, [c_void_p], False),
    "masa_calib_accumulate": (_status, [c_void_p, _fp, c_size_t], True),
    "masa_calib_shape": (_status, [c_void_p, _sp, POINTER(c_uint64)], True),
    "masa_calib_data": (_dp, [c_void_p], False),
}

# Declared on first use, on a ctypes handle of its own.
clib = _lib.lazy_declarations(SIGNATURES, "compression")

def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


def _ptr(a, t):
    return a.ctypes.data_as(POINTER(t))


def _mats(mats):
    arrays = [_f32(m) for m in mats]
    ptrs = (c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    return arrays, ptrs


class CCore:
    name = "libmasa C core"

    def __init__(self, context=None):
        self.L = clib()
        self.context = context

    def _ctx(self):
        if self.context is None or self.context.closed:
            self.context = default_context()
        return self.context._handle()

    def gram(self, mats):
        arrays, ptrs = _mats(mats)
        n = len(arrays)
        rows, cols = arrays[0].shape
        g = np.zeros((n, n), dtype=np.float64)
        self.L.masa_gram(self._ctx(), n, rows, cols, ptrs, _ptr(g, c_double), g.size)
        return g

    def eigenvalues(self, gram):
        g = _f64(gram)
        out = np.zeros(len(g), dtype=np.float64)
        self.L.masa_gram_eigenvalues(self._ctx(), len(g), _ptr(g, c_double), len(g), _ptr(out, c_double))
        return out

    def matrix_pca(self, mats, n_atoms, gram=None):
        arrays, ptrs = _mats(mats)
        n = len(arrays)
        rows, cols = arrays[0].shape
        atoms = np.zeros((n_atoms, rows, cols), dtype=np.float32)
        coefs = np.zeros((n, n_atoms), dtype=np.float32)
        eig = np.zeros(n, dtype=np.float64)
        res = PcaResult(size=sizeof(PcaResult))
        g = None if gram is None else _f64(gram)
        self.L.masa_matrix_pca(self._ctx(), n, rows, cols, ptrs,
                               None if g is None else _ptr(g, c_double), n if g is not None else 0,
                               n_atoms, _ptr(atoms, c_float), atoms.size, _ptr(coefs, c_float), coefs.size,
                               _ptr(eig, c_double), byref(res))
        return atoms, coefs, eig

    def group_plan(self, gram, rows, cols, budget):
        g = _f64(gram)
        n = len(g)
        starts = np.zeros(n, dtype=np.uintp)
        counts = np.zeros(n, dtype=np.uintp)
        res = GroupPlanResult(size=sizeof(GroupPlanResult))
        self.L.masa_group_plan(self._ctx(), n, _ptr(g, c_double), rows, cols, int(budget),
                               _ptr(starts, c_size_t), _ptr(counts, c_size_t), n, byref(res))
        k = res.n_groups
        return [int(x) for x in starts[:k]], [int(x) for x in counts[:k]], float(res.error)

    def group_plan_fixed(self, gram, rows, cols, budget, starts):
        g = _f64(gram)
        n = len(g)
        st = np.asarray(starts, dtype=np.uintp)
        counts = np.zeros(len(st), dtype=np.uintp)
        res = GroupPlanResult(size=sizeof(GroupPlanResult))
        self.L.masa_group_plan_fixed(self._ctx(), n, _ptr(g, c_double), rows, cols, int(budget), len(st),
                                     _ptr(st, c_size_t), _ptr(counts, c_size_t), byref(res))
        return [int(x) for x in counts], float(res.error)

    def residual(self, w, w_hat, calib, rank):
        w = _f32(w)
        d_in, d_out = w.shape
        wh = None if w_hat is None else _f32(w_hat)
        c = None if calib is None else _f64(calib)
        a = np.zeros((d_in, rank), dtype=np.float32)
        b = np.zeros((rank, d_out), dtype=np.float32)
        res = ResidualResult(size=sizeof(ResidualResult))
        self.L.masa_residual_lowrank(self._ctx(), d_in, d_out, _ptr(w, c_float),
                                     None if wh is None else _ptr(wh, c_float),
                                     None if c is None else _ptr(c, c_double), rank,
                                     _ptr(a, c_float), a.size, _ptr(b, c_float), b.size, byref(res))
        return a, b, {"error_before": res.error_before, "error_after": res.error_after,
                      "dropped": res.dropped, "jitter": res.jitter}


class Calib:
    """C = X^T X accumulated by libmasa (masa_calib)."""

    def __init__(self, context, dim):
        self.L = clib()
        self.context = context if context is not None else default_context()
        h = c_void_p()
        self.L.masa_calib_create(self.context._handle(), dim, byref(h))
        self.handle, self.dim = h, dim

    def accumulate(self, x):
        x = _f32(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"rows must be [n, {self.dim}], got {x.shape}")
        self.L.masa_calib_accumulate(self.handle, _ptr(x, c_float), x.shape[0])

    @property
    def rows(self):
        n = c_uint64()
        self.L.masa_calib_shape(self.handle, None, byref(n))
        return int(n.value)

    @property
    def matrix(self):
        p = self.L.masa_calib_data(self.handle)
        return np.ctypeslib.as_array(p, shape=(self.dim, self.dim)).copy()

    def __del__(self):
        h = getattr(self, "handle", None)
        if h:
            self.L.masa_calib_destroy(h)
            self.handle = None
