//! Forward and backward of libmasa against the f64 reference in
//! tests/common, on several shapes (plain, causal, GQA, MQA, RoPE with a
//! position offset, biases, dense and MASA projections), both gradient modes,
//! a finite-difference check of coefficient gradients, and concurrent
//! forward calls on one layer.

mod common;

use common::{assert_close, compose, to_f64, RefLayer, Rng};
use masa::{
    Coefficients, Context, Dictionary, GradMode, Grads, Layer, LayerOptions, Projection, ProjectionKind,
    Reserve, WeightPolicy, Workspace,
};

const TOL: f64 = 2e-5;

#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    batch: usize,
    seq: usize,
    pos: usize,
    d_model: usize,
    n_heads: usize,
    n_kv: usize,     // 0 = n_heads
    head_dim: usize, // 0 = d_model / n_heads
    causal: bool,
    rope: bool,
    theta: f32,
    scale: f32, // 0 = 1/sqrt(head_dim)
    masa: [bool; 4],
    bias: [bool; 4],
    owned_dense: bool,
    n_layers: usize,
    n_atoms: usize,
    layer_index: usize,
    seed: u64,
}

const BASE: Case = Case {
    name: "plain",
    batch: 2,
    seq: 5,
    pos: 0,
    d_model: 16,
    n_heads: 4,
    n_kv: 0,
    head_dim: 0,
    causal: false,
    rope: false,
    theta: 10000.0,
    scale: 0.0,
    masa: [true; 4],
    bias: [false; 4],
    owned_dense: false,
    n_layers: 3,
    n_atoms: 2,
    layer_index: 1,
    seed: 1,
};

fn cases() -> Vec<Case> {
    vec![
        BASE,
        Case { name: "causal", causal: true, batch: 3, seq: 7, seed: 2, ..BASE },
        Case {
            name: "causal+gqa+rope+offset, dense O with biases",
            batch: 2,
            seq: 6,
            pos: 3,
            d_model: 24,
            n_heads: 4,
            n_kv: 2,
            causal: true,
            rope: true,
            masa: [true, true, true, false],
            bias: [true, false, true, true],
            n_layers: 4,
            n_atoms: 3,
            layer_index: 2,
            seed: 3,
            ..BASE
        },
        Case {
            name: "mqa+rope (theta 500), head_dim != d_model/n_heads, owned dense K",
            batch: 1,
            seq: 9,
            pos: 11,
            d_model: 12,
            n_heads: 4,
            n_kv: 1,
            head_dim: 6,
            rope: true,
            theta: 500.0,
            scale: 0.3,
            masa: [true, false, true, true],
            bias: [true; 4],
            owned_dense: true,
            n_layers: 2,
            n_atoms: 2,
            layer_index: 0,
            seed: 4,
            ..BASE
        },
        Case {
            name: "all dense, causal+rope+gqa",
            batch: 2,
            seq: 4,
            pos: 1,
            d_model: 16,
            n_heads: 4,
            n_kv: 2,
            causal: true,
            rope: true,
            masa: [false; 4],
            bias: [true, true, false, false],
            seed: 5,
            ..BASE
        },
        Case {
            name: "one token, causal",
            batch: 2,
            seq: 1,
            causal: true,
            rope: true,
            pos: 7,
            seed: 6,
            ..BASE
        },
    ]
}

fn options(c: &Case) -> LayerOptions {
    LayerOptions::new(c.d_model, c.n_heads)
        .n_kv_heads(c.n_kv)
        .head_dim(c.head_dim)
        .causal(c.causal)
        .rope(c.rope)
        .rope_theta(c.theta)
        .softmax_scale(c.scale)
}

