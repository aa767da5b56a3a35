"""masa.torch against the same attention written in plain torch ops."""

import copy
import io
import os
import subprocess
import sys

import pytest

try:
    import torch
except ImportError:  # fallback only: torch is installed where these tests run
    torch = pytest.importorskip("torch")

import masa
from masa.torch import MasaAttention, MasaDictionaries, SharedAtoms

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------- reference


def rope_ref(x, pos_offset, theta):
    """x: [B, H, T, hd]; rotate-half convention of masa.h."""
    T, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    i = torch.arange(half, dtype=torch.float64)
    freq = theta ** (-2.0 * i / hd)
    ang = (pos_offset + torch.arange(T, dtype=torch.float64))[:, None] * freq[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def attention_ref(x, W, b, n_heads, n_kv_heads, head_dim, causal=False, rope=False,
                  theta=10000.0, scale=None, pos_offset=0):
    """Plain torch ops. W: {p: (d_in, d_out)}, b: {p: tensor or None}."""
    B, T, _ = x.shape
    scale = scale or 1.0 / head_dim ** 0.5

    def proj(p, inp):
        out = inp @ W[p]
        return out + b[p] if b.get(p) is not None else out

    q = proj("q", x).view(B, T, n_heads, head_dim).transpose(1, 2)
    k = proj("k", x).view(B, T, n_kv_heads, head_dim).transpose(1, 2)
    v = proj("v", x).view(B, T, n_kv_heads, head_dim).transpose(1, 2)
    if rope:
        q, k = rope_ref(q, pos_offset, theta), rope_ref(k, pos_offset, theta)
    group = n_heads // n_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    a = torch.softmax(s, dim=-1) @ v
    a = a.transpose(1, 2).reshape(B, T, n_heads * head_dim)
    return proj("o", a)


class RefParams:
    """float64 leaf copies of a MasaAttention's parameters (and its shared
    module's), so the reference gets its own gradients."""

    def __init__(self, shared, layers):
        self.atoms, self.coef = {}, {}
        if shared is not None:
            for p in shared.projections:
                self.atoms[p] = shared.atoms[p].detach().double().requires_grad_()
                self.coef[p] = shared.coefficients[p].detach().double().requires_grad_()
        self.weights = [{p: w.detach().double().requires_grad_() for p, w in m.weights.items()}
                        for m in layers]
        self.biases = [{p: t.detach().double().requires_grad_() for p, t in m.biases.items()}
                       for m in layers]

    def run(self, i, m, x, pos_offset=0):
        W = {}
        for p in "qkvo":
            if p in m.masa_projections:
                W[p] = torch.einsum("s,sij->ij", self.coef[p][m.layer_index], self.atoms[p])
            else:
                W[p] = self.weights[i][p]
        return attention_ref(x, W, self.biases[i], m.n_heads, m.n_kv_heads, m.head_dim,
                             m.causal, m.rope, m.rope_theta, m.softmax_scale, pos_offset)


def assert_close(got, want, tol=2e-4, what=""):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


# ----------------------------------------------------------------- tests


CONFIGS = {
    "masa-all": dict(d_model=16, n_heads=4, shared="qkvo"),
    "causal-gqa-rope-bias": dict(d_model=24, n_heads=6, n_kv_heads=2, causal=True, rope=True,
                                 bias=True, shared="qkvo"),
    "masa-qkv-dense-o": dict(d_model=16, n_heads=2, causal=True, rope=True, bias="qo",
                             shared="qkv", rope_theta=100.0),
    "mqa-head-dim-scale": dict(d_model=20, n_heads=4, n_kv_heads=1, head_dim=6, causal=True,
                               rope=True, bias="kv", shared="kvo", softmax_scale=0.25),
    "dense": dict(d_model=12, n_heads=3, causal=True, bias=True, shared=""),
}


def make_layer(cfg, n_layers=3, n_atoms=2, layer_index=1, seed=0):
    cfg = dict(cfg)
    projections = cfg.pop("shared")
    torch.manual_seed(seed)
    shared = None
    if projections:
        shared = SharedAtoms(cfg["d_model"], cfg["n_heads"], n_layers, n_atoms,
                             n_kv_heads=cfg.get("n_kv_heads"), head_dim=cfg.get("head_dim"),
                             projections=projections, coefficient_noise=0.5)
    m = MasaAttention(shared=shared, layer_index=layer_index, **cfg)
    return shared, m


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("pos_offset", [0, 5])
def test_layer_matches_torch_reference(name, pos_offset):
    shared, m = make_layer(CONFIGS[name])
    with torch.no_grad():  # nonzero biases
        for b in m.biases.values():
            b.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, m.d_model, requires_grad=True)
    y = m(x, pos_offset=pos_offset)
    assert y.dtype == torch.float32 and y.shape == x.shape

    ref = RefParams(shared, [m])
    x64 = x.detach().double().requires_grad_()
    y_ref = ref.run(0, m, x64, pos_offset)
    assert_close(y, y_ref, what="y")

    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g.double()).sum().backward()
    assert_close(x.grad, x64.grad, what="dx")
    checked = 1
    if shared is not None:
        for p in shared.projections:
            assert_close(shared.atoms[p].grad, ref.atoms[p].grad, what=f"atoms[{p}]")
            assert_close(shared.coefficients[p].grad, ref.coef[p].grad, what=f"coefficients[{p}]")
            checked += 2
    for p, w in m.weights.items():
        assert_close(w.grad, ref.weights[0][p].grad, what=f"weight[{p}]")
        checked += 1
    for p, b in m.biases.items():
        assert_close(b.grad, ref.biases[0][p].grad, what=f"bias[{p}]")
        checked += 1
    assert checked == 1 + len(list(m.parameters()))

    with torch.no_grad():
        y_nograd = m(x, pos_offset=pos_offset)
    assert not y_nograd.requires_grad
    assert_close(y_nograd, y, 1e-6)


