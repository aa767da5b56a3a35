"""Bad input raises clear Python exceptions; nothing crashes the interpreter."""

import copy
import gc
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import masa
from masa import _lib
from helpers import build_layer

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def layer(ctx, rng):
    return build_layer(ctx, rng, 8, 2, causal=True, bias_proj="q").layer


def x_of(shape=(2, 3, 8), dtype=np.float32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------- arrays


@pytest.mark.parametrize("bad", [
    x_of(dtype=np.float64),
    x_of(dtype=np.float16),
    x_of().astype(">f4"),
    x_of().tolist(),
    "not an array",
])
def test_forward_wrong_type_or_dtype(layer, bad):
    with pytest.raises(TypeError, match="x must"):
        layer.forward(bad)


@pytest.mark.parametrize("bad", [
    x_of((2, 3, 16))[:, :, ::2],           # strided
    np.asfortranarray(x_of()),             # Fortran order
    x_of((3, 2, 8)).transpose(1, 0, 2),    # permuted
])
def test_forward_non_contiguous(layer, bad):
    assert not bad.flags.c_contiguous
    with pytest.raises(ValueError, match="C-contiguous"):
        layer.forward(bad)


def test_forward_misaligned(layer):
    raw = np.zeros(2 * 3 * 8 * 4 + 1, np.uint8)
    bad = raw[1:].view(np.float32).reshape(2, 3, 8)
    assert not bad.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        layer.forward(bad)


@pytest.mark.parametrize("shape", [(2, 3, 7), (3, 8), (2, 3, 8, 1), (8,)])
def test_forward_wrong_shape(layer, shape):
    with pytest.raises(ValueError, match="shape"):
        layer.forward(x_of(shape))


def test_forward_bad_scalars(layer):
    with pytest.raises(ValueError, match="pos_offset"):
        layer.forward(x_of(), pos_offset=-1)
    with pytest.raises(TypeError, match="pos_offset"):
        layer.forward(x_of(), pos_offset=1.5)


def test_forward_bad_out(layer):
    x = x_of()
    with pytest.raises(ValueError, match="overlap"):
        layer.forward(x, out=x)
    with pytest.raises(ValueError, match="shape"):
        layer.forward(x, out=np.empty((2, 3, 9), np.float32))
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        layer.forward(x, out=ro)


def test_backward_bad_input(ctx, rng, layer):
    x = x_of()
    with pytest.raises(ValueError, match="no reserve"):
        masa.Layer(ctx, 8, 2).backward(x)
    y, reserve = layer.forward(x, training=True)
    with pytest.raises(ValueError, match="shape"):
        layer.backward(x_of((2, 4, 8)), reserve)
    with pytest.raises(TypeError, match="dy"):
        layer.backward(y.astype(np.float64), reserve)
    with pytest.raises(ValueError, match="C-contiguous"):
        layer.backward(np.asfortranarray(y), reserve)
    with pytest.raises(TypeError, match="reserve"):
        layer.backward(y, reserve="nope")
    other = build_layer(ctx, rng, 8, 2).layer
    with pytest.raises(ValueError, match="different layer"):
        other.backward(y, reserve)
    with pytest.raises(ValueError, match="unknown gradient"):
        layer.backward(y, reserve, params=["k.bias"])
    with pytest.raises(ValueError, match="unknown gradient"):
        layer.backward(y, reserve, out={"nope": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        layer.backward(y, reserve, out={"q.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="overlap"):
        layer.backward(y, reserve, dx=y)
    with pytest.raises(ValueError, match="overlap"):
        layer.backward(y, reserve, out={"q.bias": x.reshape(-1)[:8]})
    layer.set_bias("k")
    with pytest.raises(masa.InvalidArgumentError, match="parameters were modified"):
        layer.backward(y, reserve)


def test_wrap_bad_arrays(ctx):
    with pytest.raises(TypeError, match="float32"):
        masa.Dictionary.wrap(ctx, np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="shape"):
        masa.Dictionary.wrap(ctx, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        masa.Dictionary.wrap(ctx, np.zeros((2, 3, 8), np.float32)[:, :, ::2])
    ro = np.zeros((2, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        masa.Coefficients.wrap(ctx, ro)
    with pytest.raises(TypeError):
        masa.Coefficients(ctx, 3)
    with pytest.raises(ValueError, match="n_atoms"):
        masa.Dictionary(ctx, -1, 2, 2)
    with pytest.raises(TypeError, match="context"):
        masa.Dictionary(None, 1, 2, 2)


def test_set_projection_bad_input(ctx, layer):
    with pytest.raises(ValueError, match="shape"):
        layer.set_dense("q", np.zeros((8, 9), np.float32))
    with pytest.raises(ValueError, match="projection"):
        layer.set_dense("x")
    with pytest.raises(ValueError, match="projection"):
        layer.set_bias(4)
    with pytest.raises(TypeError, match="Dictionary"):
        layer.set_masa("q", np.zeros((2, 8, 8), np.float32), None, 0)


# ------------------------------------------------- errors from the library


def test_library_errors_carry_status_and_message(ctx):
    d_wrong = masa.Dictionary(ctx, 2, 8, 5)
    coef = masa.Coefficients(ctx, 3, 2)
    layer = masa.Layer(ctx, 8, 2)
    with pytest.raises(masa.BadShapeError) as e:
        layer.set_masa("q", d_wrong, coef, 0)
    err = e.value
    assert isinstance(err, masa.MasaError) and isinstance(err, ValueError)
    assert err.status == 3 and err.function == "masa_layer_set_masa"
    assert err.message and err.message in str(err)
    assert err.status_name == masa.status_string(3)

    d = masa.Dictionary(ctx, 2, 8, 8)
    with pytest.raises(masa.OutOfRangeError) as e:
        layer.set_masa("q", d, coef, 3)
    assert e.value.status == 4 and e.value.message

    with pytest.raises(masa.BadShapeError):
        layer.set_masa("q", d, masa.Coefficients(ctx, 3, 5), 0)


def test_bad_layer_options(ctx):
    with pytest.raises(masa.MasaError) as e:
        masa.Layer(ctx, 8, 3)  # 8 is not a multiple of 3
    assert e.value.message
    with pytest.raises(masa.MasaError):
        masa.Layer(ctx, 8, 4, n_kv_heads=3)
    with pytest.raises(masa.MasaError):
        masa.Layer(ctx, 8, 2, rope=True, head_dim=3)  # odd head_dim with RoPE
    with pytest.raises(masa.MasaError):
        masa.Layer(ctx, 0, 2)


def test_not_ready(ctx):
    layer = masa.Layer(ctx, 8, 2)
    layer.set_dense("q")
    with pytest.raises(masa.NotReadyError) as e:
        layer.forward(x_of())
    assert e.value.status == 9 and e.value.message


def test_bad_init_arguments(ctx):
    d = masa.Dictionary(ctx, 1, 2, 2)
    with pytest.raises(masa.InvalidArgumentError):
        d.init_uniform(-1.0)
    with pytest.raises(masa.InvalidArgumentError):
        d.init_uniform(float("nan"))
    with pytest.raises(ValueError, match="seed"):
        d.init_uniform(seed=-1)
    with pytest.raises(masa.InvalidArgumentError):
        masa.Coefficients(ctx, 2, 1).add_uniform(float("inf"))


# ---------------------------------------------------------------- handles


def test_closed_handles(ctx, rng):
    built = build_layer(ctx, rng, 8, 2)
    layer = built.layer
    layer.close()
    layer.close()
    assert layer.closed
    for call in (lambda: layer.forward(x_of()), lambda: layer.set_dense("q"),
                 lambda: layer.workspace_size(1, 1), lambda: layer.backward(x_of())):
        with pytest.raises(masa.ClosedHandleError, match="Layer is closed"):
            call()

    # A dictionary or table an open layer uses cannot be closed: the layer
    # keeps it alive and usable.
    built = build_layer(ctx, rng, 8, 2)
    _, d, c, _ = built.params["q"]
    y = built.layer.forward(x_of())
    for obj in (d, c):
        with pytest.raises(masa.HandleInUseError, match="open Layer"):
            obj.close()
        assert not obj.closed
    np.testing.assert_array_equal(built.layer.forward(x_of()), y)
    # Once no open layer uses it, it closes, and cannot be used again.
    built.layer.set_masa("q", masa.Dictionary(ctx, 2, 8, 8), c, 0)
    d.close()
    assert d.closed
    with pytest.raises(masa.ClosedHandleError):
        d.init_uniform()
    with pytest.raises(masa.ClosedHandleError):
        built.layer.set_masa("q", d, c, 0)
    built.layer.forward(x_of())
    built.layer.close()
    c.close()
    assert c.closed


def test_closing_context_closes_children(rng):
    ctx = masa.Context(1)
    built = build_layer(ctx, rng, 8, 2)
    _, d, c, _ = built.params["k"]
    ctx.close()
    assert ctx.closed and built.layer.closed and d.closed and c.closed
    with pytest.raises(masa.ClosedHandleError):
        masa.Layer(ctx, 8, 2)
    with pytest.raises(masa.ClosedHandleError):
        _ = ctx.threads
    with pytest.raises(masa.ClosedHandleError):
        built.layer.forward(x_of())


def test_context_manager(ctx):
    with masa.Dictionary(ctx, 1, 2, 2) as d:
        assert not d.closed
    assert d.closed
    with pytest.raises(masa.ClosedHandleError):
        with d:
            pass


def test_no_copies(ctx):
    d = masa.Dictionary(ctx, 1, 2, 2)
    for op in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError):
            op(d)


def test_garbage_collection_keeps_parents_alive(rng):
    """Dropping every reference but the layer's must not free what it uses."""
    def make():
        ctx = masa.Context(1)
        return build_layer(ctx, rng, 8, 2, bias_proj="qkvo").layer

    layer = make()
    x = x_of()
    y0 = layer.forward(x)
    gc.collect()
    churn = [np.full((64, 64), 7.0, np.float32) for _ in range(200)]  # reuse freed memory
    np.testing.assert_array_equal(layer.forward(x), y0)
    del churn
    finalizer = layer._finalizer
    ctx = layer.context
    del layer
    gc.collect()
    assert not finalizer.alive
    ctx.close()


# --------------------------------------------------------------- loading


def run_python(code, env_extra=None, env_drop=()):
    env = dict(os.environ)
    for k in env_drop:
        env.pop(k, None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = PKG_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_missing_library_subprocess(tmp_path):
    missing = str(tmp_path / "nowhere" / "libmasa.so")
    r = run_python(
        """
        import masa  # must not need the library
        try:
            masa.Context()
        except masa.LibraryNotFoundError as e:
            print("CAUGHT", type(e).__name__, isinstance(e, OSError))
            print(e)
        """,
        {"MASA_LIBRARY": missing},
    )
    assert r.returncode == 0, r.stderr
    assert "CAUGHT LibraryNotFoundError True" in r.stdout
    assert missing in r.stdout and "MASA_LIBRARY" in r.stdout


def test_missing_library_uncaught_is_a_clean_error(tmp_path):
    r = run_python("import masa; masa.version()", {"MASA_LIBRARY": str(tmp_path / "x.so")})
    assert r.returncode == 1
    assert "LibraryNotFoundError" in r.stderr and "looked in" in r.stderr
    assert "Segmentation" not in r.stderr


def test_library_that_is_not_libmasa(tmp_path):
    junk = tmp_path / "libmasa.so"
    junk.write_text("not an ELF file")
    with pytest.raises(masa.LibraryNotFoundError, match="could not load"):
        _lib.load(environ={"MASA_LIBRARY": str(junk)})


def test_not_found_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setattr(_lib.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(masa.LibraryNotFoundError) as e:
        _lib.load(environ={}, package_dir=tmp_path / "pkg")
    text = str(e.value)
    for place in ("MASA_LIBRARY", "package directory", "bundled library", "build tree",
                  "find_library"):
        assert place in text
    assert len(e.value.searched) == 5
    assert "pip install ./bindings/python" in text


def test_lookup_order(tmp_path, monkeypatch):
    real = _lib.library_path()
    monkeypatch.setattr(_lib.ctypes.util, "find_library", lambda name: "libmasa.so.0")
    pkg = tmp_path / "src" / "bindings" / "python" / "masa"
    pkg.mkdir(parents=True)
    build = tmp_path / "src" / "build" / "lib"
    build.mkdir(parents=True)
    (build / "libmasa.so").symlink_to(real)
    places = _lib.candidate_locations(environ={}, package_dir=pkg)
    assert [p[0] for p in places] == [
        "$MASA_LIBRARY", "package directory", "bundled library", "build tree",
        "ctypes.util.find_library('masa')"]
    assert places[3] == ("build tree", str(build / "libmasa.so"), True)
    cdll, path = _lib.load(environ={}, package_dir=pkg)
    assert path == str(build / "libmasa.so")

    # The library pip bundles beats the build tree (a venv inside a checkout).
    bundled = pkg / "_libs" / "libmasa.so.0"
    bundled.parent.mkdir()
    bundled.symlink_to(real)
    assert _lib.candidate_locations(environ={}, package_dir=pkg)[2] == (
        "bundled library", str(bundled), True)
    assert _lib.load(environ={}, package_dir=pkg)[1] == str(bundled)

    # A copy put in the package directory by hand beats both.
    (pkg / "libmasa.so").symlink_to(real)
    assert _lib.load(environ={}, package_dir=pkg)[1] == str(pkg / "libmasa.so")
    # An explicit MASA_LIBRARY is the only place tried.
    places = _lib.candidate_locations(environ={"MASA_LIBRARY": "/nope.so"}, package_dir=pkg)
    assert places == [("$MASA_LIBRARY", "/nope.so", False)]


def test_masa_library_env_is_used():
    r = run_python("import masa; print(masa.library_path())",
                   {"MASA_LIBRARY": _lib.library_path()})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == _lib.library_path()


_NEEDED = _lib.EXPECTED_MAJOR * 10000 + _lib.EXPECTED_MINOR * 100


@pytest.mark.parametrize("number,ok", [
    # the needed minor, a later patch or minor: accepted
    (_NEEDED, True), (_NEEDED + 1, True), (_NEEDED + 99, True),
    (_NEEDED + 100, True),
    # an older minor, nothing, another major: refused
    (0, False), (_NEEDED - 1, False), (_NEEDED - 100, False),
    (_NEEDED + 10000, False),
])
def test_version_check(number, ok):
    if ok:
        _lib.check_version(number)
    else:
        with pytest.raises(masa.LibraryVersionError):
            _lib.check_version(number)


def test_exit_with_live_objects_is_clean():
    """Finalizers run at exit in any order without crashing."""
    r = run_python(
        """
        import numpy as np, masa
        ctx = masa.Context(2)
        layer = masa.Layer(ctx, 8, 2, causal=True)
        d = masa.Dictionary(ctx, 2, 8, 8).init_uniform(seed=1)
        c = masa.Coefficients(ctx, 2, 2).init_cyclic()
        for p in "qkvo":
            layer.set_masa(p, d, c, 1)
        y, r = layer.forward(np.ones((1, 2, 8), np.float32), training=True)
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_handle_destroyed_exactly_once():
    from masa._handle import Handle

    calls = []

    class Fake(Handle):
        def __init__(self, keep):
            self._init_handle(object(), calls.append, [keep])

    parent = object()
    h = Fake(parent)
    h.close()
    h.close()
    with pytest.raises(masa.ClosedHandleError):
        h.__enter__()
    assert len(calls) == 1 and h._keepalive == []  # references dropped after destroy

    with Fake(parent) as h2:
        pass
    h2.close()
    assert len(calls) == 2

    Fake(parent)  # dropped at once: the finalizer destroys it
    gc.collect()
    assert len(calls) == 3
