"""Compression methods for the attention projections of a pretrained model,
all at a given parameter budget per projection type.

weights[p]: [L, d_in, d_out] float32 (row-vector convention). stats(l, key)
gives C = X^T X of layer l's input rows for key "qkv" (Q, K, V) or "o".

A result per projection p is a dict:
  groups:  [{"start", "count", "atoms" [S, d_in, d_out], "coefs" [count, S]}]
  lowrank: {layer: (A [d_in, r], B [r, d_out])}
  params:  the exact parameter count (atoms + coefficients + factors)
  info:    captured energies, errors, choices made
Reconstruction: W_l = sum_s coefs[l - start, s] atoms[s] + A_l B_l.

Methods:
  svd      per-layer truncated SVD of W_l (rank from the budget)
  svd-llm  per-layer whitened truncation (SVD-LLM: SVD of R^T W_l, C = R R^T)
  pca      Matrix PCA, one group of all layers
  pca-kl   Matrix PCA, groups cut at the largest logit-lens KL drifts; atoms
           per group chosen by the planner under the budget
  pca-dp   Matrix PCA, groups and atoms chosen by the exact DP planner
  full     DP groups on part of the budget + per-layer whitened residual of
           W_l - W^_l on the rest; the split is chosen per projection by the
           calibrated (whitened) error over a grid, all reported
"""

from __future__ import annotations

import numpy as np

from .calibration import STAT_OF

METHODS = ("svd", "svd-llm", "pca", "pca-kl", "pca-dp", "full")
FULL_ATOM_SHARES = (0.1, 0.25, 0.5, 0.75)


def dense_params(weights):
    return {p: int(w.shape[0] * w.shape[1] * w.shape[2]) for p, w in weights.items()}


def budgets(weights, removed):
    """Parameters allowed per projection type for a fraction ``removed``."""
    return {p: int(np.floor((1.0 - removed) * n)) for p, n in dense_params(weights).items()}


def reconstruct(result, layer, shape):
    w = np.zeros(shape, dtype=np.float64)
    for g in result["groups"]:
        if g["start"] <= layer < g["start"] + g["count"]:
            w += np.einsum("s,sij->ij", g["coefs"][layer - g["start"]].astype(np.float64),
                           g["atoms"].astype(np.float64))
    if layer in result["lowrank"]:
        a, b = result["lowrank"][layer]
        w += a.astype(np.float64) @ b.astype(np.float64)
    return w.astype(np.float32)


def count_params(result, shape):
    d_in, d_out = shape
    n = 0
    for g in result["groups"]:
        n += g["atoms"].size + g["coefs"].size
    for a, b in result["lowrank"].values():
        n += a.size + b.size
    return int(n)


