//! Bad input comes back as `Err` with a message (the library's own where
//! libmasa detects it); nothing panics.

mod common;

use common::Rng;
use masa::{
    Coefficients, Context, Dictionary, Error, GradMode, Grads, Layer, LayerOptions, Origin, Projection,
    Reserve, Status, Workspace,
};

/// A library error with this status and a non-empty message that names the
/// C function (the header's convention: "masa_layer_create: ...").
#[track_caller]
fn lib_err(e: Error, status: Status, func: &str) -> Error {
    assert_eq!(e.origin(), Origin::Library, "{e}");
    assert_eq!(e.status(), status, "{e}");
    assert!(!e.message().is_empty());
    assert!(e.message().contains(func), "message {:?} does not name {func}", e.message());
    // Display shows the message and the status description.
    let shown = e.to_string();
    assert!(shown.contains(e.message()) && shown.contains(status.description()), "{shown}");
    e
}

#[track_caller]
fn lib_err_any(e: Error, func: &str) -> Error {
    assert_eq!(e.origin(), Origin::Library, "{e}");
    assert!(e.message().contains(func), "message {:?} does not name {func}", e.message());
    e
}

#[track_caller]
fn binding_err(e: Error, status: Status, needle: &str) -> Error {
    assert_eq!(e.origin(), Origin::Binding, "{e}");
    assert_eq!(e.status(), status, "{e}");
    assert!(e.message().contains(needle), "message {:?} does not contain {needle:?}", e.message());
    e
}

#[test]
fn zero_sizes() {
    let ctx = Context::with_threads(1).unwrap();
    for (s, r, c) in [(0, 4, 4), (2, 0, 4), (2, 4, 0)] {
        lib_err(Dictionary::new(&ctx, s, r, c).unwrap_err(), Status::BadShape, "masa_dictionary_create");
        let mut empty: Vec<f32> = Vec::new();
        lib_err(
            Dictionary::wrap(&ctx, &mut empty, s, r, c).unwrap_err(),
            Status::BadShape,
            "masa_dictionary_wrap",
        );
    }
    lib_err(Coefficients::new(&ctx, 0, 2).unwrap_err(), Status::BadShape, "masa_coefficients_create");
    lib_err(Coefficients::new(&ctx, 3, 0).unwrap_err(), Status::BadShape, "masa_coefficients_create");
    lib_err(Coefficients::wrap(&ctx, &mut [], 0, 2).unwrap_err(), Status::BadShape, "masa_coefficients_wrap");
    lib_err_any(Layer::new(&ctx, &LayerOptions::new(0, 4)).unwrap_err(), "masa_layer_create");
    lib_err_any(Layer::new(&ctx, &LayerOptions::new(16, 0)).unwrap_err(), "masa_layer_create");

    // batch or seq of zero, with consistent (empty) slices: the library says no.
    let (dict, table) = (unit_dict(&ctx, 16), unit_table(&ctx));
    let layer = masa_layer(&ctx, LayerOptions::new(16, 4), &dict, &table);
    let mut ws = Workspace::new();
    for (b, t) in [(0, 3), (2, 0)] {
        let e = layer.forward(b, t, 0, &[], &mut [], &mut ws, None).unwrap_err();
        assert_eq!(e.origin(), Origin::Library, "{e}");
        assert_eq!(e.status(), Status::BadShape, "{e}");
        assert!(e.message().starts_with("masa_layer_"), "{e}");
        lib_err(layer.workspace_size(b, t).unwrap_err(), Status::BadShape, "masa_layer_workspace_size");
        lib_err(layer.reserve_size(b, t).unwrap_err(), Status::BadShape, "masa_layer_reserve_size");
    }
}

#[test]
fn bad_head_counts() {
    let ctx = Context::with_threads(1).unwrap();
    // The header's own example: n_heads not a multiple of n_kv_heads.
    let e = lib_err_any(
        Layer::new(&ctx, &LayerOptions::new(24, 6).n_kv_heads(4)).unwrap_err(),
        "masa_layer_create",
    );
    assert!(e.message().contains("n_kv_heads"), "{e}");
    // n_kv_heads > n_heads.
    lib_err_any(Layer::new(&ctx, &LayerOptions::new(16, 2).n_kv_heads(4)).unwrap_err(), "masa_layer_create");
    // d_model not a multiple of n_heads (head_dim 0 = d_model / n_heads).
    lib_err_any(Layer::new(&ctx, &LayerOptions::new(10, 4)).unwrap_err(), "masa_layer_create");
    // RoPE needs an even head_dim.
    lib_err_any(Layer::new(&ctx, &LayerOptions::new(12, 4).rope(true)).unwrap_err(), "masa_layer_create");
    // Bad scalars.
    for opts in [
        LayerOptions::new(16, 4).softmax_scale(f32::NAN),
        LayerOptions::new(16, 4).rope(true).rope_theta(0.0),
        LayerOptions::new(16, 4).rope(true).rope_theta(f32::INFINITY),
    ] {
        let e = lib_err_any(Layer::new(&ctx, &opts).unwrap_err(), "masa_layer_create");
        assert_eq!(e.status(), Status::InvalidArgument, "{opts:?}: {e}");
    }
    // Fine: GQA, MQA and an explicit head_dim.
    Layer::new(&ctx, &LayerOptions::new(24, 6).n_kv_heads(3)).unwrap();
    Layer::new(&ctx, &LayerOptions::new(24, 6).n_kv_heads(1)).unwrap();
    Layer::new(&ctx, &LayerOptions::new(10, 4).head_dim(6).rope(true)).unwrap();
}

