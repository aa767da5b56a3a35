#!/bin/sh
# Hardening checks of libmasa (project issue #6). Run from a clone after
# scripts/install-deps.sh and scripts/build.sh:
#
#   scripts/hardening.sh              all steps, fuzzing 60 s
#   FUZZ_SECONDS=600 scripts/hardening.sh
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
#   fuzz      the libFuzzer harness tests/fuzz/fuzz_api.c (clang only) for
#             FUZZ_SECONDS over a scratch copy of tests/fuzz/corpus; a crash
#             is saved in build-hardening/ as crash-*
# Logs go to build-hardening/<step>.log. Exits nonzero if any step fails or
# reports anything; prints a summary at the end.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
STEPS=${HARDENING_STEPS:-"asan tsan valgrind fuzz"}
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
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
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

# ---------------------------------------------------------------- fuzz ----
if want fuzz; then
    note "fuzz: tests/fuzz/fuzz_api for ${FUZZ_SECONDS}s"
    t=$(date +%s)
    log="$LOGS/fuzz.log"
    fuzzer=""
    if [ -x build-asan/tests/fuzz/fuzz_api ]; then
        meson compile -C build-asan fuzz_api > "$log" 2>&1 &&
            fuzzer=build-asan/tests/fuzz/fuzz_api
    elif command -v clang >/dev/null 2>&1; then
        # asan step skipped or built with gcc: a clang build just for it
        if CC=clang setup_dir build-fuzz -Db_lundef=false > "$log" 2>&1 &&
           meson compile -C build-fuzz fuzz_api >> "$log" 2>&1; then
            fuzzer=build-fuzz/tests/fuzz/fuzz_api
        fi
    fi
    if [ -z "$fuzzer" ]; then
        record fuzz FAIL $(( $(date +%s) - t )) \
            "no fuzzer: needs clang with libFuzzer (libclang-rt-14-dev) and tests/fuzz in tests/meson.build (see $log)"
    else
        # New inputs go to a scratch corpus; the committed one stays as is.
        work="$LOGS/fuzz-corpus"
        mkdir -p "$work"
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        ASAN_OPTIONS=detect_leaks=1 \
            "$fuzzer" -max_total_time="$FUZZ_SECONDS" -timeout=10 \
                -rss_limit_mb=2048 -print_final_stats=1 \
                -dict=tests/fuzz/fuzz_api.dict \
                -artifact_prefix="$LOGS/" "$work" tests/fuzz/corpus \
                >> "$log" 2>&1
        rc=$?
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        cov=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
        detail="${execs:-?} executions, coverage ${cov:-?} edges, corpus $(ls "$work" | wc -l) files"
        if [ $rc -eq 0 ]; then
            record fuzz PASS $(( $(date +%s) - t )) "$detail"
        else
            record fuzz FAIL $(( $(date +%s) - t )) \
                "$detail; CRASH, input saved as $(ls -t "$LOGS"/crash-* "$LOGS"/timeout-* "$LOGS"/leak-* "$LOGS"/oom-* 2>/dev/null | head -n 1) (see $log)"
            show "$log" 60
        fi
    fi
fi

echo
echo "== hardening summary ($(( $(date +%s) - T0 ))s in all; logs in build-hardening/)"
printf '%s' "$SUMMARY"
if [ $FAILED -ne 0 ]; then
    echo "hardening: FAILED"
    exit 1
fi
echo "hardening: all clean"
