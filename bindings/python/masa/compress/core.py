"""The compression primitives, on libmasa's C core when it is built in
(masa.compression: Gram, Matrix PCA, grouping planner, whitened residual),
else on the float64 numpy reference below (the same math, DESIGN.md
section 1; the tests compare the two).

Conventions: a layer's weight W is d_in x d_out (row-vector convention,
Y = X W: the transpose of nn.Linear.weight); C = X^T X is d_in x d_in.
"""

from __future__ import annotations

import numpy as np

JITTERS = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


# ---------------------------------------------------------------------------
# float64 numpy reference
# ---------------------------------------------------------------------------


def ref_gram(mats):
    m = np.stack([np.asarray(w, dtype=np.float64).reshape(-1) for w in mats])
    return m @ m.T


def ref_eigh_desc(gram):
    """Eigenvalues descending and eigenvectors (columns), each flipped so its
    entry of largest magnitude is positive (as the C core does)."""
    lam, vec = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
    order = np.argsort(lam)[::-1]
    lam, vec = lam[order], vec[:, order]
    idx = np.argmax(np.abs(vec), axis=0)
    signs = np.sign(vec[idx, np.arange(vec.shape[1])])
    signs[signs == 0] = 1.0
    return lam, vec * signs


def ref_matrix_pca(mats, n_atoms, gram=None):
    """(atoms [S, d_in, d_out] f32, coefs [L, S] f32, eigenvalues [L])."""
    g = ref_gram(mats) if gram is None else np.asarray(gram, dtype=np.float64)
    lam, vec = ref_eigh_desc(g)
    if n_atoms > len(mats) or n_atoms < 1:
        raise ValueError(f"n_atoms {n_atoms} not in 1..{len(mats)}")
    if lam[n_atoms - 1] <= 1e-10 * lam[0]:
        raise ValueError(f"n_atoms {n_atoms} above the numerical rank")
    stack = np.stack([np.asarray(w, dtype=np.float64) for w in mats])
    atoms = np.einsum("ls,lij->sij", vec[:, :n_atoms], stack) / np.sqrt(lam[:n_atoms])[:, None, None]
    coefs = np.sqrt(lam[:n_atoms]) * vec[:, :n_atoms]
    return atoms.astype(np.float32), coefs.astype(np.float32), lam


def _dropped(eig, s):
    return float(np.clip(eig[s:], 0, None).sum())


def ref_group_plan(gram, rows, cols, budget, starts=None):
    """Exact plan (Pareto-front DP over consecutive segments): returns
    (starts, atoms per group, error, params). With ``starts`` given, only
    the atom counts are chosen."""
    gram = np.asarray(gram, dtype=np.float64)
    L, N = gram.shape[0], rows * cols
    seg_eig = {}

    def eig(i, j):
        if (i, j) not in seg_eig:
            seg_eig[(i, j)] = np.sort(np.linalg.eigvalsh(gram[i:j, i:j]))[::-1]
        return seg_eig[(i, j)]

    if starts is None:
        allowed = None
    else:
        allowed = set(zip(list(starts), list(starts[1:]) + [L]))
    # front[i]: list of (params, error, plan) non-dominated, for layers [0, i)
    front = {0: [(0, 0.0, ())]}
    for j in range(1, L + 1):
        cands = []
        for i in range(j):
            if i not in front or (allowed is not None and (i, j) not in allowed):
                continue
            e, Lg = eig(i, j), j - i
            for p0, e0, plan in front[i]:
                for s in range(1, Lg + 1):
                    p = p0 + s * (N + Lg)
                    if p > budget:
                        break
                    cands.append((p, e0 + _dropped(e, s), plan + ((i, s),)))
        if cands:
            cands.sort(key=lambda t: (t[0], t[1]))
            pruned, best = [], float("inf")
            for c in cands:
                if not pruned or c[1] < best - 1e-12 * max(1.0, abs(best)):
                    pruned.append(c)
                    best = c[1]
            front[j] = pruned
    if L not in front:
        raise ValueError(f"budget {budget} below the cheapest plan")
    params, error, plan = min(front[L], key=lambda t: (t[1], t[0]))
    return [i for i, _ in plan], [s for _, s in plan], error, params


def ref_cholesky(calib):
    """(R lower, jitter) with C + jitter I = R R^T, the C core's jitter rule."""
    c = np.asarray(calib, dtype=np.float64)
    mean_diag = float(np.mean(np.diag(c)))
    for t in (0.0,) + JITTERS:
        try:
            return np.linalg.cholesky(c + t * mean_diag * np.eye(len(c))), t * mean_diag
        except np.linalg.LinAlgError:
            continue
    raise ValueError("calibration matrix not positive definite even with jitter")


def ref_residual(w, w_hat, calib, rank):
    """A [d_in, r], B [r, d_out] (f32) minimising ||X (E - A B)||_F with
    E = w - w_hat; calib None = plain SVD. Also a dict of errors."""
    e = np.asarray(w, dtype=np.float64)
    if w_hat is not None:
        e = e - np.asarray(w_hat, dtype=np.float64)
    jitter = 0.0
    if calib is None:
        r_t = None
        m = e
    else:
        r, jitter = ref_cholesky(calib)
        r_t = r.T
        m = r_t @ e
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    sq = np.sqrt(s[:rank])
    a = u[:, :rank] * sq
    if r_t is not None:
        a = np.linalg.solve(r_t, a)  # R^T is upper triangular
    b = sq[:, None] * vt[:rank]
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    d = e - a32.astype(np.float64) @ b32.astype(np.float64)
    after = d if r_t is None else r_t @ d
    return a32, b32, {"error_before": float((m ** 2).sum()), "error_after": float((after ** 2).sum()),
                      "dropped": float((s[rank:] ** 2).sum()), "jitter": jitter}


class NumpyCore:
    name = "numpy float64 reference"

    def gram(self, mats):
        return ref_gram(mats)

    def eigenvalues(self, gram):
        return ref_eigh_desc(gram)[0]

    def matrix_pca(self, mats, n_atoms, gram=None):
        return ref_matrix_pca(mats, n_atoms, gram)

    def group_plan(self, gram, rows, cols, budget):
        s, a, err, _ = ref_group_plan(gram, rows, cols, budget)
        return s, a, err

    def group_plan_fixed(self, gram, rows, cols, budget, starts):
        _, a, err, _ = ref_group_plan(gram, rows, cols, budget, starts)
        return a, err

    def residual(self, w, w_hat, calib, rank):
        return ref_residual(w, w_hat, calib, rank)


def get_core(prefer_c=True, context=None):
    """The C core (masa.compression) when available and preferred, else the
    numpy reference."""
    if prefer_c:
        try:
            from .c_core import CCore

            return CCore(context)
        except (ImportError, AttributeError):
            pass
    return NumpyCore()
