#!/usr/bin/env bash
# Build minivmm guest images from Debian packages.
#
# Usage: resources/build-images.sh [--force]
#
# Outputs go to ${MINIVMM_IMAGES:-<repo>/target/images}:
#   vmlinuz         Debian cloud kernel (bzImage), from the package that
#                   linux-image-cloud-amd64 depends on
#   vmlinux         the same kernel, decompressed to an uncompressed ELF
#   initrd.img      gzip'd newc cpio: static busybox + /init + acpid config +
#                   power button/pvpanic modules (see README.md)
#   agent-initrd.img the same plus Debian's qemu-guest-agent (qemu-ga and its
#                   shared libraries) and the virtio-mmio/virtio-console
#                   modules; /init starts qemu-ga on the virtio-serial port
#                   org.qemu.guest_agent.0 before printing the banner
#   l1/vmlinuz      Debian generic kernel (what linux-image-amd64 depends on),
#                   used as the L1 VM kernel by resources/nested-run.sh
#   l1/initrd.img   busybox + virtio/9p/kvm modules + the L1 /init
#   generic/agent-initrd.img  the agent initrd for the generic kernel
#                   (l1/vmlinuz), also carrying its 9p modules (not loaded),
#                   for the file-sharing benchmark
#   debs/           apt-get download cache (safe to delete)
#
# The build is cached: if every output exists and is newer than this script,
# nothing is done (pass --force or delete the outputs to rebuild).
# Missing tools are installed with apt-get (requires root).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
REPO=$(dirname "$SCRIPT_DIR")
OUT=${MINIVMM_IMAGES:-$REPO/target/images}

# Modules loaded (in this order) by the L1 initrd.
L1_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
    virtio_pci netfs fscache 9pnet 9pnet_virtio 9p irqbypass ccp kvm kvm-amd)

# Modules loaded (in this order) by the test guest's /init: the ACPI power
# button (button + evdev, for acpid) and pvpanic-mmio (the ACPI QEMU0001
# driver; it needs the pvpanic core module, which is a module in the cloud
# kernel despite CONFIG_PVPANIC=y).
GUEST_MODULES=(evdev button pvpanic pvpanic-mmio)

# Extra modules loaded (after GUEST_MODULES) by the agent image's /init:
# virtio-mmio transport (devices enumerated from ACPI DSDT LNRO0005 nodes;
# the cloud kernel has no CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) and
# virtio_console (virtio-serial ports, /dev/vportNpM), and fuse + virtiofs
# (`--share`: mount -t virtiofs shareN DIR).
AGENT_MODULES=(virtio_ring virtio virtio_mmio virtio_console fuse virtiofs)

# Modules the generic kernel's agent image (generic/agent-initrd.img) carries
# but does not load: 9p over virtio, for the benchmark's comparison with
# QEMU's 9p (resources/bench/fs_vs_qemu.py loads them; the cloud kernel has
# no 9p). Those the kernel lacks (or has built in) are skipped.
UNLOADED_MODULES=()
GENERIC_UNLOADED_MODULES=(netfs fscache 9pnet 9pnet_virtio 9p)

# Packages unpacked for the agent image: qemu-guest-agent (/usr/sbin/qemu-ga)
# and the packages holding its shared-library closure (NEEDED entries of
# qemu-ga: libudev.so.1 libnuma.so.1 liburing.so.2 libglib-2.0.so.0
# libgmodule-2.0.so.0 libm.so.6 libc.so.6; libglib-2.0 adds libpcre2-8.so.0;
# ld-linux-x86-64.so.2 is the interpreter). The closure is recomputed with
# readelf at build time and the build fails if a library is not found here.
QGA_PACKAGES=(qemu-guest-agent libc6 libglib2.0-0 libnuma1 libudev1 liburing2 libpcre2-8-0)
QGA_PORT_NAME=org.qemu.guest_agent.0

log() { printf 'build-images: %s\n' "$*" >&2; }
die() { printf 'build-images: error: %s\n' "$*" >&2; exit 1; }

force=0
case "${1:-}" in
    --force) force=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$SCRIPT" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (usage: $0 [--force])" ;;
esac

OUTPUTS=("$OUT/vmlinuz" "$OUT/vmlinux" "$OUT/initrd.img" "$OUT/agent-initrd.img"
    "$OUT/l1/vmlinuz" "$OUT/l1/initrd.img" "$OUT/modules/modules.dep"
    "$OUT/generic/agent-initrd.img")

