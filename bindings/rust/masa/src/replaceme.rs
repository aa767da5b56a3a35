//! ReplaceMe (`masa/replaceme.h`): the linear map that replaces removed
//! transformer blocks, estimated by least squares ([`LinearEstimator`]) or by
//! Adam on a cosine loss ([`CosineEstimator`]), and its merge into a down
//! projection ([`merge_linear_map`]). Matrices are row-major `f32` slices;
//! for ReplaceMe, `x` is the MLP output M of block i, `target` the output L
//! of block i+n and `offset` the residual Y of block i after attention.

use core::marker::PhantomData;
use core::ptr::{self, NonNull};

use masa_sys as sys;

use crate::context::{null_handle, Context};
use crate::error::{check, expect_len, product, Error, Result, Status};

/// Checks a batch: `x` rows x d_in, `target` (and `offset`) rows x d_out;
/// returns the row count.
fn batch_rows(
    func: &str,
    d_in: usize,
    d_out: usize,
    x: &[f32],
    target: &[f32],
    offset: Option<&[f32]>,
) -> Result<usize> {
    if !x.len().is_multiple_of(d_in) {
        return Err(Error::binding(
            Status::BadShape,
            format!("{func}: x has {} elements, not a multiple of d_in {d_in}", x.len()),
        ));
    }
    let rows = x.len() / d_in;
    let need = product(&[rows, d_out], func)?;
    expect_len(func, "target", target.len(), need, &format!("rows {rows} x d_out {d_out}"))?;
    if let Some(o) = offset {
        expect_len(func, "offset", o.len(), need, &format!("rows {rows} x d_out {d_out}"))?;
    }
    Ok(rows)
}

fn opt_ptr(o: Option<&[f32]>) -> *const f32 {
    o.map_or(ptr::null(), |s| s.as_ptr())
}

/// Least-squares estimator of T (d_in x d_out) with `x T ~ target - offset`:
/// `X^T X` and `X^T (target - offset)` accumulated in f64
/// (`masa_linear_estimator`).
pub struct LinearEstimator<'a> {
    raw: NonNull<sys::masa_linear_estimator>,
    d_in: usize,
    d_out: usize,
    _ctx: PhantomData<&'a Context>,
}

// SAFETY (header): modifying calls take &mut self; the &self calls only read.
unsafe impl Send for LinearEstimator<'_> {}
unsafe impl Sync for LinearEstimator<'_> {}

impl<'a> LinearEstimator<'a> {
    /// Zero statistics for `d_in x d_out` maps.
    pub fn new(ctx: &'a Context, d_in: usize, d_out: usize) -> Result<Self> {
        let mut out = ptr::null_mut();
        // SAFETY: valid context and out pointer.
        check(unsafe { sys::masa_linear_estimator_create(ctx.as_ptr(), d_in, d_out, &mut out) })?;
        let raw = NonNull::new(out).ok_or_else(|| null_handle("masa_linear_estimator_create"))?;
        Ok(LinearEstimator { raw, d_in, d_out, _ctx: PhantomData })
    }

    /// `(d_in, d_out)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    /// Adds a batch: `x` (rows x d_in), `target` and `offset` (rows x d_out).
    pub fn accumulate(&mut self, x: &[f32], target: &[f32], offset: Option<&[f32]>) -> Result<()> {
        let rows = batch_rows("masa::LinearEstimator::accumulate", self.d_in, self.d_out, x, target, offset)?;
        // SAFETY: the slices hold rows x width floats (checked above).
        check(unsafe {
            sys::masa_linear_estimator_accumulate(
                self.raw.as_ptr(),
                rows,
                x.as_ptr(),
                target.as_ptr(),
                opt_ptr(offset),
            )
        })
    }

    /// `self += other` (statistics and rows).
    pub fn merge(&mut self, other: &LinearEstimator<'_>) -> Result<()> {
        // SAFETY: two valid handles; &mut self and &other cannot alias.
        check(unsafe { sys::masa_linear_estimator_merge(self.raw.as_ptr(), other.raw.as_ptr()) })
    }

    /// Zeroes the statistics and the row count.
    pub fn reset(&mut self) -> Result<()> {
        // SAFETY: valid handle.
        check(unsafe { sys::masa_linear_estimator_reset(self.raw.as_ptr()) })
    }

    /// Rows accumulated so far.
    pub fn rows(&self) -> u64 {
        let mut n = 0;
        // SAFETY: valid handle and output pointer; cannot fail.
        unsafe { sys::masa_linear_estimator_rows(self.raw.as_ptr(), &mut n) };
        n
    }

