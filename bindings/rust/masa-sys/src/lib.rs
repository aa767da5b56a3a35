//! Raw FFI declarations for libmasa, written by hand from `include/masa/masa.h`
//! and `include/masa/compress.h` (version 0.2.0).
//!
//! Everything here mirrors the C header one to one; the header is the
//! reference documentation of every function (ownership, shapes, layouts,
//! errors, thread-safety). Use the `masa` crate for a safe interface.
//!
//! Mapping of C types:
//! - `size_t` is `usize` (identical on every platform Rust supports).
//! - C enums (`masa_status`, `masa_projection`, `masa_grad_mode`,
//!   `masa_weight_policy`) are plain
//!   `c_uint` aliases with `pub const` values, as bindgen would emit for an
//!   enum without negative values: a C function may return a value that a
//!   Rust `enum` would not know, which would be undefined behaviour.
//! - Opaque handles are zero-sized `#[repr(C)]` structs that are neither
//!   `Send`, `Sync` nor `Unpin`; only pointers to them are used.
//!
//! Linking is handled by `build.rs` (see the crate's README): `MASA_LIB_DIR`,
//! `MASA_STATIC`, `pkg-config`, the project's own build tree, then `-lmasa`.
#![cfg_attr(not(test), no_std)]
#![allow(non_camel_case_types)]

use core::ffi::{c_char, c_int, c_uint, c_void};
use core::marker::{PhantomData, PhantomPinned};

// ---------------------------------------------------------------------------
// Version
// ---------------------------------------------------------------------------

/// Major version of the header these declarations were written from.
pub const MASA_VERSION_MAJOR: c_uint = 0;
/// Minor version of the header these declarations were written from.
pub const MASA_VERSION_MINOR: c_uint = 2;
/// Patch version of the header these declarations were written from.
pub const MASA_VERSION_PATCH: c_uint = 0;
/// `MAJOR * 10000 + MINOR * 100 + PATCH`.
pub const MASA_VERSION_NUMBER: c_uint =
    MASA_VERSION_MAJOR * 10000 + MASA_VERSION_MINOR * 100 + MASA_VERSION_PATCH;
/// `"MAJOR.MINOR.PATCH"`.
pub const MASA_VERSION_STRING: &str = "0.2.0";

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// `enum masa_status`.
pub type masa_status = c_uint;
pub const MASA_OK: masa_status = 0;
pub const MASA_ERROR_NULL_ARGUMENT: masa_status = 1;
pub const MASA_ERROR_INVALID_ARGUMENT: masa_status = 2;
pub const MASA_ERROR_BAD_SHAPE: masa_status = 3;
pub const MASA_ERROR_OUT_OF_RANGE: masa_status = 4;
pub const MASA_ERROR_BUFFER_TOO_SMALL: masa_status = 5;
pub const MASA_ERROR_OVERFLOW: masa_status = 6;
pub const MASA_ERROR_OUT_OF_MEMORY: masa_status = 7;
pub const MASA_ERROR_BAD_STRUCT_SIZE: masa_status = 8;
pub const MASA_ERROR_NOT_READY: masa_status = 9;
pub const MASA_ERROR_THREAD: masa_status = 10;
pub const MASA_ERROR_INTERNAL: masa_status = 11;
pub const MASA_ERROR_IO: masa_status = 12;
pub const MASA_ERROR_BAD_FORMAT: masa_status = 13;
pub const MASA_ERROR_NOT_FOUND: masa_status = 14;

// ---------------------------------------------------------------------------
// Opaque handles
// ---------------------------------------------------------------------------

