"""masa.compress on real SmolLM2 weights: the C core against the float64
reference, and the pipeline end to end on the first 4 layers (compress,
write, reload through libmasa and materialised; both agree)."""

import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import truncated
from masa import hf
from masa.layer import WeightPolicy
from masa.compress import (attention_weights, compress_model, load_compressed, methods,
                           save)
from masa.compress.c_core import CCore
from masa.compress.core import NumpyCore


@pytest.fixture(scope="module")
def weights(small_model):
    return attention_weights(small_model[0])


def test_c_core_matches_reference_on_real_weights(weights):
    w = weights["k"]  # 4 x 576 x 192
    c, r = CCore(), NumpyCore()
    g1, g2 = c.gram(list(w)), r.gram(list(w))
    assert np.abs(g1 - g2).max() <= 1e-12 * np.abs(g2).max()
    a1, c1, e1 = c.matrix_pca(list(w), 2)
    a2, c2, e2 = r.matrix_pca(list(w), 2)
    assert np.abs(e1 - e2).max() <= 1e-10 * e2[0]
    rec1 = np.einsum("ls,sij->lij", c1.astype(np.float64), a1.astype(np.float64))
    rec2 = np.einsum("ls,sij->lij", c2.astype(np.float64), a2.astype(np.float64))
    assert np.abs(rec1 - rec2).max() <= 1e-5 * np.abs(rec2).max()
    budget = int(0.7 * w.size)
    assert c.group_plan(g1, 576, 192, budget)[:2] == r.group_plan(g2, 576, 192, budget)[:2]
    # nearly orthogonal layers: 2 of 4 atoms capture about half the energy
    assert 0.4 < e1[:2].sum() / e1.sum() < 0.75


def test_residual_c_matches_reference(weights, small_model):
    w = weights["q"][1]
    x = np.random.default_rng(0).standard_normal((700, 576))
    cmat = x.T @ x
    a1, b1, i1 = CCore().residual(w, None, cmat, 32)
    a2, b2, i2 = NumpyCore().residual(w, None, cmat, 32)
    assert abs(i1["error_after"] - i2["error_after"]) <= 1e-5 * i2["error_before"]
    assert np.abs(a1 @ b1 - a2 @ b2).max() <= 1e-4 * np.abs(a2 @ b2).max()
    assert i1["error_after"] < i1["error_before"]


@pytest.mark.parametrize("method", ["full", "svd"])
def test_pipeline_end_to_end(small_model, ctx, tmp_path, method):
    model, tok = small_model
    m = truncated(model, 4)
    results, config, report = compress_model(m, tok, method, 0.3, source="smollm2",
                                             calib_sequences=2, calib_len=256, context=ctx)
    if method == "full":  # whitened: calibrated on 2 x 256 tokens
        assert report["calibration"]["rows"] == 512
    else:
        assert report["calibration"] is None
    kept, dense = report["attention_params_kept"], report["attention_params_dense"]
    assert kept <= 0.7 * dense and kept > 0.6 * dense
    assert kept == sum(methods.count_params(r, r["groups"][0]["atoms"].shape[1:] if r["groups"]
                                            else (r["lowrank"][0][0].shape[0], r["lowrank"][0][1].shape[1]))
                       for r in results.values())
    save(tmp_path, results, config, report)
    ids = tok("Why did the chicken cross the road? To get to the other side. " * 4,
              return_tensors="pt", add_special_tokens=False).input_ids[:, :64]
    a = truncated(model, 4)
    a, _, info = load_compressed(tmp_path, path="materialised", model=a, tokenizer=tok)
    assert info["path"] == "materialised"
    b = truncated(model, 4)
    b, _, info = load_compressed(tmp_path, path="libmasa", model=b, tokenizer=tok, context=ctx)
    assert info["path"] == "libmasa"
    assert isinstance(b.model.layers[0].self_attn, hf.LibmasaAttention)
    with torch.no_grad():
        la = a(input_ids=ids, use_cache=False).logits.double()
        lb = b(input_ids=ids).logits.double()
        l0 = model(input_ids=ids, use_cache=False).logits.double()
    assert ((la - lb).norm() / la.norm()).item() < 1e-4
    # compression changed the model, but not beyond recognition
    assert 1e-4 < ((la - l0).norm() / l0.norm()).item() < 0.5
    # greedy decoding through libmasa's KV cache, which keeps each layer's
    # composed weights for the session, gives the materialised model's tokens
    prompt = ids[:, :16]
    with torch.no_grad():
        want = a.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(hf.greedy_generate(b, prompt, 8), want)
    with hf.decoding(b, 32):
        assert all(l.self_attn.core.c_layer().weight_policy == WeightPolicy.CACHED
                   for l in b.model.layers)
    assert all(l.self_attn.core.c_layer().weight_policy == WeightPolicy.ON_THE_FLY
               for l in b.model.layers)


