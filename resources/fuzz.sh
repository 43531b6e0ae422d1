#!/usr/bin/env bash
# Runs the cargo-fuzz (libFuzzer) targets in fuzz/, each for a fixed time,
# starting from the committed corpus (fuzz/corpus/TARGET), and prints what each
# reached. Fails when a target finds a failing input (libFuzzer writes it to
# fuzz/artifacts/TARGET/; replay it with `cargo +nightly fuzz run TARGET FILE`).
#
# Usage: resources/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 30 (what .ci/run uses); see resources/README.md
#                       for a long run
#   TARGET              default: every target of fuzz/Cargo.toml
#
# Needs the nightly toolchain (rustup) and cargo-fuzz, which it installs with
# `cargo install cargo-fuzz --locked` when missing. Inputs found during the run
# go to target/fuzz-corpus/TARGET (not committed; copy the interesting ones to
# fuzz/corpus/TARGET by hand).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs=${1:-30}
shift || true
[[ $secs =~ ^[0-9]+$ ]] || { echo "fuzz: SECONDS_PER_TARGET must be a number, not '$secs'" >&2; exit 2; }
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^minivmm')
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly Rust toolchain is missing (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install -q cargo-fuzz --locked
fi

cargo +nightly fuzz build

summary=()
for t in "${targets[@]}"; do
    work=target/fuzz-corpus/$t
    mkdir -p "$work"
    log=target/fuzz-corpus/$t.log
    echo "fuzz: $t for ${secs}s from fuzz/corpus/$t"
    # The first corpus directory receives new inputs; the committed one is read.
    if ! cargo +nightly fuzz run "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/, the log in $log" >&2
        exit 1
    fi
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    summary+=("$(printf '%-15s %9s execs  %s' "$t" "$execs" "$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+' <<<"$last")")")
done
echo "fuzz: every target ran ${secs}s without a failure:"
printf '  %s\n' "${summary[@]}"
