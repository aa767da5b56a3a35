"""Low-rank terms W = base + A B (Layer.set_lowrank) and projections that are
A B alone, against float64 references: the numpy reference of reference.py
for masa.Layer, torch float64 autograd for masa.torch.MasaAttention."""

import ctypes

import numpy as np
import pytest

import masa
import reference as ref
from helpers import assert_close, build_layer


def with_lowrank(built, rng, ranks):
    """Adds low-rank terms {p: rank} to a built layer (wrapped arrays)."""
    terms = {}
    for p, r in ranks.items():
        d_in, d_out = built.layer.projection_shape(p)
        a = rng.uniform(-0.4, 0.4, (d_in, r)).astype(np.float32)
        b = rng.uniform(-0.4, 0.4, (r, d_out)).astype(np.float32)
        got = built.layer.set_lowrank(p, a=a, b=b)
        assert got[0] is a and got[1] is b
        assert built.layer.c_lowrank(p) == (r, a.ctypes.data, b.ctypes.data)
        terms[p] = (a, b)
    return terms


def reference(built, terms, x, dy, baseless=(), pos_offset=0):
    W = built.weights()
    for p in baseless:
        W[p] = np.zeros_like(W[p])
    for p, (a, b) in terms.items():
        W[p] = W[p] + a.astype(np.float64) @ b.astype(np.float64)
    bias = built.bias64()
    y, cache = ref.forward(built.cfg, x, W, bias, pos_offset)
    dx, dW, db = ref.backward(built.cfg, W, bias, cache, dy)
    grads = {}
    for p, spec in built.params.items():
        if p in baseless:
            continue
        if spec[0] == "masa":
            _, d, c, i = spec
            grads[f"{p}.atoms"], grads[f"{p}.coefficients"] = ref.masa_grads(d.atoms, c.values, i, dW[p])
        else:
            grads[f"{p}.weight"] = dW[p]
        if bias[p] is not None:
            grads[f"{p}.bias"] = db[p]
    for p, (a, b) in terms.items():
        grads[f"{p}.lowrank_a"] = dW[p] @ b.astype(np.float64).T
        grads[f"{p}.lowrank_b"] = a.astype(np.float64).T @ dW[p]
    return y, dx, grads


@pytest.mark.parametrize("policy", ["on_the_fly", "cached"])
@pytest.mark.parametrize("batch,seq", [(1, 3), (2, 9)])  # thin, and folded into W
def test_layer_matches_reference(ctx, rng, policy, batch, seq):
    cfg = dict(d_model=12, n_heads=3, n_kv_heads=1, causal=True, rope=True)
    built = build_layer(ctx, rng, masa_proj="qk", bias_proj="qv", **cfg)
    terms = with_lowrank(built, rng, {"q": 2, "k": 4, "o": 3})
    built.layer.set_weight_policy(policy)
    layer = built.layer
    x = rng.uniform(-1, 1, (batch, seq, 12)).astype(np.float32)
    dy = rng.uniform(-1, 1, x.shape).astype(np.float32)
    y_ref, dx_ref, g_ref = reference(built, terms, x, dy)
    y, _ = layer.forward(x, training=True)
    assert_close(y, y_ref, what="y")
    assert set(layer.gradient_shapes()) == set(g_ref)
    dx, grads = layer.backward(dy)
    assert_close(dx, dx_ref, what="dx")
    for name, want in g_ref.items():
        assert_close(grads[name], want, what=name)
    # accumulate into given buffers
    pre = {n: rng.uniform(-1, 1, g.shape).astype(np.float32) for n, g in grads.items()
           if "lowrank" in n}
    out = {n: v.copy() for n, v in pre.items()}
    layer.backward(dy, out=out, accumulate=True, need_dx=False)
    for n in pre:
        assert_close(out[n], pre[n] + g_ref[n], what=f"{n} (accumulate)")


