//! Loading the guest: kernel (bzImage or ELF vmlinux, with linux-loader), initrd,
//! command line, and the zero page with its E820 map, for the Linux 64-bit boot
//! protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::Flat;
use crate::layout::*;
use crate::memory::low_ram_end;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    KernelFile {
        /// Path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Initrd cannot be opened or read.
    #[error("cannot read initrd {path}")]
    InitrdFile {
        /// Path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{0} is not a Linux kernel image (expected a bzImage or an ELF vmlinux)")]
    NotAKernel(PathBuf),
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}")]
    Load {
        /// Path given.
        path: PathBuf,
        /// What linux-loader said.
        #[source]
        source: Flat<loader::Error>,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}; give the VM more --memory")]
    InitrdTooLarge {
        /// Path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest usable address.
        limit: u64,
    },
    /// Command line too long or invalid.
    #[error("invalid kernel command line (at most {max} bytes of printable ASCII)")]
    Cmdline {
        /// Longest command line the kernel accepts.
        max: usize,
        /// What linux-loader said.
        #[source]
        source: linux_loader::cmdline::Error,
    },
    /// The command line could not be written to guest memory.
    #[error("cannot write the kernel command line to guest memory")]
    WriteCmdline(#[source] Flat<loader::Error>),
    /// Writing to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing the zero page failed.
    #[error("cannot write boot parameters")]
    BootParams(#[source] Flat<linux_loader::configurator::Error>),
}

/// Kernel image formats minivmm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux`.
    Elf,
    /// Compressed `bzImage`.
    BzImage,
}

/// Recognises a kernel image from its first bytes.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    let magic = head.get(0x202..0x206)?;
    (magic == b"HdrS").then_some(KernelFormat::BzImage)
}

/// Where the kernel ended up.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: GuestAddress,
    /// First address after the kernel image.
    pub end: u64,
    /// bzImage setup header, if any.
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel image at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let file_err = |source| BootError::KernelFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut file, &mut head).map_err(file_err)?;
    let format = detect_format(&head[..n]).ok_or_else(|| BootError::NotAKernel(path.into()))?;
    file.seek(SeekFrom::Start(0)).map_err(file_err)?;
    let load_err = |e| BootError::Load {
        path: path.to_owned(),
        source: Flat(e),
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: r.kernel_load,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Highest address (exclusive) the initrd may reach.
fn initrd_limit(mem_size: u64, kernel: &LoadedKernel) -> u64 {
    let max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .filter(|m| *m > 1)
        .unwrap_or(0x8000_0000);
    low_ram_end(mem_size).min(max)
}

/// Chooses where to put an initrd of `size` bytes: as high as allowed, page
/// aligned, above the kernel.
pub fn initrd_address(size: u64, limit: u64, kernel_end: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end.max(HIMEM_START)).then_some(start)
}

/// Loads the initrd; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let file_err = |source| BootError::InitrdFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    let limit = initrd_limit(mem_size, kernel);
    let addr =
        initrd_address(size, limit, kernel.end).ok_or_else(|| BootError::InitrdTooLarge {
            path: path.into(),
            size,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| match source {
            vm_memory::GuestMemoryError::IOError(e) => file_err(e),
            source => BootError::GuestMemory {
                what: "initrd",
                source,
            },
        })?;
    Ok((addr, size))
}

/// Writes the command line; returns its length without the NUL.
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    kernel: &LoadedKernel,
) -> Result<usize, BootError> {
    let capacity = kernel
        .setup_header
        .map(|h| h.cmdline_size as usize + 1)
        .filter(|c| *c > 1)
        .unwrap_or(CMDLINE_MAX_SIZE);
    let invalid = |source| BootError::Cmdline {
        max: capacity - 1,
        source,
    };
    let mut cl = Cmdline::new(capacity).map_err(invalid)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline).map_err(invalid)?;
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::WriteCmdline(Flat(e)))?;
    Ok(cmdline.len())
}

/// 16-bit code for the reset vector: `mov al, RESET_VALUE; mov dx, RESET_PORT;
/// out dx, al; hlt; jmp $-1`.
///
/// With hardware-reduced ACPI and no EFI, Linux reboots by returning to real mode
/// and jumping to the BIOS reset vector. minivmm has no BIOS, so the vector holds
/// this stub, which asks for the reset through the ACPI reset register.
pub fn reset_vector_code() -> [u8; 9] {
    use devices::acpi_pm::{RESET_PORT, RESET_VALUE};
    let p = RESET_PORT.to_le_bytes();
    [0xb0, RESET_VALUE, 0xba, p[0], p[1], 0xee, 0xf4, 0xeb, 0xfd]
}

/// Writes [`reset_vector_code`] at [`RESET_VECTOR`].
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_slice(&reset_vector_code(), GuestAddress(RESET_VECTOR))
        .map_err(|source| BootError::GuestMemory {
            what: "reset vector",
            source,
        })
}

/// The E820 map for `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, r#type| boot_e820_entry {
        addr,
        size: end - addr,
        r#type,
    };
    let low_end = low_ram_end(mem_size);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, 0xa0000, E820_RESERVED),
        entry(ACPI_START, HIMEM_START, E820_RESERVED),
        entry(HIMEM_START, low_end, E820_RAM),
    ];
    if mem_size > low_end {
        map.push(entry(FOUR_GIB, FOUR_GIB + mem_size - low_end, E820_RAM));
    }
    map
}

