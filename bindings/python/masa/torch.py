"""PyTorch modules running attention on libmasa (CPU, float32).

- :class:`SharedAtoms` (alias :class:`MasaDictionaries`) holds, for each
  shared projection type, the atoms (an ``nn.Parameter`` of shape
  ``(n_atoms, d_in, d_out)``) and the coefficient table (``(n_layers,
  n_atoms)``). One instance is shared by every layer of a model.
- :class:`MasaAttention` is one attention layer. Projections listed in the
  ``shared`` module are MASA (``W = sum_s c[layer_index, s] D_s``); those
  listed in ``external`` are dense weights the caller computes and passes to
  each forward call (e.g. a product of low-rank factors); the others are dense
  ``nn.Parameter`` weights of shape ``(d_in, d_out)`` (row-vector convention:
  the transpose of ``nn.Linear.weight``). Any projection may add a low-rank
  term ``A B`` (``nn.Parameter`` factors of shapes ``(d_in, r)`` and
  ``(r, d_out)``: ``W = base + A B``), and projections listed in
  ``lowrank_only`` are ``A B`` alone (the low-rank baseline).

Parameter tensors are handed to C zero-copy (their CPU storage is wrapped);
when a parameter's storage changes (``param.data = ...``, ``.to()``), it is
wrapped again at the next forward. Forward and backward run in libmasa through
a ``torch.autograd.Function``; backward returns fresh gradient tensors, so
torch accumulates the atom gradients of all layers and any optimizer trains
them. Only CPU float32 tensors are supported: anything else raises TypeError.

Works with PyTorch 1.13 and 2.x. This module is imported only by
``import masa.torch``; ``import masa`` never needs torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .core import Coefficients, Dictionary, default_context
from .layer import Layer

__all__ = ["MasaAttention", "MasaDictionaries", "SharedAtoms", "projection_shapes"]

PROJECTIONS = "qkvo"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def projection_shapes(d_model, n_heads, n_kv_heads=None, head_dim=None):
    """{p: (d_in, d_out)} for the four projections (see masa.h)."""
    n_kv_heads = n_kv_heads or n_heads
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) is not a multiple of n_heads ({n_heads}); give head_dim")
        head_dim = d_model // n_heads
    dq, dkv = n_heads * head_dim, n_kv_heads * head_dim
    return {"q": (d_model, dq), "k": (d_model, dkv), "v": (d_model, dkv), "o": (dq, d_model)}


def _projection_set(spec, what):
    """True/False/'qkv'/iterable -> a set of projection letters."""
    if spec is True:
        return set(PROJECTIONS)
    if not spec:
        return set()
    letters = {str(p).lower() for p in spec}
    bad = letters - set(PROJECTIONS)
    if bad:
        raise ValueError(f"{what}: unknown projections {sorted(bad)}; use letters of 'qkvo'")
    return letters


def _lowrank_ranks(lowrank, shapes):
    """None / int (every projection) / {p: rank} -> {p: rank}, checked
    against the projections' shapes."""
    if lowrank is None:
        return {}
    if isinstance(lowrank, int) and not isinstance(lowrank, bool):
        lowrank = {p: lowrank for p in PROJECTIONS}
    if not isinstance(lowrank, dict):
        raise TypeError(f"lowrank must be None, an int or {{projection: rank}}, got {type(lowrank).__name__}")
    ranks = {}
    for p in PROJECTIONS:  # fixed order: parameter order does not follow the dict
        if p not in {str(k).lower() for k in lowrank}:
            continue
        r = next(v for k, v in lowrank.items() if str(k).lower() == p)
        most = min(shapes[p])
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= most:
            raise ValueError(f"lowrank[{p!r}] must be an int in 1..{most}, got {r!r}")
        ranks[p] = r
    bad = {str(k).lower() for k in lowrank} - set(PROJECTIONS)
    if bad:
        raise ValueError(f"lowrank: unknown projections {sorted(bad)}; use letters of 'qkvo'")
    return ranks


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.layout != torch.strided:
        raise TypeError(
            f"masa.torch supports only dense CPU float32 tensors; {name} is "
            f"{t.dtype} on {t.device} ({t.layout})"
        )


