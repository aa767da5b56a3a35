//! Low-rank terms `W = base + A B` (Layer::set_lowrank) and projections that
//! are `A B` alone, against the f64 reference in tests/common: the reference
//! gets `W` composed in f64 and `dA = dW B^T`, `dB = A^T dW` by the chain
//! rule. Both weight policies, both gradient modes, and the errors.

mod common;

use common::{assert_close, compose, to_f64, RefLayer, Rng};
use masa::{
    Coefficients, Context, Dictionary, GradMode, Grads, Layer, LayerOptions, Projection, ProjectionKind,
    Reserve, Status, WeightPolicy, Workspace,
};

const TOL: f64 = 2e-5;

/// (d_in, d_out) of the four projections for d_model 12, 3 heads, 1 kv head.
const D: usize = 12;
const DIMS: [(usize, usize); 4] = [(D, D), (D, 4), (D, 4), (D, D)];

/// A B in f64 added to w (d_in x d_out).
fn add_ab(w: &mut [f64], a: &[f32], b: &[f32], d_in: usize, r: usize, d_out: usize) {
    for i in 0..d_in {
        for j in 0..d_out {
            let mut acc = 0.0;
            for k in 0..r {
                acc += a[i * r + k] as f64 * b[k * d_out + j] as f64;
            }
            w[i * d_out + j] += acc;
        }
    }
}

/// Q MASA + A B (rank 2), K MASA, V only A B (rank 3), O dense (owned) +
/// A B (owned, rank 4).
fn run(policy: WeightPolicy, batch: usize, seq: usize) {
    let ctx = Context::with_threads(2).unwrap();
    let mut rng = Rng::new(41);
    let mut dicts = Vec::new();
    let mut tables = Vec::new();
    for (p, &(di, dout)) in DIMS.iter().enumerate().take(2) {
        let mut d = Dictionary::new(&ctx, 2, di, dout).unwrap();
        d.init_uniform(0.0, 5 + p as u64).unwrap();
        let mut t = Coefficients::new(&ctx, 2, 2).unwrap();
        t.init_cyclic().unwrap();
        t.add_uniform(0.5, 9 + p as u64).unwrap();
        dicts.push(d);
        tables.push(t);
    }
    let ranks = [2usize, 0, 3, 4];
    let mut qa = rng.vec(D * 2);
    let mut qb = rng.vec(2 * D);
    let mut va = rng.vec(D * 3);
    let mut vb = rng.vec(3 * 4);
    let wo = rng.vec(D * D);
    let (oa, ob) = (rng.vec(D * 4), rng.vec(4 * D));

    let opts = LayerOptions::new(D, 3).n_kv_heads(1).causal(true).rope(true);
    let mut layer = Layer::new(&ctx, &opts).unwrap();
    layer.set_masa(Projection::Q, &dicts[0], &tables[0], 1).unwrap();
    layer.set_masa(Projection::K, &dicts[1], &tables[1], 0).unwrap();
    layer.set_lowrank(Projection::Q, 2, &mut qa, &mut qb).unwrap();
    layer.set_lowrank(Projection::V, 3, &mut va, &mut vb).unwrap();
    assert_eq!(layer.projection_kind(Projection::V), ProjectionKind::Unset);
    layer.set_dense_owned(Projection::O).unwrap();
    layer.weight_mut(Projection::O).unwrap().copy_from_slice(&wo);
    layer.set_lowrank_owned(Projection::O, 4).unwrap();
    {
        let (a, b) = layer.lowrank_mut(Projection::O).unwrap();
        assert!(a.iter().chain(b.iter()).all(|&v| v == 0.0));
        a.copy_from_slice(&oa);
        b.copy_from_slice(&ob);
    }
    layer.set_weight_policy(policy).unwrap(); // composes Q's cache with its term
    for p in Projection::ALL {
        assert_eq!(layer.lowrank_rank(p), ranks[p.index()]);
    }

    // The reference's weights.
    let mut w: [Vec<f64>; 4] = core::array::from_fn(|i| vec![0.0; DIMS[i].0 * DIMS[i].1]);
    for p in 0..2 {
        w[p] = compose(
            dicts[p].data(),
            tables[p].row(if p == 0 { 1 } else { 0 }).unwrap(),
            DIMS[p].0 * DIMS[p].1,
        );
    }
    w[3] = to_f64(&wo);
    for p in Projection::ALL {
        let i = p.index();
        if let Some((a, b)) = layer.lowrank(p) {
            add_ab(&mut w[i], a, b, DIMS[i].0, ranks[i], DIMS[i].1);
        }
    }
    let reference = RefLayer {
        d_model: D,
        n_heads: 3,
        n_kv: 1,
        hd: 4,
        causal: true,
        rope: true,
        theta: 10000.0,
        scale: 0.5,
        w,
        b: [None, None, None, None],
    };

    let n = batch * seq * D;
    let x = rng.vec(n);
    let dy = rng.vec(n);
    let (x64, dy64) = (to_f64(&x), to_f64(&dy));
    let mut ws = Workspace::new();
    let mut reserve = Reserve::new();
    let mut y = vec![0.0; n];
    layer.forward(batch, seq, 0, &x, &mut y, &mut ws, Some(&mut reserve)).unwrap();
    assert_close("y", &y, &reference.forward(batch, seq, 0, &x64), TOL);
    let g = reference.backward(batch, seq, 0, &x64, &dy64);

    for (mode, fill) in [(GradMode::Set, 7.0f32), (GradMode::Add, 1.0f32)] {
        let mut dx = vec![fill; n];
        let mut da: Vec<Vec<f32>> = (0..4).map(|i| vec![fill; DIMS[i].0 * ranks[i]]).collect();
        let mut db: Vec<Vec<f32>> = (0..4).map(|i| vec![fill; ranks[i] * DIMS[i].1]).collect();
        {
            let mut grads = Grads::new(mode);
            for (p, (a, b)) in Projection::ALL.into_iter().zip(da.iter_mut().zip(db.iter_mut())) {
                if ranks[p.index()] > 0 {
                    grads = grads.lowrank_a(p, a).lowrank_b(p, b);
                }
            }
            layer.backward(batch, seq, 0, &x, &dy, Some(&mut dx), &mut grads, &mut ws, &reserve).unwrap();
        }
        assert_close(&format!("dx ({mode:?})"), &dx, &g.dx, TOL);
        let off = if mode == GradMode::Add { fill as f64 } else { 0.0 };
        for p in Projection::ALL {
            let i = p.index();
            let (di, dout, r) = (DIMS[i].0, DIMS[i].1, ranks[i]);
            let Some((a, b)) = layer.lowrank(p) else { continue };
            // dA = dW B^T, dB = A^T dW
            let mut want_a = vec![off; di * r];
            let mut want_b = vec![off; r * dout];
            for row in 0..di {
                for k in 0..r {
                    for col in 0..dout {
                        want_a[row * r + k] += g.dw[i][row * dout + col] * b[k * dout + col] as f64;
                        want_b[k * dout + col] += a[row * r + k] as f64 * g.dw[i][row * dout + col];
                    }
                }
            }
            assert_close(&format!("d_lowrank_a[{p}] ({mode:?})"), &da[i], &want_a, TOL);
            assert_close(&format!("d_lowrank_b[{p}] ({mode:?})"), &db[i], &want_b, TOL);
        }
    }

    // Removing V's term leaves V unset.
    layer.remove_lowrank(Projection::V).unwrap();
    assert!(layer.lowrank(Projection::V).is_none());
    let err = layer.forward(batch, seq, 0, &x, &mut y, &mut ws, None).unwrap_err();
    assert_eq!(err.status(), Status::NotReady);
}

