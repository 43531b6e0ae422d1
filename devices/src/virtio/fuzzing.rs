//! The property harness of virtio-console over virtio-mmio: the body of the
//! `virtio_console` cargo-fuzz target in `fuzz/` and of a stable property
//! test. Built with the `fuzzing` feature (and for tests). See
//! [`virtio_console`].

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::console::{Console, MAX_CHAIN, MAX_PENDING_FROM_GUEST, MAX_PENDING_TO_GUEST};
use super::mmio::MmioTransport;
use crate::bus::BusDevice;

/// Guest memory: small, so that arbitrary addresses often land in it.
const MEM_SIZE: usize = 0x1_0000;
/// Queue size the well-behaved driver sets up.
const QSIZE: u16 = 16;
/// Where that driver puts buffers.
const BUF_BASE: u64 = 0x8000;
const QUEUES: usize = 6;
const CTRL_TX: usize = 3;

/// Registers the input picks by index.
const REGS: [u32; 16] = [
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_CONFIG,
];

fn ring_base(q: usize) -> u64 {
    0x1000 * (q as u64 + 1)
}

/// Byte ranges of `mem` the device may write to: each queue's used ring and
/// the buffers of its writable descriptors (direct and indirect), as its
/// descriptor table in `mem` says.
fn writable(mem: &[u8], t: &MmioTransport<Console>) -> Vec<(u64, u64)> {
    let desc = |table: u64, i: u64| -> Option<(u64, u32, u16)> {
        let at = usize::try_from(table.checked_add(i * 16)?).ok()?;
        let d = mem.get(at..at.checked_add(16)?)?;
        Some((
            u64::from_le_bytes(d[..8].try_into().ok()?),
            u32::from_le_bytes(d[8..12].try_into().ok()?),
            u16::from_le_bytes(d[12..14].try_into().ok()?),
        ))
    };
    let mut out = Vec::new();
    for q in t.queues() {
        let size = u64::from(q.size());
        out.push((q.used_ring(), q.used_ring().saturating_add(6 + 8 * size)));
        for i in 0..size {
            let Some((addr, len, flags)) = desc(q.desc_table(), i) else {
                continue;
            };
            if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                // An indirect table lies in guest memory: no more entries
                // than fit there (a 4 GiB length would loop for minutes).
                for j in 0..u64::from(len / 16).min(MEM_SIZE as u64 / 16) {
                    if let Some((a, l, f)) = desc(addr, j) {
                        if f & VRING_DESC_F_WRITE as u16 != 0 {
                            out.push((a, a.saturating_add(l.into())));
                        }
                    }
                }
            } else if flags & VRING_DESC_F_WRITE as u16 != 0 {
                out.push((addr, addr.saturating_add(len.into())));
            }
        }
    }
    out
}

struct Harness {
    mem: GuestMemoryMmap,
    t: MmioTransport<Console>,
    /// Next free descriptor and the avail index, per queue, of the
    /// well-behaved driver.
    next_desc: [u16; QUEUES],
    avail_idx: [u16; QUEUES],
}

impl Harness {
    fn snapshot(&self) -> Vec<u8> {
        let mut m = vec![0u8; MEM_SIZE];
        self.mem
            .read_slice(&mut m, GuestAddress(0))
            .expect("guest memory");
        m
    }

