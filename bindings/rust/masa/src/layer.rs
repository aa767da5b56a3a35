//! Attention layers, their buffers and gradients.

use core::fmt;
use core::marker::PhantomData;
use core::ptr::{self, NonNull};

use masa_sys as sys;

use crate::context::{null_handle, Context};
use crate::error::{check, expect_len, product, Error, Result, Status};
use crate::io::{Model, ModelKind};
use crate::params::{Coefficients, Dictionary};

/// The four projections of an attention layer. With `dq = n_heads *
/// head_dim` and `dkv = n_kv_heads * head_dim`, their weights (`d_in x
/// d_out`) are Q: `d_model x dq`, K and V: `d_model x dkv`, O: `dq x
/// d_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Output projection.
    O,
}

impl Projection {
    /// Q, K, V, O in order.
    pub const ALL: [Projection; 4] = [Projection::Q, Projection::K, Projection::V, Projection::O];

    /// The raw `masa_projection`.
    pub fn raw(self) -> sys::masa_projection {
        match self {
            Projection::Q => sys::MASA_PROJ_Q,
            Projection::K => sys::MASA_PROJ_K,
            Projection::V => sys::MASA_PROJ_V,
            Projection::O => sys::MASA_PROJ_O,
        }
    }

    /// 0 for Q, 1 for K, 2 for V, 3 for O.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Projection::Q => "Q",
            Projection::K => "K",
            Projection::V => "V",
            Projection::O => "O",
        })
    }
}

/// Options of a layer (`masa_layer_options`).
///
/// ```
/// let opts = masa::LayerOptions::new(64, 8).n_kv_heads(2).causal(true).rope(true);
/// assert_eq!(opts.rope_theta, 10000.0);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerOptions {
    /// Model width (required).
    pub d_model: usize,
    /// Query heads (required).
    pub n_heads: usize,
    /// Key/value heads; 0 = `n_heads`; must divide `n_heads`.
    pub n_kv_heads: usize,
    /// Head width; 0 = `d_model / n_heads` (must divide exactly).
    pub head_dim: usize,
    /// Token `t` attends to keys `0..=t` only.
    pub causal: bool,
    /// Rotary position embedding on Q and K ("rotate half" layout, see
    /// `masa.h`); `head_dim` must be even.
    pub rope: bool,
    /// RoPE base (default 10000).
    pub rope_theta: f32,
    /// 0 = `1/sqrt(head_dim)`.
    pub softmax_scale: f32,
}

impl LayerOptions {
    /// libmasa's defaults (`masa_layer_options_default`) with `d_model` and
    /// `n_heads` set.
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        let raw = raw_layer_options_default();
        LayerOptions {
            d_model,
            n_heads,
            n_kv_heads: raw.n_kv_heads,
            head_dim: raw.head_dim,
            causal: raw.causal != 0,
            rope: raw.rope != 0,
            rope_theta: raw.rope_theta,
            softmax_scale: raw.softmax_scale,
        }
    }

    /// Sets `n_kv_heads` (grouped-query attention).
    pub fn n_kv_heads(mut self, n: usize) -> Self {
        self.n_kv_heads = n;
        self
    }

    /// Sets `head_dim`.
    pub fn head_dim(mut self, n: usize) -> Self {
        self.head_dim = n;
        self
    }

    /// Sets `causal`.
    pub fn causal(mut self, on: bool) -> Self {
        self.causal = on;
        self
    }

    /// Sets `rope`.
    pub fn rope(mut self, on: bool) -> Self {
        self.rope = on;
        self
    }

    /// Sets `rope_theta`.
    pub fn rope_theta(mut self, theta: f32) -> Self {
        self.rope_theta = theta;
        self
    }

    /// Sets `softmax_scale`.
    pub fn softmax_scale(mut self, scale: f32) -> Self {
        self.softmax_scale = scale;
        self
    }

    fn to_raw(self) -> sys::masa_layer_options {
        let mut raw = raw_layer_options_default();
        raw.d_model = self.d_model;
        raw.n_heads = self.n_heads;
        raw.n_kv_heads = self.n_kv_heads;
        raw.head_dim = self.head_dim;
        raw.causal = self.causal as core::ffi::c_int;
        raw.rope = self.rope as core::ffi::c_int;
        raw.rope_theta = self.rope_theta;
        raw.softmax_scale = self.softmax_scale;
        raw
    }
}

fn raw_layer_options_default() -> sys::masa_layer_options {
    let mut raw = core::mem::MaybeUninit::<sys::masa_layer_options>::zeroed();
    // SAFETY: _init fills the struct, which is zeroed beforehand anyway.
    unsafe {
        sys::masa_layer_options_default(raw.as_mut_ptr(), core::mem::size_of::<sys::masa_layer_options>());
        raw.assume_init()
    }
}

/// What a projection of a layer currently is: its base weight. A low-rank
/// term (see [`Layer::set_lowrank`]) comes on top of any of these.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionKind {
    /// No base set: without a low-rank term forward fails with
    /// [`Status::NotReady`]; with one the projection is `A B` alone.
    Unset,
    /// `W = sum_s c[layer_index, s] * D_s`.
    Masa {
        /// Floats of the dictionary (`n_atoms * rows * cols`): the length of
        /// its atom gradient.
        atoms_len: usize,
        /// Floats of the coefficient table (`n_layers * n_atoms`): the length
        /// of its coefficient gradient.
        coefficients_len: usize,
        /// The row of the table this layer uses.
        layer_index: usize,
    },
    /// A dense `d_in x d_out` weight (owned by the layer or wrapped).
    Dense,
}

