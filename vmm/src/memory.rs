//! Guest RAM: split around the 32-bit MMIO hole, allocated with vm-memory.

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::{FOUR_GIB, MMIO_HOLE_START};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the allocation.
    #[error("cannot allocate {size} MiB of guest memory")]
    Allocate {
        /// Requested size in MiB.
        size: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// No memory file for shared guest RAM.
    #[error("cannot create a {size} MiB memory file for shared guest memory")]
    Memfd {
        /// Requested size in MiB.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The guest-physical RAM ranges for `size` bytes of RAM: below the MMIO hole,
/// then from 4 GiB on.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(FOUR_GIB), (size - low) as usize));
    }
    ranges
}

/// Allocates (lazily) `size` bytes of guest RAM: anonymous private mappings,
/// or with `shared` one memfd mapped shared, which another process (a
/// vhost-user daemon) can map too.
pub fn create_guest_memory(size: u64, shared: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let alloc = |source| MemoryError::Allocate {
        size: size >> 20,
        source,
    };
    if !shared {
        let regions = ram_ranges(size)
            .into_iter()
            .map(|(addr, len)| huge_aligned(len, || GuestRegionMmap::from_range(addr, len, None)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(alloc)?;
        regions.iter().for_each(advise_huge_pages);
        return GuestMemoryMmap::from_regions(regions).map_err(|e| alloc(e.into()));
    }
    let file = memfd(size).map_err(|source| MemoryError::Memfd {
        size: size >> 20,
        source,
    })?;
    let file = std::sync::Arc::new(file);
    let mut offset = 0;
    let regions = ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| {
            let f = FileOffset::from_arc(file.clone(), offset);
            offset += len as u64;
            huge_aligned(len, || GuestRegionMmap::from_range(addr, len, Some(f)))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(alloc)?;
    regions.iter().for_each(advise_huge_pages);
    GuestMemoryMmap::from_regions(regions).map_err(|e| alloc(e.into()))
}

/// Asks the host to back `region` with transparent huge pages, as QEMU does
/// for guest RAM: hosts in THP's `madvise` mode give them only to mappings
/// that ask, and in every mode only those that ask get them by compaction
/// when free huge pages are short. The guest's first touch of each 2 MiB is
/// then one fault instead of 512, and KVM maps it with one 2 MiB page. For
/// memfd-backed RAM the host's `shmem_enabled` decides. Best effort: a host
/// without THP just keeps 4 KiB pages.
fn advise_huge_pages(region: &GuestRegionMmap) {
    use vm_memory::GuestMemoryRegion;
    // SAFETY: the range is exactly one mapping vm-memory just made and owns;
    // MADV_HUGEPAGE changes how it is backed, never its contents.
    let r = unsafe {
        libc::madvise(
            region.as_ptr().cast(),
            region.len() as usize,
            libc::MADV_HUGEPAGE,
        )
    };
    if r != 0 {
        log::debug!(
            "guest RAM: no transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Host mappings of guest RAM start on a 2 MiB boundary, as guest RAM does,
/// so that KVM can map the guest with 2 MiB pages where the host backs the
/// mapping with (transparent) huge pages: far fewer nested-paging faults while
/// the guest touches its memory (QEMU aligns its RAM blocks the same way).
const HUGE_ALIGN: usize = 2 << 20;

/// Runs `map`, which makes one mapping of `len` bytes with `mmap(NULL, ...)`
/// (vm-memory has no placement hint), so that the kernel places it on a
/// [`HUGE_ALIGN`] boundary when it can: a gap of exactly `len` bytes at an
/// aligned address, between two inaccessible reservations, is the first that
/// its top-down search finds. The reservations are released afterwards. An
/// unaligned result (another thread mapped the gap first, or a higher gap of
/// the size existed) is only slower, never wrong.
fn huge_aligned<T>(len: usize, map: impl FnOnce() -> T) -> T {
    let total = len + 2 * HUGE_ALIGN;
    // SAFETY: a new anonymous inaccessible mapping at an address the kernel
    // chooses; nothing else refers to it.
    let r = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return map();
    }
    let start = r as usize;
    let end = start + total;
    let hole = (start + 4096).next_multiple_of(HUGE_ALIGN);
    let hole_end = hole + len;
    debug_assert!(start < hole && hole_end < end);
    // SAFETY: [hole, hole_end) lies inside the reservation made above, which
    // only this function knows.
    unsafe { libc::munmap(hole as *mut libc::c_void, len) };
    let mapped = map();
    // SAFETY: what is left of the reservation below the hole: still ours (no
    // mapping replaces another without MAP_FIXED).
    unsafe { libc::munmap(start as *mut libc::c_void, hole - start) };
    // SAFETY: the same, above the hole.
    unsafe { libc::munmap(hole_end as *mut libc::c_void, end - hole_end) };
    mapped
}

/// An anonymous memory file of `size` bytes (sparse: pages come on use).
fn memfd(size: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"minivmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by no one else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// End (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_memory_is_split_around_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1], (GuestAddress(FOUR_GIB), (1 << 30) as usize));
        assert_eq!(ram_ranges(3 << 30).len(), 1);
    }

    #[test]
    fn memory_above_4g_is_usable() {
        let mem = create_guest_memory(4 << 30, false).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(FOUR_GIB + 0x1000))
            .unwrap();
        let v: u32 = mem.read_obj(GuestAddress(FOUR_GIB + 0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert!(mem.read_obj::<u32>(GuestAddress(MMIO_HOLE_START)).is_err());
        assert_eq!(mem.num_regions(), 2);
    }

    #[test]
    fn shared_memory_is_one_memfd_mapped_in_every_range() {
        use vm_memory::GuestMemoryRegion;
        let mem = create_guest_memory(4 << 30, true).unwrap();
        mem.write_obj(7u64, GuestAddress(FOUR_GIB)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(FOUR_GIB)).unwrap(), 7);
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().expect("a file behind each region").start())
            .collect();
        assert_eq!(offsets, vec![0, MMIO_HOLE_START], "one file, back to back");
        let private = create_guest_memory(64 << 20, false).unwrap();
        assert!(private.iter().all(|r| r.file_offset().is_none()));
    }

    /// The smaps `VmFlags` of the mapping that starts at `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            let start = l.split('-').next().unwrap_or_default();
            if usize::from_str_radix(start, 16).ok() == Some(addr) {
                return lines
                    .find(|l| l.starts_with("VmFlags:"))
                    .unwrap_or_default()
                    .to_string();
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn guest_ram_asks_for_huge_pages() {
        for shared in [false, true] {
            let mem = create_guest_memory(64 << 20, shared).unwrap();
            for r in mem.iter() {
                let flags = vm_flags(r.as_ptr() as usize);
                assert!(
                    flags.split_whitespace().any(|f| f == "hg"),
                    "shared {shared}: {flags}"
                );
            }
        }
    }

    #[test]
    fn guest_ram_is_mapped_on_huge_page_boundaries() {
        // Best effort (other test threads map memory meanwhile): most tries
        // must be aligned; by chance one in 512 would be. An odd number of
        // MiB: newer kernels align mappings of whole huge pages themselves.
        for shared in [false, true] {
            let aligned = (0..5)
                .filter(|_| {
                    let mem = create_guest_memory(513 << 20, shared).unwrap();
                    let ok = mem.iter().all(|r| r.as_ptr() as usize % HUGE_ALIGN == 0);
                    ok
                })
                .count();
            assert!(aligned >= 3, "shared {shared}: {aligned} of 5 aligned");
        }
    }
}