def _lowrank_only(core, w, stats, key, budget, whiten):
    L, d_in, d_out = w.shape
    rank = min(budget // (L * (d_in + d_out)), d_in, d_out)
    if rank < 1:
        raise ValueError(f"budget {budget} below rank 1 for every layer")
    lowrank, before, after = {}, 0.0, 0.0
    for l in range(L):
        c = stats(l, key) if whiten else None
        a, b, info = core.residual(w[l], None, c, rank)
        lowrank[l] = (a, b)
        before += info["error_before"]
        after += info["error_after"]
    return {"groups": [], "lowrank": lowrank,
            "info": {"rank": int(rank), "relative_error": after / before}}


def _groups(core, w, starts, counts, gram):
    out = []
    L = w.shape[0]
    bounds = list(starts) + [L]
    captured = 0.0
    for g, s in enumerate(counts):
        i, j = bounds[g], bounds[g + 1]
        atoms, coefs, eig = core.matrix_pca(list(w[i:j]), int(s), gram[i:j, i:j])
        captured += float(eig[:s].sum())
        out.append({"start": int(i), "count": int(j - i), "atoms": atoms, "coefs": coefs})
    return out, captured


def kl_starts(drift, n_groups):
    """Group starts cutting after the n_groups - 1 layers with the largest
    drift to the next layer."""
    L = len(drift) + 1
    cuts = sorted(int(i) + 1 for i in np.argsort(drift)[::-1][: n_groups - 1])
    return [0] + cuts if L > 1 else [0]


def compress_projection(core, method, w, budget, stats=None, key=None, drift=None,
                        kl_groups=3, atom_shares=FULL_ATOM_SHARES):
    """One projection type's compression (see the module doc)."""
    L, d_in, d_out = w.shape
    N = d_in * d_out
    if method in ("svd", "svd-llm"):
        return _lowrank_only(core, w, stats, key, budget, whiten=(method == "svd-llm"))
    gram = core.gram(list(w))
    total = float(np.trace(gram))
    if method == "pca":
        s = min(L, budget // (N + L))
        groups, captured = _groups(core, w, [0], [s], gram)
        return {"groups": groups, "lowrank": {},
                "info": {"starts": [0], "atoms": [int(s)], "captured_energy": captured / total}}
    if method == "pca-kl":
        starts = kl_starts(drift, kl_groups)
        counts, _ = core.group_plan_fixed(gram, d_in, d_out, budget, starts)
        groups, captured = _groups(core, w, starts, counts, gram)
        return {"groups": groups, "lowrank": {},
                "info": {"starts": starts, "atoms": [int(c) for c in counts],
                         "captured_energy": captured / total}}
    if method == "pca-dp":
        starts, counts, _ = core.group_plan(gram, d_in, d_out, budget)
        groups, captured = _groups(core, w, starts, counts, gram)
        return {"groups": groups, "lowrank": {},
                "info": {"starts": list(map(int, starts)), "atoms": [int(c) for c in counts],
                         "captured_energy": captured / total}}
    if method == "full":
        best, grid = None, []
        for share in atom_shares:
            atom_budget = int(share * budget)
            if atom_budget < N + L:
                continue
            starts, counts, _ = core.group_plan(gram, d_in, d_out, atom_budget)
            groups, captured = _groups(core, w, starts, counts, gram)
            res = {"groups": groups, "lowrank": {}}
            used = count_params(res, (d_in, d_out))
            rank = min((budget - used) // (L * (d_in + d_out)), d_in, d_out)
            before = after = 0.0
            if rank >= 1:
                for l in range(L):
                    w_hat = reconstruct(res, l, (d_in, d_out))
                    a, b, info = core.residual(w[l], w_hat, stats(l, key), rank)
                    res["lowrank"][l] = (a, b)
                    after += info["error_after"]
            # whitened error of the whole reconstruction, relative to the
            # whitened energy of the weights (comparable across shares)
            ref = 0.0
            for l in range(L):
                c = stats(l, key)
                ref += float(np.einsum("ij,ik,kj->", w[l].astype(np.float64), c, w[l].astype(np.float64)))
            if rank < 1:
                for l in range(L):
                    d = (w[l] - reconstruct(res, l, (d_in, d_out))).astype(np.float64)
                    after += float(np.einsum("ij,ik,kj->", d, stats(l, key), d))
            rel = after / ref
            entry = {"atom_share": share, "starts": list(map(int, starts)),
                     "atoms": [int(c) for c in counts], "rank": int(max(rank, 0)),
                     "captured_energy": captured / total, "whitened_relative_error": rel}
            grid.append(entry)
            if best is None or rel < best[0]:
                best = (rel, res, entry)
        if best is None:
            raise ValueError(f"budget {budget} too small for the full method")
        res = best[1]
        res["info"] = dict(best[2], grid=grid)
        return res
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def compress_attention(core, method, weights, removed, stats=None, drift=None, kl_groups=3,
                       progress=None):
    """{p: result} for every projection type, each at its budget."""
    out = {}
    for p, w in weights.items():
        budget = budgets(weights, removed)[p]
        key = STAT_OF[p]
        r = compress_projection(core, method, w, budget, stats, key, drift, kl_groups)
        r["params"] = count_params(r, w.shape[1:])
        r["budget"] = budget
        r["dense_params"] = int(w.size)
        out[p] = r
        if progress:
            progress(f"{method} {p}: {r['params']} of {w.size} parameters ({r['info']})"
                     if "grid" not in r["info"] else
                     f"{method} {p}: {r['params']} of {w.size} parameters, atom share "
                     f"{r['info']['atom_share']}, rank {r['info']['rank']}")
    return out
