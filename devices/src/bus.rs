//! Address-space dispatch for port I/O and MMIO exits.
//!
//! A [`Bus`] is built once, before the vcpus start, and then shared read-only by
//! every vcpu thread. Accesses that hit no device are answered the way unconnected
//! hardware answers them: reads return all-ones, writes are ignored. Both are logged
//! at debug level and never stop the VM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that can sit on a [`Bus`].
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the start of the range the
    /// device was inserted at, whose first address is `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a range already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each served by a device.
#[derive(Default)]
pub struct Bus {
    name: &'static str,
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self.ranges.iter().map(|(b, e)| (*b, e.len)).collect();
        f.debug_struct("Bus")
            .field("name", &self.name)
            .field("ranges", &ranges)
            .finish()
    }
}

impl Bus {
    /// An empty bus; `name` ("pio", "mmio") only appears in log lines.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            ranges: BTreeMap::new(),
        }
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((b, e)) = before {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let last = addr.checked_add(size.max(1) as u64 - 1)?;
        (last < base + entry.len).then_some((*base, entry))
    }

    /// Dispatches a read. Returns false (and fills `data` with all-ones) when no
    /// device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, entry)) => {
                lock(&entry.device).read(base, addr - base, data);
                true
            }
            None => {
                log::debug!(
                    "{}: unmapped read of {} bytes at {addr:#x}",
                    self.name,
                    data.len()
                );
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns false (and drops the data) when no device covers
    /// the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, entry)) => {
                lock(&entry.device).write(base, addr - base, data);
                true
            }
            None => {
                log::debug!("{}: unmapped write of {data:02x?} at {addr:#x}", self.name);
                false
            }
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose previous user
/// panicked is still better served than a VMM that aborts every vcpu.
fn lock(device: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill((base + offset) as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("pio");
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [0xfa]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0x3f8, 7, vec![7])]);
    }

    #[test]
    fn unmapped_reads_are_all_ones_and_writes_ignored() {
        let bus = Bus::new("pio");
        let mut b = [0u8; 4];
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x80, &[1, 2]));
    }

    #[test]
    fn access_straddling_range_end_is_unmapped() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("mmio");
        bus.insert(dev, 0x1000, 4).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0x1000, &mut b));
        assert!(!bus.read(0x1002, &mut b));
        assert!(!bus.read(0xfff, &mut [0u8; 1]));
        assert!(!bus.read(u64::MAX, &mut b));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new("pio");
        let d = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(d(), 0x60, 1).unwrap();
        bus.insert(d(), 0x64, 1).unwrap();
        assert_eq!(
            bus.insert(d(), 0x5f, 2),
            Err(BusError::Overlap { base: 0x5f, len: 2 })
        );
        assert_eq!(
            bus.insert(d(), 0x64, 1),
            Err(BusError::Overlap { base: 0x64, len: 1 })
        );
        assert_eq!(
            bus.insert(d(), 0x70, 0),
            Err(BusError::InvalidRange { base: 0x70, len: 0 })
        );
        assert_eq!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(d(), 0x61, 3).unwrap();
    }
}