def _param_array(t, name):
    """A numpy view of a parameter tensor's storage (zero-copy)."""
    _check_tensor(t, name)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous to be shared with libmasa zero-copy")
    return t.detach().numpy()


def _storage_key(t):
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class _DropHandlesOnCopy:
    """Mixin: C handles cannot be copied or pickled; drop them from the state
    (they are rebuilt lazily), so deepcopy and torch.save work."""

    _transient = ()

    def __getstate__(self):
        getter = getattr(super(), "__getstate__", None)  # object has one from Python 3.11
        state = dict(getter()) if getter is not None else dict(self.__dict__)
        for name, empty in self._transient:
            state[name] = empty()
        return state


# ---------------------------------------------------------------------------
# Shared atoms and coefficient tables
# ---------------------------------------------------------------------------


class SharedAtoms(_DropHandlesOnCopy, nn.Module):
    """Atoms and coefficient tables of the MASA projections of a model.

    Args:
        d_model, n_heads, n_kv_heads, head_dim: the attention geometry (the
            atoms of each projection have that projection's weight shape).
        n_layers: rows of every coefficient table (layers sharing it).
        n_atoms: atoms per dictionary, an int or {projection: int}.
        projections: which projections are shared (default all of "qkvo";
            "qkv" is MASA-QKV with a per-layer dense O).
        init: coefficient table initialisation: "cyclic" (layer l starts as
            atom l mod S), "blocks" (consecutive layers share an atom) or
            "zeros".
        coefficient_noise: uniform noise in [-noise, noise] added to the table.
        atom_bound: atoms start uniform in [-bound, bound]; 0 = 1/sqrt(d_in).
        seed: seed of libmasa's initialisers; None draws one from torch's RNG
            (so torch.manual_seed makes the initialisation reproducible).
        context: a masa.Context (default: masa.default_context()).

    Attributes ``atoms`` and ``coefficients`` are nn.ParameterDicts keyed by
    projection letter.
    """

    _transient = (("_wrapped", dict), ("_context", lambda: None))

    def __init__(self, d_model, n_heads, n_layers, n_atoms, *, n_kv_heads=None, head_dim=None,
                 projections="qkvo", init="cyclic", coefficient_noise=0.0, atom_bound=0.0,
                 seed=None, context=None):
        super().__init__()
        self.d_model, self.n_heads = int(d_model), int(n_heads)
        self.n_kv_heads = int(n_kv_heads or n_heads)
        self.shapes = projection_shapes(d_model, n_heads, n_kv_heads, head_dim)
        self.head_dim = self.shapes["q"][1] // self.n_heads
        self.n_layers = int(n_layers)
        self.projections = "".join(p for p in PROJECTIONS if p in _projection_set(projections, "projections"))
        if not self.projections:
            raise ValueError("SharedAtoms needs at least one projection")
        if isinstance(n_atoms, dict):
            self.n_atoms = {p: int(n_atoms[p]) for p in self.projections}
        else:
            self.n_atoms = {p: int(n_atoms) for p in self.projections}
        if init not in ("cyclic", "blocks", "zeros"):
            raise ValueError(f"init must be 'cyclic', 'blocks' or 'zeros', got {init!r}")
        self._context = context
        self._wrapped = {}
        self.atoms = nn.ParameterDict({
            p: nn.Parameter(torch.zeros(self.n_atoms[p], *self.shapes[p])) for p in self.projections
        })
        self.coefficients = nn.ParameterDict({
            p: nn.Parameter(torch.zeros(self.n_layers, self.n_atoms[p])) for p in self.projections
        })
        self.reset_parameters(init=init, coefficient_noise=coefficient_noise,
                              atom_bound=atom_bound, seed=seed)

    def context(self):
        if self._context is None or self._context.closed:
            self._context = default_context()
        return self._context

    @torch.no_grad()
    def reset_parameters(self, init="cyclic", coefficient_noise=0.0, atom_bound=0.0, seed=None):
        """Re-initialise atoms and tables in place with libmasa's seeded
        initialisers (the same seed gives the same values on every platform)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        for i, p in enumerate(self.projections):
            d, c = self.handles(p)
            d.init_uniform(float(atom_bound), (seed * 8 + 2 * i) % 2**64)
            c.values[...] = 0.0
            if init == "cyclic":
                c.init_cyclic()
            elif init == "blocks":
                c.init_blocks()
            if coefficient_noise:
                c.add_uniform(float(coefficient_noise), (seed * 8 + 2 * i + 1) % 2**64)

    def handles(self, p):
        """(masa.Dictionary, masa.Coefficients) wrapping projection p's
        parameters; re-wrapped if a parameter's storage changed."""
        a, c = self.atoms[p], self.coefficients[p]
        key = (_storage_key(a), _storage_key(c))
        cached = self._wrapped.get(p)
        if cached is None or cached[0] != key or cached[1].closed or cached[2].closed:
            ctx = self.context()
            d = Dictionary.wrap(ctx, _param_array(a, f"atoms[{p!r}]"))
            co = Coefficients.wrap(ctx, _param_array(c, f"coefficients[{p!r}]"))
            cached = self._wrapped[p] = (key, d, co)
        return cached[1], cached[2]

    def compose(self, p, layer_index):
        """W_l = sum_s c[l, s] D_s as a differentiable torch expression."""
        return torch.einsum("s,sij->ij", self.coefficients[p][layer_index], self.atoms[p])

    def extra_repr(self):
        atoms = ", ".join(f"{p}:{self.n_atoms[p]}" for p in self.projections)
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, n_layers={self.n_layers}, n_atoms=({atoms})")


