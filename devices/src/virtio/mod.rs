//! Virtio devices: the virtio-mmio transport (version 2) and the devices behind it.
//!
//! Threads: the transport's registers are read and written by vcpu threads (as a
//! [`crate::bus::BusDevice`] on the MMIO bus). Queue notifications never go through
//! a vcpu thread: each queue has an eventfd that KVM signals directly (ioeventfd)
//! and that the VMM thread watches; it then calls [`mmio::MmioTransport::notify`],
//! which runs the device's queue processing. Interrupts go to the guest through an
//! irqfd. The device sits behind one mutex shared by both sides.

pub mod console;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod mmio;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
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
pub struct QueueContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, by index.
    pub queues: &'a mut [Queue],
    /// The device's interrupt.
    pub interrupt: &'a Interrupt,
}

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
}