def test_lowrank_only_and_decode(ctx, rng):
    """Q and V are A B alone, K MASA + A B, O dense; decode in chunks gives
    forward's y."""
    cfg = dict(d_model=8, n_heads=2, causal=True, rope=True)
    layer = masa.Layer(ctx, 8, 2, causal=True, rope=True)
    atoms = rng.uniform(-0.4, 0.4, (2, 8, 8)).astype(np.float32)
    coef = rng.uniform(-1, 1, (2, 2)).astype(np.float32)
    d, c = masa.Dictionary.wrap(ctx, atoms), masa.Coefficients.wrap(ctx, coef)
    layer.set_masa("k", d, c, 1)
    wo = layer.set_dense("o", rng.uniform(-0.4, 0.4, (8, 8)).astype(np.float32))
    bv = layer.set_bias("v", rng.uniform(-0.3, 0.3, 8).astype(np.float32))
    terms = {}
    for p, r in {"q": 3, "k": 2, "v": 8}.items():
        a, b = layer.set_lowrank(p, r)  # zeroed, then filled in place
        assert not a.any() and not b.any()
        a[...] = rng.uniform(-0.5, 0.5, a.shape)
        b[...] = rng.uniform(-0.5, 0.5, b.shape)
        terms[p] = (a, b)
    assert layer.projection_kind("q") is None and layer.projection_kind("k") == "masa"
    assert "projections=rK+rro" in repr(layer)
    W = {"q": 0.0, "k": ref.compose(atoms, coef, 1), "v": 0.0, "o": wo.astype(np.float64)}
    for p, (a, b) in terms.items():
        W[p] = W[p] + a.astype(np.float64) @ b.astype(np.float64)
    rc = ref.Config(8, 2, causal=True, rope=True)
    x = rng.uniform(-1, 1, (2, 6, 8)).astype(np.float32)
    y_ref, _ = ref.forward(rc, x, W, {"q": None, "k": None, "v": bv.astype(np.float64), "o": None})
    for policy in ("on_the_fly", "cached"):
        layer.set_weight_policy(policy)
        y = layer.forward(x)
        assert_close(y, y_ref, what=f"forward ({policy})")
        cache = masa.KVCache(layer, batch=2, max_seq=6)
        parts = [layer.decode(cache, np.ascontiguousarray(x[:, s:e]))
                 for s, e in ((0, 2), (2, 3), (3, 6))]
        assert_close(np.concatenate(parts, axis=1), y, what=f"decode ({policy})")
    # only A B: removing the term leaves the projection unset
    layer.remove_lowrank("q")
    assert layer.lowrank("q") is None and layer.c_lowrank("q") == (0, 0, 0)
    with pytest.raises(masa.NotReadyError):
        layer.forward(x)


