//! The guest init of `minivmm run` (crate `minivmm-guest-init`), built
//! statically by `vmm/build.rs` and embedded here.

/// The init, a static x86-64 ELF program: the initramfs's `/init`.
pub const INIT_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/minivmm-init"));

#[cfg(test)]
mod tests {
    use super::INIT_ELF;

    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> usize {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize
    }

    #[test]
    fn the_init_is_a_static_x86_64_elf_program() {
        let elf = INIT_ELF;
        assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
        assert_eq!(elf[4], 2, "not 64-bit");
        assert_eq!(elf[5], 1, "not little-endian");
        assert_eq!(u16_at(elf, 18), EM_X86_64, "not x86-64");
        // ET_EXEC, or ET_DYN for a static-pie.
        assert!([2, 3].contains(&u16_at(elf, 16)), "not a program");
        let (phoff, phentsize, phnum) = (u64_at(elf, 32), u16_at(elf, 54), u16_at(elf, 56));
        assert!(phnum > 0 && phentsize >= 56);
        let types: Vec<u32> = (0..phnum as usize)
            .map(|i| u32_at(elf, phoff + i * phentsize as usize))
            .collect();
        assert!(
            !types.contains(&PT_INTERP),
            "dynamically linked (it names a program interpreter)"
        );
    }
}
