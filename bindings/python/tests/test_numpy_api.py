"""The numpy API against the float64 numpy reference."""

import threading
import ctypes
from ctypes import byref

import numpy as np
import pytest

import masa
from masa import _lib
import reference as ref
from helpers import assert_close, build_layer, reference_grads


def test_version_and_library():
    assert masa.version_number() // 10000 == masa.EXPECTED_MAJOR
    assert (masa.version_number() // 100) % 100 >= masa.EXPECTED_MINOR
    major, minor, patch = _lib.parse_version(masa.version_number())
    assert masa.version() == f"{major}.{minor}.{patch}"
    assert masa.library_path()
    assert isinstance(masa.blis_arch(), str) and masa.blis_arch()
    assert masa.status_string(0)
    assert masa.status_string(3)
    assert masa.status_string(12345) == "unknown status"


def test_every_function_declared():
    cdll = _lib.lib()
    for name, (restype, argtypes, _) in _lib.SIGNATURES.items():
        fn = getattr(cdll, name)
        assert fn.restype is restype, name
        assert list(fn.argtypes) == list(argtypes), name


def test_context(ctx):
    assert ctx.threads == 2
    with masa.Context(n_threads=1) as c1:
        assert c1.threads == 1
    assert c1.closed
    c1.close()  # second close is a no-op


def test_dictionary_zero_copy_and_init(ctx):
    atoms = np.zeros((3, 8, 5), np.float32)
    d = masa.Dictionary.wrap(ctx, atoms)
    assert d.atoms is atoms
    assert d.shape == (3, 8, 5)
    assert d.data_pointer() == atoms.ctypes.data
    d.init_uniform(seed=7)
    bound = 1.0 / np.sqrt(8)
    assert np.abs(atoms).max() <= bound + 1e-7
    assert np.abs(atoms).max() > 0.5 * bound
    again = masa.Dictionary(ctx, 3, 8, 5).init_uniform(seed=7)
    np.testing.assert_array_equal(again.atoms, atoms)
    other = masa.Dictionary(ctx, 3, 8, 5).init_uniform(0.25, seed=8)
    assert not np.array_equal(other.atoms, atoms)
    assert np.abs(other.atoms).max() <= 0.25
    d.close()
    assert d.closed and atoms.sum() != 0  # the array outlives the handle


def test_coefficients_patterns(ctx):
    c = masa.Coefficients(ctx, 6, 2)
    assert c.shape == (6, 2)
    assert c.data_pointer() == c.values.ctypes.data
    c.init_cyclic()
    want = np.zeros((6, 2), np.float32)
    want[np.arange(6), np.arange(6) % 2] = 1
    np.testing.assert_array_equal(c.values, want)
    c.init_blocks()
    want = np.zeros((6, 2), np.float32)
    want[np.arange(6), (np.arange(6) * 2) // 6] = 1
    np.testing.assert_array_equal(c.values, want)
    c.add_uniform(0.1, seed=3)
    assert 0 < np.abs(c.values - want).max() <= 0.1 + 1e-7


def test_compose(ctx, rng):
    atoms = rng.standard_normal((4, 6, 7)).astype(np.float32)
    coef = rng.standard_normal((5, 4)).astype(np.float32)
    d, c = masa.Dictionary.wrap(ctx, atoms), masa.Coefficients.wrap(ctx, coef)
    for layer in range(5):
        assert_close(d.compose(c, layer), ref.compose(atoms, coef, layer), 1e-5)
    out = np.empty((6, 7), np.float32)
    assert d.compose(c, 2, out=out) is out


def test_library_owned_objects_raw(ctx):
    """The library-owned create functions (used only through the raw API)."""
    L = _lib.lib()
    d, c = _lib.dictionary_p(), _lib.coefficients_p()
    L.masa_dictionary_create(ctx._handle(), 2, 3, 4, byref(d))
    L.masa_coefficients_create(ctx._handle(), 5, 2, byref(c))
    try:
        ptr = L.masa_dictionary_data(d)
        view = np.ctypeslib.as_array((_lib.c_float * 24).from_address(ptr))
        assert not view.any()
        L.masa_dictionary_init_uniform(d, 0.0, 1)
        assert view.any()
        assert not np.ctypeslib.as_array(
            (_lib.c_float * 10).from_address(L.masa_coefficients_data(c))).any()
    finally:
        L.masa_coefficients_destroy(c)
        L.masa_dictionary_destroy(d)
    L.masa_dictionary_destroy(None)  # destroy functions accept NULL


CONFIGS = {
    "plain-masa": dict(d_model=16, n_heads=4),
    "causal-gqa-rope-bias-mixed": dict(
        d_model=24, n_heads=6, n_kv_heads=2, causal=True, rope=True,
        masa_proj="qkv", bias_proj="qkvo"),
    "mqa-headdim-theta-scale": dict(
        d_model=20, n_heads=4, n_kv_heads=1, head_dim=6, causal=True, rope=True,
        rope_theta=500.0, scale=0.3, masa_proj="kvo", bias_proj="qv"),
    "dense": dict(d_model=12, n_heads=3, masa_proj="", bias_proj="o", causal=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("pos_offset", [0, 7])
def test_forward_backward_against_reference(ctx, rng, name, pos_offset):
    built = build_layer(ctx, rng, **CONFIGS[name])
    layer = built.layer
    x = rng.standard_normal((2, 5, layer.d_model)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y_ref, dx_ref, g_ref = reference_grads(built, x, dy, pos_offset)

    y_inf = layer.forward(x, pos_offset=pos_offset)
    y, reserve = layer.forward(x, pos_offset=pos_offset, training=True)
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == x.shape
    assert_close(y, y_ref, what="y")
    np.testing.assert_allclose(y_inf, y, rtol=1e-6, atol=1e-6)
    assert reserve.nbytes >= layer.reserve_size(2, 5)

    dx, grads = layer.backward(dy, reserve)
    assert_close(dx, dx_ref, what="dx")
    assert set(grads) == set(g_ref) == set(layer.gradient_shapes())
    for k in g_ref:
        assert grads[k].dtype == np.float32
        assert_close(grads[k], g_ref[k], what=k)


def test_backward_selected_and_accumulated(ctx, rng):
    built = build_layer(ctx, rng, 16, 4, causal=True, bias_proj="q", masa_proj="qko")
    layer = built.layer
    x = rng.standard_normal((1, 4, 16)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, _, g_ref = reference_grads(built, x, dy)
    layer.forward(x, training=True)

    dx, grads = layer.backward(dy, params=["q.atoms", "v.weight"], need_dx=False)
    assert dx is None and set(grads) == {"q.atoms", "v.weight"}
    assert_close(grads["v.weight"], g_ref["v.weight"])

    # ADD into caller buffers that already hold something.
    base = np.full((3, 2), 5.0, np.float32)
    out = {"k.coefficients": base, "q.bias": np.ones(16, np.float32)}
    _, grads = layer.backward(dy, out=out, accumulate=True, need_dx=False)
    assert grads["k.coefficients"] is base
    want = np.full((3, 2), 5.0) + g_ref["k.coefficients"]  # only row 1 changes
    assert_close(base, want)
    assert_close(out["q.bias"], 1.0 + g_ref["q.bias"])

    # SET overwrites.
    _, grads = layer.backward(dy, out={"q.bias": out["q.bias"]}, need_dx=False)
    assert_close(out["q.bias"], g_ref["q.bias"])


def test_shared_dictionary_gradients_sum_over_layers(ctx, rng):
    """Six layers sharing two atoms per projection; ADD into one buffer."""
    n_layers, S, d = 6, 2, 16
    shared = {}
    for p in "qkvo":
        atoms = rng.uniform(-0.3, 0.3, (S, d, d)).astype(np.float32)
        coef = rng.uniform(-1, 1, (n_layers, S)).astype(np.float32)
        shared[p] = (masa.Dictionary.wrap(ctx, atoms), masa.Coefficients.wrap(ctx, coef))
    layers = [build_layer(ctx, rng, d, 4, causal=True, rope=True, n_layers=n_layers,
                          n_atoms=S, layer_index=i, shared=shared) for i in range(n_layers)]
    acc = {f"{p}.{w}": np.zeros(a.shape, np.float32)
           for p in "qkvo" for w, a in (("atoms", shared[p][0].atoms),
                                        ("coefficients", shared[p][1].values))}
    want = {k: np.zeros(v.shape) for k, v in acc.items()}
    for built in layers:
        x = rng.standard_normal((2, 3, d)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        _, reserve = built.layer.forward(x, training=True)
        built.layer.backward(dy, reserve, out=acc, accumulate=True, need_dx=False)
        _, _, g = reference_grads(built, x, dy)
        for k in want:
            want[k] += g[k]
    for k in acc:
        assert_close(acc[k], want[k], what=k)


def test_out_buffers_and_last_reserve(ctx, rng):
    built = build_layer(ctx, rng, 8, 2)
    layer = built.layer
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    y = np.empty_like(x)
    y2, reserve = layer.forward(x, training=True, out=y)
    assert y2 is y and layer.last_reserve is reserve
    dx = np.empty_like(x)
    dx2, _ = layer.backward(np.ones_like(x), dx=dx)
    assert dx2 is dx


def test_zero_copy_parameters_are_live(ctx, rng):
    """Changing a wrapped array changes the layer's output (no copies)."""
    built = build_layer(ctx, rng, 8, 2, masa_proj="qkv", bias_proj="o")
    layer = built.layer
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    y0 = layer.forward(x)
    w = layer.weight("o")
    assert layer.c_weight_pointer("o") == w.ctypes.data
    assert layer.c_bias_pointer("o") == layer.bias("o").ctypes.data
    assert layer.c_weight_pointer("q") == 0 and layer.c_bias_pointer("q") == 0
    layer.bias("o")[:] += 1.0
    np.testing.assert_allclose(layer.forward(x), y0 + 1.0, rtol=1e-5, atol=1e-5)
    built.params["q"][1].atoms[:] = 0  # Q = 0: uniform attention
    y_ref, _ = ref.forward(built.cfg, x, built.weights(), built.bias64())
    assert_close(layer.forward(x), y_ref)


def test_set_dense_default_and_remove_bias(ctx, rng):
    layer = masa.Layer(ctx, 8, 2)
    ws = [layer.set_dense(p) for p in "qkvo"]
    assert all(not w.any() for w in ws)
    assert [layer.projection_kind(p) for p in "qkvo"] == ["dense"] * 4
    b = layer.set_bias("v")
    assert b.shape == (8,) and "v.bias" in layer.gradient_shapes()
    layer.remove_bias("v")
    assert layer.bias("v") is None and "v.bias" not in layer.gradient_shapes()
    x = rng.standard_normal((1, 2, 8)).astype(np.float32)
    assert not layer.forward(x).any()


def test_threads_share_a_layer(ctx, rng):
    built = build_layer(ctx, rng, 16, 4, causal=True, rope=True)
    xs = [rng.standard_normal((2, 6, 16)).astype(np.float32) for _ in range(4)]
    want = [built.layer.forward(x) for x in xs]
    got = [None] * 4

    def run(i):
        for _ in range(20):
            got[i] = built.layer.forward(xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_projection_names(ctx):
    layer = masa.Layer(ctx, 8, 2, n_kv_heads=1)
    assert layer.projection_shape("K") == layer.projection_shape(masa.K) == (8, 4)
    assert layer.projection_shape(np.int64(3)) == (8, 8)
    assert layer.n_kv_heads == 1 and layer.head_dim == 4


def test_declarations_cover_the_header():
    """Every MASA_API function of masa.h has a declaration (source checkout)."""
    import os
    import re

    header = os.path.join(os.path.dirname(__file__), "..", "..", "..", "include", "masa", "masa.h")
    if not os.path.exists(header):
        pytest.skip("masa.h not found (not a source checkout)")
    with open(header) as f:
        text = f.read()
    names = set(re.findall(r"MASA_API\s+[\w\s\*]*?\b(masa_\w+)\s*\(", text))
    assert len(names) > 30
    assert names == set(_lib.SIGNATURES)


def test_struct_sizes_match_the_library():
    L = _lib.lib()
    for struct, init in ((_lib.ContextOptions, L.masa_context_options_default),
                         (_lib.LayerOptions, L.masa_layer_options_default),
                         (_lib.LayerGrads, L.masa_layer_grads_default)):
        s = _lib.init_struct(struct, init)
        assert s.size >= _lib.KNOWN_SIZES[struct]
        if (masa.version_number() // 100) % 100 == masa.EXPECTED_MINOR:
            assert s.size == _lib.KNOWN_SIZES[struct], struct.__name__
    opts = _lib.init_struct(_lib.LayerOptions, L.masa_layer_options_default)
    assert opts.rope_theta == 10000.0 and opts.softmax_scale == 0.0
    grads = _lib.init_struct(_lib.LayerGrads, L.masa_layer_grads_default)
    assert grads.mode == _lib.GRAD_ADD and not any(grads.d_atoms)


def test_struct_layout_matches_the_header(tmp_path):
    """Field offsets of the ctypes structs equal the C compiler's."""
    import os
    import shutil
    import subprocess

    include = os.path.join(os.path.dirname(__file__), "..", "..", "..", "include")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists(os.path.join(include, "masa", "masa.h")):
        pytest.skip("needs a C compiler and a source checkout")
    fields = {
        "masa_context_options": (_lib._ContextOptionsFields,
                                 ["size", "n_threads", "malloc_fn", "free_fn", "alloc_user"]),
        "masa_layer_options": (_lib._LayerOptionsFields,
                               ["size", "d_model", "n_heads", "n_kv_heads", "head_dim", "causal",
                                "rope", "rope_theta", "softmax_scale"]),
        "masa_layer_grads": (_lib._LayerGradsFields,
                             ["size", "mode", "d_atoms", "d_coefficients", "d_weight", "d_bias"]),
    }
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <masa/masa.h>", "int main(void){"]
    for st, (_, names) in fields.items():
        lines.append(f'printf("{st} %zu\\n", sizeof({st}));')
        for n in names:
            lines.append(f'printf("{st}.{n} %zu\\n", offsetof({st}, {n}));')
    lines.append("return 0;}")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([cc, "-I", include, str(src), "-o", str(exe)], check=True)
    got = dict(line.split() for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.splitlines())
    for st, (cls, names) in fields.items():
        assert int(got[st]) == ctypes.sizeof(cls), st
        for n in names:
            assert int(got[f"{st}.{n}"]) == getattr(cls, n).offset, f"{st}.{n}"
