"""P5: a KVCache (or a reserve) filled by a closed layer, offered to a new
layer; and parameters modified between forward and backward or between
decode calls."""

from _probe import (assert_close, build_layer, done, expect_raises, masa, np,
                    reference_grads, x_of)

rng = np.random.default_rng(5)
ctx = masa.Context(1)
x = x_of(rng, 1, 6, 8)


def make():
    return build_layer(ctx, np.random.default_rng(6), 8, 2, causal=True, rope=True,
                       bias_proj="q")


a = make()
cache = masa.KVCache(a.layer, 1, 16)
a.layer.decode(cache, x[:, :4])
y, reserve = a.layer.forward(x, training=True)
a.layer.close()
b = make()  # same parameters; the allocator may reuse a's address
expect_raises(masa.InvalidArgumentError, lambda: b.layer.decode(cache, x[:, 4:]),
              "decode with a closed layer's cache", "another layer")
assert cache.length == 4
cache.reset()
y_ref, _, _ = reference_grads(b, x, np.zeros_like(x))
assert_close(b.layer.decode(cache, x), y_ref, what="decode after reset")

# parameters modified between forward and backward: refused, then right
dy = rng.standard_normal(x.shape).astype(np.float32)
d = b.params["k"][1]
c = b.params["v"][2]
w_dense = None
for name, change in (("init_uniform", lambda: d.init_uniform(0.3, 9)),
                     ("atoms + touch", lambda: (d.atoms.__setitem__((0, 0, 0), 1.5), d.touch())),
                     ("add_uniform", lambda: c.add_uniform(0.2, 3)),
                     ("values + touch", lambda: (c.values.__setitem__((0, 0), 0.5), c.touch())),
                     ("policy", lambda: b.layer.set_weight_policy("cached")),
                     ("refresh", b.layer.refresh_weights)):
    _, reserve = b.layer.forward(x, training=True)
    change()
    expect_raises(masa.InvalidArgumentError, lambda: b.layer.backward(dy, reserve),
                  name, "parameters were modified")
    b.layer.refresh_weights()
    _, reserve = b.layer.forward(x, training=True)
    dx, g = b.layer.backward(dy, reserve)
    _, dx_ref, g_ref = reference_grads(b, x, dy)
    assert_close(dx, dx_ref, what=f"dx after {name}")
    for k in g:
        assert_close(g[k], g_ref[k], what=f"{k} after {name}")
    # decode refuses a filled cache after a change
    cache.reset()
    b.layer.decode(cache, x[:, :2])
    change()
    b.layer.refresh_weights()
    expect_raises(masa.InvalidArgumentError, lambda: b.layer.decode(cache, x[:, 2:3]),
                  f"decode after {name}", "stale")
    cache.reset()
cache.close()
ctx.close()
done("p5")
