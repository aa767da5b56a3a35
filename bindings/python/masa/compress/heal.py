"""Healing: a short fine-tune of the compressed attention parameters only
(atoms, coefficient tables, low-rank factors) through libmasa's backward,
everything else frozen, on calibration text (the gaps between evaluation
windows; never evaluation text). Next-token cross-entropy, AdamW. A
held-out slice of the calibration sequences (not trained on) picks the step
count: the parameters kept are those of the evaluated step (every
eval_every steps, and step 0 = no healing) with the lowest held-out loss."""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import hf
from .modules import compressed_cores, results_from_cores


def heal(model, tokenizer, results, steps=100, lr=1e-5, seq_len=256, batch=1, context=None,
         progress=None, seed=0, heldout=8, eval_every=10):
    """Returns (healed results, report). ``heldout`` calibration sequences
    are kept out of training; their mean next-token loss is measured before
    training and every ``eval_every`` steps, and the parameters with the
    lowest held-out loss are returned (possibly the unhealed ones: step 0).
    The model is left unswapped with its original attention (the healed
    weights are in the results)."""
    from ..evaluate import Corpus

    corpus = Corpus(tokenizer)
    n_train = steps * batch
    # Calibration sequences of seq_len from the gaps (cycled if steps exceed them).
    n_train = max(1, min(n_train, 39 * ((18000 // seq_len) - 1) - heldout))
    data = corpus.calibration(n_train + heldout, seq_len)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    held = torch.as_tensor(data[order[:heldout]]) if heldout else None
    order = order[heldout:]
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

    def loss_of(x):
        logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))

    def heldout_loss():
        with torch.no_grad():
            return float(np.mean([loss_of(held[i:i + 1]).item() for i in range(len(held))]))

    t0, losses, tokens, curve = time.perf_counter(), [], 0, []
    best = None
    if held is not None:
        curve.append((0, heldout_loss()))
        best = (curve[-1][1], 0, [p.detach().clone() for p in params])
        if progress:
            progress(f"heal: held-out loss before {curve[-1][1]:.4f}")
    try:
        for step in range(steps):
            idx = [order[(step * batch + j) % len(order)] for j in range(batch)]
            x = torch.as_tensor(np.stack([data[i] for i in idx]))
            loss = loss_of(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += x.numel()
            if held is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                curve.append((step + 1, heldout_loss()))
                if curve[-1][1] < best[0]:
                    best = (curve[-1][1], step + 1, [p.detach().clone() for p in params])
                if progress:
                    progress(f"heal step {step + 1}/{steps}: train loss {np.mean(losses[-eval_every:]):.4f}, "
                             f"held-out {curve[-1][1]:.4f}")
        if best is not None:
            with torch.no_grad():
                for p, v in zip(params, best[2]):
                    p.copy_(v)
    finally:
        for prm in params:
            prm.requires_grad_(False)
        for prm in frozen:
            prm.requires_grad_(True)
        healed = results_from_cores(cores, results)
        hf.unswap_attention(model)
    report = {"steps": steps, "batch": batch, "seq_len": seq_len, "tokens": tokens, "lr": lr,
              "seconds": time.perf_counter() - t0, "parameters_trained": int(sum(p.numel() for p in params)),
              "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
              "heldout_sequences": int(heldout), "heldout_curve": curve,
              "best_step": None if best is None else best[1]}
    return healed, report