macro_rules! opaque {
    ($($(#[$m:meta])* $name:ident;)*) => {$(
        $(#[$m])*
        #[repr(C)]
        pub struct $name {
            _data: [u8; 0],
            _marker: PhantomData<(*mut u8, PhantomPinned)>,
        }
    )*};
}

opaque! {
    /// `struct masa_context` (opaque).
    masa_context;
    /// `struct masa_dictionary` (opaque).
    masa_dictionary;
    /// `struct masa_coefficients` (opaque).
    masa_coefficients;
    /// `struct masa_layer` (opaque).
    masa_layer;
    /// `struct masa_kv_cache` (opaque).
    masa_kv_cache;
    /// `struct masa_calib` (opaque; `include/masa/compress.h`).
    masa_calib;
    /// `struct masa_safetensors` (opaque; `include/masa/io.h`).
    masa_safetensors;
    /// `struct masa_safetensors_writer` (opaque; `include/masa/io.h`).
    masa_safetensors_writer;
    /// `struct masa_model` (opaque; `include/masa/io.h`).
    masa_model;
    /// `struct masa_model_writer` (opaque; `include/masa/io.h`).
    masa_model_writer;
}

// ---------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------

/// `masa_malloc_fn`: returns memory aligned for any type, or NULL.
pub type masa_malloc_fn = Option<unsafe extern "C" fn(size: usize, user: *mut c_void) -> *mut c_void>;
/// `masa_free_fn`: accepts NULL.
pub type masa_free_fn = Option<unsafe extern "C" fn(ptr: *mut c_void, user: *mut c_void)>;

/// `struct masa_context_options`; initialise with [`masa_context_options_default`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct masa_context_options {
    pub size: usize,
    pub n_threads: usize,
    pub malloc_fn: masa_malloc_fn,
    pub free_fn: masa_free_fn,
    pub alloc_user: *mut c_void,
}

// ---------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------

/// `enum masa_projection`.
pub type masa_projection = c_uint;
pub const MASA_PROJ_Q: masa_projection = 0;
pub const MASA_PROJ_K: masa_projection = 1;
pub const MASA_PROJ_V: masa_projection = 2;
pub const MASA_PROJ_O: masa_projection = 3;
pub const MASA_NUM_PROJECTIONS: usize = 4;
/// `MASA_MAX_POSITION`: the largest RoPE position a token may have.
pub const MASA_MAX_POSITION: usize = 4294967295;

/// `struct masa_layer_options`; initialise with [`masa_layer_options_default`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct masa_layer_options {
    pub size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub causal: c_int,
    pub rope: c_int,
    pub rope_theta: f32,
    pub softmax_scale: f32,
}

/// `enum masa_grad_mode`.
pub type masa_grad_mode = c_uint;
pub const MASA_GRAD_SET: masa_grad_mode = 0;
pub const MASA_GRAD_ADD: masa_grad_mode = 1;

/// `enum masa_weight_policy`.
pub type masa_weight_policy = c_uint;
pub const MASA_WEIGHTS_ON_THE_FLY: masa_weight_policy = 0;
pub const MASA_WEIGHTS_CACHED: masa_weight_policy = 1;

/// `struct masa_layer_grads`; initialise with [`masa_layer_grads_default`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct masa_layer_grads {
    pub size: usize,
    pub mode: masa_grad_mode,
    pub d_atoms: [*mut f32; MASA_NUM_PROJECTIONS],
    pub d_coefficients: [*mut f32; MASA_NUM_PROJECTIONS],
    pub d_weight: [*mut f32; MASA_NUM_PROJECTIONS],
    pub d_bias: [*mut f32; MASA_NUM_PROJECTIONS],
    /// Low-rank terms (appended; a struct of the older size is still accepted).
    pub d_lowrank_a: [*mut f32; MASA_NUM_PROJECTIONS],
    pub d_lowrank_b: [*mut f32; MASA_NUM_PROJECTIONS],
}

