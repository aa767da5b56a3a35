"""examples/python/train_ddp.py under torchrun: 2 ranks (gloo, CPU) train a
small MASA model with DistributedDataParallel, DistributedSampler and
gradient accumulation under no_sync(). Checks that the ranks hold identical
parameters after every step and that these equal the parameters of one
process trained on the concatenated batches."""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
EXAMPLES = os.path.join(REPO, "examples", "python")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

# Small enough for a few seconds of training: 2 ranks x 2 micro-batches x 4
# sequences per step; 32 sequences make 2 steps per epoch, so 4 steps cross
# an epoch boundary (the sampler's reshuffle).
ARGS = ["--steps", "4", "--batch", "4", "--accum", "2", "--samples", "32",
        "--d-model", "32", "--heads", "2", "--layers", "4", "--atoms", "2",
        "--optimizer", "sgd", "--lr", "0.1", "--threads", "1"]
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The record of each rank after running the example under torchrun."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(WORLD), os.path.join(EXAMPLES, "train_ddp.py"),
           *ARGS, "--record", str(out)]
    # The checkout's package (not one installed in the venv); every rank on
    # this machine, so gloo talks over the loopback interface.
    pkg = os.path.join(REPO, "bindings", "python")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [pkg, os.environ.get("PYTHONPATH")])))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def reference(indices_per_step, sample_filter=None):
    """Parameters after each step of one process that trains the same model
    on each step's concatenated batches (its full global batch at once)."""
    import masa
    import train_ddp
    from train_small import next_token_loss

    args = train_ddp.parse_args(ARGS)
    data = train_ddp.make_dataset(args)
    with masa.Context(n_threads=1) as ctx:
        model = train_ddp.make_model(args, ctx)
        opt = train_ddp.make_optimizer(args, model)
        initial, steps = train_ddp.flat_parameters(model), []
        for idx in indices_per_step:
            if sample_filter is not None:
                idx = sample_filter(idx)
            _, x, y = data[idx]
            next_token_loss(model, x, y).backward()
            opt.step()
            opt.zero_grad()
            steps.append(train_ddp.flat_parameters(model))
        del model, opt
    return initial, steps


def test_ranks_identical_after_every_step(ranks):
    assert len(ranks[0]["steps"]) == 4
    assert torch.equal(ranks[0]["initial"], ranks[1]["initial"])
    for k, (a, b) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        # Both ranks apply the same all-reduced gradient to the same
        # parameters: bit for bit the same result.
        assert torch.equal(a, b), f"ranks differ after step {k + 1}"
        assert not torch.equal(a, ranks[0]["initial"]), "training did not move the parameters"


def test_sampler_splits_each_step_disjointly(ranks):
    for k, (a, b) in enumerate(zip(ranks[0]["indices"], ranks[1]["indices"])):
        assert len(a) == len(b) == 2 * 4
        assert len(set(a.tolist()) | set(b.tolist())) == 16, f"ranks share samples at step {k + 1}"
    # each epoch (2 steps) covers the 32 samples once
    for epoch in range(2):
        seen = torch.cat([ranks[r]["indices"][k] for r in range(WORLD)
                          for k in (2 * epoch, 2 * epoch + 1)])
        assert sorted(seen.tolist()) == list(range(32))


def test_equals_one_process_on_concatenated_batches(ranks):
    per_step = [torch.cat([ranks[r]["indices"][k] for r in range(WORLD)])
                for k in range(len(ranks[0]["steps"]))]
    initial, ref = reference(per_step)
    assert torch.equal(initial, ranks[0]["initial"])
    eps = torch.finfo(torch.float32).eps
    worst = 0.0
    for k, (got, want) in enumerate(zip(ranks[0]["steps"], ref)):
        # Training moved the parameters by |want - initial|; the two runs
        # differ only in float32 rounding (the order in which per-rank and
        # per-micro-batch gradient sums are added), a relative error of a few
        # eps in each update. 1e-4 of the largest movement is ~1000 eps of
        # it: far above rounding, far below any real mistake (a lost rank or
        # a missing 1/accum scale changes the updates by ~50%).
        moved = (want - initial).abs().max().item()
        diff = (got - want).abs().max().item()
        worst = max(worst, diff / moved)
        assert diff <= 1e-4 * moved, f"step {k + 1}: {diff:.3g} vs movement {moved:.3g}"
        # and relative to the parameters themselves
        assert diff <= 64 * eps * want.abs().max().item()
    print(f"largest difference / movement: {worst:.2e}")


def test_tolerance_catches_a_lost_rank(ranks):
    """The check above would fail if one rank's samples were dropped from the
    average: the tolerance separates real mistakes from rounding."""
    per_step = [torch.cat([ranks[r]["indices"][k] for r in range(WORLD)])
                for k in range(len(ranks[0]["steps"]))]
    initial, ref = reference(per_step, sample_filter=lambda idx: idx[: len(idx) // 2])
    got, want = ranks[0]["steps"][-1], ref[-1]
    moved = (want - initial).abs().max().item()
    assert (got - want).abs().max().item() > 1e-2 * moved
