//! ReplaceMe through the safe API: least squares against an f64 reference
//! (normal equations solved by elimination), the cosine estimator lowering
//! its loss deterministically, the merge in both layouts, and refusals.

mod common;

use common::Rng;
use masa::replaceme::{merge_linear_map, CosineEstimator, CosineOptions, LinearEstimator, MergeLayout};
use masa::{Context, Status};

/// Solves (A + alpha I) S = B (A n x n, B n x m) by Gauss-Jordan elimination.
fn solve(n: usize, m: usize, a: &[f64], alpha: f64, b: &[f64]) -> Vec<f64> {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    for i in 0..n {
        a[i * n + i] += alpha;
    }
    for c in 0..n {
        let piv = (c..n).max_by(|&p, &q| a[p * n + c].abs().total_cmp(&a[q * n + c].abs())).unwrap();
        for k in 0..n {
            a.swap(c * n + k, piv * n + k);
        }
        for k in 0..m {
            b.swap(c * m + k, piv * m + k);
        }
        for r in 0..n {
            if r != c {
                let f = a[r * n + c] / a[c * n + c];
                for k in 0..n {
                    a[r * n + k] -= f * a[c * n + k];
                }
                for k in 0..m {
                    b[r * m + k] -= f * b[c * m + k];
                }
            }
        }
    }
    for r in 0..n {
        for k in 0..m {
            b[r * m + k] /= a[r * n + r];
        }
    }
    b
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |s, v| s.max(v.abs()));
    got.iter().zip(want).fold(0.0f64, |e, (g, w)| e.max((*g as f64 - w).abs())) / scale
}

#[test]
fn least_squares_matches_reference() {
    let ctx = Context::with_threads(2).unwrap();
    let (d_in, d_out) = (12, 7);
    let mut rng = Rng::new(3);
    let mut est = LinearEstimator::new(&ctx, d_in, d_out).unwrap();
    let mut other = LinearEstimator::new(&ctx, d_in, d_out).unwrap();
    let (mut xtx, mut xtz) = (vec![0.0f64; d_in * d_in], vec![0.0f64; d_in * d_out]);
    for (k, rows) in [5usize, 600, 1, 80].into_iter().enumerate() {
        let (x, t, o) = (rng.vec(rows * d_in), rng.vec(rows * d_out), rng.vec(rows * d_out));
        for r in 0..rows {
            for i in 0..d_in {
                let xi = x[r * d_in + i] as f64;
                for j in 0..d_in {
                    xtx[i * d_in + j] += xi * x[r * d_in + j] as f64;
                }
                for j in 0..d_out {
                    xtz[i * d_out + j] += xi * (t[r * d_out + j] as f64 - o[r * d_out + j] as f64);
                }
            }
        }
        let target = if k % 2 == 0 { &mut est } else { &mut other };
        target.accumulate(&x, &t, Some(&o)).unwrap();
    }
    est.merge(&other).unwrap();
    assert_eq!(est.rows(), 686);
    assert_eq!(est.shape(), (d_in, d_out));
    let (gx, gz) = est.stats();
    let scale = xtx.iter().fold(0.0f64, |s, v| s.max(v.abs()));
    assert!(gx.iter().zip(&xtx).all(|(g, w)| (g - w).abs() <= 1e-12 * scale));
    assert!(gz.iter().zip(&xtz).all(|(g, w)| (g - w).abs() <= 1e-12 * scale));
    for alpha in [0.0, 3.0] {
        let t = est.solve(alpha).unwrap();
        assert!(max_rel(&t, &solve(d_in, d_out, &xtx, alpha, &xtz)) < 1e-5);
    }
    est.reset().unwrap();
    assert_eq!(est.rows(), 0);
    assert_eq!(est.solve(1.0).unwrap_err().status(), Status::InvalidArgument);
}

#[test]
fn rank_deficient_needs_alpha_and_bad_shapes_are_refused() {
    let ctx = Context::with_threads(1).unwrap();
    let mut rng = Rng::new(5);
    let mut est = LinearEstimator::new(&ctx, 10, 3).unwrap();
    est.accumulate(&rng.vec(4 * 10), &rng.vec(4 * 3), None).unwrap(); // 4 rows < 10
    let err = est.solve(0.0).unwrap_err();
    assert_eq!(err.status(), Status::InvalidArgument);
    assert!(err.message().contains("positive definite"), "{}", err.message());
    assert!(est.solve(1e-3).is_ok());
    assert_eq!(est.accumulate(&[1.0; 15], &[0.0; 3], None).unwrap_err().status(), Status::BadShape);
    assert_eq!(est.accumulate(&[1.0; 10], &[0.0; 4], None).unwrap_err().status(), Status::BadShape);
    assert_eq!(
        est.accumulate(&[1.0; 10], &[0.0; 3], Some(&[0.0; 2])).unwrap_err().status(),
        Status::BadShape
    );
    assert_eq!(
        est.accumulate(&[f32::NAN; 10], &[0.0; 3], None).unwrap_err().status(),
        Status::InvalidArgument
    );
    assert_eq!(est.rows(), 4);
    let other = LinearEstimator::new(&ctx, 10, 4).unwrap();
    assert_eq!(est.merge(&other).unwrap_err().status(), Status::BadShape);
    assert!(LinearEstimator::new(&ctx, 0, 3).is_err());
}

