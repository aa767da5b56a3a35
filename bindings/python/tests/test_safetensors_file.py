"""masa.safetensors_file: files written through libmasa read back by a
plain numpy parser (and the other way), conversions against numpy, errors,
compressed models applied to layers against layers built by hand."""

import json
import os
import struct

import numpy as np
import pytest

import masa
from masa import compression as mc
from masa import safetensors_file as sf


def parse(path):
    """An independent reader: header dict, metadata, raw data section."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return n, header, data[8 + n:]


def write_raw(path, header_text, data=b""):
    h = header_text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


ALL = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "f64": np.linspace(-1, 1, 5),
    "f16": np.array([1.5, -2, 65504], dtype=np.float16),
    "i64": np.array([[-(2**62), 7]], dtype=np.int64),
    "u8": np.arange(4, dtype=np.uint8),
    "bool": np.array([True, False]),
    "i32": np.array([-3], dtype=np.int32),
    "u16": np.array([65535], dtype=np.uint16),
    "scalar": np.array(3.25, dtype=np.float32),
    "empty": np.zeros((0, 4), dtype=np.float32),
}


def test_round_trip_and_layout(tmp_path, ctx):
    path = tmp_path / "a.safetensors"
    sf.save_file(ALL, path, {"k": "v", "\u00e9": "\u4e2d"}, context=ctx)
    back = sf.load_file(path, ctx)
    assert set(back) == set(ALL)
    for name, a in ALL.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        np.testing.assert_array_equal(back[name], a)
    assert sf.load_metadata(path, ctx) == {"k": "v", "\u00e9": "\u4e2d"}
    n, header, data = parse(path)
    assert n % 8 == 0
    meta = header.pop("__metadata__")
    assert meta == {"k": "v", "\u00e9": "\u4e2d"}
    # contiguous, in the package's order (wider dtypes first, then names),
    # and the bytes are the arrays' own
    spans = sorted((e["data_offsets"], name) for name, e in header.items())
    end = 0
    for (b, e), name in spans:
        assert b == end
        assert data[b:e] == ALL[name].tobytes()
        end = e
    assert end == len(data)
    order = [name for _, name in spans]
    assert order[:2] == ["i64", "f64"] and order[-2:] == ["u8", "bool"]


def test_lazy_reader_and_conversions(tmp_path, ctx):
    path = tmp_path / "c.safetensors"
    rng = np.random.default_rng(5)
    x = rng.standard_normal(1000).astype(np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    sf.save_file({"h": x.astype(np.float16), "b": ("BF16", bf16), "d": x.astype(np.float64),
                  "i": np.arange(3, dtype=np.int32)}, path, context=ctx)
    with sf.SafetensorsFile(path, ctx) as f:
        assert sorted(f.keys()) == ["b", "d", "h", "i"] and len(f) == 4
        assert "h" in f and "nope" not in f
        assert f.info("b") == sf.TensorInfo("BF16", (1000,), 2000)
        np.testing.assert_array_equal(f.get_f32("h"), x.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(f.get_f32("d"), x)
        np.testing.assert_array_equal(
            f.get_f32("b"), (bf16.astype(np.uint32) << 16).view(np.float32))
        np.testing.assert_array_equal(f.get_tensor("b"), bf16)
        with pytest.raises(masa.InvalidArgumentError):
            f.get_f32("i")
        with pytest.raises(masa.NotFoundError, match="nope"):
            f.get_tensor("nope")
    assert f.closed


def test_reads_files_written_elsewhere(tmp_path, ctx):
    path = tmp_path / "e.safetensors"
    a = np.arange(3, dtype=np.float32)
    write_raw(str(path), '{"b":{"dtype":"F32","shape":[3],"data_offsets":[12,24]},'
                         '"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}',
              a.tobytes() + (a + 10).tobytes())
    back = sf.load_file(path, ctx)
    np.testing.assert_array_equal(back["a"], a)
    np.testing.assert_array_equal(back["b"], a + 10)


@pytest.mark.parametrize("header,data,message", [
    ("{", b"", "not valid JSON"),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4, "span 4"),
    ('{"a":{"dtype":"X","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "unknown dtype"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 5, "cover 4 bytes"),
    ('{"__metadata__":{"a":2}}', b"", "not a string"),
])
def test_malformed(tmp_path, ctx, header, data, message):
    path = tmp_path / "bad.safetensors"
    write_raw(str(path), header, data)
    with pytest.raises(masa.BadFormatError, match=message) as e:
        sf.load_file(path, ctx)
    assert str(path) in str(e.value)


def test_errors(tmp_path, ctx):
    with pytest.raises(masa.FileIOError, match="No such file"):
        sf.load_file(tmp_path / "missing", ctx)
    with pytest.raises(masa.FileIOError):
        sf.save_file({"a": np.zeros(1, np.float32)}, tmp_path / "no" / "dir", context=ctx)
    with pytest.raises(masa.InvalidArgumentError, match="__metadata__"):
        sf.save_file({"__metadata__": np.zeros(1, np.float32)}, tmp_path / "x", context=ctx)
    with pytest.raises(TypeError, match="no safetensors equivalent"):
        sf.save_file({"c": np.zeros(1, np.complex64)}, tmp_path / "x", context=ctx)
    with pytest.raises(ValueError, match="BF16 needs 2-byte"):
        sf.save_file({"b": ("BF16", np.zeros(1, np.float32))}, tmp_path / "x", context=ctx)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left


def test_big_endian_input_is_stored_little_endian(tmp_path, ctx):
    a = np.arange(4, dtype=">f4")
    sf.save_file({"a": a}, tmp_path / "be", context=ctx)
    np.testing.assert_array_equal(sf.load_file(tmp_path / "be", ctx)["a"], a.astype("<f4"))


# ---------------------------------------------------------- compressed models

L, D, H, S = 4, 16, 2, 2


def _model_parts(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.3  # noqa: E731
    return {
        "groups": {"q": [(0, f(S, D, D), f(3, S)), (3, f(1, D, D), f(1, 1))]},
        "dense": {"k": [f(D, D) for _ in range(L)]},
        "lowrank": {"q": {1: (f(D, 3), f(3, D))}, "v": {l: (f(D, 2), f(2, D)) for l in range(L)}},
    }


def test_model_round_trip_and_apply(tmp_path, ctx):
    rng = np.random.default_rng(9)
    parts = _model_parts(rng)
    calib = mc.Calibration(ctx, D).accumulate(rng.standard_normal((20, D)).astype(np.float32))
    path = tmp_path / "m.safetensors"
    sf.save_model(path, L, **parts, calibration={"layer0.qkv": calib},
                  tensors={"model.norm": np.ones(D, np.float32)}, metadata={"who": "test"},
                  context=ctx)
    m = sf.load_model(ctx, path)
    assert m.n_layers == L
    assert m.projection("q") == sf.ProjectionInfo("masa", D, D, ((0, 3, S), (3, 1, 1)))
    assert m.projection("k").kind == "dense" and m.projection("v").kind == "lowrank"
    assert m.projection("o").kind is None
    first, atoms, coefs = m.group("q", 1)
    assert first == 3
    np.testing.assert_array_equal(atoms, parts["groups"]["q"][1][1])
    np.testing.assert_array_equal(m.dense("k", 2), parts["dense"]["k"][2])
    assert m.lowrank("q", 0) is None
    np.testing.assert_array_equal(m.lowrank("q", 1)[1], parts["lowrank"]["q"][1][1])
    assert m.calibration_names == ["layer0.qkv"]
    back = m.calibration("layer0.qkv")
    np.testing.assert_array_equal(back.matrix, calib.matrix)
    assert back.n_rows == 20
    assert m.metadata()["who"] == "test"

    x = rng.standard_normal((2, 3, D)).astype(np.float32)
    wo = rng.standard_normal((D, D)).astype(np.float32)
    for l in range(L):
        got = masa.Layer(ctx, D, H, causal=True)
        got.set_dense("o", wo)
        m.apply(got, l)
        want = masa.Layer(ctx, D, H, causal=True)
        g = 0 if l < 3 else 1
        first, atoms, coefs = parts["groups"]["q"][g]
        want.set_masa("q", masa.Dictionary.wrap(ctx, atoms), masa.Coefficients.wrap(ctx, coefs),
                      l - first)
        if l == 1:
            want.set_lowrank("q", a=parts["lowrank"]["q"][1][0], b=parts["lowrank"]["q"][1][1])
        want.set_dense("k", parts["dense"]["k"][l])
        want.set_lowrank("v", a=parts["lowrank"]["v"][l][0], b=parts["lowrank"]["v"][l][1])
        want.set_dense("o", wo)
        np.testing.assert_array_equal(got.forward(x), want.forward(x))
    with pytest.raises(ValueError, match="projection q"):
        m.apply(masa.Layer(ctx, 2 * D, H), 0)
    with pytest.raises(IndexError):
        m.apply(masa.Layer(ctx, D, H), L)
    m.close()


def test_model_writer_refusals(tmp_path, ctx):
    rng = np.random.default_rng(2)
    parts = _model_parts(rng)
    with pytest.raises(masa.InvalidArgumentError, match="layer 3 has no MASA group"):
        sf.save_model(tmp_path / "m", L, groups={"q": parts["groups"]["q"][:1]}, context=ctx)
    with pytest.raises(masa.InvalidArgumentError, match="reserved"):
        sf.save_model(tmp_path / "m", L, **parts, tensors={"masa.x": np.zeros(1, np.float32)},
                      context=ctx)
    with pytest.raises(masa.BadFormatError, match="not a compressed model"):
        sf.save_file({"a": np.zeros(1, np.float32)}, tmp_path / "plain", context=ctx)
        sf.load_model(ctx, tmp_path / "plain")
    assert sorted(os.listdir(tmp_path)) == ["plain"]