#[derive(Clone, Copy)]
struct ProjState {
    kind: ProjectionKind,
    d_in: usize,
    d_out: usize,
    weight: Option<NonNull<f32>>,
    bias: Option<NonNull<f32>>,
    /// Low-rank term: rank (0 = none) and the factors (owned or wrapped).
    rank: usize,
    lowrank: Option<(NonNull<f32>, NonNull<f32>)>,
    /// The weight / the factors are a [`Model`]'s memory, shared with every
    /// reader of the model: readable, never handed out writable.
    weight_shared: bool,
    lowrank_shared: bool,
}

/// An attention layer (`masa_layer`).
///
/// `'a` covers everything the layer uses without owning it: its context,
/// the dictionaries and coefficient tables of its MASA projections (the C
/// layer keeps pointers to them) and caller buffers given as dense weights
/// or biases. None of them can be dropped, moved or modified while the layer
/// exists. To change parameters between steps (an optimizer update), drop
/// the layers, update the dictionaries and tables through `data_mut()`, and
/// create the layers again (cheap: no weight is copied), or keep the
/// parameters in caller buffers and rebuild the wrappers.
///
/// Forward and backward take `&self` and may run on the same layer from
/// several threads at once, each with its own workspace, reserve and output
/// buffers.
pub struct Layer<'a> {
    raw: NonNull<sys::masa_layer>,
    options: LayerOptions,
    proj: [ProjState; 4],
    _borrows: PhantomData<(&'a Context, &'a Dictionary<'a>, &'a Coefficients<'a>, &'a mut [f32])>,
}

// SAFETY (header, "Threads"): "masa_layer_forward() and masa_layer_backward()
// only read the layer and its parameters: any number of threads may run them
// on the same layer at once, as long as each call has its own workspace,
// reserve and output buffers, and no thread modifies the parameters
// meanwhile." forward/backward take `&self` plus `&mut` workspace, reserve
// and outputs, so each concurrent call has its own; the parameters are
// borrowed by the layer (shared, or through its `&mut self` accessors), so
// nobody can modify them meanwhile. Everything that modifies the layer
// (set_*, remove_bias, weight_mut, bias_mut, drop) takes `&mut self`, as the
// header's "needs exclusive access" requires. Hence Sync; and no thread
// affinity, hence Send.
unsafe impl Send for Layer<'_> {}
unsafe impl Sync for Layer<'_> {}

impl<'a> Layer<'a> {
    /// Creates a layer with no projection set: set all four with
    /// [`set_masa`](Self::set_masa) or [`set_dense`](Self::set_dense) /
    /// [`set_dense_owned`](Self::set_dense_owned), or give them a low-rank
    /// term ([`set_lowrank`](Self::set_lowrank)), before forward.
    pub fn new(ctx: &'a Context, options: &LayerOptions) -> Result<Self> {
        let raw_opts = options.to_raw();
        let mut out = ptr::null_mut();
        // SAFETY: valid context, options and out pointer.
        check(unsafe { sys::masa_layer_create(ctx.as_ptr(), &raw_opts, &mut out) })?;
        let raw = NonNull::new(out).ok_or_else(|| null_handle("masa_layer_create"))?;
        let unset = ProjState {
            kind: ProjectionKind::Unset,
            d_in: 0,
            d_out: 0,
            weight: None,
            bias: None,
            rank: 0,
            lowrank: None,
            weight_shared: false,
            lowrank_shared: false,
        };
        let mut layer = Layer { raw, options: *options, proj: [unset; 4], _borrows: PhantomData };
        for p in Projection::ALL {
            let (mut d_in, mut d_out) = (0, 0);
            // SAFETY: valid handle and out pointers.
            check(unsafe { sys::masa_layer_projection_shape(raw.as_ptr(), p.raw(), &mut d_in, &mut d_out) })?;
            product(&[d_in, d_out], "masa_layer_projection_shape")?;
            layer.proj[p.index()].d_in = d_in;
            layer.proj[p.index()].d_out = d_out;
        }
        Ok(layer)
    }

    /// The options the layer was created with (zeros not resolved).
    pub fn options(&self) -> &LayerOptions {
        &self.options
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.options.d_model
    }

    /// `(d_in, d_out)` of projection `which`'s weight.
    pub fn projection_shape(&self, which: Projection) -> (usize, usize) {
        let p = &self.proj[which.index()];
        (p.d_in, p.d_out)
    }

    /// What projection `which` currently is.
    pub fn projection_kind(&self, which: Projection) -> ProjectionKind {
        self.proj[which.index()].kind
    }

    /// Whether projection `which` has a bias.
    pub fn has_bias(&self, which: Projection) -> bool {
        self.proj[which.index()].bias.is_some()
    }

    /// Makes projection `which` a MASA projection: `W = sum_s
    /// coef[layer_index, s] * D_s`. The atoms must have the projection's
    /// shape, the table's `n_atoms` must match the dictionary's and
    /// `layer_index < n_layers`. The layer borrows both for `'a` (the C
    /// layer keeps pointers to them); many layers may share them.
    pub fn set_masa(
        &mut self,
        which: Projection,
        dict: &'a Dictionary<'_>,
        coef: &'a Coefficients<'_>,
        layer_index: usize,
    ) -> Result<()> {
        // SAFETY: valid handles; dict and coef outlive the layer ('a). The
        // library only reads them (the header: forward/backward only read the
        // layer and its parameters), so handing out `*mut` from shared
        // references does not let it write through them.
        check(unsafe {
            sys::masa_layer_set_masa(
                self.raw.as_ptr(),
                which.raw(),
                dict.as_ptr(),
                coef.as_ptr(),
                layer_index,
            )
        })?;
        self.proj[which.index()].kind =
            ProjectionKind::Masa { atoms_len: dict.len(), coefficients_len: coef.len(), layer_index };
        self.refresh(which);
        Ok(())
    }

