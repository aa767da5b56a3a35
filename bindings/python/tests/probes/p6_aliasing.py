"""P6: outputs overlapping the layer's own parameters are refused (forward
out=, backward out= and dx=, decode out=); nothing is written."""

from _probe import build_layer, done, expect_raises, masa, np, x_of

rng = np.random.default_rng(7)
ctx = masa.Context(1)
built = build_layer(ctx, rng, 8, 2, causal=True, masa_proj="qk", bias_proj="v")
layer = built.layer
x = x_of(rng, 2, 4, 8)
w_o = built.params["o"][1]
atoms_q = built.params["q"][1].atoms
bias_v = built.biases["v"]
before = [a.copy() for a in (w_o, atoms_q, bias_v)]
as_y = w_o.reshape(-1)[: x.size].reshape(x.shape)  # 64 floats, y needs 64

expect_raises(ValueError, lambda: layer.forward(x, out=as_y), "forward out=O weight",
              "o.weight")
y, reserve = layer.forward(x, training=True)
dy = np.ones_like(y)
expect_raises(ValueError, lambda: layer.backward(dy, reserve, out={"q.atoms": atoms_q}),
              "backward out=atoms", "q.atoms")
expect_raises(ValueError, lambda: layer.backward(dy, reserve, dx=as_y), "dx=O weight", "o.weight")
expect_raises(ValueError, lambda: layer.backward(dy, reserve, out={"o.weight": np.zeros_like(w_o),
                                                                   "v.bias": bias_v}),
              "backward out=bias", "v.bias")
cache = masa.KVCache(layer, 2, 8)
expect_raises(ValueError, lambda: layer.decode(cache, x, out=as_y), "decode out=O weight",
              "o.weight")
for a, b in zip((w_o, atoms_q, bias_v), before):
    np.testing.assert_array_equal(a, b)
assert cache.length == 0
# separate buffers work
dx, g = layer.backward(dy, reserve)
assert np.isfinite(dx).all()
ctx.close()
done("p6")
