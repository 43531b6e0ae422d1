//! What vcpus tell the VMM thread: eventfds it watches, and the first failure's
//! description.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// What vcpus tell the VMM thread.
#[derive(Debug)]
pub struct VcpuEvents {
    /// The guest powered off (ACPI S5 or KVM system event).
    pub shutdown: EventFd,
    /// The guest asked for a reset (reset register, i8042, triple fault).
    pub reset: EventFd,
    /// A vcpu failed or died; the description is in `error_info`.
    pub error: EventFd,
    /// The guest reported a panic (pvpanic).
    pub panic: EventFd,
    /// The guest wrote to isa-debug-exit; the value is in `debug_exit_value`.
    pub debug_exit: EventFd,
    /// The value the guest wrote to isa-debug-exit (the first write).
    pub debug_exit_value: devices::debug_exit::DebugExitValue,
    /// Description of the first failure.
    pub error_info: Mutex<Option<String>>,
}

impl VcpuEvents {
    /// Fresh, non-blocking eventfds.
    pub fn new() -> std::io::Result<Self> {
        let e = || EventFd::new(libc::EFD_NONBLOCK);
        Ok(Self {
            shutdown: e()?,
            reset: e()?,
            error: e()?,
            panic: e()?,
            debug_exit: e()?,
            debug_exit_value: Default::default(),
            error_info: Mutex::new(None),
        })
    }

    /// Records `msg` (unless a failure was recorded already) and signals `error`.
    pub(super) fn fail(&self, msg: String) {
        let mut info = self.error_info.lock().unwrap_or_else(|e| e.into_inner());
        info.get_or_insert(msg);
        if let Err(e) = self.error.write(1) {
            log::error!("cannot signal vcpu failure: {e}");
        }
    }

    /// Signals `evt`, logging (as `what`) if that fails.
    pub(super) fn signal(evt: &EventFd, what: &str) {
        if let Err(e) = evt.write(1) {
            log::error!("cannot signal {what}: {e}");
        }
    }

    /// Clears pending signals (between a VM and its rebuilt successor).
    pub fn drain(&self) {
        for e in [
            &self.shutdown,
            &self.reset,
            &self.error,
            &self.panic,
            &self.debug_exit,
        ] {
            let _ = e.read();
        }
        self.debug_exit_value
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.error_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_kept_and_drain_clears_it() {
        let ev = VcpuEvents::new().unwrap();
        ev.fail("first".into());
        ev.fail("second".into());
        assert_eq!(ev.error.read().unwrap(), 2);
        assert_eq!(ev.error_info.lock().unwrap().as_deref(), Some("first"));
        VcpuEvents::signal(&ev.reset, "reset");
        ev.drain();
        assert!(ev.reset.read().is_err(), "drained");
        assert_eq!(*ev.error_info.lock().unwrap(), None);
    }
}