fn run_case(c: &Case) {
    let ctx = Context::with_threads(2).unwrap();
    let hd = if c.head_dim == 0 { c.d_model / c.n_heads } else { c.head_dim };
    let n_kv = if c.n_kv == 0 { c.n_heads } else { c.n_kv };
    let dims = [
        (c.d_model, c.n_heads * hd),
        (c.d_model, n_kv * hd),
        (c.d_model, n_kv * hd),
        (c.n_heads * hd, c.d_model),
    ];
    let mut rng = Rng::new(c.seed);

    // Parameters: MASA dictionaries and tables (library-owned), dense
    // weights and biases in caller buffers.
    let mut dicts = Vec::new();
    let mut tables = Vec::new();
    for p in Projection::ALL {
        let (di, dout) = dims[p.index()];
        let mut d = Dictionary::new(&ctx, c.n_atoms, di, dout).unwrap();
        d.init_uniform(0.0, c.seed * 10 + p.index() as u64).unwrap();
        let mut t = Coefficients::new(&ctx, c.n_layers, c.n_atoms).unwrap();
        t.init_cyclic().unwrap();
        t.add_uniform(0.5, c.seed * 100 + p.index() as u64).unwrap();
        dicts.push(d);
        tables.push(t);
    }
    let mut dense: Vec<Vec<f32>> = dims.iter().map(|&(di, dout)| rng.vec(di * dout)).collect();
    for w in &mut dense {
        w.iter_mut().for_each(|v| *v *= 0.4);
    }
    let mut biases: Vec<Vec<f32>> = dims.iter().map(|&(_, dout)| rng.vec(dout)).collect();

    // The reference's weights.
    let w_ref: [Vec<f64>; 4] = core::array::from_fn(|i| {
        if c.masa[i] {
            let (di, dout) = dims[i];
            compose(dicts[i].data(), tables[i].row(c.layer_index).unwrap(), di * dout)
        } else {
            to_f64(&dense[i])
        }
    });
    let b_ref: [Option<Vec<f64>>; 4] = core::array::from_fn(|i| c.bias[i].then(|| to_f64(&biases[i])));
    // compose() agrees with the reference composition.
    for p in Projection::ALL {
        let (di, dout) = dims[p.index()];
        let mut w = vec![0.0; di * dout];
        dicts[p.index()].compose(&tables[p.index()], c.layer_index, &mut w).unwrap();
        let want = compose(dicts[p.index()].data(), tables[p.index()].row(c.layer_index).unwrap(), di * dout);
        assert_close(&format!("{}: compose {p}", c.name), &w, &want, 1e-6);
    }
    let reference = RefLayer {
        d_model: c.d_model,
        n_heads: c.n_heads,
        n_kv,
        hd,
        causal: c.causal,
        rope: c.rope,
        theta: c.theta as f64,
        scale: if c.scale == 0.0 { 1.0 / (hd as f64).sqrt() } else { c.scale as f64 },
        w: w_ref,
        b: b_ref,
    };

    // The layer.
    let mut layer = Layer::new(&ctx, &options(c)).unwrap();
    for (p, (w, b)) in Projection::ALL.into_iter().zip(dense.iter_mut().zip(biases.iter_mut())) {
        assert_eq!(layer.projection_shape(p), dims[p.index()]);
        if c.masa[p.index()] {
            layer.set_masa(p, &dicts[p.index()], &tables[p.index()], c.layer_index).unwrap();
            assert!(matches!(layer.projection_kind(p), ProjectionKind::Masa { .. }));
            assert!(layer.weight(p).is_none());
        } else if c.owned_dense {
            layer.set_dense_owned(p).unwrap();
            assert!(layer.weight(p).unwrap().iter().all(|&v| v == 0.0));
            layer.weight_mut(p).unwrap().copy_from_slice(w);
        } else {
            layer.set_dense(p, w).unwrap();
            assert_eq!(layer.projection_kind(p), ProjectionKind::Dense);
        }
        if c.bias[p.index()] {
            if c.owned_dense {
                layer.set_bias_owned(p).unwrap();
                layer.bias_mut(p).unwrap().copy_from_slice(b);
            } else {
                layer.set_bias(p, b).unwrap();
            }
            assert!(layer.has_bias(p));
        }
    }

    let (batch, seq) = (c.batch, c.seq);
    let n = batch * seq * c.d_model;
    let x = rng.vec(n);
    let dy = rng.vec(n);
    let x64 = to_f64(&x);

    // Forward, training and inference.
    let mut ws = Workspace::new();
    let mut reserve = Reserve::new();
    let mut y = vec![0.0; n];
    layer.forward(batch, seq, c.pos, &x, &mut y, &mut ws, Some(&mut reserve)).unwrap();
    assert!(reserve.is_filled());
    let y_ref = reference.forward(batch, seq, c.pos, &x64);
    assert_close(&format!("{}: y", c.name), &y, &y_ref, TOL);
    let mut y_inf = vec![0.0; n];
    layer.forward(batch, seq, c.pos, &x, &mut y_inf, &mut ws, None).unwrap();
    assert_close(&format!("{}: y (inference)", c.name), &y_inf, &y_ref, TOL);

    // Backward, SET then ADD, into buffers pre-filled with junk.
    let g = reference.backward(batch, seq, c.pos, &x64, &to_f64(&dy));
    let l = c.layer_index;
    for (mode, fill) in [(GradMode::Set, 7.0f32), (GradMode::Add, 1.0f32)] {
        let mut dx = vec![fill; n];
        let mut d_atoms: Vec<Vec<f32>> = dicts.iter().map(|d| vec![fill; d.len()]).collect();
        let mut d_coef: Vec<Vec<f32>> = tables.iter().map(|t| vec![fill; t.len()]).collect();
        let mut d_w: Vec<Vec<f32>> = dims.iter().map(|&(di, dout)| vec![fill; di * dout]).collect();
        let mut d_b: Vec<Vec<f32>> = dims.iter().map(|&(_, dout)| vec![fill; dout]).collect();
        {
            let mut grads = Grads::new(mode);
            let bufs = d_atoms.iter_mut().zip(d_coef.iter_mut()).zip(d_w.iter_mut().zip(d_b.iter_mut()));
            for (p, ((da, dc), (dw, db))) in Projection::ALL.into_iter().zip(bufs) {
                let i = p.index();
                if c.masa[i] {
                    grads = grads.atoms(p, da).coefficients(p, dc);
                } else {
                    grads = grads.weight(p, dw);
                }
                if c.bias[i] {
                    grads = grads.bias(p, db);
                }
            }
            layer.backward(batch, seq, c.pos, &x, &dy, Some(&mut dx), &mut grads, &mut ws, &reserve).unwrap();
        }
        let name = format!("{} ({mode:?})", c.name);
        // dx is always overwritten.
        assert_close(&format!("{name}: dx"), &dx, &g.dx, TOL);
        let off = if mode == GradMode::Add { fill as f64 } else { 0.0 };
        let shift = |v: &[f64]| v.iter().map(|x| x + off).collect::<Vec<f64>>();
        for p in Projection::ALL {
            let i = p.index();
            let (di, dout) = dims[i];
            if c.masa[i] {
                // dD_s = c[l, s] dW ; dc[l, s] = <D_s, dW>
                let row = tables[i].row(l).unwrap();
                let mut want_atoms = vec![0.0; dicts[i].len()];
                let mut want_coef = vec![fill as f64; tables[i].len()];
                for s in 0..c.n_atoms {
                    let atom = dicts[i].atom(s).unwrap();
                    let mut dot = 0.0;
                    for e in 0..di * dout {
                        want_atoms[s * di * dout + e] = row[s] as f64 * g.dw[i][e];
                        dot += atom[e] as f64 * g.dw[i][e];
                    }
                    want_coef[l * c.n_atoms + s] = dot + off;
                }
                assert_close(&format!("{name}: d_atoms[{p}]"), &d_atoms[i], &shift(&want_atoms), TOL);
                assert_close(&format!("{name}: d_coefficients[{p}]"), &d_coef[i], &want_coef, TOL);
                // Rows of other layers are untouched, exactly.
                for (r, v) in d_coef[i].iter().enumerate() {
                    if r / c.n_atoms != l {
                        assert_eq!(*v, fill, "{name}: d_coefficients[{p}][{r}] was modified");
                    }
                }
            } else {
                assert_close(&format!("{name}: d_weight[{p}]"), &d_w[i], &shift(&g.dw[i]), TOL);
            }
            if c.bias[i] {
                assert_close(&format!("{name}: d_bias[{p}]"), &d_b[i], &shift(&g.db[i]), TOL);
            }
            // Buffers that were not given are untouched.
            if !c.masa[i] {
                assert!(d_atoms[i].iter().all(|&v| v == fill));
            }
            if c.masa[i] {
                assert!(d_w[i].iter().all(|&v| v == fill));
            }
            if !c.bias[i] {
                assert!(d_b[i].iter().all(|&v| v == fill));
            }
        }
    }

    // Backward without parameter gradients or dx still succeeds.
    layer.backward(batch, seq, c.pos, &x, &dy, None, &mut Grads::none(), &mut ws, &reserve).unwrap();
}

