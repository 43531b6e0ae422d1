//! ACPI tables, built with the `acpi_tables` crate: RSDP, XSDT, a hardware-reduced
//! FADT (sleep control/status and reset registers), MADT and DSDT.
//!
//! The DSDT is assembled from the AML each device contributes (see
//! [`devices::Aml`]), in the order [`crate::device_manager`] registered them, so
//! new devices add themselves without changes here.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use devices::acpi_pm::{RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};

/// OEM id of every table (six bytes, so "MINIVMM" loses an I).
const OEM_ID: [u8; 6] = *b"MINVMM";
/// OEM table id of every table.
const OEM_TABLE_ID: [u8; 8] = *b"MINIVMM ";
const OEM_REVISION: u32 = 1;

/// The IOAPIC's id (the MP table says the same).
pub const IOAPIC_ID: u8 = 0;
/// The IOAPIC pin of ISA IRQ 0 (the PIT): KVM routes it there, like PC
/// hardware.
pub const PIT_IOAPIC_PIN: u8 = 2;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the reserved area.
    #[error("ACPI tables need {0} bytes, more than the reserved area holds")]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write ACPI tables")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// MADT Interrupt Source Override (type 2), which `acpi_tables` does not provide.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT Local APIC NMI (type 4): LINT1 of every processor is NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT, from the devices' AML.
pub fn dsdt(devices: &[&dyn Aml]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for d in devices {
        dsdt.append_slice(&bytes_of(*d));
    }
    dsdt.as_slice().to_vec()
}

/// The MADT for `cpus` vcpus with APIC ids 0..cpus.
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0));
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: PIT_IOAPIC_PIN.into(),
        flags: 0,
    });
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    bytes_of(&madt)
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The hardware-reduced FADT pointing at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC (bit 5), and
    // bit 1 (an 8042) clear. The guest takes wall-clock time from kvmclock;
    // without this, Linux probes a CMOS RTC that is not there, and it probes
    // the i8042 (only a reset line here) only when told it is there.
    b.iapc_boot_arch = ((1u16 << 2) | (1u16 << 5)).into();
    b.reset_reg = io_gas(RESET_PORT);
    b.reset_value = RESET_VALUE;
    b.sleep_control_reg = io_gas(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_gas(SLEEP_STATUS_PORT);
    // "MINIVMM\0": identifies the hypervisor in the FADT.
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"MINIVMM\0").into();
    bytes_of(&b.finalize())
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Writes all tables at [`ACPI_START`]; returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    devices: &[&dyn Aml],
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        let end = at + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge(end - ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(at))?;
        next = align8(end);
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(devices))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes_of(&xsdt))?;
    mem.write_slice(
        &bytes_of(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(rsdp_addr),
    )?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(t: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(t[o..o + 4].try_into().unwrap())
    }

    fn u64_at(t: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(t[o..o + 8].try_into().unwrap())
    }

    struct Named(&'static str);
    impl Aml for Named {
        fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
            acpi_tables::aml::Name::new(self.0.into(), &acpi_tables::aml::ONE).to_aml_bytes(sink);
        }
    }

    #[test]
    fn madt_lists_every_cpu_ioapic_and_pit_override() {
        let t = madt(3);
        assert_eq!(&t[..4], b"APIC");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert!(checksum_ok(&t));
        assert_eq!(u32_at(&t, 36), LAPIC_ADDR);
        // Walk the structures.
        let (mut off, mut lapics, mut ioapics, mut isos) = (44, vec![], 0, vec![]);
        while off < t.len() {
            let (ty, len) = (t[off], t[off + 1] as usize);
            match ty {
                0 => lapics.push((t[off + 2], t[off + 3], u32_at(&t, off + 4))),
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(&t, off + 4), IOAPIC_ADDR);
                }
                2 => isos.push((t[off + 3], u32_at(&t, off + 4))),
                4 => assert_eq!(t[off + 5], 1),
                _ => panic!("unexpected MADT entry {ty}"),
            }
            off += len;
        }
        assert_eq!(off, t.len());
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapics, 1);
        assert_eq!(isos, vec![(0, 2)]);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_reset_and_sleep_registers() {
        let t = fadt(0x1234_5678);
        assert_eq!(&t[..4], b"FACP");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert!(checksum_ok(&t));
        let flags = u32_at(&t, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: GAS at 116, system I/O, port RESET_PORT; RESET_VALUE at 128.
        assert_eq!(t[116], 1);
        assert_eq!(u64_at(&t, 120), u64::from(RESET_PORT));
        assert_eq!(t[128], RESET_VALUE);
        assert_eq!(u64_at(&t, 140), 0x1234_5678, "X_DSDT");
        let boot_arch = u16::from_le_bytes([t[109], t[110]]);
        assert_eq!(boot_arch, (1 << 2) | (1 << 5), "no VGA, no CMOS RTC");
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(u64_at(&t, 248), u64::from(SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(&t, 260), u64::from(SLEEP_STATUS_PORT));
    }

    #[test]
    fn dsdt_holds_device_aml() {
        let t = dsdt(&[&Named("ABCD"), &devices::acpi_pm::AcpiPmAml]);
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        assert!(checksum_ok(&t));
        let body = &t[36..];
        assert!(body.windows(4).any(|w| w == b"ABCD"));
        assert!(body.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn tables_in_memory_chain_from_rsdp() {
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        let rsdp = write_tables(&mem, 2, &[&devices::serial::SerialAml]).unwrap();
        assert_eq!(rsdp.0, ACPI_START);
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        assert_eq!(r[15], 2, "ACPI 2.0+ RSDP");
        let xsdt_addr = u64_at(&r, 24);
        let read_table = |addr: u64| {
            let mut hdr = [0u8; 8];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let mut t = vec![0u8; u32_at(&hdr, 4) as usize];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "checksum of table at {addr:#x}");
            t
        };
        let x = read_table(xsdt_addr);
        assert_eq!(&x[..4], b"XSDT");
        let entries: Vec<u64> = (36..x.len()).step_by(8).map(|o| u64_at(&x, o)).collect();
        let sigs: Vec<Vec<u8>> = entries
            .iter()
            .map(|a| read_table(*a)[..4].to_vec())
            .collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        let f = read_table(entries[0]);
        let d = read_table(u64_at(&f, 140));
        assert_eq!(&d[..4], b"DSDT");
        assert!(d.windows(4).any(|w| w == b"COM1"));
        for a in entries.iter().chain([xsdt_addr].iter()) {
            assert!(*a >= ACPI_START && *a < ACPI_END);
        }
    }

    #[test]
    fn oversized_dsdt_is_an_error() {
        struct Big;
        impl Aml for Big {
            fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
                sink.vec(&vec![0u8; 200 * 1024]);
            }
        }
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        assert!(matches!(
            write_tables(&mem, 1, &[&Big]),
            Err(AcpiError::TooLarge(_))
        ));
    }
}
