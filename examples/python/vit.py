#!/usr/bin/env python3
"""The paper's vision claim at small scale: a ViT with MASA-QKVO attention
(S = L/3, 66.7% fewer attention parameters) against the same ViT with dense
attention, trained on Fashion-MNIST (Debian's `dataset-fashion-mnist`).

The two variants (vit_models.py) share everything but the attention
projections; attention runs in libmasa through masa.torch (non-causal).
Both train with AdamW (warmup + cosine decay) on the 60,000 training images
in the same order for a given seed and are scored on the 10,000 test images
after every epoch; the table reports the accuracy after the last epoch (no
epoch is picked by its test score).

    python3 examples/python/vit.py             # dense and masa-qkvo, seeds 0 and 1
    python3 examples/python/vit.py --epochs 1 --seeds 0 --out /tmp/vit

Writes to results/vit/ (or --out): table.md, curves.png, runs/*.json (one per
variant and seed) and log.txt. Every epoch ends with a checkpoint
(checkpoints/<variant>-seed<s>.pt, written atomically, deleted when the run's
JSON is written): run the same command again after an interruption and
finished runs are kept, an interrupted one continues from its last finished
epoch, with the same result as an uninterrupted run. --fresh retrains
everything; --report-only trains nothing and rebuilds table and plot.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

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

import vit_data as data  # noqa: E402
import vit_models as models  # noqa: E402
from replicate import Log, finish, fmt_time, mean_spread  # noqa: E402  (the replication's helpers)

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    warmup_fraction: float = 0.05  # of all steps
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    train_images: Optional[int] = None  # None: all 60,000 (fewer: the first n, for tests)
    test_images: Optional[int] = None   # None: all 10,000
    threads: int = 1                    # torch threads and libmasa threads

    def steps_per_epoch(self, n_train):
        return math.ceil(n_train / self.batch_size)

    def dict(self):
        return asdict(self)


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, fsync, rename over
    `path`, fsync the directory: a reader sees the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


def load_data(tcfg, directory=data.FASHION_MNIST_DIR):
    """((train x, train y), (test x, test y)) as torch tensors."""
    splits = []
    for split, limit in (("train", tcfg.train_images), ("test", tcfg.test_images)):
        images, labels = data.load_split(split, directory)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        splits.append(data.to_tensors(images, labels))
    return tuple(splits)


def epoch_order(n, seed, epoch):
    """The training images' order in one epoch: a permutation fixed by
    (seed, epoch), so a resumed run sees what an uninterrupted one sees."""
    g = torch.Generator()
    g.manual_seed(1_000_003 * (seed + 1) + epoch)
    return torch.randperm(n, generator=g)


@torch.no_grad()
def evaluate(model, x, y, chunk=500):
    """(accuracy, mean cross-entropy) over the images."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk])
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y[i:i + chunk]).sum())
    model.train()
    return correct / len(x), loss / len(x)


def checkpoint_matches(state, variant, seed, mcfg, tcfg):
    return (state.get("format") == CHECKPOINT_FORMAT and state.get("variant") == variant
            and state.get("seed") == seed and state.get("model_config") == mcfg.dict()
            and state.get("train_config") == tcfg.dict())