#[test]
fn forward_backward_match_reference() {
    for c in cases() {
        run_case(&c);
    }
}

/// Layers sharing dictionaries: with GradMode::Add into one buffer, the atom
/// gradient is the sum of the layers' contributions (here checked against
/// the sum of separate SET calls).
#[test]
fn shared_atoms_accumulate_over_layers() {
    let ctx = Context::with_threads(1).unwrap();
    let (d, h, n_layers, s) = (16, 2, 3, 2);
    let opts = LayerOptions::new(d, h).causal(true).rope(true);
    let mut dicts = Vec::new();
    let mut tables = Vec::new();
    for p in Projection::ALL {
        let mut dict = Dictionary::new(&ctx, s, d, d).unwrap();
        dict.init_uniform(0.0, 40 + p.index() as u64).unwrap();
        let mut t = Coefficients::new(&ctx, n_layers, s).unwrap();
        t.init_blocks().unwrap();
        t.add_uniform(0.2, 50 + p.index() as u64).unwrap();
        dicts.push(dict);
        tables.push(t);
    }
    let layers: Vec<Layer> = (0..n_layers)
        .map(|l| {
            let mut layer = Layer::new(&ctx, &opts).unwrap();
            for p in Projection::ALL {
                layer.set_masa(p, &dicts[p.index()], &tables[p.index()], l).unwrap();
            }
            layer
        })
        .collect();
    let (batch, seq) = (1, 6);
    let mut rng = Rng::new(9);
    let x = rng.vec(batch * seq * d);
    let dy = rng.vec(batch * seq * d);
    let mut ws = Workspace::new();
    let mut y = vec![0.0; x.len()];
    let reserves: Vec<Reserve> = layers
        .iter()
        .map(|layer| {
            let mut r = Reserve::new();
            layer.forward(batch, seq, 0, &x, &mut y, &mut ws, Some(&mut r)).unwrap();
            r
        })
        .collect();

    let mut acc = vec![0.0f32; dicts[1].len()];
    let mut acc_c = vec![0.0f32; tables[1].len()];
    let mut sum = vec![0.0f64; dicts[1].len()];
    let mut sum_c = vec![0.0f64; tables[1].len()];
    for (layer, r) in layers.iter().zip(&reserves) {
        let mut g =
            Grads::new(GradMode::Add).atoms(Projection::K, &mut acc).coefficients(Projection::K, &mut acc_c);
        layer.backward(batch, seq, 0, &x, &dy, None, &mut g, &mut ws, r).unwrap();
        let mut one = vec![f32::NAN; dicts[1].len()];
        let mut one_c = vec![0.0f32; tables[1].len()];
        let mut g =
            Grads::new(GradMode::Set).atoms(Projection::K, &mut one).coefficients(Projection::K, &mut one_c);
        layer.backward(batch, seq, 0, &x, &dy, None, &mut g, &mut ws, r).unwrap();
        for (a, b) in sum.iter_mut().zip(&one) {
            *a += *b as f64;
        }
        for (a, b) in sum_c.iter_mut().zip(&one_c) {
            *a += *b as f64;
        }
    }
    assert_close("accumulated d_atoms[K]", &acc, &sum, 1e-5);
    assert_close("accumulated d_coefficients[K]", &acc_c, &sum_c, 1e-5);
}