def test_healing_trains_only_compressed_parameters(small_model, ctx):
    from masa.compress.heal import heal

    model, tok = small_model
    m = truncated(model, 4)  # 4 layers: the budget leaves room for an atom
    results, _, _ = compress_model(m, tok, "full", 0.2, source="smollm2", calib_sequences=2,
                                   calib_len=128, context=ctx)
    frozen = {k: v.detach().clone() for k, v in m.state_dict().items()}
    healed, rep = heal(m, tok, results, steps=3, lr=1e-3, seq_len=32, context=ctx, heldout=0)
    assert rep["steps"] == 3 and rep["tokens"] == 96 and rep["parameters_trained"] > 0
    # every kind of compressed parameter moved
    for p in "qkvo":
        before, after = results[p], healed[p]
        if before["groups"]:
            assert not np.array_equal(before["groups"][0]["atoms"], after["groups"][0]["atoms"])
            assert not np.array_equal(before["groups"][0]["coefs"], after["groups"][0]["coefs"])
        a0, b0 = before["lowrank"][0]
        a1, b1 = after["lowrank"][0]
        assert a1.shape == a0.shape and not np.array_equal(a0, a1) and not np.array_equal(b0, b1)
    # the rest of the model is untouched and its attention is the original again
    for k, v in m.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not isinstance(m.model.layers[0].self_attn, hf.LibmasaAttention)


PLAN = {"q": {"groups": [{"start": 0, "atoms": 2}, {"start": 2, "atoms": 1}], "ranks": 8},
        "k": {"groups": [{"start": 0, "layers": 4, "atoms": 1}], "ranks": {"1": 4, "3": 2}},
        "o": {"ranks": 16}}  # v left out: stays dense


def _stats_of(small_model, ctx):
    from masa.compress import calibration_data

    model, tok = small_model
    stats, _, _ = calibration_data(model, tok, 1, 128, context=ctx)
    return lambda l, key: stats[(l, key)]


def test_explicit_plan_against_float64_reference(weights, small_model, ctx):
    """The plan's groups, atoms and ranks exactly; the C core's result
    against the float64 numpy reference; exact parameter counts."""
    stats = _stats_of(small_model, ctx)
    got = methods.compress_with_plan(CCore(ctx), weights, PLAN, stats)
    ref = methods.compress_with_plan(NumpyCore(), weights, PLAN, stats)
    assert sorted(got) == ["k", "o", "q"]
    assert [g["atoms"].shape[0] for g in got["q"]["groups"]] == [2, 1]
    assert [g["count"] for g in got["q"]["groups"]] == [2, 2]
    assert sorted(got["k"]["lowrank"]) == [1, 3] and got["k"]["lowrank"][3][0].shape == (576, 2)
    assert got["o"]["groups"] == [] and sorted(got["o"]["lowrank"]) == [0, 1, 2, 3]
    n = 576 * 576
    assert got["q"]["params"] == 2 * (n + 2) + 1 * (n + 2) + 4 * 8 * (576 + 576)
    assert got["k"]["params"] == (576 * 192 + 4) + (4 + 2) * (576 + 192)
    assert got["o"]["params"] == 4 * 16 * (576 + 576)
    for p in got:
        shape = weights[p].shape[1:]
        for l in range(4):
            a = methods.reconstruct(got[p], l, shape).astype(np.float64)
            b = methods.reconstruct(ref[p], l, shape).astype(np.float64)
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), (p, l)


