#!/usr/bin/env python3
"""`minivmm run -- uname -r` against the flow a user scripts without it.

Both boot the same kernel and the same initrd (the agent image: busybox and
qemu-ga) with 1 vcpu and 512 MiB, on a machine with KVM:

* minivmm: `minivmm run --kernel K --modules M --initrd IMG -- uname -r`
  (the initrd's files are the root filesystem; its /init is not run);
* QEMU: `-M microvm` with the guest agent on a virtio-serial port; the host
  waits for the agent (guest-sync-delimited until it answers), runs the
  command with guest-exec, polls guest-exec-status every 10 ms until it has
  exited (vmtest's method), then guest-shutdown and waits for QEMU to exit.

One warm-up round of each (not counted: it fills the page cache), then
rounds alternating which goes first. Each round checks the output is the
kernel's release. Prints one JSON object (times in ms) on stdout.

Usage: run_vs_qemu.py --minivmm BIN --images DIR [--rounds N]
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

from common import BOUND, QEMU, Agent, attempts, connect_unix, now, qemu_argv, summary

APPEND = "console=ttyS0 quiet minivmm.action=wait"


def minivmm_round(binary, images):
    start = now()
    p = subprocess.run(
        [
            binary, "run",
            "--kernel", os.path.join(images, "vmlinuz"),
            "--modules", os.path.join(images, "modules"),
            "--initrd", os.path.join(images, "agent-initrd.img"),
            "--memory", "512M", "--cpus", "1",
            "--", "uname", "-r",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=BOUND,
    )
    total = now() - start
    if p.returncode != 0:
        raise RuntimeError(f"minivmm run exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    return p.stdout.decode().strip(), total * 1000.0


def qemu_round(images, tmp):
    sock = os.path.join(tmp, "qga.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    start = now()
    deadline = start + BOUND
    q = subprocess.Popen(
        qemu_argv(images, APPEND, sock, "null"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        agent = Agent(connect_unix(sock, deadline))
        agent.sync(deadline)
        st = agent.exec_wait("/bin/uname", ["-r"], deadline)
        out = base64.b64decode(st.get("out-data", "")).decode().strip()
        if st.get("exitcode") != 0:
            raise RuntimeError(f"uname exited {st.get('exitcode')}")
        agent.send({"execute": "guest-shutdown"})
        q.wait(timeout=max(1.0, deadline - now()))
        total = now() - start
    finally:
        if q.poll() is None:
            q.kill()
            q.wait()
    return out, total * 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not shutil.which(QEMU):
        sys.exit(f"{QEMU} not found (Debian package qemu-system-x86)")
    mv, qm = [], []
    failed = {"minivmm": 0, "qemu": 0}
    release = None
    with tempfile.TemporaryDirectory(prefix="minivmm-bench-") as tmp:
        for r in range(-1, a.rounds):
            order = [("minivmm", mv), ("qemu", qm)]
            if r % 2:
                order.reverse()
            for name, acc in order:
                if name == "minivmm":
                    (out, ms), f = attempts(name, lambda: minivmm_round(a.minivmm, a.images))
                else:
                    (out, ms), f = attempts(name, lambda: qemu_round(a.images, tmp))
                failed[name] += f
                if release is None:
                    release = out
                if out != release or not out:
                    raise RuntimeError(f"{name} printed {out!r}, expected {release!r}")
                if r < 0:
                    print(f"bench: warm-up: {name} {ms:.0f} ms", file=sys.stderr, flush=True)
                    continue
                acc.append(ms)
                print(f"bench: round {r + 1}: {name} {ms:.0f} ms", file=sys.stderr, flush=True)
    m, q = summary(mv), summary(qm)
    print(json.dumps({
        "release": release,
        "rounds": a.rounds,
        "minivmm": m,
        "qemu": q,
        "ratio": round(statistics.median(mv) / statistics.median(qm), 2),
        "failed_attempts": failed,
    }))


if __name__ == "__main__":
    main()
