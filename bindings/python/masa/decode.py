"""Incremental decoding: a key/value cache (masa_kv_cache) over a numpy array
and Layer.decode()."""

from __future__ import annotations

from ctypes import byref, c_size_t

import numpy as np

from . import _lib
from ._arrays import FLOAT32, check_no_overlap, float32_array, pointer, size_arg, workspace
from ._handle import Handle


class KVCache(Handle):
    """Keys (RoPE applied) and values of the tokens a causal layer has decoded,
    for `batch` sequences of up to `max_seq` tokens.

    The memory is a numpy array this object owns (``memory``), laid out as
    masa.h documents: ``memory[0]`` holds the keys and ``memory[1]`` the
    values, each [batch, n_kv_heads, max_seq, head_dim]. Only the first
    ``length`` positions hold data. Each layer of a stack needs its own cache.
    """

    def __init__(self, layer, batch: int, max_seq: int):
        from .layer import Layer

        if not isinstance(layer, Layer):
            raise TypeError("layer must be a masa.Layer")
        L = _lib.lib()
        batch = size_arg(batch, "batch")
        max_seq = size_arg(max_seq, "max_seq")
        nbytes = c_size_t()
        with layer._reading(layer.context):
            L.masa_kv_cache_size(layer._handle(), batch, max_seq, byref(nbytes))
            shape = (2, batch, layer.n_kv_heads, max_seq, layer.head_dim)
            memory = np.zeros(shape, dtype=FLOAT32)
            assert memory.nbytes == nbytes.value
            out = _lib.kv_cache_p()
            L.masa_kv_cache_create(layer._handle(), batch, max_seq, pointer(memory),
                                   memory.nbytes, byref(out))
            self.memory = memory
            self.batch = batch
            self.max_seq = max_seq
            self.context = layer.context
            # The C handle comes from the context's allocator: the context
            # stays alive (and closes the cache first) while the cache exists.
            self._init_handle(out, L.masa_kv_cache_destroy, [layer.context, memory])
            layer.context._adopt(self)

    @property
    def length(self) -> int:
        """Positions filled per sequence (the RoPE position of the next token)."""
        n = c_size_t()
        with self._reading():
            _lib.lib().masa_kv_cache_length(self._handle(), byref(n))
        return n.value

    @property
    def keys(self):
        """Read-only view of the cached keys, [batch, n_kv_heads, length, head_dim]."""
        return self._view(0)

    @property
    def values(self):
        """Read-only view of the cached values, [batch, n_kv_heads, length, head_dim]."""
        return self._view(1)

    def _view(self, which):
        v = self.memory[which, :, :, : self.length]
        v.flags.writeable = False
        return v

    def reset(self) -> None:
        """Empty the cache (length 0)."""
        with self._writing():
            _lib.lib().masa_kv_cache_reset(self._handle())

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions (length <= self.length)."""
        with self._writing():
            _lib.lib().masa_kv_cache_truncate(self._handle(), size_arg(length, "length"))

    def __repr__(self):
        if self.closed:
            return "<masa.KVCache closed>"
        return f"<masa.KVCache batch={self.batch} length={self.length}/{self.max_seq}>"


def decode_workspace_size(layer, batch: int, n_new: int) -> int:
    with layer._locked():
        layer._check_parameters_open()
        return layer._size(_lib.lib().masa_layer_decode_workspace_size, batch, n_new, "n_new")


def decode(layer, cache: KVCache, x, out=None):
    """Append x ([batch, n_new, d_model] float32) to the cache's sequences and
    return their outputs (masa_layer_decode)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a masa.KVCache, got {type(cache).__name__}")
    layer._handle()
    cache._handle()
    float32_array(x, "x", shape=(None, None, layer.d_model))
    batch, n_new, _ = x.shape
    if out is None:
        y = np.empty_like(x)
    else:
        y = float32_array(out, "out", shape=x.shape, writeable=True)
    check_no_overlap([("x", x), ("out", y), ("cache memory", cache.memory)])
    # the cache is modified: exclusive; the layer and its parameters shared
    with layer._locked(extra_writes=(cache,)):
        handle, cache_handle = layer._handle(), cache._handle()
        layer._check_parameters_open()
        layer._check_not_parameters([("out", y)])
        ws = workspace(layer._size(_lib.lib().masa_layer_decode_workspace_size, batch, n_new,
                                   "n_new"))
        _lib.lib().masa_layer_decode(handle, cache_handle, batch, n_new, pointer(x),
                                     pointer(y), pointer(ws), ws.nbytes)
    return y
