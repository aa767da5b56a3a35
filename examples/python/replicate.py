#!/usr/bin/env python3
"""Reproduce MASA's central claim at small scale: train the same byte-level
language model with dense, MASA and baseline attention on real text.

Every variant (see replicate_models.py) is a 12-layer pre-norm decoder,
d_model 128, 4 heads, context 128, MLP 4x, trained with AdamW (warmup +
cosine decay) on the same bytes of Debian's English fortunes
(replicate_data.py) in the same order for a given seed. Attention runs in
libmasa through masa.torch.

    python3 examples/python/replicate.py --quick   # dense vs masa-qkvo, 1 seed
    python3 examples/python/replicate.py --full    # the 7 baseline variants, 3 seeds

masa-mlp (the paper's coefficient parameterisation, collapsed to a table
after training) is not in --full's table; --variants adds it.

Writes to results/replicate/{quick,full}/: table.md, loss.png, runs/*.json
(one per variant and seed) and log.txt. A run whose JSON exists with the same
configuration is not trained again, so an interrupted --full resumes where it
stopped when run again; a run cut short continues from its last checkpoint
(runs/*.ckpt, saved every 5 minutes). --fresh retrains everything;
--report-only trains nothing and rebuilds the table and plot from the JSONs.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
try:
    import masa  # noqa: F401
except ImportError:  # source checkout: use bindings/python
    sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
    import masa  # noqa: F401
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import replicate_data as data  # noqa: E402
import replicate_models as models  # noqa: E402

QUICK_VARIANTS = ("dense", "masa-qkvo")
FULL_VARIANTS = tuple(v for v in models.VARIANTS if v != "masa-mlp")  # the table of issue 5


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 160
    batch_size: int = 8
    lr: float = 3e-3
    warmup_fraction: float = 0.1  # of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 20
    eval_windows: int = 16       # validation windows for the curve
    final_eval_windows: int = 128  # validation windows for the table
    threads: int = 1             # torch threads and libmasa threads (not part of a run's identity)

    @property
    def warmup(self):
        return max(1, round(self.warmup_fraction * self.steps))

    def dict(self):
        return asdict(self)


class Log:
    """Prints and appends to log.txt."""

    def __init__(self, path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, msg=""):
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def finish(log, context, table):
    """The end of a study: its table into the log, then log and context closed."""
    if os.path.exists(table):
        with open(table, encoding="utf-8") as f:
            log(f.read())
    context.close()
    log.close()


def shown_path(path):
    """A path relative to the repository when inside it (for the log)."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return path if rel.startswith("..") else rel


def write_atomic(path, write):
    """write(file) into a temporary file, fsync, then rename over path: an
    interruption leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


# Settings that change how fast a run goes, not what it computes.
RUNTIME_SETTINGS = ("threads",)


def same_config(saved, current, defaults):
    """Whether a saved config dict describes the same run as `current`: a key
    the saved one lacks (written before the key existed) must hold its
    default; run-time settings (thread counts) are ignored."""
    if set(saved) - set(current):
        return False
    return all(saved.get(k, defaults[k]) == v for k, v in current.items()
               if k not in RUNTIME_SETTINGS)


def same_run(record, mcfg, tcfg):
    return (same_config(record.get("model_config", {}), mcfg.dict(), models.ModelConfig().dict())
            and same_config(record.get("train_config", {}), tcfg.dict(), TrainConfig().dict()))


@contextlib.contextmanager
def frozen_gc():
    """Moves every object alive now (torch, the model) out of the cyclic
    garbage collector's reach for the block: its full collections otherwise
    walk them all, about a tenth of a training step's time."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def fmt_time(seconds):
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@torch.no_grad()
def evaluate(model, inputs, targets, chunk=32):
    """Mean cross-entropy (nats per byte) over the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(inputs), chunk):
        logits = model(inputs[i:i + chunk])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                 targets[i:i + chunk].reshape(-1), reduction="sum").item()
        count += targets[i:i + chunk].numel()
    model.train()
    return total / count


def train_step(model, opt, x, y, lr, grad_clip):
    """One optimizer step on the batch (x, y) at learning rate lr; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


class Interrupted(Exception):
    """Raised by train_run(interrupt_after=n) after step n's checkpoint (tests)."""


def load_checkpoint(path, variant, seed, mcfg, tcfg):
    """The checkpoint dict at path if it belongs to this run, else None."""
    if not path or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu")
    if (state.get("variant"), state.get("seed")) != (variant, seed) or not same_run(state, mcfg, tcfg):
        return None
    return state


