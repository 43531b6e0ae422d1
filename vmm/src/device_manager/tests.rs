use std::os::fd::AsRawFd;

use devices::virtio::console::Console;
use vm_memory::GuestAddress;

use super::fake::Recorder;
use super::*;

/// Registers that read as their offset and ignore writes.
struct Regs;

impl BusDevice for Regs {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// AML that is just a name, to tell nodes apart.
struct Node(&'static str);

impl Aml for Node {
    fn to_aml_bytes(&self, sink: &mut dyn devices::AmlSink) {
        sink.vec(self.0.as_bytes());
    }
}

fn bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

fn aml_bytes(dm: &DeviceManager) -> Vec<Vec<u8>> {
    dm.aml().into_iter().map(bytes).collect()
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn regs() -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(Regs))
}

fn evt() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// The error of a virtio-mmio registration that must fail.
fn refused(dm: &mut DeviceManager, mem: &GuestMemoryMmap) -> DeviceError {
    match dm.register_mmio_device(Console::default(), mem) {
        Ok(_) => panic!("registered a device that does not fit"),
        Err(e) => e,
    }
}

fn read32(bus: &Bus, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(bus.read(addr, &mut b), "nothing at {addr:#x}");
    u32::from_le_bytes(b)
}

#[test]
fn port_device_serves_all_its_ranges_with_its_irq_and_node() {
    let vm = Recorder::default();
    let mut dm = DeviceManager::new(&vm);
    let irq = evt();
    dm.register_pio_device(
        regs(),
        &[PortRange::new(0x60, 1), PortRange::new(0x64, 1)],
        Some(Irq::new(&irq, 1)),
        Node("KBD0"),
    )
    .unwrap();
    assert_eq!(vm.gsis(), vec![1]);
    irq.write(1).unwrap();
    assert_eq!(vm.irqfds.borrow()[0].1.read().unwrap(), 1, "same eventfd");
    assert_eq!(aml_bytes(&dm), vec![b"KBD0".to_vec()]);
    assert!(dm.cmdline_entries().is_empty());
    let (pio, mmio) = dm.into_buses();
    let mut b = [0u8; 1];
    assert!(pio.read(0x60, &mut b) && pio.read(0x64, &mut b));
    assert!(!pio.read(0x62, &mut b));
    assert!(!mmio.read(0x60, &mut b));
}

#[test]
fn overlapping_ports_are_rejected_without_a_node() {
    let vm = Recorder::default();
    let mut dm = DeviceManager::new(&vm);
    dm.register_pio_device(regs(), &[PortRange::new(0x3f8, 8)], None, Node("COM1"))
        .unwrap();
    let irq = evt();
    let e = dm
        .register_pio_device(
            regs(),
            &[PortRange::new(0x3ff, 2)],
            Some(Irq::new(&irq, 4)),
            Node("BAD0"),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            DeviceError::Bus {
                bus: "pio",
                source: BusError::Overlap {
                    base: 0x3ff,
                    len: 2
                }
            }
        ),
        "{e:?}"
    );
    assert_eq!(aml_bytes(&dm), vec![b"COM1".to_vec()]);
    assert!(vm.gsis().is_empty(), "no irqfd for a rejected device");
}

#[test]
fn a_gsi_is_given_once() {
    let vm = Recorder::default();
    let mut dm = DeviceManager::new(&vm);
    let (a, b) = (evt(), evt());
    dm.register_irq_device(Irq::new(&a, 5), Node("GED0"))
        .unwrap();
    let e = dm
        .register_irq_device(Irq::new(&b, 5), Node("GED1"))
        .unwrap_err();
    assert!(matches!(e, DeviceError::GsiTaken(5)), "{e:?}");
    let e = dm
        .register_pio_device(
            regs(),
            &[PortRange::new(0x70, 2)],
            Some(Irq::new(&b, 5)),
            Node("RTC0"),
        )
        .unwrap_err();
    assert!(matches!(e, DeviceError::GsiTaken(5)), "{e:?}");
    assert_eq!(vm.gsis(), vec![5]);
    assert_eq!(aml_bytes(&dm), vec![b"GED0".to_vec()]);
}

#[test]
fn mmio_devices_take_consecutive_slots_and_gsis() {
    let vm = Recorder::default();
    let mut dm = DeviceManager::new(&vm);
    let mem = mem();
    let t0 = dm.register_mmio_device(Console::default(), &mem).unwrap();
    let t1 = dm.register_mmio_device(Console::default(), &mem).unwrap();
    assert_eq!(vm.gsis(), vec![10, 11]);
    assert_eq!(
        dm.cmdline_entries(),
        [
            "virtio_mmio.device=4K@0xd0000000:10",
            "virtio_mmio.device=4K@0xd0001000:11"
        ]
    );
    let node = |index, base, gsi| bytes(&VirtioMmioAml { index, base, gsi });
    assert_eq!(
        aml_bytes(&dm),
        vec![node(0, 0xd000_0000, 10), node(1, 0xd000_1000, 11)]
    );
    // One ioeventfd per queue at the notify register, datamatch = index.
    let mut want = Vec::new();
    for (t, notify) in [(&t0, 0xd000_0050u64), (&t1, 0xd000_1050)] {
        let t = t.lock().unwrap();
        assert_eq!(t.queue_evts().len(), 6);
        for (i, e) in (0u32..).zip(t.queue_evts()) {
            want.push((notify, i, e.as_raw_fd()));
        }
    }
    assert_eq!(*vm.ioevents.borrow(), want);

    let (_, mmio) = dm.into_buses();
    assert_eq!(read32(&mmio, 0xd000_0000), 0x7472_6976, "virt");
    assert_eq!(read32(&mmio, 0xd000_1000), 0x7472_6976, "virt");
    let mut b = [0u8; 4];
    assert!(!mmio.read(0xd000_2000, &mut b));
    // The transport's interrupt is the registered irqfd: DRIVER_OK without
    // FEATURES_OK fails the device, which raises a config interrupt.
    assert!(mmio.write(0xd000_1070, &4u32.to_le_bytes()));
    assert_eq!(vm.irqfds.borrow()[1].1.read().unwrap(), 1);
    assert!(vm.irqfds.borrow()[0].1.read().is_err(), "slot 0 is quiet");
}

