"""The ReplaceMe table of results/replaceme/: SmolLM2-135M-Instruct with n of
its 30 blocks removed (n = 2, 4, 6, 8), the same span (chosen by angular
distance) for every method: plain removal, ReplaceMe least squares, ReplaceMe
cosine (Adam from T = I; see COSINE for the settings). Perplexity by the
recipe of DESIGN.md section 6 (40 windows of 512 fortunes tokens); the
calibration sequences lie between those windows.

    PYTHONPATH=bindings/python ~/.cache/libmasa/venv/bin/python \\
        examples/python/replaceme_table.py [--calib-seqs 24] [--threads 2]

Resumable: every finished row is results/replaceme/runs/<name>.json
(runs-stride<k>/ for --window-stride k > 1) and is kept when the command runs
again (--fresh recomputes); activations are cached in
~/.cache/libmasa/replaceme/ (not in the repository). Writes table.md
(table-stride<k>.md).

--combined N adds the combined rows: MASA compression of the attention at 20%
(masa.compress's "full" method through its public compress_model) of the
dense model, and of the model after ReplaceMe least squares removed N blocks.
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
# Adam from T = I. The reference's settings (10 epochs, lr 1e-4, batch 1024)
# were made for calibration sets of millions of rows; on 12,288 rows they
# give 120 steps, and Adam moves each entry of T by at most about lr per
# step, so lr 1e-3 and 20 epochs here (240 steps).
#
# objective "full": 1 - cos(Y + M T, L), the reference repository's
# `accurate: True`; "residual": 1 - cos(M T, L - Y), its default
# (`accurate: False`, ReplaceMe/cosine_dist.py). See cosine_study.md.
COSINE = {
    "cosine": dict(epochs=20, learning_rate=1e-3, batch_rows=1024, seed=0),
    "cosine-ref": dict(epochs=10, learning_rate=1e-4, batch_rows=1024, seed=0),
    # the same Adam, started from the least-squares T instead of I
    "cosine-from-ls": dict(epochs=10, learning_rate=1e-4, batch_rows=1024, seed=0),
    # the reference's default objective with its settings
    "cosine-resid": dict(epochs=10, learning_rate=1e-4, batch_rows=1024, seed=0),
    # about 2,000 steps: near convergence on 12,288 rows
    "cosine-conv": dict(epochs=160, learning_rate=1e-3, batch_rows=1024, seed=0),
    "cosine-resid-conv": dict(epochs=160, learning_rate=1e-3, batch_rows=1024, seed=0),
}
OBJECTIVE = {"cosine-resid": "residual", "cosine-resid-conv": "residual"}
METHODS = ["plain", "ls", "cosine"]
COMBINED = {"masa20": 0.2}  # attention fraction removed by masa.compress "full"


def runs_dir(stride):
    return OUT / ("runs" if stride == 1 else f"runs-stride{stride}")


def table_path(stride):
    return OUT / ("table.md" if stride == 1 else f"table-stride{stride}.md")


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="4,8,2,6")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="of plain, ls, " + ", ".join(COSINE))
    ap.add_argument("--calib-seqs", type=int, default=24)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window-stride", type=int, default=1,
                    help="score every k-th of the 40 evaluation windows (1: the full recipe)")
    ap.add_argument("--combined", type=int, default=0,
                    help="also the combined rows for this n (ReplaceMe ls, then MASA at 20%%)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    blocks = [int(v) for v in args.blocks.split(",")]
    methods = args.methods.split(",")
    runs = runs_dir(args.window_stride)
    runs.mkdir(parents=True, exist_ok=True)
    calib = {"sequences": args.calib_seqs, "tokens_per_sequence": args.calib_len,
             "tokens": args.calib_seqs * args.calib_len, "window_stride": args.window_stride}

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
        ev = rm.eval_starts(len(tokens))[::args.window_stride]
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
        def span_of(n):
            d = {int(k): v for k, v in dist["by_blocks"][str(n)].items()}
            return min(d, key=d.get), d

        def cache_of(start, n):
            return CACHE / f"acts-s{start}-n{n}-c{args.calib_seqs}x{args.calib_len}.npz"

        # one forward pass collects Y, M, L for every span still needing them
        need = [(span_of(n)[0], n) for n in blocks + ([args.combined] if args.combined else [])
                if any(m != "plain" and not done(f"n{n}-{m}") for m in methods + ["ls+masa20"])
                and not cache_of(span_of(n)[0], n).exists()]
        if need:
            t = time.monotonic()
            got = rm.collect_activations(model, tokens, cal, args.calib_len, need)
            seconds = time.monotonic() - t
            CACHE.mkdir(parents=True, exist_ok=True)
            for span in need:
                np.savez(cache_of(*span), seconds=seconds, spans=len(need), **got[span])
            del got
        for n in blocks:
            start, d = span_of(n)
            todo = [m for m in methods if not done(f"n{n}-{m}")]
            if not todo:
                continue
            rm.log(f"n = {n}: blocks {start}..{start + n - 1}, to do: {', '.join(todo)}")
            base_row = {"blocks": n, "start": start, "end": start + n,
                        "distance": d[start], "calibration": calib}
            acts = None
            if any(m != "plain" for m in todo):
                z = np.load(cache_of(start, n))
                acts = {k: z[k] for k in ("Y", "M", "L")}
                collect_s, shared_by = float(z["seconds"]), int(z["spans"])
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
                    init = None
                    if m == "cosine-from-ls":
                        est = core.LinearEstimator(acts["M"].shape[1], acts["L"].shape[1], ctx)
                        init = est.accumulate(acts["M"], acts["L"], acts["Y"]).solve(0.0)
                    objective = OBJECTIVE.get(m, "full")
                    if objective == "full":
                        transform, losses = rm.estimate_cosine(
                            acts["Y"], acts["M"], acts["L"], ctx, init=init, **COSINE[m])
                    else:  # cos(M T, L - Y): no offset, the residual as target
                        transform, losses = rm.estimate_cosine(
                            None, acts["M"], np.ascontiguousarray(acts["L"] - acts["Y"]), ctx,
                            init=init, **COSINE[m])
                    row["rows"] = len(acts["M"])
                    row["cosine"] = dict(COSINE[m], objective=objective)
                    row["cosine_epoch_loss"] = [float(v) for v in losses]
                if transform is not None:
                    row["estimate_seconds"] = time.monotonic() - t
                    row["collect_seconds"] = collect_s
                    row["collect_pass_shared_by_spans"] = shared_by
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
        if args.combined:
            combined_rows(args, model, tok, tokens, ev, ctx, calib, done, span_of, cache_of, runs)
    report(sorted(blocks), args.window_stride, args.combined)


def n_params(model):
    return int(sum(p.numel() for p in model.parameters()))


def compress_attention(model, tok, removed, ctx, source):
    """masa.compress's "full" method (public entry point) on a loaded model,
    written back as dense weights; returns the compression report."""
    from masa import compress

    results, _, rep = compress.compress_model(model, tok, "full", removed, source=source,
                                              context=ctx, progress=rm.log)
    compress.materialise_results(model, results)
    return rep


def combined_rows(args, model, tok, tokens, ev, ctx, calib, done, span_of, cache_of, runs):
    """MASA at 20% of the attention alone (n = 0), and after ReplaceMe ls
    removed args.combined blocks."""
    n = args.combined
    start, d = span_of(n)
    dense = n_params(model)
    for name, removed in COMBINED.items():
        for pre in (None, "ls"):
            key = name if pre is None else f"n{n}-{pre}+{name}"
            if done(key):
                continue
            row = {"blocks": 0 if pre is None else n, "method": key, "calibration": calib,
                   "attention_removed_target": removed, "dense_params": dense}
            work = copy.deepcopy(model)
            t = time.monotonic()
            if pre == "ls":
                z = np.load(cache_of(start, n))
                est = core.LinearEstimator(z["M"].shape[1], z["L"].shape[1], ctx)
                transform = est.accumulate(z["M"], z["L"], z["Y"]).solve(0.0)
                rm.remove_blocks(work, start, n, transform, ctx)
                row.update(start=start, end=start + n, distance=d[start],
                           collect_seconds=float(z["seconds"]))
                del z
            row["estimate_seconds"] = time.monotonic() - t
            t = time.monotonic()
            rep = compress_attention(work, tok, removed, ctx,
                                     source="smollm2" if pre is None else f"smollm2, ReplaceMe {pre} n={n}")
            row["compress_seconds"] = time.monotonic() - t
            row["compress"] = {k: rep[k] for k in ("attention_params_dense", "attention_params_kept",
                                                   "removed_actual", "core")}
            row["params"] = n_params(work) - (rep["attention_params_dense"]
                                              - rep["attention_params_kept"])
            t = time.monotonic()
            row["ppl"] = rm.perplexity(work, tokens, ev, progress=f"ppl {key}")
            row["eval_seconds"] = time.monotonic() - t
            rm.log(f"{key}: ppl {row['ppl']:.3f}")
            del work
            write_json(runs / f"{key}.json", row)


def cpu_kind():
    """The CPU model and vector kind of this machine, and BLIS's kernel set."""
    model, flags = "unknown CPU", ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    vec = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    vendor = "Intel" if "Intel" in model else "AMD" if "AMD" in model else ""
    from masa import blis_arch
    return f"{vendor} {vec} (BLIS {blis_arch()}; {model})".strip()


