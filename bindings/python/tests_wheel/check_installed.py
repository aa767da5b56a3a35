"""Run by test_wheel.py with the venv's interpreter, from a directory outside
the checkout and without MASA_LIBRARY: the installed package must load the
library it bundles and train a small MASA stack through masa.torch.

Prints one JSON object: which library file ctypes loaded, every libmasa and
BLIS file mapped into the process, and the largest error of each quantity
against a float64 reference written in plain torch ops.
"""

import importlib.metadata
import json
import os

import torch

import masa
from masa.torch import MasaAttention, SharedAtoms

D_MODEL, N_HEADS, N_KV_HEADS, N_LAYERS, N_ATOMS = 16, 4, 2, 3, 2


def reference_layer(x, W, b, causal_mask, head_dim):
    """Causal GQA attention with biases on q, v and o, float64."""
    B, T, _ = x.shape
    q = (x @ W["q"] + b["q"]).view(B, T, N_HEADS, head_dim).transpose(1, 2)
    k = (x @ W["k"]).view(B, T, N_KV_HEADS, head_dim).transpose(1, 2)
    v = (x @ W["v"] + b["v"]).view(B, T, N_KV_HEADS, head_dim).transpose(1, 2)
    group = N_HEADS // N_KV_HEADS
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) / head_dim ** 0.5
    a = torch.softmax(s.masked_fill(causal_mask, float("-inf")), dim=-1) @ v
    return a.transpose(1, 2).reshape(B, T, N_HEADS * head_dim) @ W["o"] + b["o"]


def relative_error(got, want):
    """Largest absolute error relative to the quantity's own largest entry."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def mapped_files(*needles):
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return sorted(p for p in paths if any(n in os.path.basename(p) for n in needles))


def main():
    torch.manual_seed(0)
    shared = SharedAtoms(D_MODEL, N_HEADS, N_LAYERS, N_ATOMS, n_kv_heads=N_KV_HEADS,
                         coefficient_noise=0.3)
    # No key bias: its gradient is exactly zero (softmax ignores a shift
    # shared by all keys), so it has no magnitude to compare an error with.
    layers = [MasaAttention(D_MODEL, N_HEADS, n_kv_heads=N_KV_HEADS, causal=True, bias="qvo",
                            layer_index=i, shared=shared) for i in range(N_LAYERS)]
    with torch.no_grad():
        for layer in layers:
            for b in layer.biases.values():
                b.uniform_(-0.5, 0.5)
    x = torch.randn(2, 7, D_MODEL, requires_grad=True)
    target = torch.randn(2, 7, D_MODEL)
    h = x
    for layer in layers:
        h = h + layer(h)
    loss = ((h - target) ** 2).mean()
    loss.backward()

    # The same stack in float64 from copies of the parameters.
    atoms = {p: shared.atoms[p].detach().double().requires_grad_() for p in "qkvo"}
    coef = {p: shared.coefficients[p].detach().double().requires_grad_() for p in "qkvo"}
    biases = [{p: t.detach().double().requires_grad_() for p, t in layer.biases.items()}
              for layer in layers]
    x64 = x.detach().double().requires_grad_()
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    h64 = x64
    for i, layer in enumerate(layers):
        W = {p: torch.einsum("s,sij->ij", coef[p][i], atoms[p]) for p in "qkvo"}
        h64 = h64 + reference_layer(h64, W, biases[i], mask, layer.head_dim)
    loss64 = ((h64 - target.double()) ** 2).mean()
    loss64.backward()

    errors = {"loss": abs(loss.item() - loss64.item()) / abs(loss64.item()),
              "dx": relative_error(x.grad, x64.grad)}
    for p in "qkvo":
        errors[f"atoms[{p}]"] = relative_error(shared.atoms[p].grad, atoms[p].grad)
        errors[f"coefficients[{p}]"] = relative_error(shared.coefficients[p].grad, coef[p].grad)
    for i, layer in enumerate(layers):
        for p, b in layer.biases.items():
            errors[f"layer{i}.bias[{p}]"] = relative_error(b.grad, biases[i][p].grad)

    print(json.dumps({
        "library_path": masa.library_path(),
        "library_version": masa.version(),
        "package_version": importlib.metadata.version("masa"),
        "package_file": masa.__file__,
        "mapped_libmasa": mapped_files("libmasa"),
        "mapped_blis": mapped_files("libblis"),
        "blis_arch": masa.blis_arch(),
        "torch": torch.__version__,
        "errors": errors,
    }))


if __name__ == "__main__":
    main()
