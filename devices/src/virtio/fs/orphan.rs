//! A virtio-fs device whose backend died: the device answers the guest itself,
//! every FUSE request with EIO, so that the guest's processes get an error
//! instead of waiting for a reply that never comes (QEMU leaves them waiting).
//!
//! The rings were the daemon's: how far it took them died with it. The
//! device starts from the used index the daemon last published and answers
//! every request made available after it, and asks for the guest's
//! notifications again (the daemon may have died with them off). A daemon
//! that answered out of order may leave one request unanswered (its process
//! then waits, killably) or, rarely, a request answered twice: the guest's
//! driver then stops the queue, and every later request on this share fails
//! at once — EIO as well.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::virtio::{ring_error, DeviceFailure, QueueContext};

/// The high-priority queue (FORGET, INTERRUPT): requests without replies.
pub const HIPRIO_QUEUE: usize = 0;
/// `struct fuse_in_header`: len, opcode, unique, ...: `unique` at byte 8.
const IN_UNIQUE: usize = 8;
/// `struct fuse_out_header { u32 len; i32 error; u64 unique; }`.
pub const OUT_HEADER_LEN: usize = 16;

/// The reply to a request whose `unique` is given: only the header, with
/// `-EIO`.
pub fn eio_reply(unique: u64) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    h[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// Per-queue state of the takeover.
#[derive(Debug, Default, Clone)]
pub struct Orphan {
    /// Each queue's indexes were taken from the used ring the daemon left.
    resynced: Vec<bool>,
    /// Requests answered so far.
    pub answered: u64,
}

impl Orphan {
    /// Takes over `queues` queues.
    pub fn new(queues: usize) -> Self {
        Self {
            resynced: vec![false; queues],
            answered: 0,
        }
    }

    /// The driver reset the device: its next rings start from zero.
    pub fn reset(&mut self) {
        self.resynced.iter_mut().for_each(|r| *r = false);
    }

    /// The rings are new (activation): they start where the queues say.
    pub fn activated(&mut self) {
        self.resynced.iter_mut().for_each(|r| *r = true);
    }

    /// Answers what waits on queue `index`; raises the interrupt when the
    /// driver wants it.
    pub fn process(
        &mut self,
        index: usize,
        ctx: &mut QueueContext,
        event_idx: bool,
    ) -> Result<(), DeviceFailure> {
        let mem = ctx.mem;
        let Some(q) = ctx.queues.get_mut(index) else {
            return Ok(());
        };
        if !q.ready() {
            return Ok(());
        }
        if !self.resynced.get(index).copied().unwrap_or(true) {
            let used = q
                .used_idx(mem, Ordering::Acquire)
                .map_err(|e| DeviceFailure(format!("used ring: {e:?}")))?;
            q.set_next_avail(used.0);
            q.set_next_used(used.0);
            q.set_event_idx(event_idx);
            self.resynced[index] = true;
        }
        let mut any = false;
        loop {
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = if index == HIPRIO_QUEUE {
                    0
                } else {
                    answer(mem, chain)?
                };
                q.add_used(mem, head, len).map_err(ring_error)?;
                self.answered += 1;
                any = true;
            }
            // Ask for the guest's next notification. The daemon left the
            // ring's notification state as it was: the used ring's NO_NOTIFY
            // flag set, or an `avail_event` the guest has passed; the guest
            // would then make its next requests without notifying, and they
            // would wait forever. What came meanwhile is answered now.
            if !q.enable_notification(mem).map_err(ring_error)? {
                break;
            }
        }
        if any {
            ctx.notify_used(index);
        }
        Ok(())
    }
}

/// Writes an EIO reply for the request in `chain` into its writable part;
/// returns the bytes written (0 for a request that expects no reply).
fn answer(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<u32, DeviceFailure> {
    let bad = |e| DeviceFailure(format!("bad descriptor address: {e}"));
    let mut header = [0u8; IN_UNIQUE + 8];
    let mut have = 0;
    let mut reply = None;
    let mut written = 0;
    for desc in chain {
        if !desc.is_write_only() {
            let n = (desc.len() as usize).min(header.len() - have);
            mem.read_slice(&mut header[have..have + n], desc.addr())
                .map_err(bad)?;
            have += n;
            continue;
        }
        let out = *reply.get_or_insert_with(|| {
            let unique = u64::from_le_bytes(header[IN_UNIQUE..].try_into().unwrap_or_default());
            eio_reply(unique)
        });
        if written == out.len() {
            break;
        }
        let n = (desc.len() as usize).min(out.len() - written);
        mem.write_slice(&out[written..written + n], desc.addr())
            .map_err(bad)?;
        written += n;
    }
    Ok(written as u32)
}
