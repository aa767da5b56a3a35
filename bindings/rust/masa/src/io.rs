//! safetensors files and compressed models (`include/masa/io.h`, the
//! reference documentation).
//!
//! [`SafetensorsFile`] maps a file and checks every header rule before any
//! data is handed out; [`SafetensorsWriter`] writes atomically (temporary
//! file, fsync, rename) in the layout of the Python `safetensors` package.
//! [`ModelWriter`] and [`Model`] write and read a compressed model's
//! attention (dictionaries, coefficient tables, low-rank factors, dense
//! weights, calibration statistics) in io.h's naming scheme.
//!
//! ```
//! use masa::io::{Dtype, SafetensorsFile, SafetensorsWriter};
//! let ctx = masa::Context::with_threads(1)?;
//! let path = std::env::temp_dir().join(format!("masa-doc-{}.safetensors", std::process::id()));
//! let mut w = SafetensorsWriter::create(&ctx, &path)?;
//! w.add_f32("w", &[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])?;
//! w.set_metadata("format", "np")?;
//! w.finish()?;
//! let f = SafetensorsFile::open(&ctx, &path)?;
//! let t = f.get("w")?;
//! assert_eq!((t.dtype, t.shape), (Dtype::F32, &[2usize, 3][..]));
//! assert_eq!(f.read_f32(f.find("w")?)?[5], 5.0);
//! # std::fs::remove_file(&path).unwrap();
//! # Ok::<(), masa::Error>(())
//! ```

use core::ffi::{c_char, c_void, CStr};
use core::marker::PhantomData;
use core::ptr::{self, NonNull};
use std::ffi::CString;
use std::path::Path;

use masa_sys as sys;

use crate::compress::Calibration;
use crate::context::Context;
use crate::error::{check, product, Error, Result, Status};
use crate::layer::Projection;
use crate::params::{Coefficients, Dictionary};

/// Element types of safetensors (`masa_dtype`).
#[allow(missing_docs)]
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F64,
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F8E5M2,
    F8E4M3,
}

const DTYPES: [Dtype; 15] = [
    Dtype::F32,
    Dtype::F16,
    Dtype::BF16,
    Dtype::F64,
    Dtype::Bool,
    Dtype::U8,
    Dtype::I8,
    Dtype::I16,
    Dtype::U16,
    Dtype::I32,
    Dtype::U32,
    Dtype::I64,
    Dtype::U64,
    Dtype::F8E5M2,
    Dtype::F8E4M3,
];

impl Dtype {
    /// The raw `masa_dtype` (the enum's order is io.h's).
    pub fn raw(self) -> sys::masa_dtype {
        DTYPES.iter().position(|&d| d == self).unwrap_or(0) as sys::masa_dtype
    }

    fn from_raw(raw: sys::masa_dtype) -> Dtype {
        DTYPES[raw as usize]
    }

    /// The format's name ("F32", "BF16", ...).
    pub fn name(self) -> &'static str {
        // SAFETY: every Dtype is a valid masa_dtype; the name is static.
        unsafe { CStr::from_ptr(sys::masa_dtype_name(self.raw())) }.to_str().unwrap_or("?")
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        // SAFETY: pure function of its argument.
        unsafe { sys::masa_dtype_size(self.raw()) }
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s)
        .map_err(|_| Error::binding(Status::InvalidArgument, format!("{what} \"{s}\" contains a NUL byte")))
}

fn cpath(path: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::binding(Status::InvalidArgument, format!("path {} contains a NUL byte", path.display()))
    })
}

/// # Safety
/// `p` is NULL or a NUL-terminated string that outlives `'a`.
unsafe fn text<'a>(p: *const c_char) -> &'a str {
    if p.is_null() {
        ""
    } else {
        // The library only hands out UTF-8 (JSON strings).
        CStr::from_ptr(p).to_str().unwrap_or("")
    }
}

