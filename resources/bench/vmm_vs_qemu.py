#!/usr/bin/env python3
"""minivmm against QEMU on one guest: boot, agent, QMP, memory, console.

Each round boots the agent test initrd (busybox + qemu-ga; its /init prints
`MINIVMM-INIT uptime=S` first thing) on Debian's cloud kernel with
`console=ttyS0 quiet`, 1 vcpu, 512 MiB, the serial console on the VMM's
stdout, QMP and the guest agent on Unix sockets, and measures:

* init: spawn until the init's first line reaches the host console;
* agent: spawn until qemu-ga answers (QMP `VSERPORT_CHANGE` open, then
  `guest-sync-delimited` and `guest-ping`);
* qmp_rtt: `query-status` round trip (median of 200);
* ping_rtt: `guest-ping` round trip on the agent socket (median of 100),
  and over those 100 the CPU time per round trip, ms, of the guest's code
  (ping_guest: the vcpu threads' guest time), of the VMM's vcpu threads
  outside guest code (ping_vcpu: handling exits, in KVM and in the VMM) and
  of its other threads (ping_loop: its event loop and I/O threads), from
  /proc/PID/task/*/stat (clock ticks);
* rss: the VMM's resident memory outside guest RAM (/proc/PID/smaps) once
  the agent answered;
* file_read: `guest-file-read` of a 16 MiB file in 1 MiB reads, MB/s, and
  file_read_cpu: the VMM's CPU time outside guest code during it, % of one core;
  and each 1 MiB read's phases, ms (medians of the 16): file_read_wait, from
  the request sent to the reply's first byte (the request's way in, the
  agent's read and base64); file_read_transfer, its first byte to its last
  (the 1.4 MB reply's way out of the guest); file_read_client, the client's
  JSON parsing and decoding;
* console, hvc: the guest writes N bytes to /dev/ttyS0, then M bytes to
  /dev/hvc0 (minivmm `--console virtio`, QEMU a `virtconsole` on the same
  stdio chardev as the serial port) with guest-exec of a shell pipe; KB/s
  from the command's start until the host has them all;
* the guest's dmesg (kernel timestamps, read after boot).

Then QMP `quit`. One warm-up round of each (not counted), then rounds
alternating which goes first. Prints one JSON object on stdout.

Usage: vmm_vs_qemu.py --minivmm BIN --images DIR [--rounds N] [--console-bytes N]
                      [--hvc-bytes M]
"""

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import sys
import tempfile

from common import (BOUND, MEMORY_MIB, QEMU, Agent, Console, Qmp, attempts, connect_unix,
                    now, qemu_argv, read_agent_file, rss_without_guest_ram_kib, spawn, stop,
                    summary)

APPEND = "console=ttyS0 quiet minivmm.action=wait"
FILE_MIB = 16
INIT_LINE = re.compile(rb"MINIVMM-INIT uptime=([0-9.]+)\r?\n")


def argv_minivmm(binary, images, qmp, agent):
    return [
        binary,
        "--kernel", os.path.join(images, "vmlinuz"),
        "--initrd", os.path.join(images, "agent-initrd.img"),
        "--append", APPEND, "--memory", f"{MEMORY_MIB}M", "--cpus", "1",
        "--serial", "stdio", "--console", "virtio", "--no-reboot",
        "--qmp", f"unix:{qmp}", "--agent", f"unix:{agent}",
    ]


def argv_qemu(images, qmp, agent):
    # The serial port and a virtconsole share one stdio chardev.
    argv = qemu_argv(images, APPEND, agent, "chardev:con0")
    return argv[:1] + ["-chardev", "stdio,id=con0,mux=on"] + argv[1:] + [
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-device", "virtconsole,chardev=con0",
    ]


def cpu_seconds(pid):
    """CPU seconds process `pid` spent so far outside its guest: user + system
    time of all its threads minus the time they ran guest code (guest_time)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, guest = int(fields[11]), int(fields[12]), int(fields[40])
    return (utime + stime - guest) / os.sysconf("SC_CLK_TCK")


def thread_ticks(pid):
    """Per thread of process `pid`: (user + system ticks, guest ticks)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[tid] = (int(fields[11]) + int(fields[12]), int(fields[40]))
    return out


def cpu_split_ms(before, after, n):
    """CPU ms per operation between two `thread_ticks`, n operations: the
    guest's code, the vcpu threads (those that ran guest code) outside it,
    and the other threads."""
    tick = 1000.0 / os.sysconf("SC_CLK_TCK")
    guest = vcpu = other = 0
    for tid, (total, g) in after.items():
        t0, g0 = before.get(tid, (0, 0))
        if g > 0:
            guest += g - g0
            vcpu += (total - t0) - (g - g0)
        else:
            other += total - t0
    return guest * tick / n, vcpu * tick / n, other * tick / n


def median_ms(fn, n):
    xs = []
    for _ in range(n):
        t = now()
        fn()
        xs.append((now() - t) * 1000.0)
    return statistics.median(xs)


