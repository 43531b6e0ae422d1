use std::error::Error;
use std::ffi::CString;

use devices::bus::BusError;
use devices::virtio::mmio::VirtioMmioAml;
use devices::Aml;
use vm_memory::{GuestAddress, GuestMemoryError};

use super::*;
use crate::device_manager::fake::Recorder;

/// The texts of `e` and of its sources, asserting that none repeats the
/// text of its source: each is printed once, walking the chain.
fn chain(e: &dyn Error) -> Vec<String> {
    let mut links = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        links.push(s.to_string());
        next = s.source();
    }
    for pair in links.windows(2) {
        assert!(
            !pair[0].contains(&pair[1]),
            "{:?} repeats its source {:?}",
            pair[0],
            pair[1]
        );
    }
    links
}

fn errno(n: i32) -> kvm_ioctls::Error {
    kvm_ioctls::Error::new(n)
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

#[test]
fn error_chains_say_each_thing_once() {
    let enoent_text = enoent().to_string();
    let cases: Vec<(BuildError, Vec<String>)> = vec![
        (
            BootError::KernelFile {
                path: "/k".into(),
                source: enoent(),
            }
            .into(),
            vec!["cannot read kernel /k".into(), enoent_text.clone()],
        ),
        (
            BuildError::Kvm {
                what: "KVM_CREATE_VM",
                source: errno(libc::EBUSY),
            },
            vec![
                "KVM_CREATE_VM failed".into(),
                errno(libc::EBUSY).to_string(),
            ],
        ),
        (
            CpuError::Kvm {
                id: 1,
                what: "KVM_SET_REGS",
                source: errno(libc::EINVAL),
            }
            .into(),
            vec![
                "vcpu 1: KVM_SET_REGS failed".into(),
                errno(libc::EINVAL).to_string(),
            ],
        ),
        (
            DeviceError::Bus {
                bus: "pio",
                source: BusError::Overlap {
                    base: 0x3f8,
                    len: 8,
                },
            }
            .into(),
            vec![
                "cannot place a device on the pio bus".into(),
                "bus range 0x3f8+0x8 overlaps an existing device".into(),
            ],
        ),
        (
            DeviceError::Irqfd {
                gsi: 10,
                source: errno(libc::EBUSY),
            }
            .into(),
            vec![
                "KVM_IRQFD for GSI 10 failed".into(),
                errno(libc::EBUSY).to_string(),
            ],
        ),
        (
            BuildError::SerialFile {
                path: "/nonexistent/console.log".into(),
                source: enoent(),
            },
            vec![
                "cannot open serial output /nonexistent/console.log".into(),
                enoent_text.clone(),
            ],
        ),
        (
            MemoryError::Allocate {
                size: 64,
                source: vm_memory::mmap::FromRangesError::InvalidGuestRegion,
            }
            .into(),
            vec![
                "cannot allocate 64 MiB of guest memory".into(),
                vm_memory::mmap::FromRangesError::InvalidGuestRegion.to_string(),
            ],
        ),
        (
            AcpiError::GuestMemory(GuestMemoryError::InvalidGuestAddress(GuestAddress(1))).into(),
            vec![
                "cannot write ACPI tables".into(),
                GuestMemoryError::InvalidGuestAddress(GuestAddress(1)).to_string(),
            ],
        ),
        (
            BootError::BootParams(crate::error::Flat(
                linux_loader::configurator::Error::Overflow,
            ))
            .into(),
            vec![
                "cannot write boot parameters".into(),
                linux_loader::configurator::Error::Overflow.to_string(),
            ],
        ),
    ];
    for (e, want) in cases {
        assert_eq!(chain(&e), want);
    }
}

#[test]
fn real_errors_chain_cleanly() {
    let mem = memory::create_guest_memory(64 << 20, false).unwrap();
    let kernel = boot::LoadedKernel {
        entry: GuestAddress(0x100_0000),
        end: 0x200_0000,
        setup_header: None,
    };
    let e = BuildError::from(boot::load_cmdline(&mem, &"x".repeat(5000), &kernel).unwrap_err());
    let links = chain(&e);
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(links[0].contains("at most 4095 bytes"), "{links:?}");

    let e = open_serial_file(Path::new("/nonexistent/dir/console.log")).unwrap_err();
    assert_eq!(chain(&e).len(), 2);

    let e =
        BuildError::from(boot::load_kernel(&mem, Path::new("/nonexistent/vmlinuz")).unwrap_err());
    assert_eq!(
        chain(&e),
        [
            "cannot read kernel /nonexistent/vmlinuz".to_string(),
            enoent().to_string()
        ]
    );
}

#[test]
fn kvm_open_failures_keep_their_advice_and_errno() {
    let e = BuildError::KvmUnavailable {
        path: "/dev/kvm".into(),
        source: errno(libc::ENOENT),
    };
    let links = chain(&e);
    assert!(links[0].starts_with("/dev/kvm does not exist"), "{links:?}");
    assert!(links[0].contains("kvm-amd"));
    assert_eq!(links[1], errno(libc::ENOENT).to_string());
    let e = BuildError::KvmUnavailable {
        path: "/dev/kvm".into(),
        source: errno(libc::EACCES),
    };
    assert!(chain(&e)[0].contains("'kvm' group"));
    let e = BuildError::KvmUnavailable {
        path: "/dev/kvm".into(),
        source: errno(libc::ENXIO),
    };
    assert_eq!(
        chain(&e),
        [
            "cannot open /dev/kvm".to_string(),
            errno(libc::ENXIO).to_string()
        ]
    );
    let source = CString::new("a\0b").unwrap_err();
    let e = BuildError::KvmPath {
        path: "a\0b".into(),
        source,
    };
    assert_eq!(chain(&e).len(), 2);
}

fn aml_bytes(nodes: &[&dyn Aml]) -> Vec<u8> {
    acpi::dsdt(nodes)
}

/// The guest-visible platform: ports, GSIs, DSDT (byte for byte, in the order
/// minivmm always had) and the command-line entry of the agent port.
#[test]
fn platform_devices_keep_their_guest_visible_layout() {
    let vm = Recorder::default();
    let mut dm = DeviceManager::new(&vm);
    let mem = memory::create_guest_memory(64 << 20, false).unwrap();
    let serial_irq = new_eventfd().unwrap();
    let serial = Arc::new(Mutex::new(
        new_serial(
            &serial_irq,
            &new_eventfd().unwrap(),
            &devices::output::GuestOutput::sink(),
        )
        .unwrap(),
    ));
    let events = VcpuEvents::new().unwrap();
    let cfg = config(&["--agent", "unix:/nonexistent/a.sock", "--isa-debug-exit"]);
    let devices = add_devices(&mut dm, &mem, &serial, &serial_irq, &events, None, &cfg).unwrap();
    assert!(devices.agent_port.is_some());

    assert_eq!(vm.gsis(), vec![COM1_IRQ, GED_GSI, 10]);
    let agent = VirtioMmioAml {
        index: 0,
        base: 0xd000_0000,
        gsi: 10,
    };
    assert_eq!(
        acpi::dsdt(&dm.aml()),
        aml_bytes(&[&SerialAml, &AcpiPmAml, &PowerButtonAml, &PvPanicAml, &agent])
    );
    assert_eq!(
        dm.cmdline_entries(),
        ["virtio_mmio.device=4K@0xd0000000:10"]
    );
    assert_eq!(
        kernel_cmdline("console=ttyS0", true, dm.cmdline_entries()),
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:10"
    );
    assert_eq!(
        kernel_cmdline("console=ttyS0", false, dm.cmdline_entries()),
        "console=ttyS0"
    );

    let (pio, mmio) = dm.into_buses();
    let mut b = [0u8; 1];
    for port in [0x3f8, 0x3ff, 0x60, 0x64, 0x600, 0x607, 0x505, 0xf4, 0xf7] {
        assert!(pio.read(port, &mut b), "nothing at port {port:#x}");
    }
    for port in [0x3f7, 0x400, 0x61, 0x608, 0x504, 0xf3, 0xf8] {
        assert!(!pio.read(port, &mut b), "something at port {port:#x}");
    }
    let mut w = [0u8; 4];
    assert!(mmio.read(0xd000_0000, &mut w));
    assert_eq!(&w, b"virt");
    assert!(!mmio.read(0xd000_1000, &mut w));
}

#[test]
fn without_the_agent_there_is_no_mmio_device() {
    let vm = Recorder::default();
    let mut dm = DeviceManager::new(&vm);
    let mem = memory::create_guest_memory(64 << 20, false).unwrap();
    let irq = new_eventfd().unwrap();
    let serial = Arc::new(Mutex::new(
        new_serial(&irq, &irq, &devices::output::GuestOutput::sink()).unwrap(),
    ));
    let events = VcpuEvents::new().unwrap();
    let devices = add_devices(&mut dm, &mem, &serial, &irq, &events, None, &config(&[])).unwrap();
    assert!(devices.agent_port.is_none());
    assert_eq!(vm.gsis(), vec![COM1_IRQ, GED_GSI]);
    assert_eq!(dm.aml().len(), 5);
    assert!(dm.cmdline_entries().is_empty());
    assert_eq!(kernel_cmdline("quiet", true, dm.cmdline_entries()), "quiet");
    let (pio, _) = dm.into_buses();
    assert!(
        !pio.read(0xf4, &mut [0u8; 1]),
        "no isa-debug-exit by default"
    );
}

/// `--console virtio`: the console comes after the agent's port, in the next
/// virtio-mmio slot, with its own GSI and command-line entry.
#[test]
fn the_virtio_console_takes_the_next_mmio_slot() {
    let vm = Recorder::default();
    let mut dm = DeviceManager::new(&vm);
    let mem = memory::create_guest_memory(64 << 20, false).unwrap();
    let irq = new_eventfd().unwrap();
    let out = devices::output::GuestOutput::sink();
    let serial = Arc::new(Mutex::new(new_serial(&irq, &irq, &out).unwrap()));
    let events = VcpuEvents::new().unwrap();
    let hvc = Hvc::new(out, Arc::new(HvcInput::new().unwrap()));
    let cfg = config(&["--agent", "unix:/nonexistent/a.sock", "--console", "virtio"]);
    let devices = add_devices(&mut dm, &mem, &serial, &irq, &events, Some(hvc), &cfg).unwrap();
    assert!(devices.agent_port.is_some() && devices.hvc_port.is_some());
    assert_eq!(vm.gsis(), vec![COM1_IRQ, GED_GSI, 10, 11]);
    assert_eq!(
        dm.cmdline_entries(),
        [
            "virtio_mmio.device=4K@0xd0000000:10",
            "virtio_mmio.device=4K@0xd0001000:11"
        ]
    );
    let (_, mmio) = dm.into_buses();
    let mut w = [0u8; 4];
    assert!(mmio.read(0xd000_1000 + 8, &mut w), "device id register");
    assert_eq!(u32::from_le_bytes(w), 3, "a console");
}

/// A configuration from command-line flags (besides a kernel).
fn config(flags: &[&str]) -> VmConfig {
    use clap::Parser;
    let mut args = vec!["minivmm", "--kernel", "/nonexistent/vmlinuz"];
    args.extend_from_slice(flags);
    crate::cli::Cli::try_parse_from(args)
        .expect("valid flags")
        .into()
}