up_to_date() {
    local f
    for f in "${OUTPUTS[@]}"; do
        [[ -s "$f" && "$f" -nt "$SCRIPT" ]] || return 1
    done
}

if [[ $force -eq 0 ]] && up_to_date; then
    log "up to date in $OUT (use --force to rebuild)"
    exit 0
fi

# ---------------------------------------------------------------- tools ----
apt_updated=0
apt_update() {
    if [[ $apt_updated -eq 0 ]]; then
        [[ $(id -u) -eq 0 ]] || die "need root to run apt-get update/install"
        log "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        apt_updated=1
    fi
}

ensure_tools() {
    local missing=() pkg
    command -v cpio >/dev/null || missing+=(cpio)
    command -v lz4 >/dev/null || missing+=(lz4)
    command -v modinfo >/dev/null || missing+=(kmod)
    command -v xz >/dev/null || missing+=(xz-utils)
    command -v zstd >/dev/null || missing+=(zstd)
    command -v gzip >/dev/null || missing+=(gzip)
    command -v readelf >/dev/null || missing+=(binutils)
    if [[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" != "install ok installed" ]]; then
        missing+=(busybox-static)
    fi
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "installing missing packages: ${missing[*]}"
        apt_update
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
            die "apt-get install ${missing[*]} failed"
    fi
    for pkg in dpkg-deb apt-get apt-cache grep; do
        command -v "$pkg" >/dev/null || die "required tool '$pkg' not found"
    done
    BUSYBOX=$(dpkg-query -L busybox-static | grep -m1 -E '/bin/busybox$') ||
        die "cannot locate the busybox binary of package busybox-static"
    [[ -x "$BUSYBOX" ]] || die "$BUSYBOX is not executable"
}

# ------------------------------------------------------------- packages ----
# resolve_dep META: print the real package a meta package depends on.
resolve_dep() {
    local meta=$1 dep
    dep=$(apt-cache depends "$meta" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }') || true
    if [[ -z "$dep" ]]; then
        apt_update
        dep=$(apt-cache depends "$meta" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }') || true
    fi
    [[ -n "$dep" ]] || die "cannot resolve the kernel package behind '$meta' (apt-cache depends $meta)"
    printf '%s\n' "$dep"
}

# fetch_deb PKG: download PKG's .deb into $DEBS (cached) and print its path.
fetch_deb() {
    local pkg=$1 deb apt_opts=()
    deb=$(compgen -G "$DEBS/${pkg}_*.deb" | sort -V | tail -n1) || true
    if [[ -z "$deb" ]]; then
        log "downloading $pkg"
        [[ $(id -u) -eq 0 ]] && apt_opts=(-o APT::Sandbox::User=root)
        (cd "$DEBS" && apt-get download -qq "${apt_opts[@]}" "$pkg" >&2) ||
            die "apt-get download $pkg failed"
        deb=$(compgen -G "$DEBS/${pkg}_*.deb" | sort -V | tail -n1) || true
        [[ -n "$deb" ]] || die "apt-get download $pkg produced no .deb in $DEBS"
    fi
    printf '%s\n' "$deb"
}

# unpack_deb DEB DIR: extract DEB into DIR (cached via a stamp file).
unpack_deb() {
    local deb=$1 dir=$2
    if [[ ! -e "$dir/.unpacked" || "$deb" -nt "$dir/.unpacked" ]]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir" || die "dpkg-deb -x $deb failed"
        touch "$dir/.unpacked"
    fi
}

# kernel_version DIR: the single kernel version found in an unpacked package.
kernel_version() {
    local dir=$1 v
    v=$(find "$dir/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | head -n1)
    [[ -n "$v" ]] || die "no boot/vmlinuz-* in $dir"
    printf '%s\n' "$v"
}

# ------------------------------------------------------------- vmlinux -----
# extract_vmlinux BZIMAGE OUT: decompress the LZ4 (legacy frame) payload, like
# the kernel's scripts/extract-vmlinux: try every magic offset until the
# result is an ELF file.
extract_vmlinux() {
    local bz=$1 out=$2 off tmp=$2.tmp
    local offsets
    offsets=$(LC_ALL=C grep -aboP '\x02\x21\x4c\x18' "$bz" | cut -d: -f1) || true
    [[ -n "$offsets" ]] || die "no LZ4 legacy magic (02 21 4c 18) in $bz; is it LZ4 compressed?"
    for off in $offsets; do
        # lz4 complains about the trailing garbage after the stream: ignore.
        tail -c +"$((off + 1))" "$bz" | lz4 -dc >"$tmp" 2>/dev/null || true
        if [[ -s "$tmp" && "$(head -c4 "$tmp" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]]; then
            mv -f "$tmp" "$out"
            log "vmlinux: extracted LZ4 payload at offset $off ($(stat -c %s "$out") bytes)"
            return 0
        fi
    done
    rm -f "$tmp"
    die "could not extract an ELF vmlinux from $bz"
}

# ----------------------------------------------------------- initramfs -----
# populate_busybox ROOT: static busybox + applet symlinks + base dirs.
populate_busybox() {
    local root=$1 applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,mnt}
    install -m 0755 "$BUSYBOX" "$root/bin/busybox"
    while read -r applet; do
        [[ -n "$applet" && ! -e "$root/$applet" ]] || continue
        ln -s /bin/busybox "$root/$applet"
    done < <("$BUSYBOX" --list-full)
    [[ -e "$root/bin/sh" ]] || ln -s /bin/busybox "$root/bin/sh"
}

# make_cpio ROOT OUT: gzip'd newc archive of ROOT, owned by root.
make_cpio() {
    local root=$1 out=$2
    (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc -R 0:0 --quiet) | gzip -9n >"$out.tmp" ||
        die "creating $out failed"
    mv -f "$out.tmp" "$out"
}

# write_guest_init FILE [AGENT]: the test /init. The lines between the
# #@AGENT-BEGIN@ and #@AGENT-END@ markers (start qemu-ga on the guest-agent
# virtio-serial port before the banner) are kept only with AGENT=1 (the agent
# image); the plain initrd's /init does not contain them.
write_guest_init() {
    local agent=${2:-0} filter
    if [[ $agent -eq 1 ]]; then
        filter='/^#@AGENT-\(BEGIN\|END\)@$/d'
    else
        filter='/^#@AGENT-BEGIN@$/,/^#@AGENT-END@$/d'
    fi
    sed -e "$filter" -e "s/@QGA_PORT_NAME@/$QGA_PORT_NAME/g" >"$1" <<'EOF'
#!/bin/sh
# minivmm test guest init. Kernel command line contract:
#   minivmm.action=poweroff (default) | reboot | hang | wait | panic | shell
#   ... -- CMD ARGS: words after "--" reach init as arguments; they are run
#   (as one shell command line) after the banner, before the action.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
# First words, for the benchmark: when init started, by the guest's clock.
read -r up _ </proc/uptime
echo "MINIVMM-INIT uptime=$up"
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
read -r cmdline </proc/cmdline
action=poweroff
set -f
for arg in $cmdline; do
    case "$arg" in
    minivmm.action=*) action=${arg#minivmm.action=} ;;
    esac
done
set +f
# Power button (ACPI button -> evdev -> acpid -> /etc/acpi/poweroff) and
# pvpanic (ACPI QEMU0001). Failures are silent except on the shell path.
err=/dev/null
# (Only if the kernel has a console yet: with console=hvc0 it has not, and
# opening /dev/console then hangs.)
if [ "$action" = shell ] && [ -n "$(cat /sys/class/tty/console/active 2>/dev/null)" ]; then
    err=/dev/console
fi
for m in $(cat /etc/minivmm-modules); do
    insmod "/lib/modules/$m.ko" 2>>"$err"
done
# console=hvc0 (minivmm --console virtio): hvc0 exists once virtio_console is
# loaded; the kernel could not open it for init, so init's output and its
# shell's go there from now on.
case " $cmdline " in
*" console=hvc0 "*) [ -c /dev/hvc0 ] && exec </dev/hvc0 >/dev/hvc0 2>&1 ;;
esac
acpid -d -c /etc/acpi -a /etc/acpid.conf >/dev/null 2>&1 &
#@AGENT-BEGIN@
# QEMU guest agent on the virtio-serial port named @QGA_PORT_NAME@
# (no udev: find /dev/vportNpM through sysfs). Wait up to ~30 s.
mkdir -p /run /var/run /tmp
port=
i=0
while [ $i -lt 300 ]; do
    for n in /sys/class/virtio-ports/*/name; do
        [ -r "$n" ] || continue
        read -r pname <"$n" 2>/dev/null || pname=
        p=${n%/name}
        p=/dev/${p##*/}
        if [ "$pname" = @QGA_PORT_NAME@ ] && [ -c "$p" ]; then
            port=$p
            break
        fi
    done
    [ -n "$port" ] && break
    sleep 0.1
    i=$((i + 1))
done
if [ -n "$port" ]; then
    # Respawned when it dies (tests kill it to check the host side recovers).
    (while :; do
        qemu-ga -m virtio-serial -p "$port" -t /run -l /run/qemu-ga.log \
            </dev/null >/dev/null
        sleep 1
    done) &
else
    echo "minivmm: no guest-agent port"
fi
#@AGENT-END@
memkb=$(awk '$1 == "MemTotal:" { print $2 }' /proc/meminfo)
echo "MINIVMM-BANNER release=$(uname -r) nproc=$(nproc) memtotal_kb=$memkb cmdline=$cmdline"
if [ $# -gt 0 ]; then
    sh -c "$*"
fi
case "$action" in
shell)
    echo "minivmm: type 'poweroff -f' to stop the VM"
    setsid cttyhack sh
    poweroff -f
    ;;
reboot) reboot -f ;;
hang | wait) while :; do sleep 3600; done ;;
panic)
    echo 1 >/proc/sys/kernel/sysrq
    echo c >/proc/sysrq-trigger
    echo "minivmm: sysrq crash failed"
    ;;
