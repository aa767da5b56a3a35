#!/bin/sh
# Hardening checks of libmasa (project issue #6). Run from a clone after
# scripts/install-deps.sh and scripts/build.sh:
#
#   scripts/hardening.sh              all steps, fuzzing 60 s + 30 s + 20 s
#   FUZZ_SECONDS=600 FUZZ_ST_SECONDS=600 scripts/hardening.sh
#   HARDENING_STEPS="asan fuzz" scripts/hardening.sh    a subset
#
# Steps (each in its own build directory, all gitignored by /build*/):
#   asan      build-asan: -fsanitize=address,undefined (clang if present,
#             else gcc), the WHOLE meson test suite with leak detection and
#             UBSan halting on the first report
#   tsan      build-tsan: -fsanitize=thread, the concurrency tests
#             (tests/hardening/test_concurrency.c, tests/test_threads.c and,
#             when present, tests/test_decode.c and tests/test_flash.c)
#             with tests/hardening/tsan.supp
#   valgrind  build (scripts/build.sh's): memcheck over the suites 'c',
#             'hardening' and 'fuzz-replay' (the fuzz corpus replayed without
#             libFuzzer) with meson test --setup valgrind; not 'abi'
#             (no libmasa code there)
#   pyprobes  the Python probes of issue 19 (bindings/python/tests/probes:
#             object lifetimes, threads, fork, identities, aliasing, torch
#             parameter storage) under memcheck, each in its own process,
#             forked children included, bounded by PROBE_SECONDS (default
#             900) each; tests/hardening/python-probes.supp suppresses
#             reports outside libmasa (the dynamic loader's strncmp, ...)
#   fuzz      the libFuzzer harnesses (clang only), each over a scratch copy
#             of its committed corpus: tests/fuzz/fuzz_api.c for FUZZ_SECONDS
#             (tests/fuzz/corpus), then the safetensors reader
#             tests/fuzz/fuzz_safetensors.c for FUZZ_ST_SECONDS (default 30;
#             tests/fuzz/corpus_safetensors), then ReplaceMe's estimators and
#             merge tests/fuzz/fuzz_replaceme.c for FUZZ_RM_SECONDS (default
#             20; tests/fuzz/corpus_replaceme); a crash is saved in
#             build-hardening/ as crash-*
# Logs go to build-hardening/<step>.log. Exits nonzero if any step fails or
# reports anything; prints a summary at the end.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_ST_SECONDS=${FUZZ_ST_SECONDS:-30}
FUZZ_RM_SECONDS=${FUZZ_RM_SECONDS:-20}
STEPS=${HARDENING_STEPS:-"asan tsan valgrind pyprobes fuzz"}
LOGS="$ROOT/build-hardening"
mkdir -p "$LOGS"
NPROC=$(nproc 2>/dev/null || echo 2)

SUMMARY=""
FAILED=0
T0=$(date +%s)

note() { printf '== %s\n' "$*"; }
record() { # step status seconds detail
    SUMMARY="$SUMMARY$(printf '%-9s %-5s %5ss  %s' "$1" "$2" "$3" "$4")
"
    [ "$2" = PASS ] || [ "$2" = SKIP ] || FAILED=1
}
want() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }

# clang for the sanitizer builds when it is there (libFuzzer needs it);
# gcc's ASan/UBSan/TSan work with BLIS too.
if command -v clang >/dev/null 2>&1; then SAN_CC=clang; else SAN_CC=cc; fi

# setup_dir DIR OPTIONS...: configure DIR once, then keep its options current.
setup_dir() {
    dir=$1
    shift
    if [ -f "$dir/build.ninja" ]; then
        meson configure "$dir" "$@" >/dev/null
    else
        CC=$SAN_CC meson setup "$dir" "$@" >/dev/null
    fi
}

# tail of a log for the terminal
show() { echo "---- last lines of $1"; tail -n "${2:-40}" "$1"; echo "----"; }

