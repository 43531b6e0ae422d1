//! The VMM side of `--console virtio`: follows the current VM's virtio
//! console across rebuilds, so that its queues are served and the input held
//! for it ([`HvcHost`]) reaches the guest when it arrives, and output that
//! waited for room goes out when the host output made some.

use std::sync::Arc;

use devices::virtio::hvc::HvcHost;
use event_manager::{EventManager, MutEventSubscriber};

use crate::port_watch::PortWatch;
use crate::runtime::Runtime;

/// The receive queue: processed when input arrives.
const RX_QUEUE: usize = 0;
/// The transmit queue: processed again when the host output made room.
const TX_QUEUE: usize = 1;

/// The host side of the guest's virtio console.
pub struct HvcLink {
    host: Arc<HvcHost>,
    watch: PortWatch,
}

impl HvcLink {
    /// A link for the console whose host side is `host`.
    pub fn new(host: Arc<HvcHost>) -> Self {
        Self {
            host,
            watch: PortWatch::default(),
        }
    }

    /// Watches the current VM's console (a new one after a rebuild).
    pub fn follow(&mut self, em: &mut EventManager<Box<dyn MutEventSubscriber>>, rt: &Runtime) {
        let port = rt.hvc_port();
        let extras = [
            (self.host.pending(), RX_QUEUE),
            (self.host.output_progress(), TX_QUEUE),
        ];
        self.watch.follow(em, &port, &extras, "virtio console");
    }
}