class Stack(torch.nn.Module):
    """A residual stack of MASA attention layers sharing one SharedAtoms."""

    def __init__(self, n_layers, n_atoms, d_model=16, n_heads=4, **kw):
        super().__init__()
        self.shared = MasaDictionaries(d_model, n_heads, n_layers, n_atoms,
                                       n_kv_heads=kw.get("n_kv_heads"), coefficient_noise=0.3)
        self.layers = torch.nn.ModuleList(
            MasaAttention(d_model, n_heads, layer_index=i, shared=self.shared, **kw)
            for i in range(n_layers))

    def forward(self, h):
        for layer in self.layers:
            h = h + layer(h)
        return h


def test_six_layers_sharing_two_atoms_gradients():
    torch.manual_seed(3)
    model = Stack(6, 2, causal=True, rope=True, n_kv_heads=2, bias="qv")
    params = list(model.parameters())
    # 4 atoms + 4 tables + 6 layers x 2 biases, each listed once.
    assert len(params) == 8 + 12
    x = torch.randn(2, 7, 16, requires_grad=True)
    target = torch.randn(2, 7, 16)
    loss = ((model(x) - target) ** 2).mean()
    loss.backward()

    ref = RefParams(model.shared, list(model.layers))
    x64 = x.detach().double().requires_grad_()
    h = x64
    for i, layer in enumerate(model.layers):
        h = h + ref.run(i, layer, h)
    loss_ref = ((h - target.double()) ** 2).mean()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-4 * max(1.0, abs(loss_ref.item()))
    assert_close(x.grad, x64.grad, what="dx")
    for p in "qkvo":
        assert_close(model.shared.atoms[p].grad, ref.atoms[p].grad, what=f"atoms[{p}]")
        assert_close(model.shared.coefficients[p].grad, ref.coef[p].grad, what=f"coef[{p}]")
        # Every layer contributes to its own row of the table.
        assert (model.shared.coefficients[p].grad.abs().sum(1) > 0).all()
    for i, layer in enumerate(model.layers):
        for p, b in layer.biases.items():
            assert_close(b.grad, ref.biases[i][p].grad, what=f"layer {i} bias[{p}]")


def test_parameters_are_zero_copy_and_rewrapped():
    shared, m = make_layer(CONFIGS["masa-qkv-dense-o"])
    d, c = shared.handles("q")
    assert d.atoms.ctypes.data == shared.atoms["q"].data_ptr()
    assert c.values.ctypes.data == shared.coefficients["q"].data_ptr()
    layer = m.c_layer()
    assert layer.c_weight_pointer("o") == m.weights["o"].data_ptr()
    assert layer.c_bias_pointer("q") == m.biases["q"].data_ptr()

    x = torch.randn(1, 4, 16)
    ref = lambda: RefParams(shared, [m]).run(0, m, x.double())  # noqa: E731
    # In-place changes (what optimizers do) are seen directly.
    with torch.no_grad():
        shared.atoms["k"].mul_(2.0)
        m.weights["o"].add_(0.1)
    assert_close(m(x), ref(), what="after in-place update")
    # New storage (param.data = ..., load_state_dict into a new tensor) is re-wrapped.
    shared.atoms["q"].data = torch.randn_like(shared.atoms["q"])
    m.weights["o"].data = torch.randn_like(m.weights["o"])
    m.biases["q"].data = torch.randn_like(m.biases["q"])
    assert_close(m(x), ref(), what="after re-assignment")
    assert shared.handles("q")[0].atoms.ctypes.data == shared.atoms["q"].data_ptr()


