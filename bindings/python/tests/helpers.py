"""Building layers with random parameters, and comparisons."""

import numpy as np

import masa
import reference as ref


def assert_close(got, want, tol=2e-4, what=""):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.abs(want).max()) if want.size else 1.0)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


class Built:
    """A masa.Layer plus everything the reference needs."""

    def __init__(self, layer, cfg, params, biases):
        self.layer = layer
        self.cfg = cfg
        self.params = params  # p -> ("masa", dictionary, coefficients, index) | ("dense", array)
        self.biases = biases  # p -> array or None

    def weights(self):
        W = {}
        for p, spec in self.params.items():
            if spec[0] == "masa":
                _, d, c, i = spec
                W[p] = ref.compose(d.atoms, c.values, i)
            else:
                W[p] = spec[1].astype(np.float64)
        return W

    def bias64(self):
        return {p: None if b is None else b.astype(np.float64) for p, b in self.biases.items()}


def build_layer(ctx, rng, d_model, n_heads, n_kv_heads=None, head_dim=None, causal=False,
                rope=False, rope_theta=None, scale=None, masa_proj="qkvo", bias_proj="",
                n_layers=3, n_atoms=2, layer_index=1, shared=None):
    """shared: optional {p: (Dictionary, Coefficients)} to reuse."""
    kw = dict(n_kv_heads=n_kv_heads or 0, head_dim=head_dim or 0, causal=causal, rope=rope,
              softmax_scale=scale or 0.0)
    if rope_theta is not None:
        kw["rope_theta"] = rope_theta
    layer = masa.Layer(ctx, d_model, n_heads, **kw)
    cfg = ref.Config(d_model, n_heads, n_kv_heads, head_dim, causal, rope,
                     rope_theta if rope_theta is not None else 10000.0, scale)
    params, biases = {}, {}
    for p, (d_in, d_out) in cfg.shapes().items():
        assert layer.projection_shape(p) == (d_in, d_out)
        if p in masa_proj:
            if shared is not None and p in shared:
                d, c = shared[p]
            else:
                atoms = rng.uniform(-0.4, 0.4, (n_atoms, d_in, d_out)).astype(np.float32)
                coef = rng.uniform(-1.0, 1.0, (n_layers, n_atoms)).astype(np.float32)
                d, c = masa.Dictionary.wrap(ctx, atoms), masa.Coefficients.wrap(ctx, coef)
            layer.set_masa(p, d, c, layer_index)
            params[p] = ("masa", d, c, layer_index)
        else:
            w = rng.uniform(-0.4, 0.4, (d_in, d_out)).astype(np.float32)
            layer.set_dense(p, w)
            params[p] = ("dense", w)
        if p in bias_proj:
            biases[p] = layer.set_bias(p, rng.uniform(-0.3, 0.3, d_out).astype(np.float32))
        else:
            biases[p] = None
    return Built(layer, cfg, params, biases)


def reference_grads(built, x, dy, pos_offset=0):
    """y, dx and {name: grad} from the float64 reference, named like
    Layer.backward's result."""
    W, b = built.weights(), built.bias64()
    y, cache = ref.forward(built.cfg, x, W, b, pos_offset)
    dx, dW, db = ref.backward(built.cfg, W, b, cache, dy)
    grads = {}
    for p, spec in built.params.items():
        if spec[0] == "masa":
            _, d, c, i = spec
            da, dc = ref.masa_grads(d.atoms, c.values, i, dW[p])
            grads[f"{p}.atoms"] = da
            grads[f"{p}.coefficients"] = dc
        else:
            grads[f"{p}.weight"] = dW[p]
        if b[p] is not None:
            grads[f"{p}.bias"] = db[p]
    return y, dx, grads
