"""python -m masa.compress.throughput: prefill and decode speed of the
compressed model through libmasa beside transformers' dense model, in one
process on the same machine, written to a JSON file (medians).

  PY -m masa.compress.throughput --out results/pretrained/throughput.json

measures (2 threads by default) the dense model in transformers, the dense
model with its attention on libmasa, and the full method at 20% on libmasa
(the table's compressed directory, made here first when missing): prefill
tokens/s of one 512-token forward (median of --repeats) and decode ms/token
with the KV cache (median over --new-tokens greedy steps after a 128-token
prompt). Run it on a quiet machine: the load averages before and after are
recorded next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m masa.compress.throughput",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--compressed", default=os.path.expanduser("~/.cache/libmasa/pretrained-runs/full-20"),
                    help="a directory written by python -m masa.compress (made with --method full "
                         "--removed 0.2 when missing)")
    ap.add_argument("--out", default="results/pretrained/throughput.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="prefills per model (median)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps per model (median)")
    args = ap.parse_args(argv)

    import torch

    from .. import hf
    from ..core import Context
    from ..evaluate import Corpus, decode_ms_per_token, prefill_throughput, write_atomic
    from . import compress_model, load_compressed, save

    torch.set_num_threads(args.threads)
    context = Context(n_threads=args.threads)
    model, tok = hf.load_model(args.model)
    corpus = Corpus(tok)
    if not os.path.exists(os.path.join(args.compressed, "config.json")):
        log(f"compressing (full, 20%) into {args.compressed}")
        results, config, report = compress_model(model, tok, "full", 0.2, source=args.model,
                                                 context=context, progress=log)
        save(args.compressed, results, config, report, context=context)
    ids = corpus.evaluation()[0][1]
    out = {"cpu": _cpu(), "blis_arch_type": os.environ.get("BLIS_ARCH_TYPE"),
           "threads": args.threads, "prefill_tokens": len(ids), "decode_prompt_tokens": 128,
           "prefill_repeats": args.repeats, "decode_steps": args.new_tokens,
           "torch": torch.__version__, "compressed": os.path.abspath(args.compressed),
           "load_before": _load(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def measure(name, libmasa):
        r = {"prefill_tokens_per_s": prefill_throughput(model, ids, args.repeats),
             "decode_ms_per_token": decode_ms_per_token(model, ids[:128], args.new_tokens, libmasa)}
        log(f"{name}: prefill {r['prefill_tokens_per_s']:.0f} tokens/s, "
            f"decode {r['decode_ms_per_token']:.1f} ms/token")
        out[name] = r

    measure("dense_transformers", libmasa=False)
    hf.swap_attention(model, context=context, keep_original=True)
    measure("dense_libmasa", libmasa=True)
    hf.unswap_attention(model)
    _, _, info = load_compressed(args.compressed, path="libmasa", model=model, tokenizer=tok,
                                 context=context, keep_original=True)
    if info["path"] != "libmasa":
        raise SystemExit(f"the compressed model did not run on libmasa: {info}")
    measure("full20_libmasa", libmasa=True)
    out["method"] = info["config"]["method"]
    out["removed_target"] = info["config"]["removed_target"]
    out["load_after"] = _load()
    write_atomic(args.out, json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
