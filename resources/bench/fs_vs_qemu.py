#!/usr/bin/env python3
"""Host directories in the guest: minivmm's virtio-fs against QEMU's, and
against QEMU's 9p.

One host directory holds a 64 MiB file of random bytes and 10 000 small
files (100 directories of 100). Each round boots the agent test initrd
(busybox + qemu-ga) on Debian's generic kernel (the cloud kernel has no
9p), 1 vcpu, 512 MiB, once in each configuration:

* minivmm: `--share DIR:/mnt` (a vhost-user-fs device on virtio-mmio,
  served by the virtiofsd minivmm starts, guest RAM a shared memfd);
* qemu-virtiofs: QEMU microvm with a `memory-backend-memfd` (share=on),
  virtio-mmio version 2 (`-global virtio-mmio.force-legacy=false`: the
  daemon refuses legacy devices) and a `vhost-user-fs-device` whose socket
  a virtiofsd started by this script serves, with the same options minivmm
  gives it (`cache=auto`);
* qemu-9p: QEMU microvm with `-fsdev local` + `virtio-9p-device`, the
  guest mounting it `trans=virtio,version=9p2000.L,msize=512000` (what
  `-virtfs` users mount; no cache option).

In the guest, through qemu-ga's guest-exec, one shell script mounts the
share (tag share0) and times with the guest's own clock (/proc/uptime,
10 ms steps), on a cold guest page cache (a fresh boot):

* read: `dd if=big of=/dev/null bs=1M`, MB/s;
* find: `find DIR/many | wc -l` (10 101 entries), entries/s.

It also checks the size it read and the count it found. One warm-up round
(not counted: it fills the host's page cache), then rounds rotating which
goes first. Prints one JSON object on stdout.

Usage: fs_vs_qemu.py --minivmm BIN --images DIR [--rounds N] [--virtiofsd PATH]
"""

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import (BOUND, MEMORY_MIB, QEMU, Agent, attempts, connect_unix, now, qemu_argv,
                    stop, summary)

APPEND = "console=ttyS0 quiet minivmm.action=wait"
BIG_MIB = 64
DIRS, FILES = 100, 100
ENTRIES = 1 + DIRS + DIRS * FILES  # find prints the top directory too
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
KERNEL = "l1/vmlinuz"  # Debian's generic kernel
INITRD = "generic/agent-initrd.img"  # its agent initrd, with 9p modules
P9_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"
CONFIGS = ["minivmm", "qemu-virtiofs", "qemu-9p"]

# Loads 9p's modules when the image has them, mounts the share and times
# the two jobs with the guest's clock.
GUEST_SCRIPT = """
set -e
if [ "$1" = 9p ]; then
    for m in netfs fscache 9pnet 9pnet_virtio 9p; do
        [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null || true
    done
fi
mkdir -p /mnt
mount -t "$1" -o "$2" share0 /mnt
up() { cut -d' ' -f1 /proc/uptime; }
t0=$(up)
dd if=/mnt/big of=/dev/null bs=1048576 2>/dev/null
t1=$(up)
n=$(find /mnt/many | wc -l)
t2=$(up)
size=$(stat -c %s /mnt/big)
echo "t0=$t0 t1=$t1 t2=$t2 n=$n size=$size"
"""


def make_tree(root):
    with open(os.path.join(root, "big"), "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))
    for d in range(DIRS):
        sub = os.path.join(root, "many", f"d{d:03}")
        os.makedirs(sub)
        for i in range(FILES):
            with open(os.path.join(sub, f"f{i:03}"), "w") as f:
                f.write(f"{d} {i}\n")


def wait_for_path(path, deadline, proc):
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"virtiofsd exited {proc.returncode} before making its socket")
        if now() > deadline:
            raise RuntimeError(f"no socket at {path}")
        time.sleep(0.005)


