#!/usr/bin/env python3
"""Train a small MASA transformer on a toy next-token task with PyTorch.

Every sequence follows x[t+1] = (x[t] + x[t-1]) mod V from two random start
tokens, so predicting a token needs the two tokens before it: the model must
learn to attend. Four causal RoPE attention layers share, per projection
(Q, K, V, O), a dictionary of 2 atoms plus a 4 x 2 coefficient table
(masa.torch.SharedAtoms); attention runs in libmasa, and AdamW trains atoms,
coefficients and the rest of the model.

    python3 examples/python/train_small.py [--steps 300]

Runs from a source checkout (after `meson setup build && ninja -C build`)
or with the package installed (`pip install bindings/python`).
"""

import argparse
import math
import os
import sys
import time

try:
    import masa  # noqa: F401
except ImportError:  # source checkout: use bindings/python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "..", "..", "bindings", "python"))

import torch
from torch import nn

from masa.torch import MasaAttention, SharedAtoms


class Block(nn.Module):
    def __init__(self, d_model, n_heads, layer_index, shared):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MasaAttention(d_model, n_heads, causal=True, rope=True,
                                  layer_index=layer_index, shared=shared)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class TinyMasaLM(nn.Module):
    def __init__(self, vocab, d_model=64, n_heads=4, n_layers=4, n_atoms=2, context=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        # One dictionary (n_atoms atoms) and one n_layers x n_atoms table per
        # projection type, shared by all layers; context (a masa.Context)
        # sets libmasa's threads, None = masa.default_context() (all CPUs).
        self.shared = SharedAtoms(d_model, n_heads, n_layers, n_atoms, coefficient_noise=0.05,
                                  context=context)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, i, self.shared)
                                    for i in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def next_token_loss(model, x, y):
    """Mean cross-entropy of the predictions of y from x. The first target
    needs both start tokens, which the model has; only position 0 (one known
    token) is unpredictable, so it is left out."""
    logits = model(x)
    return nn.functional.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]),
                                       y[:, 1:].reshape(-1))


def batch(vocab, n, seq, generator):
    x = torch.empty(n, seq + 1, dtype=torch.long)
    x[:, :2] = torch.randint(0, vocab, (n, 2), generator=generator)
    for t in range(2, seq + 1):
        x[:, t] = (x[:, t - 1] + x[:, t - 2]) % vocab
    return x[:, :-1], x[:, 1:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = TinyMasaLM(args.vocab)
    attn_params = sum(p.numel() for p in model.shared.parameters())
    dense_equiv = len(model.blocks) * sum(r * c for r, c in model.shared.shapes.values())
    print(f"attention parameters: {attn_params} shared vs {dense_equiv} dense "
          f"({100 * (1 - attn_params / dense_equiv):.0f}% fewer)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    start, first, recent = time.time(), None, []
    for step in range(1, args.steps + 1):
        x, y = batch(args.vocab, args.batch, args.seq, gen)
        loss = next_token_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        recent.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    final = sum(recent[-10:]) / len(recent[-10:])
    print(f"loss {first:.3f} -> {final:.3f} (chance {math.log(args.vocab):.3f}) "
          f"in {time.time() - start:.1f}s")
    return 0 if final < first else 1


if __name__ == "__main__":
    sys.exit(main())
