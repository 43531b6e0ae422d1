//! Builds a VM from its [`VmConfig`]: KVM VM and irqchip, guest memory, kernel,
//! initrd and command line, devices and their buses, ACPI tables, vcpus.
//!
//! A reboot builds a fresh VM from the same config; only what is [`Persistent`]
//! (the KVM handle, the supported CPUID, the serial console's host side, the
//! lifecycle eventfds) survives it.

use std::ffi::NulError;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::acpi_pm::{AcpiPmAml, AcpiPmDevice, PM_PORT, PM_PORT_LEN};
use devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use devices::i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
use devices::output::{GuestOutput, Undelivered, OUTPUT_BUFFER};
use devices::power_button::{PowerButton, PowerButtonAml, GED_GSI};
use devices::pvpanic::{PvPanic, PvPanicAml, PVPANIC_PORT};
use devices::serial::{SerialAml, SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use devices::virtio::console::Console;
use devices::virtio::hvc::{Hvc, HvcInput};
use devices::virtio::mmio::MmioTransport;
use devices::{EventFdTrigger, NoAml};
use kvm_bindings::{
    kvm_clock_data, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, BootInfo};
use crate::config::{ConsoleKind, SerialBackend, VmConfig};
use crate::cpu::{self, CpuError};
use crate::device_manager::{DeviceError, DeviceManager, Irq, PortRange};
use crate::layout::KVM_TSS_ADDR;
use crate::memory::{self, MemoryError};
use crate::mptable::{self, MpTableError};
use crate::run::klog::{LineTail, TailWriter};
use crate::vcpu::{VcpuError, VcpuEvents, Vcpus};

mod host;
use host::kvm_open_advice;
pub use host::{open_kvm, preflight};

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The KVM device cannot be opened; the text says what to do about it.
    #[error("{}", kvm_open_advice(.path, .source))]
    KvmUnavailable {
        /// The device (`/dev/kvm` or `$MINIVMM_KVM_DEVICE`).
        path: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `$MINIVMM_KVM_DEVICE` holds a NUL byte.
    #[error("invalid KVM device path {path:?}")]
    KvmPath {
        /// The path given.
        path: String,
        /// Where the NUL is.
        #[source]
        source: NulError,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Operation.
        what: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The initrd another thread was making failed (that thread says why).
    #[error("the initramfs was not made")]
    InitrdNotMade,
    /// The host lacks a KVM feature minivmm needs.
    #[error("KVM on this host lacks {0}, which minivmm needs")]
    MissingCap(&'static str),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Memory larger than the host can back.
    #[error(
        "cannot allocate {wanted} MiB of guest memory: the host has {host} MiB of RAM and swap"
    )]
    MemoryTooLarge {
        /// Requested.
        wanted: u64,
        /// Available.
        host: u64,
    },
    /// A guest memory region has no host mapping to give KVM.
    #[error("cannot find the host mapping of guest memory region {slot}")]
    HostMapping {
        /// KVM memory slot (region index).
        slot: u32,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Kernel, initrd, command line, boot parameters.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// vcpu configuration.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Device registration.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Serial console file.
    #[error("cannot open serial output {path}")]
    SerialFile {
        /// File.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created or duplicated.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// The console output thread could not be started.
    #[error("cannot start the console output thread")]
    OutputThread(#[source] io::Error),
    /// The vcpu threads could not be started.
    #[error(transparent)]
    Vcpus(#[from] VcpuError),
    /// A `--share` could not be served.
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
}

/// What survives a reboot (a rebuild of the VM): host-side state, never guest state.
pub struct Persistent {
    kvm: Kvm,
    cpuid: CpuId,
    /// Lifecycle eventfds shared with the vcpus and devices.
    pub events: Arc<VcpuEvents>,
    /// COM1; rebuilt in place on each boot so its guest-visible state resets.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Fires when the guest drained COM1's receive FIFO.
    pub serial_input_ready: EventFd,
    serial_irq: EventFd,
    serial_out: GuestOutput,
    /// The console's last lines (`minivmm run` diagnostics).
    pub serial_tail: Option<Arc<Mutex<LineTail>>>,
    /// With `--console virtio`: input held for hvc0, across rebuilds.
    pub hvc_input: Option<Arc<HvcInput>>,
    /// With `--share`: the virtiofsd each build starts, one per share.
    share_daemon: Option<crate::share::Daemon>,
}

impl Persistent {
    /// Opens KVM and the serial console's host side.
    pub fn new(cfg: &VmConfig) -> Result<Self, BuildError> {
        let kvm = open_kvm()?;
        let cpuid = cpu::supported_cpuid(&kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let sink: Box<dyn io::Write + Send> = match &cfg.serial {
            SerialBackend::Stdio => Box::new(io::stdout()),
            SerialBackend::None => Box::new(io::sink()),
            SerialBackend::Stderr => Box::new(io::stderr()),
            SerialBackend::File(path) => Box::new(open_serial_file(path)?),
        };
        // A run keeps the console's tail even when it goes nowhere.
        let serial_tail = cfg
            .run_channel
            .then(|| Arc::new(Mutex::new(LineTail::default())));
        let serial_out = match (&cfg.serial, &serial_tail) {
            (SerialBackend::None, None) => GuestOutput::sink(),
            (_, Some(tail)) => {
                GuestOutput::new(Box::new(TailWriter::new(sink, tail.clone())), OUTPUT_BUFFER)
                    .map_err(BuildError::OutputThread)?
            }
            (_, None) => GuestOutput::new(sink, OUTPUT_BUFFER).map_err(BuildError::OutputThread)?,
        };
        let serial_irq = new_eventfd()?;
        let serial_input_ready = new_eventfd()?;
        let serial = new_serial(&serial_irq, &serial_input_ready, &serial_out)?;
        let hvc_input = match cfg.console {
            ConsoleKind::Serial => None,
            ConsoleKind::Virtio => Some(Arc::new(HvcInput::new().map_err(BuildError::EventFd)?)),
        };
        let share_daemon = if cfg.shares.is_empty() {
            None
        } else {
            Some(crate::share::Daemon::resolve(cfg.virtiofsd.as_deref())?)
        };
        Ok(Self {
            share_daemon,
            kvm,
            cpuid,
            events: Arc::new(VcpuEvents::new().map_err(BuildError::EventFd)?),
            serial: Arc::new(Mutex::new(serial)),
            serial_input_ready,
            serial_irq,
            serial_out,
            serial_tail,
            hvc_input,
        })
    }

    /// Gives COM1 fresh registers, keeping its host side.
    fn reset_serial(&self) -> Result<(), BuildError> {
        let fresh = new_serial(&self.serial_irq, &self.serial_input_ready, &self.serial_out)?;
        *self.serial.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Waits at most until `deadline` for the console output to be written;
    /// says what could not be.
    pub fn finish_serial(&self, deadline: std::time::Instant) -> Undelivered {
        self.serial_out.finish(deadline)
    }
}

fn new_eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

fn dup(evt: &EventFd) -> Result<EventFd, BuildError> {
    evt.try_clone().map_err(BuildError::EventFd)
}

/// A UART in its reset state, raising `irq` and writing to `out`.
fn new_serial(
    irq: &EventFd,
    input_ready: &EventFd,
    out: &GuestOutput,
) -> Result<SerialDevice, BuildError> {
    Ok(SerialDevice::new(
        EventFdTrigger::new(dup(irq)?),
        dup(input_ready)?,
        out.clone(),
    ))
}

fn open_serial_file(path: &Path) -> Result<File, BuildError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| BuildError::SerialFile {
            path: path.into(),
            source,
        })
}

/// The guest-agent port: a virtio-console behind virtio-mmio.
pub type AgentPort = Arc<Mutex<MmioTransport<Console>>>;
/// The guest's virtio console (`--console virtio`), behind virtio-mmio.
pub type HvcPort = Arc<Mutex<MmioTransport<Hvc>>>;

/// A built VM with its vcpu threads. Dropping it stops the vcpus, then releases
/// the VM and its memory (field order matters).
pub struct Vm {
    vcpus: Vcpus,
    agent_port: Option<AgentPort>,
    hvc_port: Option<HvcPort>,
    /// The `--share` devices; their daemons stop when the VM goes.
    fs_ports: Vec<crate::share::FsPort>,
    vm_fd: VmFd,
    _memory: GuestMemoryMmap,
    power_button: PowerButton,
    /// Guest clock saved by [`Vm::pause`], restored by [`Vm::resume`].
    clock: Option<kvm_clock_data>,
}

impl Vm {
    /// Stops the vcpus and tears the VM down.
    pub fn stop(self) {
        drop(self);
    }

    /// Host thread ids of the vcpus.
    pub fn vcpu_thread_ids(&self) -> &[i32] {
        self.vcpus.thread_ids()
    }

    /// The vcpus' registers as they last parked.
    pub fn vcpu_registers(&self) -> Vec<crate::vcpu::VcpuRegisters> {
        self.vcpus.registers()
    }

    /// Parks every vcpu (pending I/O completed) and freezes the guest clock. A
    /// vcpu that does not park in time is logged; it parks once it can.
    pub fn pause(&mut self) -> Result<(), VcpuError> {
        self.vcpus.pause()?;
        if self.clock.is_none() {
            match self.vm_fd.get_clock() {
                Ok(c) => self.clock = Some(c),
                Err(e) => log::debug!("KVM_GET_CLOCK: {e}"),
            }
        }
        Ok(())
    }

    /// Restores the guest clock to where it was paused and lets the vcpus run.
    pub fn resume(&mut self) {
        if let Some(mut c) = self.clock.take() {
            // Absolute value, without KVM's realtime adjustment: paused time does
            // not pass for the guest.
            c.flags = 0;
            if let Err(e) = self.vm_fd.set_clock(&c) {
                log::debug!("KVM_SET_CLOCK: {e}");
            }
        }
        self.vcpus.resume();
    }

    /// The virtio devices' queue states ([`devices::virtio::mmio::MmioTransport::queue_report`]), each
    /// line prefixed with the device's name.
    pub fn virtio_report(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.agent_port {
            let t = p.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(t.queue_report().into_iter().map(|l| format!("channel {l}")));
        }
        if let Some(p) = &self.hvc_port {
            let t = p.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(t.queue_report().into_iter().map(|l| format!("console {l}")));
        }
        out
    }

    /// The guest-agent port, when the VM has one.
    pub fn agent_port(&self) -> Option<&AgentPort> {
        self.agent_port.as_ref()
    }

    /// The `--share` devices (their daemons stop when the VM goes).
    pub fn fs_ports(&self) -> &[crate::share::FsPort] {
        &self.fs_ports
    }

    /// The virtio console, when the VM has one.
    pub fn hvc_port(&self) -> Option<&HvcPort> {
        self.hvc_port.as_ref()
    }

    /// Presses the ACPI power button.
    pub fn press_power_button(&self) -> io::Result<()> {
        self.power_button.press()
    }
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, BuildError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

pub(crate) fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), BuildError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|source| BuildError::HostMapping { slot, source })?;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the returned
        // `Vm` keeps alive until after the VM fd (and so KVM's use of it) is gone.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The devices a VM needs handles to after it is built.
struct Devices {
    power_button: PowerButton,
    agent_port: Option<AgentPort>,
    hvc_port: Option<HvcPort>,
}

/// Registers the VM's devices, in DSDT order: COM1, the i8042 (reset line only),
/// the ACPI PM registers, the power button (GED), pvpanic, with
/// `--isa-debug-exit` QEMU's isa-debug-exit (no ACPI node), then, with
/// `--agent`, the guest-agent port (a virtio-console in the first virtio-mmio
/// slot), then with `--console virtio` the guest's console `hvc` (the next
/// slot).
fn add_devices(
    dm: &mut DeviceManager,
    mem: &GuestMemoryMmap,
    serial: &Arc<Mutex<SerialDevice>>,
    serial_irq: &EventFd,
    events: &VcpuEvents,
    hvc: Option<Hvc>,
    cfg: &VmConfig,
) -> Result<Devices, BuildError> {
    dm.register_pio_device(
        serial.clone(),
        &[PortRange::new(COM1_PORT, COM1_PORT_LEN)],
        Some(Irq::new(serial_irq, COM1_IRQ)),
        SerialAml,
    )?;
    let i8042 = I8042::new(EventFdTrigger::new(dup(&events.reset)?));
    dm.register_pio_device(
        Arc::new(Mutex::new(i8042)),
        &[
            PortRange::new(I8042_DATA_PORT, 1),
            PortRange::new(I8042_COMMAND_PORT, 1),
        ],
        None,
        NoAml,
    )?;
    let pm = AcpiPmDevice::new(dup(&events.shutdown)?, dup(&events.reset)?);
    dm.register_pio_device(
        Arc::new(Mutex::new(pm)),
        &[PortRange::new(PM_PORT, PM_PORT_LEN)],
        None,
        AcpiPmAml,
    )?;
    let button_irq = new_eventfd()?;
    dm.register_irq_device(Irq::new(&button_irq, GED_GSI), PowerButtonAml)?;
    let pvpanic = PvPanic::new(dup(&events.panic)?);
    dm.register_pio_device(
        Arc::new(Mutex::new(pvpanic)),
        &[PortRange::new(PVPANIC_PORT, 1)],
        None,
        PvPanicAml,
    )?;
    if cfg.isa_debug_exit {
        let dev = DebugExit::new(events.debug_exit_value.clone(), dup(&events.debug_exit)?);
        dm.register_pio_device(
            Arc::new(Mutex::new(dev)),
            &[PortRange::new(DEBUG_EXIT_PORT, DEBUG_EXIT_LEN)],
            None,
            NoAml,
        )?;
    }
    let agent_port = if cfg.run_channel {
        Some(dm.register_mmio_device(Console::new(run_protocol::PORT_NAME), mem)?)
    } else if cfg.agent.is_some() {
        Some(dm.register_mmio_device(Console::default(), mem)?)
    } else {
        None
    };
    let hvc_port = match hvc {
        Some(hvc) => Some(dm.register_mmio_device(hvc, mem)?),
        None => None,
    };
    Ok(Devices {
        power_button: PowerButton::new(button_irq),
        agent_port,
        hvc_port,
    })
}

/// The kernel command line: the user's, then (if `with_devices`) the
/// virtio-mmio devices' entries, each after a space.
fn kernel_cmdline(user: &str, with_devices: bool, device_entries: &[String]) -> String {
    let mut cmdline = user.to_owned();
    if with_devices {
        for entry in device_entries {
            cmdline.push(' ');
            cmdline.push_str(entry);
        }
    }
    cmdline
}

/// Builds the VM described by `cfg` and starts its vcpus, parked if `paused`.
pub fn build_vm(cfg: &VmConfig, b: &Persistent, paused: bool) -> Result<Vm, BuildError> {
    let vm = create_vm(&b.kvm)?;
    // Shared (a memfd) when a virtiofsd must map it.
    let mem = memory::create_guest_memory(cfg.memory, !cfg.shares.is_empty())?;
    register_memory(&vm, &mem)?;

    let kernel = boot::load_kernel(&mem, &cfg.kernel)?;
    if let Some(gate) = &cfg.initrd_gate {
        if !gate.wait() {
            return Err(BuildError::InitrdNotMade);
        }
    }
    let initrd = match &cfg.initrd {
        Some(p) => Some(boot::load_initrd(&mem, cfg.memory, p, &kernel)?),
        None => None,
    };

    b.reset_serial()?;
    let mut dm = DeviceManager::new(&vm);
    let hvc = b
        .hvc_input
        .as_ref()
        .map(|input| Hvc::new(b.serial_out.clone(), input.clone()));
    let devices = add_devices(&mut dm, &mem, &b.serial, &b.serial_irq, &b.events, hvc, cfg)?;
    let mut fs_ports = Vec::new();
    if let Some(d) = &b.share_daemon {
        for fs in crate::share::start_shares(&cfg.shares, d)? {
            fs_ports.push(dm.register_mmio_device(fs, &mem)?);
        }
    }

    let cmdline = kernel_cmdline(&cfg.cmdline, cfg.virtio_mmio_cmdline, dm.cmdline_entries());
    let cmdline_len = boot::load_cmdline(&mem, &cmdline, &kernel)?;
    let rsdp = acpi::write_tables(&mem, cfg.cpus, &dm.aml())?;
    mptable::write(&mem, cfg.cpus)?;
    boot::write_boot_params(
        &mem,
        &BootInfo {
            kernel,
            cmdline_len,
            initrd,
            rsdp: rsdp.0,
            mem_size: cfg.memory,
        },
    )?;
    cpu::write_boot_structures(&mem)?;
    boot::write_reset_vector(&mem)?;

    let mut fds = Vec::with_capacity(usize::from(cfg.cpus));
    for id in 0..cfg.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        cpu::configure_vcpu(&fd, id, cfg.cpus, &b.cpuid, kernel.entry)?;
        fds.push(fd);
    }
    let (pio, mmio) = dm.into_buses();
    let vcpus = Vcpus::start(fds, Arc::new(pio), Arc::new(mmio), b.events.clone(), paused)?;
    Ok(Vm {
        vcpus,
        agent_port: devices.agent_port,
        hvc_port: devices.hvc_port,
        fs_ports,
        vm_fd: vm,
        _memory: mem,
        power_button: devices.power_button,
        clock: None,
    })
}

#[cfg(test)]
mod tests;