#[test]
fn cosine_lowers_its_loss_deterministically() {
    let ctx = Context::with_threads(2).unwrap();
    let (rows, d) = (400, 10);
    let mut rng = Rng::new(7);
    let (x, y, o) = (rng.vec(rows * d), rng.vec(rows * d), rng.vec(rows * d));
    let options =
        CosineOptions { epochs: 6, batch_rows: 50, learning_rate: 5e-3, seed: 9, ..Default::default() };
    assert_eq!(CosineOptions::default().epochs, 10);
    let mut a = CosineEstimator::new(&ctx, d, d, &options).unwrap();
    let before = a.loss(&x, &y, Some(&o)).unwrap();
    let losses = a.fit(&x, &y, Some(&o)).unwrap();
    let after = a.loss(&x, &y, Some(&o)).unwrap();
    assert!(after < before - 0.01, "{before} -> {after}");
    assert!(losses[5] < losses[0]);
    assert_eq!(a.steps(), 6 * 8);
    let mut b = CosineEstimator::new(&ctx, d, d, &options).unwrap();
    b.fit(&x, &y, Some(&o)).unwrap();
    assert_eq!(a.transform(), b.transform());
    let mut eye = vec![0.0f32; d * d];
    for i in 0..d {
        eye[i * d + i] = 1.0;
    }
    b.set_transform(&eye).unwrap();
    assert_eq!(b.steps(), 0);
    assert_eq!(b.transform(), eye);
    let first = b.step(&x[..50 * d], &y[..50 * d], None).unwrap();
    assert!(first > 0.0 && first < 2.0);
    assert_eq!(b.set_transform(&eye[1..]).unwrap_err().status(), Status::BadShape);
    let bad = CosineOptions { learning_rate: -1.0, ..Default::default() };
    assert_eq!(CosineEstimator::new(&ctx, d, d, &bad).err().unwrap().status(), Status::InvalidArgument);
}

#[test]
fn merge_in_both_layouts() {
    let ctx = Context::with_threads(1).unwrap();
    let (d_ff, d) = (9, 4);
    let mut rng = Rng::new(11);
    let (w, t, bias) = (rng.vec(d_ff * d), rng.vec(d * d), rng.vec(d));
    let mut want = vec![0.0f64; d_ff * d];
    for i in 0..d_ff {
        for j in 0..d {
            want[i * d + j] = (0..d).map(|k| w[i * d + k] as f64 * t[k * d + j] as f64).sum();
        }
    }
    let want_bias: Vec<f64> =
        (0..d).map(|j| (0..d).map(|k| bias[k] as f64 * t[k * d + j] as f64).sum()).collect();
    let (mut w1, mut b1) = (w.clone(), bias.clone());
    merge_linear_map(&ctx, MergeLayout::RowVector, d_ff, d, &mut w1, Some(&mut b1), &t).unwrap();
    assert!(max_rel(&w1, &want) < 1e-6 && max_rel(&b1, &want_bias) < 1e-6);
    let mut wl: Vec<f32> = (0..d * d_ff).map(|idx| w[(idx % d_ff) * d + idx / d_ff]).collect();
    merge_linear_map(&ctx, MergeLayout::NnLinear, d_ff, d, &mut wl, None, &t).unwrap();
    let want_l: Vec<f64> = (0..d * d_ff).map(|idx| want[(idx % d_ff) * d + idx / d_ff]).collect();
    assert!(max_rel(&wl, &want_l) < 1e-6);
    let mut short = w.clone();
    assert_eq!(
        merge_linear_map(&ctx, MergeLayout::RowVector, d_ff + 1, d, &mut short, None, &t)
            .unwrap_err()
            .status(),
        Status::BadShape
    );
    let mut nan_t = t.clone();
    nan_t[3] = f32::NAN;
    assert_eq!(
        merge_linear_map(&ctx, MergeLayout::RowVector, d_ff, d, &mut short, None, &nan_t)
            .unwrap_err()
            .status(),
        Status::InvalidArgument
    );
    assert_eq!(short, w);
}
