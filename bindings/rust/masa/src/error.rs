//! Status codes and the error type.

use core::ffi::CStr;
use core::fmt;

use masa_sys as sys;

/// Result of every fallible call in this crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// A failure status of libmasa (`masa_status` without `MASA_OK`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// A required pointer was NULL.
    NullArgument,
    /// A value out of its domain (flag, scale, ...).
    InvalidArgument,
    /// Zero or inconsistent sizes.
    BadShape,
    /// An index (layer, projection) out of range.
    OutOfRange,
    /// A caller buffer is smaller than required.
    BufferTooSmall,
    /// A size computation overflows `usize`.
    Overflow,
    /// An allocation failed.
    OutOfMemory,
    /// An options struct has an unknown size.
    BadStructSize,
    /// A layer lacks a projection it needs.
    NotReady,
    /// A thread could not be created.
    Thread,
    /// A bug in libmasa.
    Internal,
    /// A file could not be opened, read or written.
    Io,
    /// A file's contents are malformed.
    BadFormat,
    /// No tensor or entry of that name.
    NotFound,
    /// A status this binding does not know (a newer library).
    Unknown(u32),
}

impl Status {
    /// The status for a raw `masa_status`; `None` for `MASA_OK`.
    pub fn from_raw(raw: sys::masa_status) -> Option<Status> {
        Some(match raw {
            sys::MASA_OK => return None,
            sys::MASA_ERROR_NULL_ARGUMENT => Status::NullArgument,
            sys::MASA_ERROR_INVALID_ARGUMENT => Status::InvalidArgument,
            sys::MASA_ERROR_BAD_SHAPE => Status::BadShape,
            sys::MASA_ERROR_OUT_OF_RANGE => Status::OutOfRange,
            sys::MASA_ERROR_BUFFER_TOO_SMALL => Status::BufferTooSmall,
            sys::MASA_ERROR_OVERFLOW => Status::Overflow,
            sys::MASA_ERROR_OUT_OF_MEMORY => Status::OutOfMemory,
            sys::MASA_ERROR_BAD_STRUCT_SIZE => Status::BadStructSize,
            sys::MASA_ERROR_NOT_READY => Status::NotReady,
            sys::MASA_ERROR_THREAD => Status::Thread,
            sys::MASA_ERROR_INTERNAL => Status::Internal,
            sys::MASA_ERROR_IO => Status::Io,
            sys::MASA_ERROR_BAD_FORMAT => Status::BadFormat,
            sys::MASA_ERROR_NOT_FOUND => Status::NotFound,
            other => Status::Unknown(other),
        })
    }

    /// The raw `masa_status` value.
    pub fn raw(self) -> sys::masa_status {
        match self {
            Status::NullArgument => sys::MASA_ERROR_NULL_ARGUMENT,
            Status::InvalidArgument => sys::MASA_ERROR_INVALID_ARGUMENT,
            Status::BadShape => sys::MASA_ERROR_BAD_SHAPE,
            Status::OutOfRange => sys::MASA_ERROR_OUT_OF_RANGE,
            Status::BufferTooSmall => sys::MASA_ERROR_BUFFER_TOO_SMALL,
            Status::Overflow => sys::MASA_ERROR_OVERFLOW,
            Status::OutOfMemory => sys::MASA_ERROR_OUT_OF_MEMORY,
            Status::BadStructSize => sys::MASA_ERROR_BAD_STRUCT_SIZE,
            Status::NotReady => sys::MASA_ERROR_NOT_READY,
            Status::Thread => sys::MASA_ERROR_THREAD,
            Status::Internal => sys::MASA_ERROR_INTERNAL,
            Status::Io => sys::MASA_ERROR_IO,
            Status::BadFormat => sys::MASA_ERROR_BAD_FORMAT,
            Status::NotFound => sys::MASA_ERROR_NOT_FOUND,
            Status::Unknown(raw) => raw,
        }
    }

    /// libmasa's short description of the status (`masa_status_string`),
    /// e.g. "invalid argument".
    pub fn description(self) -> &'static str {
        // SAFETY: masa_status_string never returns NULL and returns a
        // constant string in static storage.
        let s = unsafe { CStr::from_ptr(sys::masa_status_string(self.raw())) };
        s.to_str().unwrap_or("unknown status")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// Where an [`Error`] was detected.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// libmasa returned the status; the message is `masa_last_error()`.
    Library,
    /// This binding refused the call before reaching libmasa (a slice length
    /// the C API cannot check, since it takes no length for it).
    Binding,
}

/// A failed call: the status and the message explaining it.
///
/// For errors reported by libmasa the message is the library's own
/// (`masa_last_error()`, e.g. "masa_layer_create: n_heads (6) is not a
/// multiple of n_kv_heads (4)"), read on the failing thread right after the
/// failing call.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: Status,
    message: String,
    origin: Origin,
}

impl Error {
    /// The failure status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The message (never empty).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether libmasa or this binding detected the error.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Builds the error for a failed libmasa call; must run on the failing
    /// thread before any other libmasa call.
    pub(crate) fn from_library(status: Status) -> Error {
        // SAFETY: masa_last_error never returns NULL; the string stays valid
        // until the next libmasa call on this thread, and it is copied first.
        let msg = unsafe { CStr::from_ptr(sys::masa_last_error()) }.to_string_lossy().into_owned();
        let message = if msg.is_empty() {
            format!("libmasa failed without a message ({})", status.description())
        } else {
            msg
        };
        Error { status, message, origin: Origin::Library }
    }

    pub(crate) fn binding(status: Status, message: String) -> Error {
        Error { status, message, origin: Origin::Binding }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status.description())
    }
}

impl std::error::Error for Error {}

/// Turns a raw status into a `Result`, reading the library's message on
/// failure.
pub(crate) fn check(raw: sys::masa_status) -> Result<()> {
    match Status::from_raw(raw) {
        None => Ok(()),
        Some(status) => Err(Error::from_library(status)),
    }
}

/// `a * b * ...`, or an [`Status::Overflow`] error naming `what`.
pub(crate) fn product(factors: &[usize], what: &str) -> Result<usize> {
    let mut n: usize = 1;
    for &f in factors {
        n = n.checked_mul(f).ok_or_else(|| {
            Error::binding(Status::Overflow, format!("{what}: size {factors:?} overflows usize"))
        })?;
    }
    Ok(n)
}

/// Checks that a slice has exactly `expected` elements.
pub(crate) fn expect_len(func: &str, name: &str, len: usize, expected: usize, shape: &str) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::binding(
            Status::BadShape,
            format!("{func}: {name} has {len} elements, expected {expected} ({shape})"),
        ))
    }
}