    /// Makes projection `which` dense over caller memory (`d_in * d_out`
    /// floats, row-major `d_in x d_out`, exactly), borrowed for `'a`.
    pub fn set_dense(&mut self, which: Projection, weight: &'a mut [f32]) -> Result<()> {
        let (d_in, d_out) = self.projection_shape(which);
        expect_len(
            "masa::Layer::set_dense",
            "weight",
            weight.len(),
            d_in * d_out,
            &format!("projection {which}: d_in {d_in} x d_out {d_out}"),
        )?;
        // SAFETY: the buffer has the required length and stays borrowed.
        check(unsafe { sys::masa_layer_set_dense(self.raw.as_ptr(), which.raw(), weight.as_mut_ptr()) })?;
        self.proj[which.index()].kind = ProjectionKind::Dense;
        self.refresh(which);
        Ok(())
    }

    /// Makes projection `which` dense with a zero-initialised weight the
    /// layer owns; fill it through [`weight_mut`](Self::weight_mut).
    pub fn set_dense_owned(&mut self, which: Projection) -> Result<()> {
        // SAFETY: valid handle; NULL asks the layer to allocate.
        check(unsafe { sys::masa_layer_set_dense(self.raw.as_ptr(), which.raw(), ptr::null_mut()) })?;
        self.proj[which.index()].kind = ProjectionKind::Dense;
        self.refresh(which);
        Ok(())
    }

    /// Gives projection `which` a bias over caller memory (`d_out` floats,
    /// exactly), borrowed for `'a`.
    pub fn set_bias(&mut self, which: Projection, bias: &'a mut [f32]) -> Result<()> {
        let (_, d_out) = self.projection_shape(which);
        expect_len(
            "masa::Layer::set_bias",
            "bias",
            bias.len(),
            d_out,
            &format!("projection {which}: d_out {d_out}"),
        )?;
        // SAFETY: the buffer has the required length and stays borrowed.
        check(unsafe { sys::masa_layer_set_bias(self.raw.as_ptr(), which.raw(), bias.as_mut_ptr()) })?;
        self.refresh(which);
        Ok(())
    }

    /// Gives projection `which` a zero-initialised bias the layer owns; fill
    /// it through [`bias_mut`](Self::bias_mut).
    pub fn set_bias_owned(&mut self, which: Projection) -> Result<()> {
        // SAFETY: valid handle; NULL asks the layer to allocate.
        check(unsafe { sys::masa_layer_set_bias(self.raw.as_ptr(), which.raw(), ptr::null_mut()) })?;
        self.refresh(which);
        Ok(())
    }

    /// Removes the bias of projection `which` (no-op without one).
    pub fn remove_bias(&mut self, which: Projection) -> Result<()> {
        // SAFETY: valid handle.
        check(unsafe { sys::masa_layer_remove_bias(self.raw.as_ptr(), which.raw()) })?;
        self.refresh(which);
        Ok(())
    }

    /// Gives projection `which` the low-rank term `A B` over caller memory
    /// (`W = base + A B`): `a` is `d_in x rank`, `b` is `rank x d_out`
    /// (row-major, exactly those lengths), both borrowed for `'a`.
    /// `1 <= rank <= min(d_in, d_out)`, else [`Status::BadShape`]. A
    /// projection whose base was never set computes `x A B` alone (the
    /// low-rank baseline). A [`WeightPolicy::Cached`] MASA projection
    /// composes the term into its cache now. Replaces any earlier term.
    pub fn set_lowrank(
        &mut self,
        which: Projection,
        rank: usize,
        a: &'a mut [f32],
        b: &'a mut [f32],
    ) -> Result<()> {
        let func = "masa::Layer::set_lowrank";
        let (d_in, d_out) = self.projection_shape(which);
        let shape = format!("projection {which}: d_in {d_in}, d_out {d_out}, rank {rank}");
        expect_len(func, "a", a.len(), d_in.saturating_mul(rank), &shape)?;
        expect_len(func, "b", b.len(), rank.saturating_mul(d_out), &shape)?;
        // SAFETY: the buffers have the lengths the library reads (rank is
        // checked by it before anything is read) and stay borrowed for 'a.
        check(unsafe {
            sys::masa_layer_set_lowrank(self.raw.as_ptr(), which.raw(), rank, a.as_mut_ptr(), b.as_mut_ptr())
        })?;
        self.refresh(which);
        Ok(())
    }

