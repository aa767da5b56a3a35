"""safetensors files and compressed models through libmasa (numpy).

The functions follow include/masa/io.h (the reference documentation): the
reader checks every header rule before any data is touched, the writer is
atomic (temporary file, fsync, rename) and orders tensors as the Python
``safetensors`` package does, so files go both ways.

    import numpy as np, masa
    from masa import safetensors_file as sf
    sf.save_file({"w": np.ones((2, 3), np.float32)}, "a.safetensors", {"k": "v"})
    tensors = sf.load_file("a.safetensors")             # dict of numpy arrays
    with sf.SafetensorsFile("a.safetensors") as f:      # mapped, lazy
        f.keys(), f.metadata(), f.info("w"), f.get_tensor("w"), f.get_f32("w")

    # compressed models (io.h's naming scheme)
    sf.save_model("m.safetensors", n_layers=4,
                  groups={"q": [(0, atoms, coefs)]},            # atoms (S, d_in, d_out)
                  lowrank={"q": {0: (a, b)}},                  # a (d_in, r), b (r, d_out)
                  calibration={"layer0.qkv": calib})           # compression.Calibration
    model = sf.load_model(ctx, "m.safetensors")
    model.apply(layer, 2)                                       # a masa.Layer

BF16 has no numpy dtype: ``get_tensor`` returns its raw bits as uint16
(``get_f32`` converts), and ``save_file`` takes ``("BF16", uint16_array)``
in place of an array. Errors raise :class:`masa.MasaError` subclasses
(``FileIOError``, ``BadFormatError``, ``NotFoundError``...) with the
library's message, which names the file and what is wrong.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint64, c_void_p
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _lib
from ._arrays import FLOAT32, float32_array, size_arg
from ._handle import Handle
from .core import Coefficients, Context, Dictionary, Projection, _check_context, default_context

# masa_dtype values (io.h) and their numpy dtypes (BF16: raw uint16 bits).
DTYPES = {
    "F32": (0, np.float32), "F16": (1, np.float16), "BF16": (2, np.uint16),
    "F64": (3, np.float64), "BOOL": (4, np.bool_), "U8": (5, np.uint8),
    "I8": (6, np.int8), "I16": (7, np.int16), "U16": (8, np.uint16),
    "I32": (9, np.int32), "U32": (10, np.uint32), "I64": (11, np.int64),
    "U64": (12, np.uint64), "F8_E5M2": (13, np.uint8), "F8_E4M3": (14, np.uint8),
}
_BY_VALUE = {v: (name, np_dt) for name, (v, np_dt) in DTYPES.items()}
_FROM_NUMPY = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
               np.dtype(np.float64): "F64", np.dtype(np.bool_): "BOOL",
               np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
               np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16",
               np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32",
               np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64"}
KINDS = {0: None, 1: "masa", 2: "dense", 3: "lowrank"}


class st_p(c_void_p):
    pass


class writer_p(c_void_p):
    pass


class model_p(c_void_p):
    pass


class model_writer_p(c_void_p):
    pass


_status = c_int
_ctx = _lib.context_p
_szp = POINTER(c_size_t)
_cpp = POINTER(c_char_p)

SIGNATURES = {
    "masa_safetensors_open": (_status, [_ctx, c_char_p, POINTER(st_p)]),
    "masa_safetensors_close": (None, [st_p]),
    "masa_safetensors_tensor_count": (c_size_t, [st_p]),
    "masa_safetensors_find": (_status, [st_p, c_char_p, _szp]),
    "masa_safetensors_tensor": (
        _status, [st_p, c_size_t, _cpp, POINTER(c_int), _szp, POINTER(_szp),
                  POINTER(c_void_p), _szp]),
    "masa_safetensors_read_f32": (_status, [st_p, c_size_t, c_void_p, c_size_t]),
    "masa_safetensors_metadata_count": (c_size_t, [st_p]),
    "masa_safetensors_metadata_entry": (_status, [st_p, c_size_t, _cpp, _cpp]),
    "masa_safetensors_writer_create": (_status, [_ctx, c_char_p, POINTER(writer_p)]),
    "masa_safetensors_writer_add": (
        _status, [writer_p, c_char_p, c_int, c_size_t, _szp, c_void_p, c_size_t]),
    "masa_safetensors_writer_set_metadata": (_status, [writer_p, c_char_p, c_char_p]),
    "masa_safetensors_writer_finish": (_status, [writer_p]),
    "masa_safetensors_writer_destroy": (None, [writer_p]),
    "masa_model_writer_create": (_status, [_ctx, c_char_p, c_size_t, POINTER(model_writer_p)]),
    "masa_model_writer_add_group": (
        _status, [model_writer_p, c_int, c_size_t, _lib.dictionary_p, _lib.coefficients_p]),
    "masa_model_writer_add_dense": (
        _status, [model_writer_p, c_int, c_size_t, c_size_t, c_size_t, c_void_p]),
    "masa_model_writer_add_lowrank": (
        _status, [model_writer_p, c_int, c_size_t, c_size_t, c_size_t, c_size_t, c_void_p,
                  c_void_p]),
    "masa_model_writer_add_calib": (_status, [model_writer_p, c_char_p, c_void_p]),
    "masa_model_writer_add_tensor": (
        _status, [model_writer_p, c_char_p, c_int, c_size_t, _szp, c_void_p, c_size_t]),
    "masa_model_writer_set_metadata": (_status, [model_writer_p, c_char_p, c_char_p]),
    "masa_model_writer_finish": (_status, [model_writer_p]),
    "masa_model_writer_destroy": (None, [model_writer_p]),
    "masa_model_open": (_status, [_ctx, c_char_p, POINTER(model_p)]),
    "masa_model_close": (None, [model_p]),
    "masa_model_layers": (_status, [model_p, _szp]),
    "masa_model_projection": (_status, [model_p, c_int, POINTER(c_int), _szp, _szp, _szp]),
    "masa_model_group": (
        _status, [model_p, c_int, c_size_t, _szp, _szp, POINTER(_lib.dictionary_p),
                  POINTER(_lib.coefficients_p)]),
    "masa_model_lowrank": (
        _status, [model_p, c_int, c_size_t, _szp, POINTER(c_void_p), POINTER(c_void_p)]),
    "masa_model_dense": (_status, [model_p, c_int, c_size_t, POINTER(c_void_p)]),
    "masa_model_calib_count": (c_size_t, [model_p]),
    "masa_model_calib_name": (_status, [model_p, c_size_t, _cpp]),
    "masa_model_file": (st_p, [model_p]),
    "masa_dictionary_shape": (_status, [_lib.dictionary_p, _szp, _szp, _szp]),
    "masa_dictionary_data": (c_void_p, [_lib.dictionary_p]),
    "masa_coefficients_shape": (_status, [_lib.coefficients_p, _szp, _szp]),
    "masa_coefficients_data": (c_void_p, [_lib.coefficients_p]),
}

# The library with these functions declared (once, on first use).
_c = _lib.lazy_declarations(
    {name: (restype, argtypes, restype is _status)
     for name, (restype, argtypes) in SIGNATURES.items()}, "safetensors")

def _path(path) -> bytes:
    import os
    return os.fsencode(path)


def _text(s, what) -> bytes:
    if not isinstance(s, str):
        raise TypeError(f"{what} must be a str, got {type(s).__name__}")
    return s.encode("utf-8")


class TensorInfo(NamedTuple):
    dtype: str            # "F32", "BF16", ...
    shape: Tuple[int, ...]
    nbytes: int


# ------------------------------------------------------------------ reading


class SafetensorsFile(Handle):
    """A safetensors file opened by libmasa (mapped read-only; every header
    rule checked at open). Tensors are copied out on request."""

    def __init__(self, path, context: Optional[Context] = None):
        context = context if context is not None else default_context()
        ctx = _check_context(context)
        out = st_p()
        _c().masa_safetensors_open(ctx, _path(path), byref(out))
        self.context = context
        self.path = path
        self._init_handle(out, _c().masa_safetensors_close, [context])
        context._adopt(self)

    def _index(self, name) -> int:
        i = c_size_t()
        _c().masa_safetensors_find(self._handle(), _text(name, "name"), byref(i))
        return i.value

    def _raw(self, index):
        return _raw_of(self._handle(), index)

    def keys(self):
        """Tensor names in file order (ascending offsets)."""
        n = _c().masa_safetensors_tensor_count(self._handle())
        return [self._raw(i)[0] for i in range(n)]

    def __contains__(self, name):
        try:
            self._index(name)
            return True
        except KeyError:
            return False

    def __len__(self):
        return int(_c().masa_safetensors_tensor_count(self._handle()))

    def info(self, name) -> TensorInfo:
        _, dt, shape, _, nbytes = self._raw(self._index(name))
        return TensorInfo(_BY_VALUE[dt][0], shape, nbytes)

    def metadata(self) -> Dict[str, str]:
        C = _c()
        out = {}
        for i in range(C.masa_safetensors_metadata_count(self._handle())):
            k, v = c_char_p(), c_char_p()
            C.masa_safetensors_metadata_entry(self._handle(), i, byref(k), byref(v))
            out[k.value.decode("utf-8")] = v.value.decode("utf-8")
        return out

    def get_tensor(self, name) -> np.ndarray:
        """A copy of the tensor with its own dtype (BF16 and F8 as raw bits)."""
        _, dt, shape, data, nbytes = self._raw(self._index(name))
        a = np.empty(shape, dtype=_BY_VALUE[dt][1])
        if nbytes:
            ctypes.memmove(a.ctypes.data, data, nbytes)
        return a

    def get_f32(self, name) -> np.ndarray:
        """The tensor as float32 (F32, F16, BF16, F64 converted by libmasa)."""
        index = self._index(name)
        shape = self._raw(index)[2]
        a = np.empty(shape, dtype=FLOAT32)
        _c().masa_safetensors_read_f32(self._handle(), index, a.ctypes.data, a.size)
        return a

    def __repr__(self):
        if self.closed:
            return "<masa.safetensors_file.SafetensorsFile closed>"
        return f"<masa.safetensors_file.SafetensorsFile {self.path!r} tensors={len(self)}>"


def load_file(path, context: Optional[Context] = None) -> Dict[str, np.ndarray]:
    """Every tensor of the file as a numpy array (copies), as
    safetensors.numpy.load_file returns them."""
    with SafetensorsFile(path, context) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def load_metadata(path, context: Optional[Context] = None) -> Dict[str, str]:
    with SafetensorsFile(path, context) as f:
        return f.metadata()


# ------------------------------------------------------------------ writing


def _tensor_arg(name, value):
    """(masa dtype value, contiguous array) for an array or ("BF16", bits)."""
    if isinstance(value, tuple):
        if len(value) != 2 or value[0] not in DTYPES:
            raise ValueError(f"{name}: a tuple must be (dtype name, array), dtype one of {sorted(DTYPES)}")
        dt_name, a = value
        a = np.require(a, requirements="C")  # (ascontiguousarray makes 0-d 1-d)
        if a.dtype.itemsize != np.dtype(DTYPES[dt_name][1]).itemsize:
            raise ValueError(f"{name}: {dt_name} needs {np.dtype(DTYPES[dt_name][1]).itemsize}-byte elements")
        return DTYPES[dt_name][0], a
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    dt = value.dtype.newbyteorder("=") if value.dtype.byteorder == ">" else value.dtype
    if np.dtype(dt) not in _FROM_NUMPY:
        raise TypeError(f"{name}: dtype {value.dtype} has no safetensors equivalent")
    a = np.require(value, dtype=np.dtype(dt).newbyteorder("<"), requirements="C")
    return DTYPES[_FROM_NUMPY[np.dtype(dt)]][0], a


def _add(add_fn, handle, name, value):
    dt, a = _tensor_arg(name, value)
    shape = (c_size_t * max(a.ndim, 1))(*a.shape)
    add_fn(handle, _text(name, "tensor name"), dt, a.ndim, shape,
           a.ctypes.data if a.nbytes else None, a.nbytes)


def save_file(tensors: Mapping[str, object], path, metadata: Optional[Mapping[str, str]] = None,
              context: Optional[Context] = None) -> None:
    """Writes tensors (name -> array, or ("BF16", uint16 bits)) and metadata
    atomically; the argument order of safetensors.numpy.save_file."""
    context = context if context is not None else default_context()
    C = _c()
    w = writer_p()
    C.masa_safetensors_writer_create(_check_context(context), _path(path), byref(w))
    try:
        for name, value in tensors.items():
            _add(C.masa_safetensors_writer_add, w, name, value)
        for k, v in (metadata or {}).items():
            C.masa_safetensors_writer_set_metadata(w, _text(k, "metadata key"),
                                                   _text(v, "metadata value"))
        C.masa_safetensors_writer_finish(w)
    finally:
        C.masa_safetensors_writer_destroy(w)


# ---------------------------------------------------------- compressed models


def _f32(a, name, shape):
    a = np.ascontiguousarray(a, dtype=FLOAT32)
    return float32_array(a, name, shape=shape)


def save_model(path, n_layers: int, *, groups=None, dense=None, lowrank=None,
               calibration=None, tensors=None, metadata=None,
               context: Optional[Context] = None) -> None:
    """Writes a compressed model (io.h's naming scheme), atomically.

    groups:      {proj: [(first_layer, atoms (S, d_in, d_out), coefs (L_g, S)), ...]}
                 in layer order, tiling all layers ("masa" projections)
    dense:       {proj: [weight (d_in, d_out) for every layer]}
    lowrank:     {proj: {layer: (a (d_in, r), b (r, d_out))}}; alone, every layer
    calibration: {name: compression.Calibration}
    tensors, metadata: extra entries (names not beginning with "masa.")
    proj is 'q', 'k', 'v', 'o' (or a masa.Projection)."""
    from .compression import Calibration

    context = context if context is not None else default_context()
    ctx = _check_context(context)
    C = _c()
    w = model_writer_p()
    C.masa_model_writer_create(ctx, _path(path), size_arg(n_layers, "n_layers"), byref(w))
    try:
        for proj, entries in (groups or {}).items():
            p = Projection.parse(proj)
            for first, atoms, coefs in entries:
                atoms = _f32(atoms, "atoms", (None, None, None))
                coefs = _f32(coefs, "coefs", (None, atoms.shape[0]))
                d = Dictionary.wrap(context, atoms)
                c = Coefficients.wrap(context, coefs)
                try:
                    C.masa_model_writer_add_group(w, p, size_arg(first, "first"),
                                                  d._handle(), c._handle())
                finally:
                    d.close()
                    c.close()
        for proj, weights in (dense or {}).items():
            p = Projection.parse(proj)
            for layer, weight in enumerate(weights):
                weight = _f32(weight, "weight", (None, None))
                C.masa_model_writer_add_dense(w, p, layer, weight.shape[0], weight.shape[1],
                                              weight.ctypes.data)
        for proj, layers in (lowrank or {}).items():
            p = Projection.parse(proj)
            for layer, (a, b) in layers.items():
                a = _f32(a, "a", (None, None))
                b = _f32(b, "b", (a.shape[1], None))
                C.masa_model_writer_add_lowrank(w, p, size_arg(layer, "layer"), a.shape[0],
                                                b.shape[1], a.shape[1], a.ctypes.data,
                                                b.ctypes.data)
        for name, calib in (calibration or {}).items():
            if not isinstance(calib, Calibration):
                raise TypeError(f"calibration {name!r} must be a masa.compression.Calibration")
            C.masa_model_writer_add_calib(w, _text(name, "calibration name"), calib._handle())
        for name, value in (tensors or {}).items():
            _add(C.masa_model_writer_add_tensor, w, name, value)
        for k, v in (metadata or {}).items():
            C.masa_model_writer_set_metadata(w, _text(k, "metadata key"), _text(v, "metadata value"))
        C.masa_model_writer_finish(w)
    finally:
        C.masa_model_writer_destroy(w)


class ProjectionInfo(NamedTuple):
    kind: Optional[str]              # "masa", "dense", "lowrank" or None (absent)
    d_in: int
    d_out: int
    groups: Tuple[Tuple[int, int, int], ...]  # (first layer, layers, atoms)


class CompressedModel(Handle):
    """A compressed model opened by libmasa (masa_model_open): checked
    completely at open, its tensors read from the file's mapping."""

    def __init__(self, context, path):
        ctx = _check_context(context)
        out = model_p()
        _c().masa_model_open(ctx, _path(path), byref(out))
        self.context = context
        self.path = path
        self._init_handle(out, _c().masa_model_close, [context])
        context._adopt(self)

    @property
    def n_layers(self) -> int:
        n = c_size_t()
        _c().masa_model_layers(self._handle(), byref(n))
        return n.value

    def projection(self, which) -> ProjectionInfo:
        p = Projection.parse(which)
        kind, d_in, d_out, n_groups = c_int(), c_size_t(), c_size_t(), c_size_t()
        C = _c()
        C.masa_model_projection(self._handle(), p, byref(kind), byref(d_in), byref(d_out),
                                byref(n_groups))
        groups = []
        for g in range(n_groups.value):
            first, count, d = c_size_t(), c_size_t(), _lib.dictionary_p()
            C.masa_model_group(self._handle(), p, g, byref(first), byref(count), byref(d), None)
            s = c_size_t()
            C.masa_dictionary_shape(d, byref(s), None, None)
            groups.append((first.value, count.value, s.value))
        return ProjectionInfo(KINDS[kind.value], d_in.value, d_out.value, tuple(groups))

    def _floats(self, ptr, shape):
        n = int(np.prod(shape))
        view = np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr))
        return view.reshape(shape).copy()

    def group(self, which, group: int):
        """(first layer, atoms (S, d_in, d_out), coefficients (L_g, S)), copies."""
        p = Projection.parse(which)
        C = _c()
        first, count = c_size_t(), c_size_t()
        d, c = _lib.dictionary_p(), _lib.coefficients_p()
        C.masa_model_group(self._handle(), p, size_arg(group, "group"), byref(first),
                           byref(count), byref(d), byref(c))
        s, rows, cols = c_size_t(), c_size_t(), c_size_t()
        C.masa_dictionary_shape(d, byref(s), byref(rows), byref(cols))
        atoms = self._floats(C.masa_dictionary_data(d), (s.value, rows.value, cols.value))
        coefs = self._floats(C.masa_coefficients_data(c), (count.value, s.value))
        return first.value, atoms, coefs

    def lowrank(self, which, layer: int):
        """(a, b) copies of the layer's low-rank term, or None."""
        p = Projection.parse(which)
        info = self.projection(p)
        r, a, b = c_size_t(), c_void_p(), c_void_p()
        _c().masa_model_lowrank(self._handle(), p, size_arg(layer, "layer"), byref(r),
                                byref(a), byref(b))
        if r.value == 0:
            return None
        return (self._floats(a.value, (info.d_in, r.value)),
                self._floats(b.value, (r.value, info.d_out)))

    def dense(self, which, layer: int) -> np.ndarray:
        p = Projection.parse(which)
        info = self.projection(p)
        w = c_void_p()
        _c().masa_model_dense(self._handle(), p, size_arg(layer, "layer"), byref(w))
        return self._floats(w.value, (info.d_in, info.d_out))

    @property
    def calibration_names(self):
        C = _c()
        out = []
        for i in range(C.masa_model_calib_count(self._handle())):
            name = c_char_p()
            C.masa_model_calib_name(self._handle(), i, byref(name))
            out.append(name.value.decode("utf-8"))
        return out

    def calibration(self, name):
        """A new compression.Calibration with a copy of entry `name`."""
        from .compression import Calibration

        if name not in self.calibration_names:
            raise KeyError(f"{self.path}: no calibration {name!r}")
        f = _c().masa_model_file(self._handle())
        arrays = []
        for what in ("matrix", "rows"):
            i = c_size_t()
            _c().masa_safetensors_find(f, _text(f"masa.calib.{name}.{what}", "name"), byref(i))
            _, dt, shape, data, nbytes = _raw_of(f, i.value)
            a = np.empty(shape, dtype=_BY_VALUE[dt][1])
            ctypes.memmove(a.ctypes.data, data, nbytes)
            arrays.append(a)
        return Calibration.from_data(self.context, arrays[0], int(arrays[1]))

    def metadata(self) -> Dict[str, str]:
        C = _c()
        f = C.masa_model_file(self._handle())
        out = {}
        for i in range(C.masa_safetensors_metadata_count(f)):
            k, v = c_char_p(), c_char_p()
            C.masa_safetensors_metadata_entry(f, i, byref(k), byref(v))
            out[k.value.decode("utf-8")] = v.value.decode("utf-8")
        return out

    def apply(self, layer, layer_index: int) -> None:
        """Sets every projection the model covers on `layer` (a masa.Layer)
        as model layer `layer_index` has it (copies of the model's arrays,
        owned by the layer's Python objects): set_masa / set_dense, and
        set_lowrank or remove_lowrank. A "lowrank" projection needs a layer
        whose projection has no base yet."""
        index = size_arg(layer_index, "layer_index")
        if index >= self.n_layers:
            raise IndexError(f"layer_index {index}, the model has {self.n_layers} layers")
        plans = []
        for p in Projection:
            info = self.projection(p)
            if info.kind is None:
                continue
            if layer.projection_shape(p) != (info.d_in, info.d_out):
                raise ValueError(f"projection {p.letter} of the layer is "
                                 f"{layer.projection_shape(p)}, the model's "
                                 f"{(info.d_in, info.d_out)}")
            plans.append((p, info))
        for p, info in plans:
            if info.kind == "masa":
                for g, (first, count, _) in enumerate(info.groups):
                    if first <= index < first + count:
                        _, atoms, coefs = self.group(p, g)
                        layer.set_masa(p, Dictionary.wrap(self.context, atoms),
                                       Coefficients.wrap(self.context, coefs), index - first)
            elif info.kind == "dense":
                layer.set_dense(p, self.dense(p, index))
            term = self.lowrank(p, index)
            if term is not None:
                layer.set_lowrank(p, a=term[0], b=term[1])
            else:
                layer.remove_lowrank(p)

    def __repr__(self):
        if self.closed:
            return "<masa.safetensors_file.CompressedModel closed>"
        return f"<masa.safetensors_file.CompressedModel {self.path!r} layers={self.n_layers}>"


def _raw_of(f, index):
    name, dt, ndim = c_char_p(), c_int(), c_size_t()
    shape, data, nbytes = _szp(), c_void_p(), c_size_t()
    _c().masa_safetensors_tensor(f, index, byref(name), byref(dt), byref(ndim), byref(shape),
                                 byref(data), byref(nbytes))
    return (name.value.decode("utf-8"), dt.value, tuple(shape[d] for d in range(ndim.value)),
            data.value, nbytes.value)


def load_model(context, path) -> CompressedModel:
    """Opens a compressed model (see CompressedModel)."""
    return CompressedModel(context, path)