/// One tensor of a [`SafetensorsFile`]: borrowed from the file's mapping.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'f> {
    /// The tensor's name.
    pub name: &'f str,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape (empty for a scalar).
    pub shape: &'f [usize],
    /// Its bytes: little-endian, row-major, aligned only as the file is.
    pub data: &'f [u8],
}

/// A safetensors file opened (mapped read-only, checked) by libmasa.
pub struct SafetensorsFile<'c> {
    raw: NonNull<sys::masa_safetensors>,
    _ctx: PhantomData<&'c Context>,
}

// SAFETY: the handle's read functions only read it (io.h: read_f32 is
// thread-safe with other readers); nothing here mutates it through &self.
unsafe impl Send for SafetensorsFile<'_> {}
unsafe impl Sync for SafetensorsFile<'_> {}

impl<'c> SafetensorsFile<'c> {
    /// Opens and checks the file (`masa_safetensors_open`).
    pub fn open(ctx: &'c Context, path: impl AsRef<Path>) -> Result<Self> {
        let path = cpath(path.as_ref())?;
        let mut raw = ptr::null_mut();
        // SAFETY: valid context and NUL-terminated path; raw is an out pointer.
        check(unsafe { sys::masa_safetensors_open(ctx.as_ptr(), path.as_ptr(), &mut raw) })?;
        Ok(SafetensorsFile { raw: NonNull::new(raw).expect("open succeeded"), _ctx: PhantomData })
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        // SAFETY: valid handle.
        unsafe { sys::masa_safetensors_tensor_count(self.raw.as_ptr()) }
    }

    /// Whether the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index of the tensor called `name` ([`Status::NotFound`] otherwise).
    pub fn find(&self, name: &str) -> Result<usize> {
        let c = cstring("tensor name", name)?;
        let mut index = 0;
        // SAFETY: valid handle, string and out pointer.
        check(unsafe { sys::masa_safetensors_find(self.raw.as_ptr(), c.as_ptr(), &mut index) })?;
        Ok(index)
    }

    /// Tensor `index` (file order).
    pub fn tensor(&self, index: usize) -> Result<TensorView<'_>> {
        let (mut name, mut dtype, mut ndim) = (ptr::null(), 0, 0);
        let (mut shape, mut data, mut bytes) = (ptr::null(), ptr::null(), 0);
        // SAFETY: valid handle; every output is a valid out pointer.
        check(unsafe {
            sys::masa_safetensors_tensor(
                self.raw.as_ptr(),
                index,
                &mut name,
                &mut dtype,
                &mut ndim,
                &mut shape,
                &mut data,
                &mut bytes,
            )
        })?;
        // SAFETY: the name, shape and data live in the handle (and its
        // mapping) until it is closed, i.e. as long as &self.
        unsafe {
            Ok(TensorView {
                name: text(name),
                dtype: Dtype::from_raw(dtype),
                shape: core::slice::from_raw_parts(shape, ndim),
                data: if bytes == 0 { &[] } else { core::slice::from_raw_parts(data as *const u8, bytes) },
            })
        }
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        self.tensor(self.find(name)?)
    }

    /// Names in file order.
    pub fn names(&self) -> Result<Vec<&str>> {
        (0..self.len()).map(|i| self.tensor(i).map(|t| t.name)).collect()
    }

    /// Tensor `index` as float32 (F32, F16, BF16, F64 converted).
    pub fn read_f32(&self, index: usize) -> Result<Vec<f32>> {
        let t = self.tensor(index)?;
        let n = product(t.shape, "tensor")?;
        let mut out = vec![0.0f32; n];
        // SAFETY: valid handle; out holds exactly the tensor's element count.
        check(unsafe { sys::masa_safetensors_read_f32(self.raw.as_ptr(), index, out.as_mut_ptr(), n) })?;
        Ok(out)
    }

    /// The `__metadata__` entries in header order.
    pub fn metadata(&self) -> Result<Vec<(String, String)>> {
        // SAFETY: valid handle.
        let n = unsafe { sys::masa_safetensors_metadata_count(self.raw.as_ptr()) };
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (mut k, mut v) = (ptr::null(), ptr::null());
            // SAFETY: valid handle and out pointers; strings copied at once.
            unsafe {
                check(sys::masa_safetensors_metadata_entry(self.raw.as_ptr(), i, &mut k, &mut v))?;
                out.push((text(k).to_owned(), text(v).to_owned()));
            }
        }
        Ok(out)
    }

    /// The value of metadata `key` ([`Status::NotFound`] otherwise).
    pub fn metadata_get(&self, key: &str) -> Result<&str> {
        let c = cstring("metadata key", key)?;
        let mut v = ptr::null();
        // SAFETY: valid handle, string, out pointer; the value lives as long
        // as the handle.
        unsafe {
            check(sys::masa_safetensors_metadata_get(self.raw.as_ptr(), c.as_ptr(), &mut v))?;
            Ok(text(v))
        }
    }
}

