"""What the benchmark scripts share: clocks, the two VMMs' command lines, a
qga-protocol client, a QMP client, the serial console reader and summaries.

Both VMMs boot the same kernel and initrd with 1 vcpu and 512 MiB. QEMU is
`-M microvm` (its smallest machine, with ACPI so that the guest sees the same
kind of devices) with the agent on a virtio-serial port, as a user would
script it; minivmm is started with its own flags.
"""

import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

QEMU = "qemu-system-x86_64"
MEMORY_MIB = 512
BOUND = 240.0  # one boot or one step, s


def qemu_argv(images, append, agent_sock, serial, kernel="vmlinuz", initrd="agent-initrd.img"):
    """QEMU microvm with the same kernel, initrd and size as minivmm, the
    serial port on the `serial` chardev or backend, and qemu-ga's port on
    a virtio-serial device (its chardev a socket QEMU serves at
    `agent_sock`). The kernel and initrd are paths below `images`. The
    caller adds what else it needs."""
    return [
        QEMU, "-M", "microvm,acpi=on,rtc=on,auto-kernel-cmdline=off",
        "-enable-kvm", "-cpu", "host", "-m", str(MEMORY_MIB), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", serial,
        "-kernel", os.path.join(images, kernel),
        "-initrd", os.path.join(images, initrd),
        "-append", append,
        "-device", "virtio-serial-device",
        "-chardev", f"socket,path={agent_sock},server=on,wait=off,id=qga0",
        "-device", "virtserialport,chardev=qga0,id=qga0,name=org.qemu.guest_agent.0",
    ]


def now():
    return time.monotonic()


def connect_unix(path, deadline, proc=None):
    """A connection to the socket at `path`, retried until the VMM made it
    (and while `proc`, the VMM, runs)."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the VMM exited {proc.returncode} before making {path}")
            if now() > deadline:
                raise RuntimeError(f"no socket at {path}")
            time.sleep(0.005)


class Lines:
    """Newline-delimited JSON over a socket (QMP and the guest agent)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        # When the last line's first and last bytes arrived (`now()`).
        self.first_byte = self.last_byte = None

    def send(self, obj, delimit=False):
        data = json.dumps(obj).encode() + b"\n"
        self.sock.sendall((b"\xff" if delimit else b"") + data)

    def next(self, timeout):
        """The next JSON line, or None after `timeout` s."""
        end = now() + timeout
        # Chunks are kept apart and only new ones searched, so that a long
        # line (a 1 MiB agent read is 1.4 MB of base64) costs the client
        # linear time: appending to one bytes object copies it every time.
        parts, held = [self.buf], len(self.buf)
        nl = self.buf.find(b"\n")
        self.first_byte = now() if self.buf else None
        while nl < 0:
            left = end - now()
            if left <= 0:
                self.buf = b"".join(parts)
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                self.buf = b"".join(parts)
                return None
            if not chunk:
                raise RuntimeError("the socket closed")
            if self.first_byte is None:
                self.first_byte = now()
            at = chunk.find(b"\n")
            if at >= 0:
                nl = held + at
            parts.append(chunk)
            held += len(chunk)
        self.last_byte = now()
        buf = b"".join(parts)
        line, self.buf = buf[:nl], buf[nl + 1:]
        return json.loads(line.lstrip(b"\xff").decode())


