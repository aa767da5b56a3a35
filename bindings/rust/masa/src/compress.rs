//! Compressing pretrained weights (`include/masa/compress.h`): Matrix PCA of
//! a group of layers, the grouping planner, calibration statistics and the
//! whitened low-rank residual.
//!
//! Matrices are row-major `d_in x d_out` (`rows x cols`) float32 slices, as
//! everywhere in libmasa. Grams, eigenvalues, calibration matrices and
//! energies are `f64`.
//!
//! ```
//! use masa::{compress, Context};
//!
//! let ctx = Context::with_threads(1)?;
//! // 4 layers of 3 x 5, layer l = (l + 1) * base + a little of layer-specific noise
//! let base: Vec<f32> = (0..15).map(|i| (i as f32 * 0.7).sin()).collect();
//! let layers: Vec<Vec<f32>> = (0..4)
//!     .map(|l| base.iter().enumerate().map(|(i, b)| (l + 1) as f32 * b + 0.01 * ((i * l) as f32).cos()).collect())
//!     .collect();
//! let mats: Vec<&[f32]> = layers.iter().map(|m| m.as_slice()).collect();
//! let pca = compress::matrix_pca(&ctx, &mats, 3, 5, 1, None)?;
//! assert!(pca.residual_energy < 1e-3 * pca.total_energy); // one atom captures nearly all
//!
//! let g = compress::gram(&ctx, &mats, 3, 5)?;
//! let plan = compress::plan_groups(&ctx, 4, &g, 3, 5, 2 * (15 + 4))?;
//! assert!(plan.params <= 2 * (15 + 4));
//! # Ok::<(), masa::Error>(())
//! ```

use core::marker::PhantomData;
use core::ptr::{self, NonNull};

use masa_sys as sys;

use crate::context::{null_handle, Context};
use crate::error::{check, expect_len, product, Error, Result, Status};
use crate::params::{Coefficients, Dictionary};

/// Pointers to the matrices after checking each has `rows * cols` floats.
fn mat_ptrs(func: &str, mats: &[&[f32]], rows: usize, cols: usize) -> Result<Vec<*const f32>> {
    let n = product(&[rows, cols], func)?;
    for (i, m) in mats.iter().enumerate() {
        expect_len(func, &format!("mats[{i}]"), m.len(), n, &format!("rows {rows} x cols {cols}"))?;
    }
    Ok(mats.iter().map(|m| m.as_ptr()).collect())
}

/// Elements an `n x n` block with row stride `ld` spans (`(n - 1) * ld +
/// n`; 0 when the library refuses the shape before reading).
fn block_len(func: &str, n: usize, ld: usize) -> Result<usize> {
    if n == 0 || ld < n {
        Ok(0)
    } else {
        Ok(product(&[n - 1, ld], func)? + n)
    }
}

/// `G[i, j] = <W_i, W_j>_F` of the matrices (`n x n`, row-major, f64),
/// accumulated in float64 through BLIS (`masa_gram`).
pub fn gram(ctx: &Context, mats: &[&[f32]], rows: usize, cols: usize) -> Result<Vec<f64>> {
    let ptrs = mat_ptrs("masa::compress::gram", mats, rows, cols)?;
    let n = mats.len();
    let mut g = vec![0.0; n.checked_mul(n).unwrap_or(0)];
    // SAFETY: every pointer covers rows * cols floats; g holds n * n doubles
    // (its length is passed).
    check(unsafe { sys::masa_gram(ctx.as_ptr(), n, rows, cols, ptrs.as_ptr(), g.as_mut_ptr(), g.len()) })?;
    Ok(g)
}

/// All `n` eigenvalues (descending) of the symmetric `n x n` block of
/// `gram` starting at its first element, with row stride `ld` (a group
/// `[a, b)` of an `L x L` Gram is `&g[a * L + a..]` with `ld = L`).
pub fn gram_eigenvalues(ctx: &Context, n: usize, gram: &[f64], ld: usize) -> Result<Vec<f64>> {
    let func = "masa::compress::gram_eigenvalues";
    let need = block_len(func, n, ld)?;
    if gram.len() < need {
        return Err(Error::binding(
            Status::BufferTooSmall,
            format!(
                "{func}: gram has {} elements, the {n} x {n} block (row stride {ld}) needs {need}",
                gram.len()
            ),
        ));
    }
    let mut w = vec![0.0; n];
    // SAFETY: the block lies inside gram (checked above, or the library
    // refuses n == 0 / ld < n before reading); w holds n doubles.
    check(unsafe { sys::masa_gram_eigenvalues(ctx.as_ptr(), n, gram.as_ptr(), ld, w.as_mut_ptr()) })?;
    Ok(w)
}

