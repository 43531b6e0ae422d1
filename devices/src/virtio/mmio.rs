//! The virtio-mmio transport, version 2 ("modern") register layout.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use acpi_tables::{aml, Aml, AmlSink};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{Interrupt, QueueContext, VirtioDevice, INT_CONFIG, INT_VRING};
use crate::bus::BusDevice;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the QueueNotify register in a device's window. The driver writes a
/// queue's index there to notify it; the VMM registers each queue's eventfd as an
/// ioeventfd at this address with the index as datamatch.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Shared memory region registers (virtio 1.2, 4.2.2): SHMLenLow/High,
/// SHMBaseLow/High. No device here has a region; per the spec a region that
/// does not exist reads as length -1 (Linux's virtio-fs otherwise takes it for
/// a DAX window at 0 and fails the probe).
const SHM_LEN_BASE_REGS: std::ops::RangeInclusive<u32> = 0x0b0..=0x0bc;
/// SHMSel: which region SHMLen/SHMBase describe.
const SHM_SEL: u32 = 0x0ac;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4d56_4d4d; // "MMVM"

/// Transport state plus the device behind it.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
    failed: bool,
    /// Fires when the device wants a queue looked at again without a
    /// notification ([`VirtioDevice::polling`]); non-blocking.
    poll_timer: TimerFd,
    poll_armed: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over `mem`, interrupting through `irqfd`.
    pub fn new(mut device: D, mem: GuestMemoryMmap, irqfd: EventFd) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(libc_efd_nonblock()))
            .collect::<Result<Vec<_>, _>>()?;
        device.attach_eventfds(&queue_evts, &irqfd);
        let poll_timer = TimerFd::new()?;
        set_nonblocking(poll_timer.as_raw_fd())?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
            failed: false,
            poll_timer,
            poll_armed: false,
        })
    }

    /// The eventfd KVM signals when the guest notifies queue `i` (register it as an
    /// ioeventfd at `base + QUEUE_NOTIFY_OFFSET` with datamatch `i`).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, for host-side calls that do not touch the queues.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver activated the device and it has not failed.
    pub fn is_active(&self) -> bool {
        self.active && !self.failed
    }

    /// Runs `f` on the device with its queues, if the device is active; a
    /// [`super::DeviceFailure`] puts the device in the failed state.
    pub fn with_device<T>(
        &mut self,
        f: impl FnOnce(&mut D, &mut QueueContext) -> Result<T, super::DeviceFailure>,
    ) -> Option<T> {
        if !self.is_active() {
            return None;
        }
        let mut ctx = QueueContext::new(&self.mem, &mut self.queues, &self.interrupt);
        let outcome = f(&mut self.device, &mut ctx);
        // Raises the pass's interrupt, if any.
        drop(ctx);
        let result = match outcome {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(&e.0);
                None
            }
        };
        self.sync_poll();
        result
    }

    /// The timer of the device's polling: when it is readable, call
    /// [`Self::poll_due`]. The VMM thread watches it with the queue eventfds.
    pub fn poll_fd(&self) -> RawFd {
        self.poll_timer.as_raw_fd()
    }

    /// The poll timer fired: the device looks at the queue it polls.
    pub fn poll_due(&mut self) {
        // Non-blocking: the timer may have been cleared since it fired.
        let _ = self.poll_timer.wait();
        self.poll_armed = false;
        match self.device.polling() {
            Some((q, _)) if self.is_active() => self.notify(q),
            _ => {}
        }
    }

    /// Arms the poll timer while the device polls, and disarms it after.
    fn sync_poll(&mut self) {
        let wanted = self.device.polling().filter(|_| self.is_active());
        match (wanted, self.poll_armed) {
            (Some((_, after)), false) => match self.poll_timer.reset(after, None) {
                Ok(()) => self.poll_armed = true,
                Err(e) => log_ratelimit::warn_limited!("virtio: cannot arm the poll timer: {e}"),
            },
            (None, true) => {
                if let Err(e) = self.poll_timer.clear() {
                    log::debug!("virtio: cannot clear the poll timer: {e}");
                }
                self.poll_armed = false;
            }
            _ => {}
        }
    }

    /// The queues (for the fuzzing harness).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Everything the transport and the device hold, for comparing states.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn state_dump(&self) -> String
    where
        D: std::fmt::Debug,
    {
        format!(
            "{:?} queues {:?} sel {} {} {} features {:#x} status {:#x} gen {} active {} failed {} irq {:#x}",
            self.device,
            self.queues,
            self.queue_sel,
            self.device_features_sel,
            self.driver_features_sel,
            self.driver_features,
            self.status,
            self.config_generation,
            self.active,
            self.failed,
            self.interrupt.status()
        )
    }

    /// One line per queue the driver set up, and the interrupt status: where
    /// the driver and the device are in each ring (for diagnosing a guest that
    /// waits on a device, e.g. at a timeout).
    pub fn queue_report(&self) -> Vec<String> {
        use std::sync::atomic::Ordering;
        let mut lines = vec![format!(
            "status {:#x} active {} failed {} interrupt status {:#x}",
            self.status,
            self.active,
            self.failed,
            self.interrupt.status()
        )];
        lines.extend(self.device.report());
        for (i, q) in self.queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let idx = |r: Result<std::num::Wrapping<u16>, _>| {
                r.map_or_else(
                    |_: virtio_queue::Error| "?".to_string(),
                    |w| w.0.to_string(),
                )
            };
            lines.push(format!(
                "queue {i}: size {} driver avail {} device next_avail {} used {} (in memory {})",
                q.size(),
                idx(q.avail_idx(&self.mem, Ordering::Acquire)),
                q.next_avail(),
                q.next_used(),
                idx(q.used_idx(&self.mem, Ordering::Acquire)),
            ));
        }
        lines
    }

    /// Queue `index` was notified.
    pub fn notify(&mut self, index: usize) {
        if index >= self.queues.len() {
            return;
        }
        self.with_device(|d, ctx| d.process_queue(index, ctx));
    }

    fn fail(&mut self, why: &str) {
        log_ratelimit::warn_limited!("virtio: device failed: {why}; the driver must reset it");
        self.failed = true;
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.trigger(INT_CONFIG);
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.active = false;
        self.failed = false;
        self.interrupt.clear();
        self.sync_poll();
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let mut v = v;
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            let offered = self.device_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                log_ratelimit::warn_limited!(
                    "virtio: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.driver_features
                );
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        let newly_ok =
            v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        self.status = v | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        if newly_ok && !self.active {
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                self.fail("DRIVER_OK without FEATURES_OK");
                return;
            }
            for (i, q) in self.queues.iter().enumerate() {
                if q.ready() && !q.is_valid(&self.mem) {
                    let why = format!("queue {i} is not valid");
                    self.fail(&why);
                    return;
                }
            }
            self.active = true;
            let features = self.driver_features;
            if self
                .with_device(|d, ctx| d.activate(features, ctx))
                .is_none()
            {
                self.active = false;
            }
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS if self.device.interrupts_bypass() => {
                self.interrupt.status() | INT_VRING
            }
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            o if SHM_LEN_BASE_REGS.contains(&o) => u32::MAX,
            _ => {
                log::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        // Queue layout may only change before DRIVER_OK.
        let queue_cfg_ok = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if queue_cfg_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if queue_cfg_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if queue_cfg_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if queue_cfg_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(None, Some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if queue_cfg_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queue_cfg_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(None, Some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if queue_cfg_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if queue_cfg_ok => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(None, Some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; if it reaches us, forward it.
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            SHM_SEL => {} // every region reads as absent
            _ => log::debug!("virtio-mmio: ignored write {v:#x} to register {offset:#x}"),
        }
    }
}

fn libc_efd_nonblock() -> i32 {
    vmm_sys_util::eventfd::EFD_NONBLOCK
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL on a descriptor this transport owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above, F_SETFL with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset as u32).to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            log::debug!("virtio-mmio: config space is read-only");
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 == 0 {
            self.write_reg(offset as u32, u32::from_le_bytes(bytes));
        }
    }
}

/// DSDT node of a virtio-mmio device (`LNRO0005`), so distro kernels with
/// `CONFIG_VIRTIO_MMIO` find it through ACPI.
pub struct VirtioMmioAml {
    /// Index (for `_UID` and the device name `VRnn`).
    pub index: u32,
    /// Base address of the register window.
    pub base: u32,
    /// GSI of its interrupt.
    pub gsi: u32,
}

impl Aml for VirtioMmioAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        crate::aml_in_system_bus(
            &aml::Device::new(
                format!("VR{:02X}", self.index).as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &"LNRO0005"),
                    &aml::Name::new("_UID".into(), &self.index),
                    &aml::Name::new("_CCA".into(), &aml::ONE),
                    &aml::Name::new(
                        "_CRS".into(),
                        &aml::ResourceTemplate::new(vec![
                            &aml::Memory32Fixed::new(true, self.base, MMIO_WINDOW as u32),
                            &aml::Interrupt::new(true, true, false, false, self.gsi),
                        ]),
                    ),
                ],
            ),
            sink,
        );
    }
}

/// The kernel command-line form of a device, for kernels built with
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (`virtio_mmio.device=4K@0xd0000000:10`).
pub fn cmdline_device(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
}

#[cfg(test)]
mod tests;
