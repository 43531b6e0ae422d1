//! Virtio devices: the virtio-mmio transport (version 2) and the devices behind it.
//!
//! Threads: the transport's registers are read and written by vcpu threads (as a
//! [`crate::bus::BusDevice`] on the MMIO bus). Queue notifications never go through
//! a vcpu thread: each queue has an eventfd that KVM signals directly (ioeventfd)
//! and that the VMM thread watches; it then calls [`mmio::MmioTransport::notify`],
//! which runs the device's queue processing. Interrupts go to the guest through an
//! irqfd. The device sits behind one mutex shared by both sides.

pub mod console;
pub mod fs;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hvc;
pub mod mmio;
#[cfg(test)]
mod mock_guest;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the status register the guest reads, and the irqfd.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raising `irqfd` (registered with KVM for the device's GSI).
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// How often the line was raised since the last call (reads the irqfd,
    /// which must be non-blocking).
    #[cfg(test)]
    pub(crate) fn take_raised(&self) -> u64 {
        self.irqfd.read().unwrap_or(0)
    }

    /// Current status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a device works with while processing its queues.
///
/// Used-ring interrupts ([`Self::notify_used`]) are raised once, when the
/// context is dropped: a pass that completes buffers on several queues (the
/// agent port's request and the previous reply's buffers) costs one irqfd
/// write and at most one interrupt, not one per queue (a second write could
/// reach KVM after the first was injected, and interrupt the guest again for
/// nothing: two more exits for the status and its acknowledgement).
pub struct QueueContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, by index.
    pub queues: &'a mut [Queue],
    /// The device's interrupt.
    pub interrupt: &'a Interrupt,
    /// A used-ring interrupt is due when the context is dropped.
    raise: bool,
}

impl Drop for QueueContext<'_> {
    fn drop(&mut self) {
        if self.raise {
            self.interrupt.trigger(INT_VRING);
        }
    }
}

impl<'a> QueueContext<'a> {
    /// A context for one pass over a device's queues.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        queues: &'a mut [Queue],
        interrupt: &'a Interrupt,
    ) -> Self {
        Self {
            mem,
            queues,
            interrupt,
            raise: false,
        }
    }

    /// Raises (when the context is dropped) the used-ring interrupt for
    /// queue `index` unless its driver asked for none:
    /// `VRING_AVAIL_F_NO_INTERRUPT` in the available ring's flags, or with
    /// `VIRTIO_RING_F_EVENT_IDX` its `used_event` (virtio-queue checks only
    /// the latter). An interrupt the driver does not want costs the
    /// guest an exit for it and two more for the status and its acknowledgement.
    pub fn notify_used(&mut self, index: usize) {
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        let wanted = if q.event_idx_enabled() {
            q.needs_notification(self.mem).unwrap_or(true)
        } else {
            // Our used-ring writes before the driver's flags (as the spec's
            // memory barrier before reading them).
            std::sync::atomic::fence(Ordering::SeqCst);
            self.mem
                .read_obj::<u16>(vm_memory::GuestAddress(q.avail_ring()))
                .map(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
                .unwrap_or(true)
        };
        if wanted {
            self.raise = true;
        }
    }
}

/// Notifications of a receive queue (one the driver fills with buffers for
/// the device to write into), asked for only while the device holds bytes
/// that wait for a buffer. Linux notifies each buffer it adds, and fills a
/// console's receive queues with hundreds at once: each notification costs
/// the guest an exit.
#[derive(Debug, Default)]
pub(crate) struct RxNotifications {
    /// The driver was told not to notify.
    quiet: bool,
}

impl RxNotifications {
    /// After the device delivered what buffers allowed: `waiting` says
    /// whether bytes still wait. Returns true when the driver added buffers
    /// while notifications were off: deliver again.
    pub(crate) fn update(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        waiting: bool,
    ) -> Result<bool, DeviceFailure> {
        if !q.ready() {
            return Ok(false);
        }
        if !waiting {
            if !self.quiet {
                q.disable_notification(mem).map_err(ring_error)?;
                self.quiet = true;
            }
            return Ok(false);
        }
        if !self.quiet {
            return Ok(false);
        }
        self.quiet = false;
        q.enable_notification(mem).map_err(ring_error)
    }
}

