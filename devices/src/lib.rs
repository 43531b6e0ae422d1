//! Device models for minivmm.
//!
//! Every device here is reached through a [`bus::Bus`] (port I/O or MMIO) and
//! describes itself to the guest's ACPI namespace by implementing
//! [`acpi_tables::Aml`], so the VMM can build the DSDT from the devices it
//! created without knowing their details.

pub mod acpi_pm;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod output;
pub mod power_button;
pub mod pvpanic;
pub mod serial;
pub mod virtio;

use std::io;

use vmm_sys_util::eventfd::EventFd;

pub use acpi_tables::{Aml, AmlSink};

/// The ACPI description of a device the guest is not told about: it has no
/// node in the DSDT (isa-debug-exit, as in QEMU; the i8042, which is only a
/// reset line and must not look like a keyboard controller).
pub struct NoAml;

impl Aml for NoAml {
    fn to_aml_bytes(&self, _sink: &mut dyn AmlSink) {}
}

/// Emits `dev` inside `Scope (\_SB)`, where the devices of the DSDT live.
pub fn aml_in_system_bus(dev: &dyn Aml, sink: &mut dyn AmlSink) {
    let mut bytes = Vec::new();
    dev.to_aml_bytes(&mut bytes);
    sink.vec(&acpi_tables::aml::Scope::raw("\\_SB_".into(), bytes));
}

/// A [`vm_superio::Trigger`] backed by an [`EventFd`]: used both for interrupt lines
/// (registered as KVM irqfds) and for lifecycle requests sent to the VMM thread.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// Duplicates the underlying eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// The wrapped eventfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