poweroff) poweroff -f ;;
*)
    echo "minivmm: unknown minivmm.action=$action, powering off"
    poweroff -f
    ;;
esac
# Never let init exit (that panics the kernel).
while :; do sleep 3600; done
EOF
    chmod 0755 "$1"
}

# write_guest_acpid ROOT: busybox acpid config. acpid maps the KEY_POWER
# input event to "button/power PWRF ..." (its built-in map), looks the first
# -a key contained in that up ("PWRF" -> "poweroff") and runs ./poweroff in
# its -c dir.
write_guest_acpid() {
    local root=$1
    mkdir -p "$root/etc/acpi"
    printf 'PWRF poweroff\n' >"$root/etc/acpid.conf"
    printf '#!/bin/sh\nexec /bin/busybox poweroff -f\n' >"$root/etc/acpi/poweroff"
    chmod 0755 "$root/etc/acpi/poweroff"
}

write_l1_init() {
    cat >"$1" <<'EOF'
#!/bin/sh
# minivmm nested-run L1 init (see resources/nested-run.sh).
# Kernel command line: minivmm.workdir=<abs path> [minivmm.rw=<p1>,<p2>...]
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

finish() {
    echo "MINIVMM-NESTED-EXIT=$1"
    [ -n "$workdir" ] && [ -d "/host$workdir" ] && echo "$1" >"/host$workdir/exit-status" 2>/dev/null
    sync
    poweroff -f
    while :; do sleep 3600; done
}
fail() {
    echo "minivmm-l1: error: $*"
    dmesg | tail -n 20
    finish 125
}

workdir=
rw=
keep=
read -r cmdline </proc/cmdline
set -f
for arg in $cmdline; do
    case "$arg" in
    minivmm.workdir=*) workdir=${arg#minivmm.workdir=} ;;
    minivmm.rw=*) rw=${arg#minivmm.rw=} ;;
    minivmm.keep=*) keep=${arg#minivmm.keep=} ;;
    esac
done
set +f

while read -r m; do
    [ -n "$m" ] || continue
    if [ -f "/lib/modules/$m.ko" ]; then
        insmod "/lib/modules/$m.ko" || echo "minivmm-l1: warning: insmod $m failed"
    fi
done </etc/minivmm-modules

P9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /host
mount -t 9p -o "$P9,ro" host /host || fail "cannot mount the host root (9p tag 'host')"
mount -t proc proc /host/proc || fail "mount /host/proc"
mount -t sysfs sysfs /host/sys || fail "mount /host/sys"
mount -t devtmpfs devtmpfs /host/dev || fail "mount /host/dev"
ln -sf /proc/self/fd /host/dev/fd
ln -sf /proc/self/fd/0 /host/dev/stdin
ln -sf /proc/self/fd/1 /host/dev/stdout
ln -sf /proc/self/fd/2 /host/dev/stderr
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm 2>/dev/null
# A second view of the host root, to bring back host dirs (the caller's repo)
# that the fresh tmpfs on /tmp or /run below would hide.
mkdir -p /orig
mount -o bind /host /orig || fail "bind-mount the host root"
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || fail "mount /host/tmp"
mount -t tmpfs -o mode=755 tmpfs /host/run 2>/dev/null
IFS_SAVE=$IFS
IFS=,
for p in $keep; do
    mkdir -p "/host$p" && mount -o bind "/orig$p" "/host$p" || fail "cannot keep $p visible"
done
IFS=$IFS_SAVE
[ -n "$workdir" ] || fail "no minivmm.workdir= on the kernel command line"
i=0
IFS_SAVE=$IFS
IFS=,
for p in $rw; do
    mount -t 9p -o "$P9" "rw$i" "/host$p" || fail "cannot mount writable dir $p (tag rw$i)"
    i=$((i + 1))
done
IFS=$IFS_SAVE
mount -t 9p -o "$P9" share "/host$workdir" || fail "cannot mount the work dir at $workdir"

if [ ! -c /dev/kvm ]; then
    grep -qw svm /proc/cpuinfo || echo "minivmm-l1: the L1 CPU has no svm flag"
    fail "/dev/kvm missing after insmod kvm-amd"
fi

# nested-run.sh watches for this line: without it L1 did not boot.
echo "minivmm-l1: running the command"
chroot /host /bin/bash "$workdir/cmd.sh" </dev/null
finish $?
EOF
    chmod 0755 "$1"
}

