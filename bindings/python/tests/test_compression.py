"""masa.compression against numpy float64 (np.linalg.eigh / svd / cholesky)."""

import itertools

import numpy as np
import pytest

import masa
from masa import compression as mc


def mats_of(rng, L, rows, cols, base=3):
    """Mixtures of a few random matrices plus noise: a spread-out spectrum."""
    b = rng.standard_normal((base, rows, cols))
    m = [sum(rng.uniform(-1, 1) / (k + 1) * b[k] for k in range(base))
         + 0.05 * rng.standard_normal((rows, cols)) for _ in range(L)]
    return [x.astype(np.float32) for x in m]


def np_pca(mats, S):
    X = np.stack([m.astype(np.float64).ravel() for m in mats])  # L x N
    G = X @ X.T
    w, V = np.linalg.eigh(G)
    w, V = w[::-1], V[:, ::-1]
    # the library's sign rule: largest-magnitude entry of each vector positive
    for s in range(V.shape[1]):
        if V[np.argmax(np.abs(V[:, s])), s] < 0:
            V[:, s] *= -1
    atoms = (V[:, :S].T @ X) / np.sqrt(w[:S])[:, None]
    coefs = V[:, :S] * np.sqrt(w[:S])
    return G, w, atoms.reshape((S,) + mats[0].shape), coefs


def close(got, ref, rtol):
    scale = np.max(np.abs(ref))
    assert np.max(np.abs(np.asarray(got, np.float64) - ref)) <= rtol * scale


def test_gram_and_eigenvalues(ctx, rng):
    mats = mats_of(rng, 6, 9, 11)
    G, w, _, _ = np_pca(mats, 1)
    g = mc.gram(ctx, mats)
    close(g, G, 1e-13)
    close(mc.gram_eigenvalues(ctx, g), w, 1e-12)
    # a sub-block view (row stride 6)
    close(mc.gram_eigenvalues(ctx, g[1:4, 1:4]),
          np.linalg.eigvalsh(G[1:4, 1:4])[::-1], 1e-12)
    # a 3-D array works as the sequence
    close(mc.gram(ctx, np.stack(mats)), G, 1e-13)


@pytest.mark.parametrize("S", [1, 3, 6])
def test_matrix_pca_matches_numpy(ctx, rng, S):
    mats = mats_of(rng, 6, 10, 12, base=6)
    G, w, atoms, coefs = np_pca(mats, S)
    r = mc.matrix_pca(ctx, mats, S)
    close(r.eigenvalues, w, 1e-12)
    close(r.atoms, atoms, 1e-5)
    close(r.coefficients, coefs, 1e-5)
    A = r.atoms.reshape(S, -1).astype(np.float64)
    assert np.max(np.abs(A @ A.T - np.eye(S))) < 1e-5
    recon = sum(np.sum((m.astype(np.float64) - r.reconstruction(l)) ** 2)
                for l, m in enumerate(mats))
    assert abs(r.residual_energy - np.sum(w[S:])) <= 1e-12 * w.sum()
    assert abs(recon - r.residual_energy) <= 1e-5 * w.sum()
    assert abs(r.total_energy - np.trace(G)) <= 1e-12 * w.sum()
    assert r.rank == 6
    # with the Gram given (a sub-block view of a bigger one)
    big = np.zeros((8, 8))
    big[1:7, 1:7] = G
    r2 = mc.matrix_pca(ctx, mats, S, gram=big[1:7, 1:7])
    close(r2.atoms, atoms, 1e-5)


def test_pca_to_masa_layer_weights(ctx, rng):
    mats = mats_of(rng, 4, 8, 8)
    r = mc.matrix_pca(ctx, mats, 2)
    d, c = r.to_masa(ctx)
    close(d.compose(c, 2), r.reconstruction(2).astype(np.float64), 1e-6)


def test_pca_errors(ctx, rng):
    mats = mats_of(rng, 4, 3, 5)
    with pytest.raises(masa.InvalidArgumentError, match="exceeds the number"):
        mc.matrix_pca(ctx, mats, 5)
    with pytest.raises(masa.BadShapeError):
        mc.matrix_pca(ctx, mats, 0)
    dup = [mats[0], mats[1], mats[0].copy(), 2 * mats[1]]
    with pytest.raises(masa.InvalidArgumentError, match=r"rank \(2\)"):
        mc.matrix_pca(ctx, dup, 3)
    bad = [m.copy() for m in mats]
    bad[2][1, 1] = np.nan
    with pytest.raises(masa.InvalidArgumentError, match="matrix 2"):
        mc.matrix_pca(ctx, bad, 2)
    with pytest.raises(masa.InvalidArgumentError):
        mc.gram(ctx, bad)
    with pytest.raises(ValueError):
        mc.gram(ctx, [mats[0], np.zeros((2, 2), np.float32)])
    with pytest.raises(TypeError):
        mc.gram(ctx, [m.astype(np.float64) for m in mats])
    with pytest.raises(ValueError):
        mc.gram(ctx, [])


