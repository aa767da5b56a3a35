"""The full method's planner on synthetic weights, against the float64
numpy reference: it keeps the atom count with the least whitened
calibration error, T = 0 is SVD-LLM, and the error it reports is the error
of the factors it returns."""

import numpy as np
import pytest

from masa.compress import core as ref
from masa.compress import methods
from masa.compress.c_core import CCore

L, D_IN, D_OUT = 6, 12, 9


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(4)
    shared = rng.standard_normal((2, D_IN, D_OUT))
    w = np.stack([shared[0] * rng.uniform(0.5, 1.5) + shared[1] * rng.uniform(-1, 1)
                  + 0.4 * rng.standard_normal((D_IN, D_OUT)) for _ in range(L)]).astype(np.float32)
    scales = np.exp(rng.standard_normal(D_IN))  # anisotropic inputs, as after a norm layer
    cs = {}
    for l in range(L):
        x = rng.standard_normal((300, D_IN)) * scales
        cs[(l, "qkv")] = x.T @ x
    return w, (lambda l, key: cs[(l, key)])


def whitened_error(w, result, stats):
    err = ref_energy = 0.0
    for l in range(L):
        c = stats(l, "qkv")
        e = w[l].astype(np.float64) - methods.reconstruct(result, l, (D_IN, D_OUT)).astype(np.float64)
        err += float(np.sum(e * (c @ e)))
        ref_energy += float(np.sum(w[l].astype(np.float64) * (c @ w[l].astype(np.float64))))
    return err / ref_energy


def reference_candidate(w, stats, budget, t):
    """The full method with t atoms, from the float64 reference alone."""
    N = D_IN * D_OUT
    g = ref.ref_gram(list(w))
    res = {"groups": [], "lowrank": {}}
    used = 0
    if t:
        starts, counts, _, used = ref.ref_group_plan(g, D_IN, D_OUT, t * (N + L))
        bounds = starts + [L]
        for i, s in enumerate(counts):
            atoms, coefs, _ = ref.ref_matrix_pca(list(w[bounds[i]:bounds[i + 1]]), s)
            res["groups"].append({"start": bounds[i], "count": bounds[i + 1] - bounds[i],
                                  "atoms": atoms, "coefs": coefs})
    rank = min((budget - used) // (L * (D_IN + D_OUT)), D_IN, D_OUT)
    for l in range(L):
        w_hat = methods.reconstruct(res, l, (D_IN, D_OUT)) if t else None
        a, b, _ = ref.ref_residual(w[l], w_hat, stats(l, "qkv"), rank)
        res["lowrank"][l] = (a, b)
    return res


@pytest.mark.parametrize("keep", [0.45, 0.7])
def test_full_method_keeps_the_least_whitened_error(problem, keep):
    w, stats = problem
    budget = int(keep * w.size)
    got = methods.compress_projection(CCore(), "full", w, budget, stats, "qkv",
                                      atom_counts=(0, 2, 4))
    info = got["info"]
    tried = {e["atoms_total"]: e for e in info["grid"]}
    assert 0 in tried
    errors = {t: whitened_error(w, reference_candidate(w, stats, budget, t), stats) for t in tried}
    best = min(errors, key=errors.get)
    assert info["atoms_total"] == best
    for t, e in tried.items():  # the planner's errors are the reference's
        assert abs(e["whitened_relative_error"] - errors[t]) <= 1e-4 * errors[t]
    # the returned factors have the error it reports, within the budget
    assert abs(whitened_error(w, got, stats) - info["whitened_relative_error"]) \
        <= 1e-4 * info["whitened_relative_error"]
    assert methods.count_params(got, (D_IN, D_OUT)) <= budget


def test_full_method_with_no_atoms_is_svd_llm(problem):
    """Independent layers (no shared direction, as in the real model): an
    atom costs more than the rank it displaces, T = 0 wins, and the result
    is SVD-LLM's exactly."""
    _, stats = problem
    w = np.random.default_rng(5).standard_normal((L, D_IN, D_OUT)).astype(np.float32)
    budget = int(0.7 * w.size)
    full = methods.compress_projection(CCore(), "full", w, budget, stats, "qkv", atom_counts=(0, 2))
    assert full["info"]["atoms_total"] == 0 and len(full["info"]["grid"]) >= 2
    svd_llm = methods.compress_projection(CCore(), "svd-llm", w, budget, stats, "qkv")
    for l in range(L):
        np.testing.assert_array_equal(methods.reconstruct(full, l, (D_IN, D_OUT)),
                                      methods.reconstruct(svd_llm, l, (D_IN, D_OUT)))