# meson test's summary counts: "ok N, fail N, ..."
counts() {
    awk '/^(Ok|Expected Fail|Fail|Unexpected Pass|Skipped|Timeout):/ {
        gsub(/:/, ""); n = $NF; $NF = ""; sub(/ +$/, "");
        printf "%s%s %s", sep, tolower($0), n; sep = ", " }' "$1"
}

# ---------------------------------------------------------------- asan ----
if want asan; then
    note "asan: build-asan with -fsanitize=address,undefined ($SAN_CC)"
    t=$(date +%s)
    log="$LOGS/asan.log"
    if setup_dir build-asan -Db_sanitize=address,undefined -Db_lundef=false \
           > "$log" 2>&1 && meson compile -C build-asan >> "$log" 2>&1; then
        # CK_EXCLUDE_TAGS: fork during running threads (tests/test_identity.c)
        # runs natively and under valgrind, not under ASan's leak check.
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 CK_EXCLUDE_TAGS=fork-threads \
            meson test -C build-asan --no-rebuild --print-errorlogs \
                --num-processes "$NPROC" >> "$log" 2>&1
        rc=$?
        # Expected failures (known-bug reproducers) must not hide a report.
        reports=$(grep -c -E 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' \
                  build-asan/meson-logs/testlog.txt 2>/dev/null)
        detail="$(counts "$log"); sanitizer reports: ${reports:-0}"
        if [ $rc -eq 0 ] && [ "${reports:-0}" -eq 0 ]; then
            record asan PASS $(( $(date +%s) - t )) "$detail"
        else
            record asan FAIL $(( $(date +%s) - t )) "$detail (see $log)"
            show "$log" 60
        fi
    else
        record asan FAIL $(( $(date +%s) - t )) "configure/build failed (see $log)"
        show "$log"
    fi
fi

# ---------------------------------------------------------------- tsan ----
if want tsan; then
    note "tsan: build-tsan with -fsanitize=thread ($SAN_CC)"
    t=$(date +%s)
    log="$LOGS/tsan.log"
    targets="test_concurrency"
    tests="concurrency"
    # Suites whose code runs on the pool with shared outputs: threading,
    # decoding (split key ranges), the flash kernels (split key tiles),
    # Matrix PCA (column blocks, calls sharing a context).
    for t_name in threads decode flash compress_pca; do
        if [ -f "tests/test_$t_name.c" ]; then
            targets="$targets test_$t_name"
            tests="$tests $t_name"
        fi
    done
    if setup_dir build-tsan -Db_sanitize=thread -Db_lundef=false \
           > "$log" 2>&1 && meson compile -C build-tsan $targets >> "$log" 2>&1
    then
        # BLIS is not instrumented; tsan.supp explains what it suppresses.
        TSAN_OPTIONS="suppressions=$ROOT/tests/hardening/tsan.supp:halt_on_error=0:exitcode=66:second_deadlock_stack=1" \
            meson test -C build-tsan --no-rebuild --print-errorlogs \
                --num-processes 1 $tests >> "$log" 2>&1
        rc=$?
        reports=$(grep -c 'WARNING: ThreadSanitizer' \
                  build-tsan/meson-logs/testlog.txt 2>/dev/null)
        detail="tests: $tests; $(counts "$log"); TSan reports: ${reports:-0}"
        if [ $rc -eq 0 ] && [ "${reports:-0}" -eq 0 ]; then
            record tsan PASS $(( $(date +%s) - t )) "$detail"
        else
            record tsan FAIL $(( $(date +%s) - t )) "$detail (see $log)"
            show "$log" 60
        fi
    else
        record tsan FAIL $(( $(date +%s) - t )) "configure/build failed (see $log)"
        show "$log"
    fi
fi

# ------------------------------------------------------------ valgrind ----
if want valgrind; then
    note "valgrind: memcheck over the 'c', 'hardening' and 'fuzz-replay' suites in build"
    t=$(date +%s)
    log="$LOGS/valgrind.log"
    if ! command -v valgrind >/dev/null 2>&1; then
        record valgrind FAIL 0 "valgrind not installed (scripts/install-deps.sh)"
    elif [ ! -f build/build.ninja ]; then
        record valgrind FAIL 0 "no ./build: run scripts/build.sh first"
    elif meson compile -C build > "$log" 2>&1; then
        meson test -C build --no-rebuild --setup valgrind --print-errorlogs \
            --num-processes "$NPROC" --suite c --suite hardening --suite fuzz-replay \
            >> "$log" 2>&1
        rc=$?
        reports=$(grep -E 'ERROR SUMMARY: [1-9]|definitely lost: [1-9]' \
                  build/meson-logs/testlog-valgrind.txt 2>/dev/null | wc -l)
        detail="suites c, hardening, fuzz-replay; $(counts "$log"); memcheck reports: $reports"
        if [ $rc -eq 0 ] && [ "$reports" -eq 0 ]; then
            record valgrind PASS $(( $(date +%s) - t )) "$detail"
        else
            record valgrind FAIL $(( $(date +%s) - t )) "$detail (see $log)"
            show "$log" 60
        fi
    else
        record valgrind FAIL $(( $(date +%s) - t )) "build failed (see $log)"
        show "$log"
    fi
fi

# ------------------------------------------------------------ pyprobes ----
if want pyprobes; then
    note "pyprobes: the Python probes of issue 19 under valgrind memcheck"
    t=$(date +%s)
    log="$LOGS/pyprobes.log"
    : > "$log"
    probes_dir=bindings/python/tests/probes
    if ! command -v valgrind >/dev/null 2>&1; then
        record pyprobes FAIL 0 "valgrind not installed (scripts/install-deps.sh)"
    elif [ ! -f build/lib/libmasa.so ]; then
        record pyprobes FAIL 0 "no build/lib/libmasa.so: run scripts/build.sh first"
    else
        # each probe in its own process
        run_probe() { # probe -> exit status in $LOGS/pyprobe-NAME.rc
            name=$(basename "$1" .py)
            out="$LOGS/pyprobe-$name"
            case $name in p4*)
                if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
                    echo "skipped (no torch)" > "$out.log"; echo 0 > "$out.rc"; return; fi ;;
            esac
            # PYTHONMALLOC=malloc: memcheck sees every Python allocation;
            # an error anywhere, also in a forked child, exits 99.
            PYTHONMALLOC=malloc PROBE_FORKS=4 PROBE_QUICK=1 \
            PYTHONPATH="$ROOT/bindings/python" \
            MASA_LIBRARY="$ROOT/build/lib/libmasa.so" \
                timeout "${PROBE_SECONDS:-900}" valgrind -q --error-exitcode=99 \
                    --leak-check=no --num-callers=30 \
                    --suppressions="$ROOT/tests/hardening/python-probes.supp" \
                    /usr/bin/python3 "$1" > "$out.log" 2>&1
            echo $? > "$out.rc"
        }
        torch_probes=$(ls "$probes_dir"/p4*.py)
        other_probes=$(ls "$probes_dir"/p[0-9]*.py | grep -v '/p4')
        if [ "$NPROC" -ge 2 ]; then
            # two lanes: the torch probe (the longest) beside all others
            ( for probe in $torch_probes; do run_probe "$probe"; done ) &
            ( for probe in $other_probes; do run_probe "$probe"; done ) &
            wait
        else
            for probe in $torch_probes $other_probes; do run_probe "$probe"; done
        fi
        failed=""
        passed=0
        for probe in "$probes_dir"/p[0-9]*.py; do
            name=$(basename "$probe" .py)
            rc=$(cat "$LOGS/pyprobe-$name.rc" 2>/dev/null || echo missing)
            { echo "== $name: exit $rc"; cat "$LOGS/pyprobe-$name.log"; } >> "$log"
            if [ "$rc" = 0 ]; then
                passed=$((passed + 1))
            else
                failed="$failed $name($rc)"
            fi
            rm -f "$LOGS/pyprobe-$name.rc" "$LOGS/pyprobe-$name.log"
        done
        if [ -z "$failed" ]; then
            record pyprobes PASS $(( $(date +%s) - t )) "$passed probes clean under memcheck"
        else
            record pyprobes FAIL $(( $(date +%s) - t )) "failed:$failed (see $log)"
            show "$log" 60
        fi
    fi