def train_run(variant, seed, mcfg, tcfg, splits, context, log, eta, checkpoint=None,
              checkpoint_seconds=300.0, interrupt_after=None):
    """Trains one variant with one seed; returns the run's record.

    eta: the run's seconds left -> all runs' seconds left (for the progress
    lines), or None where no such estimate exists.

    checkpoint: a path where the run's full state (model, optimizer, data
    order, curve) is saved every checkpoint_seconds and after the last step;
    a run started again with a checkpoint of the same run there continues
    from it (identical to an uninterrupted run) and deletes it at the end."""
    train, val = splits
    torch.manual_seed(seed)
    model = models.ByteLM(variant, mcfg, context)
    opt = models.optimizer(model, tcfg.lr, tcfg.weight_decay, fused=True)
    batches = data.Batches(train, tcfg.batch_size, mcfg.context, seed=1000 + seed)
    curve_x, curve_y = data.eval_windows(val, mcfg.context, tcfg.eval_windows)
    tokens_per_step = tcfg.batch_size * mcfg.context
    attn = model.attention_parameters()
    train_attn = model.training_attention_parameters()
    dense_attn = models.dense_attention_parameters(mcfg)
    trained_as = f" (trained as {train_attn:,} with the coefficient MLPs)" if train_attn != attn else ""
    log(f"[{variant} seed {seed}] attention parameters {attn:,}{trained_as} (dense {dense_attn:,}, "
        f"compression {dense_attn / attn:.3f}x), total {model.total_parameters():,}")

    state = load_checkpoint(checkpoint, variant, seed, mcfg, tcfg)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        batches.generator.set_state(state["generator"])
        first, curve, train_losses = state["step"] + 1, state["curve"], state["train_losses"]
        train_time, cpu_time, earlier_wall = state["train_time"], state["cpu_time"], state["wall_seconds"]
        log(f"[{variant} seed {seed}] resumed from {shown_path(checkpoint)} after step {state['step']}")
    else:
        first, train_losses = 1, []
        curve = [(0, evaluate(model, curve_x, curve_y))]
        train_time = cpu_time = earlier_wall = 0.0
    start = last_save = time.time()

    def save(step):
        blob = {"variant": variant, "seed": seed, "model_config": mcfg.dict(),
                "train_config": tcfg.dict(), "step": step, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "generator": batches.generator.get_state(),
                "curve": curve, "train_losses": train_losses, "train_time": train_time,
                "cpu_time": cpu_time, "wall_seconds": earlier_wall + time.time() - start}
        write_atomic(checkpoint, lambda f: torch.save(blob, f))

    with frozen_gc():
        for step in range(first, tcfg.steps + 1):
            lr = models.learning_rate(step, tcfg.steps, tcfg.lr, tcfg.warmup)
            x, y = batches.next()
            t0, c0 = time.time(), time.process_time()
            train_losses.append(train_step(model, opt, x, y, lr, tcfg.grad_clip))
            train_time += time.time() - t0
            cpu_time += time.process_time() - c0
            if not math.isfinite(train_losses[-1]):
                raise RuntimeError(f"{variant} seed {seed}: loss is {train_losses[-1]} at step {step}")
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                curve.append((step * tokens_per_step, evaluate(model, curve_x, curve_y)))
            if checkpoint and (time.time() - last_save >= checkpoint_seconds
                               or step == tcfg.steps or step == interrupt_after):
                save(step)
                last_save = time.time()
            if step == interrupt_after:
                raise Interrupted(step)
            if step % 10 == 0 or step == first or step == tcfg.steps:
                done = step - first + 1
                left = (time.time() - start) / done * (tcfg.steps - step)
                recent = train_losses[-10:]
                log(f"[{variant} seed {seed}] step {step}/{tcfg.steps} loss "
                    f"{sum(recent) / len(recent):.4f} lr {lr:.2e} "
                    f"{step * tokens_per_step / train_time:,.0f} tok/s  "
                    f"run left {fmt_time(left)}"
                    + (f"  all left {fmt_time(eta(left))}" if eta else ""))

    if model.coefficients_mlp is not None:
        model.collapse()  # evaluated, like every variant, as it would be deployed
    final_x, final_y = data.eval_windows(val, mcfg.context, tcfg.final_eval_windows)
    val_loss = evaluate(model, final_x, final_y)
    record = {
        "variant": variant,
        "seed": seed,
        "model_config": mcfg.dict(),
        "train_config": tcfg.dict(),
        "attention_parameters": attn,
        "training_attention_parameters": train_attn,
        "dense_attention_parameters": dense_attn,
        "total_parameters": model.total_parameters(),
        "compression_ratio": dense_attn / attn,
        "low_rank_rank": models.low_rank_rank(mcfg) if variant == "low-rank" else None,
        "tokens": tcfg.steps * tokens_per_step,
        "val_windows": len(final_x),
        "val_loss": val_loss,
        "val_bits_per_byte": val_loss / math.log(2),
        "train_tokens_per_s": tcfg.steps * tokens_per_step / train_time,
        "train_tokens_per_cpu_s": tcfg.steps * tokens_per_step / cpu_time,
        "torch": torch.__version__,
        "wall_seconds": earlier_wall + time.time() - start,
        "curve": curve,
        "train_losses": train_losses,
    }
    log(f"[{variant} seed {seed}] done in {fmt_time(record['wall_seconds'])}: val loss "
        f"{val_loss:.4f} ({record['val_bits_per_byte']:.4f} bits/byte), "
        f"{record['train_tokens_per_s']:,.0f} tok/s")
    return record