def brute_force(G, L, N, budget, fixed=None):
    best = None
    cut_sets = ([fixed] if fixed is not None else
                [[0] + list(c) for k in range(L) for c in itertools.combinations(range(1, L), k)])
    for starts in cut_sets:
        ends = starts[1:] + [L]
        lens = [e - s for s, e in zip(starts, ends)]
        eig = [np.linalg.eigvalsh(G[s:e, s:e])[::-1] for s, e in zip(starts, ends)]
        for atoms in itertools.product(*[range(1, n + 1) for n in lens]):
            params = sum(a * (N + n) for a, n in zip(atoms, lens))
            if params > budget:
                continue
            err = sum(np.clip(w[a:], 0, None).sum() for w, a in zip(eig, atoms))
            if best is None or err < best[0] - 1e-12 * best[0]:
                best = (err, params)
    return best


@pytest.mark.parametrize("L,shape", [(5, (2, 3)), (6, (3, 3))])
def test_plan_matches_brute_force(ctx, rng, L, shape):
    mats = mats_of(rng, L, *shape)
    G = mc.gram(ctx, mats)
    N = shape[0] * shape[1]
    for budget in range(N + L, L * (N + L) + 1, 3):
        plan = mc.plan_groups(ctx, G, shape, budget)
        err, _ = brute_force(G, L, N, budget)
        assert abs(plan.error - err) <= 1e-10 * np.trace(G)
        assert plan.params <= budget and plan.starts[0] == 0
        groups = plan.groups(L)
        assert sum(a * (N + e - s) for s, e, a in groups) == plan.params
        fixed = [0, 2] if L > 2 else [0]
        if budget >= len(fixed) * N + L:
            fp = mc.plan_groups(ctx, G, shape, budget, starts=fixed)
            ferr, _ = brute_force(G, L, N, budget, fixed)
            assert abs(fp.error - ferr) <= 1e-10 * np.trace(G)
            assert fp.starts == fixed
        else:
            with pytest.raises(masa.InvalidArgumentError, match="cheapest"):
                mc.plan_groups(ctx, G, shape, budget, starts=fixed)
    with pytest.raises(masa.InvalidArgumentError, match="cheapest"):
        mc.plan_groups(ctx, G, shape, N + L - 1)
    with pytest.raises(masa.InvalidArgumentError):
        mc.plan_groups(ctx, G, shape, 10**6, starts=[1, 2])


def test_calibration_matches_numpy(ctx, rng):
    dim = 7
    x = rng.standard_normal((3, 50, dim)).astype(np.float32)
    a = mc.Calibration(ctx, dim).accumulate(x[0]).accumulate(x[1, :13])
    b = mc.Calibration(ctx, dim).accumulate(x[1, 13:]).accumulate(x[2:])  # 3-D batch
    a.merge(b)
    X = x.reshape(-1, dim).astype(np.float64)
    close(a.matrix, X.T @ X, 1e-13)
    assert a.n_rows == 150 and a.dim == dim
    c = mc.Calibration.from_data(ctx, a.matrix, a.n_rows)
    assert np.array_equal(c.matrix, a.matrix) and c.n_rows == 150
    with pytest.raises(masa.BadShapeError):
        a.merge(mc.Calibration(ctx, dim + 1))
    with pytest.raises(masa.InvalidArgumentError):
        a.merge(a)
    bad = x[0].copy()
    bad[3, 2] = np.inf
    before = a.matrix
    with pytest.raises(masa.InvalidArgumentError, match="row 3"):
        a.accumulate(bad)
    assert np.array_equal(a.matrix, before)
    with pytest.raises(ValueError):
        a.accumulate(np.zeros((4, dim + 1), np.float32))
    asym = np.eye(3)
    asym[0, 1] = 0.5
    with pytest.raises(masa.InvalidArgumentError, match="symmetric"):
        mc.Calibration.from_data(ctx, asym, 1)


