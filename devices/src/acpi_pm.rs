//! ACPI power management for a hardware-reduced platform: the FADT's sleep
//! control/status registers and its reset register, as I/O ports.
//!
//! A write of `SLP_EN | SLP_TYP=5` to the sleep control register is the guest's
//! S5 (power off) request; the reset value written to the reset register is a
//! reboot request. Both are forwarded to the VMM thread as eventfd signals; the
//! vcpu thread that wrote them does nothing else.

use acpi_tables::{aml, Aml, AmlSink};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// First port of the block.
pub const PM_PORT: u16 = 0x600;
/// Ports decoded.
pub const PM_PORT_LEN: u16 = 8;
/// Sleep control register (FADT `SLEEP_CONTROL_REG`), one byte.
pub const SLEEP_CONTROL_PORT: u16 = PM_PORT;
/// Sleep status register (FADT `SLEEP_STATUS_REG`), one byte.
pub const SLEEP_STATUS_PORT: u16 = PM_PORT + 1;
/// Reset register (FADT `RESET_REG`), one byte.
pub const RESET_PORT: u16 = PM_PORT + 4;
/// Value the guest writes to [`RESET_PORT`] (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x1;
/// Sleep type of S5, as published in the DSDT's `_S5_` object.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;

/// The register block.
pub struct AcpiPmDevice {
    shutdown: EventFd,
    reset: EventFd,
}

impl AcpiPmDevice {
    /// `shutdown` is signalled on S5, `reset` on a reset-register write.
    pub fn new(shutdown: EventFd, reset: EventFd) -> Self {
        Self { shutdown, reset }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep, no wake status. Everything else reads as zero.
        data.fill(0);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        let port = (base + offset) as u16;
        let evt = match port {
            SLEEP_CONTROL_PORT if value & SLP_EN != 0 => {
                let sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
                if sleep_type != S5_SLEEP_TYPE {
                    log_ratelimit::warn_limited!(
                        "acpi: sleep state with type {sleep_type} is not supported"
                    );
                    return;
                }
                &self.shutdown
            }
            RESET_PORT if *value == RESET_VALUE => &self.reset,
            _ => return,
        };
        if let Err(e) = evt.write(1) {
            log::error!("acpi: cannot signal the VMM: {e}");
        }
    }
}

/// The DSDT objects this device needs: `_S5_`.
pub struct AcpiPmAml;

impl Aml for AcpiPmAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> (AcpiPmDevice, EventFd, EventFd) {
        let s = EventFd::new(EFD_NONBLOCK).unwrap();
        let r = EventFd::new(EFD_NONBLOCK).unwrap();
        (
            AcpiPmDevice::new(s.try_clone().unwrap(), r.try_clone().unwrap()),
            s,
            r,
        )
    }

    #[test]
    fn s5_write_requests_shutdown() {
        let (mut d, s, r) = dev();
        d.write(PM_PORT as u64, 0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(s.read().unwrap(), 1);
        assert!(r.read().is_err());
    }

    #[test]
    fn other_sleep_writes_do_nothing() {
        let (mut d, s, r) = dev();
        d.write(PM_PORT as u64, 0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        d.write(PM_PORT as u64, 0, &[(3 << 2) | SLP_EN]); // S3
        d.write(PM_PORT as u64, 4, &[0x2]); // wrong reset value
        d.write(PM_PORT as u64, 0, &[0x34, 0]); // wrong width
        assert!(s.read().is_err());
        assert!(r.read().is_err());
    }

    #[test]
    fn reset_register_requests_reset() {
        let (mut d, s, r) = dev();
        d.write(PM_PORT as u64, 4, &[RESET_VALUE]);
        assert_eq!(r.read().unwrap(), 1);
        assert!(s.read().is_err());
        let mut b = [0xffu8];
        d.read(PM_PORT as u64, 1, &mut b);
        assert_eq!(b, [0]);
    }
}
