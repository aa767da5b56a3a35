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
  full     per projection type: T atoms in DP-chosen groups (the planner's
           best grouping for T atoms' worth of parameters) + per-layer
           whitened residual of W_l - W^_l at the rank the rest of the budget
           buys (the same rank in every layer); T is chosen by the whitened
           calibration error sum_l ||X_l (W_l - W~_l)||^2 over a grid that
           includes T = 0 (= SVD-LLM), then refined around the best. Every
           candidate is reported.
"""

from __future__ import annotations

import numpy as np

from .calibration import STAT_OF

METHODS = ("svd", "svd-llm", "pca", "pca-kl", "pca-dp", "full")
# Atom counts the full method tries first (then the neighbours of the best).
FULL_ATOM_COUNTS = (0, 3, 6, 10, 15, 20, 25)


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


def _whitened_energy(e, c):
    """||X E||_F^2 = tr(E^T C E)."""
    e = np.asarray(e, dtype=np.float64)
    return float(np.sum(e * (c @ e)))


def kl_starts(drift, n_groups):
    """Group starts cutting after the n_groups - 1 layers with the largest
    drift to the next layer."""
    L = len(drift) + 1
    cuts = sorted(int(i) + 1 for i in np.argsort(drift)[::-1][: n_groups - 1])
    return [0] + cuts if L > 1 else [0]


def compress_projection(core, method, w, budget, stats=None, key=None, drift=None,
                        kl_groups=3, atom_counts=FULL_ATOM_COUNTS):
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
        return _full(core, w, budget, stats, key, gram, total, atom_counts)
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def _whitened_spectrum(e, c):
    """Squared singular values of R^T E (C = R R^T, with the residual's
    jitter rule): the whitened error of keeping rank r is the sum past r.
    Planning only (numpy float64); the factors come from core.residual."""
    from .core import ref_cholesky

    r, _ = ref_cholesky(c)
    return np.linalg.svd(r.T @ np.asarray(e, dtype=np.float64), compute_uv=False) ** 2


# Whitened spectra of the full method's candidates, shared by every budget
# of the same weights and statistics (one process compresses at several
# ratios: the spectra do not depend on the budget, only the rank does).
_SPECTRA = {}


def _fingerprint(w, stats, key):
    L = w.shape[0]
    return (w.shape, float(np.sum(w, dtype=np.float64)), float(w.reshape(-1)[0]), key,
            float(np.trace(stats(0, key))), float(np.trace(stats(L - 1, key))))


def _atom_part(core, w, gram, n_atoms):
    L, d_in, d_out = w.shape
    if not n_atoms:
        return {"groups": [], "lowrank": {}}, [], [], 0.0
    starts, counts, _ = core.group_plan(gram, d_in, d_out, n_atoms * (d_in * d_out + L))
    groups, captured = _groups(core, w, starts, counts, gram)
    return {"groups": groups, "lowrank": {}}, starts, counts, captured


def _full_spectra(core, w, stats, key, gram, n_atoms):
    """(per-layer whitened spectra of W_l - W^_l, whitened energy of W,
    starts, counts, captured energy) for n_atoms atoms; cached."""
    fp = (_fingerprint(w, stats, key), n_atoms)
    if fp not in _SPECTRA:
        L, d_in, d_out = w.shape
        res, starts, counts, captured = _atom_part(core, w, gram, n_atoms)
        spectra, ref = [], 0.0
        for l in range(L):
            c = stats(l, key)
            e = w[l].astype(np.float64) - reconstruct(res, l, (d_in, d_out))
            spectra.append(_whitened_spectrum(e, c))
            ref += _whitened_energy(w[l], c)
        _SPECTRA[fp] = (spectra, ref, list(map(int, starts)), [int(x) for x in counts], captured)
    return _SPECTRA[fp]


def _full_candidate(core, w, budget, stats, key, gram, n_atoms):
    """(whitened relative error, entry) of the full method with n_atoms
    atoms (0: SVD-LLM), or None when the budget cannot pay for them."""
    L, d_in, d_out = w.shape
    N = d_in * d_out
    spectra, ref, starts, counts, captured = _full_spectra(core, w, stats, key, gram, n_atoms)
    used = sum(s * (N + (e - b)) for s, b, e in zip(counts, starts, starts[1:] + [L]))
    rank = min((budget - used) // (L * (d_in + d_out)), d_in, d_out)
    if rank < 0 or (rank == 0 and not n_atoms):
        return None
    err = sum(float(sv[rank:].sum()) for sv in spectra)
    entry = {"atoms_total": int(sum(counts)), "starts": starts, "atoms": counts,
             "rank": int(rank), "captured_energy": captured / float(np.trace(gram)),
             "whitened_relative_error": err / ref}
    return err / ref, entry


def _full(core, w, budget, stats, key, gram, total, atom_counts):
    L, d_in, d_out = w.shape
    N = d_in * d_out
    most = min(L, budget // (N + L))
    tried = {}

    def attempt(t):
        if 0 <= t <= most and t not in tried:
            tried[t] = _full_candidate(core, w, budget, stats, key, gram, t)

    for t in atom_counts:
        attempt(t)
    while True:  # neighbours of the best until it is a local minimum
        ok = {t: c for t, c in tried.items() if c is not None}
        if not ok:
            raise ValueError(f"budget {budget} too small for the full method")
        best = min(ok, key=lambda t: ok[t][0])
        new = [t for t in (best - 1, best + 1) if 0 <= t <= most and t not in tried]
        if not new:
            break
        for t in new:
            attempt(t)
    entry = ok[best][1]
    res, _, _, _ = _atom_part(core, w, gram, best)
    rank = entry["rank"]
    for l in range(L):
        w_hat = reconstruct(res, l, (d_in, d_out)) if res["groups"] else None
        if rank:
            a, b, _ = core.residual(w[l], w_hat, stats(l, key), rank)
            res["lowrank"][l] = (a, b)
    res["info"] = dict(entry, grid=[ok[t][1] for t in sorted(ok)])
    return res


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
                     f"{method} {p}: {r['params']} of {w.size} parameters, "
                     f"{r['info']['atoms_total']} atoms, rank {r['info']['rank']}")
    return out


# ---------------------------------------------------------------------------
# Explicit plans
# ---------------------------------------------------------------------------


def parse_plan(plan, weights):
    """Checks an explicit plan and fills in its defaults. plan: {p: {"groups":
    [{"start": i, "atoms": S}, ...] (each group runs to the next start; a
    "layers" entry, if present, must agree), "ranks": r (every layer) or
    {"layer": r} (missing layers: no low-rank term)}}; the "plan" of a
    config.json written by masa.compress has this form. Projections the plan
    leaves out stay dense. Returns {p: (starts, atoms, ranks[L])}."""
    if not isinstance(plan, dict) or not plan:
        raise ValueError("a plan is a non-empty JSON object keyed by projection (q, k, v, o)")
    out = {}
    for p, spec in plan.items():
        if p not in weights:
            raise ValueError(f"plan: unknown projection {p!r} (one of q, k, v, o)")
        L, d_in, d_out = weights[p].shape
        if not isinstance(spec, dict) or not set(spec) <= {"groups", "ranks", "params", "dense_params"}:
            raise ValueError(f"plan {p}: an object with 'groups' and/or 'ranks'")
        groups = spec.get("groups") or []
        starts = [int(g["start"]) for g in groups]
        atoms = [int(g["atoms"]) for g in groups]
        if groups and (starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:]))
                       or starts[-1] >= L):
            raise ValueError(f"plan {p}: group starts {starts} must begin at 0, increase, stay below {L}")
        ends = starts[1:] + [L]
        for g, (s, e, a) in enumerate(zip(starts, ends, atoms)):
            if "layers" in groups[g] and int(groups[g]["layers"]) != e - s:
                raise ValueError(f"plan {p}: group {g} has {e - s} layers, not {groups[g]['layers']}")
            if not 1 <= a <= e - s:
                raise ValueError(f"plan {p}: group {g} ({e - s} layers) cannot have {a} atoms")
        r = spec.get("ranks", 0)
        if isinstance(r, dict):
            ranks = [0] * L
            for k, v in r.items():
                if not 0 <= int(k) < L:
                    raise ValueError(f"plan {p}: rank for layer {k} of {L}")
                ranks[int(k)] = int(v)
        else:
            ranks = [int(r)] * L
        if any(not 0 <= x <= min(d_in, d_out) for x in ranks):
            raise ValueError(f"plan {p}: ranks must be in 0..{min(d_in, d_out)}")
        if not groups and any(x == 0 for x in ranks):
            raise ValueError(f"plan {p}: without groups every layer needs a rank")
        out[p] = (starts, atoms, ranks)
    return out


def compress_with_plan(core, weights, plan, stats=None, whiten=True, progress=None):
    """{p: result} following an explicit plan (parse_plan); the residuals
    are whitened by the calibration statistics when whiten is true."""
    out = {}
    for p, (starts, atoms, ranks) in parse_plan(plan, weights).items():
        w = weights[p]
        L, d_in, d_out = w.shape
        key = STAT_OF[p]
        res = {"groups": [], "lowrank": {}}
        captured = total = 0.0
        if starts:
            gram = core.gram(list(w))
            total = float(np.trace(gram))
            res["groups"], captured = _groups(core, w, starts, atoms, gram)
        after = 0.0
        for l in range(L):
            if ranks[l]:
                w_hat = reconstruct(res, l, (d_in, d_out)) if starts else None
                a, b, info = core.residual(w[l], w_hat, stats(l, key) if whiten else None, ranks[l])
                res["lowrank"][l] = (a, b)
                after += info["error_after"]
        res["info"] = {"starts": starts, "atoms": atoms, "ranks": ranks,
                       "captured_energy": captured / total if total else 0.0,
                       "residual_error": after, "explicit_plan": True}
        res["params"] = count_params(res, (d_in, d_out))
        res["budget"] = None
        res["dense_params"] = int(w.size)
        out[p] = res
        if progress:
            progress(f"plan {p}: {res['params']} of {w.size} parameters")
    return out