    /// Gives projection `which` a low-rank term of the given rank with
    /// zero-initialised factors the layer owns; fill them through
    /// [`lowrank_mut`](Self::lowrank_mut). (A = B = 0 gets zero gradients:
    /// set at least one factor to nonzero values before training.)
    pub fn set_lowrank_owned(&mut self, which: Projection, rank: usize) -> Result<()> {
        // SAFETY: valid handle; NULL factors ask the layer to allocate.
        check(unsafe {
            sys::masa_layer_set_lowrank(
                self.raw.as_ptr(),
                which.raw(),
                rank,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        })?;
        self.refresh(which);
        Ok(())
    }

    /// Removes the low-rank term of projection `which` (no-op without one).
    pub fn remove_lowrank(&mut self, which: Projection) -> Result<()> {
        // SAFETY: valid handle; exclusive access through `&mut self`.
        check(unsafe { sys::masa_layer_remove_lowrank(self.raw.as_ptr(), which.raw()) })?;
        self.refresh(which);
        Ok(())
    }

    /// Rank of projection `which`'s low-rank term (0: none).
    pub fn lowrank_rank(&self, which: Projection) -> usize {
        self.proj[which.index()].rank
    }

    /// The factors `(A, B)` of projection `which`'s low-rank term
    /// (`d_in * rank` and `rank * d_out` floats), or `None`.
    pub fn lowrank(&self, which: Projection) -> Option<(&[f32], &[f32])> {
        let p = &self.proj[which.index()];
        // SAFETY: the factors live as long as the layer (owned) or 'a
        // (wrapped); writers need `&mut self`.
        p.lowrank.map(|(a, b)| unsafe {
            (
                core::slice::from_raw_parts(a.as_ptr(), p.d_in * p.rank),
                core::slice::from_raw_parts(b.as_ptr(), p.rank * p.d_out),
            )
        })
    }

    /// The factors of projection `which`'s low-rank term, writable (a
    /// cached MASA projection then needs [`refresh_weights`](Self::refresh_weights)).
    /// A modification of the parameters as [`weight_mut`](Self::weight_mut) is.
    /// `None` also for factors in a [`Model`]'s memory.
    pub fn lowrank_mut(&mut self, which: Projection) -> Option<(&mut [f32], &mut [f32])> {
        let p = &self.proj[which.index()];
        if p.lowrank_shared {
            return None;
        }
        if p.lowrank.is_some() {
            self.touch();
        }
        // SAFETY: as lowrank(); exclusive through `&mut self`. A and B are
        // distinct allocations (owned) or distinct `&mut` borrows (wrapped).
        p.lowrank.map(|(a, b)| unsafe {
            (
                core::slice::from_raw_parts_mut(a.as_ptr(), p.d_in * p.rank),
                core::slice::from_raw_parts_mut(b.as_ptr(), p.rank * p.d_out),
            )
        })
    }

    /// Sets where the layer's MASA weights come from (see [`WeightPolicy`]).
    /// [`WeightPolicy::Cached`] composes and keeps `W_l` of every MASA
    /// projection now (and again when set again); `OnTheFly` frees them.
    /// Fails with [`Status::OutOfMemory`] leaving the layer as it was.
    pub fn set_weight_policy(&mut self, policy: WeightPolicy) -> Result<()> {
        // SAFETY: valid handle; exclusive access through `&mut self`.
        check(unsafe { sys::masa_layer_set_weight_policy(self.raw.as_ptr(), policy.raw()) })
    }

    /// The layer's weight policy.
    pub fn weight_policy(&self) -> WeightPolicy {
        let mut raw = sys::MASA_WEIGHTS_ON_THE_FLY;
        // SAFETY: valid handle and out pointer; the call cannot fail then.
        unsafe { sys::masa_layer_weight_policy(self.raw.as_ptr(), &mut raw) };
        if raw == sys::MASA_WEIGHTS_CACHED {
            WeightPolicy::Cached
        } else {
            WeightPolicy::OnTheFly
        }
    }

    /// Recomposes the cached weights from the current atoms and
    /// coefficients (nothing to do on the fly). The layer borrows its
    /// dictionaries and tables, so in safe Rust they cannot change under a
    /// cache; this is for parameters changed through the C API or wrapped
    /// memory written elsewhere.
    pub fn refresh_weights(&mut self) -> Result<()> {
        // SAFETY: valid handle; exclusive access through `&mut self`.
        check(unsafe { sys::masa_layer_refresh_weights(self.raw.as_ptr()) })
    }

    /// Re-reads the weight, bias and low-rank pointers of `which` after a
    /// change.
    fn refresh(&mut self, which: Projection) {
        let (mut rank, mut la, mut lb) = (0usize, ptr::null_mut(), ptr::null_mut());
        // SAFETY: valid handle and out pointers; exclusive access through
        // `&mut self`. masa_layer_lowrank cannot fail on a valid layer and
        // projection.
        let (w, b) = unsafe {
            sys::masa_layer_lowrank(self.raw.as_ptr(), which.raw(), &mut rank, &mut la, &mut lb);
            (
                sys::masa_layer_weight(self.raw.as_ptr(), which.raw()),
                sys::masa_layer_bias(self.raw.as_ptr(), which.raw()),
            )
        };
        let p = &mut self.proj[which.index()];
        let (old_weight, old_lowrank) = (p.weight, p.lowrank);
        p.weight = if p.kind == ProjectionKind::Dense { NonNull::new(w) } else { None };
        p.bias = NonNull::new(b);
        p.rank = rank;
        p.lowrank = match (NonNull::new(la), NonNull::new(lb)) {
            (Some(a), Some(b)) if rank > 0 => Some((a, b)),
            _ => None,
        };
        // Memory that changed is no longer the model's.
        p.weight_shared &= p.weight.is_some() && p.weight == old_weight;
        p.lowrank_shared &= p.lowrank.is_some() && p.lowrank == old_lowrank;
    }

    /// Sets every projection `model` covers as its layer `layer_index` has
    /// it (`masa_model_apply`): MASA projections over the model's
    /// dictionaries and tables, dense weights and low-rank factors over its
    /// memory (nothing is copied); projections the model does not cover are
    /// left as they are, and so is the base of a "lowrank" projection (a
    /// fresh layer's is unset: the projection is then `A B` alone). The layer borrows the model for `'a`, so the model
    /// outlives it. The model's memory is shared by every layer set from it:
    /// [`weight`](Self::weight) and [`lowrank`](Self::lowrank) read it, while
    /// [`weight_mut`](Self::weight_mut) and [`lowrank_mut`](Self::lowrank_mut)
    /// return `None` for it (give the projection memory of its own with the
    /// `set_*` functions to train it). Errors as `masa_model_apply`:
    /// [`Status::OutOfRange`] for `layer_index`, [`Status::BadShape`] when
    /// the layer's projection shapes differ from the model's (the layer is
    /// then unchanged); after any other error (out of memory under the cached
    /// weight policy) the projections are partly set: set each again before
    /// use (until then they read as unset and their factors as read-only).
    pub fn apply_model(&mut self, model: &'a Model<'_>, layer_index: usize) -> Result<()> {
        // SAFETY: valid handles; the model outlives the layer ('a) and the
        // library only reads the memory it wraps (forward/backward read the
        // layer's parameters; writers are refused below).
        let applied = check(unsafe { sys::masa_model_apply(model.as_ptr(), layer_index, self.raw.as_ptr()) });
        if let Err(e) = applied {
            // Index and shapes are checked before anything is set; a later
            // failure (out of memory composing a cached projection) leaves
            // an unknown mix of old and model projections. Forget what this
            // wrapper knew, so that no stale pointer or gradient length is
            // used: every projection reads as unset (no gradients accepted,
            // no weight handed out) and its factors as shared, until set again.
            if !matches!(e.status(), Status::OutOfRange | Status::BadShape) {
                for which in Projection::ALL {
                    self.proj[which.index()].kind = ProjectionKind::Unset;
                    self.refresh(which);
                    let p = &mut self.proj[which.index()];
                    p.lowrank_shared = p.lowrank.is_some();
                }
            }
            return Err(e);
        }
        for which in Projection::ALL {
            let info = model.projection(which);
            let p = &mut self.proj[which.index()];
            match info.kind {
                ModelKind::Absent => continue,
                ModelKind::Masa => {
                    let (first, count, atoms) = info
                        .groups
                        .iter()
                        .copied()
                        .find(|&(first, count, _)| layer_index >= first && layer_index < first + count)
                        .expect("masa_model_apply succeeded: a group holds the layer");
                    p.kind = ProjectionKind::Masa {
                        atoms_len: atoms * info.d_in * info.d_out,
                        coefficients_len: count * atoms,
                        layer_index: layer_index - first,
                    };
                }
                ModelKind::Dense => p.kind = ProjectionKind::Dense,
                // The C call sets only the term: the base stays as it was.
                ModelKind::LowRank => {}
            }
            self.refresh(which);
            let p = &mut self.proj[which.index()];
            p.weight_shared = p.weight.is_some() && info.kind == ModelKind::Dense;
            p.lowrank_shared = p.lowrank.is_some();
        }
        Ok(())
    }

    /// The dense weight of projection `which` (`d_in * d_out` floats), or
    /// `None` if it is not dense.
    pub fn weight(&self, which: Projection) -> Option<&[f32]> {
        let p = &self.proj[which.index()];
        // SAFETY: the weight lives as long as the layer (owned) or 'a
        // (wrapped); writers need `&mut self`.
        p.weight.map(|w| unsafe { core::slice::from_raw_parts(w.as_ptr(), p.d_in * p.d_out) })
    }

    /// The dense weight of projection `which`, writable. Counts as a
    /// modification of the parameters (`masa_layer_touch`): reserves and KV
    /// caches this layer filled before are refused afterwards. `None` also
    /// for a weight in a [`Model`]'s memory ([`apply_model`](Self::apply_model)).
    pub fn weight_mut(&mut self, which: Projection) -> Option<&mut [f32]> {
        let p = &self.proj[which.index()];
        if p.weight_shared {
            return None;
        }
        if p.weight.is_some() {
            self.touch();
        }
        // SAFETY: as weight(); exclusive through `&mut self`.
        p.weight.map(|w| unsafe { core::slice::from_raw_parts_mut(w.as_ptr(), p.d_in * p.d_out) })
    }

    /// Declares the layer's parameters modified (`masa_layer_touch`).
    fn touch(&self) {
        // SAFETY: valid handle; the call only bumps a counter and cannot
        // fail on a valid layer, so its status carries nothing.
        unsafe { sys::masa_layer_touch(self.raw.as_ptr()) };
    }

    /// The bias of projection `which` (`d_out` floats), or `None`.
    pub fn bias(&self, which: Projection) -> Option<&[f32]> {
        let p = &self.proj[which.index()];
        // SAFETY: as weight().
        p.bias.map(|b| unsafe { core::slice::from_raw_parts(b.as_ptr(), p.d_out) })
    }

    /// The bias of projection `which`, writable; a modification of the
    /// parameters as [`weight_mut`](Self::weight_mut) is.
    pub fn bias_mut(&mut self, which: Projection) -> Option<&mut [f32]> {
        let p = &self.proj[which.index()];
        if p.bias.is_some() {
            self.touch();
        }
        // SAFETY: as weight_mut().
        p.bias.map(|b| unsafe { core::slice::from_raw_parts_mut(b.as_ptr(), p.d_out) })
    }

    /// Bytes of workspace forward and backward need for `batch` sequences of
    /// `seq` tokens ([`Workspace`] grows to this by itself).
    pub fn workspace_size(&self, batch: usize, seq: usize) -> Result<usize> {
        let mut bytes = 0;
        // SAFETY: valid handle and out pointer.
        check(unsafe { sys::masa_layer_workspace_size(self.raw.as_ptr(), batch, seq, &mut bytes) })?;
        Ok(bytes)
    }

    /// Bytes of reserve forward saves for backward ([`Reserve`] grows to
    /// this by itself).
    pub fn reserve_size(&self, batch: usize, seq: usize) -> Result<usize> {
        let mut bytes = 0;
        // SAFETY: valid handle and out pointer.
        check(unsafe { sys::masa_layer_reserve_size(self.raw.as_ptr(), batch, seq, &mut bytes) })?;
        Ok(bytes)
    }

    fn activation_len(&self, func: &str, batch: usize, seq: usize) -> Result<(usize, String)> {
        let d = self.options.d_model;
        let n = product(&[batch, seq, d], func)?;
        Ok((n, format!("batch {batch} x seq {seq} x d_model {d}")))
    }

    /// Forward pass: `y = attention(x)` for `x` and `y` of shape `[batch,
    /// seq, d_model]` (exact lengths). `pos_offset` is the position of token
    /// 0 for RoPE (e.g. tokens already decoded). With `reserve` (training),
    /// forward saves what [`backward`](Self::backward) needs; `None` is
    /// inference.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        batch: usize,
        seq: usize,
        pos_offset: usize,
        x: &[f32],
        y: &mut [f32],
        workspace: &mut Workspace,
        reserve: Option<&mut Reserve>,
    ) -> Result<()> {
        let func = "masa::Layer::forward";
        let (n, shape) = self.activation_len(func, batch, seq)?;
        expect_len(func, "x", x.len(), n, &shape)?;
        expect_len(func, "y", y.len(), n, &shape)?;
        let ws_bytes = self.workspace_size(batch, seq)?;
        workspace.ensure(ws_bytes)?;
        let mut reserve = reserve;
        let (res_ptr, res_bytes) = match reserve.as_deref_mut() {
            Some(r) => {
                let bytes = self.reserve_size(batch, seq)?;
                r.state = None;
                r.buf.ensure(bytes)?;
                (r.buf.as_mut_ptr(), r.buf.bytes())
            }
            None => (ptr::null_mut(), 0),
        };
        // SAFETY: x and y have n floats each and cannot overlap (& vs &mut);
        // workspace and reserve are exclusively borrowed and at least as
        // large as the library asked for; the layer's parameters are
        // borrowed for 'a and nobody can modify them meanwhile.
        check(unsafe {
            sys::masa_layer_forward(
                self.raw.as_ptr(),
                batch,
                seq,
                pos_offset,
                x.as_ptr(),
                y.as_mut_ptr(),
                workspace.as_mut_ptr(),
                workspace.bytes(),
                res_ptr,
                res_bytes,
            )
        })?;
        if let Some(r) = reserve {
            r.state = Some(ReserveState { layer: self.raw.as_ptr() as usize, batch, seq, pos_offset });
        }
        Ok(())
    }

