//! Guest RAM: split around the 32-bit MMIO hole, allocated with vm-memory.

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

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
        return GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(alloc);
    }
    let file = memfd(size).map_err(|source| MemoryError::Memfd {
        size: size >> 20,
        source,
    })?;
    let file = std::sync::Arc::new(file);
    let mut offset = 0;
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|(addr, len)| {
            let r = (addr, len, Some(FileOffset::from_arc(file.clone(), offset)));
            offset += len as u64;
            r
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(alloc)
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
}