fi

# ---------------------------------------------------------------- fuzz ----
# fuzz_one NAME SECONDS: one libFuzzer harness over a scratch copy of its
# committed corpus (tests/fuzz/corpus for fuzz_api, corpus_NAME otherwise).
fuzz_one() {
    name=$1
    seconds=$2
    step=fuzz-${name#fuzz_}
    [ "$name" = fuzz_api ] && step=fuzz
    note "$step: tests/fuzz/$name for ${seconds}s"
    t=$(date +%s)
    log="$LOGS/$step.log"
    fuzzer=""
    if [ -x "build-asan/tests/fuzz/$name" ]; then
        meson compile -C build-asan "$name" > "$log" 2>&1 &&
            fuzzer="build-asan/tests/fuzz/$name"
    elif command -v clang >/dev/null 2>&1; then
        # asan step skipped or built with gcc: a clang build just for it
        if CC=clang setup_dir build-fuzz -Db_lundef=false > "$log" 2>&1 &&
           meson compile -C build-fuzz "$name" >> "$log" 2>&1; then
            fuzzer="build-fuzz/tests/fuzz/$name"
        fi
    fi
    corpus=tests/fuzz/corpus
    [ "$name" = fuzz_api ] || corpus="tests/fuzz/corpus_${name#fuzz_}"
    # a harness's dictionary of interesting values, when it has one
    dict=""
    [ -f "tests/fuzz/$name.dict" ] && dict="-dict=tests/fuzz/$name.dict"
    if [ -z "$fuzzer" ]; then
        record "$step" FAIL $(( $(date +%s) - t )) \
            "no fuzzer: needs clang with libFuzzer (libclang-rt-14-dev) and tests/fuzz in tests/meson.build (see $log)"
        return
    fi
    # New inputs go to a scratch corpus; the committed one stays as is.
    work="$LOGS/$step-corpus"
    mkdir -p "$work"
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    ASAN_OPTIONS=detect_leaks=1 \
        "$fuzzer" -max_total_time="$seconds" -timeout=10 \
            -rss_limit_mb=2048 -print_final_stats=1 ${dict:+"$dict"} \
            -artifact_prefix="$LOGS/" "$work" "$corpus" \
            >> "$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    detail="${execs:-?} executions, coverage ${cov:-?} edges, corpus $(ls "$work" | wc -l) files"
    if [ $rc -eq 0 ]; then
        record "$step" PASS $(( $(date +%s) - t )) "$detail"
    else
        record "$step" FAIL $(( $(date +%s) - t )) \
            "$detail; CRASH, input saved as $(ls -t "$LOGS"/crash-* "$LOGS"/timeout-* "$LOGS"/leak-* "$LOGS"/oom-* 2>/dev/null | head -n 1) (see $log)"
        show "$log" 60
    fi
}

if want fuzz; then
    fuzz_one fuzz_api "$FUZZ_SECONDS"
    fuzz_one fuzz_safetensors "$FUZZ_ST_SECONDS"
    fuzz_one fuzz_replaceme "$FUZZ_RM_SECONDS"
fi

echo
echo "== hardening summary ($(( $(date +%s) - T0 ))s in all; logs in build-hardening/)"
printf '%s' "$SUMMARY"
if [ $FAILED -ne 0 ]; then
    echo "hardening: FAILED"
    exit 1
fi
echo "hardening: all clean"
