#!/usr/bin/env python3
"""Relative error of libmasa's forward, decode and every gradient against a
float64 torch autograd reference, on layers whose softmax saturates (logits of
order 1e2, 1e4, 1e6) or is peaked (issue 12). Float32 torch (plain softmax and
autograd on the same float32 parameters) is printed beside it for scale.

    MASA_LIBRARY=build/lib/libmasa.so /usr/bin/python3 benchmarks/softmax_accuracy.py

Error of a tensor = ||got - ref||_2 / ||ref||_2 (relative to that tensor's own
magnitude; a gradient that is exactly 0 in float64 prints its norm instead,
marked "abs"). Every case is deterministic (fixed seeds). Needs numpy and
torch (Debian's python3-torch 1.13 is enough).
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "bindings", "python"))
import masa  # noqa: E402

PROJ = "qkvo"


def rope64(x, pos_offset, theta):
    """x: [B, H, T, hd] float64; rotate-half convention of masa.h."""
    T, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    ang = (pos_offset + torch.arange(T, dtype=torch.float64))[:, None] * freq[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def attention(x, W, b, case):
    """The layer of masa.h in plain torch ops (dtype of x)."""
    B, T, _ = x.shape
    H, G, hd = case["heads"], case["kv_heads"], case["d"] // case["heads"]

    def proj(p, inp):
        out = inp @ W[p]
        return out + b[p] if p in b else out

    q = proj("q", x).view(B, T, H, hd).transpose(1, 2)
    k = proj("k", x).view(B, T, G, hd).transpose(1, 2)
    v = proj("v", x).view(B, T, G, hd).transpose(1, 2)
    if case["rope"]:
        q, k = rope64(q, 0, 10000.0), rope64(k, 0, 10000.0)
    k = k.repeat_interleave(H // G, dim=1)
    v = v.repeat_interleave(H // G, dim=1)
    s = (q @ k.transpose(-1, -2)) / hd ** 0.5
    if case["causal"]:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.softmax(s, dim=-1) @ v
    return proj("o", a.transpose(1, 2).reshape(B, T, H * hd)), s


def torch_run(params, x, dy, case, dtype):
    """y, {name: grad} (names as masa.Layer.backward) and the logits."""
    leaves = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in params.items()}
    W = {}
    for p in PROJ:
        if f"{p}.atoms" in leaves:
            c = leaves[f"{p}.coefficients"][case["index"]]
            W[p] = torch.einsum("s,sio->io", c, leaves[f"{p}.atoms"])
        else:
            W[p] = leaves[f"{p}.weight"]
    b = {p: leaves[f"{p}.bias"] for p in PROJ if f"{p}.bias" in leaves}
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    y, s = attention(xt, W, b, case)
    y.backward(torch.tensor(dy, dtype=dtype))
    grads = {"dx": xt.grad.double().numpy()}
    grads.update({k: t.grad.double().numpy() for k, t in leaves.items()})
    return y.detach().double().numpy(), grads, s.detach().double().numpy()


def make_case(case):
    """float32 parameters, x and dy of a case."""
    rng = np.random.default_rng(case["seed"])
    d, H, G = case["d"], case["heads"], case["kv_heads"]
    hd = d // H
    shapes = {"q": (d, H * hd), "k": (d, G * hd), "v": (d, G * hd), "o": (H * hd, d)}
    params = {}
    for p in PROJ:
        d_in, d_out = shapes[p]
        if p in case["masa"]:
            S = 2
            params[f"{p}.atoms"] = rng.normal(0, 1 / np.sqrt(d_in), (S, d_in, d_out))
            params[f"{p}.coefficients"] = rng.uniform(0.5, 1.0, (3, S)) / np.sqrt(S)
        else:
            params[f"{p}.weight"] = rng.normal(0, 1 / np.sqrt(d_in), (d_in, d_out))
        if p in case["bias"]:
            params[f"{p}.bias"] = rng.normal(0, 0.1, d_out)
    if case.get("k_like_q"):
        # K's projection close to Q's: each query's own key scores highest
        for name in list(params):
            if name.startswith("q."):
                q = params[name]
                params["k" + name[1:]] = q + case["k_like_q"] * rng.normal(0, 1, q.shape) * q.std()
    params = {k: v.astype(np.float32) for k, v in params.items()}
    x = rng.normal(0, 1, (case["batch"], case["T"], d))
    if case.get("repeat"):
        x[:, 1::2] = x[:, 0::2]  # every token twice: exact ties between keys
    x = (x * case["x_scale"]).astype(np.float32)
    dy = rng.normal(0, 1, x.shape).astype(np.float32)
    return params, x, dy


def masa_run(params, x, dy, case):
    ctx = masa.default_context()
    layer = masa.Layer(ctx, case["d"], case["heads"], n_kv_heads=case["kv_heads"],
                       causal=case["causal"], rope=case["rope"])
    keep = []
    for p in PROJ:
        if f"{p}.atoms" in params:
            d = masa.Dictionary.wrap(ctx, params[f"{p}.atoms"])
            c = masa.Coefficients.wrap(ctx, params[f"{p}.coefficients"])
            keep += [d, c]
            layer.set_masa(p, d, c, case["index"])
        else:
            layer.set_dense(p, params[f"{p}.weight"])
        if f"{p}.bias" in params:
            layer.set_bias(p, params[f"{p}.bias"])
    y, reserve = layer.forward(x, training=True)
    dx, grads = layer.backward(dy, reserve)
    grads = dict(grads, dx=dx)
    out = {"y": y, **grads}
    if case["causal"]:
        # decode: a prefill of half the sequence, then one token at a time
        B, T, _ = x.shape
        cache = masa.KVCache(layer, B, T)
        half = T // 2
        parts = [layer.decode(cache, np.ascontiguousarray(x[:, :half]))]
        for t in range(half, T):
            parts.append(layer.decode(cache, np.ascontiguousarray(x[:, t:t + 1])))
        out["decode"] = np.concatenate(parts, axis=1)
    return out


def rel(got, want):
    want = np.asarray(want, np.float64)
    diff = float(np.linalg.norm(np.asarray(got, np.float64) - want))
    norm = float(np.linalg.norm(want))
    return (diff / norm, "") if norm > 0 else (diff, "abs")


CASES = [
    # the reproducer: one dense layer, logits of order 1e5-1e6
    dict(name="issue-x1000", d=64, heads=4, kv_heads=4, T=50, batch=1, x_scale=1000.0,
         causal=False, rope=False, masa="", bias="", seed=12),
    # saturation at logits of order 1e2, 1e4, 1e6 (x scaled by 10, 100, 1000),
    # MASA Q/K with biases, causal with RoPE (decode too)
    *[dict(name=f"saturated-1e{2 * e}", d=64, heads=4, kv_heads=2, T=40, batch=2,
           x_scale=10.0 ** e, causal=True, rope=True, masa="qk", bias="qkv", seed=20 + e)
      for e in (1, 2, 3)],
    # peaked rows: each query's own key takes almost all the mass (max p
    # median 0.9999)
    dict(name="peaked", d=64, heads=4, kv_heads=4, T=24, batch=2, x_scale=2.0,
         causal=True, rope=False, masa="qkvo", bias="qkvo", k_like_q=0.3, seed=31),
    # exact ties at logits of order 1e6: every token twice, so a row's top two
    # keys are equal (p = [1/2, 1/2])
    dict(name="ties-1e6", d=64, heads=4, kv_heads=4, T=24, batch=1, x_scale=1000.0,
         causal=True, rope=False, masa="", bias="", k_like_q=0.3, repeat=True, seed=51),
    # an ordinary layer, for comparison
    dict(name="ordinary", d=64, heads=4, kv_heads=2, T=40, batch=2, x_scale=1.0,
         causal=True, rope=True, masa="qkvo", bias="qkv", seed=41),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="run only these cases")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"library {masa.library_path()}, BLIS kernels {masa.blis_arch()}")
    for case in CASES:
        if args.case and case["name"] not in args.case:
            continue
        case.setdefault("index", 1)
        params, x, dy = make_case(case)
        y64, g64, s = torch_run(params, x, dy, case, torch.float64)
        y32, g32, _ = torch_run(params, x, dy, case, torch.float32)
        got = masa_run(params, x, dy, case)
        finite = s[np.isfinite(s)]
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        pm = p.max(-1)
        print(f"\n## {case['name']}: max |logit| {np.abs(finite).max():.3g}, max p of a row: "
              f"median {np.median(pm):.6g}, > 0.99 in {np.mean(pm > 0.99):.0%} of rows")
        print(f"{'tensor':<18}{'|ref|':>11}{'libmasa':>11}{'torch f32':>11}")
        want = {"y": y64, **g64}
        if "decode" in got:
            want["decode"] = y64
        for name in ["y", "decode", "dx"] + sorted(k for k in g64 if k != "dx"):
            if name not in want:
                continue
            e, tag = rel(got[name], want[name])
            if name == "k.bias" and not case["rope"]:
                # without RoPE, K's bias adds a constant to every logit of a
                # row, which changes nothing: its gradient is 0 exactly
                e, tag = float(np.linalg.norm(got[name])), "abs, exactly 0"
            t32 = y32 if name in ("y", "decode") else g32[name]
            t32 = (np.linalg.norm(t32) if tag == "abs, exactly 0" else rel(t32, want[name])[0])
            print(f"{name:<18}{np.linalg.norm(want[name]):>11.3g}{e:>11.2e}{t32:>11.2e} {tag}")


if __name__ == "__main__":
    main()
