//! isa-debug-exit: QEMU's test-image device (`-device
//! isa-debug-exit,iobase=0xf4,iosize=0x04`). A guest write of value V anywhere
//! in its four ports ends the VM with exit status `(V << 1) | 1`, so test images
//! written for QEMU work unchanged. Reads return 0. It has no ACPI node (QEMU
//! gives it none either).

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The device's first I/O port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Its number of ports.
pub const DEBUG_EXIT_LEN: u16 = 4;

/// The value the guest wrote, shared with the VMM thread. The first write
/// counts: the VM is ending.
pub type DebugExitValue = Arc<Mutex<Option<u32>>>;

/// The process exit status QEMU gives a write of `v`: `(v << 1) | 1` (of which
/// the system keeps the low 8 bits).
pub fn exit_status(v: u32) -> u32 {
    (v << 1) | 1
}

/// The device: records the value and signals `written`.
pub struct DebugExit {
    value: DebugExitValue,
    written: EventFd,
}

impl DebugExit {
    /// A device that stores the guest's value in `value` and signals `written`.
    pub fn new(value: DebugExitValue, written: EventFd) -> Self {
        Self { value, written }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(bytes);
        self.value
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(v);
        if let Err(e) = self.written.write(1) {
            log::error!("isa-debug-exit: cannot signal the VMM: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn a_write_records_its_value_once_and_signals() {
        let value = DebugExitValue::default();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut d = DebugExit::new(value.clone(), evt.try_clone().unwrap());
        let mut r = [0xaa; 4];
        d.read(0xf4, 0, &mut r);
        assert_eq!(r, [0; 4]);
        assert!(evt.read().is_err(), "a read signals nothing");
        d.write(0xf4, 0, &3u32.to_le_bytes());
        d.write(0xf4, 2, &[9]);
        assert_eq!(evt.read().unwrap(), 2);
        assert_eq!(*value.lock().unwrap(), Some(3), "the first value counts");
        assert_eq!(exit_status(3), 7);
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(0x7f) & 0xff, 0xff);
        assert_eq!(exit_status(0xffff_ffff), 0xffff_ffff);
    }
}