extern "C" {
    // Version
    pub fn masa_version_number() -> c_uint;
    pub fn masa_version_string() -> *const c_char;

    // Errors
    pub fn masa_status_string(status: masa_status) -> *const c_char;
    pub fn masa_last_error() -> *const c_char;

    // Context
    pub fn masa_context_options_default(options: *mut masa_context_options, size: usize);
    pub fn masa_context_create(
        options: *const masa_context_options,
        out: *mut *mut masa_context,
    ) -> masa_status;
    pub fn masa_context_destroy(ctx: *mut masa_context);
    pub fn masa_context_threads(ctx: *const masa_context) -> usize;
    pub fn masa_blis_arch() -> *const c_char;

    // Dictionaries
    pub fn masa_dictionary_create(
        ctx: *mut masa_context,
        n_atoms: usize,
        rows: usize,
        cols: usize,
        out: *mut *mut masa_dictionary,
    ) -> masa_status;
    pub fn masa_dictionary_wrap(
        ctx: *mut masa_context,
        n_atoms: usize,
        rows: usize,
        cols: usize,
        atoms: *mut f32,
        out: *mut *mut masa_dictionary,
    ) -> masa_status;
    pub fn masa_dictionary_destroy(dict: *mut masa_dictionary);
    pub fn masa_dictionary_shape(
        dict: *const masa_dictionary,
        n_atoms: *mut usize,
        rows: *mut usize,
        cols: *mut usize,
    ) -> masa_status;
    pub fn masa_dictionary_data(dict: *mut masa_dictionary) -> *mut f32;
    pub fn masa_dictionary_init_uniform(dict: *mut masa_dictionary, bound: f32, seed: u64) -> masa_status;
    pub fn masa_dictionary_touch(dict: *mut masa_dictionary) -> masa_status;

    // Coefficient tables
    pub fn masa_coefficients_create(
        ctx: *mut masa_context,
        n_layers: usize,
        n_atoms: usize,
        out: *mut *mut masa_coefficients,
    ) -> masa_status;
    pub fn masa_coefficients_wrap(
        ctx: *mut masa_context,
        n_layers: usize,
        n_atoms: usize,
        data: *mut f32,
        out: *mut *mut masa_coefficients,
    ) -> masa_status;
    pub fn masa_coefficients_destroy(coef: *mut masa_coefficients);
    pub fn masa_coefficients_shape(
        coef: *const masa_coefficients,
        n_layers: *mut usize,
        n_atoms: *mut usize,
    ) -> masa_status;
    pub fn masa_coefficients_data(coef: *mut masa_coefficients) -> *mut f32;
    pub fn masa_coefficients_init_cyclic(coef: *mut masa_coefficients) -> masa_status;
    pub fn masa_coefficients_init_blocks(coef: *mut masa_coefficients) -> masa_status;
    pub fn masa_coefficients_add_uniform(coef: *mut masa_coefficients, bound: f32, seed: u64) -> masa_status;
    pub fn masa_coefficients_touch(coef: *mut masa_coefficients) -> masa_status;

    // Composition
    pub fn masa_compose(
        dict: *const masa_dictionary,
        coef: *const masa_coefficients,
        layer: usize,
        w: *mut f32,
        w_len: usize,
    ) -> masa_status;

    // Layers
    pub fn masa_layer_options_default(options: *mut masa_layer_options, size: usize);
    pub fn masa_layer_create(
        ctx: *mut masa_context,
        options: *const masa_layer_options,
        out: *mut *mut masa_layer,
    ) -> masa_status;
    pub fn masa_layer_destroy(layer: *mut masa_layer);
    pub fn masa_layer_set_masa(
        layer: *mut masa_layer,
        which: masa_projection,
        dict: *mut masa_dictionary,
        coef: *mut masa_coefficients,
        layer_index: usize,
    ) -> masa_status;
    pub fn masa_layer_set_dense(
        layer: *mut masa_layer,
        which: masa_projection,
        weight: *mut f32,
    ) -> masa_status;
    pub fn masa_layer_set_bias(layer: *mut masa_layer, which: masa_projection, bias: *mut f32)
        -> masa_status;
    pub fn masa_layer_remove_bias(layer: *mut masa_layer, which: masa_projection) -> masa_status;
    pub fn masa_layer_touch(layer: *mut masa_layer) -> masa_status;
    pub fn masa_layer_set_weight_policy(layer: *mut masa_layer, policy: masa_weight_policy) -> masa_status;
    pub fn masa_layer_weight_policy(layer: *const masa_layer, policy: *mut masa_weight_policy)
        -> masa_status;
    pub fn masa_layer_refresh_weights(layer: *mut masa_layer) -> masa_status;
    pub fn masa_layer_weight(layer: *mut masa_layer, which: masa_projection) -> *mut f32;
    pub fn masa_layer_bias(layer: *mut masa_layer, which: masa_projection) -> *mut f32;
    pub fn masa_layer_projection_shape(
        layer: *const masa_layer,
        which: masa_projection,
        d_in: *mut usize,
        d_out: *mut usize,
    ) -> masa_status;
    pub fn masa_layer_workspace_size(
        layer: *const masa_layer,
        batch: usize,
        seq: usize,
        bytes: *mut usize,
    ) -> masa_status;
    pub fn masa_layer_reserve_size(
        layer: *const masa_layer,
        batch: usize,
        seq: usize,
        bytes: *mut usize,
    ) -> masa_status;
    pub fn masa_layer_forward(
        layer: *const masa_layer,
        batch: usize,
        seq: usize,
        pos_offset: usize,
        x: *const f32,
        y: *mut f32,
        workspace: *mut c_void,
        workspace_bytes: usize,
        reserve: *mut c_void,
        reserve_bytes: usize,
    ) -> masa_status;
    pub fn masa_layer_grads_default(grads: *mut masa_layer_grads, size: usize);
    pub fn masa_layer_backward(
        layer: *const masa_layer,
        batch: usize,
        seq: usize,
        pos_offset: usize,
        x: *const f32,
        dy: *const f32,
        dx: *mut f32,
        grads: *const masa_layer_grads,
        workspace: *mut c_void,
        workspace_bytes: usize,
        reserve: *const c_void,
        reserve_bytes: usize,
    ) -> masa_status;

    // Incremental decoding with a key/value cache (inference only).
    pub fn masa_kv_cache_size(
        layer: *const masa_layer,
        batch: usize,
        max_seq: usize,
        bytes: *mut usize,
    ) -> masa_status;
    pub fn masa_kv_cache_create(
        layer: *const masa_layer,
        batch: usize,
        max_seq: usize,
        memory: *mut c_void,
        memory_bytes: usize,
        out: *mut *mut masa_kv_cache,
    ) -> masa_status;
    pub fn masa_kv_cache_destroy(cache: *mut masa_kv_cache);
    pub fn masa_kv_cache_reset(cache: *mut masa_kv_cache) -> masa_status;
    pub fn masa_kv_cache_truncate(cache: *mut masa_kv_cache, length: usize) -> masa_status;
    pub fn masa_kv_cache_length(cache: *const masa_kv_cache, length: *mut usize) -> masa_status;
    pub fn masa_kv_cache_shape(
        cache: *const masa_kv_cache,
        batch: *mut usize,
        max_seq: *mut usize,
    ) -> masa_status;
    pub fn masa_layer_decode_workspace_size(
        layer: *const masa_layer,
        batch: usize,
        n_new: usize,
        bytes: *mut usize,
    ) -> masa_status;
    pub fn masa_layer_decode(
        layer: *const masa_layer,
        cache: *mut masa_kv_cache,
        batch: usize,
        n_new: usize,
        x: *const f32,
        y: *mut f32,
        workspace: *mut c_void,
        workspace_bytes: usize,
    ) -> masa_status;
}

