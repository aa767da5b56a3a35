"""P1: closing a Dictionary, Coefficients or Context a live layer uses, then
set_weight_policy / refresh_weights / decode_workspace_size / forward."""

from _probe import (assert_close, build_layer, done, expect_raises, masa, np,
                    reference_grads, x_of)

rng = np.random.default_rng(1)
ctx = masa.Context(2)
built = build_layer(ctx, rng, 8, 2, causal=True, bias_proj="qv")
layer = built.layer
x = x_of(rng)
y_ref, _, _ = reference_grads(built, x, np.zeros_like(x))
_, d, c, _ = built.params["q"]

for obj in (d, c):
    expect_raises(masa.HandleInUseError, obj.close, f"{type(obj).__name__}.close", "open Layer")
    assert not obj.closed
layer.set_weight_policy("cached")
layer.refresh_weights()
assert layer.decode_workspace_size(2, 1) > 0
assert_close(layer.forward(x), y_ref, what="forward after refused closes (cached)")
layer.set_weight_policy("on_the_fly")
assert_close(layer.forward(x), y_ref, what="forward after refused closes (on the fly)")

# The context of the parameters, with the layer in another context.
ctx_params, ctx_layer = masa.Context(1), masa.Context(2)
shared = {p: (masa.Dictionary.wrap(ctx_params, built.params[p][1].atoms.copy()),
              masa.Coefficients.wrap(ctx_params, built.params[p][2].values.copy()))
          for p in "qkvo" if built.params[p][0] == "masa"}
other = build_layer(ctx_layer, np.random.default_rng(1), 8, 2, causal=True, bias_proj="qv",
                    shared=shared)
expect_raises(masa.HandleInUseError, ctx_params.close, "Context.close", "another context")
assert not ctx_params.closed and all(not dd.closed for dd, _ in shared.values())
other.layer.set_weight_policy("cached")
other.layer.refresh_weights()
assert other.layer.decode_workspace_size(2, 3) > 0
y_other, _, _ = reference_grads(other, x, np.zeros_like(x))
assert_close(other.layer.forward(x), y_other, what="forward after the refused context close")

# Closing in the documented order works, and then use is a clear error.
ctx_layer.close()
ctx_params.close()
assert other.layer.closed and all(dd.closed for dd, _ in shared.values())
expect_raises(masa.ClosedHandleError, lambda: other.layer.set_weight_policy("cached"), "closed")
expect_raises(masa.ClosedHandleError, other.layer.refresh_weights, "closed")
expect_raises(masa.ClosedHandleError, lambda: other.layer.decode_workspace_size(1, 1), "closed")
layer.close()
d.close()
c.close()
ctx.close()
done("p1")
