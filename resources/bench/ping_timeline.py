#!/usr/bin/env python3
"""Where one `guest-ping` round trip goes: the KVM exits, MMIO accesses,
interrupts and the socket calls of the VMM and the client, with the time
since the client sent the request, for minivmm or QEMU.

A diagnostic, not part of the benchmark; needs perf and a KVM host (nested:
`resources/nested-run.sh resources/bench/ping_timeline.py [qemu]`, with the
release binary and the images built). Prints the median round trip of 100
pings, then the events of one more, traced.
"""
import os, re, subprocess, sys, tempfile, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import Agent, Qmp, connect_unix, now, spawn, stop, BOUND
from vmm_vs_qemu import argv_minivmm, argv_qemu, median_ms

REPO = os.path.dirname(os.path.dirname(HERE))
images = os.path.join(REPO, "target/images")
binary = os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/minivmm")
EVENTS = ["kvm:kvm_mmio", "kvm:kvm_set_irq", "kvm:kvm_exit", "kvm:kvm_entry",
          "syscalls:sys_enter_sendto", "syscalls:sys_enter_recvfrom"]

tmp = tempfile.mkdtemp()
qemu = sys.argv[1:] == ["qemu"]
q, a = os.path.join(tmp, "q"), os.path.join(tmp, "a")
argv = argv_qemu(images, q, a) if qemu else argv_minivmm(binary, images, q, a)
p = spawn(argv, open(os.path.join(tmp, "err"), "w+b"))
try:
    deadline = now() + BOUND
    qmp = Qmp(connect_unix(q, deadline))
    agent = Agent(connect_unix(a, deadline))
    qmp.wait_event("VSERPORT_CHANGE", lambda d: d.get("open"), deadline)
    agent.sync(deadline)
    print(f"guest-ping round trip, median of 100: {median_ms(lambda: agent.cmd('guest-ping'), 100):.2f} ms")
    data = os.path.join(tmp, "perf.data")
    cmd = ["perf", "record", "-a", "-o", data]
    for e in EVENTS:
        cmd += ["-e", e]
    perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    agent.cmd("guest-ping")
    time.sleep(0.2)
    perf.send_signal(2)
    perf.wait()
    out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,time,event,trace"],
                         capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*(.+?)\s+([\d.]+):\s+(\S+)\s*(.*)", line)
        if not m or m.group(1).startswith("perf"):
            continue
        comm, t, ev, rest = m.groups()
        rest = re.sub(r"\s*info1.*|\s*(ubuf|buff|events): .*", "", rest)
        rows.append((float(t), comm, ev.rstrip(":"), "" if "entry" in ev else rest))
    start = next((i for i, r in enumerate(rows) if r[1].startswith("python") and "sendto" in r[2]), None)
    if start is None:
        sys.exit("no client send traced")
    t0 = rows[start][0]
    for t, comm, ev, rest in rows[start:]:
        print(f"{(t - t0) * 1e6:8.0f} us  {comm:16.16s} {ev:28s} {rest[:70]}")
        if comm.startswith("python") and "recvfrom" in ev:
            break
finally:
    stop(p)
