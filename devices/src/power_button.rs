//! An ACPI power button for a hardware-reduced platform: a Generic Event Device
//! (`ACPI0013`) whose interrupt line is a dedicated GSI, and whose `_EVT` method
//! notifies a control-method power button (`PNP0C0C`) with 0x80 ("pressed").
//! Linux's GED driver runs `_EVT` on the interrupt; the ACPI button driver turns
//! the notification into a KEY_POWER input event (acpid, systemd-logind...).

use acpi_tables::{aml, Aml, AmlSink};
use vmm_sys_util::eventfd::EventFd;

/// GSI of the GED interrupt (an otherwise unused ISA IRQ).
pub const GED_GSI: u32 = 5;

/// The host side of the button: pressing it raises the GED interrupt through an
/// eventfd registered as a KVM irqfd for [`GED_GSI`].
#[derive(Debug)]
pub struct PowerButton {
    irq: EventFd,
}

impl PowerButton {
    /// A button raising `irq`.
    pub fn new(irq: EventFd) -> Self {
        Self { irq }
    }

    /// Presses the button once.
    pub fn press(&self) -> std::io::Result<()> {
        self.irq.write(1)
    }
}

/// DSDT objects: `\_SB.GED0` and `\_SB.PWRB`.
pub struct PowerButtonAml;

impl Aml for PowerButtonAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mut devs = Vec::new();
        aml::Device::new(
            "GED0".into(),
            vec![
                &aml::Name::new("_HID".into(), &"ACPI0013"),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                        true, true, false, false, GED_GSI,
                    )]),
                ),
                &aml::Method::new(
                    "_EVT".into(),
                    1,
                    true,
                    vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                ),
            ],
        )
        .to_aml_bytes(&mut devs);
        aml::Device::new(
            "PWRB".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
            ],
        )
        .to_aml_bytes(&mut devs);
        sink.vec(&aml::Scope::raw("\\_SB_".into(), devs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn press_raises_the_interrupt() {
        let e = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = PowerButton::new(e.try_clone().unwrap());
        b.press().unwrap();
        assert_eq!(e.read().unwrap(), 1);
    }

    #[test]
    fn aml_has_ged_evt_and_button() {
        let mut v = Vec::new();
        PowerButtonAml.to_aml_bytes(&mut v);
        let has = |s: &[u8]| v.windows(s.len()).any(|w| w == s);
        assert!(has(b"ACPI0013"));
        assert!(has(b"_EVT"));
        assert!(has(b"PWRB"));
        // EISA id of PNP0C0C compressed: 0x41 0xd0 0x0c 0x0c.
        assert!(has(&[0x41, 0xd0, 0x0c, 0x0c]));
    }
}
