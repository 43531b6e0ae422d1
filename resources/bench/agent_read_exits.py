#!/usr/bin/env python3
"""Where a guest-agent file read spends its exits: the KVM exits, MMIO
accesses and interrupts (perf tracepoints, grouped by address) and the VMM's
per-thread CPU during a 16 MiB `guest-file-read`, for minivmm or QEMU.

A diagnostic, not part of the benchmark; needs perf and a KVM host (nested:
`resources/nested-run.sh resources/bench/agent_read_exits.py [qemu]`, with
target/x86_64-unknown-linux-gnu/release/minivmm and the images built).
"""
import os, subprocess, sys, tempfile, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import Agent, Qmp, Console, connect_unix, now, read_agent_file, spawn, stop, BOUND
from vmm_vs_qemu import argv_minivmm, argv_qemu

REPO = os.path.dirname(os.path.dirname(HERE))
images = os.path.join(REPO, "target/images")
binary = os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/minivmm")

def threads(pid):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            x = f.read().rsplit(")", 1)[1].split()
        name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
        out.append((name, int(x[11]) + int(x[12]), int(x[40])))
    return out

def one(name, argv, tmp):
    qmp_p, agent_p = os.path.join(tmp, "q"), os.path.join(tmp, "a")
    for p in (qmp_p, agent_p):
        if os.path.exists(p): os.unlink(p)
    err = open(os.path.join(tmp, name + ".err"), "w+b")
    p = spawn(argv, err)
    deadline = now() + BOUND
    console = Console(p.stdout)
    qmp = Qmp(connect_unix(qmp_p, deadline))
    agent = Agent(connect_unix(agent_p, deadline))
    qmp.wait_event("VSERPORT_CHANGE", lambda d: d.get("open"), deadline)
    agent.sync(deadline)
    agent.exec_wait("/bin/dd", ["if=/dev/urandom", "of=/tmp/f", "bs=1048576", "count=16"], deadline)
    t0 = threads(p.pid)
    perf = subprocess.Popen(["perf", "record", "-e", "kvm:kvm_mmio", "-e", "kvm:kvm_set_irq", "-e", "kvm:kvm_exit",
        "-a", "-o", os.path.join(tmp, name + ".data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    t = now()
    got = read_agent_file(agent, "/tmp/f")
    wall = now() - t
    perf.send_signal(2); perf.wait()
    t1 = threads(p.pid)
    print(f"== {name}: {got / wall / 1e6:.2f} MB/s, {wall:.2f} s", flush=True)
    out = subprocess.run(["perf", "script", "-i", os.path.join(tmp, name + ".data"), "-F", "event,trace"], capture_output=True, text=True).stdout
    import collections, re
    c = collections.Counter()
    for line in out.splitlines():
        line = re.sub(r"val 0x[0-9a-f]+", "val", line)
        line = re.sub(r"info [0-9a-f]+ [0-9a-f]+", "info", line)
        c[line.strip()] += 1
    for k, v in c.most_common(25):
        print(f"  {v:7d} {k}", flush=True)
    d = {}
    for (n, c, g) in t0: d.setdefault(n, [0, 0]); d[n][0] -= c; d[n][1] -= g
    for (n, c, g) in t1: d.setdefault(n, [0, 0]); d[n][0] += c; d[n][1] += g
    for n, (c, g) in sorted(d.items()):
        if c: print(f"  thread {n}: cpu {c} ticks, guest {g} ticks", flush=True)
    qmp.send({"execute": "quit"})
    try: p.wait(timeout=30)
    finally: stop(p)

tmp = tempfile.mkdtemp()
if sys.argv[1:] == ["qemu"]:
    one("qemu", argv_qemu(images, os.path.join(tmp, "q"), os.path.join(tmp, "a")), tmp)
else:
    one("minivmm", argv_minivmm(binary, images, os.path.join(tmp, "q"), os.path.join(tmp, "a")), tmp)