class Agent(Lines):
    """A qga-protocol client (QEMU's agent chardev or minivmm's agent socket)."""

    def sync(self, deadline, wait=0.5):
        """guest-sync-delimited until the agent answers with our id."""
        n = 0
        while now() < deadline:
            n += 1
            self.send({"execute": "guest-sync-delimited", "arguments": {"id": n}}, delimit=True)
            # Drop what comes before our answer: earlier requests' answers
            # (the agent answers every sync it got, in order) and parse
            # errors from what preceded each 0xFF.
            end = now() + wait
            while now() < end:
                r = self.next(end - now())
                if r is None:
                    break
                if r.get("return") == n:
                    return
        raise RuntimeError("the agent never answered")

    def cmd(self, execute, args=None):
        self.send({"execute": execute, "arguments": args or {}})
        r = self.next(BOUND)
        if r is None or "return" not in r:
            raise RuntimeError(f"{execute}: {r}")
        return r["return"]

    def exec_wait(self, path, args, deadline, poll=0.01):
        """guest-exec, then guest-exec-status every `poll` s until it exited."""
        pid = self.cmd("guest-exec", {"path": path, "arg": args, "capture-output": True})["pid"]
        while True:
            st = self.cmd("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return st
            if now() > deadline:
                raise RuntimeError(f"{path} {args} never finished")
            time.sleep(poll)


def read_agent_file(agent, path, chunk=1 << 20, phases=None):
    """Reads `path` in the guest through the agent (`guest-file-read` of
    `chunk` bytes at a time); returns the bytes read. With a list as
    `phases`, appends for each read that returned data the milliseconds
    (wait, transfer, client): from the request sent to the reply's first
    byte at the client (the request's way to the agent, the agent's read and
    encoding), from its first byte to its last (the reply's way out of the
    guest), and the client's parsing and decoding."""
    h = agent.cmd("guest-file-open", {"path": path, "mode": "r"})
    got = 0
    while True:
        sent = now()
        rd = agent.cmd("guest-file-read", {"handle": h, "count": chunk})
        n = len(base64.b64decode(rd["buf-b64"]))
        got += n
        if phases is not None and n:
            first, last = agent.first_byte, agent.last_byte
            phases.append(((first - sent) * 1e3, (last - first) * 1e3, (now() - last) * 1e3))
        if rd.get("eof") or rd["count"] == 0:
            break
    agent.cmd("guest-file-close", {"handle": h})
    return got


class Qmp(Lines):
    """A QMP client: negotiated, events kept apart from replies."""

    def __init__(self, sock):
        super().__init__(sock)
        self.events = []
        greeting = self.next(BOUND)
        if not greeting or "QMP" not in greeting:
            raise RuntimeError(f"QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def cmd(self, execute, args=None):
        msg = {"execute": execute}
        if args:
            msg["arguments"] = args
        self.send(msg)
        while True:
            r = self.next(BOUND)
            if r is None:
                raise RuntimeError(f"{execute}: no reply")
            if "event" in r:
                self.events.append(r)
                continue
            if "return" not in r:
                raise RuntimeError(f"{execute}: {r}")
            return r["return"]

    def wait_event(self, name, pred, deadline):
        while True:
            for e in self.events:
                if e["event"] == name and pred(e.get("data", {})):
                    self.events.remove(e)
                    return e
            r = self.next(max(0.0, deadline - now()))
            if r is None:
                raise RuntimeError(f"no {name} event")
            if "event" in r:
                self.events.append(r)


class Console:
    """Reads a VMM's serial output (its stdout) on a thread, with times."""

    def __init__(self, stream):
        self.stream = stream
        self.data = bytearray()
        self.cv = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            chunk = os.read(self.stream.fileno(), 1 << 16)
            with self.cv:
                if not chunk:
                    self.closed = True
                else:
                    self.data += chunk
                self.cv.notify_all()
            if not chunk:
                return

    def wait(self, pred, deadline):
        """Waits until `pred(data)` holds; returns the time it did."""
        with self.cv:
            while not pred(self.data):
                left = deadline - now()
                if left <= 0 or self.closed:
                    tail = bytes(self.data[-400:]).decode(errors="replace")
                    raise RuntimeError(f"console: not seen; last output: {tail!r}")
                self.cv.wait(left)
            return now()

    def size(self):
        with self.cv:
            return len(self.data)


def rss_without_guest_ram_kib(pid, files_only=False):
    """The process's resident memory outside its guest RAM mapping(s), KiB;
    with `files_only`, only what is mapped from files (the program and its
    shared libraries: code and read-only data, shared with the page cache).

    Guest RAM is the mappings at least half the guest's size (one for both
    VMMs at 512 MiB); everything else is the VMM's own."""
    total, mapping_kib, counted = 0, 0, True
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            head = fields[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                mapping_kib = (hi - lo) // 1024
                # A file mapping: an inode (5th field) and a path.
                from_file = len(fields) > 5 and fields[4] != "0" and fields[5].startswith("/")
                counted = mapping_kib < MEMORY_MIB * 1024 // 2 and (from_file or not files_only)
            elif head == "Rss:" and counted:
                total += int(fields[1])
    return total


def attempts(name, fn, tries=5):
    """`fn()`, tried again (at most `tries` times in all) when it fails: nested,
    a guest sometimes dies or hangs whatever the VMM (resources/README.md),
    more often the more it writes to its 16550 (a 2026-12-06 run lost 5 of
    13 minivmm and 2 of 9 QEMU rounds that way, all in the console step).
    Returns its result and how many attempts failed."""
    failed = 0
    while True:
        try:
            return fn(), failed
        except Exception as e:  # noqa: BLE001 - any failure of the round
            failed += 1
            print(f"bench: {name}: attempt failed: {e}", file=sys.stderr, flush=True)
            if failed >= tries:
                raise


def summary(xs, digits=0):
    r = (lambda x: round(x)) if digits == 0 else (lambda x: round(x, digits))
    return {
        "median": r(statistics.median(xs)),
        "min": r(min(xs)),
        "max": r(max(xs)),
        "runs": [r(x) for x in xs],
    }


def stop(p):
    """Kills `p` and reaps it; a process that stays (stuck in the kernel, as a
    nested QEMU once did in 9p I/O) is left behind after 30 s with a warning
    rather than hanging the benchmark."""
    if p.poll() is None:
        p.kill()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print(f"bench: pid {p.pid} did not die within 30 s of SIGKILL: left behind",
              file=sys.stderr, flush=True)


def spawn(argv, stderr):
    """`argv` with stdout piped (the serial console) and stderr to a file."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=stderr)
