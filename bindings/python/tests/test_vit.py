"""The ViT experiment (examples/python/vit.py): the Fashion-MNIST loader on
Debian's files against an independent byte-level parse of the IDX format,
the ViT's non-causal libmasa attention against a float64 torch model, and
the per-epoch checkpoint/resume logic."""

import gzip
import json
import math
import os
import random
import struct
import sys

import numpy as np
import pytest

try:
    import torch
except ImportError:  # fallback only: torch is installed where these tests run
    torch = pytest.importorskip("torch")
import torch.nn.functional as F

import masa

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(REPO, "examples", "python"))

import vit  # noqa: E402
import vit_data  # noqa: E402
import vit_models as models  # noqa: E402

needs_data = pytest.mark.skipif(
    not vit_data.available(),
    reason=f"no Fashion-MNIST in {vit_data.FASHION_MNIST_DIR} (Debian package 'dataset-fashion-mnist')")

TINY = models.ViTConfig(patch=7, n_layers=6, d_model=32, n_heads=4, n_atoms=2)


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """vit.py sets torch's thread count; the other tests keep theirs."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# Data: the loader against an independent parse of the raw bytes
# ---------------------------------------------------------------------------


def raw_file(name):
    with gzip.open(os.path.join(vit_data.FASHION_MNIST_DIR, name), "rb") as f:
        return f.read()


def be32(raw, offset):
    """A big-endian 32-bit integer assembled byte by byte."""
    return (raw[offset] << 24) | (raw[offset + 1] << 16) | (raw[offset + 2] << 8) | raw[offset + 3]


@needs_data
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_loader_matches_raw_bytes(split, n):
    images, labels = vit_data.load_split(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8
    image_name, label_name = vit_data.FILES[split]
    raw_images, raw_labels = raw_file(image_name), raw_file(label_name)
    # headers: magic 0x00000803 / 0x00000801, then the sizes
    assert be32(raw_images, 0) == 0x803 and be32(raw_labels, 0) == 0x801
    assert (be32(raw_images, 4), be32(raw_images, 8), be32(raw_images, 12)) == (n, 28, 28)
    assert be32(raw_labels, 4) == n
    assert len(raw_images) == 16 + n * 784 and len(raw_labels) == 8 + n
    # every label, and pixels at fixed and random places, read off the bytes
    assert list(labels) == list(raw_labels[8:])
    picks = [(0, 0, 0), (0, 14, 14), (n - 1, 27, 27), (n // 2, 5, 20)]
    rnd = random.Random(split)
    picks += [(rnd.randrange(n), rnd.randrange(28), rnd.randrange(28)) for _ in range(200)]
    for i, r, c in picks:
        assert images[i, r, c] == raw_images[16 + i * 784 + r * 28 + c], (i, r, c)
    # one whole image, byte for byte
    i = rnd.randrange(n)
    assert images[i].tobytes() == raw_images[16 + i * 784:16 + (i + 1) * 784]
    assert int(images[:1000].sum(dtype=np.int64)) == sum(raw_images[16:16 + 1000 * 784])


@needs_data
def test_known_labels_and_balance():
    """Facts of the published dataset: the first ten labels of each split
    (train starts with an ankle boot), 6,000 / 1,000 images per class."""
    train_labels = vit_data.load_split("train")[1]
    test_labels = vit_data.load_split("test")[1]
    assert list(train_labels[:10]) == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert list(test_labels[:10]) == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert vit_data.CLASSES[9] == "Ankle boot"
    assert list(np.bincount(train_labels, minlength=10)) == [6000] * 10
    assert list(np.bincount(test_labels, minlength=10)) == [1000] * 10
    assert int(train_labels.max()) == 9 and int(test_labels.min()) == 0


@needs_data
def test_normalisation_constants_and_tensors():
    images, labels = vit_data.load_split("train")
    pixels = images.astype(np.float64) / 255.0
    assert vit_data.PIXEL_MEAN == pytest.approx(pixels.mean(), abs=1e-4)
    assert vit_data.PIXEL_STD == pytest.approx(pixels.std(), abs=1e-4)
    x, y = vit_data.to_tensors(images[:5], labels[:5])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (5, 28, 28)
    want = (images[3, 10, 12] / 255.0 - vit_data.PIXEL_MEAN) / vit_data.PIXEL_STD
    assert float(x[3, 10, 12]) == pytest.approx(want, rel=1e-6)
    assert y.tolist() == labels[:5].tolist()


def idx_bytes(values):
    """A well-formed unsigned-byte IDX file of a numpy uint8 array."""
    return struct.pack(">HBB", 0, 8, values.ndim) + struct.pack(
        f">{values.ndim}I", *values.shape) + values.tobytes()


def test_parse_idx_round_trip_and_errors():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(vit_data.parse_idx(idx_bytes(a)), a)
    good = idx_bytes(a)
    bad = {
        "shorter than the 4-byte": good[:3],
        "two zero bytes": b"\x01" + good[1:],
        "is not 0x08": good[:2] + b"\x0d" + good[3:],
        "rank 0": good[:3] + b"\x00" + good[4:],
        "rank 4": good[:3] + b"\x04" + good[4:],
        "shorter than its 16-byte header": good[:10],
        "needs 24 value bytes, the file has 23": good[:-1],
        "needs 24 value bytes, the file has 25": good + b"\x00",
    }
    for message, raw in bad.items():
        with pytest.raises(vit_data.IdxError, match=message):
            vit_data.parse_idx(raw, "f")


def test_parse_idx_fuzz():
    """Random corruptions of a valid file: a consistent array or IdxError,
    nothing else."""
    rnd = random.Random(7)
    good = bytearray(idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5)))
    for _ in range(3000):
        raw = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.randrange(3)
            if op == 0 and raw:
                raw[rnd.randrange(len(raw))] = rnd.randrange(256)
            elif op == 1:
                del raw[rnd.randrange(len(raw) + 1):]
            else:
                raw += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        try:
            arr = vit_data.parse_idx(bytes(raw))
        except vit_data.IdxError:
            continue
        assert arr.size == len(raw) - 4 - 4 * arr.ndim and arr.dtype == np.uint8


def test_files_missing_or_broken(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        vit_data.load_split("train", str(tmp_path))
    with pytest.raises(ValueError, match="'train' or 'test'"):
        vit_data.load_split("validation", str(tmp_path))
    a = np.zeros((2, 28, 28), dtype=np.uint8)
    for split in ("train", "test"):
        images, labels = vit_data.FILES[split]
        with gzip.open(tmp_path / images, "wb") as f:
            f.write(idx_bytes(a))
        with gzip.open(tmp_path / labels, "wb") as f:
            f.write(idx_bytes(np.array([3, 12], dtype=np.uint8)))
    with pytest.raises(vit_data.IdxError, match="label 12 outside 0..9"):
        vit_data.load_split("train", str(tmp_path))
    with gzip.open(tmp_path / vit_data.FILES["test"][1], "wb") as f:
        f.write(idx_bytes(np.array([3, 1, 2], dtype=np.uint8)))
    with pytest.raises(vit_data.IdxError, match="does not match 2 images"):
        vit_data.load_split("test", str(tmp_path))
    (tmp_path / vit_data.FILES["test"][0]).write_bytes(b"not gzip at all")
    with pytest.raises(vit_data.IdxError, match="cannot read"):
        vit_data.load_split("test", str(tmp_path))
    with gzip.open(tmp_path / vit_data.FILES["test"][0], "wb") as f:
        f.write(idx_bytes(np.zeros((2, 14, 56), dtype=np.uint8)))
    with pytest.raises(vit_data.IdxError, match=r"expected \[N, 28, 28\]"):
        vit_data.load_split("test", str(tmp_path))


# ---------------------------------------------------------------------------
# The model: parameter counts, patches, non-causal attention against float64
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, models.ViTConfig()], ids=["tiny", "default"])
def test_parameter_counts(cfg):
    L, d, S, m = cfg.n_layers, cfg.d_model, cfg.n_atoms, cfg.mlp_ratio
    rest = (cfg.patch ** 2 * d + d) + d + (cfg.n_patches + 1) * d \
        + L * (4 * d + (d * m * d + m * d) + (m * d * d + d)) + 2 * d + (d * 10 + 10)
    torch.manual_seed(0)
    for variant, attn in (("dense", 4 * L * d * d), ("masa-qkvo", 4 * (S * d * d + L * S))):
        model = models.ViT(variant, cfg)
        assert model.attention_parameters() == attn
        assert model.total_parameters() == attn + rest
    assert models.dense_attention_parameters(cfg) == 4 * L * d * d
    if cfg == models.ViTConfig():  # the numbers results/vit quotes
        assert (4 * L * d * d, 4 * (S * d * d + L * S)) == (98304, 32816)
        assert 1 - 32816 / 98304 == pytest.approx(0.6662, abs=1e-4)


def test_patchify_is_row_major_patches():
    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 28, 28)
    for p in (4, 7):
        patches = models.patchify(images, p)
        g = 28 // p
        assert patches.shape == (2, g * g, p * p)
        for b, i, j in ((0, 0, 0), (1, g - 1, 1), (1, 2, g - 1)):
            assert torch.equal(patches[b, i * g + j],
                               images[b, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1))


def attention64(x, W, n_heads, causal=False):
    """Multi-head attention in float64 written out: softmax(Q K^T/sqrt(hd)) V
    per head, then O; no mask unless causal."""
    b, t, d = x.shape
    hd = W["q"].shape[1] // n_heads
    q = (x @ W["q"]).reshape(b, t, n_heads, hd).transpose(1, 2)
    k = (x @ W["k"]).reshape(b, t, n_heads, hd).transpose(1, 2)
    v = (x @ W["v"]).reshape(b, t, n_heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.softmax(scores, dim=-1) @ v
    return a.transpose(1, 2).reshape(b, t, n_heads * hd) @ W["o"]


def vit64(model, images, causal=False):
    """The whole ViT in float64 from the model's parameters (leaf copies):
    returns (logits, {parameter name: float64 leaf})."""
    cfg = model.cfg
    P = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    x = models.patchify(images.double(), cfg.patch) @ P["patch_embed.weight"].T + P["patch_embed.bias"]
    h = torch.cat([P["cls"].expand(len(x), -1, -1), x], dim=1) + P["pos"]
    d = cfg.d_model
    for i in range(cfg.n_layers):
        pre = f"blocks.{i}."
        W = {}
        for p in "qkvo":
            if model.shared is not None:
                W[p] = torch.einsum("s,sij->ij", P[f"shared.coefficients.{p}"][i],
                                    P[f"shared.atoms.{p}"])
            else:
                W[p] = P[f"{pre}attn.weights.{p}"]
        a = F.layer_norm(h, (d,), P[pre + "norm1.weight"], P[pre + "norm1.bias"])
        h = h + attention64(a, W, cfg.n_heads, causal)
        m = F.layer_norm(h, (d,), P[pre + "norm2.weight"], P[pre + "norm2.bias"])
        m = F.gelu(m @ P[pre + "mlp.0.weight"].T + P[pre + "mlp.0.bias"])
        h = h + m @ P[pre + "mlp.2.weight"].T + P[pre + "mlp.2.bias"]
    h = F.layer_norm(h[:, 0], (d,), P["norm.weight"], P["norm.bias"])
    return h @ P["head.weight"].T + P["head.bias"], P


def rel_err(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_attention_layer_matches_float64(variant):
    """One non-causal libmasa attention layer of the ViT (shared atoms,
    layer 4's table row) against the float64 formula: output, dx, and the
    atom/table (or weight) gradients."""
    torch.manual_seed(1)
    model = models.ViT(variant, TINY)
    attn = model.blocks[4].attn
    assert not attn.causal and not attn.rope
    x = torch.randn(3, TINY.n_patches + 1, TINY.d_model, requires_grad=True)
    g = torch.randn(3, TINY.n_patches + 1, TINY.d_model)
    (attn(x) * g).sum().backward()
    params = {n: p for n, p in model.named_parameters() if p.grad is not None}
    leaves = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    if variant == "masa-qkvo":
        W = {p: torch.einsum("s,sij->ij", leaves[f"shared.coefficients.{p}"][4],
                             leaves[f"shared.atoms.{p}"]) for p in "qkvo"}
    else:
        W = {p: leaves[f"blocks.4.attn.weights.{p}"] for p in "qkvo"}
    x64 = x.detach().double().requires_grad_()
    y64 = attention64(x64, W, TINY.n_heads)
    (y64 * g.double()).sum().backward()
    with torch.no_grad():
        assert rel_err(attn(x), y64) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert len(params) == (8 if variant == "masa-qkvo" else 4)
    for n, p in params.items():
        assert rel_err(p.grad, leaves[n].grad) < 1e-5, n
    # not vacuous: the first token's output depends on the last token's input
    assert float(x64.grad[:, -1].abs().max()) > 0
    assert rel_err(attn(x).detach(), attention64(x.detach().double(), W, TINY.n_heads,
                                                 causal=True).detach()) > 1e-2


@pytest.mark.parametrize("variant", models.VARIANTS)
def test_whole_vit_matches_float64(variant):
    """Logits and every parameter's gradient of the whole ViT (MASA atoms
    accumulate over the 6 layers sharing them) against the float64 model."""
    torch.manual_seed(2)
    model = models.ViT(variant, TINY)
    images = torch.randn(4, 28, 28)
    labels = torch.tensor([0, 3, 9, 5])
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    ref, P = vit64(model, images)
    F.cross_entropy(ref, labels).backward()
    assert rel_err(logits.detach(), ref.detach()) < 1e-5
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert rel_err(p.grad, P[n].grad) < 1e-4, n
    causal, _ = vit64(model, images, causal=True)
    assert rel_err(logits.detach(), causal.detach()) > 1e-3


# ---------------------------------------------------------------------------
# Training: resume after an interruption gives the uninterrupted result
# ---------------------------------------------------------------------------

SMALL_TRAIN = vit.TrainConfig(epochs=2, batch_size=64, lr=3e-3, train_images=512,
                              test_images=256, threads=1)


@pytest.fixture(scope="module")
def small_dataset():
    if not vit_data.available():
        pytest.skip("no Fashion-MNIST")
    return vit.load_data(SMALL_TRAIN)


def comparable(record):
    return {k: v for k, v in record.items() if k not in ("wall_seconds", "train_images_per_s")}


@needs_data
def test_resume_matches_uninterrupted_run(small_dataset, tmp_path):
    torch.set_num_threads(1)
    ctx = masa.Context(n_threads=1)
    messages = []
    whole = vit.train_run("masa-qkvo", 3, TINY, SMALL_TRAIN, small_dataset, ctx, messages.append)
    assert whole["history"][-1]["epoch"] == 2 and len(whole["history"]) == 3
    assert whole["test_accuracy"] > 0.3, whole["history"]  # chance is 0.1
    assert whole["history"][2]["train_loss"] < whole["history"][1]["train_loss"]
    ckpt = str(tmp_path / "run.pt")
    assert vit.train_run("masa-qkvo", 3, TINY, SMALL_TRAIN, small_dataset, ctx, messages.append,
                         checkpoint=ckpt, stop_after_epoch=1) is None
    state = torch.load(ckpt)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    assert state["history"] == whole["history"][:2]
    messages.clear()
    resumed = vit.train_run("masa-qkvo", 3, TINY, SMALL_TRAIN, small_dataset, ctx,
                            messages.append, checkpoint=ckpt)
    assert any("resumed after epoch 1" in m for m in messages), messages
    assert comparable(resumed) == comparable(whole)
    # a checkpoint of another configuration is not resumed
    other = vit.TrainConfig(**{**SMALL_TRAIN.dict(), "lr": 1e-3})
    messages.clear()
    vit.train_run("masa-qkvo", 3, TINY, other, small_dataset, ctx, messages.append,
                  checkpoint=ckpt, stop_after_epoch=1)
    assert any("ignoring" in m for m in messages) and not any("resumed" in m for m in messages)
    ctx.close()


@needs_data
def test_main_writes_results_and_keeps_finished_runs(tmp_path):
    argv = ["--layers", "3", "--d-model", "16", "--heads", "2", "--patch", "7", "--epochs", "1",
            "--batch-size", "64", "--train-images", "256", "--test-images", "128",
            "--seeds", "0", "--out", str(tmp_path)]
    assert vit.main(argv) == 0
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| dense")
            or line.startswith("| masa-qkvo")]
    assert len(rows) == 2
    assert "| 3,072 | 0.0% |" in rows[0]             # 4 * 3 * 16^2
    assert "| 1,036 | 66.3% |" in rows[1]            # 4 * (16^2 + 3)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((tmp_path / "runs" / "masa-qkvo-seed0.json").read_text())
    assert run["model_config"]["n_atoms"] == 1 and run["train_images"] == 256
    assert len(run["coefficients"]["q"]) == 3
    assert not os.listdir(tmp_path / "checkpoints")  # removed once the JSON is written
    assert vit.main(argv) == 0
    log = (tmp_path / "log.txt").read_text()
    assert "[masa-qkvo seed 0] kept from" in log and "trained 0 run(s)" in log
    (tmp_path / "table.md").unlink()
    assert vit.main(argv + ["--report-only"]) == 0
    assert (tmp_path / "table.md").read_text() == table
