//! Dictionaries (shared atoms) and coefficient tables.

use core::fmt;
use core::marker::PhantomData;
use core::ptr::{self, NonNull};

use masa_sys as sys;

use crate::context::{null_handle, Context};
use crate::error::{check, expect_len, product, Error, Result, Status};

/// A dictionary of `n_atoms` atoms of shape `rows x cols` (`masa_dictionary`).
///
/// Storage layout: `n_atoms * rows * cols` floats, atom `s` first, each atom
/// row-major: element `(s, i, j)` is at `s * rows * cols + i * cols + j`.
///
/// The lifetime `'a` covers the context it was created from and, for
/// [`Dictionary::wrap`], the caller's buffer: neither can be dropped, moved
/// or touched while the dictionary exists. Layers that use the dictionary
/// borrow it in turn.
pub struct Dictionary<'a> {
    raw: NonNull<sys::masa_dictionary>,
    data: NonNull<f32>,
    n_atoms: usize,
    rows: usize,
    cols: usize,
    _borrows: PhantomData<(&'a Context, &'a mut [f32])>,
}

// SAFETY (header, "Threads"): forward and backward only read a dictionary,
// and so do the `&self` methods here (shape, data, compose); everything that
// writes it (init_uniform, data_mut, destroy) takes `&mut self`. Shared
// references may therefore be used from many threads at once (Sync), and
// the object has no affinity to its creating thread (Send).
unsafe impl Send for Dictionary<'_> {}
unsafe impl Sync for Dictionary<'_> {}

impl<'a> Dictionary<'a> {
    /// A dictionary whose storage libmasa owns, zero-initialised.
    pub fn new(ctx: &'a Context, n_atoms: usize, rows: usize, cols: usize) -> Result<Self> {
        let mut out = ptr::null_mut();
        // SAFETY: valid context and out pointer.
        check(unsafe { sys::masa_dictionary_create(ctx.as_ptr(), n_atoms, rows, cols, &mut out) })?;
        // SAFETY: a handle just created by masa_dictionary_create.
        unsafe { Self::from_created(out, "masa_dictionary_create") }
    }

    /// A dictionary over caller memory (zero-copy): `atoms` must hold
    /// exactly `n_atoms * rows * cols` floats, in the layout above. The
    /// buffer stays mutably borrowed for the dictionary's lifetime; read or
    /// change it through [`data`](Self::data) / [`data_mut`](Self::data_mut).
    pub fn wrap(
        ctx: &'a Context,
        atoms: &'a mut [f32],
        n_atoms: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let func = "masa::Dictionary::wrap";
        let need = product(&[n_atoms, rows, cols], func)?;
        expect_len(
            func,
            "atoms",
            atoms.len(),
            need,
            &format!("n_atoms {n_atoms} x rows {rows} x cols {cols}"),
        )?;
        let mut out = ptr::null_mut();
        // SAFETY: `atoms` holds the required floats and stays borrowed
        // (through 'a) until the dictionary is destroyed.
        check(unsafe {
            sys::masa_dictionary_wrap(ctx.as_ptr(), n_atoms, rows, cols, atoms.as_mut_ptr(), &mut out)
        })?;
        // SAFETY: a handle just created by masa_dictionary_wrap.
        unsafe { Self::from_created(out, "masa_dictionary_wrap") }
    }

    /// # Safety
    /// `out` must be NULL or a dictionary handle that nothing else owns.
    pub(crate) unsafe fn from_created(out: *mut sys::masa_dictionary, func: &str) -> Result<Self> {
        let raw = NonNull::new(out).ok_or_else(|| null_handle(func))?;
        // Take ownership first so the handle is destroyed on every error path.
        let mut dict = Dictionary {
            raw,
            data: NonNull::dangling(),
            n_atoms: 0,
            rows: 0,
            cols: 0,
            _borrows: PhantomData,
        };
        let (mut n, mut r, mut c) = (0, 0, 0);
        check(sys::masa_dictionary_shape(raw.as_ptr(), &mut n, &mut r, &mut c))?;
        product(&[n, r, c], func)?;
        dict.data = NonNull::new(sys::masa_dictionary_data(raw.as_ptr())).ok_or_else(|| {
            Error::binding(Status::Internal, format!("{func}: masa_dictionary_data returned NULL"))
        })?;
        dict.n_atoms = n;
        dict.rows = r;
        dict.cols = c;
        Ok(dict)
    }

