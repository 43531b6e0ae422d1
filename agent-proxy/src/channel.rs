//! The guest side: the port's state, the agent's output, keeping the channel in
//! sync (see the crate documentation).

use std::time::Instant;

use qmp::stream::{Framed, JsonStreamer};
use serde_json::json;

use crate::wire::{self, SENTINEL};
use crate::{AgentError, AgentProxy, DISAPPEARED, INVALID_REPLY, NOT_CONNECTED};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// The guest has not opened the port.
    Closed,
    /// Waiting for the reply to our `guest-sync-delimited`.
    Syncing { id: i64, deadline: Instant },
    /// In sync.
    Ready,
}

/// Parses the agent's output.
pub(crate) struct AgentReader {
    streamer: JsonStreamer,
    /// Drop everything up to the next 0xFF.
    pub(crate) discarding: bool,
    /// The message being parsed came right after a 0xFF.
    after_sentinel: bool,
    max: usize,
}

impl AgentReader {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            streamer: JsonStreamer::raw(max),
            discarding: false,
            after_sentinel: false,
            max,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.streamer = JsonStreamer::raw(self.max);
        self.after_sentinel = false;
    }

    pub(crate) fn discard(&mut self) {
        self.reset();
        self.discarding = true;
    }

    /// Bytes held for an item not yet complete.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn pending(&self) -> usize {
        self.streamer.pending()
    }
}

/// What an invalid item from the agent was, for the log (not its bytes: they
/// may be megabytes).
fn describe(item: &Framed) -> String {
    match item {
        Framed::Raw(m) => format!("{} bytes that are not a reply", m.len()),
        Framed::Error(e) => e.clone(),
        Framed::Value(_) => "a value".into(),
        Framed::TooLarge => "too large".into(),
    }
}

/// A fresh random id for `guest-sync-delimited` (a positive 31-bit number, like
/// the ones libvirt uses; never the previous one).
fn random_id(previous: i64) -> i64 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf, which we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    let mut v = u32::from_ne_bytes(buf);
    if n != 4 {
        // No entropy yet: fall back to the clock, good enough to tell syncs apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        v = t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(16) ^ std::process::id();
    }
    let mut id = i64::from(v & 0x7fff_ffff);
    if id == previous {
        id = (id + 1) & 0x7fff_ffff;
    }
    id
}

impl AgentProxy {
    /// The guest opened (`true`) or closed (`false`) the port. Opening starts a
    /// sync; closing fails what is queued and in flight.
    pub fn port_state(&mut self, open: bool) {
        match (open, self.channel) {
            (true, Channel::Closed) => {
                log::info!("guest agent port opened");
                self.channel = Channel::Ready;
                self.reader.reset();
                self.resync();
            }
            (false, Channel::Syncing { .. } | Channel::Ready) => {
                log::info!("guest agent port closed");
                self.channel = Channel::Closed;
                self.to_guest.clear();
                self.reader.reset();
                self.reader.discarding = false;
                if let Some(f) = self.in_flight.take() {
                    let r = if f.req.no_reply {
                        Ok(json!({}))
                    } else {
                        Err(AgentError::generic(DISAPPEARED))
                    };
                    self.complete(f.req, r);
                }
                self.fail_queued(NOT_CONNECTED);
            }
            _ => {}
        }
        self.update_timer();
    }

