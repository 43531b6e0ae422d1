//! The Intel MultiProcessor Specification (1.4) table, for guests that do not
//! read ACPI: kernels built without it or booted with `acpi=off` find their
//! vcpus, the IOAPIC and the ISA interrupt routing here. It says what the MADT
//! says ([`crate::acpi::madt`]): the same local APIC ids, the same IOAPIC (id,
//! address), ISA IRQ 0 on IOAPIC pin 2, NMI on every LINT1. With ACPI, Linux
//! takes the MADT and ignores this table.
//!
//! The floating pointer and the configuration table sit together at
//! [`MPTABLE_START`] (reserved in the E820 map), inside the BIOS area Linux
//! scans for the `_MP_` signature. Nothing here depends on the CPU vendor.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::acpi::{IOAPIC_ID, PIT_IOAPIC_PIN};
use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_END, MPTABLE_START};

/// Errors writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The table does not fit below the reset vector.
    #[error("the MP table needs {0} bytes, more than its area holds")]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write the MP table")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Specification revision 1.4.
const SPEC_REV: u8 = 4;
/// Local APIC version (an integrated APIC, as KVM's).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version (82093AA-compatible, as KVM's).
const IOAPIC_VERSION: u8 = 0x11;
/// Pins of KVM's IOAPIC.
const IOAPIC_PINS: u8 = 24;
/// The only bus: ISA, id 0.
const ISA_BUS: u8 = 0;

const HEADER_LEN: usize = 44;
const FLOATING_LEN: usize = 16;

/// Entry types.
const PROCESSOR: u8 = 0;
const BUS: u8 = 1;
const IOAPIC: u8 = 2;
const IO_INTERRUPT: u8 = 3;
const LOCAL_INTERRUPT: u8 = 4;

/// Interrupt types.
const INT: u8 = 0;
const NMI: u8 = 1;
const EXTINT: u8 = 3;

/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;

/// All local APICs.
const ALL_LAPICS: u8 = 0xff;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A processor entry (20 bytes).
fn processor(id: u8) -> [u8; 20] {
    let mut e = [0u8; 20];
    e[0] = PROCESSOR;
    e[1] = id;
    e[2] = APIC_VERSION;
    e[3] = CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 };
    // Signature (family 6) and features (FPU, APIC): informational; Linux
    // reads the real ones with CPUID.
    e[4..8].copy_from_slice(&0x600u32.to_le_bytes());
    e[8..12].copy_from_slice(&0x201u32.to_le_bytes());
    e
}

/// An interrupt assignment entry (8 bytes), polarity and trigger as the bus
/// says (flags 0).
fn interrupt(kind: u8, irq_type: u8, src_irq: u8, dst_id: u8, dst_pin: u8) -> [u8; 8] {
    [kind, irq_type, 0, 0, ISA_BUS, src_irq, dst_id, dst_pin]
}