    /// Backward pass for the forward call that filled `reserve`, which must
    /// have been made on this layer with the same `batch`, `seq`,
    /// `pos_offset` and (not checked) the same `x`.
    ///
    /// `dy` is the gradient of the loss w.r.t. `y`; `dx`, if given, is
    /// overwritten with the gradient w.r.t. `x`. Parameter gradients go where
    /// `grads` says, each buffer with exactly the length of its parameter
    /// (see [`Grads`]); with [`GradMode::Add`] they accumulate, which is what
    /// layers sharing a dictionary need.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        batch: usize,
        seq: usize,
        pos_offset: usize,
        x: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        grads: &mut Grads<'_>,
        workspace: &mut Workspace,
        reserve: &Reserve,
    ) -> Result<()> {
        let func = "masa::Layer::backward";
        let (n, shape) = self.activation_len(func, batch, seq)?;
        expect_len(func, "x", x.len(), n, &shape)?;
        expect_len(func, "dy", dy.len(), n, &shape)?;
        if let Some(dx) = dx.as_deref() {
            expect_len(func, "dx", dx.len(), n, &shape)?;
        }
        match reserve.state {
            None => {
                return Err(Error::binding(
                    Status::InvalidArgument,
                    format!("{func}: the reserve was not filled by a successful forward call"),
                ))
            }
            Some(s) if s.layer != self.raw.as_ptr() as usize => {
                return Err(Error::binding(
                    Status::InvalidArgument,
                    format!("{func}: the reserve was filled by another layer"),
                ))
            }
            Some(s) if (s.batch, s.seq, s.pos_offset) != (batch, seq, pos_offset) => {
                return Err(Error::binding(
                    Status::InvalidArgument,
                    format!(
                        "{func}: batch {batch}, seq {seq}, pos_offset {pos_offset} differ from the \
                         forward call that filled the reserve (batch {}, seq {}, pos_offset {})",
                        s.batch, s.seq, s.pos_offset
                    ),
                ))
            }
            Some(_) => {}
        }
        let raw_grads = grads.raw_for(self, func)?;
        let ws_bytes = self.workspace_size(batch, seq)?;
        workspace.ensure(ws_bytes)?;
        let dx_ptr = dx.map_or(ptr::null_mut(), |d| d.as_mut_ptr());
        // SAFETY: every slice has the length checked above; gradient buffers
        // are distinct `&mut` borrows (so they overlap neither each other nor
        // the inputs) with the lengths libmasa will write; the reserve was
        // filled by forward on this layer with the same sizes.
        check(unsafe {
            sys::masa_layer_backward(
                self.raw.as_ptr(),
                batch,
                seq,
                pos_offset,
                x.as_ptr(),
                dy.as_ptr(),
                dx_ptr,
                &raw_grads,
                workspace.as_mut_ptr(),
                workspace.bytes(),
                reserve.buf.as_ptr(),
                reserve.buf.bytes(),
            )
        })
    }

    /// The raw handle, for calls to `masa-sys`. It stays owned by `self`.
    pub fn as_ptr(&self) -> *mut sys::masa_layer {
        self.raw.as_ptr()
    }
}

