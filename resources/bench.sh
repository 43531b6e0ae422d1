#!/usr/bin/env bash
# The project's benchmark: minivmm side by side with QEMU on the same images,
# alternating rounds, medians. Writes docs/PERFORMANCE.md (table, method,
# machine facts); every figure in the README and docs comes from it.
#
# Measured:
#   run   `minivmm run --kernel K --initrd IMG -- uname -r`, spawn to exit,
#         against QEMU microvm + qemu-ga scripted as a user would (wait for
#         the agent, guest-exec, poll guest-exec-status, guest-shutdown)
#         (resources/bench/run_vs_qemu.py);
#   vmm   one guest in each: spawn to init, spawn to agent, QMP and
#         guest-ping round trips, agent file read, 16550 console, RSS, and
#         the guest's dmesg timeline (resources/bench/vmm_vs_qemu.py),
#         and one traced guest-ping round trip in each where perf runs
#         (resources/bench/ping_timeline.py);
#   fs    a host directory in the guest: minivmm's virtio-fs against QEMU
#         microvm's vhost-user-fs-device (same virtiofsd) and QEMU's 9p, a
#         64 MiB read and `find | wc -l` over 10 000 files
#         (resources/bench/fs_vs_qemu.py).
#
# It runs nested (resources/nested-run.sh) where the host has no vmx/svm, so
# the figures are then those of an L2 guest inside a TCG-emulated L1.
#
# Usage: resources/bench.sh [--rounds N] [--no-docs] [--only run|vmm|fs]
#   --rounds N   rounds per comparison (default 5, at least 5 for the docs)
#   --no-docs    print the results only
#   --only WHAT  one comparison (implies --no-docs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=5
docs=1
only=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --no-docs) docs=0; shift ;;
    --only) only=$2; docs=0; shift 2 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "bench: --rounds needs a positive number" >&2; exit 2; }
[[ "$only" =~ ^(|run|vmm|fs)$ ]] || { echo "bench: --only takes run, vmm or fs" >&2; exit 2; }
IMAGES=${MINIVMM_IMAGES:-$PWD/target/images}

if [[ "${MINIVMM_BENCH_INNER:-}" == 1 ]]; then
    # Inside the machine with KVM: one JSON line per comparison, marked.
    echo "MINIVMM-BENCH-MACHINE $(nproc) cpus, $(awk '/MemTotal/ {printf "%d MiB", $2/1024}' /proc/meminfo), kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "MINIVMM-BENCH-QEMU $(qemu-system-x86_64 --version | head -n1)"
    [[ "$only" =~ ^(|run)$ ]] && echo "MINIVMM-BENCH-RUN $(/usr/bin/python3 resources/bench/run_vs_qemu.py \
        --minivmm target/x86_64-unknown-linux-gnu/release/minivmm --images "$IMAGES" --rounds "$rounds")"
    [[ "$only" =~ ^(|vmm)$ ]] && echo "MINIVMM-BENCH-VMM $(/usr/bin/python3 resources/bench/vmm_vs_qemu.py \
        --minivmm target/x86_64-unknown-linux-gnu/release/minivmm --images "$IMAGES" --rounds "$rounds")"
    # One traced guest-ping round trip in each, for the docs (needs perf).
    if [[ "$only" =~ ^(|vmm)$ ]] && perf --version >/dev/null 2>&1; then
        # A trace that does not finish is left out, not waited for.
        echo "MINIVMM-BENCH-PING-MINIVMM $(timeout 600 /usr/bin/python3 resources/bench/ping_timeline.py --json)"
        echo "MINIVMM-BENCH-PING-QEMU $(timeout 600 /usr/bin/python3 resources/bench/ping_timeline.py --json qemu)"
    fi
    [[ "$only" =~ ^(|fs)$ ]] && echo "MINIVMM-BENCH-FS $(/usr/bin/python3 resources/bench/fs_vs_qemu.py \
        --minivmm target/x86_64-unknown-linux-gnu/release/minivmm --images "$IMAGES" --rounds "$rounds")"
    exit 0
fi

if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "bench: installing qemu-system-x86 (the QEMU to compare with)" >&2
    sudo_=""
    [[ $(id -u) -eq 0 ]] || sudo_=sudo
    $sudo_ apt-get install -y -qq qemu-system-x86 >&2
fi
resources/build-images.sh
cargo build --release -p minivmm

log=$(mktemp)
trap 'rm -f "$log" "$log.md"' EXIT
MINIVMM_BENCH_INNER=1 resources/nested-run.sh "$0" --rounds "$rounds" ${only:+--only "$only"} | tee "$log"
field() { sed -n "s/^$1 //p" "$log" | tail -n1; }
run=$(field MINIVMM-BENCH-RUN)
vmm=$(field MINIVMM-BENCH-VMM)
fs=$(field MINIVMM-BENCH-FS)
[[ -n "$run$vmm$fs" ]] || { echo "bench: no results" >&2; exit 1; }
missing=""
[[ "$only" =~ ^(|run)$ && -z "$run" ]] && missing+=" run"
[[ "$only" =~ ^(|vmm)$ && -z "$vmm" ]] && missing+=" vmm"
[[ "$only" =~ ^(|fs)$ && -z "$fs" ]] && missing+=" fs"
machine=$(field MINIVMM-BENCH-MACHINE)
qemu=$(field MINIVMM-BENCH-QEMU)
nested=no
grep -qwE 'vmx|svm' /proc/cpuinfo || nested="yes: an L2 guest in a QEMU TCG L1 with emulated SVM (resources/nested-run.sh)"

if [[ -n "$missing" ]]; then
    echo "bench: no result for:$missing (see the output above); docs/PERFORMANCE.md left as it is" >&2
    exit 1
fi
if [[ $docs -eq 0 ]]; then
    exit 0
fi
if [[ $rounds -lt 5 ]]; then
    echo "bench: fewer than 5 rounds: docs/PERFORMANCE.md left as it is" >&2
    exit 0
fi
/usr/bin/python3 resources/bench/write_docs.py "$run" "$vmm" "$fs" "$machine" "$qemu" "$nested" \
    "$(git describe --always --dirty 2>/dev/null || echo unknown)" \
    "$(field MINIVMM-BENCH-PING-MINIVMM)" "$(field MINIVMM-BENCH-PING-QEMU)" >"$log.md"
mv "$log.md" docs/PERFORMANCE.md
echo "bench: wrote docs/PERFORMANCE.md" >&2
