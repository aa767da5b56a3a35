"""The small-scale replication (examples/python/replicate.py): every
attention variant trains on the fortunes (the loss falls), and parameter
counts and compression ratios follow their formulas."""

import json
import math
import os
import sys

import pytest

try:
    import torch
except ImportError:  # fallback only: torch is installed where these tests run
    torch = pytest.importorskip("torch")

import masa

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(REPO, "examples", "python"))

import replicate  # noqa: E402
import replicate_data  # noqa: E402
import replicate_models as models  # noqa: E402

if not replicate_data.fortune_files():
    pytest.skip(f"no fortune files in {replicate_data.FORTUNES_DIR} (Debian package 'fortunes')",
                allow_module_level=True)

TINY = models.ModelConfig(n_layers=6, d_model=32, n_heads=4, context=32, n_atoms=2, gqa_kv_heads=2)


def expected_counts(variant, L, d, H, S, kv, vocab=256, mlp=4):
    """(attention parameters, total parameters), written out per variant."""
    hd = d // H
    dense = 4 * L * d * d
    attn = {
        "dense": dense,
        "masa-qkvo": 4 * (S * d * d + L * S),
        "masa-mlp": 4 * (S * d * d + L * S),  # at inference: the collapsed table
        "masa-qkv": 3 * (S * d * d + L * S) + L * d * d,
        "repeat-all-over": 4 * S * d * d,
        "sequential": 4 * S * d * d,
        "gqa": L * (2 * d * d + 2 * d * kv * hd),
    }
    if variant == "low-rank":
        r = round(4 * (S * d * d + L * S) / (8 * L * d))
        attn["low-rank"] = L * 4 * (d * r + r * d)
    per_layer_rest = 2 * 2 * d + (d * mlp * d + mlp * d) + (mlp * d * d + d)
    rest = vocab * d + L * per_layer_rest + 2 * d + (d * vocab + vocab)
    return attn[variant], attn[variant] + rest, dense / attn[variant]


@pytest.mark.parametrize("cfg", [TINY, models.ModelConfig()], ids=["tiny", "default"])
@pytest.mark.parametrize("variant", models.VARIANTS)
def test_parameter_counts_and_compression(cfg, variant):
    torch.manual_seed(0)
    m = models.ByteLM(variant, cfg)
    attn, total, ratio = expected_counts(variant, cfg.n_layers, cfg.d_model, cfg.n_heads,
                                         cfg.n_atoms, cfg.gqa_kv_heads)
    assert m.attention_parameters() == attn
    assert m.total_parameters() == total
    assert models.dense_attention_parameters(cfg) / m.attention_parameters() == pytest.approx(ratio)
    if cfg == models.ModelConfig():  # the numbers the README quotes
        assert {"dense": 1.0, "masa-qkvo": 786432 / 262336, "masa-qkv": 786432 / 393360,
                "low-rank": 786432 / 258048, "repeat-all-over": 3.0, "sequential": 3.0,
                "gqa": 1.6, "masa-mlp": 786432 / 262336}[variant] == pytest.approx(ratio, abs=1e-4)


def test_fixed_tables_are_one_hot():
    torch.manual_seed(0)
    L, S = TINY.n_layers, TINY.n_atoms
    rows = torch.arange(L)
    for variant, column in (("repeat-all-over", rows % S), ("sequential", rows // (L // S))):
        m = models.ByteLM(variant, TINY)
        want = torch.zeros(L, S)
        want[rows, column] = 1.0
        for p in "qkvo":
            assert torch.equal(m.shared.coefficients[p].detach(), want), (variant, p)
            assert not m.shared.coefficients[p].requires_grad


def test_data_split_is_fixed_and_disjoint():
    train, val = replicate_data.load_splits()
    again = replicate_data.load_splits()
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert 8 * len(val) < len(train) < 10 * len(val)
    assert train.dtype == torch.uint8 and int(train.max()) < 256
    x, y = replicate_data.eval_windows(val, 16, 4)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """replicate.py sets torch's thread count; the other tests keep theirs."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs():
    """Every variant trained for a few steps on the tiny model."""
    torch.set_num_threads(1)
    ctx = masa.Context(n_threads=1)
    splits = replicate_data.load_splits()
    tcfg = replicate.TrainConfig(steps=12, batch_size=8, lr=1e-2, eval_every=4, eval_windows=8,
                                 final_eval_windows=16)
    out = {}
    for v in models.VARIANTS:
        out[v] = replicate.train_run(v, 0, TINY, tcfg, splits, ctx, lambda msg: None,
                                     lambda left: left)
    yield out, tcfg
    ctx.close()


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_every_variant_loss_falls(runs, variant):
    records, tcfg = runs
    r = records[variant]
    losses = r["train_losses"]
    assert len(losses) == tcfg.steps
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    curve = [loss for _, loss in r["curve"]]
    assert [t for t, _ in r["curve"]] == [0, 1024, 2048, 3072]
    assert curve[-1] < curve[0] - 1.0, curve
    assert r["val_loss"] < math.log(256) - 1.0
    assert r["val_bits_per_byte"] == pytest.approx(r["val_loss"] / math.log(2))
    attn, total, ratio = expected_counts(variant, TINY.n_layers, TINY.d_model, TINY.n_heads,
                                         TINY.n_atoms, TINY.gqa_kv_heads)
    assert (r["attention_parameters"], r["total_parameters"]) == (attn, total)
    assert r["compression_ratio"] == pytest.approx(ratio)


def test_table_plot_and_resume(runs, tmp_path):
    """The quick mode end to end on the tiny model; a second invocation keeps
    the runs it finds."""
    argv = ["--quick", "--layers", "3", "--d-model", "16", "--context", "16", "--steps", "4",
            "--batch-size", "2", "--out", str(tmp_path)]
    assert replicate.main(argv) == 0
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| dense") or
            line.startswith("| masa-qkvo")]
    assert len(rows) == 2
    assert "| 3.000x |" not in rows[0] and "| 1.000x |" in rows[0]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((tmp_path / "runs" / "masa-qkvo-seed0.json").read_text())
    assert run["model_config"]["n_layers"] == 3 and run["model_config"]["n_atoms"] == 1
    assert run["tokens"] == 4 * 2 * 16
    assert replicate.main(argv) == 0
    log = (tmp_path / "log.txt").read_text()
    assert "[masa-qkvo seed 0] kept from" in log and "trained 0 run(s)" in log
    (tmp_path / "table.md").unlink()
    assert replicate.main(argv + ["--report-only"]) == 0
    assert (tmp_path / "table.md").read_text() == table
