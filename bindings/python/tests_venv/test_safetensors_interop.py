"""libmasa's safetensors files against PyPI's `safetensors` package (the
venv of scripts/install-deps.sh): files written by libmasa load in
safetensors.numpy and the other way round, byte for byte the same file for
the same tensors, and compressed models stay readable by the package."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import masa  # noqa: E402
from masa import safetensors_file as sf  # noqa: E402

st_numpy = pytest.importorskip("safetensors.numpy")

TENSORS = {
    "model.layers.0.self_attn.q_proj.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.linspace(-1, 1, 7),
    "c": np.array([1, -2], dtype=np.int64),
    "half": np.array([0.5, 65504, -0.0], dtype=np.float16),
    "flags": np.array([True, False, True]),
    "bytes": np.arange(5, dtype=np.uint8),
    "\u00e9t\u00e9": np.array([[1.0]], dtype=np.float32),
    "i16": np.array([-7], dtype=np.int16),
}


@pytest.fixture(scope="module")
def ctx():
    c = masa.Context(n_threads=1)
    yield c
    c.close()


def test_libmasa_file_loads_in_safetensors(tmp_path, ctx):
    path = str(tmp_path / "c.safetensors")
    sf.save_file(TENSORS, path, {"format": "np"}, context=ctx)
    back = st_numpy.load_file(path)
    assert set(back) == set(TENSORS)
    for name, a in TENSORS.items():
        assert back[name].dtype == a.dtype
        np.testing.assert_array_equal(back[name], a)
    from safetensors import safe_open
    with safe_open(path, "np") as f:
        assert f.metadata() == {"format": "np"}


def test_safetensors_file_loads_in_libmasa(tmp_path, ctx):
    path = str(tmp_path / "p.safetensors")
    st_numpy.save_file(TENSORS, path, metadata={"format": "np"})
    back = sf.load_file(path, ctx)
    assert set(back) == set(TENSORS)
    for name, a in TENSORS.items():
        assert back[name].dtype == a.dtype
        np.testing.assert_array_equal(back[name], a)
    assert sf.load_metadata(path, ctx) == {"format": "np"}


def test_same_bytes_as_the_package(tmp_path, ctx):
    """The same tensors and (one) metadata entry give the same file."""
    path = str(tmp_path / "same.safetensors")
    sf.save_file(TENSORS, path, {"format": "np"}, context=ctx)
    assert open(path, "rb").read() == st_numpy.save(TENSORS, metadata={"format": "np"})
    sf.save_file(TENSORS, path, context=ctx)
    assert open(path, "rb").read() == st_numpy.save(TENSORS)


def test_bf16_both_ways(tmp_path, ctx):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    x = torch.randn(33, dtype=torch.float32).to(torch.bfloat16)
    path = str(tmp_path / "bf.safetensors")
    save_file({"x": x}, path)
    with sf.SafetensorsFile(path, ctx) as f:
        np.testing.assert_array_equal(f.get_f32("x"), x.float().numpy())
    bits = f"{path}.masa"
    sf.save_file({"x": ("BF16", x.view(torch.int16).numpy().view(np.uint16))}, bits, context=ctx)
    assert torch.equal(load_file(bits)["x"], x)


def test_compressed_model_is_a_safetensors_file(tmp_path, ctx):
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((2, 8, 8)).astype(np.float32)
    coefs = rng.standard_normal((3, 2)).astype(np.float32)
    path = str(tmp_path / "m.safetensors")
    sf.save_model(path, 3, groups={"q": [(0, atoms, coefs)]}, context=ctx)
    back = st_numpy.load_file(path)
    np.testing.assert_array_equal(back["masa.q.group0.atoms"], atoms)
    np.testing.assert_array_equal(back["masa.q.group0.coefficients"], coefs)
    # and a model file written by the package (tensors plus masa.model) opens
    meta = sf.load_metadata(path, ctx)
    again = str(tmp_path / "again.safetensors")
    st_numpy.save_file(back, again, metadata=meta)
    m = sf.load_model(ctx, again)
    np.testing.assert_array_equal(m.group("q", 0)[1], atoms)
    m.close()
