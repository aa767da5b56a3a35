"""ReplaceMe: masa.replaceme_core against numpy (float64) and torch (Adam),
and the pipeline's span choice and removal on a small synthetic model whose
best span is known (masa.replaceme, no transformers needed)."""

import numpy as np
import pytest

import masa
from masa import replaceme as rm
from masa import replaceme_core as rc

torch = pytest.importorskip("torch")


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def batches(rng, sizes, d_in, d_out):
    out = []
    for n in sizes:
        out.append((rng.standard_normal((n, d_in)).astype(np.float32),
                    rng.standard_normal((n, d_out)).astype(np.float32) * 3,
                    rng.standard_normal((n, d_out)).astype(np.float32)))
    return out


# ---- least squares ----


def test_estimator_matches_lstsq_over_many_batches(ctx, rng):
    d_in, d_out = 40, 24
    data = batches(rng, [1, 513, 7, 1024, 300, 2, 900], d_in, d_out)
    est = rc.LinearEstimator(d_in, d_out, ctx)
    for x, t, o in data:
        est.accumulate(x, t, o)
    x = np.concatenate([b[0] for b in data]).astype(np.float64)
    z = np.concatenate([b[1] for b in data]).astype(np.float64) - \
        np.concatenate([b[2] for b in data])
    assert est.rows == len(x)
    xtx, xtz = est.stats()
    assert rel_err(xtx, x.T @ x) < 1e-13
    assert rel_err(xtz, x.T @ z) < 1e-13
    want = np.linalg.lstsq(x, z, rcond=None)[0]
    assert rel_err(est.solve(0.0), want) < 1e-5
    ridge = np.linalg.solve(x.T @ x + 25.0 * np.eye(d_in), x.T @ z)
    assert rel_err(est.solve(25.0), ridge) < 1e-5


def test_estimator_without_offset_and_merge(ctx, rng):
    (x1, t1, _), (x2, t2, _) = batches(rng, [200, 150], 16, 16)
    a, b, both = (rc.LinearEstimator(16, 16, ctx) for _ in range(3))
    a.accumulate(x1, t1)
    b.accumulate(x2, t2)
    both.accumulate(np.concatenate([x1, x2]), np.concatenate([t1, t2]))
    a.merge(b)
    assert a.rows == 350
    assert rel_err(a.solve(), both.solve()) < 1e-6
    with pytest.raises(masa.BadShapeError):
        a.merge(rc.LinearEstimator(16, 15, ctx))
    with pytest.raises(masa.InvalidArgumentError):
        a.merge(a)
    assert a.reset().rows == 0


def test_rank_deficient_needs_alpha(ctx, rng):
    d = 30
    # 100 rows but only rank 10: columns are combinations of 10
    basis = rng.standard_normal((100, 10))
    x = (basis @ rng.standard_normal((10, d))).astype(np.float32)
    t = rng.standard_normal((100, 8)).astype(np.float32)
    est = rc.LinearEstimator(d, 8, ctx).accumulate(x, t)
    with pytest.raises(masa.InvalidArgumentError, match="positive definite"):
        est.solve(0.0)
    xd = x.astype(np.float64)
    want = np.linalg.solve(xd.T @ xd + 0.1 * np.eye(d), xd.T @ t)
    assert rel_err(est.solve(0.1), want) < 1e-4


def test_estimator_bad_input(ctx):
    est = rc.LinearEstimator(4, 3, ctx)
    x = np.ones((5, 4), np.float32)
    t = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError):
        est.accumulate(np.ones((5, 3), np.float32), t)  # wrong width
    with pytest.raises(ValueError):
        est.accumulate(x, np.ones((4, 3), np.float32))  # row counts differ
    with pytest.raises(ValueError):
        est.accumulate(x, t, np.ones((5, 4), np.float32))
    with pytest.raises(TypeError):
        est.accumulate(x.astype(np.float64), t)
    with pytest.raises(ValueError):
        est.accumulate(np.ones((4, 5), np.float32).T, t[:4])  # not C-contiguous
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(masa.InvalidArgumentError, match="NaN"):
        est.accumulate(bad, t)
    assert est.rows == 0
    with pytest.raises(masa.InvalidArgumentError, match="no rows"):
        est.solve(1.0)
    est.accumulate(x, t)
    for alpha in (-1.0, float("nan"), float("inf")):
        with pytest.raises(masa.InvalidArgumentError):
            est.solve(alpha)
    with pytest.raises(ValueError):
        rc.LinearEstimator(-1, 3, ctx)
    with pytest.raises(masa.BadShapeError):
        rc.LinearEstimator(0, 3, ctx)


# ---- cosine ----


