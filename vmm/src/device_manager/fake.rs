//! A stand-in for KVM in unit tests.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

use super::EventfdRegistry;

/// Records what a VM would be told; fails the irqfd of `refuse_gsi`, or
/// every ioeventfd with `refuse_ioevents`.
#[derive(Default)]
pub(crate) struct Recorder {
    pub irqfds: RefCell<Vec<(u32, EventFd)>>,
    pub ioevents: RefCell<Vec<(u64, u32, RawFd)>>,
    pub refuse_gsi: Option<u32>,
    pub refuse_ioevents: bool,
}

impl EventfdRegistry for Recorder {
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        if self.refuse_gsi == Some(gsi) {
            return Err(kvm_ioctls::Error::new(libc::EBUSY));
        }
        self.irqfds
            .borrow_mut()
            .push((gsi, fd.try_clone().unwrap()));
        Ok(())
    }

    fn register_mmio_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        if self.refuse_ioevents {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        self.ioevents
            .borrow_mut()
            .push((addr, datamatch, fd.as_raw_fd()));
        Ok(())
    }
}

impl Recorder {
    /// The GSIs given irqfds, in order.
    pub fn gsis(&self) -> Vec<u32> {
        self.irqfds.borrow().iter().map(|(g, _)| *g).collect()
    }
}
