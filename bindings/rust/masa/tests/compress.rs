//! masa::compress against an f64 reference written here (Gram by loops, a
//! cyclic Jacobi eigensolver, Cholesky), the planner against brute force,
//! and the error paths.

mod common;

use common::{assert_close, Rng};
use masa::compress::{self, Calibration};
use masa::{Context, Status};

/// L matrices: mixtures of `base` random matrices with decaying weights.
fn mats(rng: &mut Rng, l: usize, n: usize, base: usize) -> Vec<Vec<f32>> {
    let b: Vec<Vec<f32>> = (0..base).map(|_| rng.vec(n)).collect();
    (0..l)
        .map(|_| {
            let mut m: Vec<f32> = rng.vec(n).iter().map(|x| 0.05 * x).collect();
            for (k, bk) in b.iter().enumerate() {
                let a = rng.next() / (k + 1) as f32;
                for i in 0..n {
                    m[i] += a * bk[i];
                }
            }
            m
        })
        .collect()
}

fn ref_gram(m: &[Vec<f32>]) -> Vec<f64> {
    let l = m.len();
    let mut g = vec![0.0; l * l];
    for i in 0..l {
        for j in 0..l {
            g[i * l + j] = m[i].iter().zip(&m[j]).map(|(a, b)| *a as f64 * *b as f64).sum();
        }
    }
    g
}

