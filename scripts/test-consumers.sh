#!/bin/bash
# Uses libmasa the way an outside project does, from scratch directories and
# with no MASA_* variable: the library in ./build is installed to a temporary
# prefix, found only through pkg-config (PKG_CONFIG_PATH), and
#   (a) a C program (tests/consumers/demo.c) is compiled with
#       `pkg-config --cflags --libs masa` and run;
#   (b) a cargo project depending on bindings/rust/masa by path is built
#       offline and its binary run;
#   (c) the same project depending on the crates as published (`cargo
#       package`) and vendored with `cargo vendor`, built offline.
# Each program checks a MASA forward against dense weights it composes
# itself. Run by scripts/test-all.sh after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PATH="$HOME/.cargo/bin:$PATH"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for var in "${!MASA_@}"; do unset "$var"; done
passed=0
step() { echo "-- $*"; }
fail() { echo "test-consumers: FAIL: $*" >&2; exit 1; }

# Install. Staging with --destdir and moving the prefix avoids a second build
# of the library; masa.pc names every path through ${prefix}, so rewriting
# its prefix line is all a relocation needs.
meson install -C build --destdir "$WORK/stage" --no-rebuild --quiet >/dev/null
pc=$(find "$WORK/stage" -path '*/pkgconfig/masa.pc')
PREFIX="$WORK/stage$(sed -n 's/^prefix=//p' "$pc")"
sed -i "s|^prefix=.*|prefix=$PREFIX|" "$pc"
export PKG_CONFIG_PATH
PKG_CONFIG_PATH=$(dirname "$pc")
LIBDIR=$(pkg-config --variable=libdir masa)
case "$LIBDIR" in
    "$WORK"/*) ;;
    *) fail "pkg-config finds masa in $LIBDIR, not in the temporary prefix" ;;
esac
step "installed to $PREFIX: $(pkg-config --cflags --libs masa)"

# The binary's libmasa.so.0 must be the installed copy.
check_loaded() {
    local lib
    lib=$(ldd "$1" | awk '/libmasa\.so\.0/{print $3}')
    [ "$lib" = "$LIBDIR/libmasa.so.0" ] || fail "$1 loads libmasa from '$lib', not $LIBDIR"
}

# (a) C through pkg-config, with an rpath to the prefix (the README's line).
step "(a) C program through pkg-config"
mkdir "$WORK/c"
cp tests/consumers/demo.c "$WORK/c/"
(cd "$WORK/c" && cc demo.c $(pkg-config --cflags --libs masa) \
    -Wl,-rpath,"$(pkg-config --variable=libdir masa)" -o demo)
check_loaded "$WORK/c/demo"
"$WORK/c/demo"
passed=$((passed + 1))

# A scratch cargo project around tests/consumers/rust (main.rs, build.rs).
new_crate() { # dir, then the [dependencies] lines
    local dir=$1
    shift
    mkdir -p "$dir/src"
    cp tests/consumers/rust/src/main.rs "$dir/src/"
    cp tests/consumers/rust/build.rs "$dir/"
    {
        printf '[package]\nname = "masa-consumer"\nversion = "0.1.0"\nedition = "2021"\n'
        printf 'publish = false\n\n[dependencies]\n'
        printf '%s\n' "$@"
        printf '\n[workspace]\n'  # not part of any enclosing workspace
    } > "$dir/Cargo.toml"
}

run_crate() { # dir: builds offline, checks the rpath, runs the binary
    (cd "$1" && cargo build --offline --quiet)
    local bin="$1/target/debug/masa-consumer"
    readelf -d "$bin" | grep -q "R.*PATH.*$LIBDIR" || fail "$bin has no rpath to $LIBDIR"
    check_loaded "$bin"
    "$bin"
}

# (b) the crate by path.
step "(b) cargo project, masa by path"
new_crate "$WORK/by-path" \
    "masa = { path = \"$ROOT/bindings/rust/masa\" }" \
    "masa-sys = { path = \"$ROOT/bindings/rust/masa-sys\" }"
run_crate "$WORK/by-path"
passed=$((passed + 1))

# (c) vendored. The crates are not on crates.io: `cargo package` makes the
# .crate files a registry would serve, unpacked into a directory source that
# stands in for crates.io; `cargo vendor` copies from it what the project
# needs, and the build then uses the vendor directory alone.
step "(c) cargo project, masa vendored"
(cd bindings/rust && CARGO_TARGET_DIR="$WORK/package" \
    cargo package --workspace --no-verify --offline --allow-dirty --quiet)
mkdir "$WORK/registry"
for crate in "$WORK"/package/package/*.crate; do
    tar -xzf "$crate" -C "$WORK/registry"
    dir="$WORK/registry/$(basename "$crate" .crate)"
    /usr/bin/python3 - "$dir" "$crate" <<'EOF'
import hashlib, json, os, sys
root, crate = sys.argv[1], sys.argv[2]
sha = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()
files = {os.path.relpath(os.path.join(d, f), root): sha(os.path.join(d, f))
         for d, _, names in os.walk(root) for f in names}
json.dump({"files": files, "package": sha(crate)},
          open(os.path.join(root, ".cargo-checksum.json"), "w"))
EOF
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' bindings/rust/Cargo.toml)
new_crate "$WORK/vendored" "masa = \"=$version\"" "masa-sys = \"=$version\""
mkdir "$WORK/vendored/.cargo"
printf '[source.crates-io]\nreplace-with = "published"\n[source.published]\ndirectory = "%s"\n' \
    "$WORK/registry" > "$WORK/vendored/.cargo/config.toml"
if ! (cd "$WORK/vendored" && cargo vendor --offline --respect-source-config vendor \
        >vendor-config.toml 2>"$WORK/vendor.log") ||
   ! grep -q 'directory = "vendor"' "$WORK/vendored/vendor-config.toml"; then
    cat "$WORK/vendor.log" >&2
    fail "cargo vendor failed or printed no source configuration"
fi
mv "$WORK/vendored/vendor-config.toml" "$WORK/vendored/.cargo/config.toml"
rm -rf "$WORK/registry"
run_crate "$WORK/vendored"
passed=$((passed + 1))

echo "test-consumers: $passed passed"