impl Drop for Layer<'_> {
    fn drop(&mut self) {
        // SAFETY: valid handle, exclusive access; the layer does not destroy
        // the dictionaries and tables it uses.
        unsafe { sys::masa_layer_destroy(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Layer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<ProjectionKind> = self.proj.iter().map(|p| p.kind).collect();
        let ranks: Vec<usize> = self.proj.iter().map(|p| p.rank).collect();
        f.debug_struct("Layer")
            .field("options", &self.options)
            .field("projections", &kinds)
            .field("lowrank_ranks", &ranks)
            .finish()
    }
}

/// Where a layer's MASA weights `W_l = sum_s c[l, s] D_s` come from
/// (`masa_weight_policy`; the header documents memory and staleness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightPolicy {
    /// Composed from the atoms at every use: memory stays at the S atoms.
    #[default]
    OnTheFly,
    /// Kept composed in the layer: the speed and the memory of dense weights.
    Cached,
}

impl WeightPolicy {
    fn raw(self) -> sys::masa_weight_policy {
        match self {
            WeightPolicy::OnTheFly => sys::MASA_WEIGHTS_ON_THE_FLY,
            WeightPolicy::Cached => sys::MASA_WEIGHTS_CACHED,
        }
    }
}

/// How backward writes parameter gradients (`masa_grad_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GradMode {
    /// Overwrite: `g = this call's gradient`.
    Set,
    /// Accumulate: `g += this call's gradient`.
    Add,
}

