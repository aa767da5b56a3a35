"""python -m masa.replaceme end to end on the real SmolLM2-135M (small:
8 calibration sequences of 256 tokens, 3 evaluation windows of 256 tokens;
about 2 minutes on the shared 2-core machine, most of it forward passes):
2 blocks removed by least squares, the pruned model written, reloaded by
transformers with the same perplexity, and better than plain removal of
the same span."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from masa import replaceme as rm  # noqa: E402


@pytest.fixture(scope="module")
def fresh_smollm2():
    """Its own copy of the model: other tests of this directory change the
    session's shared one (attention swapped in place)."""
    torch.set_num_threads(2)
    return rm.load_model("smollm2")


def test_replaceme_ls_end_to_end(fresh_smollm2, ctx, tmp_path):
    model, tok = fresh_smollm2
    out = tmp_path / "pruned"
    args = rm.parse_args(["smollm2", "--blocks", "2", "--method", "ls", "--alpha", "1e-3",
                          "--calib-seqs", "8", "--calib-len", "256", "--eval",
                          "--eval-windows", "3", "--eval-len", "256", "--out", str(out),
                          "--threads", "2"])
    pruned = copy.deepcopy(model)
    report = rm.run(args, pruned, tok, ctx)

    # every candidate span of 2 blocks after block 0, the chosen one the closest
    cands = report["candidates"]
    assert [c["start"] for c in cands] == list(range(1, 29))
    best = min(cands, key=lambda c: c["distance"])
    span = report["spans"][0]
    assert (span["start"], span["end"]) == (best["start"], best["end"])
    assert span["rows"] == 8 * 256
    assert report["layers_after"] == 28 and len(pruned.model.layers) == 28

    # the written model reloads with the same perplexity
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reloaded.eval()
    assert reloaded.config.num_hidden_layers == 28
    tokens = rm.corpus_tokens(tok)
    starts = rm.eval_starts(len(tokens), 3, 256)
    ppl_reloaded = rm.perplexity(reloaded, tokens, starts, 256, progress=None)
    assert abs(ppl_reloaded - report["ppl_after"]) <= 1e-4 * report["ppl_after"]

    # plain removal of the same span is worse
    plain = copy.deepcopy(model)
    rm.remove_blocks(plain, span["start"], 2)
    ppl_plain = rm.perplexity(plain, tokens, starts, 256, progress=None)
    assert report["ppl_after"] < ppl_plain, (report["ppl_after"], ppl_plain)
    assert np.isfinite(report["ppl_before"]) and report["ppl_before"] < ppl_plain
