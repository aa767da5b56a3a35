//! `masa/replaceme.h`: ReplaceMe's least-squares and cosine estimators and
//! the down-projection merge (declarations mirror the header one to one).

use core::ffi::c_int;
use core::marker::{PhantomData, PhantomPinned};

use crate::{masa_context, masa_status};

opaque! {
    /// `struct masa_linear_estimator` (opaque).
    masa_linear_estimator;
    /// `struct masa_cosine_estimator` (opaque).
    masa_cosine_estimator;
}

/// `struct masa_cosine_options`; initialise with [`masa_cosine_options_default`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct masa_cosine_options {
    pub size: usize,
    pub epochs: usize,
    pub batch_rows: usize,
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub seed: u64,
}

/// `enum masa_merge_layout`.
pub type masa_merge_layout = c_int;
/// W (d_ff x d): the output is h W.
pub const MASA_MERGE_ROW_VECTOR: masa_merge_layout = 0;
/// W (d x d_ff), nn.Linear's weight: the output is h W^T.
pub const MASA_MERGE_NN_LINEAR: masa_merge_layout = 1;

extern "C" {
    pub fn masa_linear_estimator_create(
        ctx: *mut masa_context,
        d_in: usize,
        d_out: usize,
        out: *mut *mut masa_linear_estimator,
    ) -> masa_status;
    pub fn masa_linear_estimator_destroy(est: *mut masa_linear_estimator);
    pub fn masa_linear_estimator_shape(
        est: *const masa_linear_estimator,
        d_in: *mut usize,
        d_out: *mut usize,
    ) -> masa_status;
    pub fn masa_linear_estimator_accumulate(
        est: *mut masa_linear_estimator,
        rows: usize,
        x: *const f32,
        target: *const f32,
        offset: *const f32,
    ) -> masa_status;
    pub fn masa_linear_estimator_merge(
        dst: *mut masa_linear_estimator,
        src: *const masa_linear_estimator,
    ) -> masa_status;
    pub fn masa_linear_estimator_reset(est: *mut masa_linear_estimator) -> masa_status;
    pub fn masa_linear_estimator_rows(est: *const masa_linear_estimator, rows: *mut u64) -> masa_status;
    pub fn masa_linear_estimator_stats(
        est: *const masa_linear_estimator,
        xtx: *mut f64,
        xtz: *mut f64,
    ) -> masa_status;
    pub fn masa_linear_estimator_solve(
        est: *const masa_linear_estimator,
        alpha: f64,
        t: *mut f32,
    ) -> masa_status;

    pub fn masa_cosine_options_default(options: *mut masa_cosine_options, size: usize);
    pub fn masa_cosine_estimator_create(
        ctx: *mut masa_context,
        d_in: usize,
        d_out: usize,
        options: *const masa_cosine_options,
        out: *mut *mut masa_cosine_estimator,
    ) -> masa_status;
    pub fn masa_cosine_estimator_destroy(est: *mut masa_cosine_estimator);
    pub fn masa_cosine_estimator_transform(est: *const masa_cosine_estimator, t: *mut f32) -> masa_status;
    pub fn masa_cosine_estimator_set_transform(est: *mut masa_cosine_estimator, t: *const f32)
        -> masa_status;
    pub fn masa_cosine_estimator_steps(est: *const masa_cosine_estimator, steps: *mut u64) -> masa_status;
    pub fn masa_cosine_estimator_loss(
        est: *const masa_cosine_estimator,
        rows: usize,
        x: *const f32,
        target: *const f32,
        offset: *const f32,
        loss: *mut f64,
    ) -> masa_status;
    pub fn masa_cosine_estimator_step(
        est: *mut masa_cosine_estimator,
        rows: usize,
        x: *const f32,
        target: *const f32,
        offset: *const f32,
        loss_before: *mut f64,
    ) -> masa_status;
    pub fn masa_cosine_estimator_fit(
        est: *mut masa_cosine_estimator,
        rows: usize,
        x: *const f32,
        target: *const f32,
        offset: *const f32,
        epoch_loss: *mut f64,
    ) -> masa_status;

    pub fn masa_merge_linear_map(
        ctx: *mut masa_context,
        layout: c_int,
        d_ff: usize,
        d: usize,
        w: *mut f32,
        bias: *mut f32,
        t: *const f32,
    ) -> masa_status;
}

#[cfg(test)]
mod layout {
    use super::*;

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn cosine_options_layout_matches_lp64() {
        assert_eq!(core::mem::size_of::<masa_cosine_options>(), 48);
        assert_eq!(core::mem::align_of::<masa_cosine_options>(), 8);
    }
}
