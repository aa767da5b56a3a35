//! Safe Rust binding of **libmasa**, MASA attention (Matrix Atom Sharing in
//! Attention) in float32.
//!
//! MASA builds each projection P in {Q, K, V, O} of an L-layer transformer
//! from S shared *atoms* (full matrices) and an L x S table of scalar
//! coefficients: `W_l = sum_s c[l, s] * D_s`. This crate wraps the C API of
//! `masa.h` (the reference documentation of every operation): a
//! [`Context`], [`Dictionary`] (the atoms), [`Coefficients`] (the table) and
//! [`Layer`] (an attention layer whose projections are MASA or dense), with
//! forward and backward on caller buffers.
//!
//! # Example
//!
//! A 3-layer MASA stack with 2 atoms per projection; forward with a reserve
//! (training), then backward with gradients for `x` and for the Q atoms and
//! coefficients.
//!
//! ```
//! use masa::{Coefficients, Context, Dictionary, GradMode, Grads, Layer, LayerOptions,
//!            Projection, Reserve, Workspace};
//!
//! let ctx = Context::with_threads(1)?;
//! let (n_layers, n_atoms, d_model, n_heads) = (3, 2, 16, 4);
//! let opts = LayerOptions::new(d_model, n_heads).causal(true).rope(true);
//!
//! // One dictionary and one coefficient table per projection type
//! // (all four are d_model x d_model here, since n_kv_heads = n_heads).
//! let mut dicts = Vec::new();
//! let mut tables = Vec::new();
//! for p in Projection::ALL {
//!     let mut dict = Dictionary::new(&ctx, n_atoms, d_model, d_model)?;
//!     dict.init_uniform(0.0, 1 + p.index() as u64)?; // bound 0 = 1/sqrt(rows)
//!     let mut table = Coefficients::new(&ctx, n_layers, n_atoms)?;
//!     table.init_cyclic()?; // layer l starts as atom l mod S
//!     dicts.push(dict);
//!     tables.push(table);
//! }
//!
//! // The layers borrow the dictionaries and tables (the C layer keeps
//! // pointers to them): they cannot be dropped or changed meanwhile.
//! let mut layers = Vec::new();
//! for l in 0..n_layers {
//!     let mut layer = Layer::new(&ctx, &opts)?;
//!     for p in Projection::ALL {
//!         layer.set_masa(p, &dicts[p.index()], &tables[p.index()], l)?;
//!     }
//!     layers.push(layer);
//! }
//!
//! let (batch, seq) = (2, 5);
//! let x: Vec<f32> = (0..batch * seq * d_model).map(|i| (i as f32 * 0.37).sin()).collect();
//! let mut y = vec![0.0; x.len()];
//! let mut workspace = Workspace::new();
//! let mut reserve = Reserve::new();
//! layers[0].forward(batch, seq, 0, &x, &mut y, &mut workspace, Some(&mut reserve))?;
//!
//! // Gradient of sum(y).
//! let dy = vec![1.0; y.len()];
//! let mut dx = vec![0.0; x.len()];
//! let mut d_atoms_q = vec![0.0; dicts[0].len()];
//! let mut d_coef_q = vec![0.0; tables[0].len()];
//! let mut grads = Grads::new(GradMode::Add)
//!     .atoms(Projection::Q, &mut d_atoms_q)
//!     .coefficients(Projection::Q, &mut d_coef_q);
//! layers[0].backward(batch, seq, 0, &x, &dy, Some(&mut dx), &mut grads, &mut workspace, &reserve)?;
//! drop(grads);
//! assert!(d_coef_q[n_atoms..].iter().all(|&g| g == 0.0)); // only layer 0's row
//!
//! // Wrong sizes are errors, never panics:
//! let err = layers[0].forward(batch, seq, 0, &x[1..], &mut y, &mut workspace, None).unwrap_err();
//! assert_eq!(err.status(), masa::Status::BadShape);
//! # Ok::<(), masa::Error>(())
//! ```
//!
//! The [`compress`] module turns pretrained weights into MASA form (Matrix
//! PCA, the grouping planner, calibration statistics, the whitened low-rank
//! residual).
//!
//! # Ownership and lifetimes
//!
//! - Every object borrows the [`Context`] it was created from.
//! - [`Dictionary::wrap`] and [`Coefficients::wrap`] use caller memory
//!   zero-copy; the buffer stays mutably borrowed while the object exists.
//! - A [`Layer<'a>`](Layer) borrows for `'a` the dictionaries and tables of
//!   its MASA projections and the caller buffers of wrapped dense weights and
//!   biases. To update parameters (an optimizer step), drop the layers,
//!   change the parameters with `data_mut()`, and create the layers again;
//!   creating a layer copies no weight.
//! - Parameter gradients go to caller slices given in [`Grads`], checked
//!   against the exact length of their parameter before libmasa is called
//!   (the C API takes no length for them, nor for `x`, `y`, `dy`, `dx`).
//!   [`Workspace`] and [`Reserve`] grow to what each call needs.
//!
//! # Threads
//!
//! Following the "Threads" section of `masa.h`: [`Context`] is `Send +
//! Sync` (a context may be used from several threads at once); dictionaries,
//! tables and layers are `Send + Sync` because forward and backward only read
//! them and everything that modifies them takes `&mut self`. Each concurrent
//! forward/backward call needs its own [`Workspace`], [`Reserve`] and output
//! buffers, which `&mut` enforces. Error messages are per thread and are read
//! right after the failing call.
//!
//! # Errors
//!
//! Every fallible call returns [`Result`]. An [`Error`] carries the
//! [`Status`] and a message: libmasa's own (`masa_last_error()`) when the
//! library refused the call, or this binding's when a slice length that the C
//! API cannot check was wrong ([`Error::origin`] tells which). Nothing
//! panics on bad input.
//!
//! # Linking
//!
//! `masa-sys` finds libmasa through `MASA_LIB_DIR`, `pkg-config`, the
//! project's own build tree (`<repo>/build/lib`) or plain `-lmasa`; see the
//! README of `bindings/rust`.

#![warn(missing_docs)]

pub mod compress;
mod context;
mod error;
pub mod io;
mod layer;
mod params;
pub mod replaceme;

pub use context::{blis_arch, version_number, version_string, Context};
pub use error::{Error, Origin, Result, Status};
pub use layer::{
    GradMode, Grads, Layer, LayerOptions, Projection, ProjectionKind, Reserve, WeightPolicy, Workspace,
};
pub use params::{Coefficients, Dictionary};

/// The raw declarations this crate is built on.
pub use masa_sys as sys;
