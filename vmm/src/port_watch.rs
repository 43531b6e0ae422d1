//! Queue notifications of the current VM's virtio devices, across rebuilds.
//!
//! KVM signals each queue's eventfd (ioeventfd) when the guest notifies it; a
//! [`QueueWatch`] on the VMM thread turns that into the device's queue
//! processing. A rebuilt VM has new devices, so a [`PortWatch`] keeps the
//! subscriber of the current VM's device and drops the old one.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::virtio::mmio::MmioTransport;
use devices::virtio::VirtioDevice;
use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::eventfd::EventFd;

/// A virtio device behind its transport, shared with the vcpus' MMIO bus.
pub type Port<D> = Arc<Mutex<MmioTransport<D>>>;

/// Watches a device's queue eventfds (and any extra eventfd that stands for
/// a queue) and its poll timer, and runs the device.
pub struct QueueWatch<D: VirtioDevice> {
    port: Port<D>,
    /// Each watched eventfd with the queue it stands for.
    evts: Vec<(EventFd, usize)>,
    /// The transport's poll timer (it lives as long as `port`).
    poll_fd: RawFd,
}

/// The event data of the poll timer (the eventfds use their index).
const POLL_TIMER: u32 = u32::MAX;

impl<D: VirtioDevice> QueueWatch<D> {
    /// Subscriber for `port`'s queues, and for `extra` (an eventfd and the
    /// queue to process when it fires: host data waiting for the guest).
    pub fn new(port: Port<D>, extra: Option<(&EventFd, usize)>) -> io::Result<Self> {
        let (mut evts, poll_fd) = {
            let t = port.lock().unwrap_or_else(|e| e.into_inner());
            let evts = t
                .queue_evts()
                .iter()
                .enumerate()
                .map(|(i, e)| Ok((e.try_clone()?, i)))
                .collect::<io::Result<Vec<_>>>()?;
            (evts, t.poll_fd())
        };
        if let Some((e, q)) = extra {
            evts.push((e.try_clone()?, q));
        }
        Ok(Self {
            port,
            evts,
            poll_fd,
        })
    }
}

impl<D: VirtioDevice> MutEventSubscriber for QueueWatch<D> {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, (e, _)) in self.evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                log::error!("cannot watch virtio queue eventfd {i}: {err:?}");
            }
        }
        let timer = Events::with_data_raw(self.poll_fd, POLL_TIMER, EventSet::IN);
        if let Err(err) = ops.add(timer) {
            log::error!("cannot watch a virtio device's poll timer: {err:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == POLL_TIMER && events.fd() == self.poll_fd {
            self.port
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll_due();
            return;
        }
        let i = events.data() as usize;
        if let Some((e, q)) = self
            .evts
            .get(i)
            .filter(|(e, _)| e.as_raw_fd() == events.fd())
        {
            let _ = e.read();
            self.port
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .notify(*q);
        }
    }
}

/// Keeps the [`QueueWatch`] of the current VM's device: a rebuilt VM has a
/// new device, and the old one is gone.
#[derive(Debug, Default)]
pub struct PortWatch {
    /// The VM generation whose device is watched, and its queue subscriber.
    attached: Option<(u64, SubscriberId)>,
}

impl PortWatch {
    /// Follows `port` (with its VM generation, from the runtime); returns
    /// whether the VM changed since the last call (a device watched before is
    /// gone). `extra` as for [`QueueWatch::new`]; `what` names the device in
    /// log lines.
    pub fn follow<D: VirtioDevice + 'static>(
        &mut self,
        em: &mut EventManager<Box<dyn MutEventSubscriber>>,
        port: &Option<(u64, Port<D>)>,
        extra: Option<(&EventFd, usize)>,
        what: &str,
    ) -> bool {
        let generation = port.as_ref().map(|(g, _)| *g);
        if generation == self.attached.map(|(g, _)| g) {
            return false;
        }
        if let Some((_, id)) = self.attached.take() {
            let _ = em.remove_subscriber(id);
        }
        if let Some((g, p)) = port {
            match QueueWatch::new(p.clone(), extra) {
                Ok(sub) => self.attached = Some((*g, em.add_subscriber(Box::new(sub)))),
                Err(e) => log::error!("{what}: {e}"),
            }
        }
        true
    }
}