# find_module KDIR NAME: path of NAME.ko[.xz|.zst|.gz] (- and _ equivalent).
find_module() {
    local kdir=$1 name=$2 pat
    pat=$(printf '%s' "$name" | sed 's/[-_]/[-_]/g')
    find "$kdir" -type f -regextype posix-extended \
        -regex ".*/${pat}\.ko(\.xz|\.zst|\.gz)?" | head -n1
}

# install_module SRC DST: copy a module, decompressing .ko.{xz,zst,gz}.
install_module() {
    local src=$1 dst=$2
    case "$src" in
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) cp "$src" "$dst" ;;
    esac || die "cannot install module $src"
}

# build_guest_initrd ROOT KDIR VER OUT [AGENT]: the test initrd (busybox,
# /init, acpid config and GUEST_MODULES from the guest kernel package). With
# AGENT=1: also AGENT_MODULES, qemu-ga and its libraries (from QGA_ROOTS, see
# install_qga) and /sbin/shutdown.
build_guest_initrd() {
    local root=$1 kdir=$2 ver=$3 out=$4 agent=${5:-0} m f
    local modules=("${GUEST_MODULES[@]}")
    [[ $agent -eq 1 ]] && modules+=("${AGENT_MODULES[@]}")
    populate_busybox "$root"
    mkdir -p "$root/lib/modules"
    : >"$root/etc/minivmm-modules"
    for m in "${modules[@]}"; do
        f=$(find_module "$kdir/lib/modules/$ver" "$m")
        if [[ -z "$f" ]]; then
            [[ $agent -eq 1 ]] && die "agent: module $m not found in $ver"
            log "guest: warning: module $m not found in $ver, skipping"
            continue
        fi
        install_module "$f" "$root/lib/modules/$m.ko"
        printf '%s\n' "$m" >>"$root/etc/minivmm-modules"
    done
    if [[ ${#UNLOADED_MODULES[@]} -gt 0 ]]; then
        for m in "${UNLOADED_MODULES[@]}"; do
            f=$(find_module "$kdir/lib/modules/$ver" "$m")
            if [[ -n "$f" ]]; then
                install_module "$f" "$root/lib/modules/$m.ko"
            fi
        done
    fi
    write_guest_acpid "$root"
    if [[ $agent -eq 1 ]]; then
        install_qga "$root"
        write_guest_shutdown "$root"
    fi
    write_guest_init "$root/init" "$agent"
    make_cpio "$root" "$out"
}

# elf_needed FILE: the DT_NEEDED sonames of an ELF file.
elf_needed() {
    LC_ALL=C readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'
}

# find_lib SONAME: the file providing SONAME in the unpacked QGA_ROOTS.
find_lib() {
    local so=$1 r d
    for r in "${QGA_ROOTS[@]}"; do
        for d in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 lib usr/lib; do
            if [[ -e "$r/$d/$so" ]]; then
                printf '%s\n' "$r/$d/$so"
                return 0
            fi
        done
    done
    return 1
}

# install_qga ROOT: /usr/sbin/qemu-ga, the closure of its DT_NEEDED libraries
# (copied, symlinks resolved, to /lib/x86_64-linux-gnu/<soname>) and the
# dynamic loader (/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...).
install_qga() {
    local root=$1 qga="" r so src interp
    local -a todo
    local -A seen=()
    for r in "${QGA_ROOTS[@]}"; do
        [[ -x "$r/usr/sbin/qemu-ga" ]] && qga="$r/usr/sbin/qemu-ga"
    done
    [[ -n "$qga" ]] || die "agent: no usr/sbin/qemu-ga in the unpacked qemu-guest-agent"
    install -D -m 0755 "$qga" "$root/usr/sbin/qemu-ga"
    interp=$(LC_ALL=C readelf -l "$qga" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
    [[ "$interp" == /lib64/ld-linux-x86-64.so.2 ]] ||
        die "agent: unexpected qemu-ga interpreter '$interp'"
    mkdir -p "$root/lib/x86_64-linux-gnu" "$root/lib64"
    mapfile -t todo < <(elf_needed "$qga")
    todo+=(ld-linux-x86-64.so.2)
    while [[ ${#todo[@]} -gt 0 ]]; do
        so=${todo[0]}
        todo=("${todo[@]:1}")
        [[ -n "${seen[$so]:-}" ]] && continue
        seen[$so]=1
        src=$(find_lib "$so") ||
            die "agent: shared library $so (needed by qemu-ga) not found in: ${QGA_PACKAGES[*]}"
        cp -L "$src" "$root/lib/x86_64-linux-gnu/$so"
        mapfile -t -O "${#todo[@]}" todo < <(elf_needed "$root/lib/x86_64-linux-gnu/$so")
    done
    ln -sfn /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
    log "agent: qemu-ga libraries: $(printf '%s\n' "${!seen[@]}" | LC_ALL=C sort | tr '\n' ' ')"
    if [[ $(id -u) -eq 0 ]]; then
        local v
        v=$(chroot "$root" /usr/sbin/qemu-ga --version 2>&1) ||
            die "agent: 'chroot $root /usr/sbin/qemu-ga --version' failed: $v"
        log "agent: chroot check: $v"
    else
        log "agent: not root, skipping the chroot qemu-ga --version check"
    fi
}

# write_guest_shutdown ROOT: /sbin/shutdown for qemu-ga's guest-shutdown,
# which runs "/sbin/shutdown -h -P|-H|-r +0 <message>" (powerdown, halt,
# reboot) and waits for it: -r -> reboot -f, anything else -> poweroff -f.
write_guest_shutdown() {
    local root=$1
    rm -f "$root/sbin/shutdown"
    cat >"$root/sbin/shutdown" <<'EOF'
#!/bin/sh
# minivmm agent image: shutdown(8) stand-in for qemu-ga's guest-shutdown.
for a in "$@"; do
    [ "$a" = -r ] && exec /bin/busybox reboot -f
done
exec /bin/busybox poweroff -f
EOF
    chmod 0755 "$root/sbin/shutdown"
}

build_l1_initrd() {
    local root=$1 kdir=$2 ver=$3 out=$4 m f name deps d builtin
    populate_busybox "$root"
    mkdir -p "$root/lib/modules"
    : >"$root/etc/minivmm-modules"
    builtin="$kdir/lib/modules/$ver/modules.builtin"
    for m in "${L1_MODULES[@]}"; do
        f=$(find_module "$kdir/lib/modules/$ver" "$m")
        if [[ -z "$f" ]]; then
            if [[ -f "$builtin" ]] && grep -qE "/${m//[-_]/[-_]}\.ko$" "$builtin"; then
                log "l1: module $m is built in, skipping"
            else
                log "l1: warning: module $m not found in $ver, skipping"
            fi
            continue
        fi
        name=$m
        install_module "$f" "$root/lib/modules/$name.ko"
        # Warn if a dependency is not in the list (it would fail to load).
        deps=$(modinfo -F depends "$root/lib/modules/$name.ko" 2>/dev/null | tr ',' ' ') || true
        for d in $deps; do
            [[ -e "$root/lib/modules/$d.ko" || -e "$root/lib/modules/${d//_/-}.ko" ]] ||
                log "l1: warning: $m depends on $d which is not loaded before it"
        done
        printf '%s\n' "$name" >>"$root/etc/minivmm-modules"
    done
    write_l1_init "$root/init"
    make_cpio "$root" "$out"
}

# ----------------------------------------------------------------- main ----
ensure_tools
DEBS="$OUT/debs"
WORK="$OUT/work"
mkdir -p "$DEBS" "$WORK" "$OUT/l1"

cloud_pkg=$(resolve_dep linux-image-cloud-amd64)
generic_pkg=${MINIVMM_L1_KERNEL_PKG:-$(resolve_dep linux-image-amd64)}
log "cloud kernel package: $cloud_pkg; L1 kernel package: $generic_pkg"

cloud_deb=$(fetch_deb "$cloud_pkg")
generic_deb=$(fetch_deb "$generic_pkg")
unpack_deb "$cloud_deb" "$WORK/cloud"
unpack_deb "$generic_deb" "$WORK/generic"
cloud_ver=$(kernel_version "$WORK/cloud")
generic_ver=$(kernel_version "$WORK/generic")

# Guest kernel.
cp "$WORK/cloud/boot/vmlinuz-$cloud_ver" "$OUT/vmlinuz.tmp"
mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
extract_vmlinux "$OUT/vmlinuz" "$OUT/vmlinux"

# The cloud kernel's modules tree with modules.dep (as depmod leaves it on an
# installed system), for `minivmm run --modules`: hard links to the unpacked
# package, and `modules` pointing at lib/modules/VERSION.
rm -rf "$OUT/cloud-modules" "$OUT/modules"
mkdir -p "$OUT/cloud-modules/lib/modules"
cp -al "$WORK/cloud/lib/modules/$cloud_ver" "$OUT/cloud-modules/lib/modules/"
depmod -b "$OUT/cloud-modules" "$cloud_ver" || die "depmod failed for $cloud_ver"
ln -s "cloud-modules/lib/modules/$cloud_ver" "$OUT/modules"

# Guest initrd.
rm -rf "$WORK/initrd"
build_guest_initrd "$WORK/initrd" "$WORK/cloud" "$cloud_ver" "$OUT/initrd.img"

# Guest-agent initrd: the same plus qemu-ga (Debian's qemu-guest-agent).
QGA_ROOTS=()
for pkg in "${QGA_PACKAGES[@]}"; do
    deb=$(fetch_deb "$pkg")
    unpack_deb "$deb" "$WORK/qga/$pkg"
    QGA_ROOTS+=("$WORK/qga/$pkg")
done
rm -rf "$WORK/agent-initrd"
build_guest_initrd "$WORK/agent-initrd" "$WORK/cloud" "$cloud_ver" "$OUT/agent-initrd.img" 1

# The agent initrd for the generic kernel (l1/vmlinuz), with 9p modules
# unloaded, for the file-sharing benchmark.
rm -rf "$WORK/generic-agent-initrd"
mkdir -p "$OUT/generic"
UNLOADED_MODULES=("${GENERIC_UNLOADED_MODULES[@]}")
build_guest_initrd "$WORK/generic-agent-initrd" "$WORK/generic" "$generic_ver" \
    "$OUT/generic/agent-initrd.img" 1
UNLOADED_MODULES=()

# L1 kernel + initrd for nested-run.sh.
cp "$WORK/generic/boot/vmlinuz-$generic_ver" "$OUT/l1/vmlinuz.tmp"
mv -f "$OUT/l1/vmlinuz.tmp" "$OUT/l1/vmlinuz"
rm -rf "$WORK/l1-initrd"
build_l1_initrd "$WORK/l1-initrd" "$WORK/generic" "$generic_ver" "$OUT/l1/initrd.img"

printf '%s\n' "cloud=$cloud_ver" "l1=$generic_ver" >"$OUT/versions"
for f in "${OUTPUTS[@]}"; do
    [[ -s "$f" ]] || die "output $f missing after build"
    touch "$f"
done
log "done: $OUT ($cloud_ver; L1 $generic_ver)"
