#!/usr/bin/env bash
# Run a command where a real KVM is available.
#
# Usage: resources/nested-run.sh [--] CMD [ARGS...]
#
# If this host's CPU has vmx/svm and /dev/kvm exists, CMD is simply exec'ed.
# Otherwise an L1 VM (QEMU/TCG, emulated EPYC CPU with svm+npt, Debian generic
# kernel, kvm-amd loaded) is booted, the host root filesystem is shared into it
# read-only over virtio-9p, and CMD runs there (chroot'ed into the host root,
# in the caller's cwd). L1's console is streamed to
# stdout; the runner exits with CMD's exit status, or 125 if L1 failed.
#
# Inside L1 only these are writable: /tmp, /run, /dev/shm (tmpfs, empty), the
# runner's work dir (<repo>/target/nested-XXXXXX) and MINIVMM_NESTED_RW dirs.
# CMD's stdin is /dev/null.
#
# Environment:
#   MINIVMM_IMAGES        image dir (default <repo>/target/images); built by
#                         resources/build-images.sh if needed
#   MINIVMM_L1_MEM        L1 memory in MiB (default 8192)
#   MINIVMM_L1_CPUS       L1 vCPUs (default 2)
#   MINIVMM_L1_APPEND     L1 kernel command line additions (default
#                         mitigations=off; see below)
#   MINIVMM_L1_CPU_EXTRA  appended to L1's -cpu option (e.g. ,-fsgsbase)
#   MINIVMM_L1_QEMU       the QEMU binary for L1 (default: see "L1's QEMU")
#   MINIVMM_L1_QEMU_DATA  colon-separated firmware dirs for it (QEMU's -L)
#   MINIVMM_L1_RETRIES    reruns after an L1 kernel crash or boot hang (default 5)
#   MINIVMM_L1_BOOT_TIMEOUT  seconds L1 may take to start the command before it
#                         counts as hung, is killed and rerun (default 600)
#   MINIVMM_NESTED_RW     colon-separated absolute host dirs to share
#                         read-write into L1 at the same path (e.g. the cargo
#                         target dir if CMD must write there)
#   MINIVMM_NESTED_FORCE  1: always use an L1 VM, even with a usable KVM
#   MINIVMM_NESTED_KEEP   1: keep the work dir (console.log, cmd.sh)
#
# Exported into CMD's environment in L1: PATH, HOME, USER, LANG, LC_ALL,
# RUST_*, RUSTUP_*, RUSTFLAGS, RUSTDOCFLAGS, RUSTC*, and every variable named
# MINIVMM_*, CARGO*, NEXTEST*.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$SCRIPT_DIR")
OUT=${MINIVMM_IMAGES:-$REPO/target/images}
EXIT_FAIL=125

log() { printf 'nested-run: %s\n' "$*" >&2; }
die() { printf 'nested-run: error: %s\n' "$*" >&2; exit "$EXIT_FAIL"; }

[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
    printf 'usage: %s [--] CMD [ARGS...]\n' "$0" >&2
    exit 2
fi

# ----------------------------------------------------- direct execution ----
if [[ "${MINIVMM_NESTED_FORCE:-0}" != 1 ]] &&
    grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -e /dev/kvm ]]; then
    exec "$@"
fi

# ------------------------------------------------------------ prepare ------
if ! command -v qemu-system-x86_64 >/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
    log "installing qemu-system-x86"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >&2 ||
        die "apt-get install qemu-system-x86 failed"
fi
MINIVMM_IMAGES=$OUT "$SCRIPT_DIR/build-images.sh" || die "building the images failed"
for f in "$OUT/l1/vmlinuz" "$OUT/l1/initrd.img"; do
    [[ -s "$f" ]] || die "missing $f (run resources/build-images.sh)"
done