impl Drop for SafetensorsFile<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is owned and closed once.
        unsafe { sys::masa_safetensors_close(self.raw.as_ptr()) }
    }
}

/// Writes a safetensors file atomically (`masa_safetensors_writer_*`):
/// nothing appears at the path before [`finish`](Self::finish) succeeds.
pub struct SafetensorsWriter<'c> {
    raw: NonNull<sys::masa_safetensors_writer>,
    _ctx: PhantomData<&'c Context>,
}

impl<'c> SafetensorsWriter<'c> {
    /// Starts writing `path`.
    pub fn create(ctx: &'c Context, path: impl AsRef<Path>) -> Result<Self> {
        let path = cpath(path.as_ref())?;
        let mut raw = ptr::null_mut();
        // SAFETY: valid context, path and out pointer.
        check(unsafe { sys::masa_safetensors_writer_create(ctx.as_ptr(), path.as_ptr(), &mut raw) })?;
        Ok(SafetensorsWriter { raw: NonNull::new(raw).expect("create succeeded"), _ctx: PhantomData })
    }

    /// Adds a tensor of `dtype` and `shape` from its little-endian bytes
    /// (copied to the writer's spool now).
    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<()> {
        let c = cstring("tensor name", name)?;
        // SAFETY: valid handle; shape and data are read for their lengths.
        check(unsafe {
            sys::masa_safetensors_writer_add(
                self.raw.as_ptr(),
                c.as_ptr(),
                dtype.raw(),
                shape.len(),
                shape.as_ptr(),
                data.as_ptr() as *const c_void,
                data.len(),
            )
        })
    }

    /// Adds a float32 tensor.
    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        // SAFETY: any f32 slice is a valid byte slice of 4x its length.
        let bytes = unsafe { core::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 4) };
        self.add(name, Dtype::F32, shape, bytes)
    }

    /// Sets a `__metadata__` entry.
    pub fn set_metadata(&mut self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstring("metadata key", key)?, cstring("metadata value", value)?);
        // SAFETY: valid handle and strings.
        check(unsafe { sys::masa_safetensors_writer_set_metadata(self.raw.as_ptr(), k.as_ptr(), v.as_ptr()) })
    }

    /// Writes the file (temporary file, fsync, rename, fsync of the directory).
    pub fn finish(self) -> Result<()> {
        // SAFETY: valid handle; dropped (destroyed) right after.
        check(unsafe { sys::masa_safetensors_writer_finish(self.raw.as_ptr()) })
    }
}

impl Drop for SafetensorsWriter<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is owned and destroyed once.
        unsafe { sys::masa_safetensors_writer_destroy(self.raw.as_ptr()) }
    }
}

/// Writes a compressed model (`masa_model_writer_*`), atomically.
pub struct ModelWriter<'c> {
    raw: NonNull<sys::masa_model_writer>,
    _ctx: PhantomData<&'c Context>,
}

