#!/usr/bin/env python3
"""Writes docs/PERFORMANCE.md (on stdout) from the benchmark's results.

Usage: write_docs.py RUN_JSON VMM_JSON FS_JSON MACHINE QEMU_VERSION NESTED COMMIT
(RUN_JSON from run_vs_qemu.py, VMM_JSON from vmm_vs_qemu.py, FS_JSON from
fs_vs_qemu.py.)
"""

import datetime
import json
import re
import sys

# Goals of issue 10, as ratios minivmm / QEMU: (metric, bound, "le"|"ge").
GOALS = {
    "init": (0.7, "le"),
    "agent": (0.7, "le"),
    "qmp_rtt": (0.3, "le"),
    "ping_rtt": (0.7, "le"),
    "file_read": (1.5, "ge"),
    "console": (1.0, "ge"),
}

ROWS = [
    # metric, label, unit, scale, digits
    ("init", "spawn → the init's first line on the console", "s", 1e-3, 2),
    ("agent", "spawn → qemu-ga answers `guest-ping`", "s", 1e-3, 2),
    ("uptime_at_init", "guest uptime when init starts (its own clock)", "s", 1e-3, 2),
    ("qmp_rtt", "QMP `query-status` round trip", "ms", 1, 2),
    ("ping_rtt", "`guest-ping` round trip on the agent socket", "ms", 1, 2),
    ("ping_guest", "per round trip: CPU in the guest's own code", "ms", 1, 2),
    ("ping_vcpu", "per round trip: VMM vcpu threads outside guest code (exits)", "ms", 1, 2),
    ("ping_loop", "per round trip: the VMM's other threads (event loop, I/O)", "ms", 1, 2),
    ("file_read", "`guest-file-read` of 16 MiB in 1 MiB reads", "MB/s", 1, 2),
    ("file_read_cpu", "VMM CPU outside guest code during that read, % of one core", "%", 1, 0),
    ("file_read_wait", "one 1 MiB read: request sent → reply's first byte", "ms", 1, 1),
    ("file_read_transfer", "one 1 MiB read: reply's first byte → its last", "ms", 1, 1),
    ("file_read_client", "one 1 MiB read: the client's parsing and decoding", "ms", 1, 1),
    ("console", "guest writes to its 16550 console", "KB/s", 1, 2),
    ("hvc", "guest writes to its virtio console (hvc0)", "KB/s", 1, 2),
    ("rss_kib", "VMM RSS outside guest RAM, booted", "MiB", 1 / 1024, 2),
    ("rss_files_kib", "of which mapped from files (program, libraries)", "MiB", 1 / 1024, 2),
    ("rss_after_read_kib", "VMM RSS outside guest RAM, after the read", "MiB", 1 / 1024, 2),
]


def fmt(x, scale, digits):
    return f"{x * scale:.{digits}f}"


def verdict(metric, ratio):
    if metric not in GOALS:
        return ""
    bound, how = GOALS[metric]
    ok = ratio <= bound if how == "le" else ratio >= bound
    sign = "≤" if how == "le" else "≥"
    return f"{sign} {bound}: {'met' if ok else 'not met'}"


STAMP = re.compile(r"^\[\s*(\d+\.\d+)\] (.*)$")


def timeline(dmesg, gaps=8):
    """Milestones and the largest gaps between consecutive kernel records."""
    recs = []
    for line in dmesg.splitlines():
        m = STAMP.match(line)
        if m:
            recs.append((float(m.group(1)), m.group(2)))
    if not recs:
        return ["(no dmesg)"]
    marks = ("Linux version", "clocksource: Switched", "Freeing unused kernel image (initmem)",
             "Run /init", "PCI: Fatal", "i8042", "virtio", "Trying to unpack rootfs",
             "Freeing initrd memory")
    out = ["Milestones:", ""]
    seen = set()
    for t, text in recs:
        for m in marks:
            if text.startswith(m):
                if m not in seen:
                    seen.add(m)
                    out.append(f"    [{t:10.6f}] {text[:100]}")
    deltas = sorted(((recs[i + 1][0] - recs[i][0], i) for i in range(len(recs) - 1)),
                    reverse=True)[:gaps]
    out += ["", f"The {gaps} largest gaps (time until the next record, after the record shown):", ""]
    for d, i in sorted(deltas, key=lambda x: x[1]):
        t, text = recs[i]
        out.append(f"    +{d:6.3f} s after [{t:10.6f}] {text[:90]}")
        out.append(f"{'':22}next: {recs[i + 1][1][:90]}")
    return out


