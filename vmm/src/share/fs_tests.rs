//! A share end to end without a guest: the real virtiofsd behind the
//! virtio-fs device and its virtio-mmio transport, driven through the
//! transport's registers as Linux's driver does, with FUSE requests written
//! into shared guest memory. Proves the memory table, the rings, the kick
//! (the transport's queue eventfd, read only by the daemon) and the
//! interrupt (the daemon writes the irqfd itself); then the daemon's death
//! signalled and the device answering with EIO in its place.

use std::os::fd::AsRawFd;
use std::time::Duration;

use devices::bus::BusDevice;
use devices::virtio::mmio::MmioTransport;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::memory::create_guest_memory;

type Fs = MmioTransport<VhostUserFs>;

const QSIZE: u32 = 16;
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x20_0000;
const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;

fn r(t: &mut Fs, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(0, u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut Fs, off: u32, v: u32) {
    t.write(0, u64::from(off), &v.to_le_bytes());
}

fn ring_base(q: u32) -> u64 {
    0x1_0000 * u64::from(q + 1)
}

/// Feature negotiation (VERSION_1 only), both queues, DRIVER_OK.
fn bring_up(t: &mut Fs) {
    w(t, VIRTIO_MMIO_STATUS, 1 | 2);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // bit 32: VIRTIO_F_VERSION_1
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    w(t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    assert_ne!(r(t, VIRTIO_MMIO_STATUS) & 8, 0, "FEATURES_OK kept");
    for q in 0..2u32 {
        let base = ring_base(q) as u32;
        w(t, VIRTIO_MMIO_QUEUE_SEL, q);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 1024);
        w(t, VIRTIO_MMIO_QUEUE_NUM, QSIZE);
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    w(t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    let status = r(t, VIRTIO_MMIO_STATUS);
    assert_eq!(
        status & 0x40,
        0,
        "NEEDS_RESET: the backend refused the setup"
    );
    assert!(t.is_active());
}

/// A FUSE request (header + `body`) and room for `reply` bytes, as the
/// `n`-th chain of the request queue; returns the reply once the daemon
/// signalled the interrupt, asserting it succeeded.
fn request(
    dev: (&mut Fs, &GuestMemoryMmap, &EventFd),
    n: u16,
    op: (u32, u64),
    body: &[u8],
    reply: u32,
) -> Vec<u8> {
    let out = request_raw(dev, n, op, body, reply, false);
    let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
    assert_eq!(error, 0, "FUSE opcode {} failed", op.0);
    out
}

/// As [`request`], whatever the reply's error; with `orphaned` the VMM's
/// part is played (the device itself processes the queue, as the VMM makes
/// it once the daemon is gone) instead of the kick only the daemon reads.
fn request_raw(
    (t, mem, irq): (&mut Fs, &GuestMemoryMmap, &EventFd),
    n: u16,
    (opcode, nodeid): (u32, u64),
    body: &[u8],
    reply: u32,
    orphaned: bool,
) -> Vec<u8> {
    let unique = 100 + u64::from(n);
    let mut req = Vec::new();
    req.extend((40 + body.len() as u32).to_le_bytes());
    req.extend(opcode.to_le_bytes());
    req.extend(unique.to_le_bytes());
    req.extend(nodeid.to_le_bytes());
    req.extend([0u8; 16]); // uid, gid, pid, total_extlen, padding
    req.extend(body);
    let (req_at, resp_at) = (REQ + u64::from(n) * 0x1000, RESP + u64::from(n) * 0x1000);
    mem.write_slice(&req, GuestAddress(req_at)).unwrap();
    let base = ring_base(1);
    let (d0, d1) = (u64::from(n) * 2, u64::from(n) * 2 + 1);
    // struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = GuestAddress(base + i * 16);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    };
    desc(d0, req_at, req.len() as u32, 1, d1 as u16); // NEXT
    desc(d1, resp_at, reply, 2, 0); // WRITE
    let avail = base + 0x1000;
    mem.write_obj(d0 as u16, GuestAddress(avail + 4 + 2 * u64::from(n)))
        .unwrap();
    mem.write_obj(n + 1, GuestAddress(avail + 2)).unwrap();
    if orphaned {
        t.notify(1);
    } else {
        t.queue_evts()[1].write(1).unwrap();
    }
    // Interrupts until the daemon used the chain (it may signal once more
    // than that, e.g. when the ring is set up), within 10 s.
    let used = base + 0x2000;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        if idx == n + 1 {
            break;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        assert_eq!(
            ready, 1,
            "virtiofsd used no chain within 10 s (used idx {idx})"
        );
        irq.read().unwrap();
        assert_ne!(r(t, VIRTIO_MMIO_INTERRUPT_STATUS) & 1, 0);
    }
    let elem = used + 4 + 8 * u64::from(n);
    let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
    assert_eq!(u64::from(id), d0);
    let mut out = vec![0u8; len as usize];
    mem.read_slice(&mut out, GuestAddress(resp_at)).unwrap();
    assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), unique);
    out
}

#[test]
fn the_daemon_serves_fuse_requests_then_its_end_becomes_eio() {
    let Some(bin) = test_virtiofsd("the_daemon_serves_fuse_requests_then_its_end_becomes_eio")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hi from the host").unwrap();
    let spec = ShareSpec {
        host: dir.path().canonicalize().unwrap(),
        guest: "/mnt".into(),
        read_only: false,
    };
    let daemon = Daemon::resolve(Some(&bin)).unwrap();
    let fs = start_shares(&[spec], &daemon).unwrap().pop().unwrap();
    let mem = create_guest_memory(64 << 20, true).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(fs, mem.clone(), irq.try_clone().unwrap()).unwrap();
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 26);
    let mut tag = [0u8; 6];
    t.read(0, 0x100, &mut tag);
    assert_eq!(&tag, b"share0");
    bring_up(&mut t);

    // FUSE_INIT 7.31: struct fuse_init_in is 64 bytes, fuse_init_out 64.
    let mut init = Vec::new();
    for v in [7u32, 31, 0, 0, 0] {
        init.extend(v.to_le_bytes());
    }
    init.resize(64, 0);
    let out = request((&mut t, &mem, &irq), 0, (FUSE_INIT, 0), &init, 16 + 64);
    assert_eq!(
        u32::from_le_bytes(out[16..20].try_into().unwrap()),
        7,
        "major"
    );

    // LOOKUP "hello.txt" in the root (node 1): fuse_entry_out's attr.size
    // (after nodeid, generation, entry/attr valid and their nsec, attr.ino).
    let out = request(
        (&mut t, &mem, &irq),
        1,
        (FUSE_LOOKUP, 1),
        b"hello.txt\0",
        16 + 128,
    );
    let size = u64::from_le_bytes(out[16 + 48..16 + 56].try_into().unwrap());
    assert_eq!(size, 16, "the host file's size");

    // The daemon dies: its exit is signalled, and once the VMM hands the
    // queue to the device, the next request fails with EIO.
    let exit = t.device().backend_exit().unwrap().try_clone().unwrap();
    for d in minivmm_tests::virtiofsd_serving(dir.path()) {
        let pid: i32 = d.split(' ').next().unwrap().parse().unwrap();
        // SAFETY: kill(2) on the virtiofsd this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut pfd = libc::pollfd {
        fd: exit.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(ready, 1, "the daemon's end is signalled within 10 s");
    t.device_mut().backend_gone();
    let out = request_raw(
        (&mut t, &mem, &irq),
        2,
        (FUSE_LOOKUP, 1),
        b"hello.txt\0",
        16 + 128,
        true,
    );
    assert_eq!(
        i32::from_le_bytes(out[4..8].try_into().unwrap()),
        -libc::EIO,
        "the device answers in the daemon's place"
    );

    // A driver reset stops the rings; the device can be brought up again.
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!t.is_active());
}
