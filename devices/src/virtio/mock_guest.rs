//! A guest driver for device tests: virtio-queue's mock split queues in test
//! memory, buffers offered and sent, used entries read back.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Interrupt, QueueContext};

/// Where buffers are allocated in test memory.
pub const BUF_BASE: u64 = 0x10_0000;

/// Plays the guest driver with virtio-queue's mock split queues.
pub struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    mocks: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
    queues: Vec<Queue>,
    pub interrupt: Interrupt,
    next_desc: Vec<u16>,
    used_seen: Vec<u16>,
    next_buf: u64,
}

impl<'a> Guest<'a> {
    /// A driver for the six queues of a multiport console.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with_queues(mem, 6)
    }

    /// A driver for a device with `n` queues.
    pub fn with_queues(mem: &'a GuestMemoryMmap, n: usize) -> Self {
        let mocks: Vec<_> = (0..n as u64)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * (i + 1)), 16))
            .collect();
        let queues = mocks
            .iter()
            .map(|m| m.create_queue::<Queue>().unwrap())
            .collect();
        Guest {
            mem,
            mocks,
            queues,
            interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            next_desc: vec![0; n],
            used_seen: vec![0; n],
            next_buf: BUF_BASE,
        }
    }

    pub fn ctx(&mut self) -> QueueContext<'_> {
        QueueContext::new(self.mem, &mut self.queues, &self.interrupt)
    }

    pub fn alloc(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += u64::from(len.max(1)).next_multiple_of(64);
        a
    }

    pub fn add(&mut self, q: usize, addr: u64, len: u32, write: bool) {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
        let at = self.next_desc[q];
        self.mocks[q].add_desc_chains(&[d], at).unwrap();
        self.next_desc[q] += 1;
    }

    /// Makes one chain available on queue `q`: `request` in a readable buffer,
    /// then a writable one of `reply_len` bytes (none if 0); returns the head
    /// and the writable buffer's address.
    pub fn request(&mut self, q: usize, request: &[u8], reply_len: u32) -> (u16, u64) {
        let a = self.alloc(request.len() as u32);
        self.mem.write_slice(request, GuestAddress(a)).unwrap();
        let head = self.next_desc[q];
        let mut descs = vec![(a, request.len() as u32, false)];
        let r = self.alloc(reply_len);
        if reply_len > 0 {
            descs.push((r, reply_len, true));
        }
        let n = descs.len() as u16;
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let mut next = 0;
                if (i as u16) + 1 < n {
                    flags |= VRING_DESC_F_NEXT as u16;
                    next = head + i as u16 + 1;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mocks[q].add_desc_chains(&raw, head).unwrap();
        self.next_desc[q] += n;
        (head, r)
    }

    /// Plays a device that used the next `n` chains of queue `q` elsewhere
    /// (another process): the used index moves on, the entries are not read.
    pub fn used_elsewhere(&mut self, q: usize, n: u16) {
        let idx = self.mocks[q].used().idx().load().wrapping_add(n);
        self.mocks[q].used().idx().store(idx);
        self.used_seen[q] = idx;
    }

    /// Sets or clears `VRING_AVAIL_F_NO_INTERRUPT` on queue `q`.
    pub fn suppress_interrupts(&mut self, q: usize, suppress: bool) {
        // The flags are the available ring's first field.
        self.mem
            .write_obj(u16::from(suppress), self.mocks[q].avail_addr())
            .unwrap();
    }

    /// Whether the device wants notifications on queue `q` (its used ring's
    /// flags lack `VRING_USED_F_NO_NOTIFY`).
    pub fn notifications_wanted(&self, q: usize) -> bool {
        let flags: u16 = self.mem.read_obj(self.mocks[q].used_addr()).unwrap();
        flags & 1 == 0
    }

    /// Plays a device that turned notifications off on queue `q` and went
    /// away: the used ring's `VRING_USED_F_NO_NOTIFY` set, and its
    /// `avail_event` one behind the available index (passed by the driver).
    pub fn notifications_left_off(&mut self, q: usize) {
        let used = self.mocks[q].used_addr();
        self.mem.write_obj(1u16, used).unwrap();
        let behind = self.mocks[q].avail().idx().load().wrapping_sub(1);
        self.mem
            .write_obj(behind, self.avail_event_addr(q))
            .unwrap();
    }

    /// Whether the driver notifies the device when it makes one more chain
    /// available on queue `q`, as Linux's `virtqueue_kick_prepare` decides:
    /// by the used ring's flags, or with event index by its `avail_event`.
    pub fn would_notify(&self, q: usize, event_idx: bool) -> bool {
        if !event_idx {
            return self.notifications_wanted(q);
        }
        let old = self.mocks[q].avail().idx().load();
        let new = old.wrapping_add(1);
        let event: u16 = self.mem.read_obj(self.avail_event_addr(q)).unwrap();
        // vring_need_event(event, new, old)
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// `avail_event`: after the used ring's 16 elements of 8 bytes.
    fn avail_event_addr(&self, q: usize) -> GuestAddress {
        GuestAddress(self.mocks[q].used_addr().0 + 4 + 8 * 16)
    }

    /// Offers a writable buffer of `len` bytes on queue `q`; returns its address.
    pub fn offer(&mut self, q: usize, len: u32) -> u64 {
        let a = self.alloc(len);
        self.add(q, a, len, true);
        a
    }

    /// Sends `data` on queue `q` (a readable buffer).
    pub fn send(&mut self, q: usize, data: &[u8]) {
        let a = self.alloc(data.len() as u32);
        self.mem.write_slice(data, GuestAddress(a)).unwrap();
        self.add(q, a, data.len() as u32, false);
    }

    /// New used entries on queue `q`: (descriptor id, length).
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx = self.mocks[q].used().idx().load();
        let mut out = vec![];
        while self.used_seen[q] != idx {
            let e = self.mocks[q]
                .used()
                .ring()
                .ref_at(self.used_seen[q] as usize % 16)
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    pub fn read(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}