    /// Bytes the agent wrote.
    pub fn from_guest(&mut self, data: &[u8]) {
        if self.channel == Channel::Closed {
            return;
        }
        let mut rest = data;
        while !rest.is_empty() {
            let ff = memchr::memchr(SENTINEL, rest);
            if self.reader.discarding {
                let Some(i) = ff else { break };
                rest = &rest[i + 1..];
                self.reader.discarding = false;
                self.reader.reset();
                self.reader.after_sentinel = true;
                continue;
            }
            let (seg, next) = match ff {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            let mut items = Vec::new();
            self.reader.streamer.feed(seg, &mut items);
            for item in items {
                let sentinel = std::mem::take(&mut self.reader.after_sentinel);
                self.agent_item(item, sentinel);
                if self.reader.discarding || self.channel == Channel::Closed {
                    break;
                }
            }
            match next {
                Some(n) if !self.reader.discarding => {
                    // A 0xFF: the agent's output starts afresh.
                    self.reader.reset();
                    self.reader.after_sentinel = true;
                    rest = n;
                }
                Some(_) => {
                    // Discarding: rescan this segment's end for the 0xFF.
                    rest = &rest[seg.len()..];
                }
                None => break,
            }
        }
        self.pump();
        self.update_timer();
    }

    /// Bytes to deliver to the agent.
    pub fn take_to_guest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_guest)
    }

    pub(crate) fn agent_item(&mut self, item: Framed, sentinel: bool) {
        match self.channel {
            Channel::Closed => {}
            Channel::Syncing { id, .. } => {
                let ours = sentinel
                    && matches!(&item, Framed::Raw(m)
                        if wire::Envelope::parse(m).is_some_and(|e| e.returns_id(id)));
                if ours {
                    log::debug!("guest agent channel in sync (id {id})");
                    self.channel = Channel::Ready;
                } else {
                    // Stale output: skip to the next 0xFF.
                    self.reader.discard();
                }
            }
            Channel::Ready => {
                let Some(f) = self.in_flight.take() else {
                    log_ratelimit::warn_limited!(
                        "unexpected output from the guest agent: resynchronising"
                    );
                    self.resync();
                    return;
                };
                let reply = match &item {
                    Framed::Raw(m) => wire::Envelope::parse(m).map(|e| (m, e)),
                    _ => None,
                };
                if let Some((_, env)) = reply
                    .as_ref()
                    .filter(|(_, e)| e.answers_another(f.req.id.as_ref()))
                {
                    // The late answer to a request that ended without it (its
                    // place was taken by stray output): the answer to the
                    // request in flight is still to come.
                    log_ratelimit::warn_limited!(
                        "a guest agent reply for an earlier request (id {}): dropped",
                        truncate_id(env.id.map_or("", |i| i.get()))
                    );
                    self.in_flight = Some(f);
                    return;
                }
                if let Some((msg, env)) = reply {
                    let parse_error = env.is_parse_error();
                    self.deliver_agent_reply(f.req, msg, &env, sentinel);
                    if parse_error {
                        log_ratelimit::warn_limited!(
                            "the guest agent reported a parse error: resynchronising"
                        );
                        self.resync();
                    }
                    return;
                }
                match item {
                    Framed::TooLarge => {
                        log_ratelimit::warn_limited!(
                            "guest agent reply exceeds {} bytes: resynchronising",
                            self.max_reply
                        );
                        let e = format!(
                            "Guest agent reply exceeds the size limit of {} bytes",
                            self.max_reply
                        );
                        self.complete(f.req, Err(AgentError::generic(e)));
                        self.resync();
                    }
                    other => {
                        log_ratelimit::warn_limited!(
                            "invalid output from the guest agent ({}): resynchronising",
                            describe(&other)
                        );
                        self.complete(f.req, Err(AgentError::generic(INVALID_REPLY)));
                        self.resync();
                    }
                }
            }
        }
    }

    /// Starts a sync (when the port is open): the agent's output is discarded up
    /// to the sentinel-prefixed reply carrying a fresh id.
    pub(crate) fn resync(&mut self) {
        if self.channel == Channel::Closed {
            return;
        }
        let id = random_id(self.last_sync_id);
        self.last_sync_id = id;
        self.to_guest.push(SENTINEL);
        self.to_guest.extend(wire::to_request_wire(&json!({
            "execute": "guest-sync-delimited",
            "arguments": {"id": id},
        })));
        self.channel = Channel::Syncing {
            id,
            deadline: self.clock.now() + self.timeout,
        };
        self.reader.discard();
    }
}

/// An id for a log line: at most 64 bytes of it.
fn truncate_id(id: &str) -> &str {
    let mut end = id.len().min(64);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}