def test_load_state_dict_deepcopy_and_save():
    torch.manual_seed(0)
    a = Stack(3, 2, causal=True)
    torch.manual_seed(1)
    b = Stack(3, 2, causal=True)
    x = torch.randn(2, 4, 16)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert_close(b(x), a(x), 1e-6)
    c = copy.deepcopy(a)
    assert c.layers[0].shared is c.shared and c.shared is not a.shared
    assert_close(c(x), a(x), 1e-6)
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    try:
        d = torch.load(buf, weights_only=False)
    except TypeError:  # torch 1.13 has no weights_only
        buf.seek(0)
        d = torch.load(buf)
    assert_close(d(x), a(x), 1e-6)


def test_input_variants():
    _, m = make_layer(CONFIGS["causal-gqa-rope-bias"])
    base = torch.randn(2, 5, 48)
    x = base[:, :, ::2]  # non-contiguous input is accepted (copied)
    assert not x.is_contiguous()
    assert_close(m(x), m(x.contiguous()), 1e-6)
    # Gradients w.r.t. parameters only, input without requires_grad.
    m(x.contiguous()).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    # Gradient w.r.t. the input only.
    for p in m.parameters():
        p.requires_grad_(False)
    xi = torch.randn(1, 3, 24, requires_grad=True)
    m(xi).pow(2).sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0