def test_errors(ctx, rng):
    layer = masa.Layer(ctx, 8, 2)
    with pytest.raises(masa.BadShapeError):
        layer.set_lowrank("q", 0)
    with pytest.raises(masa.BadShapeError):
        layer.set_lowrank("k", 9)
    with pytest.raises(ValueError):
        layer.set_lowrank("q")  # no rank, no arrays
    with pytest.raises(ValueError):
        layer.set_lowrank("q", 2, a=np.zeros((8, 3), np.float32))
    with pytest.raises(TypeError):
        layer.set_lowrank("q", 2, b=np.zeros((2, 8), np.float64))
    assert layer.lowrank("q") is None
    for p in "qkvo":
        layer.set_dense(p)
    layer.set_lowrank("q", 2)
    x = rng.uniform(-1, 1, (1, 3, 8)).astype(np.float32)
    layer.forward(x, training=True)
    layer.set_lowrank("q", 3)  # replaced after the forward call
    with pytest.raises(ValueError):
        layer.backward(np.ones_like(x))
    layer.forward(x, training=True)
    with pytest.raises(ValueError):
        layer.backward(np.ones_like(x), params=["k.lowrank_a"])  # K has no term
    # the library's own check, through the raw struct
    L = masa._lib.lib()
    g = masa._lib.init_struct(masa._lib.LayerGrads, L.masa_layer_grads_default)
    buf = np.zeros(64, np.float32)
    g.d_lowrank_b[1] = buf.ctypes.data
    ws = np.zeros(layer.workspace_size(1, 3) // 4 + 1, np.float32)
    res = layer.last_reserve
    with pytest.raises(masa.InvalidArgumentError):
        L.masa_layer_backward(layer._handle(), 1, 3, 0, x.ctypes.data, x.ctypes.data, None,
                              ctypes.byref(g), ws.ctypes.data, ws.nbytes,
                              res.buffer.ctypes.data, res.buffer.nbytes)
    with pytest.raises(masa.OutOfRangeError):
        L.masa_layer_set_lowrank(layer._handle(), 4, 1, None, None)


# ---------------------------------------------------------------- torch

torch = pytest.importorskip("torch")
from masa.torch import MasaAttention, SharedAtoms  # noqa: E402
from test_torch import attention_ref  # noqa: E402  (the plain-torch attention)


def torch_reference(m, x, pos_offset=0):
    """float64 leaf copies of every parameter and y from plain torch ops."""
    leaves = {n: t.detach().double().requires_grad_() for n, t in m.named_masa_parameters()}
    W = {}
    for p in "qkvo":
        if f"{p}.atoms" in leaves:
            W[p] = torch.einsum("s,sij->ij", leaves[f"{p}.coefficients"][m.layer_index],
                                leaves[f"{p}.atoms"])
        elif f"{p}.weight" in leaves:
            W[p] = leaves[f"{p}.weight"]
        else:
            W[p] = 0.0
        if f"{p}.lowrank_a" in leaves:
            W[p] = W[p] + leaves[f"{p}.lowrank_a"] @ leaves[f"{p}.lowrank_b"]
    b = {p: leaves.get(f"{p}.bias") for p in "qkvo"}
    y = attention_ref(x, W, b, m.n_heads, m.n_kv_heads, m.head_dim, m.causal, m.rope,
                      m.rope_theta, m.softmax_scale, pos_offset)
    return y, leaves


def tassert(got, want, what, tol=2e-4):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    scale = max(1e-3, want.abs().max().item())  # relative to the gradient's own size
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("kind", ["masa+lowrank", "baseline", "dense+lowrank"])
def test_masa_attention_lowrank(kind):
    torch.manual_seed(3)
    kw = dict(d_model=12, n_heads=3, n_kv_heads=1, causal=True, rope=True, bias="qo")
    if kind == "masa+lowrank":
        shared = SharedAtoms(12, 3, 3, 2, n_kv_heads=1, projections="qkv", coefficient_noise=0.5)
        m = MasaAttention(shared=shared, layer_index=2, lowrank={"q": 2, "k": 3, "o": 4},
                          lowrank_only="", **kw)
    elif kind == "baseline":
        m = MasaAttention(lowrank=3, lowrank_only="qkvo", **kw)
        assert len(m.weights) == 0
    else:
        m = MasaAttention(lowrank={"v": 1, "o": 12}, lowrank_only="v", **kw)
    names = [n for n, _ in m.named_parameters()]
    assert any("lowrank_a" in n for n in names) and any("lowrank_b" in n for n in names)
    with torch.no_grad():  # nonzero B everywhere, so dA is exercised
        for b in m.lowrank_b.values():
            b.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = m(x, pos_offset=1)
    x64 = x.detach().double().requires_grad_()
    y_ref, leaves = torch_reference(m, x64, pos_offset=1)
    tassert(y, y_ref, "y")
    r = torch.randn_like(y)
    (y * r).sum().backward()
    (y_ref * r.double()).sum().backward()
    tassert(x.grad, x64.grad, "dx")
    params = dict(m.named_masa_parameters())
    for n, leaf in leaves.items():
        tassert(params[n].grad, leaf.grad, f"d{n}")
    # weight() includes the term
    for p in m.lowrank_a:
        term = m.lowrank_a[p] @ m.lowrank_b[p]
        if p in m.lowrank_only_projections:
            base = torch.zeros(m.shapes[p])
        elif p in m.masa_projections:
            base = m.shared.compose(p, m.layer_index)
        else:
            base = m.weights[p]
        tassert(m.weight(p), base + term, f"weight({p!r})", tol=1e-6)
    # an optimizer step changes A and B and the next forward sees them
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.step()
    y2 = m(x.detach(), pos_offset=1)
    tassert(y2, torch_reference(m, x64.detach(), pos_offset=1)[0], "y after a step")


def test_masa_attention_lowrank_gradcheck():
    """torch.autograd.gradcheck-style finite differences on the factors,
    through the float32 library with a tolerance relative to each
    gradient."""
    torch.manual_seed(5)
    m = MasaAttention(8, 2, causal=True, lowrank={"q": 2, "v": 2}, lowrank_only="v")
    with torch.no_grad():
        for b in m.lowrank_b.values():
            b.uniform_(-0.5, 0.5)
    x = torch.randn(1, 4, 8)
    r = torch.randn(1, 4, 8)
    loss = (m(x) * r).sum()
    loss.backward()
    h = 2.0 ** -6
    for name, t in (("q.A", m.lowrank_a["q"]), ("q.B", m.lowrank_b["q"]),
                    ("v.A", m.lowrank_a["v"]), ("v.B", m.lowrank_b["v"])):
        fd = torch.zeros_like(t)
        with torch.no_grad():
            for i in range(t.numel()):
                v0 = t.view(-1)[i].item()
                ls = []
                for step in (2 * h, h, -h, -2 * h):
                    t.view(-1)[i] = v0 + step
                    ls.append((m(x).double() * r.double()).sum().item())
                t.view(-1)[i] = v0
                fd.view(-1)[i] = (-ls[0] + 8 * ls[1] - 8 * ls[2] + ls[3]) / (12 * h)
        tassert(t.grad, fd, f"fd {name}", tol=5e-4)


def test_masa_attention_lowrank_errors():
    with pytest.raises(ValueError):
        MasaAttention(8, 2, lowrank={"q": 0})
    with pytest.raises(ValueError):
        MasaAttention(8, 2, lowrank={"q": 9})
    with pytest.raises(ValueError):
        MasaAttention(8, 2, lowrank={"x": 1})
    with pytest.raises(ValueError):
        MasaAttention(8, 2, lowrank_only="q")  # no rank
    with pytest.raises(ValueError):
        MasaAttention(8, 2, lowrank={"q": 1}, lowrank_only="q", external="q")
    with pytest.raises(TypeError):
        MasaAttention(8, 2, lowrank="q")
