//! Requests: the one-at-a-time queue, the QMP side, completion and timeouts.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use qmp::protocol::RawJson;
use serde_json::{json, Map, Value};

use crate::channel::Channel;
use crate::wire::{self, SENTINEL};
use crate::{AgentError, AgentProxy, COMPLETING_EVENTS, NOT_CONNECTED, NO_REPLY_COMMANDS};

/// Who gets a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Client(u64),
    Qmp(u64),
}

#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) owner: Owner,
    /// Bytes for the agent.
    pub(crate) wire: Vec<u8>,
    /// The request's `id` member, echoed in replies the proxy makes itself.
    pub(crate) id: Option<Value>,
    /// A command without success reply.
    pub(crate) no_reply: bool,
    /// When it fails if unanswered: its submission plus the timeout, whether it
    /// is still queued or in flight by then.
    pub(crate) deadline: Instant,
}

#[derive(Debug)]
pub(crate) enum Work {
    Forward(Request),
    /// A reply the proxy made for a client, delivered in that client's order.
    Local {
        client: u64,
        bytes: Vec<u8>,
    },
}

#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) req: Request,
}

/// "30", "0.2": seconds as in the timeout error.
fn seconds(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

impl AgentProxy {
    /// Forwards a `guest-*` command (`{"execute": ..., "arguments": ...}`) from a
    /// QMP client; the reply comes back from [`Self::take_qmp_replies`] with `token`.
    pub fn submit_qmp(&mut self, token: u64, request: Value) {
        let name = request.get("execute").and_then(Value::as_str);
        let Some(name) = name else {
            self.qmp_replies.push((
                token,
                Err(AgentError::generic("QMP input lacks member 'execute'")),
            ));
            return;
        };
        if self.channel == Channel::Closed {
            self.qmp_replies
                .push((token, Err(AgentError::generic(NOT_CONNECTED))));
            return;
        }
        let mut m = Map::new();
        m.insert("execute".into(), json!(name));
        if let Some(a) = request.get("arguments") {
            m.insert("arguments".into(), a.clone());
        }
        let req = Request {
            owner: Owner::Qmp(token),
            no_reply: NO_REPLY_COMMANDS.contains(&name),
            wire: wire::to_request_wire(&Value::Object(m)),
            id: None,
            deadline: self.new_deadline(),
        };
        self.queue.push_back(Work::Forward(req));
        self.pump();
        self.update_timer();
    }

    /// Completed QMP requests: the `return` value or the error.
    pub fn take_qmp_replies(&mut self) -> Vec<(u64, Result<RawJson, AgentError>)> {
        std::mem::take(&mut self.qmp_replies)
    }

    /// A VM event (`SHUTDOWN`, `RESET`, ...): completes an in-flight command
    /// without success reply.
    pub fn vm_event(&mut self, name: &str) {
        if !COMPLETING_EVENTS.contains(&name) {
            return;
        }
        if self.in_flight.as_ref().is_some_and(|f| f.req.no_reply) {
            if let Some(f) = self.in_flight.take() {
                log::debug!("guest agent command completed by the {name} event");
                self.complete(f.req, Ok(json!({})));
                self.resync();
            }
        }
        self.pump();
        self.update_timer();
    }

    // ---- requests ---------------------------------------------------------

    /// Sends the next request if the channel is free; delivers local replies.
    pub(crate) fn pump(&mut self) {
        while self.in_flight.is_none() {
            match self.queue.front() {
                None => break,
                Some(Work::Forward(_)) if self.channel != Channel::Ready => break,
                Some(_) => {}
            }
            match self.queue.pop_front() {
                Some(Work::Local { client, bytes }) => self.client_output(client, &bytes, true),
                Some(Work::Forward(req)) => {
                    self.to_guest.extend_from_slice(&req.wire);
                    self.in_flight = Some(InFlight { req });
                }
                None => break,
            }
        }
    }

    pub(crate) fn fail_queued(&mut self, desc: &str) {
        while let Some(w) = self.queue.pop_front() {
            match w {
                Work::Forward(req) => self.complete(req, Err(AgentError::generic(desc))),
                Work::Local { client, bytes } => self.client_output(client, &bytes, true),
            }
        }
    }

    /// Completes a request with a result made by the proxy.
    pub(crate) fn complete(&mut self, req: Request, result: Result<Value, AgentError>) {
        match req.owner {
            Owner::Qmp(token) => self.qmp_replies.push((token, result.map(RawJson::from))),
            Owner::Client(c) => {
                let bytes = wire::to_wire(&wire::reply(&result, req.id.as_ref()));
                self.client_output(c, &bytes, true);
            }
        }
    }

    /// Delivers the agent's reply `msg`: its `return` text to a QMP caller, or
    /// its bytes as they came (plus the "\n" that ended them, and the 0xFF
    /// before them if there was one) to a socket client.
    pub(crate) fn deliver_agent_reply(
        &mut self,
        req: Request,
        msg: &[u8],
        env: &wire::Envelope,
        sentinel: bool,
    ) {
        match req.owner {
            Owner::Qmp(token) => self.qmp_replies.push((token, env.result())),
            Owner::Client(c) => {
                let lead: &[u8] = if sentinel { &[SENTINEL] } else { &[] };
                self.client_output_parts(c, &[lead, msg, b"\n"], true);
            }
        }
    }

    // ---- time -------------------------------------------------------------

    /// The deadline of a request submitted now.
    pub(crate) fn new_deadline(&self) -> Instant {
        // The timeout is at most `MAX_TIMEOUT`, so this cannot overflow.
        self.clock.now() + self.timeout
    }

    /// The next time something times out: the request in flight, the oldest
    /// queued request (the queue is in submission order, so its first request
    /// has the earliest deadline), or the sync in progress.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let in_flight = self.in_flight.as_ref().map(|f| f.req.deadline);
        let queued = self.queue.iter().find_map(|w| match w {
            Work::Forward(r) => Some(r.deadline),
            Work::Local { .. } => None,
        });
        let sync = match self.channel {
            Channel::Syncing { deadline, .. } if self.in_flight.is_none() => Some(deadline),
            _ => None,
        };
        [in_flight, queued, sync].into_iter().flatten().min()
    }

    /// Fails every queued request whose deadline has passed (in queue order, so
    /// each client's replies keep their order).
    fn expire_queued(&mut self, now: Instant, desc: &str) {
        let mut kept = std::collections::VecDeque::with_capacity(self.queue.len());
        while let Some(w) = self.queue.pop_front() {
            match w {
                Work::Forward(req) if req.deadline <= now => {
                    self.complete(req, Err(AgentError::generic(desc)));
                }
                w => kept.push_back(w),
            }
        }
        self.queue = kept;
    }

    /// Arms the timer for the next deadline, lazily: a timer already armed at
    /// or before it stays, and one no longer needed is not disarmed. Firing
    /// early costs one [`Self::on_timer`] that finds nothing due and arms the
    /// timer again; in exchange a request answered within its timeout costs
    /// no `timerfd_settime` at all (before: one to arm, one to disarm).
    pub(crate) fn update_timer(&mut self) {
        let Some(want) = self.deadline() else {
            return;
        };
        if self.timer_deadline.is_some_and(|armed| armed <= want) {
            return;
        }
        let left = want.saturating_duration_since(self.clock.now());
        if let Err(e) = self.timer.reset(left.max(Duration::from_nanos(1)), None) {
            log::error!("guest agent timer: {e}");
        }
        #[cfg(test)]
        {
            self.timer_arms += 1;
        }
        self.timer_deadline = Some(want);
    }

    pub(crate) fn on_timer(&mut self) {
        let mut count = [0u8; 8];
        // Drain the expiration count; the timer is non-blocking, so a stale event
        // (the timer was re-armed meanwhile) reads nothing.
        // SAFETY: reads at most 8 bytes into `count`, which we own.
        let _ = unsafe {
            libc::read(
                self.timer.as_raw_fd(),
                count.as_mut_ptr().cast(),
                count.len(),
            )
        };
        self.timer_deadline = None;
        let now = self.clock.now();
        let what = seconds(self.timeout);
        let desc = format!("Guest agent did not respond within {what} seconds");
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| f.req.deadline <= now)
        {
            if let Some(f) = self.in_flight.take() {
                log::warn!("the guest agent did not answer within {what} s: resynchronising");
                self.timeouts += 1;
                self.complete(f.req, Err(AgentError::generic(&desc)));
                self.resync();
            }
        } else if let Channel::Syncing { deadline, .. } = self.channel {
            if deadline <= now && self.in_flight.is_none() {
                log::warn!("the guest agent did not answer guest-sync-delimited within {what} s");
                self.resync();
            }
        }
        self.expire_queued(now, &desc);
        self.pump();
        self.update_timer();
    }
}