// Low-rank terms of projections: W = base + A B (masa_layer_set_lowrank).
extern "C" {
    pub fn masa_layer_set_lowrank(
        layer: *mut masa_layer,
        which: masa_projection,
        rank: usize,
        a: *mut f32,
        b: *mut f32,
    ) -> masa_status;
    pub fn masa_layer_remove_lowrank(layer: *mut masa_layer, which: masa_projection) -> masa_status;
    pub fn masa_layer_lowrank(
        layer: *mut masa_layer,
        which: masa_projection,
        rank: *mut usize,
        a: *mut *mut f32,
        b: *mut *mut f32,
    ) -> masa_status;
}

// ---------------------------------------------------------------------------
// Compression (`include/masa/compress.h`): Matrix PCA, grouping planner,
// calibration statistics, whitened low-rank residual
// ---------------------------------------------------------------------------

/// `MASA_PCA_RANK_RTOL`: eigenvalues below this times the largest count as 0.
pub const MASA_PCA_RANK_RTOL: f64 = 1e-10;

/// `struct masa_pca_result`; set `size` with [`masa_pca_result_default`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct masa_pca_result {
    pub size: usize,
    pub rank: usize,
    pub total_energy: f64,
    pub captured_energy: f64,
    pub residual_energy: f64,
}

/// `struct masa_group_plan_result`; set `size` with
/// [`masa_group_plan_result_default`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct masa_group_plan_result {
    pub size: usize,
    pub n_groups: usize,
    pub params: usize,
    pub error: f64,
    pub total_energy: f64,
}

/// `struct masa_residual_result`; set `size` with
/// [`masa_residual_result_default`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct masa_residual_result {
    pub size: usize,
    pub error_before: f64,
    pub error_after: f64,
    pub dropped: f64,
    pub jitter: f64,
}