MasaDictionaries = SharedAtoms


# ---------------------------------------------------------------------------
# Autograd function
# ---------------------------------------------------------------------------


class _MasaAttentionFunction(torch.autograd.Function):
    """y = attention(x; params) in libmasa. Inputs after x: the masa.Layer,
    the gradient names of params, pos_offset, then the parameter tensors in
    the order of names."""

    @staticmethod
    def forward(ctx, x, layer, names, pos_offset, *params):
        y = torch.empty_like(x)
        _, reserve = layer.forward(x.detach().numpy(), pos_offset, training=True,
                                   out=y.numpy(), keep_reserve=False)
        ctx.layer, ctx.names, ctx.reserve = layer, names, reserve
        ctx.save_for_backward(x, *params)  # torch checks in-place changes
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        params = saved[1:]
        needs = ctx.needs_input_grad
        dy = dy.to(torch.float32).contiguous()
        grads, out = {}, {}
        for i, name in enumerate(ctx.names):
            if needs[4 + i]:
                # Fresh zeroed buffers, written with MASA_GRAD_SET: torch sums
                # the contributions of all layers sharing a parameter.
                g = torch.zeros(params[i].shape, dtype=torch.float32)
                grads[name] = g
                out[name] = g.numpy()
        dx = torch.empty_like(saved[0]) if needs[0] else None
        if out or dx is not None:
            ctx.layer.backward(
                dy.numpy(), ctx.reserve, out=out, params=list(out),
                need_dx=dx is not None, dx=None if dx is None else dx.numpy(),
            )
        return (dx, None, None, None) + tuple(grads.get(n) for n in ctx.names)


# ---------------------------------------------------------------------------
# Attention layer
# ---------------------------------------------------------------------------


