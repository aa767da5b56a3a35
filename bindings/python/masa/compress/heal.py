"""Healing: a short fine-tune of the compressed attention parameters only
(atoms, coefficient tables, low-rank factors) through libmasa's backward,
everything else frozen, on calibration text (the gaps between evaluation
windows; never evaluation text). Next-token cross-entropy, AdamW."""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import hf
from .modules import compressed_cores, results_from_cores


def heal(model, tokenizer, results, steps=100, lr=1e-4, seq_len=256, batch=1, context=None,
         progress=None, seed=0):
    """Returns (healed results, report). The model is left unswapped with
    its original attention (the healed weights are in the results)."""
    from ..evaluate import Corpus

    corpus = Corpus(tokenizer)
    n_seq = steps * batch
    # Calibration sequences of seq_len from the gaps (cycled if steps exceed them).
    per_gap = max(1, min(n_seq, 39 * ((18000 // seq_len) - 1)))
    data = corpus.calibration(per_gap, seq_len)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    cores = compressed_cores(model, results, context)
    hf.swap_attention(model, cores=cores, context=context, keep_original=True)
    frozen = []
    for name, prm in model.named_parameters():
        if prm.requires_grad:
            frozen.append(prm)
            prm.requires_grad_(False)
    params = []
    seen = set()
    for core in cores.values():
        for name, prm in core.named_parameters():
            if id(prm) in seen or name.startswith("biases"):
                continue
            seen.add(id(prm))
            prm.requires_grad_(True)
            params.append(prm)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train(False)  # no dropout; gradients still flow
    t0, losses, tokens = time.perf_counter(), [], 0
    try:
        for step in range(steps):
            idx = [order[(step * batch + j) % len(order)] for j in range(batch)]
            x = torch.as_tensor(np.stack([data[i] for i in idx]))
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += x.numel()
            if progress and (step + 1) % 10 == 0:
                progress(f"heal step {step + 1}/{steps}: loss {np.mean(losses[-10:]):.4f}")
    finally:
        for prm in params:
            prm.requires_grad_(False)
        for prm in frozen:
            prm.requires_grad_(True)
        healed = results_from_cores(cores, results)
        hf.unswap_attention(model)
    report = {"steps": steps, "batch": batch, "seq_len": seq_len, "tokens": tokens, "lr": lr,
              "seconds": time.perf_counter() - t0, "parameters_trained": int(sum(p.numel() for p in params)),
              "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:]))}
    return healed, report
