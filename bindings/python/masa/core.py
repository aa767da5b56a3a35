"""Context, Dictionary and Coefficients, plus library-wide queries.

Parameter storage is always a numpy array that the Python object owns or
wraps (``masa_*_wrap``, zero-copy): arrays handed out by ``.atoms`` and
``.values`` can therefore never dangle, even after ``close()``.
"""

from __future__ import annotations

import enum
import operator
import threading
import weakref
from ctypes import byref, c_size_t

import numpy as np

from . import _lib
from ._arrays import FLOAT32, check_no_overlap, float32_array, pointer, seed_arg, size_arg
from ._handle import Handle
from .errors import HandleInUseError


# ---------------------------------------------------------------------------
# Library-wide queries
# ---------------------------------------------------------------------------


def version_number() -> int:
    """masa_version_number() of the loaded library (MAJOR*10000+MINOR*100+PATCH)."""
    return int(_lib.lib().masa_version_number())


def version() -> str:
    """masa_version_string() of the loaded library, e.g. "0.2.0"."""
    return _lib.lib().masa_version_string().decode()


def blis_arch() -> str:
    """Name of the BLIS kernel set in use (initialises BLIS if needed)."""
    return _lib.lib().masa_blis_arch().decode()


def status_string(status: int) -> str:
    """masa_status_string(): the short description of a status code."""
    return _lib.lib().masa_status_string(int(status)).decode()


def last_error() -> str:
    """masa_last_error() of the calling thread."""
    return _lib.lib().masa_last_error().decode("utf-8", "replace")


def library_path() -> str:
    """Where the loaded libmasa came from."""
    return _lib.library_path()


class Projection(enum.IntEnum):
    """The four projections of an attention layer (masa_projection)."""

    Q = 0
    K = 1
    V = 2
    O = 3  # noqa: E741

    @classmethod
    def parse(cls, which) -> "Projection":
        """Accepts a Projection, 0..3 or one of 'q', 'k', 'v', 'o'."""
        if isinstance(which, str):
            try:
                return cls[which.upper()]
            except KeyError:
                pass
        elif not isinstance(which, bool):
            try:
                index = operator.index(which)
            except TypeError:
                index = -1
            if 0 <= index < _lib.NUM_PROJECTIONS:
                return cls(index)
        raise ValueError(f"projection must be one of 'q', 'k', 'v', 'o' or 0..3, got {which!r}")

    @property
    def letter(self) -> str:
        return self.name.lower()


# ---------------------------------------------------------------------------
# Context
# ---------------------------------------------------------------------------


class Context(Handle):
    """A libmasa context: worker threads and BLIS settings.

    ``n_threads=0`` uses every online CPU. Closing a context first closes every
    layer, KV cache, dictionary and coefficient table created from it (the C
    API requires them to be destroyed first); if one of its dictionaries or
    tables is used by an open layer of another context, close() raises
    HandleInUseError and closes nothing.
    """

    def __init__(self, n_threads: int = 0):
        L = _lib.lib()
        opts = _lib.init_struct(_lib.ContextOptions, L.masa_context_options_default)
        opts.n_threads = size_arg(n_threads, "n_threads")
        out = _lib.context_p()
        L.masa_context_create(byref(opts), byref(out))
        self._children = weakref.WeakSet()
        self._init_handle(out, L.masa_context_destroy, [])

    @property
    def threads(self) -> int:
        with self._reading():
            return int(_lib.lib().masa_context_threads(self._handle()))

    def _adopt(self, child):
        self._children.add(child)

    def close(self) -> None:
        with self._writing():
            if self.closed:
                return
            children = [c for c in list(self._children) if not c.closed]
            for child in children:
                for user in getattr(child, "_open_users", lambda: ())():
                    if user.context is not self:
                        raise HandleInUseError(
                            f"cannot close the Context: its {type(child).__name__} is used by "
                            f"an open Layer of another context (close that layer first)")
            # Layers point into dictionaries and tables: close them first.
            for child in children:
                if isinstance(child, _layer_types()):
                    child.close()
            for child in children:
                child.close()
            super().close()

    def __repr__(self):
        if self.closed:
            return "<masa.Context closed>"
        return f"<masa.Context threads={self.threads}>"


