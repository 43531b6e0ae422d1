//! The i8042 keyboard controller, only as far as guests need it: its ports exist and
//! the "pulse reset line" command (0xFE to port 0x64) resets the machine.
//!
//! The guest is not told about it (no ACPI node, and the FADT does not set the
//! "8042" boot flag), so Linux does not probe it as a keyboard controller: it
//! answers no commands, and the probe would wait seconds for it.
//! Built on vm-superio's [`vm_superio::I8042Device`].

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::EventFdTrigger;

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Keyboard IRQ.
pub const I8042_IRQ: u32 = 1;

/// The controller; put it on the port bus at both [`I8042_DATA_PORT`] and
/// [`I8042_COMMAND_PORT`] (one port each).
pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    /// A controller that triggers `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let reg = (base + offset).wrapping_sub(I8042_DATA_PORT as u64) as u8;
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(reg);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let reg = (base + offset).wrapping_sub(I8042_DATA_PORT as u64) as u8;
        if let [value] = data {
            if let Err(e) = self.0.write(reg, *value) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_on_port_0x64_triggers_reset() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        dev.write(I8042_DATA_PORT as u64, 0, &[0xfe]);
        assert!(evt.read().is_err(), "0xfe to the data port is not a reset");
        dev.write(I8042_COMMAND_PORT as u64, 0, &[0x20]);
        assert!(evt.read().is_err());
        dev.write(I8042_COMMAND_PORT as u64, 0, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