#[test]
fn mismatched_slice_lengths() {
    let ctx = Context::with_threads(1).unwrap();
    let mut buf = vec![0.0f32; 2 * 4 * 4 + 1];
    binding_err(
        Dictionary::wrap(&ctx, &mut buf, 2, 4, 4).unwrap_err(),
        Status::BadShape,
        "atoms has 33 elements",
    );
    binding_err(Coefficients::wrap(&ctx, &mut buf[..5], 3, 2).unwrap_err(), Status::BadShape, "expected 6");
    binding_err(
        Dictionary::wrap(&ctx, &mut [], usize::MAX, 2, 2).unwrap_err(),
        Status::Overflow,
        "overflows",
    );

    let d = 16;
    let (dict, table) = (unit_dict(&ctx, d), unit_table(&ctx));
    // compose checks w_len itself.
    let mut w = vec![0.0; d * d - 1];
    lib_err(dict.compose(&table, 0, &mut w).unwrap_err(), Status::BufferTooSmall, "masa_compose");
    let mut w = vec![0.0; d * d];
    lib_err(dict.compose(&table, 5, &mut w).unwrap_err(), Status::OutOfRange, "masa_compose");

    let mut wbuf = vec![0.0; d * d + 3];
    let mut bbuf = vec![0.0; d - 1];
    let mut layer = masa_layer(&ctx, LayerOptions::new(d, 4), &dict, &table);
    binding_err(layer.set_dense(Projection::O, &mut wbuf).unwrap_err(), Status::BadShape, "weight has 259");
    binding_err(layer.set_bias(Projection::O, &mut bbuf).unwrap_err(), Status::BadShape, "bias has 15");

    let (batch, seq) = (2, 3);
    let n = batch * seq * d;
    let x = Rng::new(1).vec(n);
    let mut y = vec![0.0; n];
    let mut ws = Workspace::new();
    let mut reserve = Reserve::new();
    binding_err(
        layer.forward(batch, seq, 0, &x[1..], &mut y, &mut ws, None).unwrap_err(),
        Status::BadShape,
        "x has",
    );
    binding_err(
        layer.forward(batch, seq, 0, &x, &mut y[..n - 1], &mut ws, None).unwrap_err(),
        Status::BadShape,
        "y has",
    );
    binding_err(
        layer.forward(batch, usize::MAX, 0, &x, &mut y, &mut ws, None).unwrap_err(),
        Status::Overflow,
        "overflows",
    );

    // Backward before any forward filled the reserve.
    let dy = x.clone();
    let e = layer.backward(batch, seq, 0, &x, &dy, None, &mut Grads::none(), &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::InvalidArgument, "not filled");
    layer.forward(batch, seq, 0, &x, &mut y, &mut ws, Some(&mut reserve)).unwrap();
    // Sizes differing from the forward call.
    let e = layer.backward(batch, seq, 1, &x, &dy, None, &mut Grads::none(), &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::InvalidArgument, "pos_offset 1");
    let e = layer.backward(1, 6, 0, &x, &dy, None, &mut Grads::none(), &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::InvalidArgument, "differ");
    let e =
        layer.backward(batch, seq, 0, &x, &dy[1..], None, &mut Grads::none(), &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::BadShape, "dy has");
    let mut dx = vec![0.0; n + 1];
    let e = layer
        .backward(batch, seq, 0, &x, &dy, Some(&mut dx), &mut Grads::none(), &mut ws, &reserve)
        .unwrap_err();
    binding_err(e, Status::BadShape, "dx has");

    // Gradient buffers of the wrong length, or for a parameter that does
    // not exist.
    let mut g_short = vec![0.0; dict.len() - 1];
    let mut grads = Grads::new(GradMode::Add).atoms(Projection::V, &mut g_short);
    let e = layer.backward(batch, seq, 0, &x, &dy, None, &mut grads, &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::BadShape, "d_atoms[V]");
    let mut g_c = vec![0.0; table.len() + 2];
    let mut grads = Grads::new(GradMode::Add).coefficients(Projection::Q, &mut g_c);
    let e = layer.backward(batch, seq, 0, &x, &dy, None, &mut grads, &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::BadShape, "d_coefficients[Q]");
    let mut g_w = vec![0.0; d * d];
    let mut grads = Grads::new(GradMode::Add).weight(Projection::Q, &mut g_w);
    let e = layer.backward(batch, seq, 0, &x, &dy, None, &mut grads, &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::InvalidArgument, "MASA projection");
    let mut g_b = vec![0.0; d];
    let mut grads = Grads::new(GradMode::Add).bias(Projection::K, &mut g_b);
    let e = layer.backward(batch, seq, 0, &x, &dy, None, &mut grads, &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::InvalidArgument, "no bias");

    // A reserve filled by another layer.
    let other = masa_layer(&ctx, LayerOptions::new(d, 4), &dict, &table);
    let e = other.backward(batch, seq, 0, &x, &dy, None, &mut Grads::none(), &mut ws, &reserve).unwrap_err();
    binding_err(e, Status::InvalidArgument, "another layer");

    // After all that, the layer still works.
    layer.backward(batch, seq, 0, &x, &dy, None, &mut Grads::none(), &mut ws, &reserve).unwrap();
}