/// Eigenvalues (descending) and eigenvectors (column s of v, n x n
/// row-major, largest-magnitude entry positive) of a symmetric matrix.
fn jacobi(n: usize, a_in: &[f64], lda: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a: Vec<f64> = (0..n * n).map(|k| a_in[(k / n) * lda + k % n]).collect();
    let mut q: Vec<f64> = (0..n * n).map(|k| if k / n == k % n { 1.0 } else { 0.0 }).collect();
    for _ in 0..100 {
        let off: f64 = (0..n * n).filter(|k| k / n != k % n).map(|k| a[k] * a[k]).sum();
        let diag: f64 = (0..n).map(|i| a[i * n + i] * a[i * n + i]).sum();
        if off <= 1e-30 * diag {
            break;
        }
        for p in 0..n {
            for r in p + 1..n {
                let apr = a[p * n + r];
                if apr == 0.0 {
                    continue;
                }
                let theta = (a[r * n + r] - a[p * n + p]) / (2.0 * apr);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (x, y) = (a[k * n + p], a[k * n + r]);
                    a[k * n + p] = c * x - s * y;
                    a[k * n + r] = s * x + c * y;
                }
                for k in 0..n {
                    let (x, y) = (a[p * n + k], a[r * n + k]);
                    a[p * n + k] = c * x - s * y;
                    a[r * n + k] = s * x + c * y;
                }
                for k in 0..n {
                    let (x, y) = (q[k * n + p], q[k * n + r]);
                    q[k * n + p] = c * x - s * y;
                    q[k * n + r] = s * x + c * y;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].partial_cmp(&a[i * n + i]).unwrap());
    let w: Vec<f64> = order.iter().map(|&i| a[i * n + i]).collect();
    let mut v = vec![0.0; n * n];
    for (s, &col) in order.iter().enumerate() {
        let big =
            (0..n).max_by(|&x, &y| q[x * n + col].abs().partial_cmp(&q[y * n + col].abs()).unwrap()).unwrap();
        let sign = if q[big * n + col] < 0.0 { -1.0 } else { 1.0 };
        for l in 0..n {
            v[l * n + s] = sign * q[l * n + col];
        }
    }
    (w, v)
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn gram_and_pca_match_reference() {
    let ctx = Context::with_threads(2).unwrap();
    let mut rng = Rng::new(7);
    let (l, rows, cols, s) = (6, 9, 10, 3);
    let n = rows * cols;
    let m = mats(&mut rng, l, n, 6);
    let refs: Vec<&[f32]> = m.iter().map(|v| v.as_slice()).collect();
    let g = compress::gram(&ctx, &refs, rows, cols).unwrap();
    let rg = ref_gram(&m);
    let scale = max_abs(&rg);
    assert!(g.iter().zip(&rg).all(|(a, b)| (a - b).abs() <= 1e-13 * scale));

    let (w, v) = jacobi(l, &rg, l);
    let ev = compress::gram_eigenvalues(&ctx, l, &g, l).unwrap();
    assert!(ev.iter().zip(&w).all(|(a, b)| (a - b).abs() <= 1e-12 * w[0]));

    let pca = compress::matrix_pca(&ctx, &refs, rows, cols, s, None).unwrap();
    let mut atoms = vec![0.0; s * n];
    let mut coefs = vec![0.0; l * s];
    for a in 0..s {
        for i in 0..n {
            atoms[a * n + i] = (0..l).map(|k| v[k * l + a] * m[k][i] as f64).sum::<f64>() / w[a].sqrt();
        }
        for k in 0..l {
            coefs[k * s + a] = w[a].sqrt() * v[k * l + a];
        }
    }
    assert_close("atoms", &pca.atoms, &atoms, 1e-5);
    assert_close("coefficients", &pca.coefficients, &coefs, 1e-5);
    let dropped: f64 = w[s..].iter().map(|x| x.max(0.0)).sum();
    let total: f64 = w.iter().sum();
    assert!((pca.residual_energy - dropped).abs() <= 1e-12 * total);
    assert_eq!(pca.rank, l);
    // the reconstruction error is the sum of the dropped eigenvalues
    let mut recon = 0.0;
    for (k, mk) in m.iter().enumerate().take(l) {
        for (i, &mki) in mk.iter().enumerate().take(n) {
            let x: f64 = mki as f64
                - (0..s)
                    .map(|a| pca.coefficients[k * s + a] as f64 * pca.atoms[a * n + i] as f64)
                    .sum::<f64>();
            recon += x * x;
        }
    }
    assert!((recon - dropped).abs() <= 1e-5 * total, "recon {recon} dropped {dropped}");
    // the Gram given (a sub-block) gives the same atoms
    let again = compress::matrix_pca(&ctx, &refs, rows, cols, s, Some((&g, l))).unwrap();
    assert_close("atoms again", &again.atoms, &atoms, 1e-5);

    // into a dictionary and table
    let (dict, table, report) = compress::matrix_pca_create(&ctx, &refs, rows, cols, s, None).unwrap();
    assert_eq!(dict.shape(), (s, rows, cols));
    assert_eq!(table.shape(), (l, s));
    assert_eq!(dict.data(), &pca.atoms[..]);
    assert_eq!(report.rank, l);
}

#[test]
fn pca_errors() {
    let ctx = Context::with_threads(1).unwrap();
    let mut rng = Rng::new(3);
    let m = mats(&mut rng, 4, 15, 4);
    let refs: Vec<&[f32]> = m.iter().map(|v| v.as_slice()).collect();
    let e = compress::matrix_pca(&ctx, &refs, 3, 5, 5, None).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    let e = compress::matrix_pca(&ctx, &refs, 3, 4, 2, None).unwrap_err();
    assert_eq!(e.status(), Status::BadShape); // slices of 15 for 3 x 4
    let dup: Vec<&[f32]> = vec![&m[0], &m[1], &m[0], &m[1]];
    let e = compress::matrix_pca(&ctx, &dup, 3, 5, 3, None).unwrap_err();
    assert!(e.message().contains("rank (2)"), "{}", e.message());
    let mut bad = m[2].clone();
    bad[4] = f32::NAN;
    let with_nan: Vec<&[f32]> = vec![&m[0], &m[1], &bad];
    assert_eq!(compress::gram(&ctx, &with_nan, 3, 5).unwrap_err().status(), Status::InvalidArgument);
    let short = [0.0f64; 3];
    assert_eq!(
        compress::matrix_pca(&ctx, &refs, 3, 5, 2, Some((&short, 4))).unwrap_err().status(),
        Status::BufferTooSmall
    );
    assert_eq!(compress::gram_eigenvalues(&ctx, 4, &short, 4).unwrap_err().status(), Status::BufferTooSmall);
}

/// Smallest error within the budget over every cut set and atom count.
fn brute(g: &[f64], l: usize, n: usize, budget: usize, fixed: Option<&[usize]>) -> Option<f64> {
    let mut best: Option<f64> = None;
    for mask in 0u32..(1 << (l - 1)) {
        let mut starts = vec![0];
        for k in 1..l {
            if mask >> (k - 1) & 1 == 1 {
                starts.push(k);
            }
        }
        if let Some(f) = fixed {
            if starts != f {
                continue;
            }
        }
        let mut ends: Vec<usize> = starts[1..].to_vec();
        ends.push(l);
        let eig: Vec<Vec<f64>> =
            starts.iter().zip(&ends).map(|(&s, &e)| jacobi(e - s, &g[s * l + s..], l).0).collect();
        let lens: Vec<usize> = starts.iter().zip(&ends).map(|(s, e)| e - s).collect();
        let mut atoms = vec![1usize; lens.len()];
        loop {
            let params: usize = atoms.iter().zip(&lens).map(|(a, len)| a * (n + len)).sum();
            if params <= budget {
                let err: f64 = eig
                    .iter()
                    .zip(&atoms)
                    .map(|(w, &a)| w[a..].iter().map(|x| x.max(0.0)).sum::<f64>())
                    .sum();
                if best.is_none_or(|b| err < b) {
                    best = Some(err);
                }
            }
            // next combination
            let mut k = 0;
            while k < atoms.len() && atoms[k] == lens[k] {
                atoms[k] = 1;
                k += 1;
            }
            if k == atoms.len() {
                break;
            }
            atoms[k] += 1;
        }
    }
    best
}

#[test]
fn planner_matches_brute_force() {
    let ctx = Context::with_threads(1).unwrap();
    let mut rng = Rng::new(11);
    let (l, rows, cols) = (6, 2, 3);
    let n = rows * cols;
    let m = mats(&mut rng, l, n, 3);
    let refs: Vec<&[f32]> = m.iter().map(|v| v.as_slice()).collect();
    let g = compress::gram(&ctx, &refs, rows, cols).unwrap();
    let trace: f64 = (0..l).map(|i| g[i * l + i]).sum();
    let fixed = [0usize, 2, 3];
    for budget in (n + l..=l * (n + l)).step_by(2) {
        let plan = compress::plan_groups(&ctx, l, &g, rows, cols, budget).unwrap();
        let want = brute(&g, l, n, budget, None).unwrap();
        assert!((plan.error - want).abs() <= 1e-10 * trace, "budget {budget}: {} vs {want}", plan.error);
        assert!(plan.params <= budget);
        let groups = plan.groups(l);
        assert_eq!(groups.iter().map(|(s, e, a)| a * (n + e - s)).sum::<usize>(), plan.params);
        match brute(&g, l, n, budget, Some(&fixed)) {
            Some(want) => {
                let fp = compress::plan_groups_fixed(&ctx, l, &g, rows, cols, budget, &fixed).unwrap();
                assert!((fp.error - want).abs() <= 1e-10 * trace);
                assert_eq!(fp.starts, fixed);
            }
            None => {
                let e = compress::plan_groups_fixed(&ctx, l, &g, rows, cols, budget, &fixed).unwrap_err();
                assert_eq!(e.status(), Status::InvalidArgument);
            }
        }
    }
    let e = compress::plan_groups(&ctx, l, &g, rows, cols, n + l - 1).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert_eq!(
        compress::plan_groups(&ctx, l, &g[1..], rows, cols, 1000).unwrap_err().status(),
        Status::BadShape
    );
}

#[test]
fn calibration_matches_reference() {
    let ctx = Context::with_threads(2).unwrap();
    let mut rng = Rng::new(5);
    let dim = 6;
    let x = rng.vec(40 * dim);
    let mut a = Calibration::new(&ctx, dim).unwrap();
    let mut b = Calibration::new(&ctx, dim).unwrap();
    a.accumulate(&x[..15 * dim]).unwrap();
    b.accumulate(&x[15 * dim..]).unwrap();
    a.merge(&b).unwrap();
    assert_eq!(a.n_rows(), 40);
    let mut want = vec![0.0; dim * dim];
    for r in 0..40 {
        for i in 0..dim {
            for j in 0..dim {
                want[i * dim + j] += x[r * dim + i] as f64 * x[r * dim + j] as f64;
            }
        }
    }
    let scale = max_abs(&want);
    assert!(a.matrix().iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-13 * scale));
    let c = Calibration::from_data(&ctx, dim, a.matrix(), a.n_rows()).unwrap();
    assert_eq!(c.matrix(), a.matrix());
    assert_eq!(a.accumulate(&x[..5]).unwrap_err().status(), Status::BadShape);
    let mut bad = x[..dim].to_vec();
    bad[2] = f32::INFINITY;
    assert_eq!(a.accumulate(&bad).unwrap_err().status(), Status::InvalidArgument);
    let other = Calibration::new(&ctx, dim + 1).unwrap();
    assert_eq!(a.merge(&other).unwrap_err().status(), Status::BadShape);
    assert_eq!(Calibration::new(&ctx, 0).unwrap_err().status(), Status::BadShape);
}

#[test]
fn residual_identity_and_errors() {
    let ctx = Context::with_threads(2).unwrap();
    let mut rng = Rng::new(9);
    let (d_in, d_out, rank) = (10, 7, 3);
    let w = rng.vec(d_in * d_out);
    let w_hat: Vec<f32> = rng.vec(d_in * d_out).iter().map(|v| 0.3 * v).collect();
    let mut cal = Calibration::new(&ctx, d_in).unwrap();
    let mut x = rng.vec(50 * d_in);
    for r in 0..50 {
        for i in 1..d_in {
            x[r * d_in + i] += 0.7 * x[r * d_in + i - 1];
        }
    }
    cal.accumulate(&x).unwrap();
    let res =
        compress::residual_lowrank(&ctx, d_in, d_out, &w, Some(&w_hat), Some(cal.matrix()), rank).unwrap();
    // reference: M = R^T E, squared singular values = eigenvalues of M^T M
    let c = cal.matrix();
    let mut r = vec![0.0f64; d_in * d_in];
    for j in 0..d_in {
        let mut d = c[j * d_in + j];
        for k in 0..j {
            d -= r[j * d_in + k] * r[j * d_in + k];
        }
        r[j * d_in + j] = d.sqrt();
        for i in j + 1..d_in {
            let mut s = c[i * d_in + j];
            for k in 0..j {
                s -= r[i * d_in + k] * r[j * d_in + k];
            }
            r[i * d_in + j] = s / r[j * d_in + j];
        }
    }
    let e: Vec<f64> = w.iter().zip(&w_hat).map(|(a, b)| *a as f64 - *b as f64).collect();
    let mut mm = vec![0.0; d_in * d_out];
    for i in 0..d_in {
        for j in 0..d_out {
            mm[i * d_out + j] = (i..d_in).map(|k| r[k * d_in + i] * e[k * d_out + j]).sum();
        }
    }
    let mut mtm = vec![0.0; d_out * d_out];
    for a in 0..d_out {
        for b in 0..d_out {
            mtm[a * d_out + b] = (0..d_in).map(|i| mm[i * d_out + a] * mm[i * d_out + b]).sum();
        }
    }
    let (sv2, _) = jacobi(d_out, &mtm, d_out);
    let before: f64 = mm.iter().map(|v| v * v).sum();
    let dropped: f64 = sv2[rank..].iter().map(|v| v.max(0.0)).sum();
    assert!((res.error_before - before).abs() <= 1e-12 * before);
    assert!((res.dropped - dropped).abs() <= 1e-10 * before);
    assert!((res.error_after - res.dropped).abs() <= 1e-6 * before, "{} vs {}", res.error_after, res.dropped);
    assert_eq!(res.jitter, 0.0);
    assert_eq!(res.a.len(), d_in * rank);

    // plain SVD, errors
    let plain = compress::residual_lowrank(&ctx, d_in, d_out, &w, None, None, d_out).unwrap();
    assert!(plain.error_after <= 1e-10 * plain.error_before);
    let err = |rank, calib: Option<&[f64]>| {
        compress::residual_lowrank(&ctx, d_in, d_out, &w, None, calib, rank).unwrap_err().status()
    };
    assert_eq!(err(d_out + 1, None), Status::InvalidArgument);
    assert_eq!(err(0, None), Status::BadShape);
    let neg: Vec<f64> = (0..d_in * d_in).map(|k| if k / d_in == k % d_in { -1.0 } else { 0.0 }).collect();
    assert_eq!(err(2, Some(&neg)), Status::InvalidArgument);
    assert_eq!(err(2, Some(&neg[1..])), Status::BadShape);
    assert_eq!(
        compress::residual_lowrank(&ctx, d_in, d_out, &w[1..], None, None, 2).unwrap_err().status(),
        Status::BadShape
    );
}