def _layer_types():
    from .layer import Layer

    return (Layer,)


_default_lock = threading.Lock()
_default_context = None


def default_context() -> Context:
    """A process-wide Context (all CPUs), created on first use."""
    global _default_context
    with _default_lock:
        if _default_context is None or _default_context.closed:
            _default_context = Context()
        return _default_context


def _check_context(context):
    if not isinstance(context, Context):
        raise TypeError(f"context must be a masa.Context, got {type(context).__name__}")
    return context._handle()


# ---------------------------------------------------------------------------
# Dictionary
# ---------------------------------------------------------------------------


class _Parameters(Handle):
    """A Dictionary or Coefficients: layers using it are its users. Closing
    it while an open layer uses it raises HandleInUseError (the layer keeps
    it alive and usable; close the layer, or set its projection to other
    parameters, first)."""

    def _open_users(self):
        return [u for u in list(self._users) if not u.closed]

    def _check_close(self):
        users = self._open_users()
        if users:
            raise HandleInUseError(
                f"cannot close the {type(self).__name__}: {len(users)} open Layer(s) use it "
                f"(close them or give their projections other parameters first)")


class Dictionary(_Parameters):
    """S shared atoms of shape rows x cols, stored as a float32 numpy array of
    shape (n_atoms, rows, cols) that the C dictionary wraps zero-copy.

    ``Dictionary(ctx, n_atoms, rows, cols)`` allocates zeroed storage;
    ``Dictionary(ctx, data=array)`` or ``Dictionary.wrap(ctx, array)`` wraps an
    existing array (kept alive as long as the dictionary exists).
    """

    def __init__(self, context, n_atoms=None, rows=None, cols=None, *, data=None):
        ctx = _check_context(context)
        if data is None:
            if n_atoms is None or rows is None or cols is None:
                raise TypeError("give n_atoms, rows and cols, or data=")
            shape = tuple(size_arg(v, n) for v, n in ((n_atoms, "n_atoms"), (rows, "rows"), (cols, "cols")))
            data = np.zeros(shape, dtype=FLOAT32)
        else:
            float32_array(data, "data", shape=(n_atoms, rows, cols), writeable=True)
        S, r, c = data.shape
        L = _lib.lib()
        out = _lib.dictionary_p()
        with context._reading():
            L.masa_dictionary_wrap(_check_context(context), S, r, c, pointer(data), byref(out))
            self._data = data
            self.context = context
            self._users = weakref.WeakSet()
            self._init_handle(out, L.masa_dictionary_destroy, [context, data])
            context._adopt(self)

    @classmethod
    def wrap(cls, context, array):
        """Wrap a float32 C-contiguous array of shape (n_atoms, rows, cols)."""
        return cls(context, data=array)

    @property
    def shape(self):
        """(n_atoms, rows, cols) as the library reports it."""
        n, r, c = c_size_t(), c_size_t(), c_size_t()
        with self._reading():
            _lib.lib().masa_dictionary_shape(self._handle(), byref(n), byref(r), byref(c))
        return (n.value, r.value, c.value)

    @property
    def n_atoms(self) -> int:
        return self._data.shape[0]

    @property
    def atoms(self) -> np.ndarray:
        """The atom storage (zero-copy: writes change the dictionary)."""
        return self._data

    def data_pointer(self) -> int:
        """masa_dictionary_data(): the address the library uses."""
        with self._reading():
            return _lib.lib().masa_dictionary_data(self._handle()) or 0

    def init_uniform(self, bound: float = 0.0, seed: int = 0) -> "Dictionary":
        """Uniform atoms in [-bound, bound]; bound 0 = 1/sqrt(rows)."""
        with self._writing():
            _lib.lib().masa_dictionary_init_uniform(self._handle(), float(bound), seed_arg(seed))
        return self

    def touch(self) -> "Dictionary":
        """Declare that ``atoms`` was written directly (numpy writes are
        invisible to libmasa): reserves and KV caches filled before by
        layers using this dictionary are refused afterwards."""
        with self._writing():
            _lib.lib().masa_dictionary_touch(self._handle())
        return self

    def compose(self, coefficients, layer_index: int, out=None) -> np.ndarray:
        """W = sum_s c[layer_index, s] D_s as a (rows, cols) float32 array."""
        if not isinstance(coefficients, Coefficients):
            raise TypeError("coefficients must be a masa.Coefficients")
        _, rows, cols = self._data.shape
        if out is None:
            out = np.empty((rows, cols), dtype=FLOAT32)
        else:
            float32_array(out, "out", shape=(rows, cols), writeable=True)
        check_no_overlap([("out", out), ("the atoms", self._data),
                          ("the coefficients", coefficients._data)])
        with self._reading(coefficients):
            _lib.lib().masa_compose(
                self._handle(), coefficients._handle(), size_arg(layer_index, "layer_index"),
                pointer(out), out.size,
            )
        return out

    def __repr__(self):
        state = " closed" if self.closed else ""
        return f"<masa.Dictionary shape={self._data.shape}{state}>"