#[test]
fn bad_projection_setup() {
    let ctx = Context::with_threads(1).unwrap();
    let d = 16;
    let opts = LayerOptions::new(d, 4).n_kv_heads(2); // K, V: 16 x 8
    let (dict, table) = (unit_dict(&ctx, d), unit_table(&ctx));
    let other_table = Coefficients::new(&ctx, 2, 3).unwrap();
    let mut layer = Layer::new(&ctx, &opts).unwrap();

    // Forward before every projection is set.
    let x = vec![0.5; d];
    let mut y = vec![0.0; d];
    let mut ws = Workspace::new();
    let e = layer.forward(1, 1, 0, &x, &mut y, &mut ws, None).unwrap_err();
    lib_err_any(e.clone(), "masa_layer_");
    assert_eq!(e.status(), Status::NotReady, "{e}");

    // Atoms of the wrong shape for K (16 x 16 instead of 16 x 8).
    let e = layer.set_masa(Projection::K, &dict, &table, 0).unwrap_err();
    lib_err(e, Status::BadShape, "masa_layer_set_masa");
    // Table with a different n_atoms than the dictionary.
    lib_err(
        layer.set_masa(Projection::Q, &dict, &other_table, 0).unwrap_err(),
        Status::BadShape,
        "masa_layer_set_masa",
    );
    // layer_index out of range.
    lib_err(
        layer.set_masa(Projection::Q, &dict, &table, 2).unwrap_err(),
        Status::OutOfRange,
        "masa_layer_set_masa",
    );
    layer.set_masa(Projection::Q, &dict, &table, 1).unwrap();

    // Bad initialisation bounds.
    let mut d2 = Dictionary::new(&ctx, 1, 2, 2).unwrap();
    lib_err(
        d2.init_uniform(f32::NAN, 1).unwrap_err(),
        Status::InvalidArgument,
        "masa_dictionary_init_uniform",
    );
    lib_err(d2.init_uniform(-1.0, 1).unwrap_err(), Status::InvalidArgument, "masa_dictionary_init_uniform");
    let mut t2 = Coefficients::new(&ctx, 2, 2).unwrap();
    lib_err(
        t2.add_uniform(f32::INFINITY, 1).unwrap_err(),
        Status::InvalidArgument,
        "masa_coefficients_add_uniform",
    );
    // Nothing was modified by the failed calls.
    assert!(d2.data().iter().all(|&v| v == 0.0));
    assert!(t2.data().iter().all(|&v| v == 0.0));
}

#[test]
fn status_values_round_trip() {
    for raw in 1..=11u32 {
        let s = Status::from_raw(raw).unwrap();
        assert_eq!(s.raw(), raw);
        assert!(!matches!(s, Status::Unknown(_)));
        assert!(!s.description().is_empty());
    }
    assert_eq!(Status::from_raw(0), None);
    assert_eq!(Status::from_raw(99), Some(Status::Unknown(99)));
    assert_eq!(Status::Unknown(99).description(), "unknown status");
    assert!(masa::version_number() >= masa::sys::MASA_VERSION_NUMBER);
    assert_eq!(masa::version_string(), masa::sys::MASA_VERSION_STRING);
    assert!(!masa::blis_arch().is_empty());
}

fn unit_dict(ctx: &Context, d: usize) -> Dictionary<'_> {
    let mut dict = Dictionary::new(ctx, 2, d, d).unwrap();
    dict.init_uniform(0.0, 3).unwrap();
    dict
}

fn unit_table(ctx: &Context) -> Coefficients<'_> {
    let mut t = Coefficients::new(ctx, 2, 2).unwrap();
    t.init_cyclic().unwrap();
    t
}

fn masa_layer<'a>(
    ctx: &'a Context,
    opts: LayerOptions,
    dict: &'a Dictionary,
    table: &'a Coefficients,
) -> Layer<'a> {
    let mut layer = Layer::new(ctx, &opts).unwrap();
    for p in Projection::ALL {
        layer.set_masa(p, dict, table, 0).unwrap();
    }
    layer
}
