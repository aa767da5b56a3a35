"""The perplexity recipe (masa.evaluate) on the real SmolLM2: text and
tokens as DESIGN.md section 6 says, window layout, the calibration split,
and 2 of the 40 windows scored through transformers and through libmasa."""

import math

import numpy as np
import pytest

from conftest import truncated
from masa import evaluate, hf


@pytest.fixture(scope="module")
def corpus(smollm2):
    return evaluate.Corpus(smollm2[1])


def test_text_and_tokens(corpus):
    text = evaluate.fortunes_text()
    assert 2_500_000 < len(text) < 2_700_000
    assert len(corpus) == 729_521  # DESIGN.md section 6


def test_window_layout_and_calibration_split(corpus):
    n = len(corpus)
    starts = evaluate.evaluation_starts(n)
    assert len(starts) == 40 and starts[0] == 0 and starts[-1] == n - 512
    assert starts[1] == (n - 512) // 39
    cal = evaluate.calibration_windows(n, 64, 512)
    for c in cal:
        for s in starts:
            assert c + 512 <= s or s + 512 <= c  # never overlaps an evaluation window
    assert len(set(cal)) == 64
    with pytest.raises(ValueError):
        evaluate.calibration_windows(n, 39 * 40, 512)  # 40 per gap do not fit
    seqs = corpus.calibration(4, 128)
    assert seqs.shape == (4, 128)


def test_two_windows_transformers_and_libmasa(smollm2, corpus, ctx):
    model, _ = smollm2
    windows = corpus.evaluation(which=[0, 39])
    assert [len(w) for _, w in windows] == [512, 512]
    ref = evaluate.perplexity(model, windows, progress=False)
    assert ref["tokens"] == 1022
    swapped = truncated(model, model.config.num_hidden_layers)
    hf.swap_attention(swapped, context=ctx)
    got = evaluate.perplexity(swapped, windows, progress=False)
    assert abs(got["ppl"] - ref["ppl"]) <= 1e-4 * ref["ppl"]
    assert math.isfinite(ref["ppl"]) and 5 < ref["ppl"] < 200
