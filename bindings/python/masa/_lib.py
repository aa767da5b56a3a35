"""Finding, loading and declaring libmasa (ctypes).

Lookup order (the first library that loads and has a compatible version wins):

1. ``MASA_LIBRARY`` -- full path of the shared library.  When this variable is
   set it is the only place tried: a wrong path is an error, never silently
   replaced by another copy.
2. A copy put inside the package directory by hand (``masa/libmasa.so*``).
3. The library bundled by ``pip install ./bindings/python``
   (``masa/_libs/libmasa.so.0``, built from the checkout by meson-python).
   It comes before the build tree so that an installed package uses the
   library it was built with, even from a venv inside a checkout.
4. The build tree of a source checkout: walking up from the package
   directory, every ``<dir>/build/lib/libmasa.so*``.
5. ``ctypes.util.find_library('masa')`` (the system's linker paths).

Every C function is declared with explicit ``argtypes`` and ``restype``;
functions returning a ``masa_status`` raise :class:`masa.MasaError` (through
``errcheck``) with the text of ``masa_last_error()``.

The library is loaded lazily, on first use, so ``import masa`` never fails
because of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_float,
    c_int,
    c_size_t,
    c_ubyte,
    c_uint,
    c_uint64,
    c_void_p,
)
from pathlib import Path

from .errors import (
    LibraryError,
    LibraryNotFoundError,
    LibraryVersionError,
    error_for_status,
)

# The C API version this binding was written for (masa.h).
EXPECTED_MAJOR = 0
EXPECTED_MINOR = 2
EXPECTED_VERSION_NUMBER = EXPECTED_MAJOR * 10000 + EXPECTED_MINOR * 100

NUM_PROJECTIONS = 4
MAX_POSITION = 2**32 - 1  # MASA_MAX_POSITION: the largest RoPE position
GRAD_SET = 0
GRAD_ADD = 1

ENV_VAR = "MASA_LIBRARY"

# ---------------------------------------------------------------------------
# Opaque handle types: distinct subclasses of c_void_p so that ctypes refuses
# a dictionary where a layer is expected.
# ---------------------------------------------------------------------------


class context_p(c_void_p):
    pass


class dictionary_p(c_void_p):
    pass


class coefficients_p(c_void_p):
    pass


class layer_p(c_void_p):
    pass


class kv_cache_p(c_void_p):
    pass


# ---------------------------------------------------------------------------
# Size-prefixed option structs.
#
# The *_init() functions write sizeof(struct) bytes *as the loaded library
# knows it*.  A newer library may know a larger struct, so every struct is
# allocated with a zeroed tail: _init can never write past our buffer, and we
# pass the struct back with the size the library itself chose (its defaults
# for fields we do not know stay in place).
# ---------------------------------------------------------------------------

_TAIL_BYTES = 512

malloc_fn = CFUNCTYPE(c_void_p, c_size_t, c_void_p)
free_fn = CFUNCTYPE(None, c_void_p, c_void_p)


class _ContextOptionsFields(Structure):
    _fields_ = [
        ("size", c_size_t),
        ("n_threads", c_size_t),
        ("malloc_fn", malloc_fn),
        ("free_fn", free_fn),
        ("alloc_user", c_void_p),
    ]


class ContextOptions(_ContextOptionsFields):
    _fields_ = [("_tail", c_ubyte * _TAIL_BYTES)]


class _LayerOptionsFields(Structure):
    _fields_ = [
        ("size", c_size_t),
        ("d_model", c_size_t),
        ("n_heads", c_size_t),
        ("n_kv_heads", c_size_t),
        ("head_dim", c_size_t),
        ("causal", c_int),
        ("rope", c_int),
        ("rope_theta", c_float),
        ("softmax_scale", c_float),
    ]


class LayerOptions(_LayerOptionsFields):
    _fields_ = [("_tail", c_ubyte * _TAIL_BYTES)]


_FloatPtrs = c_void_p * NUM_PROJECTIONS


class _LayerGradsFields(Structure):
    _fields_ = [
        ("size", c_size_t),
        ("mode", c_int),  # a masa_grad_mode value (declared int in masa.h)
        ("d_atoms", _FloatPtrs),
        ("d_coefficients", _FloatPtrs),
        ("d_weight", _FloatPtrs),
        ("d_bias", _FloatPtrs),
        # low-rank terms (appended to the C struct; older sizes stay valid)
        ("d_lowrank_a", _FloatPtrs),
        ("d_lowrank_b", _FloatPtrs),
    ]


class LayerGrads(_LayerGradsFields):
    _fields_ = [("_tail", c_ubyte * _TAIL_BYTES)]


KNOWN_SIZES = {
    ContextOptions: ctypes.sizeof(_ContextOptionsFields),
    LayerOptions: ctypes.sizeof(_LayerOptionsFields),
    LayerGrads: ctypes.sizeof(_LayerGradsFields),
}

# ---------------------------------------------------------------------------
# Declarations: name -> (restype, argtypes, returns_status)
# ---------------------------------------------------------------------------

_status = c_int
_size_p = POINTER(c_size_t)

SIGNATURES = {
    # version and errors
    "masa_version_number": (c_uint, [], False),
    "masa_version_string": (c_char_p, [], False),
    "masa_status_string": (c_char_p, [c_int], False),
    "masa_last_error": (c_char_p, [], False),
    # context
    "masa_context_options_default": (None, [POINTER(ContextOptions), c_size_t], False),
    "masa_context_create": (_status, [POINTER(ContextOptions), POINTER(context_p)], True),
    "masa_context_destroy": (None, [context_p], False),
    "masa_context_threads": (c_size_t, [context_p], False),
    "masa_blis_arch": (c_char_p, [], False),
    # dictionaries
    "masa_dictionary_create": (
        _status, [context_p, c_size_t, c_size_t, c_size_t, POINTER(dictionary_p)], True),
    "masa_dictionary_wrap": (
        _status,
        [context_p, c_size_t, c_size_t, c_size_t, c_void_p, POINTER(dictionary_p)],
        True,
    ),
    "masa_dictionary_destroy": (None, [dictionary_p], False),
    "masa_dictionary_shape": (_status, [dictionary_p, _size_p, _size_p, _size_p], True),
    "masa_dictionary_data": (c_void_p, [dictionary_p], False),
    "masa_dictionary_init_uniform": (_status, [dictionary_p, c_float, c_uint64], True),
    "masa_dictionary_touch": (_status, [dictionary_p], True),
    # coefficient tables
    "masa_coefficients_create": (
        _status, [context_p, c_size_t, c_size_t, POINTER(coefficients_p)], True),
    "masa_coefficients_wrap": (
        _status, [context_p, c_size_t, c_size_t, c_void_p, POINTER(coefficients_p)], True),
    "masa_coefficients_destroy": (None, [coefficients_p], False),
    "masa_coefficients_shape": (_status, [coefficients_p, _size_p, _size_p], True),
    "masa_coefficients_data": (c_void_p, [coefficients_p], False),
    "masa_coefficients_init_cyclic": (_status, [coefficients_p], True),
    "masa_coefficients_init_blocks": (_status, [coefficients_p], True),
    "masa_coefficients_add_uniform": (_status, [coefficients_p, c_float, c_uint64], True),
    "masa_coefficients_touch": (_status, [coefficients_p], True),
    # composition
    "masa_compose": (
        _status, [dictionary_p, coefficients_p, c_size_t, c_void_p, c_size_t], True),
    # layers
    "masa_layer_options_default": (None, [POINTER(LayerOptions), c_size_t], False),
    "masa_layer_create": (_status, [context_p, POINTER(LayerOptions), POINTER(layer_p)], True),
    "masa_layer_destroy": (None, [layer_p], False),
    "masa_layer_set_masa": (
        _status, [layer_p, c_int, dictionary_p, coefficients_p, c_size_t], True),
    "masa_layer_set_dense": (_status, [layer_p, c_int, c_void_p], True),
    "masa_layer_set_bias": (_status, [layer_p, c_int, c_void_p], True),
    "masa_layer_remove_bias": (_status, [layer_p, c_int], True),
    "masa_layer_touch": (_status, [layer_p], True),
    "masa_layer_set_weight_policy": (_status, [layer_p, c_int], True),
    "masa_layer_weight_policy": (_status, [layer_p, POINTER(c_int)], True),
    "masa_layer_refresh_weights": (_status, [layer_p], True),
    "masa_layer_weight": (c_void_p, [layer_p, c_int], False),
    "masa_layer_bias": (c_void_p, [layer_p, c_int], False),
    "masa_layer_projection_shape": (_status, [layer_p, c_int, _size_p, _size_p], True),
    "masa_layer_workspace_size": (_status, [layer_p, c_size_t, c_size_t, _size_p], True),
    "masa_layer_reserve_size": (_status, [layer_p, c_size_t, c_size_t, _size_p], True),
    "masa_layer_forward": (
        _status,
        [
            layer_p,   # layer
            c_size_t,  # batch
            c_size_t,  # seq
            c_size_t,  # pos_offset
            c_void_p,  # x
            c_void_p,  # y
            c_void_p,  # workspace
            c_size_t,  # workspace_bytes
            c_void_p,  # reserve
            c_size_t,  # reserve_bytes
        ],
        True,
    ),
    # incremental decoding
    "masa_kv_cache_size": (_status, [layer_p, c_size_t, c_size_t, _size_p], True),
    "masa_kv_cache_create": (
        _status,
        [layer_p, c_size_t, c_size_t, c_void_p, c_size_t, POINTER(kv_cache_p)],
        True,
    ),
    "masa_kv_cache_destroy": (None, [kv_cache_p], False),
    "masa_kv_cache_reset": (_status, [kv_cache_p], True),
    "masa_kv_cache_truncate": (_status, [kv_cache_p, c_size_t], True),
    "masa_kv_cache_length": (_status, [kv_cache_p, _size_p], True),
    "masa_kv_cache_shape": (_status, [kv_cache_p, _size_p, _size_p], True),
    "masa_layer_decode_workspace_size": (
        _status, [layer_p, c_size_t, c_size_t, _size_p], True),
    "masa_layer_decode": (
        _status,
        [
            layer_p,     # layer
            kv_cache_p,  # cache
            c_size_t,    # batch
            c_size_t,    # n_new
            c_void_p,    # x
            c_void_p,    # y
            c_void_p,    # workspace
            c_size_t,    # workspace_bytes
        ],
        True,
    ),
    "masa_layer_grads_default": (None, [POINTER(LayerGrads), c_size_t], False),
    "masa_layer_backward": (
        _status,
        [
            layer_p,             # layer
            c_size_t,            # batch
            c_size_t,            # seq
            c_size_t,            # pos_offset
            c_void_p,            # x
            c_void_p,            # dy
            c_void_p,            # dx (may be NULL)
            POINTER(LayerGrads),  # grads (may be NULL)
            c_void_p,            # workspace
            c_size_t,            # workspace_bytes
            c_void_p,            # reserve
            c_size_t,            # reserve_bytes
        ],
        True,
    ),
}

# ---------------------------------------------------------------------------
# Low-rank terms of projections (W = base + A B; masa_layer_set_lowrank)
# ---------------------------------------------------------------------------

SIGNATURES.update({
    # layer, which, rank, a (d_in x rank or NULL), b (rank x d_out or NULL)
    "masa_layer_set_lowrank": (_status, [layer_p, c_int, c_size_t, c_void_p, c_void_p], True),
    "masa_layer_remove_lowrank": (_status, [layer_p, c_int], True),
    # layer, which, *rank, *a, *b
    "masa_layer_lowrank": (
        _status, [layer_p, c_int, _size_p, POINTER(c_void_p), POINTER(c_void_p)], True),
})

# ---------------------------------------------------------------------------
# Finding the library
# ---------------------------------------------------------------------------

PACKAGE_DIR = Path(__file__).resolve().parent
# Where bindings/python/meson.build installs the library it builds.
BUNDLED_SUBDIR = "_libs"


def _library_patterns():
    if sys.platform == "darwin":
        return ["libmasa.dylib", "libmasa.*.dylib"]
    if sys.platform == "win32":
        return ["masa.dll", "libmasa.dll", "masa-*.dll", "libmasa-*.dll"]
    return ["libmasa.so", f"libmasa.so.{EXPECTED_MAJOR}", "libmasa.so.*"]


def _glob_library(directory: Path):
    """Library files in directory, best first (unversioned name, then the
    SONAME, then fully versioned names)."""
    found = []
    for pattern in _library_patterns():
        for p in sorted(directory.glob(pattern)):
            if p not in found and p.is_file():
                found.append(p)
    return found


def candidate_locations(environ=None, package_dir=None):
    """Where the library is looked for, in order.

    Returns a list of (description, path_or_name, exists) tuples; ``exists``
    is False for places checked that held nothing (they are reported in the
    not-found error).
    """
    environ = os.environ if environ is None else environ
    package_dir = PACKAGE_DIR if package_dir is None else Path(package_dir)
    places = []

    explicit = environ.get(ENV_VAR, "")
    if explicit:
        p = Path(explicit)
        places.append((f"${ENV_VAR}", str(p), p.is_file()))
        return places  # an explicit choice is never replaced by another copy
    places.append((f"${ENV_VAR}", "(not set)", False))

    in_package = _glob_library(package_dir)
    if in_package:
        places.extend(("package directory", str(p), True) for p in in_package)
    else:
        places.append(("package directory", str(package_dir / _library_patterns()[0]), False))

    bundled = _glob_library(package_dir / BUNDLED_SUBDIR)
    if bundled:
        places.extend(("bundled library", str(p), True) for p in bundled)
    else:
        places.append(("bundled library",
                       str(package_dir / BUNDLED_SUBDIR / _library_patterns()[1]), False))

    build_hits = []
    for parent in package_dir.parents:
        build_hits.extend(_glob_library(parent / "build" / "lib"))
    if build_hits:
        places.extend(("build tree", str(p), True) for p in build_hits)
    else:
        places.append(
            ("build tree", f"<each parent of {package_dir}>/build/lib/libmasa.so*", False)
        )

    name = ctypes.util.find_library("masa")
    places.append(("ctypes.util.find_library('masa')", name or "(nothing found)", bool(name)))
    return places


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def parse_version(number):
    number = int(number)
    return number // 10000, (number // 100) % 100, number % 100


def check_version(number):
    """Raise LibraryVersionError unless `number` (masa_version_number()) is
    compatible: same major version, minor at least the expected one."""
    major, minor, patch = parse_version(number)
    if major != EXPECTED_MAJOR or minor < EXPECTED_MINOR:
        raise LibraryVersionError(
            f"libmasa {major}.{minor}.{patch} is not compatible with this binding, "
            f"which needs {EXPECTED_MAJOR}.{EXPECTED_MINOR}.x or a later "
            f"{EXPECTED_MAJOR}.y release"
        )


def _declare(cdll):
    missing = []
    for name, (restype, argtypes, returns_status) in SIGNATURES.items():
        try:
            fn = getattr(cdll, name)
        except AttributeError:
            missing.append(name)
            continue
        fn.restype = restype
        fn.argtypes = argtypes
        if returns_status:
            fn.errcheck = _make_errcheck(cdll)
    if missing:
        raise LibraryError("libmasa lacks the functions " + ", ".join(missing))


def _make_errcheck(cdll):
    def errcheck(result, func, args):
        if result != 0:
            # Same thread as the call: masa_last_error() is per thread.
            message = (cdll.masa_last_error() or b"").decode("utf-8", "replace")
            name = (cdll.masa_status_string(result) or b"").decode("utf-8", "replace")
            raise error_for_status(result, message, func.__name__, name)
        return result

    return errcheck


def lazy_declarations(signatures, what):
    """For a module that declares its own functions (compression, files,
    ReplaceMe, ...): returns a function giving the library with
    `signatures` ({name: (restype, argtypes, returns_status)}) declared, on
    first use and once. Each call of this makes its own ctypes handle of the
    loaded library, so one module's argtypes never replace another's (ctypes
    keeps one function object per name and handle)."""
    lock = threading.Lock()
    declared = []

    def get():
        if not declared:
            with lock:
                if not declared:
                    main = lib()
                    own = ctypes.CDLL(library_path())
                    missing = [n for n in signatures if not hasattr(own, n)]
                    if missing:
                        raise LibraryError(f"this libmasa lacks the {what} functions "
                                           + ", ".join(missing))
                    for name, (restype, argtypes, returns_status) in signatures.items():
                        fn = getattr(own, name)
                        fn.restype, fn.argtypes = restype, argtypes
                        if returns_status:
                            # masa_last_error() as declared on the main handle
                            fn.errcheck = _make_errcheck(main)
                    declared.append(own)
        return declared[0]

    return get


class _Loaded:
    def __init__(self, cdll, path):
        self.cdll = cdll
        self.path = path


_lock = threading.Lock()
_loaded = None


def _try_load(path):
    cdll = ctypes.CDLL(path)
    # Version first, with its own declaration, before trusting anything else.
    cdll.masa_version_number.restype = c_uint
    cdll.masa_version_number.argtypes = []
    check_version(cdll.masa_version_number())
    _declare(cdll)
    return cdll


def load(environ=None, package_dir=None):
    """Find and load libmasa; return (CDLL, path). Raises LibraryError."""
    places = candidate_locations(environ, package_dir)
    report = []
    version_errors = []
    for what, where, exists in places:
        if not exists:
            reason = "not set" if where == "(not set)" else "not found"
            report.append(f"  - {what}: {where}: {reason}")
            continue
        try:
            cdll = _try_load(where)
        except LibraryVersionError as e:
            version_errors.append(e)
            report.append(f"  - {what}: {where}: {e}")
        except (OSError, AttributeError) as e:
            report.append(f"  - {what}: {where}: could not load ({e})")
        else:
            return cdll, where
    listing = "\n".join(report)
    if version_errors:
        raise LibraryVersionError(
            "no compatible libmasa shared library; looked in:\n" + listing
        )
    raise LibraryNotFoundError(
        "libmasa shared library not found; looked in:\n"
        + listing
        + "\nInstall the package with its library (pip install ./bindings/python), "
        f"build it (meson setup build && ninja -C build) or set {ENV_VAR} "
        "to the full path of libmasa.so.",
        searched=[where for _, where, _ in places],
    )


def lib():
    """The loaded, declared libmasa CDLL (loads it on first use)."""
    global _loaded
    loaded = _loaded
    if loaded is None:
        with _lock:
            if _loaded is None:
                cdll, path = load()
                _loaded = _Loaded(cdll, path)
            loaded = _loaded
    return loaded.cdll


def library_path():
    """Path (or name) of the loaded library; loads it if needed."""
    lib()
    return _loaded.path


def init_struct(struct_type, init_fn):
    """An instance of struct_type filled by the library's *_init function,
    after checking the size the library wrote fits our buffer."""
    s = struct_type()
    # The library writes at most the size we pass: the size of the struct
    # this binding was written for (spare bytes stay zero).
    init_fn(ctypes.byref(s), KNOWN_SIZES[struct_type])
    known = KNOWN_SIZES[struct_type]
    if s.size < known or s.size > ctypes.sizeof(struct_type):
        raise LibraryError(
            f"{init_fn.__name__} set size {s.size}; this binding knows {known} "
            f"bytes and can hold at most {ctypes.sizeof(struct_type)}"
        )
    return s
