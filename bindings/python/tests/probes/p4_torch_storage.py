"""P4: parameter storage of a masa.torch model changed between forward and
backward (share_memory(), .data assignment): refused at backward; a new
forward then gives the gradients of an untouched model."""

import warnings

from _probe import done, expect_raises

import torch  # noqa: E402

import masa.torch as mt  # noqa: E402

warnings.simplefilter("ignore")
torch.manual_seed(0)


def model():
    torch.manual_seed(0)
    shared = mt.SharedAtoms(16, 2, 2, 2, projections="qkv")
    return mt.MasaAttention(16, 2, shared=shared, bias="qo", causal=True)


x0 = torch.randn(2, 5, 16)


def grads(m):
    x = x0.clone().requires_grad_(True)
    m(x).square().sum().backward()
    out = {"x": x.grad.clone()}
    out.update({n: p.grad.clone() for n, p in m.named_parameters()})
    m.zero_grad()
    return out


want = grads(model())

for change in ("share_memory", "data"):
    m = model()
    x = x0.clone().requires_grad_(True)
    y = m(x)
    if change == "share_memory":
        m.share_memory()
    else:
        m.weights["o"].data = m.weights["o"].data.clone()
    e = expect_raises(RuntimeError, lambda: y.square().sum().backward(), change,
                      "changed between forward and backward")
    assert x.grad is None or torch.isfinite(x.grad).all()
    got = grads(m)
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        assert err <= 1e-5 * (1 + g.abs().max().item()), (change, name, err)
done("p4")
