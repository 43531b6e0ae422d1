//! Guest RAM: split around the 32-bit MMIO hole, allocated with vm-memory.

use vm_memory::{GuestAddress, GuestMemoryMmap};

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

/// Allocates (lazily, as anonymous private mappings) `size` bytes of guest RAM.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Allocate {
        size: size >> 20,
        source,
    })
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
        let mem = create_guest_memory(4 << 30).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(FOUR_GIB + 0x1000))
            .unwrap();
        let v: u32 = mem.read_obj(GuestAddress(FOUR_GIB + 0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert!(mem.read_obj::<u32>(GuestAddress(MMIO_HOLE_START)).is_err());
        assert_eq!(mem.num_regions(), 2);
    }
}