# L1's QEMU. QEMU 7.2's TCG emulation of SVM (Debian 12's qemu-system-x86)
# crashes L1's kernel in most runs of the real-guest tests: an exception taken
# in KVM's window between #VMEXIT and VMLOAD, with L2's GS base, recursing
# into a stack overflow. With QEMU 10 (bookworm-backports) the same crash
# was seen once in 7 runs (and the tests ran about twice as fast), so the retry
# below almost always recovers. So on Debian 12 the backports QEMU is unpacked once into the image dir (not
# installed: the system QEMU and its virtiofsd stay as they are) and used for
# L1; elsewhere, or if that fails, the system QEMU is used with a warning.
l1_qemu_data=
if [[ -z "${MINIVMM_L1_QEMU:-}" ]]; then
    l1_root=$OUT/l1-qemu
    if [[ ! -x "$l1_root/root/usr/bin/qemu-system-x86_64" ]] &&
        grep -qx 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
        log "fetching QEMU from bookworm-backports for L1 into $l1_root"
        rm -rf "$l1_root" && mkdir -p "$l1_root/lists/partial" "$l1_root/cache/archives/partial" "$l1_root/debs"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$l1_root/sources.list"
        apt_opts=(-o "Dir::Etc::sourcelist=$l1_root/sources.list" -o Dir::Etc::sourceparts=-
            -o "Dir::State::Lists=$l1_root/lists" -o "Dir::Cache=$l1_root/cache" -o APT::Sandbox::User=root)
        if apt-get "${apt_opts[@]}" update -qq >&2 &&
            (cd "$l1_root/debs" && apt-get "${apt_opts[@]}" download -qq \
                qemu-system-x86 qemu-system-data qemu-system-common seabios >&2); then
            for deb in "$l1_root"/debs/*.deb; do dpkg-deb -x "$deb" "$l1_root/root"; done
        fi
        rm -rf "$l1_root/lists" "$l1_root/cache" "$l1_root/debs"
    fi
    if [[ -x "$l1_root/root/usr/bin/qemu-system-x86_64" ]] &&
        "$l1_root/root/usr/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
        MINIVMM_L1_QEMU=$l1_root/root/usr/bin/qemu-system-x86_64
        l1_qemu_data=$l1_root/root/usr/share/qemu:$l1_root/root/usr/share/seabios
    else
        MINIVMM_L1_QEMU=qemu-system-x86_64
        log "WARNING: using the system QEMU ($(qemu-system-x86_64 --version | head -n1)) for L1;" \
            "its SVM emulation may crash L1 (see resources/README.md)"
    fi
fi
MINIVMM_L1_QEMU_DATA=${MINIVMM_L1_QEMU_DATA:-$l1_qemu_data}
log "L1 QEMU: $("$MINIVMM_L1_QEMU" --version | head -n1)"

mem=${MINIVMM_L1_MEM:-8192}
cpus=${MINIVMM_L1_CPUS:-2}
[[ "$mem" =~ ^[0-9]+$ ]] || die "MINIVMM_L1_MEM must be a number of MiB, got '$mem'"
[[ "$cpus" =~ ^[0-9]+$ ]] || die "MINIVMM_L1_CPUS must be a number, got '$cpus'"

cwd=$(pwd -P)
# L1 mounts fresh tmpfs on /tmp and /run; host dirs under them that the command
# needs (the repo, the cwd) are bind-mounted back inside L1.
keep_list=
for d in "$REPO" "$cwd"; do
    case "$d/" in
        /tmp/* | /run/*)
            [[ "$d" =~ ^[A-Za-z0-9/._+-]+$ ]] ||
                die "path '$d' has characters unsafe for the kernel command line"
            keep_list+="${keep_list:+,}$d" ;;
        /dev/shm/* | /proc/* | /sys/*)
            log "warning: $d is hidden by a fresh mount inside L1; the command may fail" ;;
    esac
done

mkdir -p "$REPO/target"
work=$(mktemp -d "$REPO/target/nested-XXXXXX") || die "cannot create a work dir in $REPO/target"
[[ "$work" =~ ^[A-Za-z0-9/._+-]+$ ]] || die "work dir path '$work' has characters unsafe for the kernel command line"

pipe_pid=
keep=0
# shellcheck disable=SC2317 # invoked from traps
cleanup() {
    local pid=
    [[ -s "$work/qemu.pid" ]] && pid=$(<"$work/qemu.pid")
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
    fi
    if [[ -n "$pipe_pid" ]]; then
        kill "$pipe_pid" 2>/dev/null || true
    fi
    if [[ $keep -eq 0 && "${MINIVMM_NESTED_KEEP:-0}" != 1 ]]; then
        rm -rf "$work"
    else
        log "work dir kept: $work"
    fi
}
# shellcheck disable=SC2317 # invoked from traps
on_signal() {
    log "interrupted, stopping the L1 VM"
    trap - EXIT
    cleanup
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'on_signal 129' HUP

# Writable extra dirs.
rw_args=()
rw_list=
if [[ -n "${MINIVMM_NESTED_RW:-}" ]]; then
    IFS=: read -r -a rw_dirs <<<"$MINIVMM_NESTED_RW"
    i=0
    for d in "${rw_dirs[@]}"; do
        [[ -n "$d" ]] || continue
        [[ -d "$d" ]] || die "MINIVMM_NESTED_RW: '$d' is not a directory"
        d=$(cd "$d" && pwd -P)
        [[ "$d" =~ ^/[A-Za-z0-9/._+-]*$ && "$d" != / ]] ||
            die "MINIVMM_NESTED_RW: '$d' has characters unsafe for the kernel command line"
        rw_args+=(-virtfs "local,path=$d,mount_tag=rw$i,security_model=passthrough")
        rw_list+="${rw_list:+,}$d"
        i=$((i + 1))
    done
fi

# The command script run in L1 (bash: printf %q may emit $'...' quoting).
{
    printf '#!/bin/bash\n'
    printf '# generated by nested-run.sh\n'
    while read -r name; do
        if [[ "$name" =~ ^(PATH|HOME|USER|LANG|LC_ALL|RUST_[A-Za-z0-9_]*|RUSTUP_[A-Za-z0-9_]*|RUSTFLAGS|RUSTDOCFLAGS|RUSTC|RUSTC_[A-Za-z0-9_]*|RUSTDOC|MINIVMM_[A-Za-z0-9_]*|CARGO|CARGO_[A-Za-z0-9_]*|NEXTEST|NEXTEST_[A-Za-z0-9_]*)$ ]]; then
            printf 'export %s=%q\n' "$name" "${!name}"
        fi
    done < <(compgen -e)
    printf 'cd -- %q || { echo "nested-run: cannot cd to %q in L1" >&2; exit %d; }\n' "$cwd" "$cwd" "$EXIT_FAIL"
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$work/cmd.sh"
chmod 0755 "$work/cmd.sh"

# ------------------------------------------------------------- boot L1 -----
# mitigations=off: L1 is a throwaway test machine; speculation mitigations
# only slow its emulated CPU down. (They are not what crashed L1 under QEMU
# 7.2: it crashed with and without them; see "L1's QEMU" above.)
append="console=ttyS0 panic=-1 quiet loglevel=3 minivmm.workdir=$work ${MINIVMM_L1_APPEND-mitigations=off}"
[[ -n "$rw_list" ]] && append+=" minivmm.rw=$rw_list"
[[ -n "$keep_list" ]] && append+=" minivmm.keep=$keep_list"

# EPYC with svm+npt; features TCG cannot emulate are dropped explicitly (it
# would drop them anyway, with a warning each).
l1_cpu=EPYC,+svm,+npt
for feat in rdseed sha-ni fxsr-opt misalignsse 3dnowprefetch osvw topoext nrip-save xsavec; do
    l1_cpu+=",-$feat"
done
l1_cpu+=${MINIVMM_L1_CPU_EXTRA:-}

# shellcheck disable=SC2054 # commas are part of QEMU option values
qemu_cmd=("$MINIVMM_L1_QEMU")
if [[ -n "${MINIVMM_L1_QEMU_DATA:-}" ]]; then
    IFS=: read -r -a data_dirs <<<"$MINIVMM_L1_QEMU_DATA"
    for d in "${data_dirs[@]}"; do qemu_cmd+=(-L "$d"); done
fi
qemu_cmd+=(
    -nodefaults -no-user-config
    -accel "tcg,thread=${MINIVMM_L1_TCG_THREAD:-multi}" -cpu "$l1_cpu"
    -m "$mem" -smp "$cpus"
    -display none -monitor none -serial stdio -no-reboot
    -pidfile "$work/qemu.pid"
    -kernel "$OUT/l1/vmlinuz" -initrd "$OUT/l1/initrd.img"
    -virtfs "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap"
    -virtfs "local,path=$work,mount_tag=share,security_model=passthrough"
    "${rw_args[@]}"
    -append "$append")

# One boot of L1; sets $status (empty if L1 reported none) and $elapsed.
boot_l1() {
    rm -f "$work/exit-status" "$work/console.log"
    log "booting L1 VM (TCG, ${mem} MiB, $cpus vCPUs) to run: $*"
    local start
    start=$(date +%s)
    # Background + wait, so that the signal traps run promptly. The console is
    # streamed to stdout (CRs stripped) and saved for parsing.
    rm -f "$work/boot-hung"
    "${qemu_cmd[@]}" </dev/null | sed -u 's/\r$//' | tee "$work/console.log" &
    pipe_pid=$!
    # L1 prints "minivmm-l1: running the command" once booted. A boot that
    # never gets there (seen once, on a host starved by runaway processes: no
    # console output for 36 minutes) is killed and counts as an L1 failure.
    (
        for ((i = 0; i < boot_timeout; i++)); do
            sleep 1
            grep -aq 'minivmm-l1: running the command' "$work/console.log" 2>/dev/null && exit 0
            kill -0 "$pipe_pid" 2>/dev/null || exit 0
        done
        : >"$work/boot-hung"
        [[ -s "$work/qemu.pid" ]] && kill "$(cat "$work/qemu.pid")" 2>/dev/null
    ) &
    watchdog_pid=$!
    wait "$pipe_pid" || true
    pipe_pid=
    kill "$watchdog_pid" 2>/dev/null || true
    wait "$watchdog_pid" 2>/dev/null || true
    elapsed=$(($(date +%s) - start))
    status=
    if [[ -s "$work/exit-status" ]]; then
        status=$(tr -dc '0-9' <"$work/exit-status")
    fi
    if [[ -z "$status" ]]; then
        status=$(tr -d '\r' <"$work/console.log" | grep -ao 'MINIVMM-NESTED-EXIT=[0-9]*' | tail -n1 | cut -d= -f2) || true
    fi
}

# L1's own kernel sometimes crashes while it runs a KVM guest under QEMU's TCG
# emulation of SVM (a kernel stack overflow in a vcpu thread: "BUG: TASK stack
# guard page was hit" / "corrupted stack end detected inside scheduler"; see
# resources/README.md). That is a failure of the emulated L1 machine, not of
# the command: when L1 panics without reporting an exit status, the whole
# command is run again in a fresh L1, at most MINIVMM_L1_RETRIES times
# (default 5), each time with a loud line. A command that fails is never rerun.
retries=${MINIVMM_L1_RETRIES:-5}
[[ "$retries" =~ ^[0-9]+$ ]] || die "MINIVMM_L1_RETRIES must be a number, got '$retries'"
boot_timeout=${MINIVMM_L1_BOOT_TIMEOUT:-600}
[[ "$boot_timeout" =~ ^[0-9]+$ ]] || die "MINIVMM_L1_BOOT_TIMEOUT must be a number, got '$boot_timeout'"
attempt=0
while :; do
    boot_l1 "$@"
    [[ -n "$status" ]] && break
    if ((attempt < retries)) && [[ -e "$work/boot-hung" ]]; then
        attempt=$((attempt + 1))
        cp "$work/console.log" "$work/console.hang$attempt.log"
        log "WARNING: L1 did not start the command within ${boot_timeout}s (console kept:" \
            "$work/console.hang$attempt.log); running it again in a fresh L1 (retry $attempt of $retries)"
        keep=1
        continue
    fi
    if ((attempt < retries)) && grep -aqE 'Kernel panic - not syncing|BUG: TASK stack guard page' "$work/console.log"; then
        attempt=$((attempt + 1))
        cp "$work/console.log" "$work/console.crash$attempt.log"
        log "WARNING: the L1 kernel crashed after ${elapsed}s (console kept: $work/console.crash$attempt.log);" \
            "running the command again in a fresh L1 (retry $attempt of $retries)"
        keep=1
        continue
    fi
    keep=1
    log "error: the L1 VM exited after ${elapsed}s without reporting the command's exit status" \
        "(crashed, killed or failed to boot); console log: $work/console.log"
    exit "$EXIT_FAIL"
done
((attempt == 0)) || log "WARNING: the command needed $attempt L1 retries after L1 kernel crashes"
log "L1 VM finished in ${elapsed}s; command exit status $status"
exit "$status"