/// dL/dc[l, s] from backward against central differences of the forward,
/// L = sum(y * r), for coefficients of several projections. The coefficient
/// tables live in caller buffers (Coefficients::wrap), so each evaluation
/// drops the layer, changes the buffer and builds the layer again: the
/// pattern of an optimizer step.
#[test]
fn coefficient_gradient_matches_finite_differences() {
    let ctx = Context::with_threads(1).unwrap();
    let (d, h, kv, n_layers, s) = (16, 4, 2, 3, 3);
    let (batch, seq, pos, l) = (2, 5, 2, 1);
    let opts = LayerOptions::new(d, h).n_kv_heads(kv).causal(true).rope(true);
    let hd = d / h;
    let dims = [(d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d)];
    let mut dicts = Vec::new();
    for p in Projection::ALL {
        let (di, dout) = dims[p.index()];
        let mut dict = Dictionary::new(&ctx, s, di, dout).unwrap();
        dict.init_uniform(0.6, 70 + p.index() as u64).unwrap();
        dicts.push(dict);
    }
    let mut rng = Rng::new(77);
    let mut coef: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(n_layers * s)).collect();
    let x = rng.vec(batch * seq * d);
    let r = rng.vec(batch * seq * d);

    // Loss and (optionally) all coefficient gradients.
    let eval = |coef: &mut [Vec<f32>], want_grad: bool| -> (f64, Vec<Vec<f32>>) {
        let mut it = coef.iter_mut();
        let tables: Vec<Coefficients> =
            (0..4).map(|_| Coefficients::wrap(&ctx, it.next().unwrap(), n_layers, s).unwrap()).collect();
        let mut layer = Layer::new(&ctx, &opts).unwrap();
        for p in Projection::ALL {
            layer.set_masa(p, &dicts[p.index()], &tables[p.index()], l).unwrap();
        }
        let mut ws = Workspace::new();
        let mut reserve = Reserve::new();
        let mut y = vec![0.0; x.len()];
        layer.forward(batch, seq, pos, &x, &mut y, &mut ws, Some(&mut reserve)).unwrap();
        let loss = y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mut dc: Vec<Vec<f32>> = (0..4).map(|_| vec![0.0; n_layers * s]).collect();
        if want_grad {
            let mut g = Grads::new(GradMode::Set);
            for (p, buf) in Projection::ALL.into_iter().zip(dc.iter_mut()) {
                g = g.coefficients(p, buf);
            }
            layer.backward(batch, seq, pos, &x, &r, None, &mut g, &mut ws, &reserve).unwrap();
        }
        (loss, dc)
    };

    let (_, grad) = eval(&mut coef, true);
    for (p, sidx) in [(Projection::Q, 1), (Projection::K, 0), (Projection::V, 2), (Projection::O, 1)] {
        let i = p.index();
        let e = l * s + sidx;
        let c0 = coef[i][e];
        let hstep = 1e-2f32;
        coef[i][e] = c0 + hstep;
        let up = coef[i][e] as f64;
        let (lp, _) = eval(&mut coef, false);
        coef[i][e] = c0 - hstep;
        let down = coef[i][e] as f64;
        let (lm, _) = eval(&mut coef, false);
        coef[i][e] = c0;
        let fd = (lp - lm) / (up - down);
        let an = grad[i][e] as f64;
        let err = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-2);
        assert!(
            err < 5e-3,
            "dL/dc[{p}][{l},{sidx}]: backward {an:.6e}, finite differences {fd:.6e} (rel. error {err:.2e})"
        );
    }
}

