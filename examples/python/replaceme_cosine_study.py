"""Why ReplaceMe-cosine trails least squares on SmolLM2 (results/replaceme/
cosine_study.{json,md}): on the cached calibration activations of the table
(replaceme_table.py), T is fitted on the first sequences and judged on
held-out ones, for least squares and for the two cosine objectives of the
reference repository (mts-ai/ReplaceMe, ReplaceMe/cosine_dist.py):

- "residual" (its default, accurate: False): 1 - cos(M T, L - Y), i.e. the
  map alone against what the removed blocks added (a1 = M, a2 = L + M - h_i
  with h_i = Y + M, the output of block i);
- "full" (its accurate: True): 1 - cos(Y + M T, L), the whole residual
  stream, which is what DESIGN.md section 2 and the first table fitted.

Adam from T = I, steps replayed batch by batch with the same row order as
CosineEstimator.fit (masa.replaceme_core.epoch_orders), so every epoch's
held-out figures can be recorded.

    PYTHONPATH=bindings/python ~/.cache/libmasa/venv/bin/python \\
        examples/python/replaceme_cosine_study.py [--blocks 4] [--held-out 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bindings" / "python"))

from masa import replaceme_core as core  # noqa: E402
from masa.core import Context  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "results" / "replaceme"
CACHE = Path.home() / ".cache" / "libmasa" / "replaceme"
SETTINGS = {"ref": dict(epochs=10, learning_rate=1e-4, batch_rows=1024, seed=0),
            "long": dict(epochs=20, learning_rate=1e-3, batch_rows=1024, seed=0),
            # about 2,000 Adam steps: near convergence on 10,240 rows (the
            # reference's own runs take thousands of steps on millions of rows)
            "conv": dict(epochs=200, learning_rate=1e-3, batch_rows=1024, seed=0)}


def metrics(y, m, l_, t):
    """Figures of Y + M T against L over the rows (float64)."""
    mt = (m @ t).astype(np.float64)
    y, l_ = y.astype(np.float64), l_.astype(np.float64)
    p, r = y + mt, l_ - y

    def cos(a, b):
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        return (a * b).sum(1) / np.maximum(na * nb, 1e-300)

    return {
        "cos_full": float(cos(p, l_).mean()),            # mean cos(Y + M T, L)
        "cos_residual": float(cos(mt, r).mean()),        # mean cos(M T, L - Y)
        "rel_sq_error": float(((p - l_) ** 2).sum() / (l_ ** 2).sum()),
        "median_norm_ratio": float(np.median(np.linalg.norm(p, axis=1) / np.linalg.norm(l_, axis=1))),
        "median_residual_norm_ratio": float(np.median(np.linalg.norm(mt, axis=1)
                                                      / np.linalg.norm(r, axis=1))),
    }


def fit_cosine(objective, y, m, l_, held, ctx, epochs, learning_rate, batch_rows, seed):
    """Adam steps as CosineEstimator.fit takes them; per-epoch train loss
    (mean batch loss before the steps) and held-out figures."""
    est = core.CosineEstimator(m.shape[1], l_.shape[1], ctx, epochs=epochs,
                               learning_rate=learning_rate, batch_rows=batch_rows, seed=seed)
    target = l_ if objective == "full" else np.ascontiguousarray(l_ - y)
    offset = y if objective == "full" else None
    curve = []
    for order in core.epoch_orders(len(m), epochs, seed):
        losses = []
        for b in range(0, len(order), batch_rows):
            idx = order[b:b + batch_rows]
            losses.append(est.step(np.ascontiguousarray(m[idx]), np.ascontiguousarray(target[idx]),
                                   None if offset is None else np.ascontiguousarray(offset[idx])))
        curve.append({"train_loss": float(np.mean(losses)), "held_out": metrics(*held, est.transform)})
    return est.transform, curve


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="4")
    ap.add_argument("--calib-seqs", type=int, default=24)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--held-out", type=int, default=4, help="last calibration sequences kept out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="of " + ", ".join(SETTINGS))
    args = ap.parse_args()
    ctx = Context(args.threads)
    dist_path = OUT / "runs" / "distances.json"  # the spans do not depend on the windows
    if not dist_path.exists():
        dist_path = OUT / "runs-stride4" / "distances.json"
    dist = json.loads(dist_path.read_text())
    out_path = OUT / "cosine_study.json"
    study = json.loads(out_path.read_text()) if out_path.exists() else {}
    for n in (int(v) for v in args.blocks.split(",")):
        d = {int(k): v for k, v in dist["by_blocks"][str(n)].items()}
        start = min(d, key=d.get)
        z = np.load(CACHE / f"acts-s{start}-n{n}-c{args.calib_seqs}x{args.calib_len}.npz")
        cut = (args.calib_seqs - args.held_out) * args.calib_len
        y, m, l_ = (z[k] for k in ("Y", "M", "L"))
        train, held = (y[:cut], m[:cut], l_[:cut]), (y[cut:], m[cut:], l_[cut:])
        rows = study.get(str(n), {}).get("rows", {})
        eye = np.eye(m.shape[1], dtype=np.float32)
        rows["plain (T = I)"] = {"train": metrics(*train, eye), "held_out": metrics(*held, eye)}
        t0 = time.monotonic()
        est = core.LinearEstimator(m.shape[1], l_.shape[1], ctx)
        t_ls = est.accumulate(train[1], train[2], train[0]).solve(0.0)
        rows["ls"] = {"train": metrics(*train, t_ls), "held_out": metrics(*held, t_ls),
                      "seconds": time.monotonic() - t0}
        for objective in ("residual", "full"):
            for name in args.settings.split(","):
                s = SETTINGS[name]
                t0 = time.monotonic()
                t, curve = fit_cosine(objective, *train, held, ctx, **s)
                rows[f"cosine-{objective}-{name}"] = {
                    "objective": objective, "settings": s, "train": metrics(*train, t),
                    "held_out": metrics(*held, t), "curve": curve,
                    "transform_minus_identity_fro": float(np.linalg.norm(t - eye)),
                    "seconds": time.monotonic() - t0}
                print(f"n={n} {objective} {name}: held-out {rows[f'cosine-{objective}-{name}']['held_out']}",
                      file=sys.stderr, flush=True)
        study[str(n)] = {"span": [start, start + n - 1], "train_rows": cut,
                         "held_out_rows": len(m) - cut, "rows": rows}
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(study, indent=1) + "\n")
        tmp.replace(out_path)
    report(study)


def report(study):
    lines = ["# ReplaceMe cosine study (held-out calibration rows)", "",
             "Written by examples/python/replaceme_cosine_study.py from the table's cached "
             "activations. Fitted on the first 20 calibration sequences (10,240 rows), judged on "
             "the last 4 (2,048 rows) unless stated. cos full = mean cos(Y + M T, L); cos resid = "
             "mean cos(M T, L - Y); rel sq err = sum |Y + M T - L|^2 / sum |L|^2; |p|/|L| = median "
             "norm ratio of the prediction Y + M T to L; |MT|/|L-Y| the same for the map's part. "
             "Settings: ref = the reference repository's (10 epochs, lr 1e-4, batch 1024), long = "
             "20 epochs, lr 1e-3, conv = 200 epochs, lr 1e-3 (2,000 steps). Loss curves of conv: "
             "every 20th epoch.", ""]
    for n, s in study.items():
        lines += [f"## n = {n} (blocks {s['span'][0]}..{s['span'][1]})", "",
                  "| T | train cos full | held-out cos full | held-out cos resid | held-out rel sq err | held-out abs(p)/abs(L) | held-out abs(MT)/abs(L-Y) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in s["rows"].items():
            h = r["held_out"]
            lines.append(f"| {name} | {r['train']['cos_full']:.4f} | {h['cos_full']:.4f} | "
                         f"{h['cos_residual']:.4f} | {h['rel_sq_error']:.4f} | "
                         f"{h['median_norm_ratio']:.3f} | {h['median_residual_norm_ratio']:.3f} |")
        lines += ["", "Loss curves (train loss per epoch before its steps; held-out cos full after it):", ""]
        for name, r in s["rows"].items():
            if "curve" in r:
                curve = r["curve"][::20] + r["curve"][-1:] if len(r["curve"]) > 40 else r["curve"]
                lines.append(f"- {name}: train loss " + ", ".join(f"{c['train_loss']:.4f}" for c in curve)
                             + "; held-out cos full " + ", ".join(f"{c['held_out']['cos_full']:.4f}"
                                                                  for c in curve))
        lines.append("")
    (OUT / "cosine_study.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