impl<'c> ModelWriter<'c> {
    /// Starts a model of `n_layers` layers at `path`.
    pub fn create(ctx: &'c Context, path: impl AsRef<Path>, n_layers: usize) -> Result<Self> {
        let path = cpath(path.as_ref())?;
        let mut raw = ptr::null_mut();
        // SAFETY: valid context, path and out pointer.
        check(unsafe { sys::masa_model_writer_create(ctx.as_ptr(), path.as_ptr(), n_layers, &mut raw) })?;
        Ok(ModelWriter { raw: NonNull::new(raw).expect("create succeeded"), _ctx: PhantomData })
    }

    /// Adds the group starting at `first_layer` (its size is the table's
    /// row count) of a "masa" projection; groups go in layer order.
    pub fn add_group(
        &mut self,
        which: Projection,
        first_layer: usize,
        dict: &Dictionary<'_>,
        coef: &Coefficients<'_>,
    ) -> Result<()> {
        // SAFETY: valid handles; the writer copies their data now.
        check(unsafe {
            sys::masa_model_writer_add_group(
                self.raw.as_ptr(),
                which.raw(),
                first_layer,
                dict.as_ptr(),
                coef.as_ptr(),
            )
        })
    }

    /// Adds layer `layer`'s dense weight (`d_in x d_out`).
    pub fn add_dense(
        &mut self,
        which: Projection,
        layer: usize,
        d_in: usize,
        d_out: usize,
        w: &[f32],
    ) -> Result<()> {
        crate::error::expect_len(
            "add_dense",
            "weight",
            w.len(),
            product(&[d_in, d_out], "weight")?,
            "d_in x d_out",
        )?;
        // SAFETY: valid handle; w has d_in * d_out floats.
        check(unsafe {
            sys::masa_model_writer_add_dense(self.raw.as_ptr(), which.raw(), layer, d_in, d_out, w.as_ptr())
        })
    }

    /// Adds layer `layer`'s low-rank term: `a` is `d_in x rank`, `b` is
    /// `rank x d_out`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_lowrank(
        &mut self,
        which: Projection,
        layer: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        a: &[f32],
        b: &[f32],
    ) -> Result<()> {
        crate::error::expect_len("add_lowrank", "a", a.len(), product(&[d_in, rank], "a")?, "d_in x rank")?;
        crate::error::expect_len("add_lowrank", "b", b.len(), product(&[rank, d_out], "b")?, "rank x d_out")?;
        // SAFETY: valid handle; a and b have the sizes checked above.
        check(unsafe {
            sys::masa_model_writer_add_lowrank(
                self.raw.as_ptr(),
                which.raw(),
                layer,
                d_in,
                d_out,
                rank,
                a.as_ptr(),
                b.as_ptr(),
            )
        })
    }

    /// Adds calibration statistics under `name`.
    pub fn add_calib(&mut self, name: &str, calib: &Calibration<'_>) -> Result<()> {
        let c = cstring("calibration name", name)?;
        // SAFETY: valid handles and string; the writer copies the data now.
        check(unsafe { sys::masa_model_writer_add_calib(self.raw.as_ptr(), c.as_ptr(), calib.as_ptr()) })
    }

    /// Sets a metadata entry of the caller's own (keys beginning with
    /// "masa." are reserved).
    pub fn set_metadata(&mut self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstring("metadata key", key)?, cstring("metadata value", value)?);
        // SAFETY: valid handle and strings.
        check(unsafe { sys::masa_model_writer_set_metadata(self.raw.as_ptr(), k.as_ptr(), v.as_ptr()) })
    }

    /// Checks completeness and writes the file.
    pub fn finish(self) -> Result<()> {
        // SAFETY: valid handle; destroyed on drop right after.
        check(unsafe { sys::masa_model_writer_finish(self.raw.as_ptr()) })
    }
}

impl Drop for ModelWriter<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is owned and destroyed once.
        unsafe { sys::masa_model_writer_destroy(self.raw.as_ptr()) }
    }
}