    /// Number of atoms `S`.
    pub fn n_atoms(&self) -> usize {
        self.n_atoms
    }

    /// Rows of each atom (`d_in` of the projection).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of each atom (`d_out` of the projection).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `(n_atoms, rows, cols)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.n_atoms, self.rows, self.cols)
    }

    /// Number of floats of the storage, `n_atoms * rows * cols`.
    pub fn len(&self) -> usize {
        self.n_atoms * self.rows * self.cols
    }

    /// Always false (libmasa rejects zero sizes); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All atoms (owned or wrapped), in the layout above.
    pub fn data(&self) -> &[f32] {
        // SAFETY: `data` points to len() floats that live as long as the
        // dictionary; writers need `&mut self`.
        unsafe { core::slice::from_raw_parts(self.data.as_ptr(), self.len()) }
    }

    /// All atoms, writable (e.g. for an optimizer step). Not available while
    /// a [`Layer`](crate::Layer) borrows the dictionary.
    pub fn data_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in data(), and `&mut self` makes the access exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.data.as_ptr(), self.len()) }
    }

    /// Atom `s` (`rows * cols` floats, row-major), or `None` if `s` is out of
    /// range.
    pub fn atom(&self, s: usize) -> Option<&[f32]> {
        let n = self.rows * self.cols;
        (s < self.n_atoms).then(|| &self.data()[s * n..(s + 1) * n])
    }

    /// Fills every atom with independent uniform values in `[-bound, bound]`
    /// from a seeded generator (same seed, same atoms on every platform).
    /// `bound = 0` selects `1/sqrt(rows)`. `bound` must be finite and >= 0.
    pub fn init_uniform(&mut self, bound: f32, seed: u64) -> Result<()> {
        // SAFETY: valid handle, exclusive access.
        check(unsafe { sys::masa_dictionary_init_uniform(self.raw.as_ptr(), bound, seed) })
    }

    /// Writes `W_l = sum_s coef[layer, s] * D_s` into `w` (`rows * cols`
    /// floats, row-major). The table's `n_atoms` must equal the dictionary's.
    pub fn compose(&self, coef: &Coefficients<'_>, layer: usize, w: &mut [f32]) -> Result<()> {
        // SAFETY: valid handles; libmasa checks w_len itself.
        check(unsafe { sys::masa_compose(self.raw.as_ptr(), coef.as_ptr(), layer, w.as_mut_ptr(), w.len()) })
    }

    /// The raw handle, for calls to `masa-sys`. It stays owned by `self`.
    pub fn as_ptr(&self) -> *mut sys::masa_dictionary {
        self.raw.as_ptr()
    }
}