def train_run(variant, seed, mcfg, tcfg, dataset, context, log, checkpoint=None,
              stop_after_epoch=None):
    """Trains one variant with one seed; returns the run's record.

    checkpoint: a path; after every epoch the model, optimizer and history go
    there, and a matching checkpoint found there at the start is resumed.
    stop_after_epoch: return None after that epoch (what an interruption
    leaves behind; for tests)."""
    (train_x, train_y), (test_x, test_y) = dataset
    torch.manual_seed(seed)
    model = models.ViT(variant, mcfg, context)
    opt = models.optimizer(model, tcfg.lr, tcfg.weight_decay)
    steps_per_epoch = tcfg.steps_per_epoch(len(train_x))
    total_steps = tcfg.epochs * steps_per_epoch
    warmup = max(1, round(tcfg.warmup_fraction * total_steps))
    attn = model.attention_parameters()
    dense_attn = models.dense_attention_parameters(mcfg)
    name = f"[{variant} seed {seed}]"

    history, done, train_time, wall_before = [], 0, 0.0, 0.0
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint)
        if checkpoint_matches(state, variant, seed, mcfg, tcfg):
            model.load_state_dict(state["model"])  # copies into the existing storage
            opt.load_state_dict(state["optimizer"])
            history, done = state["history"], state["epoch"]
            train_time, wall_before = state["train_seconds"], state["wall_seconds"]
            log(f"{name} resumed after epoch {done} from {os.path.basename(checkpoint)}")
        else:
            log(f"{name} ignoring {os.path.basename(checkpoint)}: another configuration")
    if done == 0:
        log(f"{name} attention parameters {attn:,} (dense {dense_attn:,}, "
            f"{100 * (1 - attn / dense_attn):.1f}% fewer), total {model.total_parameters():,}")
        acc, loss = evaluate(model, test_x, test_y)
        history.append({"epoch": 0, "train_loss": None, "train_accuracy": None,
                        "test_accuracy": acc, "test_loss": loss})

    start = time.time()
    for epoch in range(done + 1, tcfg.epochs + 1):
        order = epoch_order(len(train_x), seed, epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + i + 1
            lr = models.learning_rate(step, total_steps, tcfg.lr, warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i * tcfg.batch_size:(i + 1) * tcfg.batch_size]
            x, y = train_x[idx], train_y[idx]
            t0 = time.time()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            train_time += time.time() - t0
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"{variant} seed {seed}: loss is {loss.item()} at step {step}")
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
            if (i + 1) % 100 == 0:
                log(f"{name} epoch {epoch} step {i + 1}/{steps_per_epoch} loss "
                    f"{loss_sum / seen:.4f} lr {lr:.2e} {step * tcfg.batch_size / train_time:,.0f} img/s")
        acc, test_loss = evaluate(model, test_x, test_y)
        history.append({"epoch": epoch, "train_loss": loss_sum / seen,
                        "train_accuracy": correct / seen, "test_accuracy": acc,
                        "test_loss": test_loss})
        log(f"{name} epoch {epoch}/{tcfg.epochs}: train loss {loss_sum / seen:.4f}, "
            f"test accuracy {100 * acc:.2f}% (loss {test_loss:.4f}), "
            f"{fmt_time(wall_before + time.time() - start)} so far")
        if checkpoint:
            state = {"format": CHECKPOINT_FORMAT, "variant": variant, "seed": seed,
                     "model_config": mcfg.dict(), "train_config": tcfg.dict(),
                     "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "history": history, "epoch": epoch, "train_seconds": train_time,
                     "wall_seconds": wall_before + time.time() - start}
            atomic_write(checkpoint, lambda f: torch.save(state, f))
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < tcfg.epochs:
            return None

    final = history[-1]
    images = tcfg.epochs * len(train_x)
    record = {
        "variant": variant,
        "seed": seed,
        "model_config": mcfg.dict(),
        "train_config": tcfg.dict(),
        "attention_parameters": attn,
        "dense_attention_parameters": dense_attn,
        "attention_parameter_reduction": 1 - attn / dense_attn,
        "total_parameters": model.total_parameters(),
        "train_images": len(train_x),
        "test_images": len(test_x),
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "train_images_per_s": images / train_time if train_time else None,
        "wall_seconds": wall_before + time.time() - start,
        "history": history,
    }
    if variant == "masa-qkvo":
        record["coefficients"] = {p: model.shared.coefficients[p].detach().tolist()
                                  for p in model.shared.projections}
    log(f"{name} done in {fmt_time(record['wall_seconds'])}: test accuracy "
        f"{100 * record['test_accuracy']:.2f}%")
    return record


