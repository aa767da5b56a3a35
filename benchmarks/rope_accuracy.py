#!/usr/bin/env python3
"""How accurately RoPE angles are formed at large positions, against angles
computed exactly (mpmath, 60 digits, reduced modulo 2 pi), for pos_offset P
from 0 to 2^52:
- angle error: the largest error of the angles as src/attention/rope.c forms
  them (pos * theta^(-2i/hd) in double), over every frequency and token;
- y, double: relative error of a layer's output computed in float64 with
  those angles, against the same with exact angles (the angles' effect
  alone, at any position);
- y, libmasa: relative error of libmasa's forward against the exact float64
  output (float rounding included), or the error it returns for positions
  beyond MASA_MAX_POSITION.

    MASA_LIBRARY=build/lib/libmasa.so /usr/bin/python3 benchmarks/rope_accuracy.py

This is the measurement behind MASA_MAX_POSITION in masa.h. Needs numpy
and mpmath (Debian: python3-numpy, python3-mpmath).
"""

import math
import os
import sys

import mpmath
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "bindings", "python"))
import masa  # noqa: E402

D_MODEL, HEADS, T, THETA = 64, 4, 16, 10000.0
HD = D_MODEL // HEADS
mpmath.mp.dps = 60
TWO_PI = 2 * mpmath.pi


def exact_angles(pos0):
    """[T, hd/2] angles (pos0 + t) theta^(-2i/hd) reduced mod 2 pi, exactly."""
    out = np.empty((T, HD // 2))
    for i in range(HD // 2):
        freq = mpmath.power(THETA, mpmath.mpf(-2 * i) / HD)
        for t in range(T):
            out[t, i] = float(mpmath.fmod((pos0 + t) * freq, TWO_PI))
    return out


def double_angles_error(pos0):
    """Largest |angle as rope.c forms it - exact angle| (mod 2 pi) over the
    positions pos0.. pos0 + T - 1 and every frequency."""
    worst = 0.0
    for i in range(HD // 2):
        freq_d = math.pow(THETA, -2.0 * i / HD)
        freq = mpmath.power(THETA, mpmath.mpf(-2 * i) / HD)
        for t in range(T):
            got = mpmath.mpf((float(pos0) + float(t)) * freq_d)
            d = mpmath.fmod(got - (pos0 + t) * freq, TWO_PI)
            d = min(abs(d), abs(TWO_PI - abs(d)))
            worst = max(worst, float(d))
    return worst


def double_angles(pos0):
    """The angles as rope.c forms them."""
    i = np.arange(HD // 2)
    freq = np.array([math.pow(THETA, -2.0 * k / HD) for k in i])
    pos = float(pos0) + np.arange(T, dtype=np.float64)
    return pos[:, None] * freq[None, :]


def reference(x, W, ang):
    """Causal RoPE attention in float64 with the given angles."""
    B = x.shape[0]
    q = (x @ W["q"]).reshape(B, T, HEADS, HD)
    k = (x @ W["k"]).reshape(B, T, HEADS, HD)
    v = (x @ W["v"]).reshape(B, T, HEADS, HD)
    c, s = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]

    def rot(z):
        a, b = z[..., :HD // 2], z[..., HD // 2:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    q, k = rot(q), rot(k)
    sc = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HD)
    sc = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, sc)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = np.einsum("bhts,bshd->bthd", p, v).reshape(B, T, D_MODEL)
    return a @ W["o"]


def main():
    rng = np.random.default_rng(7)
    ctx = masa.default_context()
    layer = masa.Layer(ctx, D_MODEL, HEADS, causal=True, rope=True, rope_theta=THETA)
    W = {}
    for p in "qkvo":
        W[p] = rng.normal(0, 1 / math.sqrt(D_MODEL), (D_MODEL, D_MODEL)).astype(np.float32)
        layer.set_dense(p, W[p])
    # scaled so that the logits are of order 10: softmax is sensitive to the angles
    x = (rng.normal(0, 1, (2, T, D_MODEL)) * 3).astype(np.float32)
    W64 = {p: w.astype(np.float64) for p, w in W.items()}
    x64 = x.astype(np.float64)
    y0 = layer.forward(x, pos_offset=0)
    print(f"library {masa.library_path()}; d_model {D_MODEL}, {HEADS} heads, head_dim {HD}, "
          f"T {T}, theta {THETA:g}")
    print(f"{'pos_offset':>12}{'angle error':>13}{'y, double':>11}{'y, libmasa':>12}"
          f"{'y vs P=0':>10}")
    for e in [0, 10, 16, 20, 22, 24, 26, 28, 30, 31, 32, 33, 34, 36, 40, 44, 48, 52]:
        pos = 0 if e == 0 else 2 ** e - T  # the last token at 2^e - 1
        ref = reference(x64, W64, exact_angles(pos))
        rel = lambda y: np.linalg.norm(y - ref) / np.linalg.norm(ref)  # noqa: E731
        line = (f"{'2^%d - %d' % (e, T) if e else '0':>12}{double_angles_error(pos):>13.2e}"
                f"{rel(reference(x64, W64, double_angles(pos))):>11.2e}")
        try:
            y = layer.forward(x, pos_offset=pos)
        except masa.MasaError as err:
            print(f"{line}  refused: {type(err).__name__}")
            continue
        drift = np.linalg.norm(y - y0) / np.linalg.norm(y0)
        print(f"{line}{rel(y):>12.2e}{drift:>10.2e}")


if __name__ == "__main__":
    main()
