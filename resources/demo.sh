#!/usr/bin/env bash
# Set up and run the demo: build minivmm and the demo guest, then boot it.
#
# Usage: resources/demo.sh
#
# With hardware KVM the Debian cloud kernel boots with an interactive busybox
# shell on the serial console (type `poweroff -f`, or Ctrl-A x, to leave).
# Without it (no vmx/svm in /proc/cpuinfo: /dev/kvm missing or software-only,
# like PVM) the demo runs inside an emulated L1 VM with nested KVM
# (resources/nested-run.sh). That L1 has no terminal for the guest, so the demo
# there is not interactive: the guest prints its banner and powers off.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
IMAGES=${MINIVMM_IMAGES:-$PWD/target/images}

resources/build-images.sh
cargo build --release -p minivmm
BIN=$PWD/target/x86_64-unknown-linux-gnu/release/minivmm

if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -e /dev/kvm ]]; then
    exec "$BIN" --kernel "$IMAGES/vmlinuz" --initrd "$IMAGES/initrd.img" \
        --append "console=ttyS0 quiet minivmm.action=shell" --memory 1G --cpus 2
fi

cat <<MSG
demo: this host has no hardware virtualization (no vmx/svm in /proc/cpuinfo), so
demo: its /dev/kvm (if any) cannot boot a stock Linux kernel. Running the demo in
demo: an emulated L1 VM with nested KVM instead. It is not interactive there: the
demo: guest prints its banner and powers off, and minivmm exits 0.
MSG
exec resources/nested-run.sh "$BIN" --kernel "$IMAGES/vmlinuz" --initrd "$IMAGES/initrd.img" \
    --append "console=ttyS0 quiet minivmm.action=poweroff" --memory 1G --cpus 2