def write_table(records, variants, path, mcfg, tcfg, command, cpu):
    seeds = sorted({r["seed"] for r in records})
    by_variant = {v: sorted((r for r in records if r["variant"] == v), key=lambda r: r["seed"])
                  for v in variants}
    dense_acc = None
    if by_variant.get("dense"):
        dense_acc = statistics.fmean(r["test_accuracy"] for r in by_variant["dense"])
    multi = len(seeds) > 1
    n_train = records[0]["train_images"] if records else 60000
    n_test = records[0]["test_images"] if records else 10000
    lines = [
        "# ViT on Fashion-MNIST: dense attention against MASA-QKVO",
        "",
        f"Command: `{command}`",
        "",
        f"Model: ViT, {mcfg.patch}x{mcfg.patch} patches ({mcfg.n_patches} tokens + class token), "
        f"{mcfg.n_layers} layers, d_model {mcfg.d_model}, {mcfg.n_heads} heads, MLP "
        f"{mcfg.mlp_ratio}x (GELU), pre-norm, learned position embedding, non-causal "
        f"attention in libmasa; MASA-QKVO: S = {mcfg.n_atoms} atoms per dictionary "
        f"(L/3), cyclic table + noise {mcfg.coefficient_noise}.",
        f"Training: {tcfg.epochs} epochs over {n_train:,} images, batch {tcfg.batch_size}, "
        f"AdamW lr {tcfg.lr} (warmup {tcfg.warmup_fraction:.0%} of the steps, cosine to 1%), "
        f"weight decay {tcfg.weight_decay} on matrices, gradient clip {tcfg.grad_clip}, no "
        f"augmentation; {tcfg.threads} torch + {tcfg.threads} libmasa thread(s) on {cpu}.",
        f"Test accuracy on the {n_test:,} test images after the last epoch. Seeds: "
        f"{', '.join(map(str, seeds))}" + (" (mean ± sample standard deviation, then each "
                                           "seed)" if multi else "") + ".",
        f"Wall time: {fmt_time(sum(r['wall_seconds'] for r in records))} (sum over the "
        f"{len(records)} runs, evaluation included).",
        "",
        "| variant | attention params | fewer than dense | total params | test accuracy (%) "
        "| per seed | vs dense (points) | train images/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        rs = by_variant[v]
        if not rs:
            continue
        r0 = rs[0]
        acc = mean_spread([100 * r["test_accuracy"] for r in rs])
        speed = statistics.median(r["train_images_per_s"] for r in rs)
        acc_text = f"{acc[0]:.2f} ± {acc[1]:.2f}" if len(rs) > 1 else f"{acc[0]:.2f}"
        per_seed = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in rs)
        delta = "" if dense_acc is None else f"{acc[0] - 100 * dense_acc:+.2f}"
        partial = "" if len(rs) == len(seeds) else f" ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
        lines.append(
            f"| {v}{partial} | {r0['attention_parameters']:,} | "
            f"{100 * r0['attention_parameter_reduction']:.1f}% | {r0['total_parameters']:,} | "
            f"{acc_text} | {per_seed} | {delta} | {speed:,.0f} |")
    lines += [
        "",
        "Attention parameters are the trainable tensors of the Q, K, V and O projections "
        "(dense: 4 L d^2; MASA-QKVO: 4 (S d^2 + L S), atoms and tables counted once). "
        "Images/s is training throughput (wall clock, evaluation excluded, median over seeds) "
        "on a machine shared with other work: not a speed comparison.",
        "",
        "![training curves](curves.png)",
        "",
    ]
    atomic_write(path, lambda f: f.write("\n".join(lines).encode("utf-8")))


