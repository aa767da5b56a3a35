"""Incremental decoding through the binding: masa.KVCache and Layer.decode()
against forward() and the float64 reference, the documented cache layout,
and errors."""

import numpy as np
import pytest

import masa
import reference as ref
from helpers import assert_close, build_layer

CONFIGS = {
    "mha-masa-rope-bias": dict(d_model=16, n_heads=4, causal=True, rope=True,
                               bias_proj="qkvo"),
    "gqa-mixed": dict(d_model=24, n_heads=6, n_kv_heads=2, causal=True, rope=True,
                      rope_theta=500.0, masa_proj="qv", bias_proj="k"),
    "mqa-dense": dict(d_model=12, n_heads=4, n_kv_heads=1, causal=True, masa_proj=""),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_matches_forward_and_reference(ctx, rng, name):
    built = build_layer(ctx, rng, **CONFIGS[name])
    layer = built.layer
    B, T = 2, 7
    x = rng.standard_normal((B, T, layer.d_model)).astype(np.float32)
    y_ref, _ = ref.forward(built.cfg, x, built.weights(), built.bias64())
    y_fwd = layer.forward(x)

    cache = masa.KVCache(layer, B, T)
    parts = [layer.decode(cache, x[:, :3].copy())]  # prefill chunk
    for t in range(3, T):
        parts.append(layer.decode(cache, x[:, t:t + 1].copy()))
    y = np.concatenate(parts, axis=1)
    assert cache.length == T
    assert_close(y, y_ref, what="decode vs reference")
    assert_close(y, y_fwd, what="decode vs forward")


def test_cache_layout_holds_rotated_keys_and_values(ctx, rng):
    built = build_layer(ctx, rng, d_model=16, n_heads=4, n_kv_heads=2, causal=True,
                        rope=True, bias_proj="kv")
    layer, cfg = built.layer, built.cfg
    B, T = 2, 5
    x = rng.standard_normal((B, T, layer.d_model)).astype(np.float32)
    cache = masa.KVCache(layer, B, T + 3)
    layer.decode(cache, x[:, :2].copy())
    layer.decode(cache, x[:, 2:].copy())
    W, b = built.weights(), built.bias64()
    G, hd = cfg.n_kv_heads, cfg.head_dim
    k = (x.astype(np.float64) @ W["k"] + b["k"]).reshape(B, T, G, hd)
    v = (x.astype(np.float64) @ W["v"] + b["v"]).reshape(B, T, G, hd)
    cos, sin = ref.rope_angles(T, hd, cfg.rope_theta, 0)
    k = ref.rope(k, cos, sin)
    assert cache.keys.shape == (B, G, T, hd)
    assert_close(cache.keys, k.transpose(0, 2, 1, 3), what="keys")
    assert_close(cache.values, v.transpose(0, 2, 1, 3), what="values")
    assert not cache.keys.flags.writeable


def test_truncate_and_reset(ctx, rng):
    built = build_layer(ctx, rng, d_model=8, n_heads=2, causal=True, rope=True)
    layer = built.layer
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    cache = masa.KVCache(layer, 1, 4)
    y = layer.decode(cache, x)
    cache.truncate(3)
    assert cache.length == 3
    y3 = layer.decode(cache, x[:, 3:].copy())
    assert_close(y3, y[:, 3:], what="regenerated token")
    cache.reset()
    assert cache.length == 0
    assert "0/4" in repr(cache)


def test_decode_errors(ctx, rng):
    built = build_layer(ctx, rng, d_model=8, n_heads=2, causal=True)
    layer = built.layer
    cache = masa.KVCache(layer, 1, 2)
    x = rng.standard_normal((1, 2, 8)).astype(np.float32)
    layer.decode(cache, x)
    with pytest.raises(masa.OutOfRangeError, match="full"):
        layer.decode(cache, x[:, :1].copy())
    assert cache.length == 2
    with pytest.raises(masa.OutOfRangeError):
        cache.truncate(3)
    with pytest.raises(masa.BadShapeError, match="batch"):
        layer.decode(masa.KVCache(layer, 2, 2), x)
    other = build_layer(ctx, rng, d_model=8, n_heads=2, causal=True).layer
    with pytest.raises(masa.InvalidArgumentError, match="another layer"):
        other.decode(cache, x[:, :1].copy())
    non_causal = build_layer(ctx, rng, d_model=8, n_heads=2, causal=False).layer
    with pytest.raises(masa.InvalidArgumentError, match="causal"):
        masa.KVCache(non_causal, 1, 2)
    with pytest.raises(TypeError):
        layer.decode("cache", x)
    with pytest.raises(ValueError, match="shape"):
        layer.decode(masa.KVCache(layer, 1, 2), x[:, :, :4].copy())
    with pytest.raises(ValueError, match="overlap"):
        layer.decode(masa.KVCache(layer, 1, 2), x, out=x)
    cache.close()
    with pytest.raises(masa.ClosedHandleError):
        layer.decode(cache, x)


def test_closing_the_context_closes_caches(rng):
    c = masa.Context(n_threads=1)
    built = build_layer(c, rng, d_model=8, n_heads=2, causal=True)
    cache = masa.KVCache(built.layer, 1, 3)
    c.close()
    assert cache.closed and built.layer.closed
