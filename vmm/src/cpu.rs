//! Per-vcpu x86_64 setup: CPUID, MSRs, registers for the 64-bit boot protocol
//! (long mode, identity-mapped page tables, flat GDT), FPU, and LAPIC LINT pins.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

/// Errors configuring a vcpu.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("vcpu {id}: {what} failed")]
    Kvm {
        /// vcpu index.
        id: u8,
        /// Operation.
        what: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Fewer MSRs than asked were set.
    #[error("vcpu {id}: KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs {
        /// vcpu index.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were asked.
        wanted: usize,
    },
    /// The boot MSR list does not fit KVM's MSR array.
    #[error("vcpu {id}: cannot build the list of {wanted} boot MSRs")]
    MsrList {
        /// vcpu index.
        id: u8,
        /// How many MSRs.
        wanted: usize,
        /// What the array said.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// Writing the GDT or page tables failed.
    #[error("cannot write boot page tables/GDT")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

// CPUID bits.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

// MSRs set at boot.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

// Control register bits.
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

// LAPIC.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Reads the host's KVM-supported CPUID.
///
/// KVM does not list the TSC-deadline timer there although it emulates it
/// whenever it has `KVM_CAP_TSC_DEADLINE_TIMER` (on Intel and AMD alike); it
/// is added then, as QEMU's `-cpu host` does: the guest programs its timer
/// with one MSR write and skips calibrating the LAPIC timer.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        enable_tsc_deadline(cpuid.as_mut_slice());
    }
    Ok(cpuid)
}

/// CPUID.1:ECX bit 24: the TSC-deadline mode of the LAPIC timer.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

fn enable_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 0x1) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

fn bits_for(count: u32) -> u32 {
    // Number of APIC-id bits needed to number `count` items.
    32 - count.saturating_sub(1).leading_zeros()
}

/// Adjusts the supported CPUID for vcpu `id` of `count`: its APIC id, a topology of
/// `count` cores in one socket with one thread each, and the hypervisor bit.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8) {
    let (id32, count32) = (u32::from(id), u32::from(count));
    let core_bits = bits_for(count32);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id32 << 24) | ((count32 & 0xff) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Intel deterministic cache parameters: cores per package in 31:26.
                e.eax = (e.eax & 0x03ff_ffff) | ((count32 - 1) << 26);
            }
            0x6 => {
                // No thermal/power management to offer.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xa => {
                // No architectural PMU: a guest must not program host counters.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = id32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count32;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | ((count32 - 1) & 0xff);
            }
            0x8000_001e => {
                e.eax = id32;
                e.ebx = id32 & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// The MSRs every vcpu starts with.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        // MTRRs enabled, default type write-back.
        msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// A GDT entry from flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment equivalent of GDT entry `entry` at index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The boot GDT: the Linux boot protocol wants `__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18.
pub fn boot_gdt() -> [u64; 5] {
    [
        gdt_entry(0, 0, 0),            // null
        gdt_entry(0, 0, 0),            // unused
        gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
        gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
    ]
}

/// Writes the boot GDT and the identity page tables (first 1 GiB, 2 MiB pages)
/// into guest memory. Shared by all vcpus; call once per boot.
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    for (i, e) in boot_gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

/// Special registers for the 64-bit entry: long mode, paging on, flat segments.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[2], 2);
    let data = segment_from_gdt(gdt[3], 3);
    let tss = segment_from_gdt(gdt[4], 4);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers for the 64-bit entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

fn get_lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = regs[offset + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Configures vcpu `id`: CPUID, MSRs, FPU, LAPIC; and for the boot vcpu (id 0) the
/// registers that start the kernel at `entry`. Other vcpus wait for INIT/SIPI.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    cpuid: &CpuId,
    entry: GuestAddress,
) -> Result<(), CpuError> {
    let kvm_err = |what| move |source| CpuError::Kvm { id, what, source };
    let mut cpuid = cpuid.clone();
    patch_cpuid(cpuid.as_mut_slice(), id, count);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|source| CpuError::MsrList {
        id,
        wanted: entries.len(),
        source,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            id,
            set,
            wanted: entries.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let lvt0 = get_lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        set_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        set_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;

    if id == 0 {
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&boot_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot_regs(entry.0))
            .map_err(kvm_err("KVM_SET_REGS"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            eax: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_apic_ids_and_topology() {
        let mut e = vec![
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0x8000_0008, 0),
            leaf(0xa, 0),
        ];
        patch_cpuid(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3, "initial APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].ecx >> 8, e[1].edx), (1, 1, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, 2));
        assert_eq!(e[3].ecx & 0xff, 3);
        assert_eq!((e[3].ecx >> 12) & 0xf, 2);
        assert_eq!(e[4].eax, 0, "no PMU");
    }

    #[test]
    fn tsc_deadline_is_set_in_leaf_1_only() {
        let mut e = [leaf(1, 0), leaf(0xb, 0)];
        enable_tsc_deadline(&mut e);
        assert_eq!(e[0].ecx & (1 << 24), 1 << 24);
        assert_eq!(e[1].ecx, 0);
    }

    #[test]
    fn cpuid_single_vcpu_has_no_htt() {
        let mut e = vec![kvm_cpuid_entry2 {
            function: 1,
            edx: LEAF1_EDX_HTT,
            ..Default::default()
        }];
        patch_cpuid(&mut e, 0, 1);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(254), 8);
    }

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        let gdt = boot_gdt();
        let cs = segment_from_gdt(gdt[2], 2);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s),
            (0x10, 1, 0, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(gdt[3], 3);
        assert_eq!((ds.selector, ds.db, ds.type_), (0x18, 1, 3));
        let tr = segment_from_gdt(gdt[4], 4);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
        assert_eq!(segment_from_gdt(gdt[0], 0).unusable, 1);
    }

    #[test]
    fn sregs_enable_long_mode_with_our_page_tables() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer, 0x500);
        assert_eq!(s.gdt.base, GDT_START);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        write_boot_structures(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pde511: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(pde511, (511 << 21) | 0x83);
    }

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let r = boot_regs(0x100_0200);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0200, ZERO_PAGE_START, 2));
    }

    #[test]
    fn lapic_lint_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0x0001_0700);
        let v = set_delivery_mode(get_lapic_reg(&regs, APIC_LVT0), APIC_MODE_NMI);
        assert_eq!(v, 0x0001_0400);
    }
}
