//! Puts the directories where masa-sys found libmasa into the rpath of this
//! crate's own tests, examples and doc tests, so `cargo test` and
//! `cargo run --example stack` work without LD_LIBRARY_PATH.
//!
//! `cargo:rustc-link-arg` only reaches the targets of the package whose build
//! script prints it, so masa-sys passes the directories on as metadata
//! (`DEP_MASA_RPATH`, joined like PATH). A program of your own that links a
//! libmasa outside the loader's default path needs the same (or
//! LD_LIBRARY_PATH): see the README.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_MASA_RPATH");
    if env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "windows") {
        return;
    }
    if let Some(paths) = env::var_os("DEP_MASA_RPATH") {
        for dir in env::split_paths(&paths) {
            if !dir.as_os_str().is_empty() {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            }
        }
    }
}
