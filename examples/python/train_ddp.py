#!/usr/bin/env python3
"""Data-parallel training of a small MASA transformer with torch.distributed.

    torchrun --nproc-per-node 2 examples/python/train_ddp.py [--steps 200] [--accum 2]

Every rank (process) builds the model of train_small.py (causal RoPE layers
sharing, per projection, a dictionary of atoms and a learned coefficient
table through masa.torch.SharedAtoms) from the same seed and wraps it in
DistributedDataParallel on the gloo backend (CPU). DistributedSampler hands
each rank a disjoint share of a fixed dataset, reshuffled every epoch. Each
optimizer step accumulates the gradients of --accum micro-batches: the first
--accum - 1 backward passes run under no_sync() (local accumulation only),
the last one averages the gradients across ranks, so every rank applies the
same update and holds the same parameters, which equal those of one process
trained on the concatenated batches (bindings/python/tests_venv/test_ddp.py
checks both). libmasa needs nothing special: its backward returns ordinary
gradient tensors that DDP's hooks all-reduce.

Threads: each rank has its own libmasa context (worker pool) and its own
torch intra-op threads. With several ranks on one machine, give each rank
cores / ranks threads (the default here, from torchrun's LOCAL_WORLD_SIZE)
so that ranks x threads <= cores; libmasa's default context takes every CPU
in every rank.
"""

import argparse
import contextlib
import itertools
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # train_small
try:
    import masa  # noqa: F401
except ImportError:  # source checkout: use bindings/python
    sys.path.insert(0, os.path.join(HERE, "..", "..", "bindings", "python"))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import masa
from train_small import TinyMasaLM, batch, next_token_loss


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=16, help="sequences per micro-batch per rank")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--samples", type=int, default=2048, help="sequences in the dataset")
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--atoms", type=int, default=2)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="libmasa threads per rank; 0 = usable CPUs / ranks on this machine")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch intra-op threads per rank; 0 = as --threads")
    ap.add_argument("--record", metavar="DIR",
                    help="write DIR/rank<r>.pt: the parameters after every step and the "
                         "dataset indices each step used (for the tests)")
    return ap.parse_args(argv)


def threads_per_rank(local_ranks):
    """Usable CPUs shared evenly by the ranks on this machine (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(1, local_ranks))


def make_dataset(args):
    """(index, input, target) for args.samples sequences of the toy task."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    x, y = batch(args.vocab, args.samples, args.seq, gen)
    return TensorDataset(torch.arange(args.samples), x, y)


def make_model(args, context):
    torch.manual_seed(args.seed)  # the same initial parameters in every rank
    return TinyMasaLM(args.vocab, d_model=args.d_model, n_heads=args.heads,
                      n_layers=args.layers, n_atoms=args.atoms, context=context)


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


def step_batches(dataset, rank, world, args):
    """Yields, for each of args.steps optimizer steps, this rank's list of
    args.accum micro-batches (index, x, y), epoch after epoch."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, drop_last=True)
    done = 0
    for epoch in itertools.count():
        sampler.set_epoch(epoch)  # a new shuffle, the same on every rank
        micro = iter(loader)
        while done < args.steps:
            group = list(itertools.islice(micro, args.accum))
            if len(group) < args.accum:
                break  # the epoch's remainder is too short for a whole step
            yield group
            done += 1
        if done == args.steps:
            return
        if epoch == 0 and done == 0:
            raise ValueError("the dataset is too small for one step of accum x batch x ranks")


def flat_parameters(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def save_atomically(obj, path):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    args = parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = args.threads or threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(args.torch_threads or threads)
    context = masa.Context(n_threads=threads)

    model = make_model(args, context)
    ddp = DistributedDataParallel(model)  # also broadcasts rank 0's parameters
    opt = make_optimizer(args, model)
    dataset = make_dataset(args)
    if rank == 0:
        print(f"{world} ranks x {threads} libmasa threads ({torch.get_num_threads()} torch), "
              f"{args.accum} micro-batches of "
              f"{args.batch} per rank per step ({world * args.accum * args.batch} sequences)")

    record = {"initial": flat_parameters(model), "steps": [], "indices": []}
    start, first, last = time.time(), None, None
    for step, group in enumerate(step_batches(dataset, rank, world, args), 1):
        total = 0.0
        for i, (_, x, y) in enumerate(group):
            # Only the last micro-batch's backward all-reduces the gradients.
            sync = i == len(group) - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss = next_token_loss(ddp, x, y) / len(group)
                loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        mean = torch.tensor([total])
        dist.all_reduce(mean)
        mean = mean.item() / world
        first = mean if first is None else first
        last = mean
        if args.record:
            record["steps"].append(flat_parameters(model))
            record["indices"].append(torch.cat([idx for idx, _, _ in group]))
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == 1):
            print(f"step {step:4d}  loss {mean:.4f}")
    if args.record:
        save_atomically(record, os.path.join(args.record, f"rank{rank}.pt"))
    if rank == 0:
        print(f"loss {first:.3f} -> {last:.3f} (chance {math.log(args.vocab):.3f}) in "
              f"{time.time() - start:.1f}s, {(time.time() - start) / args.steps * 1e3:.0f} ms/step")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
