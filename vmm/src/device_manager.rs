//! Device registration for one VM.
//!
//! A device is added in one call with everything the guest sees of it: its bus
//! ranges, its interrupt (an irqfd for a GSI), its ACPI node and, for virtio-mmio,
//! its kernel command-line entry. The port and MMIO buses, the interrupt routing,
//! the DSDT's device list and the command line thus cannot drift apart.
//!
//! The manager talks to KVM only through [`EventfdRegistry`], so its bookkeeping
//! is testable without `/dev/kvm`.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusDevice, BusError};
use devices::virtio::mmio::{
    cmdline_device, MmioTransport, VirtioMmioAml, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET,
};
use devices::virtio::VirtioDevice;
use devices::Aml;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::{FOUR_GIB, IOAPIC_PINS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_GSI, VIRTIO_MMIO_SLOTS};

/// Where a VM wires device eventfds: interrupts (irqfd) and MMIO doorbells
/// (ioeventfd). [`VmFd`] is the real one.
pub trait EventfdRegistry {
    /// Raises `gsi` whenever `fd` is written.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    /// Signals `fd` when the guest writes the 32-bit value `datamatch` at MMIO
    /// address `addr`, without a vcpu exit.
    fn register_mmio_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl EventfdRegistry for VmFd {
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, fd, gsi)
    }

    fn register_mmio_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        self.register_ioevent(fd, &IoEventAddress::Mmio(addr), datamatch)
    }
}

/// Errors registering a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A range overlaps another device's, or is empty.
    #[error("cannot place a device on the {bus} bus")]
    Bus {
        /// "pio" or "mmio".
        bus: &'static str,
        /// The rejected range.
        #[source]
        source: BusError,
    },
    /// Two devices asked for the same interrupt.
    #[error("GSI {0} is already taken by another device")]
    GsiTaken(u32),
    /// Every virtio-mmio slot is in use.
    #[error("no free virtio-mmio slot: all {0} are taken")]
    NoMmioSlot(u32),
    /// A virtio-mmio window would lie above 4 GiB, where its 32-bit ACPI
    /// resource cannot describe it.
    #[error("virtio-mmio window at {0:#x} is not below 4 GiB")]
    MmioAbove4G(u64),
    /// Every GSI for virtio-mmio devices is in use.
    #[error("no free GSI for a virtio-mmio device in {first}..{end}")]
    NoGsi {
        /// First GSI for virtio-mmio devices.
        first: u32,
        /// End (exclusive) of the range.
        end: u32,
    },
    /// KVM refused the irqfd.
    #[error("KVM_IRQFD for GSI {gsi} failed")]
    Irqfd {
        /// The interrupt.
        gsi: u32,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused a queue's ioeventfd.
    #[error("KVM_IOEVENTFD for queue {queue} at {addr:#x} failed")]
    Ioeventfd {
        /// Queue index (the datamatch).
        queue: u32,
        /// Address of the notify register.
        addr: u64,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No eventfd for the device's interrupt.
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] io::Error),
    /// The transport could not be set up (its queues or their eventfds).
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] io::Error),
}

/// A range of I/O ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub base: u16,
    /// Number of ports.
    pub len: u16,
}

impl PortRange {
    /// `len` ports from `base`.
    pub const fn new(base: u16, len: u16) -> Self {
        Self { base, len }
    }
}

/// A device's interrupt line: writes to `fd` raise `gsi`.
#[derive(Debug, Clone, Copy)]
pub struct Irq<'a> {
    /// The eventfd the device writes.
    pub fd: &'a EventFd,
    /// The GSI it raises.
    pub gsi: u32,
}

impl<'a> Irq<'a> {
    /// Interrupt line `gsi`, raised through `fd`.
    pub fn new(fd: &'a EventFd, gsi: u32) -> Self {
        Self { fd, gsi }
    }
}

/// Where virtio-mmio devices go: `slots` windows of [`MMIO_WINDOW`] bytes from
/// `base`, and GSIs from `first_gsi` up to (not including) `gsi_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSpace {
    /// First window.
    pub base: u64,
    /// Number of windows.
    pub slots: u32,
    /// First GSI to hand out.
    pub first_gsi: u32,
    /// End (exclusive) of the GSIs to hand out.
    pub gsi_end: u32,
}

impl Default for MmioSpace {
    /// The [`crate::layout`] of the machine.
    fn default() -> Self {
        Self {
            base: VIRTIO_MMIO_BASE,
            slots: VIRTIO_MMIO_SLOTS,
            first_gsi: VIRTIO_MMIO_GSI,
            gsi_end: IOAPIC_PINS,
        }
    }
}

/// The devices of one VM, as they are registered.
///
/// A failed registration may leave part of the device registered; the VM being
/// built is then to be discarded, as [`crate::builder::build_vm`] does.
pub struct DeviceManager<'a> {
    vm: &'a dyn EventfdRegistry,
    space: MmioSpace,
    pio: Bus,
    mmio: Bus,
    aml: Vec<Box<dyn Aml>>,
    cmdline: Vec<String>,
    gsis: BTreeSet<u32>,
    mmio_devices: u32,
}

impl<'a> DeviceManager<'a> {
    /// A manager wiring eventfds into `vm`, with the machine's virtio-mmio layout.
    pub fn new(vm: &'a dyn EventfdRegistry) -> Self {
        Self::with_mmio_space(vm, MmioSpace::default())
    }

