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
            .chain(&g.d_lowrank_a)
            .chain(&g.d_lowrank_b)
            .all(|p| p.is_null()));
    }
}

#[test]
fn compress_struct_sizes_match_c() {
    unsafe {
        let mut p = masa_pca_result::default();
        masa_pca_result_default(&mut p, size_of::<masa_pca_result>());
        assert_eq!(p.size, size_of::<masa_pca_result>());
        let mut g = masa_group_plan_result::default();
        masa_group_plan_result_default(&mut g, size_of::<masa_group_plan_result>());
        assert_eq!(g.size, size_of::<masa_group_plan_result>());
        let mut r = masa_residual_result::default();
        masa_residual_result_default(&mut r, size_of::<masa_residual_result>());
        assert_eq!(r.size, size_of::<masa_residual_result>());
    }
}

#[test]
fn calib_through_the_raw_api() {
    unsafe {
        let mut ctx = std::ptr::null_mut();
        assert_eq!(masa_context_create(std::ptr::null(), &mut ctx), MASA_OK);
        let mut c = std::ptr::null_mut();
        assert_eq!(masa_calib_create(ctx, 2, &mut c), MASA_OK);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        assert_eq!(masa_calib_accumulate(c, x.as_ptr(), 2), MASA_OK);
        let d = std::slice::from_raw_parts(masa_calib_data(c), 4);
        assert_eq!(d, &[10.0, 14.0, 14.0, 20.0]);
        let (mut dim, mut rows) = (0usize, 0u64);
        assert_eq!(masa_calib_shape(c, &mut dim, &mut rows), MASA_OK);
        assert_eq!((dim, rows), (2, 2));
        assert_eq!(masa_calib_merge(c, c), MASA_ERROR_INVALID_ARGUMENT);
        masa_calib_destroy(c);
        masa_calib_destroy(std::ptr::null_mut());
        masa_context_destroy(ctx);
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

/// A context and a layer with d_model 4 and 2 heads, no projection set.
unsafe fn small_layer(causal: bool) -> (*mut masa_context, *mut masa_layer) {
    let mut ctx = std::ptr::null_mut();
    assert_eq!(masa_context_create(std::ptr::null(), &mut ctx), MASA_OK);
    let mut o = MaybeUninit::<masa_layer_options>::zeroed();
    masa_layer_options_default(o.as_mut_ptr(), size_of::<masa_layer_options>());
    let mut o = o.assume_init();
    o.d_model = 4;
    o.n_heads = 2;
    o.causal = causal as i32;
    let mut layer = std::ptr::null_mut();
    assert_eq!(masa_layer_create(ctx, &o, &mut layer), MASA_OK);
    (ctx, layer)
}

#[test]
fn decode_one_token_through_the_cache() {
    unsafe {
        let (ctx, layer) = small_layer(true);
        for p in [MASA_PROJ_Q, MASA_PROJ_K, MASA_PROJ_V, MASA_PROJ_O] {
            assert_eq!(masa_layer_set_dense(layer, p, std::ptr::null_mut()), MASA_OK);
            let w = masa_layer_weight(layer, p);
            for i in 0..16 {
                *w.add(i) = if i % 5 == 0 { 1.0 } else { 0.0 }; // identity
            }
        }
        let mut bytes = 0usize;
        assert_eq!(masa_kv_cache_size(layer, 1, 2, &mut bytes), MASA_OK);
        assert_eq!(bytes, 2 * 2 * 4 * 4);
        let mut mem = vec![0f32; bytes / 4];
        let mut cache = std::ptr::null_mut();
        assert_eq!(masa_kv_cache_create(layer, 1, 2, mem.as_mut_ptr().cast(), bytes, &mut cache), MASA_OK);
        let mut ws_bytes = 0usize;
        assert_eq!(masa_layer_decode_workspace_size(layer, 1, 1, &mut ws_bytes), MASA_OK);
        let mut ws = vec![0f32; ws_bytes / 4 + 1];
        // Identity projections, one token: attention returns its own value.
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut y = [0f32; 4];
        let st = masa_layer_decode(
            layer,
            cache,
            1,
            1,
            x.as_ptr(),
            y.as_mut_ptr(),
            ws.as_mut_ptr().cast(),
            ws_bytes,
        );
        assert_eq!(st, MASA_OK);
        assert_eq!(y, x);
        let mut len = 0usize;
        assert_eq!(masa_kv_cache_length(cache, &mut len), MASA_OK);
        assert_eq!(len, 1);
        let (mut b, mut m) = (0usize, 0usize);
        assert_eq!(masa_kv_cache_shape(cache, &mut b, &mut m), MASA_OK);
        assert_eq!((b, m), (1, 2));
        assert_eq!(masa_kv_cache_truncate(cache, 2), MASA_ERROR_OUT_OF_RANGE);
        assert_eq!(masa_kv_cache_reset(cache), MASA_OK);
        masa_kv_cache_destroy(cache);
        masa_kv_cache_destroy(std::ptr::null_mut());
        masa_layer_destroy(layer);
        masa_context_destroy(ctx);
    }
}

#[test]
fn weight_policy_round_trip() {
    unsafe {
        let (ctx, layer) = small_layer(false);
        let mut pol: masa_weight_policy = 99;
        assert_eq!(masa_layer_weight_policy(layer, &mut pol), MASA_OK);
        assert_eq!(pol, MASA_WEIGHTS_ON_THE_FLY);
        assert_eq!(masa_layer_set_weight_policy(layer, MASA_WEIGHTS_CACHED), MASA_OK);
        assert_eq!(masa_layer_weight_policy(layer, &mut pol), MASA_OK);
        assert_eq!(pol, MASA_WEIGHTS_CACHED);
        assert_eq!(masa_layer_set_weight_policy(layer, 7), MASA_ERROR_INVALID_ARGUMENT);
        assert_eq!(masa_layer_refresh_weights(layer), MASA_OK);
        assert_eq!(masa_layer_refresh_weights(std::ptr::null_mut()), MASA_ERROR_NULL_ARGUMENT);
        masa_layer_destroy(layer);
        masa_context_destroy(ctx);
    }
}

#[test]
fn lowrank_only_layer_round_trip() {
    unsafe {
        let (ctx, layer) = small_layer(true);
        // rank 0 and rank > min(d_in, d_out) are refused
        let np = std::ptr::null_mut();
        assert_eq!(masa_layer_set_lowrank(layer, MASA_PROJ_Q, 0, np, np), MASA_ERROR_BAD_SHAPE);
        assert_eq!(masa_layer_set_lowrank(layer, MASA_PROJ_Q, 5, np, np), MASA_ERROR_BAD_SHAPE);
        // Every projection A B alone, A = B = I (rank 4): the identity.
        for p in [MASA_PROJ_Q, MASA_PROJ_K, MASA_PROJ_V, MASA_PROJ_O] {
            assert_eq!(masa_layer_set_lowrank(layer, p, 4, np, np), MASA_OK);
            let (mut r, mut a, mut b) = (0usize, np, np);
            assert_eq!(masa_layer_lowrank(layer, p, &mut r, &mut a, &mut b), MASA_OK);
            assert_eq!(r, 4);
            assert!(masa_layer_weight(layer, p).is_null());
            for i in 0..16 {
                *a.add(i) = if i % 5 == 0 { 1.0 } else { 0.0 };
                *b.add(i) = if i % 5 == 0 { 1.0 } else { 0.0 };
            }
        }
        let mut ws_bytes = 0usize;
        assert_eq!(masa_layer_workspace_size(layer, 1, 1, &mut ws_bytes), MASA_OK);
        let mut ws = vec![0f32; ws_bytes / 4 + 1];
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut y = [0f32; 4];
        let st = masa_layer_forward(
            layer,
            1,
            1,
            0,
            x.as_ptr(),
            y.as_mut_ptr(),
            ws.as_mut_ptr().cast(),
            ws_bytes,
            np.cast(),
            0,
        );
        assert_eq!(st, MASA_OK);
        assert_eq!(y, x); // one token attends to itself
        assert_eq!(masa_layer_remove_lowrank(layer, MASA_PROJ_V), MASA_OK);
        let mut r = 9usize;
        assert_eq!(masa_layer_lowrank(layer, MASA_PROJ_V, &mut r, np.cast(), np.cast()), MASA_OK);
        assert_eq!(r, 0);
        assert_eq!(masa_layer_workspace_size(layer, 1, 1, &mut ws_bytes), MASA_OK);
        assert_eq!(masa_layer_remove_lowrank(layer, 4), MASA_ERROR_OUT_OF_RANGE);
        masa_layer_destroy(layer);
        masa_context_destroy(ctx);
    }
}