/// What Matrix PCA reports (`masa_pca_result`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PcaReport {
    /// Numerical rank of the Gram (eigenvalues above `MASA_PCA_RANK_RTOL` of the largest).
    pub rank: usize,
    /// `sum_l ||W_l||_F^2`.
    pub total_energy: f64,
    /// Sum of the kept eigenvalues.
    pub captured_energy: f64,
    /// Sum of the dropped eigenvalues: the squared reconstruction error.
    pub residual_energy: f64,
}

impl PcaReport {
    fn from_raw(r: &sys::masa_pca_result) -> Self {
        PcaReport {
            rank: r.rank,
            total_energy: r.total_energy,
            captured_energy: r.captured_energy,
            residual_energy: r.residual_energy,
        }
    }
}

fn pca_result() -> sys::masa_pca_result {
    let mut r = sys::masa_pca_result::default();
    // SAFETY: fills at most size_of bytes of r.
    unsafe { sys::masa_pca_result_default(&mut r, core::mem::size_of::<sys::masa_pca_result>()) };
    r
}

/// Matrix PCA of one group: atoms, coefficients and every eigenvalue.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    /// `n_atoms * rows * cols` floats, the dictionary layout (atom `s` at
    /// `s * rows * cols`); orthonormal under the Frobenius inner product.
    pub atoms: Vec<f32>,
    /// `n_mats * n_atoms` floats, `c[l, s]` at `l * n_atoms + s`.
    pub coefficients: Vec<f32>,
    /// All `n_mats` eigenvalues of the group's Gram, descending.
    pub eigenvalues: Vec<f64>,
    /// Numerical rank of the Gram.
    pub rank: usize,
    /// `sum_l ||W_l||_F^2`.
    pub total_energy: f64,
    /// Sum of the kept eigenvalues.
    pub captured_energy: f64,
    /// Sum of the dropped eigenvalues (the squared reconstruction error).
    pub residual_energy: f64,
}

/// The Gram a caller already has, with its row stride (`gram_ld >= n_mats`).
fn gram_arg(func: &str, n: usize, gram: Option<(&[f64], usize)>) -> Result<(*const f64, usize)> {
    match gram {
        None => Ok((ptr::null(), 0)),
        Some((g, ld)) => {
            let need = block_len(func, n, ld)?;
            if g.len() < need {
                return Err(Error::binding(
                    Status::BufferTooSmall,
                    format!("{func}: gram has {} elements, {need} needed", g.len()),
                ));
            }
            Ok((g.as_ptr(), ld))
        }
    }
}

/// Matrix PCA of the matrices (one projection type, one group of
/// consecutive layers) with `n_atoms` atoms (`masa_matrix_pca`). `gram`: the
/// group's Gram and its row stride if the caller has it.
pub fn matrix_pca(
    ctx: &Context,
    mats: &[&[f32]],
    rows: usize,
    cols: usize,
    n_atoms: usize,
    gram: Option<(&[f64], usize)>,
) -> Result<Pca> {
    let func = "masa::compress::matrix_pca";
    let ptrs = mat_ptrs(func, mats, rows, cols)?;
    let n = mats.len();
    let (g, ld) = gram_arg(func, n, gram)?;
    let mut atoms = vec![0f32; product(&[n_atoms, rows, cols], func)?];
    let mut coefs = vec![0f32; product(&[n, n_atoms], func)?];
    let mut w = vec![0f64; n];
    let mut r = pca_result();
    // SAFETY: pointers checked above; output lengths are passed (the
    // eigenvalue buffer holds n_mats doubles).
    check(unsafe {
        sys::masa_matrix_pca(
            ctx.as_ptr(),
            n,
            rows,
            cols,
            ptrs.as_ptr(),
            g,
            ld,
            n_atoms,
            atoms.as_mut_ptr(),
            atoms.len(),
            coefs.as_mut_ptr(),
            coefs.len(),
            w.as_mut_ptr(),
            &mut r,
        )
    })?;
    Ok(Pca {
        atoms,
        coefficients: coefs,
        eigenvalues: w,
        rank: r.rank,
        total_energy: r.total_energy,
        captured_energy: r.captured_energy,
        residual_energy: r.residual_energy,
    })
}

