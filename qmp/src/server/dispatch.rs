//! Executing commands: capability negotiation, argument checks, deferred replies.

use std::collections::VecDeque;

use serde_json::{json, Value};

use super::{send, QmpServer};
use crate::protocol::{self, ArgSpec, ArgType, CommandSpec, QmpError, RawJson, Request};
use crate::stream::Framed;

/// The outcome of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The result, available now.
    Now(Result<Value, QmpError>),
    /// The result comes later through [`QmpServer::complete`] with this token;
    /// until then that client's further commands wait (replies stay in order).
    Later(u64),
}

/// Executes the commands the VMM implements.
pub trait Handler {
    /// Commands accepted besides `qmp_capabilities`, with their arguments.
    fn commands(&self) -> &[CommandSpec];
    /// Whether a command missing from [`Handler::commands`] is passed through
    /// unchecked (e.g. `guest-*` commands forwarded to a guest agent).
    fn passes_through(&self, _name: &str) -> bool {
        false
    }
    /// Runs a validated command. Events it causes go into `events` (built with
    /// [`protocol::event`]); they are sent to all clients before the reply.
    fn execute(&mut self, req: &Request, events: &mut Vec<Value>) -> Reply;
}

/// `qmp_capabilities` arguments.
const CAPABILITIES_ARGS: &[ArgSpec] = &[ArgSpec {
    name: "enable",
    ty: ArgType::StrList,
    required: false,
}];

impl QmpServer {
    /// Executes queued input in arrival order (per client: a client waiting for a
    /// deferred reply has its later input held back). Returns whether anything
    /// was executed.
    pub fn dispatch(&mut self, handler: &mut dyn Handler) -> bool {
        let mut held = VecDeque::new();
        let mut ran = false;
        while let Some((id, item)) = self.inbox.pop_front() {
            let Some(c) = self.clients.get_mut(id) else {
                continue;
            };
            if c.conn.is_dead() {
                c.state.queued = c.state.queued.saturating_sub(1);
                continue;
            }
            if c.state.waiting.is_some() {
                held.push_back((id, item));
                continue;
            }
            c.state.queued = c.state.queued.saturating_sub(1);
            ran = true;
            let mut events = Vec::new();
            let reply = self.handle(id, item, handler, &mut events);
            for e in &events {
                self.broadcast(e);
            }
            if let Some(reply) = reply {
                if let Some(c) = self.clients.get_mut(id) {
                    send(&mut c.conn, &reply);
                }
            }
        }
        self.inbox = held;
        ran
    }

    /// Delivers the result of a deferred command; returns false if no client
    /// waits for `token` any more (it disconnected).
    pub fn complete(&mut self, token: u64, result: Result<impl Into<RawJson>, QmpError>) -> bool {
        let result = result.map(Into::into);
        for c in self.clients.iter_mut() {
            if c.state.waiting.as_ref().is_some_and(|(t, _)| *t == token) {
                let (_, id) = c.state.waiting.take().unwrap_or((token, None));
                c.conn.queue(&protocol::reply_wire(&result, id.as_ref()));
                return true;
            }
        }
        false
    }

    fn handle(
        &mut self,
        id: u64,
        item: Framed,
        handler: &mut dyn Handler,
        events: &mut Vec<Value>,
    ) -> Option<Value> {
        let v = match item {
            Framed::Value(v) => v,
            Framed::Error(msg) => return Some(protocol::reply(&Err(QmpError::generic(msg)), None)),
            // Oversized input drops the client before it reaches the inbox;
            // the server's streamers parse (no raw items).
            Framed::TooLarge | Framed::Raw(_) => return None,
        };
        let req = match protocol::parse_request(v) {
            Ok(r) => r,
            Err((e, req_id)) => return Some(protocol::reply(&Err(e), req_id.as_ref())),
        };
        match self.run(id, &req, handler, events) {
            Reply::Now(result) => Some(protocol::reply(&result, req.id.as_ref())),
            Reply::Later(token) => {
                if let Some(c) = self.clients.get_mut(id) {
                    c.state.waiting = Some((token, req.id.clone()));
                }
                None
            }
        }
    }

    fn run(
        &mut self,
        id: u64,
        req: &Request,
        handler: &mut dyn Handler,
        events: &mut Vec<Value>,
    ) -> Reply {
        match self.check(id, req, handler) {
            Ok(true) => Reply::Now(Ok(json!({}))),
            Ok(false) => handler.execute(req, events),
            Err(e) => Reply::Now(Err(e)),
        }
    }

    /// Protocol checks; Ok(true) when the request was `qmp_capabilities` and is
    /// done, Ok(false) when the handler must run it.
    fn check(
        &mut self,
        id: u64,
        req: &Request,
        handler: &mut dyn Handler,
    ) -> Result<bool, QmpError> {
        let negotiated = self.clients.get(id).is_some_and(|c| c.state.negotiated);
        let is_caps = req.name == "qmp_capabilities";
        let spec = if is_caps {
            Some(CommandSpec {
                name: "qmp_capabilities",
                args: CAPABILITIES_ARGS,
            })
        } else {
            handler
                .commands()
                .iter()
                .find(|c| c.name == req.name)
                .copied()
        };
        if !negotiated && !is_caps {
            return Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        if negotiated && is_caps {
            return Err(QmpError::not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let Some(spec) = spec else {
            if handler.passes_through(&req.name) && !req.oob {
                return Ok(false);
            }
            return Err(QmpError::not_found(format!(
                "The command {} has not been found",
                req.name
            )));
        };
        if req.oob {
            return Err(QmpError::generic(format!(
                "The command {} does not support OOB",
                req.name
            )));
        }
        protocol::check_args(&spec, &req.args)?;
        if is_caps {
            if let Some(caps) = req.args.get("enable").and_then(Value::as_array) {
                for c in caps {
                    if c.as_str() != Some("oob") {
                        return Err(QmpError::generic(format!(
                            "Capability '{}' not available",
                            c.as_str().unwrap_or("?")
                        )));
                    }
                }
            }
            if let Some(c) = self.clients.get_mut(id) {
                c.state.negotiated = true;
            }
            return Ok(true);
        }
        Ok(false)
    }
}
