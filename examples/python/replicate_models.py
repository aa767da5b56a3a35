"""The byte-level language models of replicate.py, one per attention variant.

Every variant is the same pre-norm decoder (byte embedding, L blocks of
causal RoPE attention + GELU MLP, final LayerNorm, output layer); only the
attention projections differ. Attention always runs in libmasa
(masa.torch.MasaAttention):

| variant         | Q, K, V, O projections                                              |
|-----------------|---------------------------------------------------------------------|
| dense           | per-layer dense weights                                             |
| masa-qkvo       | one dictionary of S atoms per projection type, learned L x S tables |
| masa-mlp        | as masa-qkvo, but during training each table row is predicted from  |
|                 | a learned per-layer embedding by a small MLP (one per projection    |
|                 | type; the paper's parameterisation); collapsed to a table after     |
| masa-qkv        | Q, K, V as masa-qkvo, O per-layer dense                             |
| low-rank        | W = A B per layer and projection (torch factors; libmasa gets A B   |
|                 | as an external dense weight), rank matching masa-qkvo's count       |
| repeat-all-over | S weight sets, layer l uses set l mod S (one-hot table, not trained)|
| sequential      | S weight sets, layers [l*L/S, (l+1)*L/S) share set l (fixed table)  |
| gqa             | per-layer dense, fewer key/value heads                              |

Attention parameters are the trainable tensors of the attention projections
(atoms, coefficient tables, dense weights, low-rank factors); the fixed
one-hot tables of repeat-all-over and sequential are not parameters.
masa-mlp is counted at its inference size (atoms and the collapsed table, as
masa-qkvo) by attention_parameters(); training_attention_parameters() adds
the embeddings and MLPs it trains with.
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

import masa
from masa.torch import MasaAttention, SharedAtoms

VARIANTS = ("dense", "masa-qkvo", "masa-qkv", "low-rank", "repeat-all-over", "sequential", "gqa",
            "masa-mlp")


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
    coefficient_embed: int = 16    # masa-mlp: per-layer embedding size
    coefficient_hidden: int = 32   # masa-mlp: hidden units of the coefficient MLP

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


class CoefficientMLP(nn.Module):
    """One projection type's L x S coefficient table predicted as
    c_l = W2 tanh(W1 e_l + b1) + b2 from learned per-layer embeddings e_l.

    At initialisation the prediction equals `table` (W2, b2 are the
    minimum-norm least-squares fit in float64 of the L rows, exact when
    hidden + 1 >= L), so masa-mlp starts from masa-qkvo's table and only
    the parameterisation of its training differs."""

    def __init__(self, table, embed_dim, hidden):
        super().__init__()
        n_layers, n_atoms = table.shape
        self.embeddings = nn.Parameter(torch.randn(n_layers, embed_dim))
        self.hidden = nn.Linear(embed_dim, hidden)
        self.out = nn.Linear(hidden, n_atoms)
        with torch.no_grad():
            h = torch.tanh(self.hidden(self.embeddings)).double()
            h1 = torch.cat([h, torch.ones(n_layers, 1, dtype=torch.float64)], dim=1)
            fit = torch.linalg.pinv(h1) @ table.double()
            self.out.weight.copy_(fit[:-1].t())
            self.out.bias.copy_(fit[-1])

    def forward(self):
        return self.out(torch.tanh(self.hidden(self.embeddings))).contiguous()


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
        if variant in ("masa-qkvo", "masa-mlp", "masa-qkv", "repeat-all-over", "sequential"):
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
        self.coefficients_mlp = None
        if variant == "masa-mlp":
            # made last, so every other tensor starts as masa-qkvo's with the same seed
            tables = self.shared.coefficients
            self.coefficients_mlp = nn.ModuleDict({
                p: CoefficientMLP(tables[p].detach(), cfg.coefficient_embed, cfg.coefficient_hidden)
                for p in self.shared.projections})
            # the tables become the MLPs' outputs, recomputed every forward
            del self.shared.coefficients
            with torch.no_grad():
                self._predict_coefficients()

    def _predict_coefficients(self):
        """Points the shared tables at the MLPs' predictions: libmasa reads
        them zero-copy and its dL/dc flows back through them into the MLPs."""
        self.shared.coefficients = {p: mlp() for p, mlp in self.coefficients_mlp.items()}

    def _keep_coefficients_detached(self):
        """After a forward the module keeps the tables as plain tensors
        (the graph holds what backward needs): copyable and picklable."""
        self.shared.coefficients = {p: t.detach() for p, t in self.shared.coefficients.items()}

    @torch.no_grad()
    def collapse(self):
        """masa-mlp after training: replaces the embeddings and MLPs by the
        plain table they predict (what inference keeps). Outputs are
        unchanged: libmasa reads the same table values."""
        if self.coefficients_mlp is None:
            raise ValueError(f"only masa-mlp collapses (this model is {self.variant})")
        tables = {p: mlp().detach().clone() for p, mlp in self.coefficients_mlp.items()}
        del self.shared.coefficients
        self.shared.coefficients = nn.ParameterDict({p: nn.Parameter(t) for p, t in tables.items()})
        self.coefficients_mlp = None

    def forward(self, tokens):
        if self.coefficients_mlp is not None:
            self._predict_coefficients()
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        if self.coefficients_mlp is not None:
            self._keep_coefficients_detached()
        return self.head(self.norm(h))

    def training_attention_parameters(self):
        """Trainable parameters of the attention projections as trained
        (masa-mlp: with its embeddings and coefficient MLPs)."""
        return sum(p.numel() for n, p in self.named_parameters()
                   if p.requires_grad and (n.startswith(("shared.", "coefficients_mlp."))
                                           or ".attn." in n or ".low_rank." in n))

    def attention_parameters(self):
        """Attention parameters at inference: as trained, except masa-mlp's
        embeddings and MLPs count as the L x S tables they collapse to."""
        if self.coefficients_mlp is None:
            return self.training_attention_parameters()
        return (self.training_attention_parameters()
                - sum(p.numel() for p in self.coefficients_mlp.parameters())
                + sum(t.numel() for t in self.shared.coefficients.values()))

    def total_parameters(self):
        """Trainable parameters at inference (shared tensors counted once;
        masa-mlp's MLPs as their tables)."""
        return (sum(p.numel() for p in self.parameters() if p.requires_grad)
                - self.training_attention_parameters() + self.attention_parameters())


def dense_attention_parameters(cfg):
    """Attention parameters of the dense variant: 4 L d^2."""
    return 4 * cfg.n_layers * cfg.d_model ** 2


def optimizer(model, lr, weight_decay, fused=False):
    """AdamW; weight decay on matrices (not on coefficient tables, masa-mlp's
    coefficient MLPs, norms, biases). fused: torch's single-kernel AdamW (same
    update, less per-tensor overhead; torch >= 2.4 on CPU, else ignored)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "coefficients" not in n else no_decay).append(p)
    extra = {"fused": True} if fused and fused_adamw_available() else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), **extra)


def fused_adamw_available():
    """torch's fused AdamW runs on CPU from torch 2.4."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


def learning_rate(step, total, peak, warmup, final_fraction=0.1):
    """Linear warmup to peak over `warmup` steps, then cosine decay to
    final_fraction * peak at step `total` (steps count from 1)."""
    if step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