/// Layer is Sync: forward on one layer from two threads at once, each with
/// its own workspace, gives the same result as one thread.
#[test]
fn concurrent_forward_on_one_layer() {
    let ctx = Context::with_threads(2).unwrap();
    let d = 32;
    let opts = LayerOptions::new(d, 4).causal(true).rope(true);
    let mut dict = Dictionary::new(&ctx, 2, d, d).unwrap();
    dict.init_uniform(0.0, 5).unwrap();
    let mut table = Coefficients::new(&ctx, 1, 2).unwrap();
    table.add_uniform(1.0, 6).unwrap();
    let mut layer = Layer::new(&ctx, &opts).unwrap();
    for p in Projection::ALL {
        layer.set_masa(p, &dict, &table, 0).unwrap();
    }
    let (batch, seq) = (2, 16);
    let x = Rng::new(8).vec(batch * seq * d);
    let mut want = vec![0.0; x.len()];
    layer.forward(batch, seq, 0, &x, &mut want, &mut Workspace::new(), None).unwrap();
    let want = to_f64(&want);
    std::thread::scope(|sc| {
        for _ in 0..3 {
            sc.spawn(|| {
                let mut ws = Workspace::new();
                let mut y = vec![0.0; x.len()];
                for _ in 0..20 {
                    layer.forward(batch, seq, 0, &x, &mut y, &mut ws, None).unwrap();
                    assert_close("concurrent forward", &y, &want, 1e-6);
                }
            });
        }
    });
}

