#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ (cargo-fuzz, libFuzzer with coverage feedback) and runs each
# for a bounded time, starting from the committed seeds in fuzz/corpus/<target>. Fails if any
# target crashes, panics (every invariant is an assertion), hangs or runs out of memory.
#
#   scripts/fuzz.sh                          # every target, 10 s each (the CI run, via test.sh)
#   FUZZ_SECONDS=600 scripts/fuzz.sh         # a longer run: 10 minutes per target
#   scripts/fuzz.sh datagram wire            # only these targets
#   FUZZ_SANITIZER=address scripts/fuzz.sh   # under AddressSanitizer (its own build directory)
#   FUZZ_CONTROLLER=0 scripts/fuzz.sh        # skip allocate_request, which builds the controller
#
# What each run finds is kept in fuzz/target/corpus/<target> (ignored by git) and reused by the
# next run; a crashing input is written to fuzz/artifacts/<target>/ and the log says how to
# reproduce and minimize it (fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-10}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-none}
FUZZ_CONTROLLER=${FUZZ_CONTROLLER:-1}
CARGO_FUZZ_VERSION=0.13.2

# cargo-fuzz drives a stable toolchain fine without a sanitizer (coverage instrumentation uses
# stable -C flags); the sanitizers need -Zsanitizer, which this lets the stable compiler accept.
# There is no nightly toolchain on CI.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

all_targets=(wire ticket token key_ring cookie datagram stun turn turn_stream)
features=()
if [ "$FUZZ_CONTROLLER" != 0 ]; then
    all_targets+=(allocate_request)
    features=(--features controller)
fi
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=("${all_targets[@]}")
fi

# The same flags for every cargo-fuzz call, so that `run` finds the build up to date. One build
# directory per sanitizer, so that switching does not throw the other build away.
target_dir=fuzz/target/$FUZZ_SANITIZER
flags=(--sanitizer "$FUZZ_SANITIZER" --target-dir "$target_dir" "${features[@]}")

echo "cargo-fuzz: $(cargo fuzz --version), $(rustc --version), sanitizer: $FUZZ_SANITIZER"
start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "built in $((SECONDS - start)) s"

logs=fuzz/target/logs
mkdir -p "$logs"
failed=()
for t in "${targets[@]}"; do
    work=fuzz/target/corpus/$t
    mkdir -p "$work" "fuzz/corpus/$t"
    log=$logs/$t.log
    # The first corpus directory receives new inputs; the committed seeds are only read.
    if cargo fuzz run "${flags[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        # libFuzzer refuses to run a binary without coverage instrumentation; check anyway.
        if ! grep -q "inline 8-bit counters" "$log"; then
            echo "FAIL $t: no coverage instrumentation (see $log)"
            failed+=("$t")
            continue
        fi
        stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 | sed -E 's/^#([0-9]+)[[:space:]]+DONE[[:space:]]+/\1 runs, /')
        echo "ok   $t: $stats"
    else
        echo "FAIL $t (log: $log):"
        tail -n 60 "$log"
        failed+=("$t")
    fi
done

echo "fuzzed ${#targets[@]} targets, ${FUZZ_SECONDS} s each, in $((SECONDS - start)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