    /// `(X^T X, X^T Z)`, row-major f64.
    pub fn stats(&self) -> (Vec<f64>, Vec<f64>) {
        let mut xtx = vec![0.0; self.d_in * self.d_in];
        let mut xtz = vec![0.0; self.d_in * self.d_out];
        // SAFETY: buffers of the documented sizes; cannot fail.
        unsafe { sys::masa_linear_estimator_stats(self.raw.as_ptr(), xtx.as_mut_ptr(), xtz.as_mut_ptr()) };
        (xtx, xtz)
    }

    /// `T = (X^T X + alpha I)^-1 X^T Z` (d_in x d_out, row-major) by Cholesky.
    pub fn solve(&self, alpha: f64) -> Result<Vec<f32>> {
        let mut t = vec![0.0f32; self.d_in * self.d_out];
        // SAFETY: t holds d_in x d_out floats.
        check(unsafe { sys::masa_linear_estimator_solve(self.raw.as_ptr(), alpha, t.as_mut_ptr()) })?;
        Ok(t)
    }
}

impl Drop for LinearEstimator<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is owned and destroyed once.
        unsafe { sys::masa_linear_estimator_destroy(self.raw.as_ptr()) }
    }
}

/// Options of [`CosineEstimator`] (`masa_cosine_options`); `Default` gives the
/// library's defaults (10 epochs, 1024 rows per batch, lr 1e-4, betas 0.9 and
/// 0.999, eps 1e-8, seed 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineOptions {
    /// Passes over the rows in [`CosineEstimator::fit`].
    pub epochs: usize,
    /// Rows per Adam step in `fit`.
    pub batch_rows: usize,
    /// Adam's learning rate.
    pub learning_rate: f32,
    /// Adam's beta1.
    pub beta1: f32,
    /// Adam's beta2.
    pub beta2: f32,
    /// Adam's eps.
    pub eps: f32,
    /// The row order of each epoch of `fit`.
    pub seed: u64,
}

impl Default for CosineOptions {
    fn default() -> Self {
        let o = raw_cosine_defaults();
        CosineOptions {
            epochs: o.epochs,
            batch_rows: o.batch_rows,
            learning_rate: o.learning_rate,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            seed: o.seed,
        }
    }
}

fn raw_cosine_defaults() -> sys::masa_cosine_options {
    let mut o = core::mem::MaybeUninit::<sys::masa_cosine_options>::zeroed();
    // SAFETY: _default fills the whole struct (zeroed beforehand too).
    unsafe {
        sys::masa_cosine_options_default(o.as_mut_ptr(), core::mem::size_of::<sys::masa_cosine_options>());
        o.assume_init()
    }
}

/// Adam on `1 - mean cos(offset + x T, target)` from T = I
/// (`masa_cosine_estimator`).
pub struct CosineEstimator<'a> {
    raw: NonNull<sys::masa_cosine_estimator>,
    d_in: usize,
    d_out: usize,
    epochs: usize,
    _ctx: PhantomData<&'a Context>,
}

// SAFETY (header): modifying calls take &mut self; the &self calls only read.
unsafe impl Send for CosineEstimator<'_> {}
unsafe impl Sync for CosineEstimator<'_> {}

impl<'a> CosineEstimator<'a> {
    /// An estimator of a `d_in x d_out` map starting at I.
    pub fn new(ctx: &'a Context, d_in: usize, d_out: usize, options: &CosineOptions) -> Result<Self> {
        let mut raw_opt = raw_cosine_defaults();
        raw_opt.epochs = options.epochs;
        raw_opt.batch_rows = options.batch_rows;
        raw_opt.learning_rate = options.learning_rate;
        raw_opt.beta1 = options.beta1;
        raw_opt.beta2 = options.beta2;
        raw_opt.eps = options.eps;
        raw_opt.seed = options.seed;
        let mut out = ptr::null_mut();
        // SAFETY: valid context, options and out pointer.
        check(unsafe { sys::masa_cosine_estimator_create(ctx.as_ptr(), d_in, d_out, &raw_opt, &mut out) })?;
        let raw = NonNull::new(out).ok_or_else(|| null_handle("masa_cosine_estimator_create"))?;
        Ok(CosineEstimator { raw, d_in, d_out, epochs: options.epochs, _ctx: PhantomData })
    }

    /// The current T (d_in x d_out, row-major).
    pub fn transform(&self) -> Vec<f32> {
        let mut t = vec![0.0f32; self.d_in * self.d_out];
        // SAFETY: t holds d_in x d_out floats; cannot fail.
        unsafe { sys::masa_cosine_estimator_transform(self.raw.as_ptr(), t.as_mut_ptr()) };
        t
    }

