#!/usr/bin/env python3
"""Where one `guest-ping` round trip goes: the KVM exits, MMIO accesses,
interrupts and the socket calls of the VMM and the client, with the time
since the client sent the request, for minivmm or QEMU.

Needs perf and a KVM host (nested: `resources/nested-run.sh
resources/bench/ping_timeline.py [--json] [qemu]`, with the release binary and
the images built). Prints the median round trip of 100 pings, then the
events of one more, traced; with --json, one JSON object instead (median_ms,
events: [µs, thread, event, details]), as `resources/bench.sh` records it
for docs/PERFORMANCE.md.
"""
import json, os, re, subprocess, sys, tempfile
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
args = sys.argv[1:]
as_json = "--json" in args
qemu = "qemu" in args
q, a = os.path.join(tmp, "q"), os.path.join(tmp, "a")
argv = argv_qemu(images, q, a) if qemu else argv_minivmm(binary, images, q, a)
p = spawn(argv, open(os.path.join(tmp, "err"), "w+b"))
try:
    deadline = now() + BOUND
    qmp = Qmp(connect_unix(q, deadline))
    agent = Agent(connect_unix(a, deadline))
    qmp.wait_event("VSERPORT_CHANGE", lambda d: d.get("open"), deadline)
    agent.sync(deadline)
    median = median_ms(lambda: agent.cmd("guest-ping"), 100)
    if not as_json:
        print(f"guest-ping round trip, median of 100: {median:.2f} ms")
    data = os.path.join(tmp, "perf.data")
    # perf starts with its events off and turns them on when told on its
    # control fifo, then acknowledges: the traced ping is sent only once
    # tracing runs (perf's start-up takes seconds nested).
    ctl, ack = os.path.join(tmp, "ctl"), os.path.join(tmp, "ack")
    os.mkfifo(ctl)
    os.mkfifo(ack)
    cmd = ["perf", "record", "-a", "-o", data, "-D", "-1", f"--control=fifo:{ctl},{ack}"]
    for e in EVENTS:
        cmd += ["-e", e]
    perf_err = tempfile.TemporaryFile(mode="w+")
    perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=perf_err)
    with open(ctl, "w") as c, open(ack) as k:
        def tell(what):
            c.write(what + "\n")
            c.flush()
            got = k.readline()
            if got.strip().strip("\x00") != "ack":  # perf writes "ack\n\0"
                raise RuntimeError(f"perf did not acknowledge {what}: {got!r}")
        tell("enable")
        agent.cmd("guest-ping")
        tell("disable")
    perf.send_signal(2)
    perf.wait()
    perf_err.seek(0)
    script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,time,event,trace"],
                            capture_output=True, text=True)
    out = script.stdout
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
        seen = sorted({f"{r[1]}:{r[2]}" for r in rows})[:20]
        sys.exit(f"no client send traced ({len(rows)} events: {seen}; perf: {perf_err.read()[-300:]!r}, {script.stderr[-300:]!r})")
    t0 = rows[start][0]
    events = []
    for t, comm, ev, rest in rows[start:]:
        events.append([round((t - t0) * 1e6), comm, ev, rest[:70]])
        if comm.startswith("python") and "recvfrom" in ev:
            break
    if as_json:
        print(json.dumps({"vmm": "qemu" if qemu else "minivmm", "median_ms": median,
                          "events": events}))
    else:
        for us, comm, ev, rest in events:
            print(f"{us:8d} us  {comm:16.16s} {ev:28s} {rest}")
finally:
    stop(p)