@pytest.mark.parametrize("whiten", [True, False])
def test_residual_matches_numpy(ctx, rng, whiten):
    d_in, d_out, r = 14, 10, 4
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)
    w_hat = (0.3 * rng.standard_normal((d_in, d_out))).astype(np.float32)
    E = w.astype(np.float64) - w_hat
    calib = None
    R = np.eye(d_in)
    if whiten:
        x = rng.standard_normal((60, d_in)).astype(np.float32)
        x[:, 1:] += 0.8 * x[:, :-1]
        calib = mc.Calibration(ctx, d_in).accumulate(x)
        R = np.linalg.cholesky(calib.matrix)
    res = mc.residual_lowrank(ctx, w, r, w_hat=w_hat, calib=calib)
    M = R.T @ E
    U, s, Vt = np.linalg.svd(M)
    assert abs(res.error_before - np.sum(s ** 2)) <= 1e-12 * np.sum(s ** 2)
    assert abs(res.dropped - np.sum(s[r:] ** 2)) <= 1e-10 * np.sum(s ** 2)
    assert abs(res.error_after - res.dropped) <= 1e-6 * res.error_before
    best = (U[:, :r] * s[:r]) @ Vt[:r]
    close(R.T @ (res.a.astype(np.float64) @ res.b), best, 1e-5)
    # the same from the raw matrix
    if whiten:
        res2 = mc.residual_lowrank(ctx, w, r, w_hat=w_hat, calib=calib.matrix)
        assert np.array_equal(res2.a, res.a)


def test_residual_errors(ctx, rng):
    w = rng.standard_normal((6, 4)).astype(np.float32)
    with pytest.raises(masa.InvalidArgumentError, match="min"):
        mc.residual_lowrank(ctx, w, 5)
    with pytest.raises(masa.BadShapeError):
        mc.residual_lowrank(ctx, w, 0)
    with pytest.raises(masa.InvalidArgumentError, match="positive definite"):
        mc.residual_lowrank(ctx, w, 2, calib=-np.eye(6))
    with pytest.raises(ValueError):
        mc.residual_lowrank(ctx, w, 2, calib=np.eye(5))
    with pytest.raises(ValueError):
        mc.residual_lowrank(ctx, w, 2, calib=mc.Calibration(ctx, 5))
    # a singular C (3 rows, 6 features) is jittered
    x = rng.standard_normal((3, 6)).astype(np.float32)
    res = mc.residual_lowrank(ctx, w, 2, calib=mc.Calibration(ctx, 6).accumulate(x))
    assert res.jitter > 0


def test_compressed_stack_runs_as_layers(ctx, rng):
    """Matrix PCA atoms plus the full-rank residual as each layer's low-rank
    term give back every dense layer's output: the pieces fit the layer API
    (set_masa + set_lowrank)."""
    L, d, heads = 4, 16, 2
    x = rng.standard_normal((1, 5, d)).astype(np.float32)
    weights = {p: [(rng.standard_normal((d, d)) / 4).astype(np.float32) for _ in range(L)]
               for p in "qkvo"}
    dicts, tables = {}, {}
    for p in "qkvo":
        r = mc.matrix_pca(ctx, weights[p], 2)
        dicts[p], tables[p] = r.to_masa(ctx)
    for l in range(L):
        dense = masa.Layer(ctx, d_model=d, n_heads=heads, causal=True)
        comp = masa.Layer(ctx, d_model=d, n_heads=heads, causal=True)
        keep = []
        for p in "qkvo":
            dense.set_dense(p, weights[p][l].copy())
            comp.set_masa(p, dicts[p], tables[p], l)
            w_hat = dicts[p].compose(tables[p], l)
            res = mc.residual_lowrank(ctx, weights[p][l], d, w_hat=w_hat)
            assert res.error_after <= 1e-10 * res.error_before
            keep.append(comp.set_lowrank(p, a=res.a, b=res.b))
        y_dense = dense.forward(x)
        y_comp = comp.forward(x)
        close(y_comp, y_dense.astype(np.float64), 1e-4)


def test_declarations_of_two_modules_do_not_clash():
    """masa.compress.c_core declares the same C functions with other ctypes
    types; each module declares on its own handle, so using one never breaks
    the other (it did: argtypes are per function object)."""
    c_core = pytest.importorskip("masa.compress.c_core")
    ctx = masa.Context(1)
    w = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    before = mc.residual_lowrank(ctx, w, 2)
    c_core.CCore().residual(w, None, None, 2)
    after = mc.residual_lowrank(ctx, w, 2)
    np.testing.assert_array_equal(before.a, after.a)
    np.testing.assert_array_equal(before.b, after.b)
    ctx.close()