def main():
    run, vmm, fs, machine, qemu, nested, commit = sys.argv[1:8]
    r, v = json.loads(run), json.loads(vmm)
    # Without a file-sharing result, the section of the docs being replaced
    # is kept, saying when and where it was measured.
    f = json.loads(fs) if fs else kept_file_sharing()
    pings = []
    for arg in sys.argv[8:]:
        try:
            pings.append(json.loads(arg))
        except ValueError:
            pass  # ping_timeline.py failed: no trace to show
    m, q = r["minivmm"], r["qemu"]
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
| `minivmm run --initrd IMG -- uname -r` | {m['median'] / 1000:.2f} s | {m['min'] / 1000:.2f}–{m['max'] / 1000:.2f} s | {', '.join(map(str, m['runs']))} |
| QEMU microvm + qemu-ga (`guest-exec`) | {q['median'] / 1000:.2f} s | {q['min'] / 1000:.2f}–{q['max'] / 1000:.2f} s | {', '.join(map(str, q['runs']))} |
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

## One guest, side by side: boot, agent, QMP, memory, console

{v['rounds']} rounds, alternating which goes first, after one warm-up round
of each; medians (min–max). Ratio = minivmm / QEMU; the goal column is
issue 10's.

| metric | QEMU | minivmm | ratio | goal |
|---|---|---|---|---|""")
    for metric, label, unit, scale, digits in ROWS:
        a, b = v["qemu"][metric], v["minivmm"][metric]
        ratio = b["median"] / a["median"] if a["median"] else float("nan")
        cell = lambda s: (f"{fmt(s['median'], scale, digits)} {unit} "
                          f"({fmt(s['min'], scale, digits)}–{fmt(s['max'], scale, digits)})")
        print(f"| {label} | {cell(a)} | {cell(b)} | {ratio:.2f} | {verdict(metric, ratio)} |")
    m_hvc, m_ser = v["minivmm"]["hvc"]["median"], v["minivmm"]["console"]["median"]
    hv = m_hvc / m_ser if m_ser else float("nan")
    print(f"""
minivmm's virtio console against its own 16550: {hv:.1f}× the throughput
(goal ≥ 10×: {'met' if hv >= 10 else 'not met'}).""")
    rss = v["minivmm"]["rss_kib"]["median"] / 1024
    files = v["minivmm"]["rss_files_kib"]["median"] / 1024
    cq, cm = v["qemu"]["file_read_cpu"]["median"], v["minivmm"]["file_read_cpu"]["median"]
    ratio = lambda m: v["minivmm"][m]["median"] / v["qemu"][m]["median"]
    print(f"""
minivmm's RSS outside guest RAM, booted: {rss:.2f} MiB (goal ≤ 2 MiB:
{'met' if rss <= 2 else 'not met'}), of which {files:.2f} MiB are pages of the
program file (it is one static executable, no shared libraries): code that
ran, shared with the page cache.

