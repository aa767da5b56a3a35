"""The byte-level language models of replicate.py, one per attention variant.

Every variant is the same pre-norm decoder (byte embedding, L blocks of
causal RoPE attention + GELU MLP, final LayerNorm, output layer); only the
attention projections differ. Attention always runs in libmasa
(masa.torch.MasaAttention):

| variant         | Q, K, V, O projections                                              |
|-----------------|---------------------------------------------------------------------|
| dense           | per-layer dense weights                                             |
| masa-qkvo       | one dictionary of S atoms per projection type, learned L x S tables |
| masa-qkv        | Q, K, V as masa-qkvo, O per-layer dense                             |
| low-rank        | W = A B per layer and projection (torch factors; libmasa gets A B   |
|                 | as an external dense weight), rank matching masa-qkvo's count       |
| repeat-all-over | S weight sets, layer l uses set l mod S (one-hot table, not trained)|
| sequential      | S weight sets, layers [l*L/S, (l+1)*L/S) share set l (fixed table)  |
| gqa             | per-layer dense, fewer key/value heads                              |

Attention parameters are the trainable tensors of the attention projections
(atoms, coefficient tables, dense weights, low-rank factors); the fixed
one-hot tables of repeat-all-over and sequential are not parameters.
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

import masa
from masa.torch import MasaAttention, SharedAtoms

VARIANTS = ("dense", "masa-qkvo", "masa-qkv", "low-rank", "repeat-all-over", "sequential", "gqa")


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 12
    d_model: int = 128
    n_heads: int = 4
    context: int = 128
    mlp_ratio: int = 4
    n_atoms: int = 4           # S = L/3
    gqa_kv_heads: int = 1      # key/value heads of the gqa variant
    vocab: int = 256
    coefficient_noise: float = 0.05

    def dict(self):
        return asdict(self)


def low_rank_rank(cfg):
    """The rank r whose factors (2 d r parameters per layer and projection,
    every projection being d x d) come closest to masa-qkvo's attention
    parameter count 4 (S d^2 + L S)."""
    target = 4 * (cfg.n_atoms * cfg.d_model ** 2 + cfg.n_layers * cfg.n_atoms)
    per_rank = 4 * cfg.n_layers * 2 * cfg.d_model
    return max(1, round(target / per_rank))


class LowRankProjections(nn.Module):
    """W_p = A_p B_p for each projection p of one layer, A_p: d_in x r,
    B_p: r x d_out. At initialisation W has the variance of a dense weight
    uniform in +-1/sqrt(d_in)."""

    def __init__(self, shapes, rank):
        super().__init__()
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for p, (d_in, d_out) in shapes.items():
            bound = 1.0 / math.sqrt(d_in)
            self.a[p] = nn.Parameter(torch.empty(d_in, rank).uniform_(-bound, bound))
            self.b[p] = nn.Parameter(torch.empty(rank, d_out).uniform_(-math.sqrt(3.0 / rank),
                                                                       math.sqrt(3.0 / rank)))

    def forward(self):
        return {p: self.a[p] @ self.b[p] for p in self.a}


class Block(nn.Module):
    def __init__(self, cfg, layer_index, shared, kv_heads, low_rank, context):
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d)
        self.attn = MasaAttention(d, cfg.n_heads, n_kv_heads=kv_heads, causal=True, rope=True,
                                  layer_index=layer_index, shared=shared,
                                  external="qkvo" if low_rank else "", context=context)
        self.low_rank = (LowRankProjections(self.attn.shapes, low_rank_rank(cfg))
                         if low_rank else None)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, h):
        a = self.norm1(h)
        if self.low_rank is not None:
            h = h + self.attn(a, weights=self.low_rank())
        else:
            h = h + self.attn(a)
        return h + self.mlp(self.norm2(h))


class ByteLM(nn.Module):
    """A decoder-only byte-level LM whose attention is the given variant."""

    def __init__(self, variant, cfg, context=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
        self.variant, self.cfg = variant, cfg
        context = context or masa.default_context()
        d, L, S = cfg.d_model, cfg.n_layers, cfg.n_atoms
        kv_heads = cfg.gqa_kv_heads if variant == "gqa" else cfg.n_heads
        self.embed = nn.Embedding(cfg.vocab, d)
        self.shared = None
        if variant in ("masa-qkvo", "masa-qkv", "repeat-all-over", "sequential"):
            fixed = variant in ("repeat-all-over", "sequential")
            self.shared = SharedAtoms(
                d, cfg.n_heads, L, S, projections="qkv" if variant == "masa-qkv" else "qkvo",
                init="blocks" if variant == "sequential" else "cyclic",
                coefficient_noise=0.0 if fixed else cfg.coefficient_noise, context=context)
            if fixed:
                for table in self.shared.coefficients.values():
                    table.requires_grad_(False)
        self.blocks = nn.ModuleList(
            Block(cfg, i, self.shared, kv_heads, variant == "low-rank", context)
            for i in range(L))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def attention_parameters(self):
        """Trainable parameters of the attention projections."""
        return sum(p.numel() for n, p in self.named_parameters()
                   if p.requires_grad and (n.startswith("shared.") or ".attn." in n
                                           or ".low_rank." in n))

    def total_parameters(self):
        """Trainable parameters (shared tensors counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def dense_attention_parameters(cfg):
    """Attention parameters of the dense variant: 4 L d^2."""
    return 4 * cfg.n_layers * cfg.d_model ** 2


def optimizer(model, lr, weight_decay):
    """AdamW; weight decay on matrices (not on coefficient tables, norms,
    biases)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "coefficients" not in n else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def learning_rate(step, total, peak, warmup, final_fraction=0.1):
    """Linear warmup to peak over `warmup` steps, then cosine decay to
    final_fraction * peak at step `total` (steps count from 1)."""
    if step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