#[test]
fn mmio_gsis_skip_the_taken_ones() {
    let vm = Recorder::default();
    let space = MmioSpace {
        base: 0x1000_0000,
        slots: 4,
        first_gsi: 4,
        gsi_end: 8,
    };
    let mut dm = DeviceManager::with_mmio_space(&vm, space);
    let com1 = evt();
    dm.register_irq_device(Irq::new(&com1, 5), Node("GED0"))
        .unwrap();
    let mem = mem();
    dm.register_mmio_device(Console::default(), &mem).unwrap();
    dm.register_mmio_device(Console::default(), &mem).unwrap();
    assert_eq!(vm.gsis(), vec![5, 4, 6]);
    assert_eq!(
        dm.cmdline_entries(),
        [
            "virtio_mmio.device=4K@0x10000000:4",
            "virtio_mmio.device=4K@0x10001000:6"
        ]
    );
}

#[test]
fn running_out_of_slots_or_gsis_is_an_error() {
    let vm = Recorder::default();
    let mem = mem();
    let one_slot = MmioSpace {
        slots: 1,
        ..MmioSpace::default()
    };
    let mut dm = DeviceManager::with_mmio_space(&vm, one_slot);
    dm.register_mmio_device(Console::default(), &mem).unwrap();
    let e = refused(&mut dm, &mem);
    assert!(matches!(e, DeviceError::NoMmioSlot(1)), "{e:?}");
    assert_eq!(dm.cmdline_entries().len(), 1);

    let one_gsi = MmioSpace {
        first_gsi: 10,
        gsi_end: 11,
        ..MmioSpace::default()
    };
    let mut dm = DeviceManager::with_mmio_space(&vm, one_gsi);
    dm.register_mmio_device(Console::default(), &mem).unwrap();
    let e = refused(&mut dm, &mem);
    assert!(
        matches!(e, DeviceError::NoGsi { first: 10, end: 11 }),
        "{e:?}"
    );

    let high = MmioSpace {
        base: 0xffff_f000,
        ..MmioSpace::default()
    };
    let mut dm = DeviceManager::with_mmio_space(&vm, high);
    dm.register_mmio_device(Console::default(), &mem).unwrap();
    let e = refused(&mut dm, &mem);
    assert!(matches!(e, DeviceError::MmioAbove4G(FOUR_GIB)), "{e:?}");
}

#[test]
fn kvm_refusals_are_typed_errors() {
    let vm = Recorder {
        refuse_gsi: Some(10),
        ..Recorder::default()
    };
    let mut dm = DeviceManager::new(&vm);
    let mem = mem();
    let e = refused(&mut dm, &mem);
    match e {
        DeviceError::Irqfd { gsi: 10, source } => assert_eq!(source.errno(), libc::EBUSY),
        e => panic!("{e:?}"),
    }
    assert!(dm.cmdline_entries().is_empty() && dm.aml().is_empty());

    let vm = Recorder {
        refuse_ioevents: true,
        ..Recorder::default()
    };
    let mut dm = DeviceManager::new(&vm);
    let e = refused(&mut dm, &mem);
    assert!(
        matches!(
            e,
            DeviceError::Ioeventfd {
                queue: 0,
                addr: 0xd000_0050,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn nodes_follow_registration_order() {
    let vm = Recorder::default();
    let mut dm = DeviceManager::new(&vm);
    let irq = evt();
    dm.register_pio_device(regs(), &[PortRange::new(0x3f8, 8)], None, Node("COM1"))
        .unwrap();
    dm.register_irq_device(Irq::new(&irq, 5), Node("GED0"))
        .unwrap();
    dm.register_mmio_device(Console::default(), &mem()).unwrap();
    dm.register_pio_device(regs(), &[PortRange::new(0x505, 1)], None, Node("PEVT"))
        .unwrap();
    let nodes = aml_bytes(&dm);
    assert_eq!(nodes.len(), 4);
    assert_eq!(nodes[0], b"COM1");
    assert_eq!(nodes[1], b"GED0");
    assert!(nodes[2].windows(4).any(|w| w == b"VR00"));
    assert_eq!(nodes[3], b"PEVT");
}