/// Wrapped dictionaries are zero-copy: init_uniform writes the caller's
/// buffer, and the same seed gives the same atoms as an owned dictionary.
#[test]
fn wrap_is_zero_copy_and_init_is_deterministic() {
    let ctx = Context::new().unwrap();
    let mut buf = vec![0.0f32; 2 * 3 * 4];
    {
        let mut d = Dictionary::wrap(&ctx, &mut buf, 2, 3, 4).unwrap();
        assert_eq!(d.shape(), (2, 3, 4));
        d.init_uniform(0.0, 42).unwrap();
        d.data_mut()[0] = 123.0;
    }
    assert_eq!(buf[0], 123.0);
    let bound = 1.0 / 3f32.sqrt();
    assert!(buf[1..].iter().all(|v| v.abs() <= bound && *v != 0.0));
    let mut owned = Dictionary::new(&ctx, 2, 3, 4).unwrap();
    assert!(owned.data().iter().all(|&v| v == 0.0));
    owned.init_uniform(0.0, 42).unwrap();
    assert_eq!(&owned.data()[1..], &buf[1..]);

    let mut t = Coefficients::new(&ctx, 5, 2).unwrap();
    t.init_cyclic().unwrap();
    assert_eq!(t.data(), &[1., 0., 0., 1., 1., 0., 0., 1., 1., 0.]);
    t.init_blocks().unwrap();
    // floor(l * 2 / 5): 0,0,0,1,1
    assert_eq!(t.data(), &[1., 0., 1., 0., 1., 0., 0., 1., 0., 1.]);
    let mut cbuf = vec![0.0f32; 6];
    {
        let mut w = Coefficients::wrap(&ctx, &mut cbuf, 3, 2).unwrap();
        w.init_cyclic().unwrap();
    }
    assert_eq!(cbuf, [1., 0., 0., 1., 1., 0.]);
}

/// Both weight policies give the reference's output and gradients.
#[test]
fn weight_policies_match_reference() {
    let ctx = Context::with_threads(2).unwrap();
    let d = 16;
    let opts = LayerOptions::new(d, 4).causal(true).rope(true);
    let mut dict = Dictionary::new(&ctx, 3, d, d).unwrap();
    dict.init_uniform(0.0, 11).unwrap();
    let mut table = Coefficients::new(&ctx, 2, 3).unwrap();
    table.add_uniform(1.0, 12).unwrap();
    let mut layer = Layer::new(&ctx, &opts).unwrap();
    for p in Projection::ALL {
        layer.set_masa(p, &dict, &table, 1).unwrap();
    }
    let (batch, seq) = (2, 5);
    let mut rng = Rng::new(13);
    let x = rng.vec(batch * seq * d);
    let dy = rng.vec(batch * seq * d);
    // W_1 in double, the same for all four projections
    let w = compose(dict.data(), &table.data()[3..6], d * d);
    let hd = d / 4;
    let rl = RefLayer {
        d_model: d,
        n_heads: 4,
        n_kv: 4,
        hd,
        causal: true,
        rope: true,
        theta: 10000.0,
        scale: 1.0 / (hd as f64).sqrt(),
        w: core::array::from_fn(|_| w.clone()),
        b: core::array::from_fn(|_| None),
    };
    let want_y = rl.forward(batch, seq, 0, &to_f64(&x));
    let want = rl.backward(batch, seq, 0, &to_f64(&x), &to_f64(&dy));
    // dc[1, s] = <D_s, dW_Q>
    let want_dc: Vec<f64> = (0..3)
        .map(|s| {
            dict.data()[s * d * d..(s + 1) * d * d].iter().zip(&want.dw[0]).map(|(&a, b)| a as f64 * b).sum()
        })
        .collect();
    assert_eq!(layer.weight_policy(), WeightPolicy::OnTheFly);
    for policy in [WeightPolicy::Cached, WeightPolicy::OnTheFly] {
        layer.set_weight_policy(policy).unwrap();
        assert_eq!(layer.weight_policy(), policy);
        layer.refresh_weights().unwrap();
        let mut y = vec![0.0; x.len()];
        let mut dx = vec![0.0; x.len()];
        let mut ws = Workspace::new();
        let mut rs = Reserve::new();
        layer.forward(batch, seq, 0, &x, &mut y, &mut ws, Some(&mut rs)).unwrap();
        assert_close("policy y", &y, &want_y, 1e-4);
        let mut dc = vec![0.0f32; 6];
        let mut grads = Grads::new(GradMode::Set).coefficients(Projection::Q, &mut dc);
        layer.backward(batch, seq, 0, &x, &dy, Some(&mut dx), &mut grads, &mut ws, &rs).unwrap();
        assert_close("policy dx", &dx, &want.dx, 1e-4);
        assert_close("policy dc", &dc[3..6], &want_dc, 1e-4);
    }
}