def launch(config, a, share, tmp):
    """Starts `config`'s VMM (and its daemon); returns (processes, agent
    socket path, mount type, mount options)."""
    agent = os.path.join(tmp, f"{config}.qga")
    if os.path.exists(agent):
        os.unlink(agent)
    img = a.images
    err = open(os.path.join(tmp, f"{config}.stderr"), "w")
    if config == "minivmm":
        argv = [
            a.minivmm, "--kernel", os.path.join(img, KERNEL),
            "--initrd", os.path.join(img, INITRD),
            "--append", APPEND, "--memory", f"{MEMORY_MIB}M", "--cpus", "1",
            "--serial", "none", "--no-reboot", "--agent", f"unix:{agent}",
            "--share", f"{share}:/mnt", "--virtiofsd", a.virtiofsd,
        ]
        vm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=err)
        return [vm], agent, "virtiofs", "rw"
    argv = qemu_argv(img, APPEND, agent, "null", KERNEL, INITRD)
    procs = []
    if config == "qemu-virtiofs":
        sock = os.path.join(tmp, "vfs.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        d = subprocess.Popen([a.virtiofsd, f"--socket-path={sock}", "-o", f"source={share}",
                              "-o", "cache=auto", "-o", "log_level=warn"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        procs.append(d)
        wait_for_path(sock, now() + 30, d)
        i = argv.index("-M")
        argv[i + 1] += ",memory-backend=mem"
        argv += [
            # microvm's virtio-mmio is legacy by default; vhost-user needs 1.0.
            "-global", "virtio-mmio.force-legacy=false",
            "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
            "-chardev", f"socket,id=vfs,path={sock}",
            "-device", "vhost-user-fs-device,chardev=vfs,tag=share0",
        ]
        fstype, opts = "virtiofs", "rw"
    else:
        argv += [
            "-fsdev", f"local,id=fs0,path={share},security_model=none",
            "-device", "virtio-9p-device,fsdev=fs0,mount_tag=share0",
        ]
        fstype, opts = "9p", P9_OPTIONS
    vm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    return [vm] + procs, agent, fstype, opts


# One round's bound, s: the guest times the jobs itself, so this only
# catches a hang. QEMU's 9p lists the 10 000 files at about 140 a second
# nested, and a slow host (2026-12-06) took 2.5 times as long: past BOUND.
FS_BOUND = 4 * BOUND


def one_round(config, a, share, tmp):
    deadline = now() + FS_BOUND
    procs, agent_path, fstype, opts = launch(config, a, share, tmp)
    try:
        agent = Agent(connect_unix(agent_path, deadline, procs[0]))
        agent.sync(deadline)
        st = agent.exec_wait("/bin/sh", ["-c", GUEST_SCRIPT, "sh", fstype, opts], deadline)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        if st.get("exitcode") != 0:
            err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
            raise RuntimeError(f"guest script exited {st.get('exitcode')}: {out} {err}")
        f = dict(kv.split("=", 1) for kv in out.split())
        if int(f["size"]) != BIG_MIB << 20 or int(f["n"]) != ENTRIES:
            raise RuntimeError(f"guest saw size {f['size']}, {f['n']} entries: {out}")
        read_s = float(f["t1"]) - float(f["t0"])
        find_s = float(f["t2"]) - float(f["t1"])
        agent.send({"execute": "guest-shutdown"})
        procs[0].wait(timeout=max(1.0, deadline - now()))
    except Exception as e:
        with open(os.path.join(tmp, f"{config}.stderr")) as f:
            raise RuntimeError(f"{config}: {e}; stderr: {f.read()[-2000:]!r}") from e
    finally:
        for p in procs:
            stop(p)
    # The clock steps 10 ms: a job quicker than a step counts as one step.
    return {
        "read": (BIG_MIB << 20) / max(read_s, 0.01) / 1e6,
        "find": ENTRIES / max(find_s, 0.01),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--virtiofsd", default=VIRTIOFSD)
    a = ap.parse_args()
    for tool, pkg in ((QEMU, "qemu-system-x86"), (a.virtiofsd, "qemu-system-common")):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (Debian package {pkg})")
    runs = {c: [] for c in CONFIGS}
    failed = {c: 0 for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="minivmm-bench-fs-") as tmp:
        share = os.path.join(tmp, "share")
        os.mkdir(share)
        make_tree(share)
        for rnd in range(-1, a.rounds):
            k = rnd % len(CONFIGS)
            for config in CONFIGS[k:] + CONFIGS[:k]:
                r, f = attempts(config, lambda: one_round(config, a, share, tmp))
                failed[config] += f
                what = "warm-up" if rnd < 0 else f"round {rnd + 1}"
                brief = {m: round(v, 1) for m, v in r.items()}
                print(f"bench: fs {what}: {config} {json.dumps(brief)}", file=sys.stderr,
                      flush=True)
                if rnd >= 0:
                    runs[config].append(r)
    out = {"rounds": a.rounds, "big_mib": BIG_MIB, "entries": ENTRIES,
           "p9_options": P9_OPTIONS, "failed_attempts": failed}
    for config, rs in runs.items():
        out[config] = {m: summary([r[m] for r in rs], 1) for m in ("read", "find")}
    for m in ("read", "find"):
        mv = statistics.median(r[m] for r in runs["minivmm"])
        out[f"{m}_ratio_virtiofs"] = round(mv / statistics.median(
            r[m] for r in runs["qemu-virtiofs"]), 2)
        out[f"{m}_ratio_9p"] = round(mv / statistics.median(r[m] for r in runs["qemu-9p"]), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