def mean_spread(values):
    """(mean, sample standard deviation; 0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_table(records, variants, path, mcfg, tcfg, command):
    seeds = sorted({r["seed"] for r in records})
    by_variant = {v: [r for r in records if r["variant"] == v] for v in variants}
    dense_bpb = None
    if by_variant.get("dense"):
        dense_bpb = statistics.fmean(r["val_bits_per_byte"] for r in by_variant["dense"])
    multi = len(seeds) > 1
    pm = lambda m, s, f: f"{m:{f}} ± {s:{f}}" if multi else f"{m:{f}}"  # noqa: E731
    lines = [
        "# Small-scale replication: MASA against its baselines",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {mcfg.n_layers} layers, d_model {mcfg.d_model}, {mcfg.n_heads} heads, context "
        f"{mcfg.context}, MLP {mcfg.mlp_ratio}x, byte-level (vocabulary {mcfg.vocab}); "
        f"S = {mcfg.n_atoms} atoms per dictionary; GQA with {mcfg.gqa_kv_heads} key/value "
        f"head(s); low-rank rank {models.low_rank_rank(mcfg)}.",
        f"Training: {tcfg.steps} steps of {tcfg.batch_size} x {mcfg.context} bytes "
        f"({tcfg.steps * tcfg.batch_size * mcfg.context:,} tokens), AdamW lr {tcfg.lr} "
        f"(warmup {tcfg.warmup} steps, cosine to 10%), weight decay {tcfg.weight_decay}, "
        f"{tcfg.threads} torch + {tcfg.threads} libmasa thread(s).",
        f"Data: Debian `fortunes` (every 10th fortune held out); validation on "
        f"{tcfg.final_eval_windows} windows of {mcfg.context} bytes (the plot's curves: "
        f"{tcfg.eval_windows} windows every {tcfg.eval_every} steps).",
        f"Seeds: {', '.join(map(str, seeds))}" + (" (mean ± sample standard deviation)"
                                                   if multi else "") + ".",
        f"Wall time: {fmt_time(sum(r['wall_seconds'] for r in records))} "
        f"(sum over the {len(records)} runs, evaluation included).",
        "",
        "| variant | attention params | total params | attention compression | val loss (nats/byte) "
        "| val bits/byte | vs dense (bits/byte) | train tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        rs = by_variant[v]
        if not rs:
            continue
        r0 = rs[0]
        loss = mean_spread([r["val_loss"] for r in rs])
        bpb = mean_spread([r["val_bits_per_byte"] for r in rs])
        tps = mean_spread([r["train_tokens_per_s"] for r in rs])
        delta = "" if dense_bpb is None else f"{bpb[0] - dense_bpb:+.4f}"
        partial = "" if len(rs) == len(seeds) else f" ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
        lines.append(
            f"| {v}{partial} | {r0['attention_parameters']:,} | {r0['total_parameters']:,} | "
            f"{r0['compression_ratio']:.3f}x | {pm(*loss, '.4f')} | {pm(*bpb, '.4f')} | {delta} | "
            f"{pm(*tps, ',.0f')} |")
    lines += [
        "",
        "Attention compression = dense attention parameters / the variant's. Attention "
        "parameters are the trainable tensors of the Q, K, V, O projections (the fixed one-hot "
        "tables of repeat-all-over and sequential are not trained). Tokens/s is training "
        "throughput (wall clock, evaluation excluded) on a machine shared with other work.",
        "",
        "![validation loss](loss.png)",
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_plot(records, variants, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    shown = []  # mean losses after the first evaluation (the initial 5.5 is off the chart)
    for v in variants:
        rs = [r for r in records if r["variant"] == v]
        if not rs:
            continue
        xs = [t for t, _ in rs[0]["curve"]]
        ys = [[r["curve"][i][1] for r in rs] for i in range(len(xs))]
        mean = [statistics.fmean(y) for y in ys]
        shown += mean[1:]
        line, = ax.plot(xs, mean, marker=".", label=f"{v} (n={len(rs)})")
        if len(rs) > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    if shown:
        lo, hi = min(shown), max(shown)
        ax.set_ylim(lo - 0.05 * (hi - lo + 0.1), hi + 0.05 * (hi - lo + 0.1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="dense vs masa-qkvo, seed 0 (the default mode)")
    mode.add_argument("--full", action="store_true",
                      help="all variants but masa-mlp (--variants adds it), seeds 0, 1, 2")
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(models.VARIANTS))
    ap.add_argument("--seeds", help="comma-separated seeds")
    ap.add_argument("--steps", type=int, help="training steps per run")
    ap.add_argument("--batch-size", type=int, help="sequences per step")
    ap.add_argument("--layers", type=int, help="layers (a multiple of 3: S = layers / 3)")
    ap.add_argument("--d-model", type=int, help="model width")
    ap.add_argument("--context", type=int, help="context length (bytes)")
    ap.add_argument("--out", help="results directory (default results/replicate/<mode>)")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that have a JSON")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write table.md and loss.png from the runs' JSONs")
    ap.add_argument("--threads", type=int, default=1, help="torch and libmasa threads")
    args = ap.parse_args(argv)

    mode_name = "full" if args.full else "quick"
    variants = (args.variants.split(",") if args.variants
                else list(FULL_VARIANTS if args.full else QUICK_VARIANTS))
    for v in variants:
        if v not in models.VARIANTS:
            ap.error(f"unknown variant {v!r}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0, 1, 2] if args.full else [0])
    if args.layers is not None and (args.layers < 3 or args.layers % 3):
        ap.error("--layers must be a positive multiple of 3")
    mcfg = models.ModelConfig(**{k: v for k, v in (
        ("n_layers", args.layers), ("n_atoms", args.layers and args.layers // 3),
        ("d_model", args.d_model), ("context", args.context)) if v})
    tcfg = TrainConfig(threads=args.threads, **{k: v for k, v in (
        ("steps", args.steps), ("batch_size", args.batch_size)) if v})
    out = args.out or os.path.join(REPO, "results", "replicate", mode_name)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    log = Log(os.path.join(out, "log.txt"))
    argv = sys.argv[1:] if argv is None else argv
    command = "python3 examples/python/replicate.py " + " ".join(a for a in argv if a != "--report-only")

    torch.set_num_threads(tcfg.threads)
    context = masa.Context(n_threads=tcfg.threads)
    splits = data.load_splits()
    log(f"== {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {command.strip()}")
    log(f"data: {len(splits[0]):,} training bytes, {len(splits[1]):,} validation bytes from "
        f"{len(data.fortune_files())} files in {data.FORTUNES_DIR}")
    log(f"libmasa {masa.version()} ({shown_path(masa.library_path())}), torch {torch.__version__}, "
        f"{tcfg.threads} thread(s)")

    jobs = [(v, s) for s in seeds for v in variants]  # seed-major: every variant early
    records, todo = [], []
    for v, s in jobs:
        path = os.path.join(out, "runs", f"{v}-seed{s}.json")
        if (args.report_only or not args.fresh) and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
            if same_run(r, mcfg, tcfg):
                log(f"[{v} seed {s}] kept from {os.path.relpath(path, out)}: val loss {r['val_loss']:.4f}")
                records.append(r)
                continue
        if not args.report_only:
            todo.append((v, s, path))

    def report():
        write_table(records, variants, os.path.join(out, "table.md"), mcfg, tcfg, command.strip())
        write_plot(records, variants, os.path.join(out, "loss.png"),
                   f"byte-level LM on fortunes, {mode_name} mode")

    start = time.time()
    durations = []
    for i, (v, s, path) in enumerate(todo):
        def eta(run_left, remaining=len(todo) - i - 1):
            per_run = statistics.fmean(durations) if durations else (time.time() - run_start) + run_left
            return run_left + remaining * per_run
        run_start = time.time()
        ckpt = path[:-len(".json")] + ".ckpt"
        if args.fresh and os.path.exists(ckpt):
            os.unlink(ckpt)
        r = train_run(v, s, mcfg, tcfg, splits, context, log, eta, checkpoint=ckpt)
        durations.append(time.time() - run_start)
        write_json(path, r)
        os.unlink(ckpt)  # the JSON holds what the run is kept for
        records.append(r)
        report()  # after every run, so an interrupted invocation leaves its results

    wall = time.time() - start
    report()
    log(f"== trained {len(todo)} run(s) in {fmt_time(wall)}; results in {shown_path(out)}")
    finish(log, context, os.path.join(out, "table.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