/// Where backward writes parameter gradients (`masa_layer_grads`). A
/// gradient that is not given is skipped.
///
/// For projection `p`:
/// - `atoms`: MASA only, the dictionary's length (`n_atoms * rows * cols`);
///   every atom is written or added to: `dD_s (+)= c[l, s] dW_l`.
/// - `coefficients`: MASA only, the table's length (`n_layers * n_atoms`);
///   only row `layer_index` is written or added to.
/// - `weight`: dense only, `d_in * d_out`.
/// - `bias`: `d_out`, the projection must have a bias.
/// - `lowrank_a`, `lowrank_b`: with a low-rank term of rank `r`, `d_in * r`
///   and `r * d_out`: `dA = X^T (dY B^T)`, `dB = (X A)^T dY`.
///
/// Layers sharing a dictionary each add their part to its atom gradient:
/// use [`GradMode::Add`] with one zeroed buffer for all layers.
///
/// ```no_run
/// # use masa::{Grads, GradMode, Projection};
/// let (mut d_atoms, mut d_coef) = (vec![0.0f32; 2 * 16 * 16], vec![0.0f32; 3 * 2]);
/// let grads = Grads::new(GradMode::Add)
///     .atoms(Projection::Q, &mut d_atoms)
///     .coefficients(Projection::Q, &mut d_coef);
/// ```
#[derive(Debug)]
pub struct Grads<'g> {
    mode: GradMode,
    atoms: [Option<&'g mut [f32]>; 4],
    coefficients: [Option<&'g mut [f32]>; 4],
    weight: [Option<&'g mut [f32]>; 4],
    bias: [Option<&'g mut [f32]>; 4],
    lowrank_a: [Option<&'g mut [f32]>; 4],
    lowrank_b: [Option<&'g mut [f32]>; 4],
}

impl<'g> Grads<'g> {
    /// No gradient wanted yet, with the given mode.
    pub fn new(mode: GradMode) -> Self {
        Grads {
            mode,
            atoms: Default::default(),
            coefficients: Default::default(),
            weight: Default::default(),
            bias: Default::default(),
            lowrank_a: Default::default(),
            lowrank_b: Default::default(),
        }
    }

    /// No parameter gradient at all (backward then only computes `dx`).
    pub fn none() -> Self {
        Self::new(GradMode::Add)
    }

    /// The mode.
    pub fn mode(&self) -> GradMode {
        self.mode
    }

    /// Atom gradient of MASA projection `which`.
    pub fn atoms(mut self, which: Projection, buf: &'g mut [f32]) -> Self {
        self.atoms[which.index()] = Some(buf);
        self
    }

    /// Coefficient gradient of MASA projection `which`.
    pub fn coefficients(mut self, which: Projection, buf: &'g mut [f32]) -> Self {
        self.coefficients[which.index()] = Some(buf);
        self
    }

    /// Weight gradient of dense projection `which`.
    pub fn weight(mut self, which: Projection, buf: &'g mut [f32]) -> Self {
        self.weight[which.index()] = Some(buf);
        self
    }

    /// Bias gradient of projection `which`.
    pub fn bias(mut self, which: Projection, buf: &'g mut [f32]) -> Self {
        self.bias[which.index()] = Some(buf);
        self
    }

    /// Gradient of the `A` factor of projection `which`'s low-rank term.
    pub fn lowrank_a(mut self, which: Projection, buf: &'g mut [f32]) -> Self {
        self.lowrank_a[which.index()] = Some(buf);
        self
    }

    /// Gradient of the `B` factor of projection `which`'s low-rank term.
    pub fn lowrank_b(mut self, which: Projection, buf: &'g mut [f32]) -> Self {
        self.lowrank_b[which.index()] = Some(buf);
        self
    }

    /// Checks every buffer against the layer and builds the C struct.
    fn raw_for(&mut self, layer: &Layer<'_>, func: &str) -> Result<sys::masa_layer_grads> {
        let mut raw = core::mem::MaybeUninit::<sys::masa_layer_grads>::zeroed();
        // SAFETY: _init fills the struct (zeroed beforehand anyway).
        let mut raw = unsafe {
            sys::masa_layer_grads_default(raw.as_mut_ptr(), core::mem::size_of::<sys::masa_layer_grads>());
            raw.assume_init()
        };
        raw.mode = match self.mode {
            GradMode::Set => sys::MASA_GRAD_SET,
            GradMode::Add => sys::MASA_GRAD_ADD,
        };
        for p in Projection::ALL {
            let i = p.index();
            let st = &layer.proj[i];
            let (masa_lens, dense) = match st.kind {
                ProjectionKind::Masa { atoms_len, coefficients_len, .. } => {
                    (Some((atoms_len, coefficients_len)), false)
                }
                ProjectionKind::Dense => (None, true),
                ProjectionKind::Unset => (None, false),
            };
            let what = match st.kind {
                ProjectionKind::Masa { .. } => "a MASA projection",
                ProjectionKind::Dense => "a dense projection",
                ProjectionKind::Unset => "not set",
            };
            let not_applicable = |name: &str| {
                Error::binding(
                    Status::InvalidArgument,
                    format!("{func}: a {name} gradient was given for projection {p}, which is {what}"),
                )
            };
            if let Some(buf) = self.atoms[i].as_deref_mut() {
                let (need, _) = masa_lens.ok_or_else(|| not_applicable("d_atoms"))?;
                expect_len(
                    func,
                    &format!("d_atoms[{p}]"),
                    buf.len(),
                    need,
                    "the dictionary's n_atoms x rows x cols",
                )?;
                raw.d_atoms[i] = buf.as_mut_ptr();
            }
            if let Some(buf) = self.coefficients[i].as_deref_mut() {
                let (_, need) = masa_lens.ok_or_else(|| not_applicable("d_coefficients"))?;
                expect_len(
                    func,
                    &format!("d_coefficients[{p}]"),
                    buf.len(),
                    need,
                    "the table's n_layers x n_atoms",
                )?;
                raw.d_coefficients[i] = buf.as_mut_ptr();
            }
            if let Some(buf) = self.weight[i].as_deref_mut() {
                if !dense {
                    return Err(not_applicable("d_weight"));
                }
                expect_len(
                    func,
                    &format!("d_weight[{p}]"),
                    buf.len(),
                    st.d_in * st.d_out,
                    &format!("d_in {} x d_out {}", st.d_in, st.d_out),
                )?;
                raw.d_weight[i] = buf.as_mut_ptr();
            }
            if let Some(buf) = self.bias[i].as_deref_mut() {
                if st.bias.is_none() {
                    return Err(Error::binding(
                        Status::InvalidArgument,
                        format!("{func}: a d_bias gradient was given for projection {p}, which has no bias"),
                    ));
                }
                expect_len(
                    func,
                    &format!("d_bias[{p}]"),
                    buf.len(),
                    st.d_out,
                    &format!("d_out {}", st.d_out),
                )?;
                raw.d_bias[i] = buf.as_mut_ptr();
            }
            let factors = [
                (&mut self.lowrank_a[i], st.d_in * st.rank, "d_lowrank_a", "d_in x rank"),
                (&mut self.lowrank_b[i], st.rank * st.d_out, "d_lowrank_b", "rank x d_out"),
            ];
            for (k, (slot, need, name, shape)) in factors.into_iter().enumerate() {
                if let Some(buf) = slot.as_deref_mut() {
                    if st.rank == 0 {
                        return Err(Error::binding(
                            Status::InvalidArgument,
                            format!("{func}: a {name} gradient was given for projection {p}, which has no low-rank term"),
                        ));
                    }
                    expect_len(func, &format!("{name}[{p}]"), buf.len(), need, shape)?;
                    if k == 0 {
                        raw.d_lowrank_a[i] = buf.as_mut_ptr();
                    } else {
                        raw.d_lowrank_b[i] = buf.as_mut_ptr();
                    }
                }
            }
        }
        Ok(raw)
    }
}

/// 64-byte aligned storage unit for workspace and reserve buffers.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Chunk([u8; 64]);

/// A growable, 64-byte aligned byte buffer.
#[derive(Default)]
struct AlignedBuf {
    chunks: Vec<Chunk>,
}

impl AlignedBuf {
    fn ensure(&mut self, bytes: usize) -> Result<()> {
        let need = bytes.div_ceil(64);
        if need > self.chunks.len() {
            let extra = need - self.chunks.len();
            self.chunks.try_reserve_exact(extra).map_err(|_| {
                Error::binding(Status::OutOfMemory, format!("cannot allocate a buffer of {bytes} bytes"))
            })?;
            self.chunks.resize(need, Chunk([0; 64]));
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        self.chunks.len() * 64
    }

    fn as_mut_ptr(&mut self) -> *mut core::ffi::c_void {
        if self.chunks.is_empty() {
            ptr::null_mut()
        } else {
            self.chunks.as_mut_ptr().cast()
        }
    }

    fn as_ptr(&self) -> *const core::ffi::c_void {
        if self.chunks.is_empty() {
            ptr::null()
        } else {
            self.chunks.as_ptr().cast()
        }
    }
}

/// Scratch memory for forward and backward (any contents, not kept between
/// calls). It grows to what each call needs; one per thread.
#[derive(Default)]
pub struct Workspace {
    buf: AlignedBuf,
}

impl Workspace {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// A workspace of at least `bytes` bytes.
    pub fn with_bytes(bytes: usize) -> Result<Self> {
        let mut w = Self::default();
        w.buf.ensure(bytes)?;
        Ok(w)
    }

    /// Current size in bytes.
    pub fn bytes(&self) -> usize {
        self.buf.bytes()
    }

    fn ensure(&mut self, bytes: usize) -> Result<()> {
        self.buf.ensure(bytes)
    }

    fn as_mut_ptr(&mut self) -> *mut core::ffi::c_void {
        self.buf.as_mut_ptr()
    }
}

impl fmt::Debug for Workspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workspace").field("bytes", &self.bytes()).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReserveState {
    layer: usize,
    batch: usize,
    seq: usize,
    pos_offset: usize,
}

/// What a training forward call saves for backward (the projected and
/// rotated Q, K, V, the attention output and the softmax log-sum-exp). It
/// grows to what forward needs and remembers which layer and sizes filled
/// it, so backward can refuse a mismatched reserve. One per layer and
/// micro-batch in flight.
#[derive(Default)]
pub struct Reserve {
    buf: AlignedBuf,
    state: Option<ReserveState>,
}

impl Reserve {
    /// An empty reserve.
    pub fn new() -> Self {
        Self::default()
    }

    /// Current size in bytes.
    pub fn bytes(&self) -> usize {
        self.buf.bytes()
    }

    /// Whether a successful forward call filled it.
    pub fn is_filled(&self) -> bool {
        self.state.is_some()
    }
}

impl fmt::Debug for Reserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reserve").field("bytes", &self.bytes()).field("state", &self.state).finish()
    }
}