#[test]
fn lowrank_matches_reference_on_the_fly_thin() {
    run(WeightPolicy::OnTheFly, 1, 3);
}

#[test]
fn lowrank_matches_reference_on_the_fly_folded() {
    run(WeightPolicy::OnTheFly, 2, 9); // 18 rows: A B added to the composed W
}

#[test]
fn lowrank_matches_reference_cached() {
    run(WeightPolicy::Cached, 2, 4);
}

#[test]
fn lowrank_errors() {
    let ctx = Context::with_threads(1).unwrap();
    let mut a = vec![0.0f32; 64];
    let mut b = vec![0.0f32; 64];
    let mut layer = Layer::new(&ctx, &LayerOptions::new(8, 2)).unwrap();
    let e = layer.set_lowrank_owned(Projection::Q, 0).unwrap_err();
    assert_eq!(e.status(), Status::BadShape);
    let e = layer.set_lowrank_owned(Projection::Q, 9).unwrap_err();
    assert_eq!(e.status(), Status::BadShape);
    // lengths must match rank exactly
    let e = layer.set_lowrank(Projection::Q, 2, &mut a[..15], &mut b[..16]).unwrap_err();
    assert_eq!(e.status(), Status::BadShape);
    assert_eq!(layer.lowrank_rank(Projection::Q), 0);
    drop(layer);

    let mut layer = Layer::new(&ctx, &LayerOptions::new(8, 2)).unwrap();
    for p in Projection::ALL {
        layer.set_lowrank_owned(p, 1).unwrap();
    }
    layer.remove_lowrank(Projection::K).unwrap();
    layer.set_dense_owned(Projection::K).unwrap();
    let x = vec![0.5f32; 16];
    let mut y = vec![0.0f32; 16];
    let mut ws = Workspace::new();
    let mut reserve = Reserve::new();
    layer.forward(1, 2, 0, &x, &mut y, &mut ws, Some(&mut reserve)).unwrap();
    // gradients of a term K does not have, and a dense gradient for Q
    let mut buf = vec![0.0f32; 8];
    let e = layer
        .backward(
            1,
            2,
            0,
            &x,
            &x,
            None,
            &mut Grads::new(GradMode::Set).lowrank_a(Projection::K, &mut buf),
            &mut ws,
            &reserve,
        )
        .unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    let mut w = vec![0.0f32; 64];
    let e = layer
        .backward(
            1,
            2,
            0,
            &x,
            &x,
            None,
            &mut Grads::new(GradMode::Set).weight(Projection::Q, &mut w),
            &mut ws,
            &reserve,
        )
        .unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    let mut short = vec![0.0f32; 7];
    let e = layer
        .backward(
            1,
            2,
            0,
            &x,
            &x,
            None,
            &mut Grads::new(GradMode::Set).lowrank_a(Projection::Q, &mut short),
            &mut ws,
            &reserve,
        )
        .unwrap_err();
    assert_eq!(e.status(), Status::BadShape);
    layer
        .backward(
            1,
            2,
            0,
            &x,
            &x,
            None,
            &mut Grads::new(GradMode::Set).lowrank_a(Projection::Q, &mut buf),
            &mut ws,
            &reserve,
        )
        .unwrap();
}
