//! pvpanic: the guest reports a kernel panic by writing to I/O port 0x505
//! (`QEMU0001` in the DSDT, as QEMU's ISA pvpanic device). Reads return the
//! events the device supports.

use acpi_tables::{aml, Aml, AmlSink};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The device's I/O port.
pub const PVPANIC_PORT: u16 = 0x505;
/// Event bit: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: a crash kernel was loaded.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The device: signals `panicked` when the guest reports a panic.
pub struct PvPanic {
    panicked: EventFd,
}

impl PvPanic {
    /// A device signalling `panicked`.
    pub fn new(panicked: EventFd) -> Self {
        Self { panicked }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v & PVPANIC_PANICKED != 0 {
            if let Err(e) = self.panicked.write(1) {
                log::error!("pvpanic: cannot signal the VMM: {e}");
            }
        } else if v & PVPANIC_CRASH_LOADED != 0 {
            log::info!("pvpanic: the guest is loading a crash kernel");
        }
    }
}

/// DSDT object `\_SB.PEVT`.
pub struct PvPanicAml;

impl Aml for PvPanicAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        crate::aml_in_system_bus(
            &aml::Device::new(
                "PEVT".into(),
                vec![
                    &aml::Name::new("_HID".into(), &"QEMU0001"),
                    &aml::Name::new(
                        "_CRS".into(),
                        &aml::ResourceTemplate::new(vec![&aml::IO::new(
                            PVPANIC_PORT,
                            PVPANIC_PORT,
                            1,
                            1,
                        )]),
                    ),
                    &aml::Method::new("_STA".into(), 0, false, vec![&aml::Return::new(&0x0fu8)]),
                ],
            ),
            sink,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn panic_write_signals_and_reads_report_features() {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut d = PvPanic::new(e.try_clone().unwrap());
        let mut b = [0u8];
        d.read(PVPANIC_PORT as u64, 0, &mut b);
        assert_eq!(b[0], 3);
        d.write(PVPANIC_PORT as u64, 0, &[PVPANIC_CRASH_LOADED]);
        assert!(e.read().is_err());
        d.write(PVPANIC_PORT as u64, 0, &[PVPANIC_PANICKED]);
        assert_eq!(e.read().unwrap(), 1);
        d.write(PVPANIC_PORT as u64, 0, &[]);
    }

    #[test]
    fn aml_names_qemu0001() {
        let mut v = Vec::new();
        PvPanicAml.to_aml_bytes(&mut v);
        assert!(v.windows(8).any(|w| w == b"QEMU0001"));
    }
}
