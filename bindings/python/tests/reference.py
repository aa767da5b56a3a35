"""A straightforward float64 numpy reference of the attention layer in masa.h,
with a hand-written backward pass."""

from __future__ import annotations

import numpy as np

PROJ = "qkvo"


def rope_angles(seq, head_dim, theta, pos_offset):
    half = head_dim // 2
    i = np.arange(half, dtype=np.float64)
    freq = theta ** (-2.0 * i / head_dim)
    pos = pos_offset + np.arange(seq, dtype=np.float64)
    ang = pos[:, None] * freq[None, :]  # [T, half]
    return np.cos(ang), np.sin(ang)


def rope(x, cos, sin):
    """x: [B, T, H, hd]; rotate-half convention of masa.h."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def rope_backward(dx, cos, sin):
    """Transpose of rope() (a rotation by the negative angle)."""
    half = dx.shape[-1] // 2
    a, b = dx[..., :half], dx[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return np.concatenate([a * c + b * s, b * c - a * s], axis=-1)


class Config:
    def __init__(self, d_model, n_heads, n_kv_heads=None, head_dim=None, causal=False,
                 rope=False, rope_theta=10000.0, scale=None):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.causal = causal
        self.rope = rope
        self.rope_theta = rope_theta
        self.scale = scale or 1.0 / np.sqrt(self.head_dim)

    def shapes(self):
        dq = self.n_heads * self.head_dim
        dkv = self.n_kv_heads * self.head_dim
        return {"q": (self.d_model, dq), "k": (self.d_model, dkv),
                "v": (self.d_model, dkv), "o": (dq, self.d_model)}


def forward(cfg, x, W, b, pos_offset=0):
    """x [B,T,d]; W: {p: (d_in, d_out)}; b: {p: (d_out,) or None}.
    Returns y and a cache for backward."""
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    H, G, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def proj(p, inp):
        out = inp @ W[p]
        return out + b[p] if b.get(p) is not None else out

    q = proj("q", x).reshape(B, T, H, hd)
    k = proj("k", x).reshape(B, T, G, hd)
    v = proj("v", x).reshape(B, T, G, hd)
    cos = sin = None
    if cfg.rope:
        cos, sin = rope_angles(T, hd, cfg.rope_theta, pos_offset)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    group = H // G
    kh = np.repeat(k, group, axis=2)  # [B,T,H,hd]
    vh = np.repeat(v, group, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kh) * cfg.scale
    if cfg.causal:
        mask = np.triu(np.ones((T, T), bool), 1)
        s = np.where(mask, -np.inf, s)
    s = s - s.max(-1, keepdims=True)
    pr = np.exp(s)
    pr /= pr.sum(-1, keepdims=True)
    a = np.einsum("bhts,bshd->bthd", pr, vh).reshape(B, T, H * hd)
    y = proj("o", a)
    cache = dict(x=x, q=q, kh=kh, vh=vh, pr=pr, a=a, cos=cos, sin=sin)
    return y, cache


def backward(cfg, W, b, cache, dy):
    """Returns dx and {p: dW}, {p: db}."""
    dy = np.asarray(dy, np.float64)
    x, q, kh, vh, pr, a = (cache[n] for n in ("x", "q", "kh", "vh", "pr", "a"))
    B, T, _ = x.shape
    H, G, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    group = H // G
    dW, db = {}, {}

    def proj_back(p, inp, dout):
        dW[p] = inp.reshape(-1, inp.shape[-1]).T @ dout.reshape(-1, dout.shape[-1])
        if b.get(p) is not None:
            db[p] = dout.reshape(-1, dout.shape[-1]).sum(0)
        return dout @ W[p].T

    da = proj_back("o", a, dy).reshape(B, T, H, hd)
    dpr = np.einsum("bthd,bshd->bhts", da, vh)
    dvh = np.einsum("bhts,bthd->bshd", pr, da)
    ds = pr * (dpr - (dpr * pr).sum(-1, keepdims=True)) * cfg.scale
    dq = np.einsum("bhts,bshd->bthd", ds, kh)
    dkh = np.einsum("bhts,bthd->bshd", ds, q)
    dk = dkh.reshape(B, T, G, group, hd).sum(3)
    dv = dvh.reshape(B, T, G, group, hd).sum(3)
    if cfg.rope:
        dq = rope_backward(dq, cache["cos"], cache["sin"])
        dk = rope_backward(dk, cache["cos"], cache["sin"])
    dx = proj_back("q", x, dq.reshape(B, T, -1))
    dx = dx + proj_back("k", x, dk.reshape(B, T, -1))
    dx = dx + proj_back("v", x, dv.reshape(B, T, -1))
    return dx, dW, db


def compose(atoms, coef, layer):
    return np.einsum("s,sij->ij", np.asarray(coef[layer], np.float64), np.asarray(atoms, np.float64))


def masa_grads(atoms, coef, layer, dW):
    """(d_atoms, d_coefficients) for one layer's dW; the table gradient has
    only row `layer` nonzero."""
    atoms = np.asarray(atoms, np.float64)
    d_atoms = np.asarray(coef[layer], np.float64)[:, None, None] * dW[None]
    d_coef = np.zeros(np.shape(coef))
    d_coef[layer] = np.einsum("sij,ij->s", atoms, dW)
    return d_atoms, d_coef
