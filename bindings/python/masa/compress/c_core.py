"""The compression primitives on libmasa's C core: a thin adapter giving
masa.compression (the numpy binding of include/masa/compress.h) the
interface of the planner's cores (core.NumpyCore has the same methods on the
float64 reference). No ctypes here: every call goes through
masa.compression."""

from __future__ import annotations

import numpy as np

from .. import compression as mc
from ..core import default_context


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


class CCore:
    name = "libmasa C core"

    def __init__(self, context=None):
        self.context = context

    def _ctx(self):
        if self.context is None or self.context.closed:
            self.context = default_context()
        return self.context

    def gram(self, mats):
        return mc.gram(self._ctx(), [_f32(m) for m in mats])

    def eigenvalues(self, gram):
        return mc.gram_eigenvalues(self._ctx(), _f64(gram))

    def matrix_pca(self, mats, n_atoms, gram=None):
        r = mc.matrix_pca(self._ctx(), [_f32(m) for m in mats], int(n_atoms),
                          None if gram is None else _f64(gram))
        return r.atoms, r.coefficients, r.eigenvalues

    def group_plan(self, gram, rows, cols, budget):
        p = mc.plan_groups(self._ctx(), _f64(gram), (rows, cols), int(budget))
        return p.starts, p.atoms, float(p.error)

    def group_plan_fixed(self, gram, rows, cols, budget, starts):
        p = mc.plan_groups(self._ctx(), _f64(gram), (rows, cols), int(budget), starts=starts)
        return p.atoms, float(p.error)

    def residual(self, w, w_hat, calib, rank):
        r = mc.residual_lowrank(self._ctx(), _f32(w), int(rank),
                                w_hat=None if w_hat is None else _f32(w_hat),
                                calib=None if calib is None else _f64(calib))
        return r.a, r.b, {"error_before": r.error_before, "error_after": r.error_after,
                          "dropped": r.dropped, "jitter": r.jitter}


def calibration(context, dim):
    """A masa.compression.Calibration (C = X^T X accumulated by libmasa)."""
    return mc.Calibration(context if context is not None else default_context(), dim)