impl Drop for Dictionary<'_> {
    fn drop(&mut self) {
        // SAFETY: layers using the dictionary borrow it, so none is left.
        unsafe { sys::masa_dictionary_destroy(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Dictionary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dictionary")
            .field("n_atoms", &self.n_atoms)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// An `n_layers x n_atoms` table of coefficients (`masa_coefficients`),
/// row-major: `c[l, s]` is at `l * n_atoms + s`.
///
/// Lifetimes as for [`Dictionary`].
pub struct Coefficients<'a> {
    raw: NonNull<sys::masa_coefficients>,
    data: NonNull<f32>,
    n_layers: usize,
    n_atoms: usize,
    _borrows: PhantomData<(&'a Context, &'a mut [f32])>,
}

// SAFETY: as for Dictionary: forward/backward and the `&self` methods only
// read the table; every writer takes `&mut self`.
unsafe impl Send for Coefficients<'_> {}
unsafe impl Sync for Coefficients<'_> {}

impl<'a> Coefficients<'a> {
    /// A table libmasa owns, zero-initialised.
    pub fn new(ctx: &'a Context, n_layers: usize, n_atoms: usize) -> Result<Self> {
        let mut out = ptr::null_mut();
        // SAFETY: valid context and out pointer.
        check(unsafe { sys::masa_coefficients_create(ctx.as_ptr(), n_layers, n_atoms, &mut out) })?;
        // SAFETY: a handle just created.
        unsafe { Self::from_created(out, "masa_coefficients_create") }
    }

    /// A table over caller memory (zero-copy): `data` must hold exactly
    /// `n_layers * n_atoms` floats and stays mutably borrowed for the table's
    /// lifetime.
    pub fn wrap(ctx: &'a Context, data: &'a mut [f32], n_layers: usize, n_atoms: usize) -> Result<Self> {
        let func = "masa::Coefficients::wrap";
        let need = product(&[n_layers, n_atoms], func)?;
        expect_len(func, "data", data.len(), need, &format!("n_layers {n_layers} x n_atoms {n_atoms}"))?;
        let mut out = ptr::null_mut();
        // SAFETY: `data` holds the required floats and stays borrowed.
        check(unsafe {
            sys::masa_coefficients_wrap(ctx.as_ptr(), n_layers, n_atoms, data.as_mut_ptr(), &mut out)
        })?;
        // SAFETY: a handle just created.
        unsafe { Self::from_created(out, "masa_coefficients_wrap") }
    }

    /// # Safety
    /// `out` must be NULL or a coefficient-table handle nothing else owns.
    pub(crate) unsafe fn from_created(out: *mut sys::masa_coefficients, func: &str) -> Result<Self> {
        let raw = NonNull::new(out).ok_or_else(|| null_handle(func))?;
        let mut coef =
            Coefficients { raw, data: NonNull::dangling(), n_layers: 0, n_atoms: 0, _borrows: PhantomData };
        let (mut l, mut s) = (0, 0);
        check(sys::masa_coefficients_shape(raw.as_ptr(), &mut l, &mut s))?;
        product(&[l, s], func)?;
        coef.data = NonNull::new(sys::masa_coefficients_data(raw.as_ptr())).ok_or_else(|| {
            Error::binding(Status::Internal, format!("{func}: masa_coefficients_data returned NULL"))
        })?;
        coef.n_layers = l;
        coef.n_atoms = s;
        Ok(coef)
    }

    /// Number of layers `L` (rows).
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// Number of atoms `S` (columns).
    pub fn n_atoms(&self) -> usize {
        self.n_atoms
    }

    /// `(n_layers, n_atoms)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n_layers, self.n_atoms)
    }

    /// Number of floats, `n_layers * n_atoms`.
    pub fn len(&self) -> usize {
        self.n_layers * self.n_atoms
    }

    /// Always false (libmasa rejects zero sizes).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole table, row-major.
    pub fn data(&self) -> &[f32] {
        // SAFETY: len() floats owned by the table or borrowed for 'a.
        unsafe { core::slice::from_raw_parts(self.data.as_ptr(), self.len()) }
    }

    /// The whole table, writable. Not available while a layer borrows it.
    pub fn data_mut(&mut self) -> &mut [f32] {
        // SAFETY: as data(), exclusive through `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(self.data.as_ptr(), self.len()) }
    }

    /// Row `l` (the `n_atoms` coefficients of layer `l`), or `None`.
    pub fn row(&self, l: usize) -> Option<&[f32]> {
        let s = self.n_atoms;
        (l < self.n_layers).then(|| &self.data()[l * s..(l + 1) * s])
    }

    /// `c[l, s] = 1 if s == l mod S else 0` ("repeat-all-over" sharing).
    pub fn init_cyclic(&mut self) -> Result<()> {
        // SAFETY: valid handle, exclusive access.
        check(unsafe { sys::masa_coefficients_init_cyclic(self.raw.as_ptr()) })
    }

    /// `c[l, s] = 1 if s == floor(l * S / L) else 0` ("sequential" sharing).
    pub fn init_blocks(&mut self) -> Result<()> {
        // SAFETY: valid handle, exclusive access.
        check(unsafe { sys::masa_coefficients_init_blocks(self.raw.as_ptr()) })
    }

    /// Adds independent uniform noise in `[-bound, bound]` from a seeded
    /// generator to every coefficient. `bound` must be finite and >= 0.
    pub fn add_uniform(&mut self, bound: f32, seed: u64) -> Result<()> {
        // SAFETY: valid handle, exclusive access.
        check(unsafe { sys::masa_coefficients_add_uniform(self.raw.as_ptr(), bound, seed) })
    }

    /// The raw handle, for calls to `masa-sys`. It stays owned by `self`.
    pub fn as_ptr(&self) -> *mut sys::masa_coefficients {
        self.raw.as_ptr()
    }
}

impl Drop for Coefficients<'_> {
    fn drop(&mut self) {
        // SAFETY: layers using the table borrow it, so none is left.
        unsafe { sys::masa_coefficients_destroy(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Coefficients<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coefficients")
            .field("n_layers", &self.n_layers)
            .field("n_atoms", &self.n_atoms)
            .finish()
    }
}
