"""masa.hf against transformers on the real SmolLM2-135M weights."""

import copy

import pytest
import torch

from conftest import truncated
from masa import hf


def _ids(tok, n):
    text = "Q: What is the capital of France?\nA: The capital of France is Paris. " * 8
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :n]


@pytest.fixture(scope="module")
def pair(small_model, ctx):
    """(reference 4-layer model, the same with libmasa attention)."""
    model, tok = small_model
    swapped = truncated(model, 4)
    report = hf.swap_attention(swapped, context=ctx)
    assert report["path"] == "libmasa" and report["layers"] == [0, 1, 2, 3]
    return model, swapped, tok


def test_logits_match_transformers(pair):
    ref_model, model, tok = pair
    ids = _ids(tok, 96)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, use_cache=False).logits.double()
        out = model(input_ids=ids).logits.double()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    assert all(isinstance(l.self_attn, hf.LibmasaAttention) for l in model.model.layers)
    assert model.model.layers[0].self_attn.calls["forward"] >= 1


def test_batch_of_two_matches(pair):
    ref_model, model, tok = pair
    ids = torch.cat([_ids(tok, 40), _ids(tok, 41)[:, 1:]])
    with torch.no_grad():
        ref = ref_model(input_ids=ids, use_cache=False).logits.double()
        out = model(input_ids=ids).logits.double()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_greedy_generation_same_tokens(pair):
    ref_model, model, tok = pair
    prompt = _ids(tok, 24)
    with torch.no_grad():
        want = ref_model.generate(prompt, max_new_tokens=10, do_sample=False)
    got = hf.greedy_generate(model, prompt, 10)
    assert torch.equal(got, want)
    # transformers' own generate() inside a libmasa decoding session
    before = model.model.layers[0].self_attn.calls["decode"]
    with hf.decoding(model, 64):
        got2 = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(got2, want)
    assert model.model.layers[0].self_attn.calls["decode"] - before == 10


def test_unsupported_inputs_raise(pair):
    _, model, tok = pair
    ids = _ids(tok, 16)
    mask = torch.ones_like(ids)
    mask[:, :3] = 0  # left padding
    with pytest.raises(NotImplementedError, match="padding|positions|mask"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(NotImplementedError, match="decoding"):
        model(input_ids=ids, position_ids=torch.arange(5, 21).unsqueeze(0))


def test_uncovered_architecture_is_refused(small_model):
    model, _ = small_model
    m = truncated(model, 1)
    m.config = copy.deepcopy(m.config)
    m.config.rope_parameters = dict(m.config.rope_parameters or {}, rope_type="llama3", rope_theta=1e5)
    ok, why = hf.check_supported(m)
    assert not ok and "RoPE" in why
    with pytest.raises(NotImplementedError):
        hf.swap_attention(m)
    assert not isinstance(m.model.layers[0].self_attn, hf.LibmasaAttention)


def test_materialise_roundtrip(small_model):
    model, _ = small_model
    m = truncated(model, 2)
    w = {l: {p: getattr(m.model.layers[l].self_attn, hf.PROJ[p]).weight.detach().t().clone() * 0.5
             for p in "qkvo"} for l in range(2)}
    assert hf.materialise(m, w)["path"] == "materialised"
    got = m.model.layers[1].self_attn.k_proj.weight
    want = model.model.layers[1].self_attn.k_proj.weight * 0.5
    assert torch.equal(got, want)