/// Everything the zero page carries.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Loaded kernel.
    pub kernel: LoadedKernel,
    /// Command line length.
    pub cmdline_len: usize,
    /// Initrd (address, size).
    pub initrd: Option<(u64, u64)>,
    /// RSDP address.
    pub rsdp: u64,
    /// RAM size.
    pub mem_size: u64,
}

/// Builds the zero page.
pub fn boot_params(info: &BootInfo) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = info.kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp;
    let map = e820_map(info.mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params
}

/// Writes the zero page into guest memory.
pub fn write_boot_params(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let params = boot_params(info);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::BootParams(Flat(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            entry: GuestAddress(0x100_0000),
            end: 0x300_0000,
            setup_header: None,
        }
    }

    #[test]
    fn reset_vector_writes_the_acpi_reset_register() {
        let code = reset_vector_code();
        assert!(code.len() <= 16, "fits below 1 MiB");
        assert_eq!(&code[..2], &[0xb0, devices::acpi_pm::RESET_VALUE]);
        assert_eq!(
            u16::from_le_bytes([code[3], code[4]]),
            devices::acpi_pm::RESET_PORT
        );
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        write_reset_vector(&mem).unwrap();
        let mut b = [0u8; 9];
        mem.read_slice(&mut b, GuestAddress(RESET_VECTOR)).unwrap();
        assert_eq!(b, code);
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(&[0u8; 0x300]), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn e820_small_memory() {
        let m = e820_map(512 << 20);
        assert_eq!(m.len(), 4);
        let m0 = m[0];
        assert_eq!((m0.addr, m0.size, m0.r#type), (0, EBDA_START, E820_RAM));
        assert_eq!({ m[2].r#type }, E820_RESERVED);
        let m2 = m[2];
        assert!(m2.addr <= ACPI_START && m2.addr + m2.size >= HIMEM_START);
        let m3 = m[3];
        assert_eq!((m3.addr, m3.addr + m3.size), (HIMEM_START, 512 << 20));
        // Ranges are sorted and disjoint.
        for w in m.windows(2) {
            let (a, b) = (w[0], w[1]);
            assert!(a.addr + a.size <= b.addr);
        }
    }

    #[test]
    fn e820_large_memory_skips_the_hole() {
        let m = e820_map(4 << 30);
        assert_eq!(m.len(), 5);
        let m3 = m[3];
        assert_eq!(m3.addr + m3.size, MMIO_HOLE_START);
        assert_eq!({ m[4].addr }, FOUR_GIB);
        assert_eq!({ m[4].size }, (4 << 30) - MMIO_HOLE_START);
        let ram: u64 = m
            .iter()
            .filter(|e| { e.r#type } == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let a = initrd_address(10_000, 512 << 20, 0x300_0000).unwrap();
        assert_eq!(a % PAGE_SIZE, 0);
        assert!(a + 10_000 <= 512 << 20);
        assert!(a >= (512 << 20) - 2 * PAGE_SIZE - 10_000);
        assert_eq!(initrd_address(600 << 20, 512 << 20, 0x300_0000), None);
        assert_eq!(initrd_address(500 << 20, 512 << 20, 0x300_0000), None);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let hdr = setup_header {
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        let k = LoadedKernel {
            setup_header: Some(hdr),
            ..elf_kernel()
        };
        assert_eq!(initrd_limit(3 << 30, &k), 0x8000_0000);
        assert_eq!(initrd_limit(1 << 30, &k), 1 << 30);
        assert_eq!(initrd_limit(4 << 30, &elf_kernel()), 0x8000_0000);
    }

    #[test]
    fn zero_page_contents() {
        let info = BootInfo {
            kernel: elf_kernel(),
            cmdline_len: 13,
            initrd: Some((0x1f00_0000, 4096)),
            rsdp: ACPI_START,
            mem_size: 1 << 30,
        };
        let p = boot_params(&info);
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!({ hdr.ramdisk_image }, 0x1f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 4096);
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, ACPI_START);
        assert_eq!(p.e820_entries, 4);
        let last = p.e820_table[3];
        assert_eq!(last.addr + last.size, 1 << 30);
    }

    #[test]
    fn bzimage_header_is_kept() {
        let hdr = setup_header {
            version: 0x20f,
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            ..Default::default()
        };
        let info = BootInfo {
            kernel: LoadedKernel {
                setup_header: Some(hdr),
                ..elf_kernel()
            },
            cmdline_len: 0,
            initrd: None,
            rsdp: ACPI_START,
            mem_size: 1 << 30,
        };
        let p = boot_params(&info);
        let v = p.hdr.version;
        assert_eq!(v, 0x20f);
        let img = p.hdr.ramdisk_image;
        assert_eq!(img, 0);
    }

    #[test]
    fn cmdline_too_long_is_an_error() {
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE + 10);
        assert!(matches!(
            load_cmdline(&mem, &long, &elf_kernel()),
            Err(BootError::Cmdline { .. })
        ));
        assert_eq!(
            load_cmdline(&mem, "console=ttyS0", &elf_kernel()).unwrap(),
            13
        );
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn garbage_kernel_is_rejected_with_its_path() {
        let dir = std::env::temp_dir().join(format!("minivmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("notakernel");
        std::fs::write(&p, b"hello").unwrap();
        let mem = crate::memory::create_guest_memory(64 << 20, false).unwrap();
        let e = load_kernel(&mem, &p).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel(_)));
        assert!(e.to_string().contains("notakernel"));
        let e = load_kernel(&mem, &dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
