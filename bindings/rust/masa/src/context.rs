//! The context: worker threads and BLIS settings.

use core::ffi::CStr;
use core::fmt;
use core::ptr::{self, NonNull};

use masa_sys as sys;

use crate::error::{check, Error, Result, Status};

/// A libmasa context (`masa_context`): owns the pool of worker threads that
/// forward and backward use. Every [`Dictionary`](crate::Dictionary),
/// [`Coefficients`](crate::Coefficients) table and [`Layer`](crate::Layer)
/// borrows the context it was created from, so the context cannot be dropped
/// before them (the header requires them to be destroyed first).
pub struct Context {
    raw: NonNull<sys::masa_context>,
}

// SAFETY (header, "Threads"): "A context may be used from several threads at
// once. Its worker pool runs one call at a time; a call that finds the pool
// busy runs its work on the calling thread instead." So shared references may
// be used from many threads (Sync), and nothing ties a context to the thread
// that created it (Send). Destroying needs exclusive access, which Drop has.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    /// A context with the default options: one thread per online CPU.
    pub fn new() -> Result<Context> {
        Self::with_threads(0)
    }

    /// A context using `n_threads` threads (the calling thread plus
    /// `n_threads - 1` workers); 0 means one per online CPU.
    pub fn with_threads(n_threads: usize) -> Result<Context> {
        let mut options = core::mem::MaybeUninit::<sys::masa_context_options>::zeroed();
        // SAFETY: _init fills the whole struct (it is also zeroed beforehand).
        let mut options = unsafe {
            sys::masa_context_options_default(
                options.as_mut_ptr(),
                core::mem::size_of::<sys::masa_context_options>(),
            );
            options.assume_init()
        };
        options.n_threads = n_threads;
        let mut out = ptr::null_mut();
        // SAFETY: valid options and out pointers.
        check(unsafe { sys::masa_context_create(&options, &mut out) })?;
        NonNull::new(out).map(|raw| Context { raw }).ok_or_else(|| null_handle("masa_context_create"))
    }

    /// Number of threads the context uses (>= 1).
    pub fn threads(&self) -> usize {
        // SAFETY: valid handle.
        unsafe { sys::masa_context_threads(self.raw.as_ptr()) }
    }

    /// The raw handle, for calls to `masa-sys`. It stays owned by `self`.
    pub fn as_ptr(&self) -> *mut sys::masa_context {
        self.raw.as_ptr()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every object created from the context borrows it, so they
        // are all gone by now.
        unsafe { sys::masa_context_destroy(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").field("threads", &self.threads()).finish()
    }
}

/// Name of the BLIS kernel set in use ("skx", "zen3", "haswell", "generic",
/// ...); initialises BLIS if needed (see "BLIS kernels" in `masa.h`).
pub fn blis_arch() -> &'static str {
    // SAFETY: never NULL, static storage.
    unsafe { static_str(sys::masa_blis_arch()) }
}

/// Version of the libmasa actually loaded, `MAJOR * 10000 + MINOR * 100 +
/// PATCH` (compare with [`masa_sys::MASA_VERSION_NUMBER`], the header this
/// binding was written from).
pub fn version_number() -> u32 {
    // SAFETY: no arguments.
    unsafe { sys::masa_version_number() }
}

/// "MAJOR.MINOR.PATCH" of the libmasa actually loaded.
pub fn version_string() -> &'static str {
    // SAFETY: never NULL, static storage.
    unsafe { static_str(sys::masa_version_string()) }
}

/// # Safety
/// `p` must be NULL or a NUL-terminated string in static storage.
unsafe fn static_str(p: *const core::ffi::c_char) -> &'static str {
    if p.is_null() {
        return "";
    }
    CStr::from_ptr(p).to_str().unwrap_or("")
}

pub(crate) fn null_handle(func: &str) -> Error {
    Error::binding(Status::Internal, format!("{func} reported success but returned a NULL handle"))
}
