"""Weight policy through the binding: Layer.set_weight_policy(),
weight_policy and refresh_weights() against the float64 reference, the
stale-cache rule of masa.h, decoding with cached weights, and bad values."""

import numpy as np
import pytest

import masa
import reference as ref
from helpers import assert_close, build_layer, reference_grads


def test_cached_and_on_the_fly_match_reference(ctx, rng):
    built = build_layer(ctx, rng, d_model=16, n_heads=4, causal=True, rope=True,
                        masa_proj="qko", bias_proj="qv", n_atoms=3)
    layer = built.layer
    assert layer.weight_policy is masa.WeightPolicy.ON_THE_FLY
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 16)).astype(np.float32)
    y_ref, dx_ref, g_ref = reference_grads(built, x, dy)
    results = {}
    for policy in ("on_the_fly", "cached"):
        layer.set_weight_policy(policy)
        assert layer.weight_policy.name.lower() == policy
        y, reserve = layer.forward(x, training=True)
        dx, grads = layer.backward(dy, reserve)
        assert_close(y, y_ref, what=f"{policy} y")
        assert_close(dx, dx_ref, what=f"{policy} dx")
        for name, want in g_ref.items():
            assert_close(grads[name], want, what=f"{policy} {name}")
        results[policy] = y
    assert_close(results["cached"], results["on_the_fly"], what="cached vs on the fly")


def test_cache_is_stale_until_refresh(ctx, rng):
    built = build_layer(ctx, rng, d_model=12, n_heads=3, causal=True, n_atoms=2)
    layer = built.layer
    x = rng.standard_normal((1, 4, 12)).astype(np.float32)
    layer.set_weight_policy(masa.WeightPolicy.CACHED)
    y_old = layer.forward(x)
    _, d, c, _ = built.params["q"]
    d.atoms[...] *= 1.5  # wrapped memory: the library sees the change
    c.values[...] += 0.25
    y_new_ref, _ = ref.forward(built.cfg, x, built.weights(), built.bias64())
    np.testing.assert_array_equal(layer.forward(x), y_old)  # stale, as documented
    layer.refresh_weights()
    y = layer.forward(x)
    assert_close(y, y_new_ref, what="after refresh")
    assert np.max(np.abs(y - y_old)) > 1e-2
    layer.set_weight_policy(0)  # on the fly sees changes at once
    d.atoms[...] *= 0.5
    y_ref, _ = ref.forward(built.cfg, x, built.weights(), built.bias64())
    assert_close(layer.forward(x), y_ref, what="on the fly")


def test_decode_reads_the_cache(ctx, rng):
    built = build_layer(ctx, rng, d_model=16, n_heads=4, n_kv_heads=2, causal=True,
                        rope=True, n_atoms=8, n_layers=8, layer_index=3)
    layer = built.layer
    layer.set_weight_policy("cached")
    B, T = 1, 6
    x = rng.standard_normal((B, T, 16)).astype(np.float32)
    y_fwd = layer.forward(x)
    cache = masa.KVCache(layer, B, T)
    parts = [layer.decode(cache, x[:, :2].copy())]
    for t in range(2, T):
        parts.append(layer.decode(cache, x[:, t:t + 1].copy()))
    assert_close(np.concatenate(parts, axis=1), y_fwd, what="decode vs forward (cached)")


@pytest.mark.parametrize("bad", [2, -1, "dense", None, True, 1.0])
def test_bad_policy(ctx, rng, bad):
    layer = build_layer(ctx, rng, d_model=8, n_heads=2).layer
    layer.set_weight_policy("cached")
    with pytest.raises(ValueError, match="policy"):
        layer.set_weight_policy(bad)
    assert layer.weight_policy is masa.WeightPolicy.CACHED