def one_round(name, argv, qmp_path, agent_path, tmp, console_bytes, hvc_bytes):
    for p in (qmp_path, agent_path):
        if os.path.exists(p):
            os.unlink(p)
    err = open(os.path.join(tmp, f"{name}.stderr"), "w+b")
    start = now()
    deadline = start + BOUND
    p = spawn(argv, err)
    r = {}
    try:
        console = Console(p.stdout)
        qmp = Qmp(connect_unix(qmp_path, deadline))
        agent = Agent(connect_unix(agent_path, deadline))
        t = console.wait(lambda d: INIT_LINE.search(d), deadline)
        r["init"] = (t - start) * 1000.0
        r["uptime_at_init"] = float(INIT_LINE.search(console.data).group(1)) * 1000.0
        qmp.wait_event("VSERPORT_CHANGE", lambda d: d.get("open"), deadline)
        agent.sync(deadline)
        agent.cmd("guest-ping")
        r["agent"] = (now() - start) * 1000.0
        r["rss_kib"] = rss_without_guest_ram_kib(p.pid)
        r["rss_files_kib"] = rss_without_guest_ram_kib(p.pid, files_only=True)
        r["qmp_rtt"] = median_ms(lambda: qmp.cmd("query-status"), 200)
        ticks = thread_ticks(p.pid)
        r["ping_rtt"] = median_ms(lambda: agent.cmd("guest-ping"), 100)
        r["ping_guest"], r["ping_vcpu"], r["ping_loop"] = cpu_split_ms(
            ticks, thread_ticks(p.pid), 100)

        # 16 MiB read back in 1 MiB reads.
        st = agent.exec_wait("/bin/dd", ["if=/dev/urandom", "of=/tmp/f", "bs=1048576",
                                         f"count={FILE_MIB}"], deadline)
        if st.get("exitcode") != 0:
            raise RuntimeError(f"dd: {st}")
        cpu0 = cpu_seconds(p.pid)
        t = now()
        phases = []
        got = read_agent_file(agent, "/tmp/f", phases=phases)
        wall = now() - t
        r["file_read"] = got / wall / 1e6
        for i, key in enumerate(("file_read_wait", "file_read_transfer", "file_read_client")):
            r[key] = statistics.median(ph[i] for ph in phases)
        # The VMM's own CPU time (its threads outside guest code) per second
        # of the read: whether the host side is what limits it.
        r["file_read_cpu"] = (cpu_seconds(p.pid) - cpu0) / wall * 100.0
        if got != FILE_MIB << 20:
            raise RuntimeError(f"read {got} bytes of {FILE_MIB} MiB")
        r["rss_after_read_kib"] = rss_without_guest_ram_kib(p.pid)

        # Bytes through the 16550, then through the virtio console.
        for key, dev, n in (("console", "ttyS0", console_bytes),
                            ("hvc", "hvc0", hvc_bytes)):
            base = console.size()
            t = now()
            agent.cmd("guest-exec", {"path": "/bin/sh", "arg": [
                "-c", f"head -c {n} /dev/zero | tr '\\000' x >/dev/{dev}"]})
            console.wait(lambda d: d.count(b"x", base) >= n, deadline)
            r[key] = n / (now() - t) / 1e3

        st = agent.exec_wait("/bin/dmesg", [], deadline)
        r["dmesg"] = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        qmp.send({"execute": "quit"})
        p.wait(timeout=max(1.0, deadline - now()))
    except Exception as e:
        err.seek(0)
        raise RuntimeError(f"{name}: {e}; stderr: {err.read()[-2000:]!r}") from e
    finally:
        stop(p)
        err.close()
    return r


METRICS = ["init", "agent", "uptime_at_init", "qmp_rtt", "ping_rtt", "ping_guest",
           "ping_vcpu", "ping_loop", "rss_kib",
           "rss_files_kib", "rss_after_read_kib", "file_read", "file_read_cpu",
           "file_read_wait", "file_read_transfer", "file_read_client", "console", "hvc"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--console-bytes", type=int, default=16384)
    ap.add_argument("--hvc-bytes", type=int, default=1 << 20)
    a = ap.parse_args()
    if not shutil.which(QEMU):
        sys.exit(f"{QEMU} not found (Debian package qemu-system-x86)")
    runs = {"minivmm": [], "qemu": []}
    failed = {"minivmm": 0, "qemu": 0}
    with tempfile.TemporaryDirectory(prefix="minivmm-bench-") as tmp:
        qmp, agent = os.path.join(tmp, "qmp.sock"), os.path.join(tmp, "qga.sock")
        argv = {
            "minivmm": argv_minivmm(a.minivmm, a.images, qmp, agent),
            "qemu": argv_qemu(a.images, qmp, agent),
        }
        for rnd in range(-1, a.rounds):
            order = ["minivmm", "qemu"]
            if rnd % 2:
                order.reverse()
            for name in order:
                r, f = attempts(name, lambda: one_round(name, argv[name], qmp, agent, tmp,
                                                        a.console_bytes, a.hvc_bytes))
                failed[name] += f
                brief = {k: round(v, 2) for k, v in r.items() if k in METRICS}
                what = "warm-up" if rnd < 0 else f"round {rnd + 1}"
                print(f"bench: {what}: {name} {json.dumps(brief)}", file=sys.stderr, flush=True)
                if rnd >= 0:
                    runs[name].append(r)
    out = {"rounds": a.rounds, "console_bytes": a.console_bytes, "hvc_bytes": a.hvc_bytes,
           "file_mib": FILE_MIB, "failed_attempts": failed}
    for name, rs in runs.items():
        out[name] = {m: summary([r[m] for r in rs], 2) for m in METRICS}
        out[name]["dmesg"] = rs[-1]["dmesg"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
