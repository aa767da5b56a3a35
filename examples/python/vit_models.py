"""The vision transformers of vit.py: dense attention against MASA-QKVO.

Both variants are the same pre-norm ViT: an image is cut into p x p patches,
each patch is a token (a linear patch embedding plus a learned position
embedding), a learned class token is prepended, L blocks of non-causal
attention (no RoPE: positions come from the embedding) + GELU MLP follow,
and a linear head reads the final LayerNorm of the class token. Attention
runs in libmasa (masa.torch.MasaAttention, causal=False); the patch
embedding, MLPs, norms and head are torch. Only the attention projections
differ:

| variant   | Q, K, V, O projections                                              |
|-----------|---------------------------------------------------------------------|
| dense     | per-layer dense weights (4 L d^2 parameters)                        |
| masa-qkvo | one dictionary of S = L/3 atoms per projection type and a learned   |
|           | L x S coefficient table (4 (S d^2 + L S) parameters)                |
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

import masa
from masa.torch import MasaAttention, SharedAtoms

import replicate_models

VARIANTS = ("dense", "masa-qkvo")


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28
    patch: int = 7
    n_layers: int = 6
    d_model: int = 64
    n_heads: int = 4
    mlp_ratio: int = 2
    n_atoms: int = 2            # S = L/3
    n_classes: int = 10
    coefficient_noise: float = 0.05

    def __post_init__(self):
        if self.image_size % self.patch:
            raise ValueError(f"patch {self.patch} does not divide image size {self.image_size}")

    @property
    def n_patches(self):
        return (self.image_size // self.patch) ** 2

    def dict(self):
        return asdict(self)


def patchify(images, patch):
    """[B, H, W] images -> [B, (H/p)(W/p), p*p] patches, row-major over the
    patch grid, each patch's pixels row-major."""
    b, h, w = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 2, 4).reshape(b, (h // patch) * (w // patch), patch * patch)


class Block(nn.Module):
    def __init__(self, cfg, layer_index, shared, context):
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d)
        self.attn = MasaAttention(d, cfg.n_heads, causal=False, rope=False,
                                  layer_index=layer_index, shared=shared, context=context)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class ViT(nn.Module):
    """A small ViT classifier whose attention is the given variant."""

    def __init__(self, variant, cfg, context=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
        self.variant, self.cfg = variant, cfg
        context = context or masa.default_context()
        d = cfg.d_model
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, cfg.n_patches + 1, d) * 0.02)
        self.shared = None
        if variant == "masa-qkvo":
            self.shared = SharedAtoms(d, cfg.n_heads, cfg.n_layers, cfg.n_atoms,
                                      projections="qkvo", init="cyclic",
                                      coefficient_noise=cfg.coefficient_noise, context=context)
        self.blocks = nn.ModuleList(Block(cfg, i, self.shared, context)
                                    for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.n_classes)

    def forward(self, images):
        """[B, H, W] float32 images -> [B, n_classes] logits."""
        x = self.patch_embed(patchify(images, self.cfg.patch))
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))

    def attention_parameters(self):
        """Trainable parameters of the Q, K, V, O projections (atoms and
        tables counted once)."""
        return sum(p.numel() for n, p in self.named_parameters()
                   if n.startswith("shared.") or ".attn." in n)

    def total_parameters(self):
        return sum(p.numel() for p in self.parameters())


def dense_attention_parameters(cfg):
    """4 L d^2: the dense variant's attention parameters."""
    return 4 * cfg.n_layers * cfg.d_model ** 2


def optimizer(model, lr, weight_decay):
    """AdamW; weight decay on matrices only (not on coefficient tables,
    norms, biases, class token or position embedding)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        matrix = p.dim() >= 2 and "coefficients" not in n and n not in ("cls", "pos")
        (decay if matrix else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def learning_rate(step, total, peak, warmup):
    """Linear warmup over `warmup` steps, then cosine decay to 1% of the peak
    at step `total` (the replication's schedule with a lower floor)."""
    return replicate_models.learning_rate(step, total, peak, warmup, final_fraction=0.01)