def test_bad_tensors_raise_clear_errors():
    _, m = make_layer(CONFIGS["masa-all"])
    with pytest.raises(TypeError, match="CPU float32"):
        m(torch.randn(1, 3, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="CPU float32"):
        m(torch.randn(1, 3, 16).half())
    with pytest.raises(TypeError, match="CPU float32"):
        m(torch.empty(1, 3, 16, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([[[0.0] * 16]])
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(1, 3, 15))
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(3, 16))
    with pytest.raises(ValueError, match="pos_offset"):
        m(torch.randn(1, 3, 16), pos_offset=-2)
    m.double()
    with pytest.raises(TypeError, match="CPU float32"):
        m(torch.randn(1, 3, 16))
    with pytest.raises(TypeError, match="CPU float32"):
        m(torch.randn(1, 3, 16, dtype=torch.float64))


def test_bad_construction():
    shared = SharedAtoms(16, 4, 3, 2)
    with pytest.raises(ValueError, match="shape"):
        MasaAttention(16, 4, n_kv_heads=2, shared=shared)  # K and V are 16 x 8 here
    with pytest.raises(ValueError, match="layer_index"):
        MasaAttention(16, 4, shared=shared, layer_index=3)
    with pytest.raises(ValueError, match="projections"):
        MasaAttention(16, 4, bias="qx")
    with pytest.raises(ValueError, match="init"):
        SharedAtoms(16, 4, 3, 2, init="orthogonal")
    with pytest.raises(masa.MasaError):
        MasaAttention(16, 4, n_kv_heads=3)(torch.randn(1, 2, 16))


def test_modifying_saved_parameters_is_detected():
    _, m = make_layer(CONFIGS["masa-all"])
    y = m(torch.randn(1, 3, 16, requires_grad=True))
    with torch.no_grad():
        m.shared.atoms["q"].add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_shared_init_reproducible():
    torch.manual_seed(5)
    a = SharedAtoms(16, 4, 6, 2, n_kv_heads=2, coefficient_noise=0.01)
    torch.manual_seed(5)
    b = SharedAtoms(16, 4, 6, 2, n_kv_heads=2, coefficient_noise=0.01)
    for p in "qkvo":
        assert torch.equal(a.atoms[p], b.atoms[p])
        assert torch.equal(a.coefficients[p], b.coefficients[p])
    assert a.atoms["k"].shape == (2, 16, 8)
    assert a.atoms["q"].abs().max() <= 0.25 + 1e-6  # 1/sqrt(d_in)
    c = SharedAtoms(16, 4, 6, 3, init="blocks", seed=1)
    one_hot = torch.zeros(6, 3)
    one_hot[torch.arange(6), torch.arange(6) // 2] = 1
    assert torch.equal(c.coefficients["v"].detach(), one_hot)


def test_import_masa_does_not_import_torch():
    env = dict(os.environ, PYTHONPATH=PKG_ROOT)
    code = "import sys, masa; masa.Context().close(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_recovers_from_a_closed_default_context():
    _, m = make_layer(CONFIGS["causal-gqa-rope-bias"])
    x = torch.randn(1, 3, 24)
    y0 = m(x)
    masa.default_context().close()  # closes every handle made from it
    assert m._layer.closed
    assert_close(m(x), y0, 1e-6)  # layer and wrappers are rebuilt
    assert not m._layer.closed


def test_no_reserve_or_layer_kept_after_backward():
    import gc
    import weakref

    _, m = make_layer(CONFIGS["masa-all"])
    x = torch.randn(2, 3, 16, requires_grad=True)
    m(x).sum().backward()
    assert m.c_layer().last_reserve is None  # the autograd graph owns reserves
    layer_ref = weakref.ref(m.c_layer())
    del m
    gc.collect()
    assert layer_ref() is None


def test_external_weights_from_low_rank_factors():
    """Weights computed by torch (products of factors) run in libmasa and
    their gradients flow back to the factors."""
    torch.manual_seed(7)
    shared = SharedAtoms(16, 4, 3, 2, n_kv_heads=2, projections="q")
    m = MasaAttention(16, 4, n_kv_heads=2, causal=True, rope=True, bias="k", layer_index=2,
                      shared=shared, external="kv")
    assert sorted(m.weights) == ["o"] and m.external_projections == "kv"
    assert "external=kv" in repr(m)
    factors = {p: (torch.randn(16, 3, requires_grad=True), torch.randn(3, 8, requires_grad=True))
               for p in "kv"}
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = m(x, weights={p: a @ b for p, (a, b) in factors.items()})

    ref = RefParams(shared, [m])
    f64 = {p: (a.detach().double().requires_grad_(), b.detach().double().requires_grad_())
           for p, (a, b) in factors.items()}
    W = {"q": torch.einsum("s,sij->ij", ref.coef["q"][2], ref.atoms["q"]),
         "o": ref.weights[0]["o"]}
    W.update({p: a @ b for p, (a, b) in f64.items()})
    x64 = x.detach().double().requires_grad_()
    y_ref = attention_ref(x64, W, ref.biases[0], 4, 2, 4, causal=True, rope=True)
    assert_close(y, y_ref, what="y")

    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g.double()).sum().backward()
    assert_close(x.grad, x64.grad, what="dx")
    for p in "kv":
        for i in range(2):
            assert_close(factors[p][i].grad, f64[p][i].grad, what=f"factor {i} of {p}")
    assert_close(shared.atoms["q"].grad, ref.atoms["q"].grad, what="atoms[q]")
    assert_close(m.weights["o"].grad, ref.weights[0]["o"].grad, what="weight[o]")
    assert_close(m.biases["k"].grad, ref.biases[0]["k"].grad, what="bias[k]")

    # New weights at every call are bound again; no_grad runs the same layer.
    with torch.no_grad():
        w2 = {p: 0.5 * a @ b for p, (a, b) in factors.items()}
        W.update({p: w.double() for p, w in w2.items()})
        assert_close(m(x, weights=w2), attention_ref(x64, W, ref.biases[0], 4, 2, 4,
                                                      causal=True, rope=True), what="rebound")
    assert m.c_layer().c_weight_pointer("k") == w2["k"].data_ptr()


def test_external_weights_errors():
    shared = SharedAtoms(16, 4, 3, 2, projections="qkv")
    with pytest.raises(ValueError, match="both shared and external"):
        MasaAttention(16, 4, shared=shared, external="vo")
    with pytest.raises(ValueError, match="projections"):
        MasaAttention(16, 4, external="ox")
    m = MasaAttention(16, 4, shared=shared, external="o")
    x = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="exactly the external projections"):
        m(x)
    with pytest.raises(ValueError, match="exactly the external projections"):
        m(x, weights={"o": torch.randn(16, 16), "q": torch.randn(16, 16)})
    with pytest.raises(ValueError, match="shape"):
        m(x, weights={"o": torch.randn(16, 8)})
    with pytest.raises(TypeError, match="CPU float32"):
        m(x, weights={"o": torch.randn(16, 16, dtype=torch.float64)})
    w = torch.randn(16, 16)
    assert_close(m(x, weights={"o": w.t()}), m(x, weights={"o": w.t().contiguous()}), 1e-6)