/// The kind of a projection in a compressed model.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Absent,
    Masa,
    Dense,
    LowRank,
}

/// What a compressed model holds for one projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionInfo {
    /// Its kind.
    pub kind: ModelKind,
    /// Weight shape `d_in x d_out` (0 when absent).
    pub d_in: usize,
    /// See `d_in`.
    pub d_out: usize,
    /// `(first layer, layers, atoms)` of each group ("masa" only).
    pub groups: Vec<(usize, usize, usize)>,
}

/// A layer's low-rank term in a [`Model`]: `(rank, a, b)`, `a` being
/// `d_in x rank` and `b` `rank x d_out` (row-major).
pub type LowRank<'m> = (usize, &'m [f32], &'m [f32]);

/// A compressed model opened by libmasa (`masa_model_open`), its tensors
/// read from the file's mapping.
pub struct Model<'c> {
    raw: NonNull<sys::masa_model>,
    ctx: &'c Context,
}

// SAFETY: every method takes &self and only reads the model.
unsafe impl Send for Model<'_> {}
unsafe impl Sync for Model<'_> {}

impl<'c> Model<'c> {
    /// Opens and checks a compressed-model file.
    pub fn open(ctx: &'c Context, path: impl AsRef<Path>) -> Result<Self> {
        let path = cpath(path.as_ref())?;
        let mut raw = ptr::null_mut();
        // SAFETY: valid context, path and out pointer.
        check(unsafe { sys::masa_model_open(ctx.as_ptr(), path.as_ptr(), &mut raw) })?;
        Ok(Model { raw: NonNull::new(raw).expect("open succeeded"), ctx })
    }

    pub(crate) fn as_ptr(&self) -> *const sys::masa_model {
        self.raw.as_ptr()
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        let mut n = 0;
        // SAFETY: valid handle and out pointer; cannot fail then.
        unsafe { sys::masa_model_layers(self.raw.as_ptr(), &mut n) };
        n
    }

    /// Kind, shape and groups of projection `which`.
    pub fn projection(&self, which: Projection) -> ProjectionInfo {
        let (mut kind, mut d_in, mut d_out, mut n_groups) = (0, 0, 0, 0);
        // SAFETY: valid handle, projection and out pointers.
        unsafe {
            sys::masa_model_projection(
                self.raw.as_ptr(),
                which.raw(),
                &mut kind,
                &mut d_in,
                &mut d_out,
                &mut n_groups,
            )
        };
        let groups = (0..n_groups)
            .map(|g| {
                let (first, count, atoms, _) = self.group_raw(which, g);
                (first, count, atoms)
            })
            .collect();
        let kind = match kind {
            sys::MASA_MODEL_MASA => ModelKind::Masa,
            sys::MASA_MODEL_DENSE => ModelKind::Dense,
            sys::MASA_MODEL_LOWRANK => ModelKind::LowRank,
            _ => ModelKind::Absent,
        };
        ProjectionInfo { kind, d_in, d_out, groups }
    }

    fn group_raw(&self, which: Projection, g: usize) -> (usize, usize, usize, (*mut f32, *mut f32)) {
        let (mut first, mut count) = (0, 0);
        let (mut dict, mut coef) = (ptr::null_mut(), ptr::null_mut());
        let (mut s, mut rows, mut cols) = (0, 0, 0);
        // SAFETY: g < n_groups (callers); the handles belong to the model.
        unsafe {
            sys::masa_model_group(
                self.raw.as_ptr(),
                which.raw(),
                g,
                &mut first,
                &mut count,
                &mut dict,
                &mut coef,
            );
            sys::masa_dictionary_shape(dict, &mut s, &mut rows, &mut cols);
            (first, count, s, (sys::masa_dictionary_data(dict), sys::masa_coefficients_data(coef)))
        }
    }

