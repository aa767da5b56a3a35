//! A MASA attention stack: L layers (default 12) whose Q, K, V and O
//! projections each share S atoms (default 4), with a residual stream
//! `h_{l+1} = h_l + attn_l(h_l)`. Runs forward and backward for a few SGD
//! steps on a toy regression loss and prints parameter counts, output norm,
//! loss, gradient norms and timings.
//!
//!     cargo run --release --example stack
//!     cargo run --release --example stack -- --layers 24 --atoms 8 --d-model 512 --seq 256
//!
//! Options: --layers --atoms --d-model --heads --kv-heads --batch --seq
//! --steps --threads --lr.

use std::error::Error;
use std::time::Instant;

use masa::{
    Coefficients, Context, Dictionary, GradMode, Grads, Layer, LayerOptions, Projection, Reserve, Workspace,
};

struct Config {
    layers: usize,
    atoms: usize,
    d_model: usize,
    heads: usize,
    kv_heads: usize,
    batch: usize,
    seq: usize,
    steps: usize,
    threads: usize,
    lr: f32,
}

fn parse_args() -> Result<Config, Box<dyn Error>> {
    let mut c = Config {
        layers: 12,
        atoms: 4,
        d_model: 256,
        heads: 8,
        kv_heads: 8,
        batch: 2,
        seq: 128,
        steps: 3,
        threads: 0,
        lr: 0.5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(key) = args.next() {
        let value = args.next().ok_or_else(|| format!("{key} needs a value"))?;
        match key.as_str() {
            "--layers" => c.layers = value.parse()?,
            "--atoms" => c.atoms = value.parse()?,
            "--d-model" => c.d_model = value.parse()?,
            "--heads" => c.heads = value.parse()?,
            "--kv-heads" => c.kv_heads = value.parse()?,
            "--batch" => c.batch = value.parse()?,
            "--seq" => c.seq = value.parse()?,
            "--steps" => c.steps = value.parse()?,
            "--threads" => c.threads = value.parse()?,
            "--lr" => c.lr = value.parse()?,
            _ => return Err(format!("unknown option {key}").into()),
        }
    }
    Ok(c)
}

/// Deterministic values in [-1, 1).
fn random_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

struct StepResult {
    loss: f64,
    out_norm: f64,
    forward_s: f64,
    backward_s: f64,
    d_atoms: Vec<Vec<f32>>,
    d_coef: Vec<Vec<f32>>,
}

/// One forward and backward pass of the whole stack. The layers borrow the
/// dictionaries and tables, so they live only inside this function: the
/// caller may then update the parameters.
fn step(
    ctx: &Context,
    c: &Config,
    opts: &LayerOptions,
    dicts: &[Dictionary],
    tables: &[Coefficients],
    x: &[f32],
    target: &[f32],
) -> masa::Result<StepResult> {
    let layers = (0..c.layers)
        .map(|l| {
            let mut layer = Layer::new(ctx, opts)?;
            for p in Projection::ALL {
                layer.set_masa(p, &dicts[p.index()], &tables[p.index()], l)?;
            }
            Ok(layer)
        })
        .collect::<masa::Result<Vec<Layer>>>()?;

    let n = x.len();
    let mut ws = Workspace::new();
    let mut reserves: Vec<Reserve> = (0..c.layers).map(|_| Reserve::new()).collect();
    // h[l] is the input of layer l; h[L] the output of the stack.
    let mut h: Vec<Vec<f32>> = vec![x.to_vec()];
    let mut attn = vec![0.0f32; n];
    let t0 = Instant::now();
    for (layer, reserve) in layers.iter().zip(reserves.iter_mut()) {
        let input = h.last().unwrap();
        layer.forward(c.batch, c.seq, 0, input, &mut attn, &mut ws, Some(reserve))?;
        let next: Vec<f32> = input.iter().zip(&attn).map(|(a, b)| a + b).collect();
        h.push(next);
    }
    let forward_s = t0.elapsed().as_secs_f64();

    let out = h.last().unwrap();
    let loss = out.iter().zip(target).map(|(&o, &t)| 0.5 * ((o - t) as f64).powi(2)).sum::<f64>() / n as f64;
    let mut dh: Vec<f32> = out.iter().zip(target).map(|(&o, &t)| (o - t) / n as f32).collect();

    let mut d_atoms: Vec<Vec<f32>> = dicts.iter().map(|d| vec![0.0; d.len()]).collect();
    let mut d_coef: Vec<Vec<f32>> = tables.iter().map(|t| vec![0.0; t.len()]).collect();
    let mut dx = vec![0.0f32; n];
    let t1 = Instant::now();
    for l in (0..c.layers).rev() {
        // Every layer adds its part to the shared atom gradients (ADD mode).
        let mut grads = Grads::new(GradMode::Add);
        for (p, (da, dc)) in Projection::ALL.into_iter().zip(d_atoms.iter_mut().zip(d_coef.iter_mut())) {
            grads = grads.atoms(p, da).coefficients(p, dc);
        }
        layers[l].backward(
            c.batch,
            c.seq,
            0,
            &h[l],
            &dh,
            Some(&mut dx),
            &mut grads,
            &mut ws,
            &reserves[l],
        )?;
        // Residual: dL/dh_l = dL/dh_{l+1} + dL/dh_l through the attention.
        dh.iter_mut().zip(&dx).for_each(|(a, b)| *a += b);
    }
    let backward_s = t1.elapsed().as_secs_f64();
    Ok(StepResult { loss, out_norm: norm(out), forward_s, backward_s, d_atoms, d_coef })
}

fn main() -> Result<(), Box<dyn Error>> {
    let c = parse_args()?;
    let ctx = Context::with_threads(c.threads)?;
    let opts = LayerOptions::new(c.d_model, c.heads).n_kv_heads(c.kv_heads).causal(true).rope(true);
    println!(
        "libmasa {} (binding for {}), BLIS kernels: {}, threads: {}",
        masa::version_string(),
        masa::sys::MASA_VERSION_STRING,
        masa::blis_arch(),
        ctx.threads()
    );

    // One dictionary and one coefficient table per projection type.
    let probe = Layer::new(&ctx, &opts)?;
    let shapes: Vec<(usize, usize)> = Projection::ALL.iter().map(|&p| probe.projection_shape(p)).collect();
    drop(probe);
    let mut dicts = Vec::new();
    let mut tables = Vec::new();
    for p in Projection::ALL {
        let (d_in, d_out) = shapes[p.index()];
        let mut dict = Dictionary::new(&ctx, c.atoms, d_in, d_out)?;
        dict.init_uniform(0.0, 1000 + p.index() as u64)?;
        let mut table = Coefficients::new(&ctx, c.layers, c.atoms)?;
        table.init_cyclic()?;
        table.add_uniform(0.05, 2000 + p.index() as u64)?;
        dicts.push(dict);
        tables.push(table);
    }

    let masa_params: usize =
        dicts.iter().map(|d| d.len()).sum::<usize>() + tables.iter().map(|t| t.len()).sum::<usize>();
    let dense_params: usize = shapes.iter().map(|&(i, o)| c.layers * i * o).sum();
    println!(
        "stack: {} layers, d_model {}, {} heads ({} kv), causal + RoPE, S = {} atoms per projection",
        c.layers, c.d_model, c.heads, c.kv_heads, c.atoms
    );
    println!(
        "attention parameters: MASA {} vs dense {} ({:.1}% fewer)",
        masa_params,
        dense_params,
        100.0 * (1.0 - masa_params as f64 / dense_params as f64)
    );

    let n = c.batch * c.seq * c.d_model;
    let x = random_vec(n, 1);
    let target: Vec<f32> = random_vec(n, 2).iter().map(|v| 0.5 * v).collect();
    println!("input: batch {} x seq {} x d_model {}, |x| = {:.4}", c.batch, c.seq, c.d_model, norm(&x));

    // FLOPs of one layer's forward: four projections, scores and weighted
    // sum (full, not halved for the causal mask), and composing 4 weights.
    let hd = shapes[0].1 / c.heads;
    let tokens = (c.batch * c.seq) as f64;
    let proj: f64 = shapes.iter().map(|&(i, o)| 2.0 * tokens * (i * o) as f64).sum();
    let attn = 4.0 * (c.batch * c.heads * c.seq * c.seq * hd) as f64;
    let compose: f64 = shapes.iter().map(|&(i, o)| 2.0 * (c.atoms * i * o) as f64).sum();
    let fwd_flops = c.layers as f64 * (proj + attn + compose);

    for s in 0..c.steps.max(1) {
        let r = step(&ctx, &c, &opts, &dicts, &tables, &x, &target)?;
        let ga: f64 = r.d_atoms.iter().map(|g| norm(g).powi(2)).sum::<f64>().sqrt();
        let gc: f64 = r.d_coef.iter().map(|g| norm(g).powi(2)).sum::<f64>().sqrt();
        println!(
            "step {s}: loss {:.6}  |y| {:.4}  forward {:.1} ms ({:.1} GFLOP/s)  backward {:.1} ms  |dD| {:.3e}  |dc| {:.3e}",
            r.loss,
            r.out_norm,
            r.forward_s * 1e3,
            fwd_flops / r.forward_s / 1e9,
            r.backward_s * 1e3,
            ga,
            gc
        );
        // SGD on atoms and coefficients (no layer borrows them now).
        for (dict, g) in dicts.iter_mut().zip(&r.d_atoms) {
            dict.data_mut().iter_mut().zip(g).for_each(|(w, g)| *w -= c.lr * g);
        }
        for (table, g) in tables.iter_mut().zip(&r.d_coef) {
            table.data_mut().iter_mut().zip(g).for_each(|(w, g)| *w -= c.lr * g);
        }
    }
    let row = tables[0].row(c.layers - 1).unwrap();
    println!("coefficients of Q in layer {}: {:?}", c.layers - 1, row);
    Ok(())
}