extern "C" {
    // Gram and Matrix PCA
    pub fn masa_gram(
        ctx: *mut masa_context,
        n_mats: usize,
        rows: usize,
        cols: usize,
        mats: *const *const f32,
        gram: *mut f64,
        gram_len: usize,
    ) -> masa_status;
    pub fn masa_gram_eigenvalues(
        ctx: *mut masa_context,
        n: usize,
        gram: *const f64,
        gram_ld: usize,
        eigenvalues: *mut f64,
    ) -> masa_status;
    pub fn masa_pca_result_default(result: *mut masa_pca_result, size: usize);
    pub fn masa_matrix_pca(
        ctx: *mut masa_context,
        n_mats: usize,
        rows: usize,
        cols: usize,
        mats: *const *const f32,
        gram: *const f64,
        gram_ld: usize,
        n_atoms: usize,
        atoms: *mut f32,
        atoms_len: usize,
        coefs: *mut f32,
        coefs_len: usize,
        eigenvalues: *mut f64,
        result: *mut masa_pca_result,
    ) -> masa_status;
    pub fn masa_matrix_pca_create(
        ctx: *mut masa_context,
        n_mats: usize,
        rows: usize,
        cols: usize,
        mats: *const *const f32,
        gram: *const f64,
        gram_ld: usize,
        n_atoms: usize,
        dict: *mut *mut masa_dictionary,
        coef: *mut *mut masa_coefficients,
        result: *mut masa_pca_result,
    ) -> masa_status;

    // Grouping
    pub fn masa_group_plan_result_default(result: *mut masa_group_plan_result, size: usize);
    pub fn masa_group_plan(
        ctx: *mut masa_context,
        n_layers: usize,
        gram: *const f64,
        rows: usize,
        cols: usize,
        budget: usize,
        group_starts: *mut usize,
        group_atoms: *mut usize,
        capacity: usize,
        result: *mut masa_group_plan_result,
    ) -> masa_status;
    pub fn masa_group_plan_fixed(
        ctx: *mut masa_context,
        n_layers: usize,
        gram: *const f64,
        rows: usize,
        cols: usize,
        budget: usize,
        n_groups: usize,
        group_starts: *const usize,
        group_atoms: *mut usize,
        result: *mut masa_group_plan_result,
    ) -> masa_status;

    // Calibration statistics
    pub fn masa_calib_create(ctx: *mut masa_context, dim: usize, out: *mut *mut masa_calib) -> masa_status;
    pub fn masa_calib_create_from_data(
        ctx: *mut masa_context,
        dim: usize,
        matrix: *const f64,
        n_rows: u64,
        out: *mut *mut masa_calib,
    ) -> masa_status;
    pub fn masa_calib_destroy(calib: *mut masa_calib);
    pub fn masa_calib_accumulate(calib: *mut masa_calib, x: *const f32, n_rows: usize) -> masa_status;
    pub fn masa_calib_merge(dst: *mut masa_calib, src: *const masa_calib) -> masa_status;
    pub fn masa_calib_shape(calib: *const masa_calib, dim: *mut usize, n_rows: *mut u64) -> masa_status;
    pub fn masa_calib_data(calib: *const masa_calib) -> *const f64;

    // Whitened low-rank residual
    pub fn masa_residual_result_default(result: *mut masa_residual_result, size: usize);
    pub fn masa_residual_lowrank(
        ctx: *mut masa_context,
        d_in: usize,
        d_out: usize,
        w: *const f32,
        w_hat: *const f32,
        calib: *const f64,
        rank: usize,
        a: *mut f32,
        a_len: usize,
        b: *mut f32,
        b_len: usize,
        result: *mut masa_residual_result,
    ) -> masa_status;
}
mod replaceme;
pub use replaceme::*;

// ---------------------------------------------------------------------------
// safetensors files and compressed models (`include/masa/io.h`)
// ---------------------------------------------------------------------------

