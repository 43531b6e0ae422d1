//! Glue between the guest-agent port (virtio-console on the VMM thread) and the
//! in-process agent proxy: queue notifications, bytes both ways, port open/close.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use agent_proxy::AgentProxy;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::AgentPort;
use crate::machine::AGENT_CHANNEL_ID;

/// Watches the port's queue eventfds (KVM ioeventfds) and runs the device.
pub struct AgentQueues {
    port: AgentPort,
    evts: Vec<EventFd>,
}

impl AgentQueues {
    /// Subscriber for `port`'s queues.
    pub fn new(port: AgentPort) -> std::io::Result<Self> {
        let evts = {
            let t = port.lock().unwrap_or_else(|e| e.into_inner());
            t.queue_evts()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()?
        };
        Ok(Self { port, evts })
    }
}

impl MutEventSubscriber for AgentQueues {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                log::error!("cannot watch agent queue {i}: {err:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let i = events.data() as usize;
        if let Some(e) = self.evts.get(i).filter(|e| e.as_raw_fd() == events.fd()) {
            let _ = e.read();
            self.port
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .notify(i);
        }
    }
}

/// Moves bytes and open/close changes between the port and the proxy. Returns
/// the VSERPORT_CHANGE events to emit, and updates `open`.
pub fn exchange(port: &AgentPort, proxy: &Rc<RefCell<AgentProxy>>, open: &mut bool) -> Vec<Value> {
    let mut events = Vec::new();
    let mut t = port.lock().unwrap_or_else(|e| e.into_inner());
    let mut proxy = proxy.borrow_mut();
    let changes = t.device_mut().take_port_changes();
    let data = t.device_mut().take_from_guest();
    for ch in changes {
        if ch != *open {
            *open = ch;
            events.push(qmp::protocol::event(
                "VSERPORT_CHANGE",
                Some(json!({"id": AGENT_CHANNEL_ID, "open": ch})),
            ));
        }
        if ch {
            // Bytes read before the open belong to the previous session.
            proxy.port_state(true);
        } else {
            t.device_mut().discard_to_guest();
            proxy.port_state(false);
        }
    }
    if !data.is_empty() {
        proxy.from_guest(&data);
    }
    let out = proxy.take_to_guest();
    if !out.is_empty() {
        let sent = t.with_device(|c, ctx| c.send_to_guest(&out, ctx));
        match sent {
            Some(n) if n == out.len() => {}
            Some(n) => log::warn!(
                "agent port: {} bytes for the guest dropped (buffer full)",
                out.len() - n
            ),
            None => log::debug!("agent port not active: {} bytes dropped", out.len()),
        }
    }
    events
}