@pytest.mark.parametrize("bad, match", [
    ({"x": {"ranks": 1}}, "unknown projection"),
    ({"q": {"groups": [{"start": 1, "atoms": 1}], "ranks": 1}}, "begin at 0"),
    ({"q": {"groups": [{"start": 0, "atoms": 5}]}}, "cannot have 5 atoms"),
    ({"q": {"groups": [{"start": 0, "layers": 3, "atoms": 1}]}}, "has 4 layers"),
    ({"q": {"ranks": 577}}, "ranks must be"),
    ({"q": {"ranks": {"1": 3}}}, "every layer needs a rank"),
    ({}, "non-empty"),
])
def test_explicit_plan_errors(weights, bad, match):
    with pytest.raises(ValueError, match=match):
        methods.parse_plan(bad, weights)


def test_written_model_loads_in_libmasa(small_model, ctx, tmp_path):
    """What masa.compress writes is io.h's compressed-model format: libmasa's
    reader (masa_model_open) opens it and sets layers that compute what the
    reconstructed weights compute; the `masa` tool lists it."""
    import masa
    from masa import safetensors_file as sf

    model, tok = small_model
    m = truncated(model, 4)
    results, config, report = compress_model(m, tok, "full", None, source="smollm2",
                                             calib_sequences=1, calib_len=128, context=ctx,
                                             plan=PLAN)
    assert report["attention_params_kept"] == (sum(r["params"] for r in results.values())
                                               + 4 * 576 * 192)  # v dense
    save(tmp_path, results, config, report, context=ctx)
    f = sf.load_model(ctx, tmp_path / "attention.safetensors")
    assert f.projection("q").groups == ((0, 2, 2), (2, 2, 1))
    assert f.projection("o").kind == "lowrank" and f.projection("v").kind is None
    w = attention_weights(m)
    x = np.random.default_rng(1).standard_normal((1, 5, 576)).astype(np.float32)
    for l in range(4):
        geo = dict(n_kv_heads=3, head_dim=64, causal=True, rope=True, rope_theta=1e5)
        got = masa.Layer(ctx, 576, 9, **geo)
        got.set_dense("v", w["v"][l])
        f.apply(got, l)
        want = masa.Layer(ctx, 576, 9, **geo)
        for p in "qkvo":
            want.set_dense(p, w[p][l] if p == "v" else
                           methods.reconstruct(results[p], l, w[p].shape[1:]))
        y, y0 = got.forward(x).astype(np.float64), want.forward(x).astype(np.float64)
        assert np.abs(y - y0).max() <= 1e-4 * np.abs(y0).max()
    f.close()
    tool = os.path.join(os.path.dirname(os.environ.get("MASA_LIBRARY", "")), "..", "programs",
                        "masa", "masa")
    if os.path.exists(tool):
        out = subprocess.run([tool, "info", str(tmp_path / "attention.safetensors")],
                             capture_output=True, text=True, check=True).stdout
        assert "masa.q.group1.atoms" in out and "masa.o.layer3.lowrank_b" in out


def test_healing_keeps_the_step_with_the_best_heldout_loss(small_model, ctx):
    """A learning rate that wrecks the model: the held-out calibration loss
    rises, so healing keeps step 0 (the compressed parameters unchanged)."""
    from masa.compress.heal import heal

    model, tok = small_model
    m = truncated(model, 4)
    results, _, _ = compress_model(m, tok, "svd-llm", 0.2, source="smollm2", calib_sequences=2,
                                   calib_len=128, context=ctx)
    healed, rep = heal(m, tok, results, steps=2, lr=0.5, seq_len=32, context=ctx, heldout=2,
                       eval_every=1)
    steps, losses = zip(*rep["heldout_curve"])
    assert steps == (0, 1, 2) and min(losses[1:]) > losses[0]
    assert rep["best_step"] == 0 and rep["tokens"] == 64
    for p in "qkvo":
        for l, (a, b) in results[p]["lowrank"].items():
            np.testing.assert_array_equal(healed[p]["lowrank"][l][0], a)
            np.testing.assert_array_equal(healed[p]["lowrank"][l][1], b)
