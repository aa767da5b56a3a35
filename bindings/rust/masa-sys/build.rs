//! Finds libmasa without any build dependency.
//!
//! Order (the first that applies wins):
//! 1. `MASA_LIB_DIR=<dir>`: link libmasa from `<dir>` and put `<dir>` in the
//!    rpath of this workspace's tests, examples and binaries.
//! 2. The `pkg-config` program (or `$PKG_CONFIG`) for `masa`, honouring
//!    `PKG_CONFIG_PATH` etc. Pointing `PKG_CONFIG_PATH` at
//!    `<build>/pkgconfig` picks the build tree's `masa-uninstalled.pc`.
//! 3. The project's own build tree: `<repo>/build/lib/libmasa.so` (this crate
//!    lives in `<repo>/bindings/rust/masa-sys`), so `cargo test` works right
//!    after `meson setup build && ninja -C build` at the repository root.
//! 4. Plain `-lmasa` (whatever the linker finds on its default path).
//!
//! `MASA_STATIC=1` links `libmasa.a` statically (then BLIS, LAPACKE, pthread
//! and libm dynamically; `MASA_BLIS_LIB_DIR` says where BLIS is when it is not on the
//! linker's path; Debian's `/usr/lib/<multiarch>/blis-pthread` is tried).
//!
//! Metadata for dependents (`links = "masa"`): `DEP_MASA_RPATH` holds the
//! directories (joined like `PATH`) that a dependent's build script may put
//! in the rpath of its own tests and examples (the `masa` crate does), since
//! `cargo:rustc-link-arg` only reaches this package's own targets.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

const ENV_VARS: &[&str] = &[
    "MASA_LIB_DIR",
    "MASA_STATIC",
    "MASA_BLIS_LIB_DIR",
    "PKG_CONFIG",
    "PKG_CONFIG_PATH",
    "PKG_CONFIG_LIBDIR",
    "PKG_CONFIG_SYSROOT_DIR",
    "PKG_CONFIG_ALLOW_SYSTEM_LIBS",
    "PKG_CONFIG_DISABLE_UNINSTALLED",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let statik = flag("MASA_STATIC");
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let rpath_ok = target_os != "windows";
    let mut plan = Plan { statik, search: Vec::new(), libs: Vec::new(), rpath: Vec::new() };

    if let Some(dir) = env::var_os("MASA_LIB_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            println!("cargo:warning=MASA_LIB_DIR={} is not a directory", dir.display());
        }
        plan.search.push(dir.clone());
        plan.add_masa_and_private_libs();
        plan.rpath.push(dir);
    } else if let Some((dirs, libs)) = pkg_config(statik) {
        if !statik {
            for dir in dirs.iter().filter(|d| !on_default_loader_path(d)) {
                println!(
                    "cargo:warning=libmasa is in {0}, outside the dynamic loader's default \
                     path: this package's tests get an rpath to it, but a binary crate of \
                     yours needs its own (a build.rs turning DEP_MASA_RPATH into \
                     -Wl,-rpath: \"rpath in your own crate\" in libmasa's \
                     bindings/rust/README.md) or LD_LIBRARY_PATH={0}",
                    dir.display()
                );
            }
        }
        for dir in dirs {
            plan.rpath.push(dir.clone());
            plan.search.push(dir);
        }
        if statik || !libs.iter().any(|l| l == "masa") {
            // Static: masa.pc's Libs.private is not reliable for the linker
            // flags rustc accepts (meson may write a full path to libblis.so
            // or -pthread, and Debian's BLIS has no .pc file), so use the
            // known list: masa, blis, lapacke, jansson, pthread, m.
            plan.add_masa_and_private_libs();
        } else {
            plan.libs.extend(libs);
        }
    } else if let Some(dir) = build_tree(statik) {
        plan.search.push(dir.clone());
        plan.add_masa_and_private_libs();
        plan.rpath.push(dir);
    } else {
        println!(
            "cargo:warning=libmasa not found through MASA_LIB_DIR, pkg-config or the \
             project's build tree; linking with plain -lmasa"
        );
        plan.add_masa_and_private_libs();
    }

    plan.emit(rpath_ok);
}

struct Plan {
    statik: bool,
    search: Vec<PathBuf>,
    libs: Vec<String>,
    rpath: Vec<PathBuf>,
}

impl Plan {
    /// `masa`, plus its private dependencies when linking statically.
    fn add_masa_and_private_libs(&mut self) {
        self.libs.push("masa".into());
        if self.statik {
            for lib in ["blis", "lapacke", "jansson", "pthread", "m"] {
                self.libs.push(lib.into());
            }
            self.add_blis_dir();
        }
    }