def torch_adam(x, target, offset, batches_rows, lr, t0=None):
    """The same Adam steps in torch (float64, autograd)."""
    d_in, d_out = x.shape[1], target.shape[1]
    t = torch.tensor(np.eye(d_in, d_out) if t0 is None else t0, dtype=torch.float64,
                     requires_grad=True)
    opt = torch.optim.Adam([t], lr=lr)
    X, Y = torch.from_numpy(x).double(), torch.from_numpy(target).double()
    O = torch.from_numpy(offset).double() if offset is not None else None
    losses = []
    for rows in batches_rows:
        opt.zero_grad()
        p = X[rows] @ t + (O[rows] if O is not None else 0)
        loss = 1 - torch.nn.functional.cosine_similarity(p, Y[rows], dim=1, eps=0).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return t.detach().numpy(), losses


def cosine_data(rng, rows=240, d_in=20, d_out=20):
    x = rng.standard_normal((rows, d_in)).astype(np.float32)
    o = rng.standard_normal((rows, d_out)).astype(np.float32)
    # a target reachable by some T, plus noise
    t = (o + x @ rng.standard_normal((d_in, d_out)) * 0.5
         + 0.1 * rng.standard_normal((rows, d_out))).astype(np.float32)
    return x, t, o


@pytest.mark.parametrize("with_offset", [True, False])
def test_cosine_steps_match_torch_adam(ctx, rng, with_offset):
    x, t, o = cosine_data(rng)
    o = o if with_offset else None
    est = rc.CosineEstimator(20, 20, ctx, learning_rate=1e-2)
    rows = [np.arange(k % 4 * 60, k % 4 * 60 + 60) for k in range(12)]
    losses = [est.step(x[r], t[r], None if o is None else o[r]) for r in rows]
    want_t, want_losses = torch_adam(x, t, o, rows, 1e-2)
    assert est.steps == 12
    np.testing.assert_allclose(losses, want_losses, rtol=0, atol=1e-5)
    eye = np.eye(20)
    assert rel_err(est.transform - eye, want_t - eye) < 1e-3


def test_cosine_fit_matches_torch_with_documented_order(ctx, rng):
    x, t, o = cosine_data(rng, rows=300)
    est = rc.CosineEstimator(20, 20, ctx, learning_rate=5e-3, epochs=4, batch_rows=64,
                             seed=1234)
    before = est.loss(x, t, o)
    losses = est.fit(x, t, o)
    after = est.loss(x, t, o)
    assert after < before - 0.02 and losses[-1] < losses[0]
    rows = [order[b:b + 64] for order in rc.epoch_orders(300, 4, 1234)
            for b in range(0, 300, 64)]
    want_t, want_losses = torch_adam(x, t, o, rows, 5e-3)
    assert est.steps == len(rows) == 20
    eye = np.eye(20)
    assert rel_err(est.transform - eye, want_t - eye) < 1e-3
    np.testing.assert_allclose(losses, np.mean(np.reshape(want_losses, (4, 5)), axis=1),
                               atol=1e-5)
    # the same seed again: the same bits
    again = rc.CosineEstimator(20, 20, ctx, learning_rate=5e-3, epochs=4, batch_rows=64,
                               seed=1234)
    again.fit(x, t, o)
    assert np.array_equal(again.transform, est.transform)


def test_cosine_bad_input(ctx):
    with pytest.raises(masa.InvalidArgumentError):
        rc.CosineEstimator(3, 3, ctx, learning_rate=0)
    with pytest.raises(masa.InvalidArgumentError):
        rc.CosineEstimator(3, 3, ctx, beta2=1.0)
    with pytest.raises(ValueError):
        rc.CosineEstimator(3, 3, ctx, epochs=-1)
    est = rc.CosineEstimator(3, 3, ctx)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(masa.BadShapeError):
        est.step(np.ones((0, 3), np.float32), np.ones((0, 3), np.float32))
    with pytest.raises(ValueError):
        est.step(x, np.ones((4, 2), np.float32))
    with pytest.raises(ValueError):
        est.set_transform(np.eye(4, dtype=np.float32))
    bad = np.eye(3, dtype=np.float32)
    bad[0, 0] = np.inf
    with pytest.raises(masa.InvalidArgumentError):
        est.set_transform(bad)
    assert np.array_equal(est.transform, np.eye(3, dtype=np.float32))


# ---- merge ----


def test_merge_both_layouts(ctx, rng):
    d_ff, d = 50, 12
    w = rng.standard_normal((d_ff, d)).astype(np.float32)
    t = rng.standard_normal((d, d)).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    h = rng.standard_normal((7, d_ff))
    want = (h @ w.astype(np.float64) + b) @ t  # the block's output, then T
    w_row, b_row = w.copy(), b.copy()
    rc.merge_linear_map(w_row, t, "row-vector", bias=b_row, context=ctx)
    assert rel_err(h @ w_row + b_row, want) < 1e-5
    w_lin = np.ascontiguousarray(w.T)  # nn.Linear's weight
    rc.merge_linear_map(w_lin, t, "nn.Linear", context=ctx)
    assert rel_err(h @ w_lin.T.astype(np.float64), (h @ w.astype(np.float64)) @ t) < 1e-5
    with pytest.raises(ValueError):
        rc.merge_linear_map(w.copy(), t, "columns")
    with pytest.raises(ValueError):
        rc.merge_linear_map(w.copy(), t[:5, :5], "row-vector")
    frozen = w.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        rc.merge_linear_map(frozen, t, "row-vector")
    bad = t.copy()
    bad[1, 1] = np.nan
    keep = w.copy()
    with pytest.raises(masa.InvalidArgumentError):
        rc.merge_linear_map(keep, bad, "row-vector")
    assert np.array_equal(keep, w)