/// Matrix PCA into a new library-owned [`Dictionary`] and [`Coefficients`]
/// table (`masa_matrix_pca_create`), ready for [`crate::Layer::set_masa`].
pub fn matrix_pca_create<'a>(
    ctx: &'a Context,
    mats: &[&[f32]],
    rows: usize,
    cols: usize,
    n_atoms: usize,
    gram: Option<(&[f64], usize)>,
) -> Result<(Dictionary<'a>, Coefficients<'a>, PcaReport)> {
    let func = "masa::compress::matrix_pca_create";
    let ptrs = mat_ptrs(func, mats, rows, cols)?;
    let (g, ld) = gram_arg(func, mats.len(), gram)?;
    let (mut d, mut c) = (ptr::null_mut(), ptr::null_mut());
    let mut r = pca_result();
    // SAFETY: pointers checked above; on success d and c are new handles
    // that nothing else owns.
    check(unsafe {
        sys::masa_matrix_pca_create(
            ctx.as_ptr(),
            mats.len(),
            rows,
            cols,
            ptrs.as_ptr(),
            g,
            ld,
            n_atoms,
            &mut d,
            &mut c,
            &mut r,
        )
    })?;
    // SAFETY: handles just created; each is owned (and destroyed on error)
    // by its wrapper.
    let coef = unsafe { Coefficients::from_created(c, "masa_matrix_pca_create") };
    let dict = unsafe { Dictionary::from_created(d, "masa_matrix_pca_create") };
    Ok((dict?, coef?, PcaReport::from_raw(&r)))
}

/// A plan of consecutive groups (`masa_group_plan_result` plus the arrays).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPlan {
    /// First layer of each group (`starts[0] == 0`).
    pub starts: Vec<usize>,
    /// Atoms of each group.
    pub atoms: Vec<usize>,
    /// `sum_g S_g * (rows * cols + L_g)`.
    pub params: usize,
    /// Sum of the dropped eigenvalues of every group.
    pub error: f64,
    /// Trace of the Gram.
    pub total_energy: f64,
}

impl GroupPlan {
    /// `(first, end, n_atoms)` of every group, for `n_layers` layers.
    pub fn groups(&self, n_layers: usize) -> Vec<(usize, usize, usize)> {
        (0..self.starts.len())
            .map(|g| {
                let end = self.starts.get(g + 1).copied().unwrap_or(n_layers);
                (self.starts[g], end, self.atoms[g])
            })
            .collect()
    }
}

fn plan_result() -> sys::masa_group_plan_result {
    let mut r = sys::masa_group_plan_result::default();
    // SAFETY: fills at most size_of bytes of r.
    unsafe {
        sys::masa_group_plan_result_default(&mut r, core::mem::size_of::<sys::masa_group_plan_result>())
    };
    r
}

fn check_gram_len(func: &str, gram: &[f64], n_layers: usize) -> Result<()> {
    let need = product(&[n_layers, n_layers], func)?;
    expect_len(func, "gram", gram.len(), need, &format!("{n_layers} x {n_layers}"))
}

/// Cuts and atoms per group with the smallest Matrix PCA error within
/// `budget` parameters, from the whole-model Gram (`n_layers x n_layers`) of
/// matrices of `rows x cols` (`masa_group_plan`).
pub fn plan_groups(
    ctx: &Context,
    n_layers: usize,
    gram: &[f64],
    rows: usize,
    cols: usize,
    budget: usize,
) -> Result<GroupPlan> {
    check_gram_len("masa::compress::plan_groups", gram, n_layers)?;
    let mut starts = vec![0usize; n_layers.max(1)];
    let mut atoms = vec![0usize; n_layers.max(1)];
    let mut r = plan_result();
    // SAFETY: gram holds n_layers^2 doubles; the arrays hold `capacity` each.
    check(unsafe {
        sys::masa_group_plan(
            ctx.as_ptr(),
            n_layers,
            gram.as_ptr(),
            rows,
            cols,
            budget,
            starts.as_mut_ptr(),
            atoms.as_mut_ptr(),
            n_layers,
            &mut r,
        )
    })?;
    starts.truncate(r.n_groups);
    atoms.truncate(r.n_groups);
    Ok(GroupPlan { starts, atoms, params: r.params, error: r.error, total_energy: r.total_energy })
}

