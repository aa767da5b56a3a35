"""Calibration from the model itself, through forward hooks.

- Input statistics per layer and projection: C = X^T X (float64) of the rows
  entering the projection. Q, K and V read the same rows (the attention
  block's input, after the layer norm), so they share one matrix ("qkv");
  O reads the attention output (the heads concatenated), matrix "o".
  Accumulated by libmasa's calibration handles (masa_calib: BLIS dsyrk in
  double) when the library has them, else by torch in float64.
- Logit-lens drift: for the output h_l of every decoder layer, the
  distribution softmax(lm_head(final_norm(h_l))); the drift between layers l
  and l+1 is KL(P_l || P_(l+1)) averaged over calibration tokens. The paper
  cuts layer groups where the drift is largest.

Calibration text comes from masa.evaluate.Corpus.calibration(): the gaps
between the evaluation windows, never overlapping them.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..hf import PROJ, attention_modules, decoder_layers

STAT_OF = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o"}


def _calib_backend():
    """libmasa's calibration handles (masa.compression.Calibration), or None
    when the library is not loadable."""
    try:
        from .c_core import calibration
        from .. import compression

        compression._c()
        return calibration
    except (ImportError, AttributeError, OSError):
        return None


class _TorchGram:
    """C = X^T X in float64 (used when the C core is not available)."""

    def __init__(self, dim):
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64)
        self.rows = 0

    def accumulate(self, x):
        x = torch.as_tensor(x).to(torch.float64)
        self.matrix += x.t() @ x
        self.rows += x.shape[0]

    def array(self):
        return self.matrix.numpy()


class _CGram:
    def __init__(self, make, dim, context):
        self.handle = make(context, dim)

    def accumulate(self, x):
        self.handle.accumulate(np.ascontiguousarray(x, dtype=np.float32))

    @property
    def rows(self):
        return self.handle.n_rows

    def array(self):
        return self.handle.matrix


class InputStatistics:
    """Forward pre-hooks on q_proj and o_proj of every layer that add each
    call's input rows to that layer's C matrices. Use as a context manager
    around forward passes; then ``matrix(layer, "qkv" | "o")``."""

    def __init__(self, model, context=None, prefer_c=True):
        self.model = model
        backend = _calib_backend() if prefer_c else None
        self.backend = "libmasa C (masa_calib)" if backend else "torch float64"
        self.stats = {}
        self._hooks = []
        for i, attn in attention_modules(model):
            for p, key in (("q", "qkv"), ("o", "o")):
                lin = getattr(attn, PROJ[p], None)
                if lin is None:
                    raise ValueError(f"layer {i}: no {PROJ[p]} to hook (swap_attention replaces it; calibrate first)")
                dim = lin.in_features
                self.stats[(i, key)] = _CGram(backend, dim, context) if backend else _TorchGram(dim)
                self._hooks.append(lin.register_forward_pre_hook(self._hook(i, key)))

    def _hook(self, layer, key):
        def hook(module, args):
            x = args[0].detach()
            self.stats[(layer, key)].accumulate(x.reshape(-1, x.shape[-1]).to(torch.float32).numpy())
        return hook

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def matrix(self, layer, key):
        return self.stats[(layer, key)].array()

    def rows(self, layer, key):
        return self.stats[(layer, key)].rows


class LogitLens:
    """Forward hooks on every decoder layer keeping the output hidden states
    of the first ``max_tokens`` tokens of each call, then the KL drift
    between consecutive layers' logit-lens distributions."""

    def __init__(self, model, max_tokens=64):
        self.model = model
        self.max_tokens = int(max_tokens)
        self.hidden = {}
        self._hooks = [layer.register_forward_hook(self._hook(i))
                       for i, layer in enumerate(decoder_layers(model))]

    def _hook(self, i):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.detach()[:, : self.max_tokens].reshape(-1, h.shape[-1])
            self.hidden.setdefault(i, []).append(h.clone())
        return hook

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    @torch.no_grad()
    def drift(self):
        """[L - 1] mean KL(P_l || P_(l+1)) in nats, l = 0..L-2."""
        base = getattr(self.model, "model", self.model)
        norm, head = base.norm, self.model.lm_head
        logp_prev, out = None, []
        for i in sorted(self.hidden):
            h = torch.cat(self.hidden[i])
            logp = torch.log_softmax(head(norm(h)).double(), dim=-1)
            if logp_prev is not None:
                kl = (logp_prev.exp() * (logp_prev - logp)).sum(-1).mean().item()
                out.append(kl)
            logp_prev = logp
        return np.array(out)


@torch.no_grad()
def calibrate(model, sequences, context=None, lens_tokens=32, progress=None):
    """Runs the calibration sequences ([n, T] token ids) through the model
    with both hooks. Returns (InputStatistics, KL drift array, seconds)."""
    t0 = time.perf_counter()
    stats = InputStatistics(model, context)
    lens = LogitLens(model, lens_tokens)
    try:
        for k, ids in enumerate(sequences):
            model(input_ids=torch.as_tensor(ids).unsqueeze(0), use_cache=False)
            if progress:
                progress(f"calibration sequence {k + 1}/{len(sequences)}")
    finally:
        stats.remove()
        lens.remove()
    drift = lens.drift()
    return stats, drift, time.perf_counter() - t0