    /// Starts again from `t` (d_in x d_out) with Adam's state cleared.
    pub fn set_transform(&mut self, t: &[f32]) -> Result<()> {
        let func = "masa::CosineEstimator::set_transform";
        expect_len(func, "t", t.len(), self.d_in * self.d_out, &format!("{} x {}", self.d_in, self.d_out))?;
        // SAFETY: t holds d_in x d_out floats.
        check(unsafe { sys::masa_cosine_estimator_set_transform(self.raw.as_ptr(), t.as_ptr()) })
    }

    /// Adam steps taken.
    pub fn steps(&self) -> u64 {
        let mut n = 0;
        // SAFETY: valid handle and output pointer; cannot fail.
        unsafe { sys::masa_cosine_estimator_steps(self.raw.as_ptr(), &mut n) };
        n
    }

    /// The loss of these rows for the current T.
    pub fn loss(&self, x: &[f32], target: &[f32], offset: Option<&[f32]>) -> Result<f64> {
        let rows = batch_rows("masa::CosineEstimator::loss", self.d_in, self.d_out, x, target, offset)?;
        let mut loss = 0.0;
        // SAFETY: slices checked above.
        check(unsafe {
            sys::masa_cosine_estimator_loss(
                self.raw.as_ptr(),
                rows,
                x.as_ptr(),
                target.as_ptr(),
                opt_ptr(offset),
                &mut loss,
            )
        })?;
        Ok(loss)
    }

    /// One Adam step on exactly these rows; returns the loss before it.
    pub fn step(&mut self, x: &[f32], target: &[f32], offset: Option<&[f32]>) -> Result<f64> {
        let rows = batch_rows("masa::CosineEstimator::step", self.d_in, self.d_out, x, target, offset)?;
        let mut loss = 0.0;
        // SAFETY: slices checked above.
        check(unsafe {
            sys::masa_cosine_estimator_step(
                self.raw.as_ptr(),
                rows,
                x.as_ptr(),
                target.as_ptr(),
                opt_ptr(offset),
                &mut loss,
            )
        })?;
        Ok(loss)
    }

    /// The options' epochs over all rows in seeded shuffled batches; returns
    /// each epoch's mean batch loss.
    pub fn fit(&mut self, x: &[f32], target: &[f32], offset: Option<&[f32]>) -> Result<Vec<f64>> {
        let rows = batch_rows("masa::CosineEstimator::fit", self.d_in, self.d_out, x, target, offset)?;
        let mut losses = vec![0.0; self.epochs];
        // SAFETY: slices checked above; losses holds `epochs` doubles.
        check(unsafe {
            sys::masa_cosine_estimator_fit(
                self.raw.as_ptr(),
                rows,
                x.as_ptr(),
                target.as_ptr(),
                opt_ptr(offset),
                losses.as_mut_ptr(),
            )
        })?;
        Ok(losses)
    }
}

impl Drop for CosineEstimator<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is owned and destroyed once.
        unsafe { sys::masa_cosine_estimator_destroy(self.raw.as_ptr()) }
    }
}

/// Storage of the down projection for [`merge_linear_map`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeLayout {
    /// `w` is d_ff x d; the output is `h w`.
    RowVector,
    /// `w` is d x d_ff (PyTorch nn.Linear's weight); the output is `h w^T`.
    NnLinear,
}

/// Folds T (d x d) into a down projection in place: the new projection
/// outputs (old output) T; `bias` (d values) likewise.
pub fn merge_linear_map(
    ctx: &Context,
    layout: MergeLayout,
    d_ff: usize,
    d: usize,
    w: &mut [f32],
    bias: Option<&mut [f32]>,
    t: &[f32],
) -> Result<()> {
    let func = "masa::merge_linear_map";
    expect_len(func, "w", w.len(), product(&[d_ff, d], func)?, &format!("d_ff {d_ff} x d {d}"))?;
    expect_len(func, "t", t.len(), product(&[d, d], func)?, &format!("d {d} x d {d}"))?;
    let bias_ptr = match bias {
        Some(b) => {
            expect_len(func, "bias", b.len(), d, "d")?;
            b.as_mut_ptr()
        }
        None => ptr::null_mut(),
    };
    let code = match layout {
        MergeLayout::RowVector => sys::MASA_MERGE_ROW_VECTOR,
        MergeLayout::NnLinear => sys::MASA_MERGE_NN_LINEAR,
    };
    // SAFETY: lengths checked; w, bias (&mut) and t (&) cannot overlap.
    check(unsafe {
        sys::masa_merge_linear_map(ctx.as_ptr(), code, d_ff, d, w.as_mut_ptr(), bias_ptr, t.as_ptr())
    })
}
