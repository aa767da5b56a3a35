"""Attention layers: forward and backward on numpy arrays."""

from __future__ import annotations

import enum
import math
import weakref
from ctypes import byref, c_int, c_size_t, c_void_p

import numpy as np

from . import _lib
from . import decode as _decode
from ._arrays import (
    FLOAT32,
    check_no_overlap,
    float32_array,
    pointer,
    size_arg,
    workspace,
)
from ._handle import Handle
from .core import Coefficients, Context, Dictionary, Projection, _check_context
from .errors import ClosedHandleError

PROJECTIONS = tuple(Projection)


class WeightPolicy(enum.IntEnum):
    """Where a layer's MASA weights W_l come from (masa_weight_policy)."""

    ON_THE_FLY = 0  # composed from the atoms at every use (memory: S atoms)
    CACHED = 1      # kept composed in the layer (dense speed and memory)

    @classmethod
    def parse(cls, policy) -> "WeightPolicy":
        """Accepts a WeightPolicy, 0/1 or 'on_the_fly' / 'cached'."""
        if isinstance(policy, str):
            try:
                return cls[policy.upper()]
            except KeyError:
                pass
        elif isinstance(policy, int) and not isinstance(policy, bool):
            if policy in (0, 1):
                return cls(policy)
        raise ValueError(f"policy must be 'on_the_fly', 'cached' or a masa.WeightPolicy, "
                         f"got {policy!r}")


class _Masa:
    kind = "masa"

    def __init__(self, dictionary, coefficients, layer_index):
        self.dictionary = dictionary
        self.coefficients = coefficients
        self.layer_index = layer_index


class _Dense:
    kind = "dense"

    def __init__(self, weight):
        self.weight = weight


class Reserve:
    """What a training forward saved for backward: the reserve buffer plus the
    input x (referenced, not copied: do not modify x before backward)."""

    __slots__ = ("_layer", "x", "batch", "seq", "pos_offset", "buffer", "generation")

    def __init__(self, layer, x, pos_offset, buffer, generation):
        self._layer = weakref.ref(layer)  # no cycle through layer.last_reserve
        self.x = x
        self.batch, self.seq = x.shape[0], x.shape[1]
        self.pos_offset = pos_offset
        self.buffer = buffer
        self.generation = generation

    @property
    def layer(self):
        """The layer whose forward filled this reserve (None if it is gone)."""
        return self._layer()

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


