"""masa-mlp of the replication (examples/python/replicate_models.py) and the
resumable training loop (examples/python/replicate.py, replicate_scale.py):
the coefficient MLPs' gradients, which reach them through the dL/dc libmasa
returns, against central finite differences of a float64 torch model; the
collapse to a table leaving outputs bit-identical; a run interrupted and
resumed from its checkpoint equal to one run straight through."""

import copy
import json
import math
import os
import sys

import pytest

try:
    import torch
except ImportError:  # fallback only: torch is installed where these tests run
    torch = pytest.importorskip("torch")
import torch.nn.functional as F

import masa
from test_torch import attention_ref

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(REPO, "examples", "python"))

import replicate  # noqa: E402
import replicate_data  # noqa: E402
import replicate_models as models  # noqa: E402
import replicate_scale  # noqa: E402

TINY = models.ModelConfig(n_layers=3, d_model=16, n_heads=2, context=8, n_atoms=2,
                          coefficient_embed=4, coefficient_hidden=6)


@pytest.fixture(scope="module")
def context():
    ctx = masa.Context(n_threads=1)
    yield ctx
    ctx.close()


def tiny_mlp_model(context, seed=0):
    torch.manual_seed(seed)
    return models.ByteLM("masa-mlp", TINY, context)


def tokens(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, TINY.context + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def reference_loss(ref, x, y):
    """The loss of a float64 copy of a masa-mlp ByteLM, attention in plain
    torch ops (tests/test_torch.py's attention_ref) on W_l = sum_s c_ls D_s
    with c = the coefficient MLPs' prediction."""
    tables = {p: mlp.out(torch.tanh(mlp.hidden(mlp.embeddings)))
              for p, mlp in ref.coefficients_mlp.items()}
    h = ref.embed(x)
    for i, block in enumerate(ref.blocks):
        a = block.norm1(h)
        W = {p: torch.einsum("s,sij->ij", tables[p][i], ref.shared.atoms[p]) for p in "qkvo"}
        att = block.attn
        h = h + attention_ref(a, W, {}, att.n_heads, att.n_kv_heads, att.head_dim, causal=True,
                              rope=True, theta=att.rope_theta, scale=att.softmax_scale)
        h = h + block.mlp(block.norm2(h))
    logits = ref.head(ref.norm(h))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_reference_matches_the_libmasa_model(context):
    """The float64 reference computes the model's loss (else the finite
    differences below would check something else)."""
    model = tiny_mlp_model(context)
    ref = copy.deepcopy(model).double()
    x, y = tokens(1)
    with torch.no_grad():
        got = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item()
        want = reference_loss(ref, x, y).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_coefficient_mlp_gradients_match_finite_differences(context):
    model = tiny_mlp_model(context)
    with torch.no_grad():  # away from the exact initial fit, so every entry matters
        for p in model.coefficients_mlp.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ref = copy.deepcopy(model).double()
    x, y = tokens(2)
    loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
    loss.backward()

    ref_params = dict(ref.coefficients_mlp.named_parameters())
    eps = 1e-6
    checked = 0
    for name, p in model.coefficients_mlp.named_parameters():
        got = p.grad
        assert got is not None and got.shape == p.shape, name
        rp = ref_params[name]
        fd = torch.zeros_like(rp)
        with torch.no_grad():
            for i in range(rp.numel()):
                flat = rp.view(-1)
                keep = flat[i].item()
                flat[i] = keep + eps
                up = reference_loss(ref, x, y).item()
                flat[i] = keep - eps
                down = reference_loss(ref, x, y).item()
                flat[i] = keep
                fd.view(-1)[i] = (up - down) / (2 * eps)
        scale = fd.abs().max().item()
        assert scale > 1e-6, f"{name}: gradient too small to test ({scale})"
        # float32 model against float64 differences, relative to the tensor's largest entry
        # (measured: about 1e-6; float32 sums over 2 x 8 tokens and 3 layers)
        err = (got.double() - fd).abs().max().item() / scale
        assert err < 1e-4, f"{name}: max error {err:.2e} of max |grad| {scale:.2e}"
        checked += rp.numel()
    n_mlp = sum(p.numel() for p in model.coefficients_mlp.parameters())
    assert checked == n_mlp == 4 * (3 * 4 + 4 * 6 + 6 + 6 * 2 + 2)
    # the atoms still get libmasa's gradient as in masa-qkvo
    assert all(model.shared.atoms[p].grad.abs().max() > 0 for p in "qkvo")


def test_initial_prediction_is_masa_qkvo_table(context):
    """Same seed: masa-mlp starts from masa-qkvo's table and tensors."""
    mlp = tiny_mlp_model(context, seed=3)
    torch.manual_seed(3)
    qkvo = models.ByteLM("masa-qkvo", TINY, context)
    for p in "qkvo":
        torch.testing.assert_close(mlp.coefficients_mlp[p]().detach(),
                                   qkvo.shared.coefficients[p].detach(), rtol=0, atol=1e-5)
        assert torch.equal(mlp.shared.atoms[p], qkvo.shared.atoms[p])
    assert torch.equal(mlp.head.weight, qkvo.head.weight)


def test_collapse_gives_identical_outputs_and_inference_size(context):
    model = tiny_mlp_model(context)
    opt = models.optimizer(model, 1e-2, 0.1)
    for step in range(3):  # a few updates, so the prediction is the MLPs' own
        x, y = tokens(10 + step)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, _ = tokens(20, batch=3)
    model.eval()
    with torch.no_grad():
        before = model(x)
        tables = {p: mlp().clone() for p, mlp in model.coefficients_mlp.items()}
    n_train = model.training_attention_parameters()
    n_infer = model.attention_parameters()
    total = model.total_parameters()
    model.collapse()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    for p in "qkvo":
        assert isinstance(model.shared.coefficients[p], torch.nn.Parameter)
        assert torch.equal(model.shared.coefficients[p].detach(), tables[p])
    L, S, d = TINY.n_layers, TINY.n_atoms, TINY.d_model
    assert n_infer == model.attention_parameters() == model.training_attention_parameters() \
        == 4 * (S * d * d + L * S)
    assert n_train == n_infer - 4 * L * S + 4 * (3 * 4 + 4 * 6 + 6 + 6 * 2 + 2)
    assert model.total_parameters() == total
    assert not any(k.startswith("coefficients_mlp") for k in model.state_dict())
    with pytest.raises(ValueError, match="only masa-mlp"):
        model.collapse()


def test_optimizer_keeps_weight_decay_off_the_coefficient_mlps(context):
    model = tiny_mlp_model(context)
    opt = models.optimizer(model, 1e-3, 0.1)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(p) in no_decay for p in model.coefficients_mlp.parameters())
    assert all(id(p) not in no_decay for p in model.shared.atoms.values())


