//! An outside crate using the `masa` crate against an installed libmasa
//! (scripts/test-consumers.sh builds it from a scratch directory, with the
//! crate by path and vendored). A causal layer whose projections are MASA
//! (2 atoms shared by 6 layers; this is layer 3) must give the output of the
//! same layer with dense weights composed here by plain loops.

use masa::{Coefficients, Context, Dictionary, Layer, LayerOptions, Projection, Workspace};

const ROW: usize = 3;

fn main() -> Result<(), masa::Error> {
    println!("libmasa {}", masa::version_string());
    let ctx = Context::new()?;
    let opts = LayerOptions::new(64, 4).causal(true);
    let probe = Layer::new(&ctx, &opts)?;
    let mut dicts = Vec::new();
    let mut tables = Vec::new();
    for (i, p) in Projection::ALL.into_iter().enumerate() {
        let (rows, cols) = probe.projection_shape(p);
        let mut dict = Dictionary::new(&ctx, 2, rows, cols)?;
        dict.init_uniform(0.0, 42 + i as u64)?;
        let mut table = Coefficients::new(&ctx, 6, 2)?;
        table.init_cyclic()?;
        table.add_uniform(0.5, 7 + i as u64)?;
        dicts.push(dict);
        tables.push(table);
    }
    let mut weights: Vec<Vec<f32>> = dicts
        .iter()
        .zip(&tables)
        .map(|(d, t)| {
            let n = d.rows() * d.cols();
            let c = &t.data()[ROW * 2..ROW * 2 + 2];
            (0..n).map(|i| c[0] * d.data()[i] + c[1] * d.data()[n + i]).collect()
        })
        .collect();

    let mut shared = Layer::new(&ctx, &opts)?;
    let mut dense = Layer::new(&ctx, &opts)?;
    for (i, (p, w)) in Projection::ALL.into_iter().zip(weights.iter_mut()).enumerate() {
        shared.set_masa(p, &dicts[i], &tables[i], ROW)?;
        dense.set_dense(p, w)?;
    }
    let (batch, seq) = (2, 16);
    let x: Vec<f32> = (0..batch * seq * 64).map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0).collect();
    let mut y_masa = vec![0.0f32; x.len()];
    let mut y_dense = vec![0.0f32; x.len()];
    let mut ws = Workspace::new();
    shared.forward(batch, seq, 0, &x, &mut y_masa, &mut ws, None)?;
    dense.forward(batch, seq, 0, &x, &mut y_dense, &mut ws, None)?;
    let diff = y_masa.iter().zip(&y_dense).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = y_dense.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    // Composition order is the only difference: float32 rounding.
    let ok = scale > 0.0 && diff <= 1e-5 * scale;
    println!("MASA forward vs composed dense weights: max difference {diff:.2e} of {scale:.2e}");
    if !ok {
        eprintln!("mismatch");
        std::process::exit(1);
    }
    Ok(())
}