/// A ring the device could not update (the driver gave bad addresses).
pub(crate) fn ring_error(e: virtio_queue::Error) -> DeviceFailure {
    DeviceFailure(format!("ring: {e:?}"))
}

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver needs no interrupt for used buffers.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// A guest-caused error that puts the device in the failed state (NEEDS_RESET).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct DeviceFailure(pub String);

/// A device behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (3 for a console).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK with `features` negotiated.
    fn activate(&mut self, features: u64, ctx: &mut QueueContext) -> Result<(), DeviceFailure>;
    /// The driver (or KVM on its behalf) notified queue `index`.
    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext) -> Result<(), DeviceFailure>;
    /// Device reset (status 0): forget everything negotiated.
    fn reset(&mut self);
    /// Called once by the transport with the eventfds KVM signals when the
    /// guest notifies each queue, and the interrupt's irqfd. A device whose
    /// queues another process serves (vhost-user) hands them to it; others
    /// keep nothing.
    fn attach_eventfds(&mut self, _queue_evts: &[EventFd], _irqfd: &EventFd) {}
    /// The device's own state in one line, for diagnosing a guest that waits
    /// on it (see [`mmio::MmioTransport::queue_report`]).
    fn report(&self) -> Option<String> {
        None
    }
    /// The queue the device wants processed again after the given pause
    /// without the driver notifying it (it asked the driver for no
    /// notifications while data flows); None while it waits for them. The
    /// transport asks after each call into the device and keeps a timer.
    fn polling(&self) -> Option<(usize, std::time::Duration)> {
        None
    }
    /// Whether another process raises the interrupt itself through the irqfd:
    /// the interrupt status then always reads "used ring".
    fn interrupts_bypass(&self) -> bool {
        false
    }
}

/// Reads the readable part of the next chain on `q`; returns (head, bytes), or None
/// when the queue is empty.
pub(crate) fn read_next_chain(
    mem: &GuestMemoryMmap,
    q: &mut Queue,
    limit: usize,
) -> Result<Option<(u16, Vec<u8>)>, DeviceFailure> {
    let mut data = Vec::new();
    Ok(append_next_chain(mem, q, limit, &mut data)?.map(|head| (head, data)))
}

/// Appends the readable part of the next chain on `q` to `out` (no copy in
/// between); returns its head, or None when the queue is empty. A chain over
/// `limit` bytes fails the device (nothing of it is appended).
pub(crate) fn append_next_chain(
    mem: &GuestMemoryMmap,
    q: &mut Queue,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<Option<u16>, DeviceFailure> {
    let Some(chain) = q.pop_descriptor_chain(mem) else {
        return Ok(None);
    };
    let head = chain.head_index();
    let base = out.len();
    for desc in chain {
        if desc.is_write_only() {
            continue;
        }
        let len = desc.len() as usize;
        let start = out.len();
        if start - base + len > limit {
            out.truncate(base);
            return Err(DeviceFailure(format!(
                "guest buffer larger than {limit} bytes"
            )));
        }
        out.resize(start + len, 0);
        if let Err(e) = mem.read_slice(&mut out[start..], desc.addr()) {
            out.truncate(base);
            return Err(DeviceFailure(format!("bad descriptor address: {e}")));
        }
    }
    Ok(Some(head))
}

/// Writes `data` into the next chain's writable buffers; returns the bytes written,
/// or None when the guest has no buffer available.
pub(crate) fn write_to_next_buffer(
    mem: &GuestMemoryMmap,
    q: &mut Queue,
    data: &[u8],
) -> Result<Option<usize>, DeviceFailure> {
    let Some(chain) = q.pop_descriptor_chain(mem) else {
        return Ok(None);
    };
    let head = chain.head_index();
    let mut written = 0;
    for desc in chain {
        if !desc.is_write_only() || written == data.len() {
            continue;
        }
        let n = (desc.len() as usize).min(data.len() - written);
        mem.write_slice(&data[written..written + n], desc.addr())
            .map_err(|e| DeviceFailure(format!("bad descriptor address: {e}")))?;
        written += n;
    }
    q.add_used(mem, head, written as u32)
        .map_err(|e| DeviceFailure(format!("used ring: {e:?}")))?;
    Ok(Some(written))
}

pub(crate) fn complete(
    mem: &GuestMemoryMmap,
    q: &mut Queue,
    head: u16,
) -> Result<(), DeviceFailure> {
    q.add_used(mem, head, 0)
        .map_err(|e| DeviceFailure(format!("used ring: {e:?}")))
}
