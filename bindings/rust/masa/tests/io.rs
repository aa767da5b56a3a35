//! masa::io: safetensors round trips (the Python package's byte vector),
//! float conversion, every error kind, compressed models with groups,
//! low-rank terms, dense weights and calibration statistics.

use masa::compress::Calibration;
use masa::io::{Dtype, Model, ModelKind, ModelWriter, SafetensorsFile, SafetensorsWriter};
use masa::{Coefficients, Context, Dictionary, Projection, Status};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("masa-rust-io-{}-{name}", std::process::id()))
}

#[test]
fn python_vector_and_round_trip() {
    let ctx = Context::with_threads(1).unwrap();
    let path = tmp("vec.safetensors");
    let mut w = SafetensorsWriter::create(&ctx, &path).unwrap();
    w.add_f32("attn.0", &[1, 2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    w.finish().unwrap();
    // The safetensors package's own serialization test vector.
    let bytes = std::fs::read(&path).unwrap();
    let header = br#"{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}"#;
    assert_eq!(bytes[0], 64);
    assert_eq!(&bytes[8..8 + header.len()], header);
    assert_eq!(bytes.len(), 8 + 64 + 24);

    let mut w = SafetensorsWriter::create(&ctx, &path).unwrap();
    let halves: Vec<u8> = [0x3c00u16, 0xc000, 0x7bff].iter().flat_map(|h| h.to_le_bytes()).collect();
    w.add("h", Dtype::F16, &[3], &halves).unwrap();
    w.add("i", Dtype::I64, &[], &(-5i64).to_le_bytes()).unwrap();
    w.set_metadata("k", "v").unwrap();
    assert_eq!(w.add("h", Dtype::F16, &[3], &halves).unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(w.add("x", Dtype::F32, &[2], &[0u8; 4]).unwrap_err().status(), Status::BadShape);
    assert!(w.add("nul\0", Dtype::F32, &[], &[0u8; 4]).is_err());
    w.finish().unwrap();
    let f = SafetensorsFile::open(&ctx, &path).unwrap();
    assert_eq!(f.len(), 2);
    assert_eq!(f.names().unwrap(), vec!["i", "h"]); // wider dtype first
    let h = f.get("h").unwrap();
    assert_eq!((h.dtype, h.shape, h.data), (Dtype::F16, &[3usize][..], &halves[..]));
    assert_eq!(f.read_f32(f.find("h").unwrap()).unwrap(), vec![1.0, -2.0, 65504.0]);
    assert_eq!(f.get("i").unwrap().shape, &[] as &[usize]);
    assert_eq!(f.read_f32(f.find("i").unwrap()).unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(f.metadata().unwrap(), vec![("k".to_string(), "v".to_string())]);
    assert_eq!(f.metadata_get("k").unwrap(), "v");
    assert_eq!(f.metadata_get("z").unwrap_err().status(), Status::NotFound);
    assert_eq!(f.find("nope").unwrap_err().status(), Status::NotFound);
    assert_eq!(Dtype::BF16.name(), "BF16");
    assert_eq!(Dtype::F64.size(), 8);
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn errors() {
    let ctx = Context::with_threads(1).unwrap();
    let path = tmp("bad.safetensors");
    std::fs::write(&path, b"\x05\0\0\0\0\0\0\0{oops").unwrap();
    let e = SafetensorsFile::open(&ctx, &path).err().unwrap();
    assert_eq!(e.status(), Status::BadFormat);
    assert!(e.message().contains("not valid JSON"), "{}", e.message());
    assert_eq!(Model::open(&ctx, &path).err().unwrap().status(), Status::BadFormat);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(SafetensorsFile::open(&ctx, &path).err().unwrap().status(), Status::Io);
    let e = SafetensorsWriter::create(&ctx, "/nonexistent-dir/x").err().unwrap();
    assert_eq!(e.status(), Status::Io);
}

#[test]
fn compressed_model() {
    let ctx = Context::with_threads(1).unwrap();
    let (d, layers, s) = (8usize, 3usize, 2usize);
    let path = tmp("model.safetensors");
    let mut dict = Dictionary::new(&ctx, s, d, d).unwrap();
    dict.init_uniform(0.0, 3).unwrap();
    let mut coef = Coefficients::new(&ctx, layers, s).unwrap();
    coef.init_cyclic().unwrap();
    let a: Vec<f32> = (0..d * 2).map(|i| i as f32 * 0.1).collect();
    let b: Vec<f32> = (0..2 * d).map(|i| 1.0 - i as f32 * 0.05).collect();
    let dense: Vec<f32> = (0..d * d).map(|i| (i as f32).sin()).collect();
    let mut calib = Calibration::new(&ctx, d).unwrap();
    let x: Vec<f32> = (0..5 * d).map(|i| (i as f32 * 0.3).cos()).collect();
    calib.accumulate(&x).unwrap();

    let mut w = ModelWriter::create(&ctx, &path, layers).unwrap();
    w.add_group(Projection::Q, 0, &dict, &coef).unwrap();
    w.add_lowrank(Projection::Q, 1, d, d, 2, &a, &b).unwrap();
    for l in 0..layers {
        w.add_dense(Projection::O, l, d, d, &dense).unwrap();
    }
    w.add_calib("layer0.qkv", &calib).unwrap();
    assert_eq!(w.set_metadata("masa.x", "y").unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(w.add_lowrank(Projection::K, 0, d, d, 2, &a[1..], &b).unwrap_err().status(), Status::BadShape);
    w.finish().unwrap();

    let m = Model::open(&ctx, &path).unwrap();
    assert_eq!(m.n_layers(), layers);
    let q = m.projection(Projection::Q);
    assert_eq!((q.kind, q.d_in, q.d_out, q.groups.clone()), (ModelKind::Masa, d, d, vec![(0, layers, s)]));
    assert_eq!(m.projection(Projection::O).kind, ModelKind::Dense);
    assert_eq!(m.projection(Projection::K).kind, ModelKind::Absent);
    let (first, atoms, coefs) = m.group(Projection::Q, 0).unwrap();
    assert_eq!((first, atoms, coefs), (0, dict.data(), coef.data()));
    assert_eq!(m.group(Projection::Q, 1).unwrap_err().status(), Status::OutOfRange);
    assert!(m.lowrank(Projection::Q, 0).unwrap().is_none());
    assert_eq!(m.lowrank(Projection::Q, 1).unwrap(), Some((2, &a[..], &b[..])));
    assert_eq!(m.dense(Projection::O, 2).unwrap(), &dense[..]);
    assert_eq!(m.dense(Projection::Q, 0).unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(m.calibration_names(), vec!["layer0.qkv".to_string()]);
    let back = m.calibration("layer0.qkv").unwrap();
    assert_eq!((back.dim(), back.n_rows()), (d, 5));
    assert_eq!(back.matrix(), calib.matrix());
    assert_eq!(m.calibration("nope").err().unwrap().status(), Status::NotFound);
    drop(m);
    std::fs::remove_file(&path).unwrap();
}

/// Layer::apply_model sets a layer exactly as the same parameters set by
/// hand (bit-identical forward), keeps the model's memory read-only, and
/// reports a bad layer index or shape.
#[test]
fn apply_model_matches_layer_set_by_hand() {
    use masa::{Layer, LayerOptions, ProjectionKind, Workspace};
    let ctx = Context::with_threads(1).unwrap();
    let (d, layers, s) = (8usize, 3usize, 2usize);
    let path = tmp("apply.safetensors");
    let mut dict = Dictionary::new(&ctx, s, d, d).unwrap();
    dict.init_uniform(0.0, 7).unwrap();
    let mut coef = Coefficients::new(&ctx, layers, s).unwrap();
    coef.init_cyclic().unwrap();
    coef.add_uniform(0.3, 8).unwrap();
    let mut a: Vec<f32> = (0..d * 2).map(|i| (i as f32 * 0.37).sin() * 0.2).collect();
    let mut b: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.11).cos() * 0.2).collect();
    let mut dense: Vec<Vec<f32>> = (0..3)
        .map(|p| (0..d * d).map(|i| ((i + 31 * p) as f32 * 0.7).sin() * 0.3).collect())
        .collect();

    let mut w = ModelWriter::create(&ctx, &path, layers).unwrap();
    w.add_group(Projection::Q, 0, &dict, &coef).unwrap();
    w.add_lowrank(Projection::Q, 1, d, d, 2, &a, &b).unwrap();
    for l in 0..layers {
        for (p, which) in [Projection::K, Projection::V, Projection::O].into_iter().enumerate() {
            w.add_dense(which, l, d, d, &dense[p]).unwrap();
        }
    }
    w.finish().unwrap();
    let model = Model::open(&ctx, &path).unwrap();

    let opts = LayerOptions::new(d, 2).causal(true).rope(true);
    let mut from_model = Layer::new(&ctx, &opts).unwrap();
    assert_eq!(from_model.apply_model(&model, layers).unwrap_err().status(), Status::OutOfRange);
    from_model.apply_model(&model, 1).unwrap();
    assert_eq!(
        from_model.projection_kind(Projection::Q),
        ProjectionKind::Masa { atoms_len: s * d * d, coefficients_len: layers * s, layer_index: 1 }
    );
    assert_eq!(from_model.projection_kind(Projection::O), ProjectionKind::Dense);
    assert_eq!(from_model.lowrank_rank(Projection::Q), 2);
    assert_eq!(from_model.weight(Projection::O).unwrap(), &dense[2][..]);
    assert_eq!(from_model.lowrank(Projection::Q).unwrap(), (&a[..], &b[..]));
    // The model's memory is shared: never handed out writable.
    assert!(from_model.weight_mut(Projection::O).is_none());
    assert!(from_model.lowrank_mut(Projection::Q).is_none());

    let mut by_hand = Layer::new(&ctx, &opts).unwrap();
    by_hand.set_masa(Projection::Q, &dict, &coef, 1).unwrap();
    by_hand.set_lowrank(Projection::Q, 2, &mut a, &mut b).unwrap();
    let [k, v, o] = &mut dense[..] else { unreachable!() };
    by_hand.set_dense(Projection::K, k).unwrap();
    by_hand.set_dense(Projection::V, v).unwrap();
    by_hand.set_dense(Projection::O, o).unwrap();

    let (batch, seq) = (2, 5);
    let x: Vec<f32> = (0..batch * seq * d).map(|i| (i as f32 * 0.23).sin()).collect();
    let (mut y1, mut y2) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    let mut ws = Workspace::new();
    from_model.forward(batch, seq, 0, &x, &mut y1, &mut ws, None).unwrap();
    by_hand.forward(batch, seq, 0, &x, &mut y2, &mut ws, None).unwrap();
    assert!(y1.iter().any(|&v| v != 0.0));
    assert_eq!(y1, y2);

    // Layer 0 has no low-rank term: applying it removes layer 1's.
    from_model.apply_model(&model, 0).unwrap();
    assert_eq!(from_model.lowrank_rank(Projection::Q), 0);
    // Memory of the layer's own is writable again.
    from_model.set_dense_owned(Projection::O).unwrap();
    assert!(from_model.weight_mut(Projection::O).is_some());

    // A layer of another width is refused, unchanged.
    let mut wide = Layer::new(&ctx, &LayerOptions::new(2 * d, 2)).unwrap();
    let e = wide.apply_model(&model, 0).unwrap_err();
    assert_eq!(e.status(), Status::BadShape);
    assert_eq!(wide.projection_kind(Projection::Q), ProjectionKind::Unset);
    // Every layer set from the model goes before it (the borrow checker
    // refuses the other order).
    drop((from_model, wide, by_hand));
    drop(model);
    std::fs::remove_file(&path).unwrap();
}