    /// A manager placing virtio-mmio devices in `space`.
    pub fn with_mmio_space(vm: &'a dyn EventfdRegistry, space: MmioSpace) -> Self {
        Self {
            vm,
            space,
            pio: Bus::new("pio"),
            mmio: Bus::new("mmio"),
            aml: Vec::new(),
            cmdline: Vec::new(),
            gsis: BTreeSet::new(),
            mmio_devices: 0,
        }
    }

    /// Adds a port-I/O device: `device` serves every range of `ports`, raises
    /// `irq` if it has one, and is described to the guest by `aml`.
    pub fn register_pio_device(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        ports: &[PortRange],
        irq: Option<Irq<'_>>,
        aml: impl Aml + 'static,
    ) -> Result<(), DeviceError> {
        if let Some(irq) = irq {
            self.check_gsi_free(irq.gsi)?;
        }
        for r in ports {
            self.pio
                .insert(device.clone(), u64::from(r.base), u64::from(r.len))
                .map_err(|source| DeviceError::Bus { bus: "pio", source })?;
        }
        if let Some(irq) = irq {
            self.connect_irq(irq)?;
        }
        self.aml.push(Box::new(aml));
        Ok(())
    }

    /// Adds a device that has no registers, only an interrupt and an ACPI node
    /// (the GED behind the power button).
    pub fn register_irq_device(
        &mut self,
        irq: Irq<'_>,
        aml: impl Aml + 'static,
    ) -> Result<(), DeviceError> {
        self.connect_irq(irq)?;
        self.aml.push(Box::new(aml));
        Ok(())
    }

    /// Adds `device` behind a virtio-mmio transport in the next free slot, with
    /// the next free GSI: registers its irqfd and each queue's ioeventfd (at the
    /// notify register, datamatch = queue index), puts it on the MMIO bus, and
    /// records its ACPI node and `virtio_mmio.device=` command-line entry.
    pub fn register_mmio_device<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        mem: &GuestMemoryMmap,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, DeviceError> {
        let slot = self.mmio_devices;
        if slot >= self.space.slots {
            return Err(DeviceError::NoMmioSlot(self.space.slots));
        }
        let (base, base32) = self.slot_base(slot)?;
        let gsi = (self.space.first_gsi..self.space.gsi_end)
            .find(|g| !self.gsis.contains(g))
            .ok_or(DeviceError::NoGsi {
                first: self.space.first_gsi,
                end: self.space.gsi_end,
            })?;
        let aml = VirtioMmioAml {
            index: slot,
            base: base32,
            gsi,
        };

        let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let irq_for_device = irq.try_clone().map_err(DeviceError::EventFd)?;
        let transport = MmioTransport::new(device, mem.clone(), irq_for_device)
            .map_err(DeviceError::Transport)?;
        self.connect_irq(Irq::new(&irq, gsi))?;
        let notify = base + QUEUE_NOTIFY_OFFSET;
        for (queue, evt) in (0u32..).zip(transport.queue_evts()) {
            self.vm
                .register_mmio_ioevent(evt, notify, queue)
                .map_err(|source| DeviceError::Ioeventfd {
                    queue,
                    addr: notify,
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW)
            .map_err(|source| DeviceError::Bus {
                bus: "mmio",
                source,
            })?;
        self.aml.push(Box::new(aml));
        self.cmdline.push(cmdline_device(base, gsi));
        self.mmio_devices += 1;
        Ok(transport)
    }

    /// The base address of `slot`'s window, which must end at or below 4 GiB.
    fn slot_base(&self, slot: u32) -> Result<(u64, u32), DeviceError> {
        let offset = u64::from(slot) * MMIO_WINDOW;
        let base = self.space.base.saturating_add(offset);
        let fits = base
            .checked_add(MMIO_WINDOW)
            .is_some_and(|end| end <= FOUR_GIB);
        match u32::try_from(base) {
            Ok(base32) if fits => Ok((base, base32)),
            _ => Err(DeviceError::MmioAbove4G(base)),
        }
    }

    fn check_gsi_free(&self, gsi: u32) -> Result<(), DeviceError> {
        if self.gsis.contains(&gsi) {
            return Err(DeviceError::GsiTaken(gsi));
        }
        Ok(())
    }

    fn connect_irq(&mut self, irq: Irq<'_>) -> Result<(), DeviceError> {
        self.check_gsi_free(irq.gsi)?;
        self.vm
            .register_irqfd(irq.fd, irq.gsi)
            .map_err(|source| DeviceError::Irqfd {
                gsi: irq.gsi,
                source,
            })?;
        self.gsis.insert(irq.gsi);
        Ok(())
    }

    /// The devices' ACPI nodes, in registration order: the DSDT's device list.
    pub fn aml(&self) -> Vec<&dyn Aml> {
        self.aml.iter().map(|a| a.as_ref()).collect()
    }

    /// The kernel command-line entries of the virtio-mmio devices
    /// (`virtio_mmio.device=4K@0xd0000000:10`), in registration order.
    pub fn cmdline_entries(&self) -> &[String] {
        &self.cmdline
    }

    /// The port-I/O and MMIO buses, for the vcpus.
    pub fn into_buses(self) -> (Bus, Bus) {
        (self.pio, self.mmio)
    }
}

/// A stand-in for KVM in unit tests.
#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod tests;