    /// Runs a host-side step (register access, notification, host data) and
    /// checks that guest memory changed only where the device may write.
    fn host_step(&mut self, step: impl FnOnce(&mut Self)) {
        let before = self.snapshot();
        let mut allowed = writable(&before, &self.t);
        step(self);
        let after = self.snapshot();
        if before == after {
            return;
        }
        // A buffer the device filled may have held descriptors it then used.
        allowed.extend(writable(&after, &self.t));
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            let i = i as u64;
            assert!(
                a == b || allowed.iter().any(|&(s, e)| s <= i && i < e),
                "the device wrote guest memory at {i:#x}, outside its used rings and writable buffers"
            );
        }
    }

    fn write_reg(&mut self, reg: u32, v: u32) {
        self.t.write(0, reg.into(), &v.to_le_bytes());
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(0, reg.into(), &mut b);
        u32::from_le_bytes(b)
    }

    /// What a fresh driver sees and what the device holds, for the reset check.
    fn dump(&mut self) -> String {
        let mut regs = Vec::new();
        for q in 0..QUEUES as u32 + 1 {
            self.write_reg(VIRTIO_MMIO_QUEUE_SEL, q);
            for reg in (0..0x100).step_by(4) {
                regs.push(self.read_reg(reg));
            }
        }
        self.write_reg(VIRTIO_MMIO_QUEUE_SEL, 0);
        format!("{regs:?} {}", self.t.state_dump())
    }

    /// The reset property: after status 0, the transport and the device are as
    /// new (the device reports the port closed if it was open).
    fn check_reset(&mut self) {
        self.host_step(|h| h.write_reg(VIRTIO_MMIO_STATUS, 0));
        let _ = self.t.device_mut().take_port_changes();
        let _ = self.t.device_mut().take_from_guest();
        let fresh = new_transport(self.mem.clone()).state_dump();
        assert_eq!(
            self.t.state_dump(),
            fresh,
            "a reset leaves the device as new"
        );
        let mut fresh = Harness::new();
        assert_eq!(self.dump(), fresh.dump(), "registers after a reset");
    }

    /// What a Linux driver does: reset, features, six queues of QSIZE at
    /// fixed places, DRIVER_OK; `features` decides what it accepts.
    fn init(&mut self, features: u32) {
        self.write_reg(VIRTIO_MMIO_STATUS, 0);
        self.write_reg(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, features);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write_reg(VIRTIO_MMIO_DRIVER_FEATURES, 1);
        let st = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(VIRTIO_MMIO_STATUS, st);
        for q in 0..QUEUES {
            let base = ring_base(q) as u32;
            self.write_reg(VIRTIO_MMIO_QUEUE_SEL, q as u32);
            self.write_reg(VIRTIO_MMIO_QUEUE_NUM, QSIZE.into());
            self.write_reg(VIRTIO_MMIO_QUEUE_DESC_LOW, base);
            self.write_reg(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
            self.write_reg(VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x100);
            self.write_reg(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
            self.write_reg(VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x200);
            self.write_reg(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
            self.write_reg(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.write_reg(VIRTIO_MMIO_STATUS, st | VIRTIO_CONFIG_S_DRIVER_OK);
        self.next_desc = [0; QUEUES];
        self.avail_idx = [0; QUEUES];
    }

    /// Posts a chain of `descs` (address, length, writable) on queue `q` at
    /// the well-behaved driver's places (guest-side: not a host step).
    fn post(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
        let base = ring_base(q);
        let head = self.next_desc[q];
        for (k, &(addr, len, write)) in descs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if k + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&((i + 1) % QSIZE).to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(base + u64::from(i) * 16))
                .expect("ring memory");
        }
        self.next_desc[q] = (head + descs.len() as u16) % QSIZE;
        let slot = u64::from(self.avail_idx[q] % QSIZE);
        let avail = base + 0x100;
        self.mem
            .write_obj(head % QSIZE, GuestAddress(avail + 4 + 2 * slot))
            .expect("ring memory");
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .expect("ring memory");
    }

    fn new() -> Self {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        Harness {
            t: new_transport(mem.clone()),
            mem,
            next_desc: [0; QUEUES],
            avail_idx: [0; QUEUES],
        }
    }
}

fn new_transport(mem: GuestMemoryMmap) -> MmioTransport<Console> {
    let irq = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    MmioTransport::new(Console::default(), mem, irq).expect("the transport")
}

/// The next `n` input bytes as a little-endian number.
fn word(byte: &mut impl FnMut() -> Option<u8>, n: usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..n {
        v |= u64::from(byte()?) << (8 * i);
    }
    Some(v)
}

/// virtio-console over virtio-mmio, with guest memory and register accesses
/// from the input: raw register reads and writes of any size, guest memory
/// writes, a well-behaved driver's setup and buffer chains (with addresses
/// and lengths from the input), control messages, queue notifications, host
/// data, device resets. Properties: no panic; the device writes guest memory
/// only in used rings and the buffers of writable descriptors; what it holds
/// stays within its documented bounds; a reset leaves transport and device as
/// new.
pub fn virtio_console(data: &[u8]) {
    let mut h = Harness::new();
    let mut input = data.iter().copied();
    let mut byte = move || input.next();
    while let Some(op) = byte() {
        let arg = usize::from(op >> 4);
        match op & 0x0f {
            0 => {
                let Some(v) = word(&mut byte, 4) else { break };
                let reg = REGS[arg];
                h.host_step(|h| h.write_reg(reg, v as u32));
                if reg == VIRTIO_MMIO_STATUS && v == 0 {
                    h.check_reset();
                }
            }
            1 => {
                let Some(off) = word(&mut byte, 2) else { break };
                let len = [1, 2, 4, 8][arg % 4];
                let Some(v) = word(&mut byte, len) else { break };
                let off = off % 0x200;
                h.host_step(|h| h.t.write(0, off, &v.to_le_bytes()[..len]));
            }
            2 => {
                let Some(off) = word(&mut byte, 2) else { break };
                let len = [1, 2, 4, 8][arg % 4];
                h.host_step(|h| {
                    let mut b = [0u8; 8];
                    h.t.read(0, off % 0x200, &mut b[..len]);
                });
            }
            3 => {
                let Some(addr) = word(&mut byte, 2) else {
                    break;
                };
                let Some(len) = byte() else { break };
                let bytes: Vec<u8> = (0..len).map_while(|_| byte()).collect();
                let end = (addr as usize + bytes.len()).min(MEM_SIZE);
                h.mem
                    .write_slice(&bytes[..end - addr as usize], GuestAddress(addr))
                    .expect("guest memory");
            }
            4 => {
                // Mostly with MULTIPORT (bit 1), sometimes without, or more.
                let features = [2, 2, 2, 0, 3, 2 | 1 << 28][arg % 6];
                h.host_step(|h| h.init(features));
            }
            5 => {
                let q = arg % QUEUES;
                let Some(n) = byte() else { break };
                let mut descs = Vec::new();
                for _ in 0..1 + n % 3 {
                    let (Some(a), Some(l), Some(f)) = (word(&mut byte, 2), byte(), byte()) else {
                        break;
                    };
                    // Mostly in the buffer area; sometimes anywhere.
                    let addr = if f & 0x80 == 0 {
                        BUF_BASE + a % 0x8000
                    } else {
                        a << (f & 0x1f)
                    };
                    descs.push((addr, u32::from(l) * (1 + u32::from(f & 0x60)), f & 1 != 0));
                }
                h.post(q, &descs);
            }
            6 => h.host_step(|h| h.t.notify(arg % 8)),
            7 => {
                let Some(len) = word(&mut byte, 2) else { break };
                let bytes = vec![b'x'; len as usize];
                h.host_step(|h| {
                    h.t.with_device(|d, ctx| d.send_to_guest(&bytes, ctx));
                });
            }
            8 => {
                let from = h.t.device_mut().take_from_guest();
                assert!(
                    from.len() <= MAX_PENDING_FROM_GUEST + MAX_CHAIN,
                    "guest bytes held beyond the bound"
                );
                let _ = h.t.device_mut().take_port_changes();
            }
            9 => {
                // A control message from the guest: DEVICE_READY, PORT_READY,
                // PORT_OPEN (port 1 mostly) with the value from the input.
                let Some(v) = byte() else { break };
                let ev: u16 = [0, 3, 6, 6][arg % 4];
                let id: u32 = if arg & 8 == 0 { 1 } else { u32::from(v >> 4) };
                let mut msg = Vec::new();
                msg.extend_from_slice(&id.to_le_bytes());
                msg.extend_from_slice(&ev.to_le_bytes());
                msg.extend_from_slice(&u16::from(v & 1).to_le_bytes());
                let at = BUF_BASE + 0x7f00;
                h.mem
                    .write_slice(&msg, GuestAddress(at))
                    .expect("guest memory");
                h.post(CTRL_TX, &[(at, 8, false)]);
                h.host_step(|h| h.t.notify(CTRL_TX));
            }
            10 => h.check_reset(),
            11 => h.host_step(|h| h.t.device_mut().discard_to_guest()),
            _ => {}
        }
        assert!(
            h.t.device().pending_to_guest() <= MAX_PENDING_TO_GUEST,
            "host bytes held beyond the bound"
        );
    }
    h.check_reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_console_properties_hold() {
        qmp::fuzzing::check_corpus_and_random("virtio_console", 60, virtio_console);
    }
}