/// Atoms per group for caller-chosen cuts (`starts`: the first layer of
/// each group, e.g. where the KL drift is largest) within `budget`
/// (`masa_group_plan_fixed`).
pub fn plan_groups_fixed(
    ctx: &Context,
    n_layers: usize,
    gram: &[f64],
    rows: usize,
    cols: usize,
    budget: usize,
    starts: &[usize],
) -> Result<GroupPlan> {
    check_gram_len("masa::compress::plan_groups_fixed", gram, n_layers)?;
    let mut atoms = vec![0usize; starts.len().max(1)];
    let mut r = plan_result();
    // SAFETY: gram holds n_layers^2 doubles; starts and atoms hold n_groups.
    check(unsafe {
        sys::masa_group_plan_fixed(
            ctx.as_ptr(),
            n_layers,
            gram.as_ptr(),
            rows,
            cols,
            budget,
            starts.len(),
            starts.as_ptr(),
            atoms.as_mut_ptr(),
            &mut r,
        )
    })?;
    atoms.truncate(starts.len());
    Ok(GroupPlan {
        starts: starts.to_vec(),
        atoms,
        params: r.params,
        error: r.error,
        total_energy: r.total_energy,
    })
}

/// Calibration statistics `C = X^T X` (`dim x dim`, f64) of a projection's
/// input rows (`masa_calib`).
///
/// Accumulating and merging take `&mut self`; reading takes `&self`, so the
/// borrow rules give the exclusive access the C API asks for.
pub struct Calibration<'a> {
    raw: NonNull<sys::masa_calib>,
    dim: usize,
    _ctx: PhantomData<&'a Context>,
}

// SAFETY (compress.h): accumulate, merge and destroy need exclusive access
// (they take &mut self / self); reads may run on any number of threads.
unsafe impl Send for Calibration<'_> {}
unsafe impl Sync for Calibration<'_> {}

impl<'a> Calibration<'a> {
    /// Empty statistics for rows of `dim` features.
    pub fn new(ctx: &'a Context, dim: usize) -> Result<Self> {
        let mut out = ptr::null_mut();
        // SAFETY: valid context and out pointer.
        check(unsafe { sys::masa_calib_create(ctx.as_ptr(), dim, &mut out) })?;
        let raw = NonNull::new(out).ok_or_else(|| null_handle("masa_calib_create"))?;
        Ok(Calibration { raw, dim, _ctx: PhantomData })
    }

    /// A copy of saved statistics: `matrix` (`dim x dim`, symmetric, finite)
    /// and the row count behind it.
    pub fn from_data(ctx: &'a Context, dim: usize, matrix: &[f64], n_rows: u64) -> Result<Self> {
        let func = "masa::compress::Calibration::from_data";
        let need = product(&[dim, dim], func)?;
        expect_len(func, "matrix", matrix.len(), need, &format!("{dim} x {dim}"))?;
        let mut out = ptr::null_mut();
        // SAFETY: matrix holds dim^2 doubles.
        check(unsafe {
            sys::masa_calib_create_from_data(ctx.as_ptr(), dim, matrix.as_ptr(), n_rows, &mut out)
        })?;
        let raw = NonNull::new(out).ok_or_else(|| null_handle("masa_calib_create_from_data"))?;
        Ok(Calibration { raw, dim, _ctx: PhantomData })
    }

    /// `C += X^T X` for the rows of `x` (`n_rows x dim`, row-major; its
    /// length must be a multiple of `dim`).
    pub fn accumulate(&mut self, x: &[f32]) -> Result<()> {
        if !x.len().is_multiple_of(self.dim) {
            return Err(Error::binding(
                Status::BadShape,
                format!(
                    "masa::compress::Calibration::accumulate: x has {} elements, not a multiple of dim {}",
                    x.len(),
                    self.dim
                ),
            ));
        }
        // SAFETY: x holds n_rows * dim floats.
        check(unsafe { sys::masa_calib_accumulate(self.raw.as_ptr(), x.as_ptr(), x.len() / self.dim) })
    }

