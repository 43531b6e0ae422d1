//! What a vcpu does with each `KVM_RUN` exit, free of the `VcpuFd` so that every
//! arm can be tested without KVM.

use devices::bus::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

use super::VcpuEvents;

/// What the vcpu loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Enter the guest again.
    Continue,
    /// Stop running the guest (it halted, or the VM's fate has been signalled to
    /// the VMM thread): park for good.
    Park,
    /// The vcpu failed: report this, with the registers, and park for good.
    Fail(String),
    /// `KVM_EXIT_INTERNAL_ERROR`: the caller reads the suberror from `kvm_run`,
    /// reports it and parks for good.
    InternalError,
}

/// Handles one exit of vcpu `id`: port I/O and MMIO go to the buses (an IN's or
/// MMIO read's data is filled in for KVM to complete on the next `KVM_RUN`);
/// power-off and reset are signalled on `events`; failures are returned.
pub(super) fn handle_exit(
    id: usize,
    exit: VcpuExit<'_>,
    pio: &Bus,
    mmio: &Bus,
    events: &VcpuEvents,
) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            pio.read(u64::from(port), data);
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            mmio.read(addr, data);
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
            Next::Continue
        }
        VcpuExit::Hlt => {
            log::debug!("vcpu{id}: halted");
            Next::Park
        }
        VcpuExit::Shutdown => {
            log::warn!("vcpu{id}: triple fault (the guest crashed, or reset the CPU the hard way): resetting the VM");
            VcpuEvents::signal(&events.reset, "reset");
            Next::Park
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => {
                VcpuEvents::signal(&events.shutdown, "shutdown");
                Next::Park
            }
            KVM_SYSTEM_EVENT_RESET => {
                VcpuEvents::signal(&events.reset, "reset");
                Next::Park
            }
            KVM_SYSTEM_EVENT_CRASH => Next::Fail("the guest crashed (KVM system event)".into()),
            other => Next::Fail(format!("unknown KVM system event {other}")),
        },
        VcpuExit::FailEntry(reason, cpu) => Next::Fail(format!(
            "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host cpu {cpu})"
        )),
        VcpuExit::InternalError => Next::InternalError,
        other => Next::Fail(format!("unexpected vcpu exit: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, PartialEq, Eq)]
    enum Access {
        Read {
            base: u64,
            offset: u64,
            len: usize,
        },
        Write {
            base: u64,
            offset: u64,
            data: Vec<u8>,
        },
    }

    /// Records accesses; reads return 0xa0, 0xa1, ...
    #[derive(Default)]
    struct Recorder(Vec<Access>);

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0xa0 + i as u8;
            }
            self.0.push(Access::Read {
                base,
                offset,
                len: data.len(),
            });
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push(Access::Write {
                base,
                offset,
                data: data.to_vec(),
            });
        }
    }

    const PIO_BASE: u64 = 0x3f8;
    const MMIO_BASE: u64 = 0xd000_0000;

    struct Fixture {
        pio: Bus,
        mmio: Bus,
        pio_dev: Arc<Mutex<Recorder>>,
        mmio_dev: Arc<Mutex<Recorder>>,
        events: VcpuEvents,
    }

    impl Fixture {
        fn new() -> Self {
            let pio_dev = Arc::new(Mutex::new(Recorder::default()));
            let mmio_dev = Arc::new(Mutex::new(Recorder::default()));
            let mut pio = Bus::new("pio");
            pio.insert(pio_dev.clone(), PIO_BASE, 8).unwrap();
            let mut mmio = Bus::new("mmio");
            mmio.insert(mmio_dev.clone(), MMIO_BASE, 0x1000).unwrap();
            Self {
                pio,
                mmio,
                pio_dev,
                mmio_dev,
                events: VcpuEvents::new().unwrap(),
            }
        }

        fn handle(&self, exit: VcpuExit<'_>) -> Next {
            handle_exit(3, exit, &self.pio, &self.mmio, &self.events)
        }

        fn pio_log(&self) -> Vec<Access> {
            std::mem::take(&mut self.pio_dev.lock().unwrap().0)
        }

        fn mmio_log(&self) -> Vec<Access> {
            std::mem::take(&mut self.mmio_dev.lock().unwrap().0)
        }

        /// Which of shutdown, reset, error, panic fired (and clears them).
        fn fired(&self) -> [bool; 4] {
            let e = &self.events;
            [&e.shutdown, &e.reset, &e.error, &e.panic].map(|fd| fd.read().is_ok())
        }
    }

    #[test]
    fn port_in_reaches_the_device_and_fills_the_data() {
        let f = Fixture::new();
        let mut data = [0u8; 2];
        assert_eq!(f.handle(VcpuExit::IoIn(0x3fa, &mut data)), Next::Continue);
        assert_eq!(data, [0xa0, 0xa1]);
        assert_eq!(
            f.pio_log(),
            [Access::Read {
                base: PIO_BASE,
                offset: 2,
                len: 2
            }]
        );
        assert!(f.mmio_log().is_empty());
        assert_eq!(f.fired(), [false; 4]);
    }

    #[test]
    fn port_out_reaches_the_device() {
        let f = Fixture::new();
        assert_eq!(f.handle(VcpuExit::IoOut(0x3fb, &[0x80])), Next::Continue);
        assert_eq!(
            f.pio_log(),
            [Access::Write {
                base: PIO_BASE,
                offset: 3,
                data: vec![0x80]
            }]
        );
        assert!(f.mmio_log().is_empty());
    }

    #[test]
    fn unmapped_port_in_reads_all_ones_and_continues() {
        let f = Fixture::new();
        let mut data = [0u8; 1];
        assert_eq!(f.handle(VcpuExit::IoIn(0x80, &mut data)), Next::Continue);
        assert_eq!(data, [0xff]);
        assert!(f.pio_log().is_empty());
    }

    #[test]
    fn mmio_read_reaches_the_device_and_fills_the_data() {
        let f = Fixture::new();
        let mut data = [0u8; 4];
        assert_eq!(
            f.handle(VcpuExit::MmioRead(MMIO_BASE + 0x70, &mut data)),
            Next::Continue
        );
        assert_eq!(data, [0xa0, 0xa1, 0xa2, 0xa3]);
        assert_eq!(
            f.mmio_log(),
            [Access::Read {
                base: MMIO_BASE,
                offset: 0x70,
                len: 4
            }]
        );
        assert!(f.pio_log().is_empty());
    }

    #[test]
    fn mmio_write_reaches_the_device() {
        let f = Fixture::new();
        assert_eq!(
            f.handle(VcpuExit::MmioWrite(MMIO_BASE + 0x50, &[1, 0, 0, 0])),
            Next::Continue
        );
        assert_eq!(
            f.mmio_log(),
            [Access::Write {
                base: MMIO_BASE,
                offset: 0x50,
                data: vec![1, 0, 0, 0]
            }]
        );
        assert!(f.pio_log().is_empty());
    }

    #[test]
    fn hlt_parks_without_signalling() {
        let f = Fixture::new();
        assert_eq!(f.handle(VcpuExit::Hlt), Next::Park);
        assert_eq!(f.fired(), [false; 4]);
    }

    #[test]
    fn triple_fault_resets() {
        let f = Fixture::new();
        assert_eq!(f.handle(VcpuExit::Shutdown), Next::Park);
        assert_eq!(f.fired(), [false, true, false, false]);
    }

    #[test]
    fn system_events_power_off_reset_or_fail() {
        let f = Fixture::new();
        assert_eq!(
            f.handle(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[])),
            Next::Park
        );
        assert_eq!(f.fired(), [true, false, false, false]);
        assert_eq!(
            f.handle(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[0])),
            Next::Park
        );
        assert_eq!(f.fired(), [false, true, false, false]);
        assert_eq!(
            f.handle(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[])),
            Next::Fail("the guest crashed (KVM system event)".into())
        );
        assert_eq!(
            f.handle(VcpuExit::SystemEvent(99, &[])),
            Next::Fail("unknown KVM system event 99".into())
        );
        // Failures are the caller's to report, with the registers.
        assert_eq!(f.fired(), [false; 4]);
    }

    #[test]
    fn entry_failure_names_reason_and_cpu() {
        let f = Fixture::new();
        assert_eq!(
            f.handle(VcpuExit::FailEntry(0x21, 3)),
            Next::Fail(
                "KVM could not enter the guest (hardware entry failure reason 0x21 on host cpu 3)"
                    .into()
            )
        );
    }

    #[test]
    fn internal_error_is_left_to_the_caller() {
        let f = Fixture::new();
        assert_eq!(f.handle(VcpuExit::InternalError), Next::InternalError);
        assert_eq!(f.fired(), [false; 4]);
    }

    #[test]
    fn unknown_exits_fail() {
        let f = Fixture::new();
        assert_eq!(
            f.handle(VcpuExit::IoapicEoi(5)),
            Next::Fail("unexpected vcpu exit: IoapicEoi(5)".into())
        );
        assert_eq!(
            f.handle(VcpuExit::Unknown),
            Next::Fail("unexpected vcpu exit: Unknown".into())
        );
        assert_eq!(f.fired(), [false; 4]);
    }
}
