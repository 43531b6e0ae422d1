//! Guest physical memory map (x86_64).
//!
//! ```text
//! 0x0000_0500  boot GDT
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved up to 0xa0000)
//! 0x000e_0000  ACPI tables: RSDP first, where Linux scans for it (reserved)
//! 0x000f_0000  MP table (floating pointer, then the table; reserved)
//! 0x000f_fff0  reset vector: a stub that writes the ACPI reset register
//! 0x0010_0000  kernel (bzImage protected-mode part; ELF loads at its own address)
//!   ...        RAM up to min(size, 3 GiB); initrd at the top of it
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio slots from 0xd000_0000 (4 KiB
//!              each), IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000)
//! 0x1_0000_0000  the rest of RAM
//! ```

/// Boot GDT.
pub const GDT_START: u64 = 0x500;
/// Zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page-directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept for an ELF kernel (bzImages say their own limit).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// First address of the (reserved) area holding the ACPI tables.
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the area the ACPI tables may use.
pub const ACPI_END: u64 = 0xf0000;
/// The MP floating pointer, followed by the MP configuration table (in the
/// BIOS area Linux scans for it, reserved with the ACPI area).
pub const MPTABLE_START: u64 = 0xf0000;
/// End (exclusive) of the area the MP table may use.
pub const MPTABLE_END: u64 = RESET_VECTOR;
/// The x86 reset vector (`F000:FFF0`), where a guest's "BIOS reboot" jumps.
pub const RESET_VECTOR: u64 = 0xffff0;
/// End of the legacy area; ordinary RAM resumes here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM stops here and continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First virtio-mmio register window (one 4 KiB window, a slot, per device).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Number of virtio-mmio slots from [`VIRTIO_MMIO_BASE`].
pub const VIRTIO_MMIO_SLOTS: u32 = 16;
/// GSI of the first virtio-mmio device; the following ones take the next free
/// GSIs below [`IOAPIC_PINS`].
pub const VIRTIO_MMIO_GSI: u32 = 10;
/// 4 GiB.
pub const FOUR_GIB: u64 = 1 << 32;
/// IOAPIC base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// LAPIC base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS (three pages below the identity-map page, inside the MMIO hole).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Number of IOAPIC pins (GSIs) of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