class MasaAttention(_DropHandlesOnCopy, nn.Module):
    """Multi-head attention computed by libmasa.

    Args:
        d_model, n_heads: model width and query heads.
        n_kv_heads: key/value heads (GQA/MQA); None = n_heads.
        head_dim: None = d_model / n_heads.
        causal: token t attends to keys 0..t only.
        rope, rope_theta: rotary embedding on Q and K ("rotate half" layout).
        softmax_scale: None = 1/sqrt(head_dim).
        bias: True for biases on every projection, or the projections that
            get one ("qkv", ...).
        layer_index: this layer's row in the shared coefficient tables.
        shared: a SharedAtoms module; its projections are MASA here, the
            others dense. None: every projection dense. Or a dict
            {projection: (SharedAtoms, row)} when projections are grouped
            differently (e.g. per-projection layer groups of a compressed
            pretrained model); layer_index is then not used.
        external: projections (e.g. "qkvo") whose dense weights the layer
            does not own: every forward call takes them as
            ``weights={p: tensor}``, (d_in, d_out) CPU float32 tensors that
            may be results of other torch operations (gradients flow back
            through them). Must not overlap the shared projections.
        lowrank: {projection: rank} (or an int for every projection): a
            low-rank term A B added to those projections' weights, with
            parameters ``lowrank_a[p]`` (d_in, rank) and ``lowrank_b[p]``
            (rank, d_out). A starts uniform in +-1/sqrt(d_in); B starts at
            zero (the term starts at zero and trains, as LoRA) except on
            lowrank_only projections, where it starts uniform in
            +-1/sqrt(rank).
        lowrank_only: projections that are A B alone (no atoms, no dense
            weight); each needs a rank in ``lowrank``. Must not overlap the
            shared or external projections.
        context: a masa.Context (default: the shared module's, or
            masa.default_context()).

    forward(x, pos_offset=0, weights=None): x is [batch, seq, d_model] CPU
    float32; pos_offset is the RoPE position of token 0; weights holds exactly
    the external projections' weights. Returns y of x's shape.
    """

    _transient = (("_layer", lambda: None), ("_bound", dict), ("_context", lambda: None))

    def __init__(self, d_model, n_heads, *, n_kv_heads=None, head_dim=None, causal=False,
                 rope=False, rope_theta=10000.0, softmax_scale=None, bias=False, layer_index=0,
                 shared=None, external="", lowrank=None, lowrank_only="", context=None):
        super().__init__()
        self.d_model, self.n_heads = int(d_model), int(n_heads)
        self.n_kv_heads = int(n_kv_heads or n_heads)
        self.shapes = projection_shapes(d_model, n_heads, n_kv_heads, head_dim)
        self.head_dim = self.shapes["q"][1] // self.n_heads
        self.causal, self.rope = bool(causal), bool(rope)
        self.rope_theta = float(rope_theta)
        self.softmax_scale = float(softmax_scale) if softmax_scale else 1.0 / math.sqrt(self.head_dim)
        self.layer_index = int(layer_index)
        self._masa_source = self._masa_sources(shared, self.layer_index)
        # registered as submodules: parameters() lists each SharedAtoms once
        self.shared = shared if isinstance(shared, SharedAtoms) else None
        self.shared_groups = nn.ModuleList(
            [] if shared is None or isinstance(shared, SharedAtoms)
            else list({id(m): m for m, _ in self._masa_source.values()}.values()))
        self.masa_projections = "".join(p for p in PROJECTIONS if p in self._masa_source)
        external = _projection_set(external, "external")
        overlap = external & set(self.masa_projections)
        if overlap:
            raise ValueError(f"projections {sorted(overlap)} are both shared and external")
        self.external_projections = "".join(p for p in PROJECTIONS if p in external)
        ranks = _lowrank_ranks(lowrank, self.shapes)
        only = _projection_set(lowrank_only, "lowrank_only")
        clash = only & (external | set(self.masa_projections))
        if clash:
            raise ValueError(f"projections {sorted(clash)} cannot be lowrank_only and shared or external")
        missing = only - set(ranks)
        if missing:
            raise ValueError(f"lowrank_only projections {sorted(missing)} need a rank in lowrank")
        self.lowrank_only_projections = "".join(p for p in PROJECTIONS if p in only)
        self.lowrank_a = nn.ParameterDict({
            p: nn.Parameter(torch.empty(self.shapes[p][0], r)) for p, r in ranks.items()})
        self.lowrank_b = nn.ParameterDict({
            p: nn.Parameter(torch.empty(r, self.shapes[p][1])) for p, r in ranks.items()})
        dense = [p for p in PROJECTIONS
                 if p not in self.masa_projections and p not in self.external_projections
                 and p not in only]
        self.weights = nn.ParameterDict({p: nn.Parameter(torch.empty(self.shapes[p])) for p in dense})
        self.biases = nn.ParameterDict({
            p: nn.Parameter(torch.empty(self.shapes[p][1]))
            for p in PROJECTIONS if p in _projection_set(bias, "bias")
        })
        self._context = context
        self._layer = None
        self._bound = {}
        self.reset_parameters()

    def _masa_sources(self, shared, layer_index):
        """{projection: (SharedAtoms, row)} from ``shared``: one SharedAtoms
        (its projections, row layer_index) or a dict {projection:
        (SharedAtoms, row)} (projections grouped differently)."""
        if shared is None:
            return {}
        if isinstance(shared, SharedAtoms):
            pairs = {p: (shared, layer_index) for p in shared.projections}
        elif isinstance(shared, dict):
            pairs = {}
            for p, pair in shared.items():
                if str(p).lower() not in PROJECTIONS or not isinstance(pair, tuple) or len(pair) != 2:
                    raise ValueError("shared as a dict maps a projection letter to (SharedAtoms, row)")
                pairs[str(p).lower()] = (pair[0], int(pair[1]))
        else:
            raise TypeError("shared must be a masa.torch.SharedAtoms or {projection: (SharedAtoms, row)}")
        for p, (module, row) in pairs.items():
            if not isinstance(module, SharedAtoms):
                raise TypeError("shared must be a masa.torch.SharedAtoms")
            if p not in module.projections:
                raise ValueError(f"the SharedAtoms given for {p!r} does not share {p!r}")
            if module.shapes[p] != self.shapes[p]:
                raise ValueError(
                    f"shared atoms of {p!r} have shape {module.shapes[p]}, "
                    f"this layer needs {self.shapes[p]}")
            if not 0 <= row < module.n_layers:
                raise ValueError(f"layer_index {row} out of range for {module.n_layers} shared layers")
        return pairs

    @torch.no_grad()
    def reset_parameters(self):
        """Dense weights and biases uniform in +-1/sqrt(d_in) (as nn.Linear)."""
        for p, w in self.weights.items():
            w.uniform_(-1.0 / math.sqrt(self.shapes[p][0]), 1.0 / math.sqrt(self.shapes[p][0]))
        for p, b in self.biases.items():
            b.uniform_(-1.0 / math.sqrt(self.shapes[p][0]), 1.0 / math.sqrt(self.shapes[p][0]))
        for p, a in self.lowrank_a.items():
            a.uniform_(-1.0 / math.sqrt(self.shapes[p][0]), 1.0 / math.sqrt(self.shapes[p][0]))
            b = self.lowrank_b[p]
            if p in self.lowrank_only_projections:
                b.uniform_(-1.0 / math.sqrt(b.shape[0]), 1.0 / math.sqrt(b.shape[0]))
            else:
                b.zero_()

    def _ctx(self):
        if self._context is None or self._context.closed:
            sources = list(self._masa_source.values())
            self._context = sources[0][0].context() if sources else default_context()
        return self._context

    def c_layer(self, weights=None):
        """The masa.Layer, bound to the current parameter storage (and to
        ``weights[p]`` for the external projections)."""
        layer = self._layer
        if layer is None or layer.closed:
            layer = self._layer = Layer(
                self._ctx(), self.d_model, self.n_heads, n_kv_heads=self.n_kv_heads,
                head_dim=self.head_dim, causal=self.causal, rope=self.rope,
                rope_theta=self.rope_theta, softmax_scale=self.softmax_scale)
            self._bound = {}
        for p in PROJECTIONS:
            if p in self.masa_projections:
                module, row = self._masa_source[p]
                d, c = module.handles(p)
                current = layer.masa(p)
                if current is None or current[0] is not d or current[1] is not c:
                    layer.set_masa(p, d, c, row)
            elif p in self.external_projections:
                if weights is not None and p in weights:  # else bound later
                    w = weights[p]
                    key = _storage_key(w)
                    if self._bound.get(("weight", p)) != key:
                        layer.set_dense(p, _param_array(w, f"weights[{p!r}]"))
                        self._bound[("weight", p)] = key
            elif p in self.lowrank_only_projections:
                pass  # no base: A B alone
            else:
                w = self.weights[p]
                key = _storage_key(w)
                if self._bound.get(("weight", p)) != key:
                    layer.set_dense(p, _param_array(w, f"weights[{p!r}]"))
                    self._bound[("weight", p)] = key
            if p in self.biases:
                b = self.biases[p]
                key = _storage_key(b)
                if self._bound.get(("bias", p)) != key:
                    layer.set_bias(p, _param_array(b, f"biases[{p!r}]"))
                    self._bound[("bias", p)] = key
            if p in self.lowrank_a:
                a, b = self.lowrank_a[p], self.lowrank_b[p]
                key = (_storage_key(a), _storage_key(b))
                if self._bound.get(("lowrank", p)) != key:
                    layer.set_lowrank(p, a.shape[1], _param_array(a, f"lowrank_a[{p!r}]"),
                                      _param_array(b, f"lowrank_b[{p!r}]"))
                    self._bound[("lowrank", p)] = key
        return layer

    def named_masa_parameters(self, weights=None):
        """(gradient name, tensor) of every parameter the C layer reads, in
        the order the autograd function takes them."""
        out = []
        for p in PROJECTIONS:
            if p in self.masa_projections:
                module = self._masa_source[p][0]
                out.append((f"{p}.atoms", module.atoms[p]))
                out.append((f"{p}.coefficients", module.coefficients[p]))
            elif p in self.external_projections:
                out.append((f"{p}.weight", weights[p]))
            elif p not in self.lowrank_only_projections:
                out.append((f"{p}.weight", self.weights[p]))
            if p in self.biases:
                out.append((f"{p}.bias", self.biases[p]))
            if p in self.lowrank_a:
                out.append((f"{p}.lowrank_a", self.lowrank_a[p]))
                out.append((f"{p}.lowrank_b", self.lowrank_b[p]))
        return out

    def weight(self, p, weights=None):
        """Projection p's weight (d_in x d_out) as a differentiable tensor
        (an external projection's base is ``weights[p]``), low-rank term
        included."""
        if p in self.masa_projections:
            module, row = self._masa_source[p]
            base = module.compose(p, row)
        elif p in self.external_projections:
            base = self._external_weights(weights)[p]
        elif p in self.lowrank_only_projections:
            base = None
        else:
            base = self.weights[p]
        if p not in self.lowrank_a:
            return base
        term = self.lowrank_a[p] @ self.lowrank_b[p]
        return term if base is None else base + term

    def _external_weights(self, weights):
        """Checks ``weights`` against the external projections; returns
        them as contiguous tensors."""
        given = set(weights or ())
        want = set(self.external_projections)
        if given != want:
            raise ValueError(
                f"weights must hold exactly the external projections {sorted(want)}, "
                f"got {sorted(given)}")
        out = {}
        for p in self.external_projections:
            w = weights[p]
            _check_tensor(w, f"weights[{p!r}]")
            if tuple(w.shape) != self.shapes[p]:
                raise ValueError(f"weights[{p!r}] must have shape {self.shapes[p]}, got {tuple(w.shape)}")
            out[p] = w.contiguous()
        return out

    def forward(self, x, pos_offset: int = 0, weights=None):
        _check_tensor(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [batch, seq, {self.d_model}], got {tuple(x.shape)}")
        pos_offset = int(pos_offset)
        if pos_offset < 0:
            raise ValueError(f"pos_offset must be >= 0, got {pos_offset}")
        x = x.contiguous()
        weights = self._external_weights(weights)
        layer = self.c_layer(weights)
        named = self.named_masa_parameters(weights)
        tensors = [t for _, t in named]
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
            names = tuple(n for n, _ in named)
            return _MasaAttentionFunction.apply(x, layer, names, pos_offset, *tensors)
        y = torch.empty_like(x)
        layer.forward(x.detach().numpy(), pos_offset, out=y.numpy())
        return y

    def extra_repr(self):
        kinds = "".join(p.upper() if p in self.masa_projections else p for p in PROJECTIONS)
        external = f", external={self.external_projections}" if self.external_projections else ""
        if self.lowrank_a:
            ranks = ", ".join(f"{p}:{a.shape[1]}" for p, a in self.lowrank_a.items())
            external += f", lowrank=({ranks})"
        if self.lowrank_only_projections:
            external += f", lowrank_only={self.lowrank_only_projections}"
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, rope={self.rope}, "
                f"projections={kinds} (upper = MASA), bias={''.join(p for p in PROJECTIONS if p in self.biases) or None}, "
                f"layer_index={self.layer_index}{external}")
