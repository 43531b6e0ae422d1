//! Clients of the qga-compatible socket: their requests, local replies and
//! output, on the shared connection layer ([`qmp::conn`]).

use event_manager::EventOps;
use qmp::conn::{ConnSet, Names, Session};
use qmp::stream::Framed;
use serde_json::Value;

use crate::channel::Channel;
use crate::requests::{Owner, Request, Work};
use crate::wire::{self, SENTINEL};
use crate::{
    AgentError, AgentProxy, MAX_OUTSTANDING_PER_CLIENT, MAX_REQUEST, NOT_CONNECTED,
    NO_REPLY_COMMANDS,
};

const NAMES: Names = Names {
    client: "guest agent client",
    accept_error: "guest agent socket: accept",
    label: |id, _| format!("guest agent client {id}"),
};

/// What the proxy keeps about a client.
#[derive(Default)]
pub(crate) struct AgentSession {
    /// Requests and local replies queued or in flight.
    outstanding: usize,
}

impl Session for AgentSession {
    /// A client with too much outstanding is not read until some completes.
    fn wants_input(&self) -> bool {
        self.outstanding < MAX_OUTSTANDING_PER_CLIENT
    }

    /// Replies still to come keep a half-closed client connected.
    fn busy(&self) -> bool {
        self.outstanding > 0
    }
}

/// Unread replies a client may leave before it is disconnected: the largest
/// agent reply plus a request's worth.
pub(crate) fn max_output(max_reply: usize) -> usize {
    max_reply + MAX_REQUEST
}

/// The (empty) set of socket clients.
pub(crate) fn new_set(max_reply: usize) -> ConnSet<AgentSession> {
    ConnSet::new(NAMES, MAX_REQUEST, max_output(max_reply))
}

impl AgentProxy {
    /// Queues output for a client. `done` marks one outstanding item finished.
    pub(crate) fn client_output(&mut self, id: u64, bytes: &[u8], done: bool) {
        self.client_output_parts(id, &[bytes], done);
    }

    /// As [`Self::client_output`], for output in pieces (queued one after the
    /// other, without joining them first: an agent reply may be megabytes).
    pub(crate) fn client_output_parts(&mut self, id: u64, parts: &[&[u8]], done: bool) {
        let Some(c) = self.clients.get_mut(id) else {
            return; // Gone: its reply is dropped.
        };
        if done {
            c.state.outstanding = c.state.outstanding.saturating_sub(1);
        }
        for p in parts {
            c.conn.queue(p);
        }
        c.conn.write_out();
    }

    /// A reply made by the proxy for a client, after the client's earlier ones.
    fn local_reply(&mut self, id: u64, result: Result<Value, AgentError>, req_id: Option<&Value>) {
        let bytes = wire::to_wire(&wire::reply(&result, req_id));
        let Some(c) = self.clients.get_mut(id) else {
            return;
        };
        if c.state.outstanding == 0 {
            self.client_output(id, &bytes, false);
        } else {
            c.state.outstanding += 1;
            self.queue.push_back(Work::Local { client: id, bytes });
        }
    }

    fn client_item(&mut self, id: u64, item: Framed) {
        match item {
            Framed::Value(v) => {
                let req_id = v.get("id").cloned();
                if self.channel == Channel::Closed {
                    self.local_reply(id, Err(AgentError::generic(NOT_CONNECTED)), req_id.as_ref());
                    return;
                }
                let name = v.get("execute").and_then(Value::as_str);
                let req = Request {
                    owner: Owner::Client(id),
                    no_reply: name.is_some_and(|n| NO_REPLY_COMMANDS.contains(&n)),
                    wire: wire::to_request_wire(&v),
                    id: req_id,
                    deadline: self.new_deadline(),
                };
                if let Some(c) = self.clients.get_mut(id) {
                    c.state.outstanding += 1;
                }
                self.queue.push_back(Work::Forward(req));
                self.pump();
            }
            Framed::Error(msg) => {
                // qemu-ga's own answer to malformed input; the agent never sees it.
                let msg = msg.replace("\\uFFFD", "\u{FFFD}");
                self.local_reply(id, Err(AgentError::generic(msg)), None);
            }
            // The connection layer closes the client instead; client input is
            // parsed (no raw items).
            Framed::TooLarge | Framed::Raw(_) => {}
        }
    }

    pub(crate) fn read_client(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(id) else {
            return;
        };
        let data = c.conn.read_chunk();
        let mut items = Vec::new();
        let mut oversized = false;
        for (i, seg) in data.split(|&b| b == SENTINEL).enumerate() {
            if i > 0 {
                // A 0xFF: drop the partial message and answer as qemu-ga does.
                c.conn.reset_input();
                items.push(Framed::Error(wire::STRAY_SENTINEL.into()));
            }
            if c.conn.feed(seg, &mut items) {
                // Closed; what came before the oversized message still counts.
                oversized = true;
                break;
            }
        }
        for item in items {
            if self
                .clients
                .get(id)
                .is_none_or(|c| c.conn.is_dead() && !oversized)
            {
                break;
            }
            self.client_item(id, item);
        }
        self.update_timer();
    }

    pub(crate) fn accept(&mut self, ops: &mut EventOps) {
        let Some(l) = &self.listener else { return };
        self.clients.accept(l, ops, |_| AgentSession::default());
    }

    /// Writes pending client output, updates what is watched, and drops clients
    /// that are gone. The VMM calls it after [`Self::from_guest`],
    /// [`Self::port_state`], [`Self::vm_event`] and [`Self::submit_qmp`].
    pub fn flush(&mut self, ops: &mut EventOps) {
        self.clients.flush(ops);
    }

    /// At VMM exit: answers everything still waiting as when the port closes
    /// (the request in flight `Guest agent disappeared while executing
    /// command`, or success for a command without success reply; queued ones
    /// `Guest agent is not connected`), then writes every client its pending
    /// replies and closes it, waiting for slow readers until `deadline` at
    /// the latest. QMP callers' answers wait in [`Self::take_qmp_replies`].
    pub fn close_for_exit(&mut self, deadline: std::time::Instant) {
        self.port_state(false);
        self.clients
            .flush_before_exit(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}
