//! 16550A UART (COM1) built on vm-superio's [`vm_superio::Serial`].
//!
//! Output goes to a [`GuestOutput`] (stdout, a file or nowhere; bounded and
//! written off the vcpu thread, so the guest never waits for the host). Input is pushed by the
//! VMM thread with [`SerialDevice::enqueue_input`], which only accepts what fits in
//! the receive FIFO; when the guest drains the FIFO the device signals
//! `input_ready` so the VMM resumes reading its input source (back-pressure instead
//! of dropped keystrokes).

use std::io;

use acpi_tables::{aml, Aml, AmlSink};
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::output::GuestOutput;
use crate::EventFdTrigger;

/// I/O port base of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORT_LEN: u16 = 8;
/// Legacy IRQ (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// Serial events: tells the VMM thread when the guest emptied the receive FIFO.
pub struct InputReady(EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        log::debug!("serial: a byte of guest output could not be written");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial: cannot signal input readiness: {e}");
        }
    }
}

/// COM1 as seen by the guest.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, InputReady, GuestOutput>,
}

impl SerialDevice {
    /// A UART raising `interrupt` (an irqfd for IRQ 4), writing to `out`, and
    /// signalling `input_ready` whenever its receive FIFO becomes empty.
    pub fn new(interrupt: EventFdTrigger, input_ready: EventFd, out: GuestOutput) -> Self {
        Self {
            uart: Serial::with_events(interrupt, InputReady(input_ready), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted (0 when the
    /// FIFO is full: retry after `input_ready` fires).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return Ok(0);
        }
        self.uart
            .enqueue_raw_bytes(bytes)
            .map_err(|e| io::Error::other(format!("serial input: {e}")))
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log_ratelimit::warn_limited!("serial: write to register {offset}: {e}");
        }
    }
}

/// ACPI description of COM1 (`PNP0501`, its ports and IRQ).
pub struct SerialAml;

impl Aml for SerialAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        crate::aml_in_system_bus(
            &aml::Device::new(
                "COM1".into(),
                vec![
                    &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                    &aml::Name::new("_UID".into(), &aml::ZERO),
                    &aml::Name::new(
                        "_CRS".into(),
                        &aml::ResourceTemplate::new(vec![
                            &aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN as u8),
                            &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                        ]),
                    ),
                ],
            ),
            sink,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (
        SerialDevice,
        EventFd,
        EventFd,
        Arc<Mutex<Vec<u8>>>,
        GuestOutput,
    ) {
        let irq = EventFd::new(libc_nonblock()).unwrap();
        let ready = EventFd::new(libc_nonblock()).unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let host = GuestOutput::new(Box::new(Capture(out.clone())), 4096).unwrap();
        let dev = SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            ready.try_clone().unwrap(),
            host.clone(),
        );
        (dev, irq, ready, out, host)
    }

    fn libc_nonblock() -> i32 {
        // EFD_NONBLOCK
        0o4000
    }

    #[test]
    fn guest_writes_reach_the_output() {
        let (mut dev, _irq, _ready, out, host) = device();
        for b in b"hi\n" {
            dev.write(COM1_PORT as u64, 0, &[*b]);
        }
        assert!(host.drain(Instant::now() + Duration::from_secs(10)));
        assert_eq!(&*out.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_bounded_by_the_fifo_and_signals_when_drained() {
        let (mut dev, _irq, ready, _out, _host) = device();
        let big = vec![b'x'; 1000];
        let n = dev.enqueue_input(&big).unwrap();
        assert!(n > 0 && n < big.len(), "accepted {n}");
        assert_eq!(dev.enqueue_input(&big).unwrap(), 0);
        assert!(ready.read().is_err(), "no readiness before the guest reads");
        let mut b = [0u8];
        for _ in 0..n {
            dev.read(COM1_PORT as u64, 0, &mut b);
            assert_eq!(b[0], b'x');
        }
        assert_eq!(ready.read().unwrap(), 1);
        assert_eq!(dev.input_room(), n);
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let (mut dev, _irq, _ready, out, host) = device();
        dev.write(0, 0, &[1, 2]);
        let mut b = [0u8; 2];
        dev.read(0, 0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        assert!(host.drain(Instant::now() + Duration::from_secs(10)));
        assert!(out.lock().unwrap().is_empty());
    }

    #[test]
    fn aml_names_com1() {
        let mut bytes = Vec::new();
        SerialAml.to_aml_bytes(&mut bytes);
        let s = String::from_utf8_lossy(&bytes);
        assert!(s.contains("COM1") && s.contains("_CRS"));
    }
}