/// `enum masa_dtype`.
pub type masa_dtype = c_uint;
pub const MASA_DTYPE_F32: masa_dtype = 0;
pub const MASA_DTYPE_F16: masa_dtype = 1;
pub const MASA_DTYPE_BF16: masa_dtype = 2;
pub const MASA_DTYPE_F64: masa_dtype = 3;
pub const MASA_DTYPE_BOOL: masa_dtype = 4;
pub const MASA_DTYPE_U8: masa_dtype = 5;
pub const MASA_DTYPE_I8: masa_dtype = 6;
pub const MASA_DTYPE_I16: masa_dtype = 7;
pub const MASA_DTYPE_U16: masa_dtype = 8;
pub const MASA_DTYPE_I32: masa_dtype = 9;
pub const MASA_DTYPE_U32: masa_dtype = 10;
pub const MASA_DTYPE_I64: masa_dtype = 11;
pub const MASA_DTYPE_U64: masa_dtype = 12;
pub const MASA_DTYPE_F8_E5M2: masa_dtype = 13;
pub const MASA_DTYPE_F8_E4M3: masa_dtype = 14;

/// `enum masa_model_kind`.
pub type masa_model_kind = c_uint;
pub const MASA_MODEL_ABSENT: masa_model_kind = 0;
pub const MASA_MODEL_MASA: masa_model_kind = 1;
pub const MASA_MODEL_DENSE: masa_model_kind = 2;
pub const MASA_MODEL_LOWRANK: masa_model_kind = 3;
/// `MASA_MODEL_FORMAT_VERSION`.
pub const MASA_MODEL_FORMAT_VERSION: c_uint = 1;