def report(blocks, stride=1, combined=0):
    """table.md from the runs: the main methods (pending when missing), then
    any extra cosine variant that was run, then the combined rows."""
    methods = list(dict.fromkeys(METHODS + list(COSINE)))
    runs = runs_dir(stride)
    base = json.loads((runs / "base.json").read_text())
    # every n with a row in the runs, not only this invocation's
    blocks = sorted(set(blocks) | {int(p.name[1:].split("-")[0]) for p in runs.glob("n*-*.json")
                                   if "masa" not in p.name})
    stride = base["calibration"].get("window_stride", 1)
    windows = len(range(0, 40, stride))
    lines = [
        "# ReplaceMe on SmolLM2-135M-Instruct (30 blocks, GGUF Q4_1 dequantised to float32)",
        "",
        f"Perplexity: {windows} windows of 512 fortunes tokens scored alone "
        + ("(the 40 windows of DESIGN.md section 6)" if stride == 1 else
           f"(every {stride}th of the 40 windows of DESIGN.md section 6, windows k = 0, "
           f"{stride}, {2 * stride}, ...: the full recipe took too long on the loaded machine)")
        + f"; dense model: **{base['ppl']:.3f}**. Calibration: {base['calibration']['sequences']} "
        f"sequences x {base['calibration']['tokens_per_sequence']} tokens = "
        f"{base['calibration']['tokens']:,} rows, taken between the evaluation windows. "
        "Span: the n consecutive blocks with the smallest angular distance between "
        "their input and output (last token of each calibration sequence); the same "
        f"span for every method. Times in seconds on the machine that wrote this table "
        f"({cpu_kind()}; shared with other jobs while the committed table ran: noisy). collect = one forward pass with hooks over the "
        "calibration sequences, up to the last block any span needs, collecting Y, M and "
        "L for every span at once (shared by all rows that estimate T); estimate = T "
        "in libmasa.",
        "",
        "| n removed | span (blocks) | distance | method | ppl | vs plain | collect s | estimate s | eval s |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in blocks:
        rows = {}
        for m in methods:
            p = runs / f"n{n}-{m}.json"
            if p.exists():
                rows[m] = json.loads(p.read_text())
        plain = rows.get("plain", {}).get("ppl")
        for m in methods:
            r = rows.get(m)
            if not r and m not in METHODS:
                continue
            if not r:
                lines.append(f"| {n} | | | {m} | pending | | | | |")
                continue
            rel = f"{r['ppl'] / plain:.3f}x" if plain else ""
            lines.append(
                f"| {n} | {r['start']}..{r['end'] - 1} | {r['distance']:.4f} | {m} | "
                f"{r['ppl']:.3f} | {rel} | {r.get('collect_seconds', 0):.0f} | "
                f"{r.get('estimate_seconds', 0):.1f} | {r['eval_seconds']:.0f} |")
    lines += ["", "ls: T = (M^T M)^-1 M^T (L - Y), alpha 0. cosine: Adam on "
              "1 - mean cos(Y + M T, L) from T = I, " + json.dumps(COSINE["cosine"]) +
              "; cosine-ref (where present): the reference repository's settings " +
              json.dumps(COSINE["cosine-ref"]) + "; cosine-from-ls (where present): "
              "those settings started from the ls solution; cosine-resid (where present): the "
              "reference repository's default objective 1 - cos(M T, L - Y) with its settings; "
              "-conv: " + json.dumps(COSINE["cosine-conv"]) + " (about 2,000 Adam steps).", ""]
    comb = [json.loads(p.read_text()) for p in sorted(runs.glob("*masa*.json"))]
    if comb:
        plain_rows = {n: json.loads((runs / f"n{n}-ls.json").read_text())
                      for n in {r["blocks"] for r in comb if r["blocks"]}
                      if (runs / f"n{n}-ls.json").exists()}
        lines += ["## Combined: ReplaceMe, then MASA compression of the remaining attention", "",
                  "masa20: masa.compress's full method (as results/pretrained/table.md defines it; its public "
                  "compress_model, 16 x 512 calibration tokens of its own, from the gaps between "
                  "the evaluation windows) removing 20% of the attention parameters, written back "
                  "as dense weights; ls+masa20: the same after ReplaceMe least squares removed n "
                  "blocks. Parameters: the whole model's (dense "
                  f"{comb[0]['dense_params']:,}; embeddings tied).", "",
                  "| model | blocks | params | removed | ppl | vs dense | compress s | eval s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| dense | 30 | {comb[0]['dense_params']:,} | 0% | {base['ppl']:.3f} | 1.000x | | |"]
        for n, r in sorted(plain_rows.items()):
            # the pruned model's size: its combined row's, plus what MASA removed
            c = next((c for c in comb if c["blocks"] == n), None)
            params = (c["params"] + c["compress"]["attention_params_dense"]
                      - c["compress"]["attention_params_kept"]) if c else None
            size = (f"{params:,} | {1 - params / c['dense_params']:.1%}" if c else " | ")
            lines.append(f"| ReplaceMe ls n = {n} | {30 - n} | {size} | {r['ppl']:.3f} | "
                         f"{r['ppl'] / base['ppl']:.3f}x | | {r['eval_seconds']:.0f} |")
        for r in comb:
            removed = 1 - r["params"] / r["dense_params"]
            lines.append(f"| {r['method']} | {30 - r['blocks']} | {r['params']:,} | {removed:.1%} | "
                         f"{r['ppl']:.3f} | {r['ppl'] / base['ppl']:.3f}x | "
                         f"{r['compress_seconds']:.0f} | {r['eval_seconds']:.0f} |")
        lines.append("")
    table_path(stride).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
