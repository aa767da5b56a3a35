"""Compressed attention blocks as masa.torch modules: per projection and
layer group a SharedAtoms (atoms + coefficient table as nn.Parameters), per
layer the low-rank factors A, B (nn.Parameters held by the MasaAttention),
biases from the source model. A projection with no group is A B alone."""

from __future__ import annotations

import numpy as np
import torch

from ..hf import PROJ, attention_geometry, attention_modules
from ..torch import MasaAttention, SharedAtoms


def shared_atoms(results, geometry, context=None):
    """{(p, g): SharedAtoms} with the compressed atoms and tables."""
    out = {}
    for p, r in results.items():
        for g, grp in enumerate(r["groups"]):
            s = int(grp["atoms"].shape[0])
            m = SharedAtoms(geometry["d_model"], geometry["n_heads"], grp["count"], s,
                            n_kv_heads=geometry["n_kv_heads"], head_dim=geometry["head_dim"],
                            projections=p, init="zeros", seed=0, context=context)
            with torch.no_grad():
                m.atoms[p].copy_(torch.from_numpy(np.asarray(grp["atoms"], dtype=np.float32)))
                m.coefficients[p].copy_(torch.from_numpy(np.asarray(grp["coefs"], dtype=np.float32)))
            out[(p, g)] = m
    return out


def compressed_cores(model, results, context=None):
    """{layer: MasaAttention} running the compressed attention on libmasa."""
    g = attention_geometry(model)
    atoms = shared_atoms(results, g, context)
    cores = {}
    for l, attn in attention_modules(model):
        source = {}
        for p, r in results.items():
            for gi, grp in enumerate(r["groups"]):
                if grp["start"] <= l < grp["start"] + grp["count"]:
                    source[p] = (atoms[(p, gi)], l - grp["start"])
        biases = "".join(p for p in "qkvo" if getattr(attn, PROJ[p]).bias is not None)
        lowrank = {p: results[p]["lowrank"][l] for p in results if l in results[p]["lowrank"]}
        core = MasaAttention(
            g["d_model"], g["n_heads"], n_kv_heads=g["n_kv_heads"], head_dim=g["head_dim"],
            causal=True, rope=True, rope_theta=g["rope_theta"], softmax_scale=g["head_dim"] ** -0.5,
            bias=biases, layer_index=0, shared=source or None,
            lowrank={p: int(a.shape[1]) for p, (a, _) in lowrank.items()} or None,
            lowrank_only="".join(p for p in lowrank if p not in source), context=context)
        with torch.no_grad():
            for p in biases:
                core.biases[p].copy_(getattr(attn, PROJ[p]).bias.detach().float())
            for p, (a, b) in lowrank.items():
                core.lowrank_a[p].copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))
                core.lowrank_b[p].copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))
            for p in core.weights:  # projections neither shared nor low-rank stay dense
                core.weights[p].copy_(getattr(attn, PROJ[p]).weight.detach().float().t())
        cores[l] = core
    return cores


def results_from_cores(cores, results):
    """The results with atoms, tables and factors read back from the
    modules (after healing)."""
    out = {}
    for p, r in results.items():
        groups = []
        for gi, grp in enumerate(r["groups"]):
            core = cores[grp["start"]]
            module, _ = core._masa_source[p]
            groups.append(dict(grp, atoms=module.atoms[p].detach().numpy().copy(),
                               coefs=module.coefficients[p].detach().numpy().copy()))
        lowrank = {l: (cores[l].lowrank_a[p].detach().numpy().copy(),
                       cores[l].lowrank_b[p].detach().numpy().copy()) for l in r["lowrank"]}
        out[p] = dict(r, groups=groups, lowrank=lowrank)
    return out