def write_plot(records, variants, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    for v in variants:
        rs = [r for r in records if r["variant"] == v]
        if not rs:
            continue
        epochs = [h["epoch"] for h in rs[0]["history"]]
        acc = [[100 * r["history"][i]["test_accuracy"] for r in rs] for i in range(len(epochs))]
        line, = ax_acc.plot(epochs[1:], [statistics.fmean(a) for a in acc[1:]], marker="o",
                            label=f"{v} test (n={len(rs)})")
        train = [[100 * r["history"][i]["train_accuracy"] for r in rs] for i in range(1, len(epochs))]
        ax_acc.plot(epochs[1:], [statistics.fmean(a) for a in train], ls="--",
                    color=line.get_color(), label=f"{v} train (running)")
        loss = [[r["history"][i]["train_loss"] for r in rs] for i in range(1, len(epochs))]
        test_loss = [[r["history"][i]["test_loss"] for r in rs] for i in range(1, len(epochs))]
        ax_loss.plot(epochs[1:], [statistics.fmean(a) for a in loss], ls="--",
                     color=line.get_color(), label=f"{v} train")
        ax_loss.plot(epochs[1:], [statistics.fmean(a) for a in test_loss], marker="o",
                     color=line.get_color(), label=f"{v} test")
        if len(rs) > 1:
            ax_acc.fill_between(epochs[1:], [min(a) for a in acc[1:]], [max(a) for a in acc[1:]],
                                color=line.get_color(), alpha=0.2)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy (band: min-max over seeds)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(models.VARIANTS),
                    help="comma-separated subset of: " + ", ".join(models.VARIANTS))
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--epochs", type=int, help="training epochs per run")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--layers", type=int, help="layers (a multiple of 3: S = layers / 3)")
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--patch", type=int, help="patch side (divides 28)")
    ap.add_argument("--train-images", type=int, help="train on the first n images only")
    ap.add_argument("--test-images", type=int, help="test on the first n images only")
    ap.add_argument("--data-dir", default=data.FASHION_MNIST_DIR)
    ap.add_argument("--out", help="results directory (default results/vit)")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that have a JSON")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write table.md and curves.png from the runs' JSONs")
    ap.add_argument("--threads", type=int, default=1, help="torch and libmasa threads")
    ap.add_argument("--cpu", default="Intel AVX-512 (BLIS skx)",
                    help="the CPU named in the table")
    args = ap.parse_args(argv)

    variants = args.variants.split(",")
    for v in variants:
        if v not in models.VARIANTS:
            ap.error(f"unknown variant {v!r}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.layers is not None and (args.layers < 3 or args.layers % 3):
        ap.error("--layers must be a positive multiple of 3")
    if args.patch is not None and (args.patch < 1 or 28 % args.patch):
        ap.error("--patch must divide 28")
    mcfg = models.ViTConfig(**{k: v for k, v in (
        ("n_layers", args.layers), ("n_atoms", args.layers and args.layers // 3),
        ("d_model", args.d_model), ("n_heads", args.heads), ("patch", args.patch)) if v})
    tcfg = TrainConfig(threads=args.threads, train_images=args.train_images,
                       test_images=args.test_images, **{k: v for k, v in (
                           ("epochs", args.epochs), ("batch_size", args.batch_size),
                           ("lr", args.lr)) if v})
    out = args.out or os.path.join(REPO, "results", "vit")
    for sub in ("runs", "checkpoints"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    log = Log(os.path.join(out, "log.txt"))
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python3 examples/python/vit.py"] +
                       [a for a in argv if a not in ("--report-only", "--fresh")])

    torch.set_num_threads(tcfg.threads)
    context = masa.Context(n_threads=tcfg.threads)
    log(f"== {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {command}")
    log(f"libmasa {masa.version()}, BLIS kernels {masa.blis_arch()}, torch {torch.__version__}, "
        f"{tcfg.threads} thread(s), CPU: {args.cpu}")

    records, todo = [], []
    for s in seeds:  # seed-major: both variants early
        for v in variants:
            path = os.path.join(out, "runs", f"{v}-seed{s}.json")
            if (args.report_only or not args.fresh) and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    r = json.load(f)
                if r.get("model_config") == mcfg.dict() and r.get("train_config") == tcfg.dict():
                    log(f"[{v} seed {s}] kept from runs/{os.path.basename(path)}: test accuracy "
                        f"{100 * r['test_accuracy']:.2f}%")
                    records.append(r)
                    continue
            if not args.report_only:
                todo.append((v, s, path))

    def report():
        if records:
            write_table(records, variants, os.path.join(out, "table.md"), mcfg, tcfg, command,
                        args.cpu)
            write_plot(records, variants, os.path.join(out, "curves.png"),
                       f"ViT on Fashion-MNIST, {mcfg.n_layers} layers, d {mcfg.d_model}: "
                       "dense vs MASA-QKVO (S = L/3)")

    dataset = load_data(tcfg, args.data_dir) if todo else None
    start = time.time()
    for v, s, path in todo:
        ckpt = os.path.join(out, "checkpoints", f"{v}-seed{s}.pt")
        if args.fresh and os.path.exists(ckpt):
            os.unlink(ckpt)
        r = train_run(v, s, mcfg, tcfg, dataset, context, log, checkpoint=ckpt)
        write_json(path, r)
        os.unlink(ckpt)
        records.append(r)
        report()  # after every run, so an interrupted invocation leaves its results
    report()
    log(f"== trained {len(todo)} run(s) in {fmt_time(time.time() - start)}; results in {out}")
    finish(log, context, os.path.join(out, "table.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
