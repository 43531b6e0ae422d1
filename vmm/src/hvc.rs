//! The VMM side of `--console virtio`: follows the current VM's virtio
//! console across rebuilds, so that its queues are served and the input held
//! for it ([`HvcInput`]) reaches the guest when it arrives.

use std::sync::Arc;

use devices::virtio::hvc::HvcInput;
use event_manager::{EventManager, MutEventSubscriber};

use crate::port_watch::PortWatch;
use crate::runtime::Runtime;

/// The receive queue: processed when input arrives.
const RX_QUEUE: usize = 0;

/// The host side of the guest's virtio console.
pub struct HvcLink {
    input: Arc<HvcInput>,
    watch: PortWatch,
}

impl HvcLink {
    /// A link for the console whose input `input` holds.
    pub fn new(input: Arc<HvcInput>) -> Self {
        Self {
            input,
            watch: PortWatch::default(),
        }
    }

    /// Watches the current VM's console (a new one after a rebuild).
    pub fn follow(&mut self, em: &mut EventManager<Box<dyn MutEventSubscriber>>, rt: &Runtime) {
        let port = rt.hvc_port();
        let pending = Some((self.input.pending(), RX_QUEUE));
        self.watch.follow(em, &port, pending, "virtio console");
    }
}
