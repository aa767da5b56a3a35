"""Training smoke tests: the loss of tiny MASA models falls under AdamW."""

import os
import subprocess
import sys

import pytest

try:
    import torch
except ImportError:  # fallback only: torch is installed where these tests run
    torch = pytest.importorskip("torch")

from masa.torch import MasaAttention, SharedAtoms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EXAMPLE = os.path.join(REPO, "examples", "python", "train_small.py")


class TinyModel(torch.nn.Module):
    def __init__(self, d_model=16, n_heads=2, n_layers=3, n_atoms=2):
        super().__init__()
        self.shared = SharedAtoms(d_model, n_heads, n_layers, n_atoms, n_kv_heads=1,
                                  projections="qkv", coefficient_noise=0.05)
        self.layers = torch.nn.ModuleList(
            MasaAttention(d_model, n_heads, n_kv_heads=1, causal=True, rope=True, bias="qkvo",
                          layer_index=i, shared=self.shared)
            for i in range(n_layers))
        self.out = torch.nn.Linear(d_model, 1)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.out(x).squeeze(-1)


def test_loss_falls_under_adamw():
    """Regression: y[t] = mean of x[0..t, 0] (needs causal attention)."""
    torch.manual_seed(0)
    model = TinyModel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        x = torch.randn(16, 8, 16)
        target = x[:, :, 0].cumsum(1) / torch.arange(1, 9)
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    # The optimizer trained the shared atoms and coefficient tables.
    for p in "qkv":
        assert not torch.equal(before[f"shared.atoms.{p}"], model.shared.atoms[p])
        assert not torch.equal(before[f"shared.coefficients.{p}"], model.shared.coefficients[p])


def test_example_script_runs():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(REPO, "bindings", "python")
    r = subprocess.run([sys.executable, EXAMPLE, "--steps", "60"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loss" in r.stdout and "->" in r.stdout