# ---------------------------------------------------------------------------
# Coefficients
# ---------------------------------------------------------------------------


class Coefficients(_Parameters):
    """An L x S coefficient table, stored as a float32 numpy array of shape
    (n_layers, n_atoms) that the C table wraps zero-copy."""

    def __init__(self, context, n_layers=None, n_atoms=None, *, data=None):
        ctx = _check_context(context)
        if data is None:
            if n_layers is None or n_atoms is None:
                raise TypeError("give n_layers and n_atoms, or data=")
            shape = (size_arg(n_layers, "n_layers"), size_arg(n_atoms, "n_atoms"))
            data = np.zeros(shape, dtype=FLOAT32)
        else:
            float32_array(data, "data", shape=(n_layers, n_atoms), writeable=True)
        nl, na = data.shape
        L = _lib.lib()
        out = _lib.coefficients_p()
        with context._reading():
            L.masa_coefficients_wrap(_check_context(context), nl, na, pointer(data), byref(out))
            self._data = data
            self.context = context
            self._users = weakref.WeakSet()
            self._init_handle(out, L.masa_coefficients_destroy, [context, data])
            context._adopt(self)

    @classmethod
    def wrap(cls, context, array):
        """Wrap a float32 C-contiguous array of shape (n_layers, n_atoms)."""
        return cls(context, data=array)

    @property
    def shape(self):
        """(n_layers, n_atoms) as the library reports it."""
        nl, na = c_size_t(), c_size_t()
        with self._reading():
            _lib.lib().masa_coefficients_shape(self._handle(), byref(nl), byref(na))
        return (nl.value, na.value)

    @property
    def values(self) -> np.ndarray:
        """The table storage (zero-copy)."""
        return self._data

    def data_pointer(self) -> int:
        with self._reading():
            return _lib.lib().masa_coefficients_data(self._handle()) or 0

    def init_cyclic(self) -> "Coefficients":
        """c[l, s] = 1 if s == l mod S (repeat-all-over)."""
        with self._writing():
            _lib.lib().masa_coefficients_init_cyclic(self._handle())
        return self

    def init_blocks(self) -> "Coefficients":
        """c[l, s] = 1 if s == floor(l S / L) (sequential blocks)."""
        with self._writing():
            _lib.lib().masa_coefficients_init_blocks(self._handle())
        return self

    def add_uniform(self, bound: float, seed: int = 0) -> "Coefficients":
        """Add uniform noise in [-bound, bound]."""
        with self._writing():
            _lib.lib().masa_coefficients_add_uniform(self._handle(), float(bound), seed_arg(seed))
        return self

    def touch(self) -> "Coefficients":
        """Declare that ``values`` was written directly (see
        Dictionary.touch)."""
        with self._writing():
            _lib.lib().masa_coefficients_touch(self._handle())
        return self

    def __repr__(self):
        state = " closed" if self.closed else ""
        return f"<masa.Coefficients shape={self._data.shape}{state}>"
