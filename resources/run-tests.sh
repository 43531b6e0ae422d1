#!/usr/bin/env bash
# The project's test command: every test, real-guest tests included.
#
# Usage: resources/run-tests.sh
#
# 0. installs what the tests need and is missing (Debian packages with apt-get,
#    the qemu.qmp Python module with pip, the Rust virtiofsd with cargo
#    install), so a fresh Debian machine needs no manual step;
# 1. builds the guest images (resources/build-images.sh; cached);
# 2. with hardware KVM (vmx/svm): `cargo test --workspace` runs everything: unit
#    tests, CLI tests, lifecycle tests with hand-made guests, real-guest tests;
# 3. without it (e.g. a PVM host): the same tests but the real-guest ones run
#    directly, and the real-guest test binary runs inside the nested runner's L1
#    VM (resources/nested-run.sh). Real-guest tests are run with
#    MINIVMM_REQUIRE_REAL_GUEST=1, so they fail rather than skip.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

hardware_kvm() { grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -e /dev/kvm ]]; }

# What the tests use: QEMU (the nested runner's L1 VM), busybox/cpio/kmod/lz4
# (guest images), socat (the socat tests), libseccomp/libcap-ng headers and
# pkg-config (building the Rust virtiofsd), and the qemu.qmp library.
export DEBIAN_FRONTEND=noninteractive
need=()
for p in qemu-system-x86 busybox-static cpio kmod lz4 socat libseccomp-dev libcap-ng-dev pkg-config; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if ((${#need[@]})); then
    [[ $(id -u) -eq 0 ]] || { echo "run-tests: missing packages ${need[*]}; run as root or install them" >&2; exit 1; }
    echo "run-tests: installing ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
    echo "run-tests: installing the qemu.qmp Python module"
    python3 -m pip install -q qemu.qmp 2>/dev/null ||
        python3 -m pip install -q --break-system-packages qemu.qmp
fi

# The Rust virtiofsd, so that `--virtiofsd` is tested with both daemons
# (Debian 12 ships only the C one, in qemu-system-common): built once from
# crates.io (it links libseccomp and libcap-ng), kept in target/.
RUST_VIRTIOFSD_VERSION=1.14.0
rust_virtiofsd=$PWD/target/rust-virtiofsd/bin/virtiofsd
if ! "$rust_virtiofsd" --version 2>/dev/null | grep -qF "$RUST_VIRTIOFSD_VERSION"; then
    echo "run-tests: building the Rust virtiofsd $RUST_VIRTIOFSD_VERSION (cargo install)"
    # From outside the workspace: its .cargo/config.toml (a static minivmm)
    # is not for virtiofsd.
    root=$PWD/target/rust-virtiofsd
    (cd / && cargo install --quiet --locked --force virtiofsd --version "$RUST_VIRTIOFSD_VERSION" \
        --root "$root")
fi
export MINIVMM_RUST_VIRTIOFSD=$rust_virtiofsd

resources/build-images.sh

# Build the binary the integration tests spawn, and every test binary.
cargo build --workspace --all-targets

if hardware_kvm; then
    echo "run-tests: hardware KVM present: real-guest tests run directly"
    MINIVMM_REQUIRE_REAL_GUEST=1 cargo test --workspace
    exit 0
fi

echo "run-tests: no hardware virtualization here: real-guest tests run nested, the rest directly"
cargo test --workspace --exclude minivmm-tests
cargo test -p minivmm-tests --lib --test cli --test lifecycle --test qmp --test qmp_lifecycle --test agent

real_guest=$(cargo test -p minivmm-tests --test real_guest --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*real_guest[^"]*\)".*/\1/p' | tail -n 1)
[[ -x "$real_guest" ]] || { echo "run-tests: cannot find the real_guest test binary" >&2; exit 1; }

# In two L1 sessions (the `minivmm run` tests apart): QEMU's TCG emulation of
# SVM sometimes crashes L1 (see resources/README.md); the runner then reruns
# the session, and shorter sessions lose less and crash less often.
#
# Nested, guests sometimes die by a triple fault (or stop) in the middle of
# their work, with QEMU as the L2 VMM as much as with minivmm (measured: 1 in
# 8 verbose boots with QEMU 7.2 in the same L1); resources/README.md has the
# figures. A session whose failed tests saw a guest triple fault (under
# `minivmm run`: "the guest rebooted before the command finished"), or a guest
# that hung until minivmm's own `--timeout` stopped it (the tests pass one, so
# a hang prints minivmm's diagnostics), or a guest agent that stopped answering
# mid-reply (minivmm logs the agent port's queue state), reruns just those
# tests, once, in a fresh L1, and says so; any other failure fails.
nested_session() {
    local log failed
    log=$(mktemp)
    if MINIVMM_REQUIRE_REAL_GUEST=1 resources/nested-run.sh "$real_guest" "$@" --test-threads=2 --color=never |
        tee "$log"; then
        rm -f "$log"
        return 0
    fi
    # The names under the last "failures:" line of libtest's summary.
    failed=$(tr -d '\r' <"$log" | awk '/^failures:$/ { n = 0; delete names; inlist = 1; next }
        inlist && /^    [^ ]/ { names[n++] = $1; next }
        inlist { inlist = 0 }
        END { for (i = 0; i < n; i++) print names[i] }')
    if [[ -z "$failed" ]] || ! grep -qE "triple fault|the guest rebooted before the command finished|--timeout of [0-9]+ s expired|agent port at the timeout" "$log"; then
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
    echo "run-tests: RERUN: a guest triple-faulted or hung in this nested session (seen as often with"
    echo "run-tests: RERUN: QEMU as the L2 VMM: resources/README.md); running once more, in a fresh L1:" $failed
    # shellcheck disable=SC2086 # one filter per failed test
    MINIVMM_REQUIRE_REAL_GUEST=1 resources/nested-run.sh "$real_guest" $failed --exact --test-threads=2 --color=never
}
echo "run-tests: running $real_guest inside the nested runner"
nested_session --skip run::
nested_session run::
