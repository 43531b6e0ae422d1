#!/usr/bin/env bash
# The project's benchmark: minivmm side by side with QEMU on the same images,
# alternating rounds, medians. Writes docs/PERFORMANCE.md (table, method,
# machine facts); every figure in the README and docs comes from it.
#
# Measured now:
#   run   `minivmm run --kernel K --initrd IMG -- uname -r`, spawn to exit,
#         against QEMU microvm + qemu-ga scripted as a user would (wait for
#         the agent, guest-exec, poll guest-exec-status, guest-shutdown).
#
# It runs nested (resources/nested-run.sh) where the host has no vmx/svm, so
# the figures are then those of an L2 guest inside a TCG-emulated L1.
#
# Usage: resources/bench.sh [--rounds N] [--no-docs]
#   --rounds N   rounds per comparison (default 5, at least 5 for the docs)
#   --no-docs    print the results only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=5
docs=1
while [[ $# -gt 0 ]]; do
    case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --no-docs) docs=0; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "bench: --rounds needs a positive number" >&2; exit 2; }
IMAGES=${MINIVMM_IMAGES:-$PWD/target/images}

if [[ "${MINIVMM_BENCH_INNER:-}" == 1 ]]; then
    # Inside the machine with KVM: one JSON line per comparison, marked.
    echo "MINIVMM-BENCH-MACHINE $(nproc) cpus, $(awk '/MemTotal/ {printf "%d MiB", $2/1024}' /proc/meminfo), kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "MINIVMM-BENCH-QEMU $(qemu-system-x86_64 --version | head -n1)"
    echo "MINIVMM-BENCH-RUN $(/usr/bin/python3 resources/bench/run_vs_qemu.py \
        --minivmm target/release/minivmm --images "$IMAGES" --rounds "$rounds")"
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
trap 'rm -f "$log"' EXIT
MINIVMM_BENCH_INNER=1 resources/nested-run.sh "$0" --rounds "$rounds" | tee "$log"
field() { sed -n "s/^$1 //p" "$log" | tail -n1; }
run=$(field MINIVMM-BENCH-RUN)
[[ -n "$run" ]] || { echo "bench: no results" >&2; exit 1; }
machine=$(field MINIVMM-BENCH-MACHINE)
qemu=$(field MINIVMM-BENCH-QEMU)
nested=no
grep -qwE 'vmx|svm' /proc/cpuinfo || nested="yes: an L2 guest in a QEMU TCG L1 with emulated SVM (resources/nested-run.sh)"

if [[ $docs -eq 0 ]]; then
    exit 0
fi
if [[ $rounds -lt 5 ]]; then
    echo "bench: fewer than 5 rounds: docs/PERFORMANCE.md left as it is" >&2
    exit 0
fi
/usr/bin/python3 - "$run" "$machine" "$qemu" "$nested" "$(git describe --always --dirty 2>/dev/null || echo unknown)" >docs/PERFORMANCE.md <<'EOF'
import json, sys, datetime
run, machine, qemu, nested, commit = sys.argv[1:]
r = json.loads(run)
m, q = r["minivmm"], r["qemu"]
def fmt(s): return f"{s['median'] / 1000:.2f} s"
def rng(s): return f"{s['min'] / 1000:.2f}–{s['max'] / 1000:.2f} s"
print(f"""# Performance

Written by `resources/bench.sh` (do not edit by hand); run it again to refresh.
Measured {datetime.date.today().isoformat()} at commit `{commit}`.

## Machine

* KVM host for the guests: {machine}
* nested: {nested}
* QEMU compared with: {qemu}
* Guest: Debian's cloud kernel `{r['release']}`, the agent test initrd
  (`target/images/agent-initrd.img`: busybox and qemu-ga), 1 vcpu, 512 MiB.

## `minivmm run` against QEMU + qemu-ga

Wall time from spawning the VMM to its exit, for running `uname -r` in a
fresh guest and getting its output ({r['rounds']} rounds, alternating which
goes first, after one warm-up round of each; medians):

| | median | min–max | runs (ms) |
|---|---|---|---|
| `minivmm run --initrd IMG -- uname -r` | {fmt(m)} | {rng(m)} | {', '.join(map(str, m['runs']))} |
| QEMU microvm + qemu-ga (`guest-exec`) | {fmt(q)} | {rng(q)} | {', '.join(map(str, q['runs']))} |
| ratio minivmm / QEMU | {r['ratio']:.2f} | | |

Method (`resources/bench/run_vs_qemu.py`):

* minivmm: `minivmm run --kernel vmlinuz --modules modules --initrd
  agent-initrd.img -- uname -r`; minivmm packs its init and the
  virtio modules with the initrd's files, the command's output comes over a
  virtio-console port and the guest powers off when it ends.
* QEMU, as a user scripts it (vmtest's method): `qemu-system-x86_64 -M
  microvm,acpi=on,rtc=on -enable-kvm -cpu host -nodefaults` with the same
  kernel and initrd (its `/init` loads the modules and starts qemu-ga) and
  the agent on a virtio-serial port; the host connects to the agent socket,
  sends `guest-sync-delimited` until the agent answers (0.5 s per try),
  `guest-exec /bin/uname -r`, polls `guest-exec-status` every 10 ms until it
  exited, sends `guest-shutdown` and waits for QEMU to exit.
* Both print the same release; a round where either fails or differs stops
  the benchmark.
""")
EOF
echo "bench: wrote docs/PERFORMANCE.md" >&2
