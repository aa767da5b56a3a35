#!/usr/bin/env python3
"""Does MASA's gap to dense close with training? replicate.py's model trained
for 1x, 4x and 16x its 163,840 tokens (issue 18).

Variants dense, masa-qkvo (learned table), masa-mlp (the table predicted by
an MLP from per-layer embeddings while training, collapsed to a table) and
repeat-all-over (fixed cyclic table), every one the same model, data split
and seeds as replicate.py; a k-times-longer run has k times the steps and
the same learning-rate schedule stretched over them (warmup 10% of the
steps, cosine decay), and evaluates the curve every 20k steps.

    python3 examples/python/replicate_scale.py   # 1x: 3 seeds, 4x: 2 seeds, 16x: 2 seeds
    python3 examples/python/replicate_scale.py --jobs 2   # two runs at a time, 1 thread each

On 2 cores, two one-thread runs side by side train twice the tokens per
second of one run (8,191 tokens/s together against 4,013 for one run with 1
thread and 5,243 with 2; Intel AVX-512, idle: results/replicate/scale/speed.md);
the records are the same.

Writes results/replicate/scale/: table.md, gap.png, runs/<variant>-x<k>-seed<n>.json,
log.txt. The 1x runs of replicate.py --full (results/replicate/full/runs) are
used where they are the same run. Like replicate.py it resumes: finished runs
are kept, a run cut short continues from its checkpoint (runs/*.ckpt).
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import replicate  # noqa: E402  (puts bindings/python on the path when needed)
import masa  # noqa: E402
import replicate_data as data  # noqa: E402
import replicate_models as models  # noqa: E402
import torch  # noqa: E402

REPO = replicate.REPO
VARIANTS = ("dense", "masa-qkvo", "masa-mlp", "repeat-all-over")
PLAN = "1:0,1,2/4:0,1/16:0,1"   # tokens multiple: seeds
BASE = replicate.TrainConfig()


def parse_plan(text):
    """'1:0,1/4:0' -> [(1, [0, 1]), (4, [0])]."""
    plan = []
    for part in text.split("/"):
        multiple, seeds = part.split(":")
        plan.append((int(multiple), [int(s) for s in seeds.split(",")]))
    return plan


def train_config(multiple, base, threads):
    """base stretched k-fold: k times the steps, the curve every k times as many steps."""
    return replicate.TrainConfig(steps=base.steps * multiple, batch_size=base.batch_size,
                                 lr=base.lr, eval_every=base.eval_every * multiple,
                                 threads=threads)


def find_record(paths, mcfg, tcfg):
    """The first JSON among paths that records this very run, or None."""
    for path in paths:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
            if replicate.same_run(r, mcfg, tcfg):
                return r
    return None


def paired_gaps(records, variant, multiple):
    """val loss(variant) - val loss(dense) per seed both have."""
    by = {(r["variant"], r["multiple"], r["seed"]): r["val_loss"] for r in records}
    return [by[(variant, multiple, s)] - by[("dense", multiple, s)]
            for (v, m, s) in sorted(by) if v == variant and m == multiple
            and ("dense", multiple, s) in by]


def summary(records, variants, multiples):
    """{(variant, multiple): (n, loss mean, loss sd, gap mean, gap sd, n gaps)}."""
    out = {}
    for m in multiples:
        for v in variants:
            losses = [r["val_loss"] for r in records if r["variant"] == v and r["multiple"] == m]
            if not losses:
                continue
            gaps = paired_gaps(records, v, m)
            out[(v, m)] = (len(losses), *replicate.mean_spread(losses),
                           *(replicate.mean_spread(gaps) if gaps else (float("nan"),) * 2),
                           len(gaps))
    return out


def write_table(records, variants, plan, path, command, base, mcfg):
    multiples = [m for m, _ in plan]
    stats = summary(records, variants, multiples)
    r_mlp = next((r for r in records if r["variant"] == "masa-mlp"), None)
    lines = [
        "# Training length: MASA's gap to dense at 1x, 4x and 16x the tokens",
        "",
        f"Command: `{command}`",
        "",
        f"Model and data as results/replicate/full ({mcfg.n_layers} layers, d_model "
        f"{mcfg.d_model}, context {mcfg.context}, S = {mcfg.n_atoms}). A k x run trains "
        f"{base.steps} k steps of {base.batch_size} x {mcfg.context} bytes (k x "
        f"{base.steps * base.batch_size * mcfg.context:,} tokens) with the same schedule "
        f"stretched (AdamW lr {base.lr}, warmup 10% of the steps, cosine to 10%). "
        f"Validation: {base.final_eval_windows} windows of {mcfg.context} bytes, the same for "
        "every run.",
        "Gap = the variant's validation loss minus dense's with the same seed (same "
        "initialisation of the shared tensors, same bytes in the same order), mean ± sample "
        "standard deviation over the seeds; gap % is relative to dense's mean loss.",
    ]
    if r_mlp:
        lines.append(
            f"masa-mlp: {r_mlp['attention_parameters']:,} attention parameters at inference (the "
            f"collapsed table, as masa-qkvo), {r_mlp['training_attention_parameters']:,} while "
            f"training (per projection type {mcfg.n_layers} embeddings of {mcfg.coefficient_embed} "
            f"and an MLP {mcfg.coefficient_embed}-{mcfg.coefficient_hidden}-{mcfg.n_atoms}); its "
            "validation loss is the collapsed model's.")
    versions = {}
    for r in records:
        v = r.get("torch", "unrecorded")
        versions[v] = versions.get(v, 0) + 1
    lines.append("Runs by torch version: " + ", ".join(
        f"{v} {n}" for v, n in sorted(versions.items()))
        + " (unrecorded: the 1x runs of replicate.py --full, torch 1.13 by its log); the "
        "model's arithmetic is the same, the matrix library differs (OpenBLAS, MKL).")
    lines += [
        "",
        "| tokens | variant | seeds | val loss (nats/byte) | gap to dense (nats/byte) | gap % |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for m, seeds in plan:
        dense = stats.get(("dense", m))
        tokens = m * base.steps * base.batch_size * mcfg.context
        for v in variants:
            if (v, m) not in stats:
                lines.append(f"| {m}x ({tokens:,}) | {v} | 0 of {len(seeds)} | not run yet | | |")
                continue
            n, lm, ls, gm, gs, ng = stats[(v, m)]
            loss = f"{lm:.4f} ± {ls:.4f}" if n > 1 else f"{lm:.4f}"
            if v == "dense" or ng == 0:
                gap = pct = ""
            else:
                gap = f"{gm:+.4f} ± {gs:.4f}" if ng > 1 else f"{gm:+.4f}"
                pct = f"{100 * gm / dense[1]:+.2f}%"
            lines.append(f"| {m}x ({tokens:,}) | {v} | {n} of {len(seeds)} | {loss} | {gap} | {pct} |")
    lines += ["", "![gap to dense](gap.png)", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_plot(records, variants, plan, path, base, mcfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multiples = [m for m, _ in plan]
    stats = summary(records, variants, multiples)
    fig, (ax_gap, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    tokens = lambda m: m * base.steps * base.batch_size * mcfg.context  # noqa: E731
    for v in variants:
        ms = [m for m in multiples if (v, m) in stats]
        if not ms:
            continue
        ax_loss.errorbar([tokens(m) for m in ms], [stats[(v, m)][1] for m in ms],
                         yerr=[stats[(v, m)][2] for m in ms], marker="o", capsize=3, label=v)
        if v == "dense":
            continue
        ms = [m for m in ms if stats[(v, m)][5]]
        for m in ms:  # every seed's gap, faint
            ax_gap.scatter([tokens(m)] * stats[(v, m)][5], paired_gaps(records, v, m), s=10,
                           alpha=0.35, color=f"C{variants.index(v)}")
        ax_gap.errorbar([tokens(m) for m in ms], [stats[(v, m)][3] for m in ms],
                        yerr=[stats[(v, m)][4] for m in ms], marker="o", capsize=3,
                        color=f"C{variants.index(v)}", label=v)
    ax_gap.axhline(0.0, color="black", lw=0.8)
    for ax in (ax_gap, ax_loss):
        # the plan's range, so a panel without points yet (a report written
        # before dense's run is done) still has a log axis
        ax.set_xlim(tokens(min(multiples)) / 1.5, tokens(max(multiples)) * 1.5)
        ax.set_xscale("log")
        ax.set_xticks([tokens(m) for m in multiples],
                      [f"{tokens(m) / 1e3:,.0f}k\n({m}x)" for m in multiples])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training tokens (bytes)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_gap.set_ylabel("validation loss - dense's, same seed (nats/byte)")
    ax_gap.set_title("gap to dense (dots: seeds; bars: mean ± sd)")
    ax_loss.set_ylabel("validation loss (nats/byte)")
    ax_loss.set_title("validation loss (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_one(v, multiple, s, tcfg, path, mcfg, splits, context, log, eta):
    """Trains (or resumes) one run and writes its record; returns the record."""
    ckpt = path[:-len(".json")] + ".ckpt"
    r = replicate.train_run(v, s, mcfg, tcfg, splits, context, log, eta, checkpoint=ckpt)
    r["multiple"] = multiple
    replicate.write_json(path, r)
    os.unlink(ckpt)
    return r


def train_job(job):
    """One run in a worker process of --jobs: its own threads, context and log
    handle (lines are appended whole, so the workers' lines interleave)."""
    v, multiple, s, tcfg, path, mcfg, out, threads = job
    torch.set_num_threads(threads)
    context = masa.Context(n_threads=threads)
    log = replicate.Log(os.path.join(out, "log.txt"))
    try:
        return train_one(v, multiple, s, tcfg, path, mcfg, data.load_splits(), context, log,
                         None)  # no estimate of all runs' time from inside one
    finally:
        context.close()
        log.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default=PLAN, help=f"multiple:seeds/... (default {PLAN})")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="torch and libmasa threads (per run)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs trained side by side in worker processes (default 1)")
    ap.add_argument("--out", default=os.path.join(REPO, "results", "replicate", "scale"))
    ap.add_argument("--reference", default=os.path.join(REPO, "results", "replicate", "full", "runs"),
                    help="where finished 1x runs of replicate.py may be found")
    ap.add_argument("--report-only", action="store_true", help="train nothing")
    # a smaller model and run, for tests
    ap.add_argument("--layers", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--base-steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float, help="peak learning rate (default replicate.py's; give "
                    "another --out: runs of another rate are other runs)")
    args = ap.parse_args(argv)

    plan = parse_plan(args.plan)
    variants = args.variants.split(",")
    if args.jobs < 1 or args.threads < 1:
        ap.error("--jobs and --threads: at least 1")
    if "dense" not in variants or any(v not in models.VARIANTS for v in variants):
        ap.error("--variants: names of replicate_models.VARIANTS, dense among them")
    mcfg = models.ModelConfig(**{k: v for k, v in (
        ("n_layers", args.layers), ("n_atoms", args.layers and args.layers // 3),
        ("d_model", args.d_model), ("context", args.context)) if v})
    base = replicate.TrainConfig(**{k: v for k, v in (
        ("steps", args.base_steps), ("batch_size", args.batch_size), ("lr", args.lr)) if v})
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    log = replicate.Log(os.path.join(args.out, "log.txt"))
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python3 examples/python/replicate_scale.py"]
                       + [a for a in argv if a != "--report-only"])
    torch.set_num_threads(args.threads)
    context = masa.Context(n_threads=args.threads)
    splits = data.load_splits()
    log(f"== {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {command}")
    log(f"libmasa {masa.version()} ({replicate.shown_path(masa.library_path())}), torch "
        f"{torch.__version__}, {args.threads} thread(s)")

    records, todo = [], []
    for multiple, seeds in plan:  # shortest first, then seed-major
        tcfg = train_config(multiple, base, args.threads)
        for s in seeds:
            for v in variants:
                path = os.path.join(args.out, "runs", f"{v}-x{multiple}-seed{s}.json")
                candidates = [path] + ([os.path.join(args.reference, f"{v}-seed{s}.json")]
                                       if multiple == 1 else [])
                r = find_record(candidates, mcfg, tcfg)
                if r is not None:
                    r["multiple"] = multiple
                    records.append(r)
                    log(f"[{v} {multiple}x seed {s}] kept: val loss {r['val_loss']:.4f}")
                elif not args.report_only:
                    todo.append((v, multiple, s, tcfg, path))

    def report():
        write_table(records, variants, plan, os.path.join(args.out, "table.md"), command, base, mcfg)
        write_plot(records, variants, plan, os.path.join(args.out, "gap.png"), base, mcfg)

    left_tokens = sum(t.steps for *_, t, _ in todo) * base.batch_size * mcfg.context
    log(f"{len(records)} run(s) kept, {len(todo)} to train ({left_tokens:,} tokens)"
        + (f", {args.jobs} at a time" if args.jobs > 1 and len(todo) > 1 else ""))
    start = time.time()
    if args.jobs > 1 and len(todo) > 1:
        # independent runs in worker processes of args.threads thread(s) each:
        # on few cores, runs side by side beat one run on all of them (the
        # small products of this model do not scale to more threads)
        log.close()
        jobs = [(v, multiple, s, tcfg, path, mcfg, args.out, args.threads)
                for v, multiple, s, tcfg, path in todo]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
            for r in pool.imap_unordered(train_job, jobs):
                records.append(r)
                report()
        log = replicate.Log(os.path.join(args.out, "log.txt"))
    else:
        done_tokens = 0
        for v, multiple, s, tcfg, path in todo:
            run_tokens = tcfg.steps * base.batch_size * mcfg.context
            run_start = time.time()

            def eta(run_left, run_tokens=run_tokens, run_start=run_start, done=done_tokens):
                rate = run_tokens / max(time.time() - run_start + run_left, 1e-9)  # this run's pace
                return run_left + (left_tokens - done - run_tokens) / rate
            records.append(train_one(v, multiple, s, tcfg, path, mcfg, splits, context, log, eta))
            done_tokens += run_tokens
            report()
    report()
    log(f"== trained {len(todo)} run(s) in {replicate.fmt_time(time.time() - start)}")
    replicate.finish(log, context, os.path.join(args.out, "table.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