# ---- the pipeline on a synthetic model ----


class _MLP(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = torch.nn.Linear(d, 3 * d, bias=False)
        self.down_proj = torch.nn.Linear(3 * d, d, bias=True)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.up(x)))


class _Block(torch.nn.Module):
    """Llama-shaped block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, d, scale):
        super().__init__()
        self.input_layernorm = torch.nn.LayerNorm(d)
        self.attn = torch.nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = torch.nn.LayerNorm(d)
        self.mlp = _MLP(d)
        for lin in (self.attn, self.mlp.up, self.mlp.down_proj):
            lin.weight.data *= scale

    def forward(self, x):
        y = x + self.attn(self.input_layernorm(x))
        return y + self.mlp(self.post_attention_layernorm(y))


class _Inner(torch.nn.Module):
    def __init__(self, d, scales):
        super().__init__()
        self.embed = torch.nn.Embedding(50, d)
        self.layers = torch.nn.ModuleList(_Block(d, s) for s in scales)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


class _Model(torch.nn.Module):
    def __init__(self, d, scales):
        super().__init__()
        self.model = _Inner(d, scales)
        self.config = type("Config", (), {"num_hidden_layers": len(scales),
                                          "hidden_size": d})()


def test_span_choice_and_removal_on_a_synthetic_model(ctx):
    torch.manual_seed(0)
    d = 24
    # blocks 4 and 5 barely change the residual stream: the best 2-span
    scales = [1.0, 1.0, 1.0, 1.0, 0.02, 0.02, 1.0, 1.0]
    model = _Model(d, scales)
    tokens = np.random.default_rng(0).integers(0, 50, size=4000)
    starts = list(range(0, 3200, 100))
    states = rm.last_token_states(model, tokens, starts, 64)
    assert states.shape == (9, len(starts), d)
    dist = rm.angular_distances(states, 2)
    assert sorted(dist) == list(range(1, 7))
    assert min(dist, key=dist.get) == 4

    # collect for a real (not near-identity) span and check the hooks' rows
    span = (2, 2)
    acts = rm.collect_activations(model, tokens, starts, 64, [span])[span]
    ids = torch.from_numpy(tokens[starts[0]:starts[0] + 64])[None]
    # Y, M and L from an explicit forward
    with torch.no_grad():
        x = model.model.embed(ids)
        x = model.model.layers[0](x)
        b1 = model.model.layers[1]
        y = x + b1.attn(b1.input_layernorm(x))
        m = b1.mlp(b1.post_attention_layernorm(y))
        out = model.model.layers[3](model.model.layers[2](y + m))
    assert rel_err(acts["Y"][:64], y[0].numpy()) < 1e-6
    assert rel_err(acts["M"][:64], m[0].numpy()) < 1e-6
    assert rel_err(acts["L"][:64], out[0].numpy()) < 1e-6

    # LS removal reproduces the removed blocks' effect better than plain
    est = rc.LinearEstimator(d, d, ctx).accumulate(acts["M"], acts["L"], acts["Y"])
    transform = est.solve(1e-3)
    test_ids = torch.from_numpy(tokens[3300:3364])[None]
    with torch.no_grad():
        full = model.model(test_ids)
    plain, ls = _Model(d, scales), _Model(d, scales)
    plain.load_state_dict(model.state_dict())
    ls.load_state_dict(model.state_dict())
    rm.remove_blocks(plain, *span)
    rm.remove_blocks(ls, *span, transform=transform, context=ctx)
    assert len(ls.model.layers) == 6 and ls.config.num_hidden_layers == 6
    with torch.no_grad():
        err_plain = (plain.model(test_ids) - full).norm().item()
        err_ls = (ls.model(test_ids) - full).norm().item()
    assert err_ls < 0.8 * err_plain, (err_ls, err_plain)


def test_calibration_never_overlaps_evaluation():
    n = 729_521
    ev = rm.eval_starts(n)
    assert ev[0] == 0 and ev[-1] == n - 512 and len(ev) == 40
    cal = rm.calibration_starts(n, 100, 512)
    for s in cal:
        assert all(s + 512 <= e or s >= e + 512 for e in ev)
    assert len(set(cal)) == 100
    with pytest.raises(SystemExit):
        rm.calibration_starts(10_000, 200, 512)


def test_parse_span():
    assert rm.parse_span("3:7") == (3, 4)
    import argparse

    for bad in ("0:2", "5:5", "a:b", "4"):
        with pytest.raises(argparse.ArgumentTypeError):
            rm.parse_span(bad)
