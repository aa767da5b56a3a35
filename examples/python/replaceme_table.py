"""The ReplaceMe table of results/replaceme/: SmolLM2-135M-Instruct with n of
its 30 blocks removed (n = 2, 4, 6, 8), the same span (chosen by angular
distance) for every method: plain removal, ReplaceMe least squares, ReplaceMe
cosine (the reference's settings: 10 epochs, lr 1e-4, 1024 rows per batch,
from T = I) and cosine with more steps (lr 1e-3, 30 epochs). Perplexity by the
recipe of DESIGN.md section 6 (40 windows of 512 fortunes tokens); the
calibration sequences lie between those windows.

    PYTHONPATH=bindings/python ~/.cache/libmasa/venv/bin/python \\
        examples/python/replaceme_table.py [--calib-seqs 32] [--threads 2]

Resumable: every finished row is results/replaceme/runs/<name>.json and is
kept when the command runs again (--fresh recomputes); activations are cached
in ~/.cache/libmasa/replaceme/ (not in the repository). Writes table.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bindings" / "python"))

from masa import replaceme as rm  # noqa: E402
from masa import replaceme_core as core  # noqa: E402
from masa.core import Context  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "replaceme"
CACHE = Path.home() / ".cache" / "libmasa" / "replaceme"
COSINE = {
    "cosine": dict(epochs=10, learning_rate=1e-4, batch_rows=1024, seed=0),
    "cosine-long": dict(epochs=30, learning_rate=1e-3, batch_rows=1024, seed=0),
}
METHODS = ["plain", "ls"] + list(COSINE)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="2,4,6,8")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    blocks = [int(v) for v in args.blocks.split(",")]
    runs = OUT / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    calib = {"sequences": args.calib_seqs, "tokens_per_sequence": args.calib_len,
             "tokens": args.calib_seqs * args.calib_len}

    def done(name):
        p = runs / f"{name}.json"
        if args.fresh or not p.exists():
            return None
        r = json.loads(p.read_text())
        return r if r.get("calibration") == calib else None

    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        ctx = Context(args.threads)
        t = time.monotonic()
        model, tok = rm.load_model("smollm2")
        load_s = time.monotonic() - t
        tokens = rm.corpus_tokens(tok)
        ev = rm.eval_starts(len(tokens))
        cal = rm.calibration_starts(len(tokens), args.calib_seqs, args.calib_len)
        if not done("base"):
            t = time.monotonic()
            ppl = rm.perplexity(model, tokens, ev, progress="ppl base")
            write_json(runs / "base.json", {"ppl": ppl, "eval_seconds": time.monotonic() - t,
                                            "load_seconds": load_s, "calibration": calib,
                                            "tokens": int(len(tokens))})
        dist_path = runs / "distances.json"
        dist = done("distances")
        if not dist:
            t = time.monotonic()
            states = rm.last_token_states(model, tokens, cal, args.calib_len)
            dist = {"calibration": calib, "seconds": time.monotonic() - t,
                    "by_blocks": {str(n): rm.angular_distances(states, n)
                                  for n in range(1, 13)}}
            write_json(dist_path, dist)
        for n in blocks:
            d = {int(k): v for k, v in dist["by_blocks"][str(n)].items()}
            start = min(d, key=d.get)
            todo = [m for m in METHODS if not done(f"n{n}-{m}")]
            if not todo:
                continue
            rm.log(f"n = {n}: blocks {start}..{start + n - 1}, to do: {', '.join(todo)}")
            base_row = {"blocks": n, "start": start, "end": start + n,
                        "distance": d[start], "calibration": calib}
            acts = None
            cache = CACHE / f"acts-s{start}-n{n}-c{args.calib_seqs}x{args.calib_len}.npz"
            if any(m != "plain" for m in todo):
                if cache.exists():
                    z = np.load(cache)
                    acts = {k: z[k] for k in ("Y", "M", "L")}
                    collect_s = float(z["seconds"])
                else:
                    t = time.monotonic()
                    acts = rm.collect_activations(model, tokens, cal, args.calib_len,
                                                  [(start, n)])[(start, n)]
                    collect_s = time.monotonic() - t
                    CACHE.mkdir(parents=True, exist_ok=True)
                    np.savez(cache, seconds=collect_s, **acts)
            for m in todo:
                row = dict(base_row, method=m)
                t = time.monotonic()
                transform = None
                if m == "ls":
                    est = core.LinearEstimator(acts["M"].shape[1], acts["L"].shape[1], ctx)
                    est.accumulate(acts["M"], acts["L"], acts["Y"])
                    transform = est.solve(0.0)
                    row["rows"] = est.rows
                elif m in COSINE:
                    transform, losses = rm.estimate_cosine(acts["Y"], acts["M"], acts["L"],
                                                           ctx, **COSINE[m])
                    row["rows"] = len(acts["M"])
                    row["cosine"] = COSINE[m]
                    row["cosine_epoch_loss"] = [float(v) for v in losses]
                if transform is not None:
                    row["estimate_seconds"] = time.monotonic() - t
                    row["collect_seconds"] = collect_s
                    row["transform_minus_identity_fro"] = float(
                        np.linalg.norm(transform - np.eye(len(transform))))
                pruned = copy.deepcopy(model)
                rm.remove_blocks(pruned, start, n, transform, ctx)
                t = time.monotonic()
                row["ppl"] = rm.perplexity(pruned, tokens, ev, progress=f"ppl n={n} {m}")
                row["eval_seconds"] = time.monotonic() - t
                rm.log(f"n = {n} {m}: ppl {row['ppl']:.3f}")
                del pruned
                write_json(runs / f"n{n}-{m}.json", row)
    report(blocks)


def report(blocks):
    runs = OUT / "runs"
    base = json.loads((runs / "base.json").read_text())
    lines = [
        "# ReplaceMe on SmolLM2-135M-Instruct (30 blocks, GGUF Q4_1 dequantised to float32)",
        "",
        f"Perplexity: 40 windows of 512 fortunes tokens scored alone (DESIGN.md section 6); "
        f"dense model: **{base['ppl']:.3f}**. Calibration: {base['calibration']['sequences']} "
        f"sequences x {base['calibration']['tokens_per_sequence']} tokens = "
        f"{base['calibration']['tokens']:,} rows, taken between the evaluation windows. "
        "Span: the n consecutive blocks with the smallest angular distance between "
        "their input and output (last token of each calibration sequence); the same "
        "span for every method. Times in seconds on the shared 2-core Zen 5 machine "
        "(other jobs running: noisy). collect = forward passes up to the span's end "
        "with hooks (shared by ls and cosine), estimate = T in libmasa.",
        "",
        "| n removed | span (blocks) | distance | method | ppl | vs plain | collect s | estimate s | eval s |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in blocks:
        rows = {}
        for m in METHODS:
            p = runs / f"n{n}-{m}.json"
            if p.exists():
                rows[m] = json.loads(p.read_text())
        plain = rows.get("plain", {}).get("ppl")
        for m in METHODS:
            r = rows.get(m)
            if not r:
                lines.append(f"| {n} | | | {m} | pending | | | | |")
                continue
            rel = f"{r['ppl'] / plain:.3f}x" if plain else ""
            lines.append(
                f"| {n} | {r['start']}..{r['end'] - 1} | {r['distance']:.4f} | {m} | "
                f"{r['ppl']:.3f} | {rel} | {r.get('collect_seconds', 0):.0f} | "
                f"{r.get('estimate_seconds', 0):.1f} | {r['eval_seconds']:.0f} |")
    lines += ["", "cosine: the reference's Adam settings (10 epochs, lr 1e-4, batch 1024, "
              "seed 0) from T = I; cosine-long: 30 epochs at lr 1e-3. Both minimise "
              "1 - mean cos(Y + M T, L).", ""]
    (OUT / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