    /// Group `g` of a "masa" projection: `(first layer, atoms, coefficients)`
    /// with atoms `S x d_in x d_out` and coefficients `layers x S`.
    pub fn group(&self, which: Projection, g: usize) -> Result<(usize, &[f32], &[f32])> {
        let info = self.projection(which);
        if g >= info.groups.len() {
            return Err(Error::binding(
                Status::OutOfRange,
                format!("group {g}: projection {which} has {}", info.groups.len()),
            ));
        }
        let (first, count, s, (atoms, coefs)) = self.group_raw(which, g);
        // SAFETY: the model's memory, S * d_in * d_out and count * S floats,
        // lives as long as the model.
        unsafe {
            Ok((
                first,
                core::slice::from_raw_parts(atoms, s * info.d_in * info.d_out),
                core::slice::from_raw_parts(coefs, count * s),
            ))
        }
    }

    /// Layer `layer`'s low-rank term `(rank, a, b)`, or None.
    pub fn lowrank(&self, which: Projection, layer: usize) -> Result<Option<LowRank<'_>>> {
        let info = self.projection(which);
        let (mut r, mut a, mut b) = (0, ptr::null_mut(), ptr::null_mut());
        // SAFETY: valid handle and out pointers.
        check(unsafe {
            sys::masa_model_lowrank(self.raw.as_ptr(), which.raw(), layer, &mut r, &mut a, &mut b)
        })?;
        if r == 0 {
            return Ok(None);
        }
        // SAFETY: the model's memory (d_in x r, r x d_out) lives as long as it.
        unsafe {
            Ok(Some((
                r,
                core::slice::from_raw_parts(a, info.d_in * r),
                core::slice::from_raw_parts(b, r * info.d_out),
            )))
        }
    }

    /// Layer `layer`'s dense weight of a "dense" projection.
    pub fn dense(&self, which: Projection, layer: usize) -> Result<&[f32]> {
        let info = self.projection(which);
        let mut w = ptr::null_mut();
        // SAFETY: valid handle and out pointer.
        check(unsafe { sys::masa_model_dense(self.raw.as_ptr(), which.raw(), layer, &mut w) })?;
        // SAFETY: d_in x d_out floats of the model's memory.
        Ok(unsafe { core::slice::from_raw_parts(w, info.d_in * info.d_out) })
    }

    /// Names of the calibration entries.
    pub fn calibration_names(&self) -> Vec<String> {
        // SAFETY: valid handle.
        let n = unsafe { sys::masa_model_calib_count(self.raw.as_ptr()) };
        (0..n)
            .map(|i| {
                let mut name = ptr::null();
                // SAFETY: i < n; the string is copied at once.
                unsafe {
                    sys::masa_model_calib_name(self.raw.as_ptr(), i, &mut name);
                    text(name).to_owned()
                }
            })
            .collect()
    }

    /// A copy of calibration entry `name`.
    pub fn calibration(&self, name: &str) -> Result<Calibration<'c>> {
        let c = cstring("calibration name", name)?;
        let mut raw = ptr::null_mut();
        // SAFETY: valid handle, string and out pointer.
        check(unsafe { sys::masa_model_calib(self.raw.as_ptr(), c.as_ptr(), &mut raw) })?;
        // Rebuilt as a handle of the safe API (from a copy of its data).
        // SAFETY: raw is a valid calib until destroyed below.
        let result = unsafe {
            let (mut dim, mut rows) = (0, 0);
            sys::masa_calib_shape(raw, &mut dim, &mut rows);
            let data = core::slice::from_raw_parts(sys::masa_calib_data(raw), dim * dim);
            Calibration::from_data(self.ctx, dim, data, rows)
        };
        // SAFETY: created above, destroyed once.
        unsafe { sys::masa_calib_destroy(raw) };
        result
    }
}

impl Drop for Model<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle is owned and closed once.
        unsafe { sys::masa_model_close(self.raw.as_ptr()) }
    }
}
