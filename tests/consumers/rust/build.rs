//! The one step a binary crate needs when libmasa lies outside the dynamic
//! loader's default path (a prefix found through PKG_CONFIG_PATH, or
//! MASA_LIB_DIR): put the directories masa-sys linked from into this crate's
//! rpath. Cargo passes link arguments of a dependency's build script only to
//! that dependency's own targets, so masa-sys exports the directories as
//! DEP_MASA_RPATH to the crates that depend on it directly: hence the
//! `masa-sys` line next to `masa` in Cargo.toml.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MASA_RPATH");
    if let Some(dirs) = std::env::var_os("DEP_MASA_RPATH") {
        for dir in std::env::split_paths(&dirs) {
            println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{}", dir.display());
        }
    }
}