    fn add_blis_dir(&mut self) {
        let dir = match env::var_os("MASA_BLIS_LIB_DIR").filter(|d| !d.is_empty()) {
            Some(d) => Some(PathBuf::from(d)),
            None => debian_blis_dir(),
        };
        if let Some(dir) = dir {
            self.search.push(dir.clone());
            self.rpath.push(dir);
        }
    }

    fn emit(&self, rpath_ok: bool) {
        for dir in &self.search {
            println!("cargo:rustc-link-search=native={}", dir.display());
        }
        for lib in &self.libs {
            if lib == "masa" && self.statik {
                println!("cargo:rustc-link-lib=static=masa");
            } else {
                println!("cargo:rustc-link-lib={lib}");
            }
        }
        let mut rpath: Vec<&PathBuf> = Vec::new();
        for dir in &self.rpath {
            if !rpath.contains(&dir) {
                rpath.push(dir);
            }
        }
        if rpath_ok {
            for dir in &rpath {
                // Reaches this crate's own tests; dependents get DEP_MASA_RPATH.
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            }
        }
        if let Some(first) = self.search.first() {
            println!("cargo:libdir={}", first.display());
        }
        if !rpath.is_empty() {
            if let Ok(joined) = env::join_paths(rpath.iter()) {
                println!("cargo:rpath={}", joined.to_string_lossy());
            }
        }
    }
}

/// True when the variable is set to something other than "", "0", "no",
/// "false" or "off".
fn flag(name: &str) -> bool {
    match env::var(name) {
        Ok(v) => {
            let v = v.trim().to_ascii_lowercase();
            !(v.is_empty() || v == "0" || v == "no" || v == "false" || v == "off")
        }
        Err(_) => false,
    }
}

/// Runs `pkg-config --libs-only-L masa` and `--libs-only-l masa`; `None` if the
/// program is missing or does not know masa.
fn pkg_config(statik: bool) -> Option<(Vec<PathBuf>, Vec<String>)> {
    let program =
        env::var_os("PKG_CONFIG").filter(|p| !p.is_empty()).unwrap_or_else(|| OsString::from("pkg-config"));
    let run = |what: &str| -> Option<String> {
        let mut cmd = Command::new(&program);
        if statik {
            cmd.arg("--static");
        }
        let out = cmd.arg(what).arg("masa").output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8(out.stdout).ok()
    };
    let dirs_out = run("--libs-only-L")?;
    let libs_out = run("--libs-only-l")?;
    let dirs = split_args(&dirs_out)
        .into_iter()
        .filter_map(|a| a.strip_prefix("-L").map(PathBuf::from))
        .filter(|d| !d.as_os_str().is_empty())
        .collect();
    let libs = split_args(&libs_out)
        .into_iter()
        .filter_map(|a| a.strip_prefix("-l").map(str::to_string))
        .filter(|l| !l.is_empty())
        .collect();
    Some((dirs, libs))
}

/// Splits pkg-config output on whitespace; a backslash escapes the next
/// character (pkg-config writes a space in a path as "\ ").
fn split_args(s: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    args.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        args.push(cur);
    }
    args
}

/// `<repo>/build/lib` when this crate sits in `<repo>/bindings/rust/masa-sys`
/// and the library has been built there.
fn build_tree(statik: bool) -> Option<PathBuf> {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent()?.parent()?.parent()?;
    if !root.join("include").join("masa").join("masa.h").is_file() {
        return None; // not inside the libmasa source tree (e.g. from crates.io)
    }
    let dir = root.join("build").join("lib");
    let file = dir.join(if statik { "libmasa.a" } else { "libmasa.so" });
    // Watch the file even while it is missing: cargo then re-runs this script
    // on every build until the library appears, and after that whenever it
    // is rebuilt.
    println!("cargo:rerun-if-changed={}", file.display());
    if file.exists() {
        Some(dir)
    } else {
        None
    }
}

/// True for the directories a Linux loader searches without being told:
/// `/lib`, `/usr/lib` and `/usr/local/lib` (Debian's ld.so.conf), their
/// `lib64` variants and multiarch subdirectories. A heuristic: it only
/// decides whether to print a warning.
fn on_default_loader_path(dir: &Path) -> bool {
    ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/lib64"].iter().any(|base| {
        dir.strip_prefix(base)
            .is_ok_and(|rest| rest.components().count() <= 1 && !rest.starts_with("pkgconfig"))
    })
}

/// Debian keeps its BLIS in `/usr/lib/<multiarch>/blis-pthread`.
fn debian_blis_dir() -> Option<PathBuf> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").ok()?;
    let os = env::var("CARGO_CFG_TARGET_OS").ok()?;
    let env_ = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" {
        return None;
    }
    let multiarch = format!("{arch}-linux-{env_}");
    let dir = Path::new("/usr/lib").join(multiarch).join("blis-pthread");
    if dir.is_dir() {
        Some(dir)
    } else {
        None
    }
}
