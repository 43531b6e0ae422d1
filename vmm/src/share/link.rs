//! The VMM side of `--share`: follows the current VM's virtio-fs devices.
//!
//! While its virtiofsd runs, a device's queues are the daemon's: KVM signals
//! the daemon directly and the VMM stays out of the way. When the daemon ends
//! unasked, the device answers every request with EIO itself
//! ([`devices::virtio::fs::orphan`]) and its [`FsWatch`] serves the queues'
//! notifications from then on. Each loss is recorded once, for `minivmm run`'s
//! verdict.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::eventfd::EventFd;

use super::FsPort;
use crate::runtime::Runtime;

/// The event data of the daemon's exit eventfd (queues use their index).
const EXIT: u32 = u32::MAX;

/// Shares whose daemon ended, as one line each.
type Lost = Rc<RefCell<Vec<String>>>;

/// Follows the `--share` devices of the current VM across rebuilds.
#[derive(Default)]
pub struct ShareLink {
    /// The VM generation whose devices are watched, and their subscribers.
    attached: Option<(u64, Vec<SubscriberId>)>,
    lost: Lost,
}

impl ShareLink {
    /// Watches the current VM's shares (new ones after a rebuild).
    pub fn follow(&mut self, em: &mut EventManager<Box<dyn MutEventSubscriber>>, rt: &Runtime) {
        let current = rt.fs_ports();
        let generation = current.as_ref().map(|(g, _)| *g);
        if generation == self.attached.as_ref().map(|(g, _)| *g) {
            return;
        }
        if let Some((_, ids)) = self.attached.take() {
            for id in ids {
                let _ = em.remove_subscriber(id);
            }
        }
        if let Some((g, ports)) = current {
            let ids = ports
                .iter()
                .filter_map(|p| match FsWatch::new(p.clone(), self.lost.clone()) {
                    Ok(Some(w)) => Some(em.add_subscriber(Box::new(w))),
                    Ok(None) => None, // No daemon to watch.
                    Err(e) => {
                        log::error!("share: cannot watch for its daemon's end: {e}");
                        None
                    }
                })
                .collect();
            self.attached = Some((g, ids));
        }
    }

    /// The shares whose daemon ended unasked so far, one line each.
    pub fn lost(&self) -> Vec<String> {
        self.lost.borrow().clone()
    }
}

/// One share's device: its daemon's exit, then its queues.
pub struct FsWatch {
    port: FsPort,
    exit: EventFd,
    queues: Vec<EventFd>,
    lost: Lost,
    taken_over: bool,
}

impl FsWatch {
    /// A watch for `port`'s daemon, or None for a device without one.
    fn new(port: FsPort, lost: Lost) -> std::io::Result<Option<Self>> {
        let (exit, queues) = {
            let t = port.lock().unwrap_or_else(|e| e.into_inner());
            let Some(exit) = t.device().backend_exit() else {
                return Ok(None);
            };
            let exit = exit.try_clone()?;
            let queues = t
                .queue_evts()
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            (exit, queues)
        };
        Ok(Some(Self {
            port,
            exit,
            queues,
            lost,
            taken_over: false,
        }))
    }

    /// The daemon is gone: the device answers from now on, starting with
    /// what waits.
    fn take_over(&mut self, ops: &mut EventOps) {
        self.taken_over = true;
        let mut t = self.port.lock().unwrap_or_else(|e| e.into_inner());
        t.device_mut().backend_gone();
        let tag = t.device().tag().to_string();
        self.lost.borrow_mut().push(format!(
            "the virtiofsd of {tag} ended (the guest got I/O errors on that share)"
        ));
        for (i, q) in self.queues.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(q, i as u32, EventSet::IN)) {
                log::error!("{tag}: cannot watch queue {i}: {e:?}");
            }
            let _ = q.read();
            t.notify(i);
        }
    }
}

impl MutEventSubscriber for FsWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.exit, EXIT, EventSet::IN)) {
            log::error!("share: cannot watch for its daemon's end: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == EXIT && events.fd() == self.exit.as_raw_fd() {
            let _ = self.exit.read();
            if !self.taken_over {
                self.take_over(ops);
            }
            return;
        }
        let i = events.data() as usize;
        if let Some(q) = self.queues.get(i).filter(|q| q.as_raw_fd() == events.fd()) {
            let _ = q.read();
            self.port
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .notify(i);
        }
    }
}