During the file read the VMM process ran outside guest code {cm:.0f}% of one
core (QEMU: {cq:.0f}%). Nested, the VMM's own code runs in the TCG-emulated
L1, many times slower than on hardware; a VMM near 100% there is limited by
its own per-byte work (reading the virtqueue, framing and checking the
agent's JSON, writing it to the client), one well below it by the guest.""")
    unmet = []
    if ratio("file_read") < 1.5:
        ph = lambda who, m: v[who][f"file_read_{m}"]["median"]
        total = lambda who: sum(ph(who, m) for m in ("wait", "transfer", "client"))
        # QEMU's chardev passes qemu-ga's bytes on as they come, so its first
        # byte marks qemu-ga's first write; minivmm routes a reply on its
        # envelope and passes it on whole, so its wait holds the crossing.
        # A free crossing: the reply whole at the client when QEMU's first
        # byte arrives, then minivmm's client time.
        best = ph("qemu", "wait") + ph("minivmm", "client")
        free = total("qemu") / best
        if free < 1.5:
            verdict_ = f"""So even if qemu-ga's writing and the crossing cost nothing, a read
  would take {best:.1f} ms with minivmm, {free:.2f}× QEMU: ≥ 1.5× needs a
  faster agent or client, not a faster VMM."""
        else:
            verdict_ = f"""If qemu-ga's writing and the crossing cost nothing, a read would take
  {best:.1f} ms with minivmm, {free:.2f}× QEMU: the crossing is where the rest
  of the goal is."""
        unmet.append(f"""* The agent file read ({ratio('file_read'):.2f}×, goal ≥ 1.5). Each 1 MiB read
  (medians above) splits at the reply's first and last byte at the client.
  QEMU's chardev passes qemu-ga's bytes on as they come, so its first byte
  comes when qemu-ga starts writing: its wait, {ph('qemu', 'wait'):.1f} ms, is the
  request's way in and qemu-ga reading and base64-encoding the MiB in the
  guest, and its transfer, {ph('qemu', 'transfer'):.1f} ms, is qemu-ga writing the 1.4 MB
  reply and QEMU carrying it. minivmm routes each reply on its envelope and
  passes it on once it has all of it, so its wait, {ph('minivmm', 'wait'):.1f} ms, holds all
  of that, and its transfer, {ph('minivmm', 'transfer'):.1f} ms, is only the write to the
  client's socket. Request → last byte: {ph('minivmm', 'wait') + ph('minivmm', 'transfer'):.1f} ms with minivmm,
  {ph('qemu', 'wait') + ph('qemu', 'transfer'):.1f} ms with QEMU. Then the client parses and decodes the
  reply, {ph('minivmm', 'client'):.1f} ms and {ph('qemu', 'client'):.1f} ms, the same work with both. minivmm keeps
  the crossing free of exits: while the guest writes, it asks it not to
  notify the transmit queue, looks at the queue every 2 ms and gives the
  buffers back a half ring at a time with one interrupt (before: one
  notification and one interrupt per write of qemu-ga's;
  `resources/bench/agent_read_exits.py` counts them). {verdict_}""")
    if ratio("ping_rtt") > 0.7:
        pm = lambda who, m: v[who][m]["median"]
        # Were minivmm's event loop free, the round trip would lose at most
        # its CPU time per round trip.
        best = (pm("minivmm", "ping_rtt") - pm("minivmm", "ping_loop")) / pm("qemu", "ping_rtt")
        exits = lambda who: pm(who, "ping_guest") + pm(who, "ping_vcpu")
        worker = next((p for p in pings if p.get("vmm") == "minivmm" and any(
            c.startswith("kworker") and e == "kvm:kvm_set_irq" for _, c, e, _ in p["events"])), None)
        kworker = ("\n  In the minivmm trace below, the request's interrupt reaches KVM through a"
                   "\n  kernel worker (`kworker`): KVM injects an irqfd on an IOAPIC pin from a"
                   "\n  workqueue, one more thread to wake, where QEMU's own thread calls"
                   "\n  `KVM_IRQ_LINE`: a VMM-side cost not yet removed." if worker else "")
        fewer = ("; so the guest and its vcpu thread\n  spend less per round trip with minivmm"
                 if exits("minivmm") < exits("qemu") else "")
        unmet.append(f"""* The `guest-ping` round trip ({ratio('ping_rtt'):.2f}×, goal ≤ 0.7). Per
  round trip (medians above), minivmm spends {pm('minivmm', 'ping_loop'):.2f} ms of CPU in its event
  loop (QEMU: {pm('qemu', 'ping_loop'):.2f} ms in its threads other than the vcpu's) and
  {pm('minivmm', 'ping_vcpu'):.2f} ms in its vcpu thread outside guest code (QEMU: {pm('qemu', 'ping_vcpu'):.2f} ms),
  while the guest's own code runs {pm('minivmm', 'ping_guest'):.2f} ms (with QEMU {pm('qemu', 'ping_guest'):.2f} ms).
  An event loop that cost nothing would bring the round trip to
  {best:.2f}× QEMU's at best{' — still above 0.7' if best > 0.7 else ''}. The vcpu thread's time is the guest's
  exits, most of them handled inside KVM: the request's interrupt costs two
  exits to the VMM on both VMMs (virtio-mmio's interrupt status is read and
  acknowledged by MMIO; there is no MSI), and the guest's timer and idle
  exits come on top (the traces below show them). minivmm adds no exit of
  its own: the guest gives its receive buffers back without notifying, and
  the reply's buffer goes back with the next request's interrupt instead of
  one of its own (QEMU interrupts the guest for it){fewer}.{kworker} Beyond that, going lower would take an interrupt without those two exits (virtio-pci
  with MSI-X), not done.""")
    if unmet:
        print("\n### What stands in the way of the goals not met\n")
        print("\n".join(unmet))
    for p in pings:
        print(f"""
One traced `guest-ping` round trip with {p['vmm']} (`resources/bench/ping_timeline.py`;
µs since the client's send; tracing slows it: untraced median of 100 in that
guest {p['median_ms']:.2f} ms):

```text""")
        for us, comm, ev, rest in p["events"]:
            print(f"{us:8d} us  {comm:16.16s} {ev:28s} {rest}")
        print("```")
    print(f"""
Method (`resources/bench/vmm_vs_qemu.py`): both boot the same kernel and
agent initrd with `console=ttyS0 quiet`, the serial console on the VMM's
stdout, QMP and the agent on Unix sockets (QEMU: `-M microvm,acpi=on` with
`virtio-serial-device` and a `virtserialport` for qemu-ga). The init prints
`MINIVMM-INIT uptime=…` first thing; "agent" is the QMP `VSERPORT_CHANGE`
(open) event, then `guest-sync-delimited` and `guest-ping` answered. The
round trips are medians of 200 `query-status` and 100 `guest-ping`; the CPU
per `guest-ping` is over those 100, from `/proc/PID/task/*/stat`: the guest
time of the threads that ran guest code (the vcpus), their other user and
system time, and the time of the VMM's other threads, in clock ticks (10 ms
each: over 100 round trips, 0.1 ms per round trip). The
file is 16 MiB of `/dev/urandom` written by `dd` in the guest. The console
figures are {v['console_bytes']} bytes to `/dev/ttyS0` and {v['hvc_bytes']} bytes to
`/dev/hvc0` written by `head -c N /dev/zero | tr` (through the guest's tty
layer), timed from `guest-exec` until the host read them all (minivmm with
`--console virtio`; QEMU with a `virtconsole` on the serial port's stdio
chardev). Nested, each byte written to the 16550 is an exit through two
levels, so 1 MiB through it would take many minutes. RSS is
`/proc/PID/smaps` without the guest-RAM mapping. Failed attempts (a round
run again): minivmm {v.get('failed_attempts', {}).get('minivmm', 0)}, QEMU {v.get('failed_attempts', {}).get('qemu', 0)}.

## Where boot time goes: the guest's dmesg

Kernel timestamps of the last minivmm round (read with `dmesg` through the
agent after boot, so printing them cost the boot nothing):
""")
    print("\n".join(timeline(v["minivmm"]["dmesg"])))
    print("""
The same for QEMU:
""")
    print("\n".join(timeline(v["qemu"]["dmesg"])))
    if isinstance(f, str):
        print(f)
    else:
        file_sharing(f)


def kept_file_sharing(path="docs/PERFORMANCE.md"):
    """The host-directory section of the current docs, headed by a line that
    says it was not measured again and when it was."""
    with open(path) as fh:
        old = fh.read()
    section = old[old.index("\n## Host directories") + 1:].rstrip("\n")
    if "was not measured again" in section:
        return "\n" + section  # kept already: its line says when
    when = re.search(r"Measured (\S+) at commit `([^`]+)`", old)
    header, rest = section.split("\n", 1)
    return (f"\n{header}\n\nThis section was not measured again in this run (its comparison"
            f"\ndid not finish); as measured {when.group(1)} at commit `{when.group(2)}`:\n{rest}")


def file_sharing(f):
    """The host-directory section: minivmm's virtio-fs, QEMU's, QEMU's 9p."""
    print(f"""
## Host directories: virtio-fs against QEMU's virtio-fs and 9p

{f['rounds']} rounds, rotating which goes first, after one warm-up round of
each; medians (min–max), timed in the guest with its own clock. Goal
(issue 11): minivmm ≥ 1.0× QEMU's virtio-fs.

| job | minivmm virtio-fs | QEMU virtio-fs | QEMU 9p | minivmm / QEMU virtio-fs | minivmm / QEMU 9p |
|---|---|---|---|---|---|""")
    rows = (("read", f"read a {f['big_mib']} MiB file (`dd bs=1M`)", "MB/s"),
            ("find", f"`find | wc -l` over {f['entries']} entries", "entries/s"))
    for m, label, unit in rows:
        cells = []
        for c in ("minivmm", "qemu-virtiofs", "qemu-9p"):
            s = f[c][m]
            cells.append(f"{s['median']:.1f} {unit} ({s['min']:.1f}–{s['max']:.1f})")
        rv, r9 = f[f"{m}_ratio_virtiofs"], f[f"{m}_ratio_9p"]
        goal = "met" if rv >= 1.0 else "not met"
        print(f"| {label} | {' | '.join(cells)} | {rv:.2f} (≥ 1.0: {goal}) | {r9:.2f} |")
    fa = f.get("failed_attempts", {})
    print(f"""
Guest: Debian's generic kernel (`target/images/l1/vmlinuz`; the cloud kernel
has no 9p) with its agent initrd (`target/images/generic/agent-initrd.img`).

9p reads the big file faster: with its default `cache=none` each 1 MiB
`read` goes to the host in 9p requests of up to `msize` (500 KB), while
virtio-fs (`cache=auto`, as minivmm and most users run it) reads through the
guest's page cache with the kernel's 128 KiB readahead, about four times
as many requests, and each request costs a notification and an interrupt through
both levels of virtualization. 9p pays for `cache=none` on everything else:
every directory entry `find` stats is a round trip.

Method (`resources/bench/fs_vs_qemu.py`): one host directory with a
{f['big_mib']} MiB file of random bytes and 100 directories of 100 small files.
Each configuration boots the agent initrd (1 vcpu, 512 MiB) and runs one
shell script through qemu-ga's `guest-exec`: mount the tag `share0`, then
`dd` the big file to /dev/null and `find` the small ones, on a cold guest
page cache (a fresh boot each round), checking the size read and the count
found. minivmm: `--share DIR:/mnt` (its own virtiofsd, `cache=auto`).
QEMU virtio-fs: `-M microvm,memory-backend=mem` with `-object
memory-backend-memfd,id=mem,share=on`, `-global
virtio-mmio.force-legacy=false` (virtiofsd refuses microvm's default legacy
virtio-mmio) and `-device vhost-user-fs-device`,
served by the same virtiofsd with the same options. QEMU 9p: `-fsdev
local,security_model=none` and `-device virtio-9p-device`, mounted with
`{f['p9_options']}`. Failed attempts (a round run again):
{', '.join(f'{k} {v}' for k, v in fa.items())}.""")


if __name__ == "__main__":
    main()