    /// `self += other` (matrices and row counts).
    pub fn merge(&mut self, other: &Calibration<'_>) -> Result<()> {
        // SAFETY: two live handles; they differ (&mut self and &other
        // cannot alias).
        check(unsafe { sys::masa_calib_merge(self.raw.as_ptr(), other.raw.as_ptr()) })
    }

    /// Features per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows accumulated so far.
    pub fn n_rows(&self) -> u64 {
        let mut n = 0u64;
        // SAFETY: live handle; dim may be NULL.
        let st = unsafe { sys::masa_calib_shape(self.raw.as_ptr(), ptr::null_mut(), &mut n) };
        debug_assert_eq!(st, sys::MASA_OK);
        n
    }

    /// The accumulated matrix (`dim x dim`, row-major, symmetric).
    pub fn matrix(&self) -> &[f64] {
        // SAFETY: masa_calib_data returns dim^2 doubles owned by the handle,
        // valid until the next accumulate/merge (which need &mut self) or
        // the drop.
        unsafe { core::slice::from_raw_parts(sys::masa_calib_data(self.raw.as_ptr()), self.dim * self.dim) }
    }

    /// The raw handle.
    pub fn as_ptr(&self) -> *mut sys::masa_calib {
        self.raw.as_ptr()
    }
}

impl Drop for Calibration<'_> {
    fn drop(&mut self) {
        // SAFETY: owned handle, destroyed once.
        unsafe { sys::masa_calib_destroy(self.raw.as_ptr()) }
    }
}

impl core::fmt::Debug for Calibration<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Calibration").field("dim", &self.dim).field("n_rows", &self.n_rows()).finish()
    }
}

/// Low-rank factors of a residual (`masa_residual_result` plus `A`, `B`).
#[derive(Debug, Clone, PartialEq)]
pub struct Residual {
    /// `d_in x rank`, row-major.
    pub a: Vec<f32>,
    /// `rank x d_out`, row-major.
    pub b: Vec<f32>,
    /// `||R^T E||_F^2` (plain `||E||_F^2` without calibration).
    pub error_before: f64,
    /// `||R^T (E - A B)||_F^2` with the returned float factors.
    pub error_after: f64,
    /// Sum of the dropped squared singular values.
    pub dropped: f64,
    /// Added to C's diagonal before the Cholesky (0 when none was needed).
    pub jitter: f64,
}

/// Rank-`rank` factors of `E = w - w_hat` (or `w`) minimising
/// `||X (E - A B)||_F` with `C = X^T X` (`calib`, `d_in x d_in`; `None`:
/// plain truncated SVD) (`masa_residual_lowrank`).
pub fn residual_lowrank(
    ctx: &Context,
    d_in: usize,
    d_out: usize,
    w: &[f32],
    w_hat: Option<&[f32]>,
    calib: Option<&[f64]>,
    rank: usize,
) -> Result<Residual> {
    let func = "masa::compress::residual_lowrank";
    let n = product(&[d_in, d_out], func)?;
    let shape = format!("d_in {d_in} x d_out {d_out}");
    expect_len(func, "w", w.len(), n, &shape)?;
    if let Some(h) = w_hat {
        expect_len(func, "w_hat", h.len(), n, &shape)?;
    }
    if let Some(c) = calib {
        expect_len(func, "calib", c.len(), product(&[d_in, d_in], func)?, &format!("{d_in} x {d_in}"))?;
    }
    let mut a = vec![0f32; product(&[d_in, rank], func)?];
    let mut b = vec![0f32; product(&[rank, d_out], func)?];
    let mut r = sys::masa_residual_result::default();
    // SAFETY: fills at most size_of bytes of r.
    unsafe { sys::masa_residual_result_default(&mut r, core::mem::size_of::<sys::masa_residual_result>()) };
    // SAFETY: lengths checked above; output lengths are passed.
    check(unsafe {
        sys::masa_residual_lowrank(
            ctx.as_ptr(),
            d_in,
            d_out,
            w.as_ptr(),
            w_hat.map_or(ptr::null(), |h| h.as_ptr()),
            calib.map_or(ptr::null(), |c| c.as_ptr()),
            rank,
            a.as_mut_ptr(),
            a.len(),
            b.as_mut_ptr(),
            b.len(),
            &mut r,
        )
    })?;
    Ok(Residual {
        a,
        b,
        error_before: r.error_before,
        error_after: r.error_after,
        dropped: r.dropped,
        jitter: r.jitter,
    })
}
