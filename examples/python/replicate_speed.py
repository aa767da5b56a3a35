#!/usr/bin/env python3
"""Training throughput of replicate.py's loop, before and after issue 18's
changes, measured in one invocation and written to a Markdown file.

Each configuration trains replicate.py's default model (12 layers, d_model
128, batch 8 x 128 bytes) in a fresh interpreter: a few warm-up steps, then
--steps timed steps of replicate.train_step (tokens/s), then the same number
of steps with timers around libmasa's attention forward and backward, the
rest of torch's forward and backward, gradient clipping + AdamW, and
Python's garbage collector (the per-step breakdown). Configurations run in
turn, --rounds times, so a load that changes over time hits them alike;
the table gives medians.

    python3 examples/python/replicate_speed.py            # writes results/replicate/scale/speed.md

Configurations (interpreter, loop, torch + libmasa threads):
  before      Debian's python3 (torch 1.13, OpenBLAS), the loop as it was
              (garbage collector on, for-each AdamW), 1 torch + 1 libmasa thread
  debian-new  Debian's python3, the loop now (GC frozen; fused AdamW needs
              torch >= 2.4, so not here), 1 + 1 threads
  venv-1      the venv's python (torch 2.x, MKL), the loop now, 1 + 1 threads
  venv-2      the venv's python, the loop now, 2 + 2 threads
  venv-1+2    the venv's python, the loop now, 1 torch + 2 libmasa threads (torch's
              idle OpenMP threads poll for work, and took the core libmasa's
              second thread needed)
  venv-1x2    two venv-1 processes side by side (as replicate_scale.py --jobs 2
              trains): tokens/s of both together, timed steps started at once
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
REPO = os.path.dirname(os.path.dirname(HERE))
DEBIAN_PYTHON = "/usr/bin/python3"
VENV_PYTHON = os.path.expanduser(os.environ.get("MASA_VENV", "~/.cache/libmasa/venv")) + "/bin/python"
CONFIGS = {  # name: (interpreter, new loop, (torch, libmasa) threads, processes side by side)
    "before": (DEBIAN_PYTHON, False, (1, 1), 1),
    "debian-new": (DEBIAN_PYTHON, True, (1, 1), 1),
    "venv-1": (VENV_PYTHON, True, (1, 1), 1),
    "venv-2": (VENV_PYTHON, True, (2, 2), 1),
    "venv-1+2": (VENV_PYTHON, True, (1, 2), 1),
    "venv-1x2": (VENV_PYTHON, True, (1, 1), 2),
}
PARTS = ("masa_forward", "masa_backward", "torch_forward", "torch_backward", "optimizer", "gc",
         "other")


def child(variant, new_loop, threads, steps, warmup, sync=False):
    """Measures one configuration in this interpreter; prints a JSON line."""
    import contextlib
    import gc

    import replicate  # first: puts bindings/python on the path in a source checkout

    import torch
    import torch.nn.functional as F

    import masa
    import masa.torch as mt
    import replicate_data as data
    import replicate_models as models

    torch.set_num_threads(threads[0])
    ctx = masa.Context(n_threads=threads[1])
    tcfg = replicate.TrainConfig()
    mcfg = models.ModelConfig()
    torch.manual_seed(0)
    model = models.ByteLM(variant, mcfg, ctx)
    opt = models.optimizer(model, tcfg.lr, tcfg.weight_decay, fused=new_loop)
    batches = data.Batches(data.load_splits()[0], tcfg.batch_size, mcfg.context, seed=1000)
    tokens = tcfg.batch_size * mcfg.context

    # libmasa's share: timers around the autograd function's forward and backward
    spent = dict.fromkeys(PARTS, 0.0)
    fn = mt._MasaAttentionFunction
    plain_forward, plain_backward = fn.forward, fn.backward

    def timed(part, f):
        def run(*args):
            t = time.perf_counter()
            try:
                return f(*args)
            finally:
                spent[part] += time.perf_counter() - t
        return run

    gc_start = []

    def gc_timer(phase, info):
        if phase == "start":
            gc_start.append(time.perf_counter())
        elif gc_start:
            spent["gc"] += time.perf_counter() - gc_start.pop()

    with (replicate.frozen_gc() if new_loop else contextlib.nullcontext()):
        for _ in range(warmup):
            x, y = batches.next()
            replicate.train_step(model, opt, x, y, tcfg.lr, tcfg.grad_clip)
        if sync:  # the parent starts the side-by-side processes' timed steps at once
            print("ready", flush=True)
            sys.stdin.readline()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            x, y = batches.next()
            replicate.train_step(model, opt, x, y, tcfg.lr, tcfg.grad_clip)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start

        fn.forward = staticmethod(timed("masa_forward", plain_forward))
        fn.backward = staticmethod(timed("masa_backward", plain_backward))
        gc.callbacks.append(gc_timer)
        whole = 0.0
        for _ in range(steps):  # the same step, cut into its parts
            t0 = time.perf_counter()
            x, y = batches.next()
            t1 = time.perf_counter()
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            loss.item()
            t4 = time.perf_counter()
            spent["torch_forward"] += t2 - t1
            spent["torch_backward"] += t3 - t2
            spent["optimizer"] += t4 - t3
            spent["other"] += t1 - t0
            whole += t4 - t0
        gc.callbacks.remove(gc_timer)
    # the phases include libmasa's calls (and collections inside them): take them out
    spent["torch_forward"] -= spent["masa_forward"]
    spent["torch_backward"] -= spent["masa_backward"]
    print(json.dumps({"tokens_per_s": steps * tokens / wall, "tokens_per_cpu_s": steps * tokens / cpu,
                      "torch": torch.__version__,
                      "breakdown_ms": {k: 1e3 * v / steps for k, v in spent.items()},
                      "step_ms": 1e3 * whole / steps}))
    ctx.close()


def run_child(name, variant, steps, warmup):
    """One configuration's measurement; side-by-side processes are summed:
    tokens/s of both, tokens per CPU-second of both, the mean breakdown."""
    python, new_loop, threads, processes = CONFIGS[name]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads[0]))
    cmd = [python, os.path.abspath(__file__), "--child", name, "--variant", variant,
           "--steps", str(steps), "--warmup", str(warmup)] + (["--sync"] if processes > 1 else [])
    procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    if processes > 1:
        for p in procs:  # every one warmed up, then all go
            if p.stdout.readline().strip() != "ready":
                break
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"configuration {name} failed:\n{err}")
    rs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    if processes == 1:
        return rs[0]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in rs),
            "tokens_per_cpu_s": len(rs) / sum(1 / r["tokens_per_cpu_s"] for r in rs),
            "torch": rs[0]["torch"],
            "breakdown_ms": {k: statistics.mean(r["breakdown_ms"][k] for r in rs) for k in PARTS},
            "step_ms": statistics.mean(r["step_ms"] for r in rs)}


def write_report(path, results, args, seconds):
    import replicate  # noqa: F401  (bindings/python on the path)
    from replaceme_table import cpu_kind

    import masa

    load = os.getloadavg()
    def median(name, key):
        return statistics.median(r[key] for r in results[name]) if name in results else None

    before, before_cpu = median("before", "tokens_per_s"), median("before", "tokens_per_cpu_s")
    lines = [
        "# Training throughput of replicate.py's loop",
        "",
        "Command: `" + " ".join(["python3 examples/python/replicate_speed.py"] + args.argv) + "`",
        "",
        f"CPU: {cpu_kind()} ({os.cpu_count()} logical CPUs); libmasa {masa.version()}. "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {fmt(seconds)} in all; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1 / 5 / 15 min: above 0.5 per CPU the machine was not idle and the figures are noisy).",
        f"Model: {args.variant}, replicate.py's default (12 layers, d_model 128, batch 8 x 128 "
        f"bytes). Per configuration and round: {args.warmup} warm-up steps, {args.steps} timed "
        f"steps; {args.rounds} round(s), configurations in turn; medians over rounds.",
        "",
        "Tokens/s is wall-clock throughput, what a run's length depends on. Tokens per "
        "CPU-second (the process's CPU time) is what the steps cost; on a loaded machine it "
        "moves far less than wall-clock throughput, but with 2 threads it also counts time "
        "threads spend waiting for each other.",
        "",
        "| configuration | torch | threads (torch + libmasa) | tokens/s (median) | each round "
        "| vs before | tokens per CPU-s (median) | vs before |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, rs in results.items():
        tps = [r["tokens_per_s"] for r in rs]
        med, cpu = statistics.median(tps), median(name, "tokens_per_cpu_s")
        ratio = f"{med / before:.2f}x" if before else ""
        cpu_ratio = f"{cpu / before_cpu:.2f}x" if before_cpu else ""
        threads, processes = CONFIGS[name][2:]
        side = f" ({processes} processes)" if processes > 1 else ""
        lines.append(f"| {name} | {rs[0]['torch']} | {threads[0]} + {threads[1]}{side} | "
                     f"{med:,.0f} | {', '.join(f'{t:,.0f}' for t in tps)} | {ratio} | {cpu:,.0f} | "
                     f"{cpu_ratio} |")
    lines += [
        "",
        "Where a step's time goes (ms per step, medians over rounds; libmasa = the attention "
        "autograd function's forward or backward, its Python wrapper included; torch = the "
        "rest of the forward or backward: embedding, LayerNorms, MLPs, output layer, loss; "
        "optimizer = gradient clipping + AdamW; gc = Python's garbage collector, wherever it "
        "ran; other = drawing the batch):",
        "",
        "| configuration | step | " + " | ".join(PARTS) + " |",
        "|---|---:|" + "---:|" * len(PARTS),
    ]
    for name, rs in results.items():
        med = {k: statistics.median(r["breakdown_ms"][k] for r in rs) for k in PARTS}
        step = statistics.median(r["step_ms"] for r in rs)
        lines.append(f"| {name} | {step:.0f} | " + " | ".join(f"{med[k]:.0f}" for k in PARTS) + " |")
    lines.append("")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fmt(seconds):
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    ap.add_argument("--variant", default="masa-qkvo")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "results", "replicate", "scale", "speed.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        python, new_loop, threads, _ = CONFIGS[args.child]
        child(args.variant, new_loop, threads, args.steps, args.warmup, args.sync)
        return 0
    args.argv = sys.argv[1:] if argv is None else argv
    names = args.configs.split(",")
    for name in names:
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}")
    results = {name: [] for name in names}
    start = time.time()
    for round_ in range(args.rounds):
        for name in names:
            r = run_child(name, args.variant, args.steps, args.warmup)
            results[name].append(r)
            print(f"round {round_ + 1}/{args.rounds} {name}: {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['tokens_per_cpu_s']:,.0f} tokens per CPU-s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_report(args.out, results, args, time.time() - start)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
