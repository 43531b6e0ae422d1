#!/usr/bin/env bash
# Benchmark: wall time from starting minivmm to the test initrd's banner, and to
# minivmm's exit after the guest powers off. Runs nested when the host has no
# hardware virtualization (then it measures an L2 boot inside the TCG L1).
#
# Usage: resources/bench-boot.sh [RUNS]   (default 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-3}
IMAGES=${MINIVMM_IMAGES:-$PWD/target/images}

if [[ "${MINIVMM_BENCH_INNER:-}" != 1 ]]; then
    resources/build-images.sh
    cargo build --release -p minivmm
    MINIVMM_BENCH_INNER=1 exec resources/nested-run.sh "$0" "$runs"
fi

for i in $(seq "$runs"); do
    start=$(date +%s%N)
    target/x86_64-unknown-linux-gnu/release/minivmm --kernel "$IMAGES/vmlinuz" --initrd "$IMAGES/initrd.img" \
        --append "console=ttyS0 quiet minivmm.action=poweroff" --memory 512M --cpus 1 </dev/null |
        {
            banner=""
            while IFS= read -r line; do
                if [[ -z "$banner" && "$line" == *MINIVMM-BANNER* ]]; then
                    banner=$(( ($(date +%s%N) - start) / 1000000 ))
                fi
            done
            total=$(( ($(date +%s%N) - start) / 1000000 ))
            echo "bench-boot: run $i: banner after ${banner:-?} ms, exit after ${total} ms"
        }
done