extern "C" {
    pub fn masa_dtype_name(dtype: masa_dtype) -> *const c_char;
    pub fn masa_dtype_size(dtype: masa_dtype) -> usize;

    pub fn masa_safetensors_open(
        ctx: *mut masa_context,
        path: *const c_char,
        out: *mut *mut masa_safetensors,
    ) -> masa_status;
    pub fn masa_safetensors_open_memory(
        ctx: *mut masa_context,
        data: *const c_void,
        bytes: usize,
        out: *mut *mut masa_safetensors,
    ) -> masa_status;
    pub fn masa_safetensors_close(st: *mut masa_safetensors);
    pub fn masa_safetensors_tensor_count(st: *const masa_safetensors) -> usize;
    pub fn masa_safetensors_find(
        st: *const masa_safetensors,
        name: *const c_char,
        index: *mut usize,
    ) -> masa_status;
    pub fn masa_safetensors_tensor(
        st: *const masa_safetensors,
        index: usize,
        name: *mut *const c_char,
        dtype: *mut masa_dtype,
        ndim: *mut usize,
        shape: *mut *const usize,
        data: *mut *const c_void,
        bytes: *mut usize,
    ) -> masa_status;
    pub fn masa_safetensors_read_f32(
        st: *const masa_safetensors,
        index: usize,
        dst: *mut f32,
        count: usize,
    ) -> masa_status;
    pub fn masa_safetensors_f32(
        st: *mut masa_safetensors,
        index: usize,
        data: *mut *const f32,
        count: *mut usize,
    ) -> masa_status;
    pub fn masa_safetensors_metadata_count(st: *const masa_safetensors) -> usize;
    pub fn masa_safetensors_metadata_entry(
        st: *const masa_safetensors,
        index: usize,
        key: *mut *const c_char,
        value: *mut *const c_char,
    ) -> masa_status;
    pub fn masa_safetensors_metadata_get(
        st: *const masa_safetensors,
        key: *const c_char,
        value: *mut *const c_char,
    ) -> masa_status;

    pub fn masa_safetensors_writer_create(
        ctx: *mut masa_context,
        path: *const c_char,
        out: *mut *mut masa_safetensors_writer,
    ) -> masa_status;
    pub fn masa_safetensors_writer_add(
        w: *mut masa_safetensors_writer,
        name: *const c_char,
        dtype: masa_dtype,
        ndim: usize,
        shape: *const usize,
        data: *const c_void,
        bytes: usize,
    ) -> masa_status;
    pub fn masa_safetensors_writer_set_metadata(
        w: *mut masa_safetensors_writer,
        key: *const c_char,
        value: *const c_char,
    ) -> masa_status;
    pub fn masa_safetensors_writer_finish(w: *mut masa_safetensors_writer) -> masa_status;
    pub fn masa_safetensors_writer_destroy(w: *mut masa_safetensors_writer);

    pub fn masa_model_writer_create(
        ctx: *mut masa_context,
        path: *const c_char,
        n_layers: usize,
        out: *mut *mut masa_model_writer,
    ) -> masa_status;
    pub fn masa_model_writer_add_group(
        w: *mut masa_model_writer,
        which: masa_projection,
        first_layer: usize,
        dict: *const masa_dictionary,
        coef: *const masa_coefficients,
    ) -> masa_status;
    pub fn masa_model_writer_add_dense(
        w: *mut masa_model_writer,
        which: masa_projection,
        layer: usize,
        d_in: usize,
        d_out: usize,
        weight: *const f32,
    ) -> masa_status;
    pub fn masa_model_writer_add_lowrank(
        w: *mut masa_model_writer,
        which: masa_projection,
        layer: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        a: *const f32,
        b: *const f32,
    ) -> masa_status;
    pub fn masa_model_writer_add_calib(
        w: *mut masa_model_writer,
        name: *const c_char,
        calib: *const masa_calib,
    ) -> masa_status;
    pub fn masa_model_writer_add_tensor(
        w: *mut masa_model_writer,
        name: *const c_char,
        dtype: masa_dtype,
        ndim: usize,
        shape: *const usize,
        data: *const c_void,
        bytes: usize,
    ) -> masa_status;
    pub fn masa_model_writer_set_metadata(
        w: *mut masa_model_writer,
        key: *const c_char,
        value: *const c_char,
    ) -> masa_status;
    pub fn masa_model_writer_finish(w: *mut masa_model_writer) -> masa_status;
    pub fn masa_model_writer_destroy(w: *mut masa_model_writer);

    pub fn masa_model_open(
        ctx: *mut masa_context,
        path: *const c_char,
        out: *mut *mut masa_model,
    ) -> masa_status;
    pub fn masa_model_close(model: *mut masa_model);
    pub fn masa_model_layers(model: *const masa_model, n_layers: *mut usize) -> masa_status;
    pub fn masa_model_projection(
        model: *const masa_model,
        which: masa_projection,
        kind: *mut masa_model_kind,
        d_in: *mut usize,
        d_out: *mut usize,
        n_groups: *mut usize,
    ) -> masa_status;
    pub fn masa_model_group(
        model: *const masa_model,
        which: masa_projection,
        group: usize,
        first_layer: *mut usize,
        n_layers: *mut usize,
        dict: *mut *mut masa_dictionary,
        coef: *mut *mut masa_coefficients,
    ) -> masa_status;
    pub fn masa_model_lowrank(
        model: *const masa_model,
        which: masa_projection,
        layer: usize,
        rank: *mut usize,
        a: *mut *mut f32,
        b: *mut *mut f32,
    ) -> masa_status;
    pub fn masa_model_dense(
        model: *const masa_model,
        which: masa_projection,
        layer: usize,
        weight: *mut *mut f32,
    ) -> masa_status;
    pub fn masa_model_apply(
        model: *const masa_model,
        layer_index: usize,
        layer: *mut masa_layer,
    ) -> masa_status;
    pub fn masa_model_calib_count(model: *const masa_model) -> usize;
    pub fn masa_model_calib_name(
        model: *const masa_model,
        index: usize,
        name: *mut *const c_char,
    ) -> masa_status;
    pub fn masa_model_calib(
        model: *const masa_model,
        name: *const c_char,
        out: *mut *mut masa_calib,
    ) -> masa_status;
    pub fn masa_model_file(model: *mut masa_model) -> *mut masa_safetensors;
}

#[cfg(test)]
mod layout {
    use super::*;
    use core::mem::{align_of, size_of};

    // Sizes and alignments the C compiler gives these structs on LP64
    // targets (x86-64, aarch64): checked so a transcription error shows up.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn struct_layouts_match_lp64() {
        assert_eq!(size_of::<masa_context_options>(), 40);
        assert_eq!(size_of::<masa_layer_options>(), 56);
        assert_eq!(size_of::<masa_layer_grads>(), 16 + 24 * 8);
        assert_eq!(align_of::<masa_layer_grads>(), 8);
        assert_eq!(size_of::<masa_pca_result>(), 40);
        assert_eq!(size_of::<masa_group_plan_result>(), 40);
        assert_eq!(size_of::<masa_residual_result>(), 40);
    }
}