/// The configuration table (header and entries) for `cpus` vcpus.
pub fn config_table(cpus: u8) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut add = |e: &[u8]| {
        entries.extend_from_slice(e);
        count += 1;
    };
    for id in 0..cpus {
        add(&processor(id));
    }
    let mut bus = [0u8; 8];
    bus[0] = BUS;
    bus[1] = ISA_BUS;
    bus[2..8].copy_from_slice(b"ISA   ");
    add(&bus);
    let mut ioapic = [IOAPIC, IOAPIC_ID, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    ioapic[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    add(&ioapic);
    // ISA IRQ n on pin n, but IRQ 0 (the PIT) on pin 2, whose own IRQ (the
    // cascade) is not there: as the MADT's override and KVM's routing say.
    for irq in 0..IOAPIC_PINS {
        let pin = match irq {
            0 => PIT_IOAPIC_PIN,
            p if p == PIT_IOAPIC_PIN => continue,
            p => p,
        };
        add(&interrupt(IO_INTERRUPT, INT, irq, IOAPIC_ID, pin));
    }
    add(&interrupt(LOCAL_INTERRUPT, EXTINT, 0, ALL_LAPICS, 0));
    add(&interrupt(LOCAL_INTERRUPT, NMI, 0, ALL_LAPICS, 1));

    let len = HEADER_LEN + entries.len();
    let mut t = vec![0u8; HEADER_LEN];
    t[0..4].copy_from_slice(b"PCMP");
    t[4..6].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
    t[6] = SPEC_REV;
    t[8..16].copy_from_slice(b"MINIVMM ");
    t[16..28].copy_from_slice(b"000000000001");
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[36..40].copy_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// The floating pointer structure for a configuration table at `table`.
pub fn floating_pointer(table: u32) -> [u8; FLOATING_LEN] {
    let mut f = [0u8; FLOATING_LEN];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&table.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = SPEC_REV;
    // Feature byte 1 = 0: the configuration table is there (no default
    // configuration); byte 2 = 0: virtual wire mode, no IMCR.
    f[10] = checksum(&f);
    f
}

/// Writes the floating pointer and the table for `cpus` vcpus at
/// [`MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let table = config_table(cpus);
    let table_at = MPTABLE_START + FLOATING_LEN as u64;
    let end = table_at + table.len() as u64;
    if end > MPTABLE_END {
        return Err(MpTableError::TooLarge(end - MPTABLE_START));
    }
    let ptr = u32::try_from(table_at).map_err(|_| MpTableError::TooLarge(end))?;
    mem.write_slice(&floating_pointer(ptr), GuestAddress(MPTABLE_START))?;
    mem.write_slice(&table, GuestAddress(table_at))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::madt;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    /// (type, bytes) of each entry, walked as Linux's `smp_read_mpc` does.
    fn entries(t: &[u8]) -> Vec<(u8, &[u8])> {
        let mut v = Vec::new();
        let mut off = HEADER_LEN;
        while off < t.len() {
            let len = if t[off] == PROCESSOR { 20 } else { 8 };
            v.push((t[off], &t[off..off + len]));
            off += len;
        }
        v
    }

    #[test]
    fn the_table_is_well_formed() {
        let t = config_table(4);
        assert_eq!(&t[0..4], b"PCMP");
        assert_eq!(usize::from(u16::from_le_bytes([t[4], t[5]])), t.len());
        assert_eq!(t[6], 4);
        assert!(sums_to_zero(&t));
        let e = entries(&t);
        assert_eq!(usize::from(u16::from_le_bytes([t[34], t[35]])), e.len());
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        let f = floating_pointer(0xf0010);
        assert_eq!(&f[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(f[4..8].try_into().unwrap()), 0xf0010);
        assert_eq!((f[8], f[9], f[11]), (1, 4, 0));
        assert!(sums_to_zero(&f));
    }

    /// The MP table and the MADT describe the same machine.
    #[test]
    fn it_agrees_with_the_madt() {
        for cpus in [1u8, 2, 7, 254] {
            let t = config_table(cpus);
            let e = entries(&t);
            let mp_cpus: Vec<(u8, bool)> = e
                .iter()
                .filter(|(k, _)| *k == PROCESSOR)
                .map(|(_, b)| (b[1], b[3] & CPU_ENABLED != 0))
                .collect();
            let mp_ioapics: Vec<(u8, u32)> = e
                .iter()
                .filter(|(k, _)| *k == IOAPIC)
                .map(|(_, b)| (b[1], u32::from_le_bytes(b[4..8].try_into().unwrap())))
                .collect();
            // The MADT's structures after its 44-byte header.
            let m = madt(cpus);
            let (mut off, mut lapics, mut ioapics, mut overrides) = (44, vec![], vec![], vec![]);
            while off < m.len() {
                let (kind, len) = (m[off], usize::from(m[off + 1]));
                match kind {
                    0 => lapics.push((m[off + 3], m[off + 4] & 1 != 0)),
                    1 => ioapics.push((
                        m[off + 2],
                        u32::from_le_bytes(m[off + 4..off + 8].try_into().unwrap()),
                    )),
                    2 => overrides.push((
                        m[off + 3],
                        u32::from_le_bytes(m[off + 4..off + 8].try_into().unwrap()),
                    )),
                    _ => {}
                }
                off += len;
            }
            assert_eq!(mp_cpus, lapics, "{cpus} cpus");
            assert_eq!(mp_ioapics, ioapics);
            // Each MADT override is the MP table's routing of that IRQ.
            for (irq, gsi) in overrides {
                let routed: Vec<u8> = e
                    .iter()
                    .filter(|(k, b)| *k == IO_INTERRUPT && b[5] == irq)
                    .map(|(_, b)| b[7])
                    .collect();
                assert_eq!(routed, [u8::try_from(gsi).unwrap()], "IRQ {irq}");
            }
            // Only the boot processor is marked so.
            let boot: Vec<u8> = e
                .iter()
                .filter(|(k, b)| *k == PROCESSOR && b[3] & CPU_BOOT != 0)
                .map(|(_, b)| b[1])
                .collect();
            assert_eq!(boot, [0]);
        }
    }

    #[test]
    fn each_pin_has_one_isa_irq_and_nmi_goes_to_lint1() {
        let t = config_table(1);
        let e = entries(&t);
        let mut pins: Vec<u8> = e
            .iter()
            .filter(|(k, _)| *k == IO_INTERRUPT)
            .map(|(_, b)| b[7])
            .collect();
        pins.sort_unstable();
        let expected: Vec<u8> = (1..IOAPIC_PINS).collect();
        assert_eq!(pins, expected, "pin 0 unused, every other pin once");
        let lints: Vec<(u8, u8, u8)> = e
            .iter()
            .filter(|(k, _)| *k == LOCAL_INTERRUPT)
            .map(|(_, b)| (b[1], b[6], b[7]))
            .collect();
        assert_eq!(lints, [(EXTINT, 0xff, 0), (NMI, 0xff, 1)]);
    }

    #[test]
    fn it_is_written_where_linux_scans_and_fits_for_254_cpus() {
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        write(&mem, 254).unwrap();
        let mut f = [0u8; 16];
        mem.read_slice(&mut f, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&f[0..4], b"_MP_");
        // Linux scans 0xf0000..0x100000 in 16-byte steps.
        assert!((0xf0000..0x100000).contains(&MPTABLE_START) && MPTABLE_START % 16 == 0);
        let at = u64::from(u32::from_le_bytes(f[4..8].try_into().unwrap()));
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(at)).unwrap();
        assert_eq!(&sig, b"PCMP");
    }
}
