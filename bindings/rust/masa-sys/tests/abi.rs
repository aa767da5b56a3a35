//! Checks the hand-written declarations against the library actually linked:
//! the `size` fields that the _init functions set are the C compiler's
//! sizeof, so a transcription error in a struct shows up here.

use masa_sys::*;
use std::ffi::CStr;
use std::mem::{size_of, MaybeUninit};

#[test]
fn version_matches_header() {
    let n = unsafe { masa_version_number() };
    assert_eq!(n, MASA_VERSION_NUMBER);
    let s = unsafe { CStr::from_ptr(masa_version_string()) };
    assert_eq!(s.to_str().unwrap(), MASA_VERSION_STRING);
}

#[test]
fn struct_sizes_match_c() {
    unsafe {
        let mut o = MaybeUninit::<masa_context_options>::zeroed();
        masa_context_options_default(o.as_mut_ptr(), core::mem::size_of::<masa_context_options>());
        let o = o.assume_init();
        assert_eq!(o.size, size_of::<masa_context_options>());
        assert!(o.malloc_fn.is_none() && o.free_fn.is_none() && o.alloc_user.is_null());

        let mut l = MaybeUninit::<masa_layer_options>::zeroed();
        masa_layer_options_default(l.as_mut_ptr(), core::mem::size_of::<masa_layer_options>());
        let l = l.assume_init();
        assert_eq!(l.size, size_of::<masa_layer_options>());
        assert_eq!(l.rope_theta, 10000.0);
        assert_eq!(l.softmax_scale, 0.0);

        let mut g = MaybeUninit::<masa_layer_grads>::zeroed();
        masa_layer_grads_default(g.as_mut_ptr(), core::mem::size_of::<masa_layer_grads>());
        let g = g.assume_init();
        assert_eq!(g.size, size_of::<masa_layer_grads>());
        assert_eq!(g.mode, MASA_GRAD_ADD);
        assert!(g
            .d_atoms
            .iter()
            .chain(&g.d_coefficients)
            .chain(&g.d_weight)
            .chain(&g.d_bias)
            .all(|p| p.is_null()));
    }
}

#[test]
fn status_strings_and_last_error() {
    unsafe {
        let ok = CStr::from_ptr(masa_status_string(MASA_OK));
        assert!(!ok.to_bytes().is_empty());
        let unknown = CStr::from_ptr(masa_status_string(9999));
        assert_eq!(unknown.to_str().unwrap(), "unknown status");

        // A failing call sets a message on this thread.
        let mut out = std::ptr::null_mut();
        let st = masa_context_create(std::ptr::null(), std::ptr::null_mut());
        assert_eq!(st, MASA_ERROR_NULL_ARGUMENT);
        assert!(!CStr::from_ptr(masa_last_error()).to_bytes().is_empty());
        let st = masa_context_create(std::ptr::null(), &mut out);
        assert_eq!(st, MASA_OK);
        assert!(!out.is_null());
        assert!(masa_context_threads(out) >= 1);
        masa_context_destroy(out);
        // Destroy functions accept NULL.
        masa_context_destroy(std::ptr::null_mut());
        masa_dictionary_destroy(std::ptr::null_mut());
        masa_coefficients_destroy(std::ptr::null_mut());
        masa_layer_destroy(std::ptr::null_mut());
    }
}
