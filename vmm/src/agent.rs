//! Glue between the guest-agent port (virtio-console on the VMM thread) and the
//! in-process agent proxy: queue notifications, bytes both ways, port open/close,
//! and the proxy's answers to QMP clients.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use agent_proxy::AgentProxy;
use devices::virtio::console::AGENT_TX_QUEUE;
use event_manager::{EventManager, MutEventSubscriber, SubscriberId, SubscriberOps};
use qmp::protocol::QmpError;
use qmp::server::QmpServer;

use crate::builder::AgentPort;
use crate::qmp_event::{QmpEvent, Throttle, PORT_EVENT_PERIOD};
use crate::runtime::Runtime;

/// Moves bytes and open/close changes between the port and the proxy; the
/// guest's open/close become `VSERPORT_CHANGE` events. Returns whether anything
/// moved.
fn exchange(
    port: &AgentPort,
    proxy: &mut AgentProxy,
    open: &mut bool,
    events: &mut Throttle,
    rt: &mut Runtime,
) -> bool {
    let mut t = port.lock().unwrap_or_else(|e| e.into_inner());
    let changes = t.device_mut().take_port_changes();
    let data = t.device_mut().take_from_guest();
    if t.device().tx_stalled() {
        // Room again: take the transmit buffers the guest is blocked on.
        t.notify(AGENT_TX_QUEUE);
    }
    let mut moved = !changes.is_empty() || !data.is_empty();
    for ch in changes {
        if ch != *open {
            *open = ch;
            if let Some(ev) = events.offer(QmpEvent::AgentPort { open: ch }, Instant::now()) {
                rt.emit(ev);
            }
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
        moved = true;
        let sent = t.with_device(|c, ctx| c.send_to_guest(&out, ctx));
        match sent {
            Some(n) if n == out.len() => {}
            Some(n) => log_ratelimit::warn_limited!(
                "agent port: {} bytes for the guest dropped (buffer full)",
                out.len() - n
            ),
            None => log::debug!("agent port not active: {} bytes dropped", out.len()),
        }
    }
    moved
}

/// The VMM side of the guest-agent channel across VM rebuilds.
pub struct AgentLink {
    proxy: Rc<RefCell<AgentProxy>>,
    proxy_id: SubscriberId,
    /// The VM generation whose port is watched, and its queue subscriber.
    watch: crate::port_watch::PortWatch,
    /// Whether the guest has the port open.
    open: bool,
    /// `VSERPORT_CHANGE` rate limit.
    port_events: Throttle,
    /// The proxy's request timeouts already reported.
    timeouts_seen: u64,
}

impl AgentLink {
    /// Registers the proxy (its socket and timer) with the event loop.
    pub fn new(
        em: &mut EventManager<Box<dyn MutEventSubscriber>>,
        proxy: Rc<RefCell<AgentProxy>>,
    ) -> Self {
        let proxy_id = em.add_subscriber(Box::new(proxy.clone()));
        Self {
            proxy,
            proxy_id,
            watch: Default::default(),
            open: false,
            port_events: Throttle::new(PORT_EVENT_PERIOD),
            timeouts_seen: 0,
        }
    }

    /// When a rate-limited `VSERPORT_CHANGE` is due ([`Self::round`] emits it).
    pub fn deadline(&self) -> Option<Instant> {
        self.port_events.deadline()
    }

    /// Follows the current VM's port (a rebuilt VM has a new one, and the guest
    /// side of the old one is gone) and moves what is pending between the port
    /// and the proxy. Returns whether anything happened.
    pub fn round(
        &mut self,
        em: &mut EventManager<Box<dyn MutEventSubscriber>>,
        rt: &mut Runtime,
    ) -> bool {
        let port = rt.agent_port();
        let mut moved = false;
        if self.watch.follow(em, &port, None, "guest agent port") && self.open {
            // The old VM's port is gone, and the agent with it.
            self.open = false;
            self.proxy.borrow_mut().port_state(false);
            let ev = QmpEvent::AgentPort { open: false };
            if let Some(ev) = self.port_events.offer(ev, Instant::now()) {
                rt.emit(ev);
            }
            moved = true;
        }
        if let Some((_, p)) = &port {
            let proxy = &mut self.proxy.borrow_mut();
            if proxy.timeouts() != self.timeouts_seen {
                // Where the channel stood when the agent ran out of time: a
                // guest still writing, a device not taking its buffers, or
                // an agent that never answered.
                self.timeouts_seen = proxy.timeouts();
                let t = p.lock().unwrap_or_else(|e| e.into_inner());
                for line in t.queue_report() {
                    log::warn!("agent port at the timeout: {line}");
                }
            }
            moved |= exchange(p, proxy, &mut self.open, &mut self.port_events, rt);
        }
        // Only a pending event needs the time (`offer` looks for itself).
        if self.port_events.deadline().is_some() {
            if let Some(ev) = self.port_events.due(Instant::now()) {
                rt.emit(ev);
                moved = true;
            }
        }
        moved
    }

    /// Hands the proxy's finished QMP requests to the server; true if any.
    pub fn complete_qmp(&self, server: &mut QmpServer) -> bool {
        let replies = self.proxy.borrow_mut().take_qmp_replies();
        let any = !replies.is_empty();
        for (token, result) in replies {
            // Keep the agent's error class where QMP has it (qemu-ga uses
            // GenericError and CommandNotFound).
            let result = result.map_err(|e| match e.class.as_str() {
                "CommandNotFound" => QmpError::not_found(e.desc),
                _ => QmpError::generic(e.desc),
            });
            if !server.complete(token, result) {
                log::debug!("agent reply {token} had no waiting QMP client");
            }
        }
        any
    }

    /// At exit: answers what waits, flushes the socket clients until
    /// `deadline` at the latest (see [`AgentProxy::close_for_exit`]).
    pub fn close_for_exit(&self, deadline: Instant) {
        self.proxy.borrow_mut().close_for_exit(deadline);
    }

    /// Writes pending client output and updates what the proxy watches.
    pub fn flush(&self, em: &mut EventManager<Box<dyn MutEventSubscriber>>) {
        match em.event_ops(self.proxy_id) {
            Ok(mut ops) => self.proxy.borrow_mut().flush(&mut ops),
            Err(e) => log::error!("agent proxy: {e:?}"),
        }
    }
}