class Layer(Handle):
    """A MASA attention layer (masa_layer).

    Every projection ('q', 'k', 'v', 'o') must be made MASA (set_masa) or
    dense (set_dense), or given a low-rank term (set_lowrank), before
    forward. A projection may carry a low-rank term A B beside its base
    (W = base + A B); one whose base was never set is A B alone. The layer
    keeps its context, the dictionaries and tables it uses and the arrays it
    wraps alive.
    """

    def __init__(
        self,
        context: Context,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int = 0,
        head_dim: int = 0,
        causal: bool = False,
        rope: bool = False,
        rope_theta: float | None = None,
        softmax_scale: float = 0.0,
    ):
        ctx = _check_context(context)
        L = _lib.lib()
        opts = _lib.init_struct(_lib.LayerOptions, L.masa_layer_options_default)
        opts.d_model = size_arg(d_model, "d_model")
        opts.n_heads = size_arg(n_heads, "n_heads")
        opts.n_kv_heads = size_arg(n_kv_heads or 0, "n_kv_heads")
        opts.head_dim = size_arg(head_dim or 0, "head_dim")
        opts.causal = 1 if causal else 0
        opts.rope = 1 if rope else 0
        if rope_theta is not None:
            opts.rope_theta = float(rope_theta)
        opts.softmax_scale = float(softmax_scale or 0.0)
        out = _lib.layer_p()
        L.masa_layer_create(ctx, byref(opts), byref(out))

        self.context = context
        # Everything the C layer points into; also held by the finalizer.
        self._proj = [None] * len(PROJECTIONS)
        self._bias = [None] * len(PROJECTIONS)
        self._lowrank = [None] * len(PROJECTIONS)  # (a, b) arrays
        self._generation = 0
        self.last_reserve = None
        self._init_handle(out, L.masa_layer_destroy,
                          [context, self._proj, self._bias, self._lowrank])
        context._adopt(self)

        dq = self.projection_shape(Projection.Q)[1]
        dkv = self.projection_shape(Projection.K)[1]
        self.d_model = int(d_model)
        self.n_heads = int(n_heads)
        self.head_dim = dq // self.n_heads
        self.n_kv_heads = dkv // self.head_dim
        self.causal = bool(causal)
        self.rope = bool(rope)
        self.rope_theta = float(opts.rope_theta)
        self.softmax_scale = float(opts.softmax_scale) or 1.0 / math.sqrt(self.head_dim)

    # ----------------------------------------------------------- projections

    def projection_shape(self, which):
        """(d_in, d_out) of projection `which`'s weight."""
        p = Projection.parse(which)
        d_in, d_out = c_size_t(), c_size_t()
        _lib.lib().masa_layer_projection_shape(self._handle(), p, byref(d_in), byref(d_out))
        return (d_in.value, d_out.value)

    def projection_kind(self, which):
        """The base: 'masa', 'dense' or None (not set: with a low-rank term,
        the projection is A B alone)."""
        state = self._proj[Projection.parse(which)]
        return None if state is None else state.kind

    def set_masa(self, which, dictionary: Dictionary, coefficients: Coefficients, layer_index: int):
        """W = sum_s coefficients[layer_index, s] * dictionary atom s."""
        p = Projection.parse(which)
        if not isinstance(dictionary, Dictionary):
            raise TypeError("dictionary must be a masa.Dictionary")
        if not isinstance(coefficients, Coefficients):
            raise TypeError("coefficients must be a masa.Coefficients")
        index = size_arg(layer_index, "layer_index")
        _lib.lib().masa_layer_set_masa(
            self._handle(), p, dictionary._handle(), coefficients._handle(), index
        )
        self._proj[p] = _Masa(dictionary, coefficients, index)
        self._generation += 1

    def set_dense(self, which, weight=None) -> np.ndarray:
        """Make projection `which` dense. weight: a float32 (d_in, d_out) array
        wrapped zero-copy, or None for a new zeroed one. Returns the array."""
        p = Projection.parse(which)
        shape = self.projection_shape(p)
        if weight is None:
            weight = np.zeros(shape, dtype=FLOAT32)
        else:
            float32_array(weight, "weight", shape=shape, writeable=True)
        _lib.lib().masa_layer_set_dense(self._handle(), p, pointer(weight))
        self._proj[p] = _Dense(weight)
        self._generation += 1
        return weight

    def set_bias(self, which, bias=None) -> np.ndarray:
        """Give projection `which` a bias: a float32 (d_out,) array wrapped
        zero-copy, or None for a new zeroed one. Returns the array."""
        p = Projection.parse(which)
        d_out = self.projection_shape(p)[1]
        if bias is None:
            bias = np.zeros((d_out,), dtype=FLOAT32)
        else:
            float32_array(bias, "bias", shape=(d_out,), writeable=True)
        _lib.lib().masa_layer_set_bias(self._handle(), p, pointer(bias))
        self._bias[p] = bias
        self._generation += 1
        return bias

    def remove_bias(self, which) -> None:
        p = Projection.parse(which)
        _lib.lib().masa_layer_remove_bias(self._handle(), p)
        self._bias[p] = None
        self._generation += 1

    # ------------------------------------------------------ low-rank terms

    def set_lowrank(self, which, rank=None, a=None, b=None):
        """Give projection `which` the low-rank term A B (W = base + A B).

        a: float32 (d_in, rank) and b: float32 (rank, d_out) arrays wrapped
        zero-copy, or None for new zeroed ones; rank may be omitted when a or
        b is given. 1 <= rank <= min(d_in, d_out). A projection whose base was
        never set computes x A B alone. Returns (a, b)."""
        p = Projection.parse(which)
        d_in, d_out = self.projection_shape(p)
        if rank is None:
            if a is not None and getattr(a, "ndim", 0) == 2:
                rank = a.shape[1]
            elif b is not None and getattr(b, "ndim", 0) == 2:
                rank = b.shape[0]
            else:
                raise ValueError("set_lowrank needs rank (or a or b to take it from)")
        r = size_arg(rank, "rank")  # the library checks 1 <= r <= min(d_in, d_out)
        if a is None:
            a = np.zeros((d_in, r), dtype=FLOAT32)
        else:
            float32_array(a, "a", shape=(d_in, r), writeable=True)
        if b is None:
            b = np.zeros((r, d_out), dtype=FLOAT32)
        else:
            float32_array(b, "b", shape=(r, d_out), writeable=True)
        _lib.lib().masa_layer_set_lowrank(self._handle(), p, r, pointer(a), pointer(b))
        self._lowrank[p] = (a, b)
        self._generation += 1
        return a, b

    def remove_lowrank(self, which) -> None:
        """Remove projection `which`'s low-rank term (no-op without one)."""
        p = Projection.parse(which)
        _lib.lib().masa_layer_remove_lowrank(self._handle(), p)
        self._lowrank[p] = None
        self._generation += 1

    def lowrank(self, which):
        """(a, b) arrays of projection `which`'s low-rank term, or None."""
        return self._lowrank[Projection.parse(which)]

    def c_lowrank(self, which):
        """masa_layer_lowrank(): (rank, address of A, address of B) the
        library uses (0, 0, 0 without a term)."""
        r, a, b = c_size_t(), c_void_p(), c_void_p()
        _lib.lib().masa_layer_lowrank(self._handle(), Projection.parse(which),
                                      byref(r), byref(a), byref(b))
        return r.value, a.value or 0, b.value or 0

    # --------------------------------------------------------- weight policy

    def set_weight_policy(self, policy) -> None:
        """'on_the_fly' (default): W_l is composed from the atoms at every
        forward, backward and decode. 'cached': the layer keeps W_l of every
        MASA projection composed (the memory of a dense layer); the cache is
        filled now and by refresh_weights(), and is stale after any change
        to the atoms or coefficients until then. Setting 'cached' again
        refills it."""
        value = WeightPolicy.parse(policy)
        _lib.lib().masa_layer_set_weight_policy(self._handle(), int(value))
        self._generation += 1  # W_l may differ: earlier reserves are refused

    @property
    def weight_policy(self) -> WeightPolicy:
        value = c_int()
        _lib.lib().masa_layer_weight_policy(self._handle(), byref(value))
        return WeightPolicy(value.value)

    def refresh_weights(self) -> None:
        """Recompose the cached weights from the current atoms and
        coefficients (after an optimiser step); nothing to do on the fly."""
        _lib.lib().masa_layer_refresh_weights(self._handle())
        self._generation += 1

    def weight(self, which):
        """The dense weight array of projection `which` (None unless dense)."""
        state = self._proj[Projection.parse(which)]
        return state.weight if isinstance(state, _Dense) else None

    def bias(self, which):
        """The bias array of projection `which` (None if it has none)."""
        return self._bias[Projection.parse(which)]

    def masa(self, which):
        """(dictionary, coefficients, layer_index) of a MASA projection, else None."""
        state = self._proj[Projection.parse(which)]
        if isinstance(state, _Masa):
            return state.dictionary, state.coefficients, state.layer_index
        return None

    def c_weight_pointer(self, which) -> int:
        """masa_layer_weight(): address of the dense weight the library uses (0 if none)."""
        return _lib.lib().masa_layer_weight(self._handle(), Projection.parse(which)) or 0

    def c_bias_pointer(self, which) -> int:
        """masa_layer_bias(): address of the bias the library uses (0 if none)."""
        return _lib.lib().masa_layer_bias(self._handle(), Projection.parse(which)) or 0

    def gradient_shapes(self):
        """{name: shape} of every parameter gradient backward can produce:
        '<p>.atoms', '<p>.coefficients' (MASA), '<p>.weight' (dense),
        '<p>.bias' (with a bias), '<p>.lowrank_a', '<p>.lowrank_b' (with a
        low-rank term), for p in q, k, v, o."""
        shapes = {}
        for p in PROJECTIONS:
            state = self._proj[p]
            if isinstance(state, _Masa):
                shapes[f"{p.letter}.atoms"] = state.dictionary.atoms.shape
                shapes[f"{p.letter}.coefficients"] = state.coefficients.values.shape
            elif isinstance(state, _Dense):
                shapes[f"{p.letter}.weight"] = state.weight.shape
            if self._bias[p] is not None:
                shapes[f"{p.letter}.bias"] = self._bias[p].shape
            if self._lowrank[p] is not None:
                shapes[f"{p.letter}.lowrank_a"] = self._lowrank[p][0].shape
                shapes[f"{p.letter}.lowrank_b"] = self._lowrank[p][1].shape
        return shapes

    # ----------------------------------------------------------------- sizes

    def workspace_size(self, batch: int, seq: int) -> int:
        n = c_size_t()
        _lib.lib().masa_layer_workspace_size(
            self._handle(), size_arg(batch, "batch"), size_arg(seq, "seq"), byref(n)
        )
        return n.value

    def reserve_size(self, batch: int, seq: int) -> int:
        n = c_size_t()
        _lib.lib().masa_layer_reserve_size(
            self._handle(), size_arg(batch, "batch"), size_arg(seq, "seq"), byref(n)
        )
        return n.value

    # ------------------------------------------------------------- decoding

    def decode_workspace_size(self, batch: int, n_new: int) -> int:
        return _decode.decode_workspace_size(self, batch, n_new)

    def decode(self, cache, x, out=None):
        """Incremental decoding (causal layers): append x ([batch, n_new,
        d_model]) to `cache` (a masa.KVCache made for this layer) and return
        the new tokens' outputs. RoPE positions continue from cache.length."""
        return _decode.decode(self, cache, x, out)

    # ------------------------------------------------------- forward/backward

    def _check_parameters_open(self):
        for p in PROJECTIONS:
            state = self._proj[p]
            if isinstance(state, _Masa):
                for obj in (state.dictionary, state.coefficients):
                    if obj.closed:
                        raise ClosedHandleError(
                            f"projection {p.letter!r} uses a {type(obj).__name__} that is closed"
                        )

    def _check_x(self, x, name="x"):
        float32_array(x, name, shape=(None, None, self.d_model))
        return x

    def forward(self, x, pos_offset: int = 0, training: bool = False, out=None,
                keep_reserve: bool = True):
        """y = attention(x) for x of shape [batch, seq, d_model] (float32,
        C-contiguous). pos_offset is the RoPE position of token 0.

        Returns y; with training=True returns (y, reserve), the reserve being
        what backward() needs (also kept as self.last_reserve unless
        keep_reserve=False). out: optional float32 array for y.
        """
        handle = self._handle()
        self._check_x(x)
        pos = size_arg(pos_offset, "pos_offset")
        batch, seq, _ = x.shape
        if out is None:
            y = np.empty_like(x)
        else:
            y = float32_array(out, "out", shape=x.shape, writeable=True)
            check_no_overlap([("x", x), ("out", y)])
        self._check_parameters_open()

        ws_bytes = self.workspace_size(batch, seq)
        ws = workspace(ws_bytes)
        if training:
            rbytes = self.reserve_size(batch, seq)
            buf = np.empty(max(1, (rbytes + 3) // 4), dtype=FLOAT32)
            res_ptr, res_bytes = pointer(buf), buf.nbytes
        else:
            buf, res_ptr, res_bytes = None, None, 0
        _lib.lib().masa_layer_forward(
            handle, batch, seq, pos, pointer(x), pointer(y),
            pointer(ws), ws.nbytes, res_ptr, res_bytes,
        )
        if not training:
            return y
        reserve = Reserve(self, x, pos, buf, self._generation)
        if keep_reserve:
            self.last_reserve = reserve
        return y, reserve

    def backward(
        self,
        dy,
        reserve: Reserve | None = None,
        *,
        out=None,
        params=None,
        accumulate: bool = False,
        need_dx: bool = True,
        dx=None,
    ):
        """Gradients for dy = dL/dy of the forward call that produced
        `reserve` (default: the last training forward of this layer).

        Returns (dx, grads): dx has x's shape (None with need_dx=False);
        grads maps the names of gradient_shapes() to float32 arrays.

        - params: names to compute (default: all, or the keys of `out`).
        - out: {name: array} buffers to write instead of fresh zeroed ones.
        - accumulate: add into the `out` buffers (MASA_GRAD_ADD) instead of
          overwriting them. Coefficient gradients only touch this layer's row.
        """
        handle = self._handle()
        if reserve is None:
            reserve = self.last_reserve
            if reserve is None:
                raise ValueError("no reserve: call forward(x, training=True) first")
        if not isinstance(reserve, Reserve):
            raise TypeError(f"reserve must be a masa.Reserve, got {type(reserve).__name__}")
        if reserve.layer is not self:
            raise ValueError("reserve comes from a different layer")
        if reserve.generation != self._generation:
            raise ValueError("the layer's projections or biases were replaced after this forward call")
        x = reserve.x
        float32_array(dy, "dy", shape=x.shape)

        shapes = self.gradient_shapes()
        out = {} if out is None else dict(out)
        for name in out:
            if name not in shapes:
                raise ValueError(f"unknown gradient {name!r}; this layer has {sorted(shapes)}")
        if params is None:
            wanted = list(out) if out else list(shapes)
        else:
            wanted = list(params)
            for name in wanted:
                if name not in shapes:
                    raise ValueError(f"unknown gradient {name!r}; this layer has {sorted(shapes)}")
        grads = {}
        for name in wanted:
            if name in out:
                grads[name] = float32_array(out[name], f"out[{name!r}]", shape=shapes[name], writeable=True)
            else:
                grads[name] = np.zeros(shapes[name], dtype=FLOAT32)
        if need_dx:
            if dx is None:
                dx = np.empty_like(x)
            else:
                float32_array(dx, "dx", shape=x.shape, writeable=True)
        else:
            dx = None
        check_no_overlap(
            [("x", x), ("dy", dy), ("dx", dx)] + [(f"grads[{k!r}]", v) for k, v in grads.items()]
        )
        self._check_parameters_open()

        L = _lib.lib()
        g = _lib.init_struct(_lib.LayerGrads, L.masa_layer_grads_default)
        g.mode = _lib.GRAD_ADD if accumulate else _lib.GRAD_SET
        field_of = {"atoms": g.d_atoms, "coefficients": g.d_coefficients,
                    "weight": g.d_weight, "bias": g.d_bias,
                    "lowrank_a": g.d_lowrank_a, "lowrank_b": g.d_lowrank_b}
        for name, arr in grads.items():
            letter, what = name.split(".")
            field_of[what][Projection.parse(letter)] = pointer(arr)

        ws_bytes = self.workspace_size(reserve.batch, reserve.seq)
        ws = workspace(ws_bytes)
        L.masa_layer_backward(
            handle, reserve.batch, reserve.seq, reserve.pos_offset,
            pointer(x), pointer(dy), None if dx is None else pointer(dx),
            byref(g) if grads else None,
            pointer(ws), ws.nbytes, pointer(reserve.buffer), reserve.buffer.nbytes,
        )
        return dx, grads

    def __repr__(self):
        state = " closed" if self.closed else ""
        kinds = "".join(
            (p.letter.upper() if self._proj[p] is not None and self._proj[p].kind == "masa"
             else p.letter if self._proj[p] is not None
             else "r" if self._lowrank[p] is not None else "-")
            + ("+r" if self._proj[p] is not None and self._lowrank[p] is not None else "")
            for p in PROJECTIONS
        )
        return (f"<masa.Layer d_model={self.d_model} heads={self.n_heads}/{self.n_kv_heads} "
                f"head_dim={self.head_dim} projections={kinds}{state}>")