# ---------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------

RUN = replicate.TrainConfig(steps=6, batch_size=2, eval_every=2, eval_windows=4,
                            final_eval_windows=8)


@pytest.fixture(scope="module")
def splits():
    if not replicate_data.fortune_files():
        pytest.skip("no fortune files (Debian package 'fortunes')")
    return replicate_data.load_splits()


def run(context, splits, variant="masa-mlp", seed=0, **kw):
    return replicate.train_run(variant, seed, TINY, RUN, splits, context, lambda msg: None,
                               lambda left: left, **kw)


def comparable(record):
    return {k: record[k] for k in ("train_losses", "curve", "val_loss", "attention_parameters",
                                   "training_attention_parameters", "total_parameters")}


def test_interrupted_run_resumes_to_the_same_result(context, splits, tmp_path):
    straight = run(context, splits)
    ckpt = str(tmp_path / "run.ckpt")
    with pytest.raises(replicate.Interrupted):
        run(context, splits, checkpoint=ckpt, interrupt_after=3)
    assert os.path.exists(ckpt)
    assert torch.load(ckpt)["step"] == 3
    resumed = run(context, splits, checkpoint=ckpt)
    assert comparable(resumed) == comparable(straight)
    assert len(resumed["train_losses"]) == RUN.steps


def test_checkpoint_of_another_run_is_not_used(context, splits, tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    with pytest.raises(replicate.Interrupted):
        run(context, splits, seed=1, checkpoint=ckpt, interrupt_after=2)
    assert replicate.load_checkpoint(ckpt, "masa-mlp", 0, TINY, RUN) is None
    assert replicate.load_checkpoint(ckpt, "masa-mlp", 1, TINY, RUN)["step"] == 2
    longer = replicate.TrainConfig(**{**RUN.dict(), "steps": 8})
    assert replicate.load_checkpoint(ckpt, "masa-mlp", 1, TINY, longer) is None
    assert comparable(run(context, splits, seed=0, checkpoint=ckpt)) == comparable(run(context, splits))


def test_same_config_defaults_and_thread_count():
    defaults = {"a": 1, "b": 2, "threads": 1}
    assert replicate.same_config({"a": 1}, {"a": 1, "b": 2, "threads": 1}, defaults)  # older record
    assert not replicate.same_config({"a": 1}, {"a": 1, "b": 3, "threads": 1}, defaults)
    assert replicate.same_config({"a": 1, "b": 2, "threads": 2}, {"a": 1, "b": 2, "threads": 1},
                                 defaults)
    assert not replicate.same_config({"a": 1, "c": 0}, {"a": 1, "b": 2, "threads": 1}, defaults)


def test_scale_study_trains_keeps_and_reports(tmp_path, splits):
    """replicate_scale.py end to end on a tiny model: stretched runs, the 1x
    runs of a reference directory reused, nothing retrained the second time."""
    ref = tmp_path / "reference"
    argv = ["--layers", "3", "--d-model", "16", "--context", "8", "--base-steps", "2",
            "--batch-size", "2", "--plan", "1:0/2:0", "--variants", "dense,masa-mlp"]
    # the dense 1x run exists in the reference directory (as replicate.py --full writes it)
    assert replicate.main(["--quick", "--variants", "dense", "--layers", "3", "--d-model", "16",
                           "--context", "8", "--steps", "2", "--batch-size", "2",
                           "--out", str(ref)]) == 0
    out = tmp_path / "scale"
    assert replicate_scale.main(argv + ["--out", str(out), "--reference", str(ref / "runs")]) == 0
    names = sorted(os.listdir(out / "runs"))
    assert names == ["dense-x2-seed0.json", "masa-mlp-x1-seed0.json", "masa-mlp-x2-seed0.json"]
    r2 = json.loads((out / "runs" / "masa-mlp-x2-seed0.json").read_text())
    assert r2["train_config"]["steps"] == 4 and r2["train_config"]["eval_every"] == 40
    assert r2["train_config"]["warmup_fraction"] == replicate.TrainConfig().warmup_fraction
    assert r2["tokens"] == 2 * 2 * 2 * 8
    assert r2["attention_parameters"] < r2["training_attention_parameters"]
    table = (out / "table.md").read_text()
    gap = r2["val_loss"] - json.loads((out / "runs" / "dense-x2-seed0.json").read_text())["val_loss"]
    assert f"| 2x (64) | masa-mlp | 1 of 1 | {r2['val_loss']:.4f} | {gap:+.4f} |" in table
    assert (out / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert replicate_scale.main(argv + ["--out", str(out), "--reference", str(ref / "runs")]) == 0
    log = (out / "log.txt").read_text()
    assert "[dense 1x seed 0] kept" in log and "trained 0 run(s)" in log
    assert not any(n.endswith(".ckpt") for n in os.listdir(out / "runs"))
    assert math.isfinite(r2["val_loss"])


def test_scale_study_jobs_train_the_same_runs(tmp_path, splits):
    """--jobs 2 trains the runs in worker processes side by side: the same
    records (bit for bit: each run has its seed and one thread either way)
    as one run after another, and the table reports them all."""
    argv = ["--layers", "3", "--d-model", "16", "--context", "8", "--base-steps", "2",
            "--batch-size", "2", "--plan", "1:0,1", "--variants", "dense,masa-qkvo",
            "--reference", str(tmp_path / "none")]
    seq, par = tmp_path / "one-by-one", tmp_path / "side-by-side"
    assert replicate_scale.main(argv + ["--out", str(seq)]) == 0
    assert replicate_scale.main(argv + ["--out", str(par), "--jobs", "2"]) == 0
    names = sorted(os.listdir(seq / "runs"))
    assert len(names) == 4 and sorted(os.listdir(par / "runs")) == names
    for n in names:
        a = json.loads((seq / "runs" / n).read_text())
        b = json.loads((par / "runs" / n).read_text())
        assert a["val_loss"] == b["val_loss"] and a["curve"] == b["curve"], n
    log = (par / "log.txt").read_text()
    assert "4 to train" in log and "2 at a time" in log and "trained 4 run(s)" in log
    assert "| 1x (32) | masa-qkvo | 2 of 2 |" in (par / "table.md").read_text()


def test_scale_study_learning_rate(tmp_path, splits):
    """--lr trains with that peak rate, stretched like the default one, and
    does not take a 1x run of the default rate from the reference."""
    ref = tmp_path / "reference"
    small = ["--layers", "3", "--d-model", "16", "--context", "8", "--batch-size", "2"]
    assert replicate.main(["--quick", "--variants", "dense", "--steps", "2", "--out", str(ref)]
                          + small) == 0
    out = tmp_path / "lr"
    assert replicate_scale.main(small + ["--base-steps", "2", "--plan", "1:0/2:0", "--variants",
                                         "dense", "--lr", "0.001", "--out", str(out),
                                         "--reference", str(ref / "runs")]) == 0
    for k in (1, 2):
        r = json.loads((out / "runs" / f"dense-x{k}-seed0.json").read_text())
        assert r["train_config"]["lr"] == 0.001 and r["train_config"]["steps"] == 2 * k
    assert "0 run(s) kept, 2 to train" in (out / "log.txt").read_text()
    assert "AdamW lr 0.001" in (out / "table.md").read_text()
