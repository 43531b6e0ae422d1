//! The property harness of the agent proxy: the body of the `agent_proxy`
//! cargo-fuzz target in `fuzz/` and of a stable property test. Built with the
//! `fuzzing` feature (and for tests). See [`agent_proxy`].

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qmp::conn::testing::EventLoop;
use serde_json::{json, Value};

use crate::fake_agent::FakeAgent;
use crate::requests::Work;
use crate::{AgentProxy, Clock, ProxyConfig, MAX_OUTSTANDING_PER_CLIENT};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A socket client and what it expects.
struct Client {
    sock: UnixStream,
    rx: Vec<u8>,
    /// Ids of its requests, in order, with their submission times.
    sent: Vec<(String, Instant)>,
    /// Replies it got.
    replies: usize,
    /// For an untimed client: the requests up to this one were answered.
    matched: usize,
    prefix: String,
    seq: u64,
    /// Sent garbage (whose local replies count against its outstanding limit
    /// and delay its requests): its timing is not checked.
    untimed: bool,
    write_closed: bool,
    eof: bool,
}

impl Client {
    fn outstanding(&self) -> usize {
        self.sent.len().saturating_sub(self.replies)
    }

    fn send(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.sock.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) => panic!("a client's request could not be sent: {e}"),
            }
        }
    }

    /// Reads what is there; checks that its replies come in order. A reply
    /// the agent made carries the request's id, except when arbitrary guest
    /// bytes answered it: so for a client that sent only requests, reply k
    /// answers request k and carries its id if it carries one of ours.
    fn receive(&mut self) {
        let mut buf = [0u8; 8192];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading a client: {e}"),
            }
        }
        while let Some(end) = self.rx.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.rx.drain(..=end).collect();
            self.replies += 1;
            let text = line.strip_prefix(b"\xff").unwrap_or(&line);
            let Ok(v) = serde_json::from_slice::<Value>(text) else {
                assert!(self.untimed, "a reply that is not JSON: {line:?}");
                continue;
            };
            let Some(id) = v
                .get("id")
                .and_then(Value::as_str)
                .filter(|i| i.starts_with('#'))
            else {
                continue;
            };
            assert!(id.starts_with(&self.prefix), "{id} reached {}", self.prefix);
            let at = self.sent.iter().position(|(i, _)| i == id);
            let at = at.unwrap_or_else(|| panic!("a reply to {id}, never sent"));
            if self.untimed {
                assert!(at >= self.matched, "{id} answered twice or out of order");
                self.matched = at + 1;
            } else {
                assert_eq!(at + 1, self.replies, "{id} answered out of order");
            }
        }
    }
}

struct Harness {
    lp: EventLoop<AgentProxy>,
    clock: Rc<Cell<Instant>>,
    agent: FakeAgent,
    port_open: bool,
    slots: [Option<Client>; 3],
    generation: u64,
    /// QMP tokens not answered yet, with their submission times.
    qmp_pending: BTreeMap<u64, Instant>,
    qmp_answered: HashSet<u64>,
    next_token: u64,
    /// Bytes given to the proxy so far, from any side.
    fed: usize,
    /// Something other than the agent may have ended the request in flight
    /// since the agent last read (see [`Self::exchange`]).
    disturbed: bool,
}

impl Harness {
    fn now(&self) -> Instant {
        self.clock.get()
    }

    /// Runs the loop and flushes as the VMM does until nothing moves, then
    /// collects replies and checks what can be checked at any time.
    fn pump(&mut self) {
        let mut idle = 0;
        while idle < 2 {
            let n = self.lp.run(0);
            self.lp.with_ops(|p, ops| p.flush(ops));
            idle = if n == 0 { idle + 1 } else { 0 };
        }
        for c in self.slots.iter_mut().flatten() {
            c.receive();
        }
        let replies = self.lp.server.borrow_mut().take_qmp_replies();
        for (token, _) in replies {
            assert!(
                self.qmp_pending.remove(&token).is_some() && self.qmp_answered.insert(token),
                "QMP token {token} answered twice or never asked"
            );
        }
        self.check_bounds();
    }

    /// At most one request in flight (the structure holds one; nothing more
    /// was written to the agent than one message at a time, see
    /// [`Self::exchange`]); what the proxy holds is bounded by what it was fed.
    fn check_bounds(&self) {
        let p = self.lp.server.borrow();
        let queued: usize = p
            .queue
            .iter()
            .map(|w| match w {
                Work::Forward(r) => r.wire.len(),
                Work::Local { bytes, .. } => bytes.len(),
            })
            .sum();
        let clients: usize = p.clients.iter().map(|c| c.conn.pending_output()).sum();
        let held = queued + p.to_guest.len() + p.reader_pending() + clients;
        assert!(
            held <= 4 * self.fed + 4096,
            "the proxy holds {held} bytes after being fed {}",
            self.fed
        );
    }

    /// Moves bytes between the proxy and the fake agent until neither has
    /// more; the proxy never writes a second request before the first is done
    /// or abandoned.
    fn exchange(&mut self) {
        if !self.port_open {
            return;
        }
        for _ in 0..64 {
            let to = self.lp.server.borrow_mut().take_to_guest();
            // Since the agent last read, the request in flight may have
            // ended without it: answered by stray guest bytes, abandoned at
            // its timeout (then a resync follows: 0xFF, guest-sync-delimited)
            // or by a port or VM event. Otherwise every message after the
            // first in one batch must be a resync.
            let disturbed = std::mem::take(&mut self.disturbed);
            for m in to.split_inclusive(|&b| b == b'\n').skip(1) {
                if disturbed {
                    break;
                }
                assert!(
                    m.first() == Some(&0xff),
                    "one request at a time: {:?}",
                    String::from_utf8_lossy(&to)
                );
            }
            self.agent.feed(&to);
            let from = std::mem::take(&mut self.agent.out);
            if to.is_empty() && from.is_empty() {
                break;
            }
            self.fed += from.len();
            self.lp.server.borrow_mut().from_guest(&from);
            self.pump();
        }
    }

    /// Every request whose deadline (submission plus the timeout) has passed
    /// has its answer.
    fn check_latency(&self) {
        let now = self.now();
        for (token, at) in &self.qmp_pending {
            assert!(
                *at + TIMEOUT > now,
                "QMP token {token} unanswered after the timeout"
            );
        }
        for c in self.slots.iter().flatten().filter(|c| !c.untimed) {
            for (id, at) in c.sent.iter().skip(c.replies) {
                assert!(
                    *at + TIMEOUT > now,
                    "request {id} unanswered after the timeout"
                );
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.disturbed = true;
        self.clock.set(self.now() + by);
        self.lp.server.borrow_mut().on_timer();
        self.pump();
        self.check_latency();
    }
}

impl AgentProxy {
    fn reader_pending(&self) -> usize {
        self.reader.pending()
    }
}

static NEXT_PATH: AtomicU64 = AtomicU64::new(0);

fn socket_path() -> PathBuf {
    let n = NEXT_PATH.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("agent-fuzz-{}-{n}.sock", std::process::id()))
}

const REQUESTS: &[&str] = &[
    "guest-ping",
    "guest-get-osinfo",
    "guest-sync-delimited",
    "guest-shutdown",
    "guest-exec-status",
    "guest-no-such",
];

/// The agent proxy with an injectable clock, driven by operations from the
/// input: socket clients connect, send requests and garbage, half-close and
/// close; QMP submits; the fake agent answers, hangs, releases late answers or
/// writes arbitrary bytes; the port opens and closes; VM events come; time
/// passes. Properties: every request is answered exactly once (QMP tokens and
/// the requests of clients still connected, in each client's order), never
/// to another client; at most one message at a time goes to the agent; every
/// request is answered by its submission plus the timeout; what the proxy
/// holds stays within a constant times what it was fed.
pub fn agent_proxy(data: &[u8]) {
    let path = socket_path();
    let mut proxy = AgentProxy::new(ProxyConfig {
        socket: Some(path.clone()),
        timeout: TIMEOUT,
    })
    .expect("the proxy starts");
    let clock = Rc::new(Cell::new(Instant::now()));
    proxy.clock = Clock::Manual(clock.clone());
    let mut h = Harness {
        lp: EventLoop::new(proxy),
        clock,
        agent: FakeAgent::new(),
        port_open: false,
        slots: Default::default(),
        generation: 0,
        qmp_pending: BTreeMap::new(),
        qmp_answered: HashSet::new(),
        next_token: 0,
        fed: 0,
        disturbed: false,
    };
    let mut input = data.iter().copied();
    while let Some(op) = input.next() {
        let arg = usize::from(op >> 4);
        let slot = arg % h.slots.len();
        match op & 0x0f {
            0 if h.slots[slot].is_none() => {
                h.generation += 1;
                let sock = UnixStream::connect(&path).expect("the proxy listens");
                sock.set_nonblocking(true).expect("non-blocking");
                h.slots[slot] = Some(Client {
                    sock,
                    rx: Vec::new(),
                    sent: Vec::new(),
                    replies: 0,
                    matched: 0,
                    prefix: format!("#c{slot}g{}s", h.generation),
                    seq: 0,
                    untimed: false,
                    write_closed: false,
                    eof: false,
                });
            }
            1 | 2 => {
                let now = h.now();
                let name = REQUESTS[arg % REQUESTS.len()];
                if let Some(c) = h.slots[slot]
                    .as_mut()
                    .filter(|c| !c.write_closed && c.outstanding() < MAX_OUTSTANDING_PER_CLIENT - 1)
                {
                    c.seq += 1;
                    let id = format!("{}{}", c.prefix, c.seq);
                    let mut msg = json!({"execute": name, "id": id});
                    if name == "guest-sync-delimited" {
                        msg["arguments"] = json!({"id": c.seq});
                    }
                    let mut bytes = serde_json::to_vec(&msg).expect("JSON");
                    bytes.push(b'\n');
                    h.fed += bytes.len();
                    c.sent.push((id, now));
                    c.send(&bytes);
                }
            }
            3 => {
                let len = input.next().map_or(0, usize::from);
                let mut bytes: Vec<u8> = input
                    .by_ref()
                    .take(len)
                    .filter(|&b| !matches!(b, b'#' | b'\\'))
                    .collect();
                // 0xFF drops whatever partial message the garbage left.
                bytes.push(0xff);
                if let Some(c) = h.slots[slot].as_mut().filter(|c| !c.write_closed) {
                    c.untimed = true;
                    h.fed += bytes.len();
                    c.send(&bytes);
                }
            }
            4 => {
                if let Some(c) = h.slots[slot].as_mut() {
                    c.sock.shutdown(Shutdown::Write).expect("shutdown");
                    c.write_closed = true;
                }
            }
            5 => h.slots[slot] = None,
            6 | 7 => {
                h.next_token += 1;
                let name = REQUESTS[arg % REQUESTS.len()];
                let req = if arg == 15 {
                    json!({"arguments": {}})
                } else {
                    json!({"execute": name})
                };
                h.fed += req.to_string().len();
                h.qmp_pending.insert(h.next_token, h.now());
                h.lp.server.borrow_mut().submit_qmp(h.next_token, req);
            }
            8 | 9 => h.exchange(),
            10 => {
                let len = input.next().map_or(0, usize::from);
                // No `#`: ids of ours come from the requests only. No newline:
                // a reply is passed on as it came, so a multi-line one would
                // read as several.
                let bytes: Vec<u8> = input
                    .by_ref()
                    .take(len)
                    .filter(|&b| !matches!(b, b'#' | b'\\' | b'\n'))
                    .collect();
                if h.port_open {
                    h.disturbed = true;
                    h.fed += bytes.len();
                    h.lp.server.borrow_mut().from_guest(&bytes);
                }
            }
            11 => {
                if arg & 1 == 0 {
                    h.agent.hung = true;
                } else {
                    h.agent.release();
                }
            }
            12 => {
                h.port_open = arg & 1 == 0;
                if !h.port_open {
                    // The agent restarts with the port.
                    h.agent = FakeAgent::new();
                }
                h.disturbed = true;
                h.lp.server.borrow_mut().port_state(h.port_open);
            }
            13 => {
                let event = ["SHUTDOWN", "RESET", "STOP", "SUSPEND"][arg % 4];
                h.disturbed = true;
                h.lp.server.borrow_mut().vm_event(event);
            }
            14 => h.advance(TIMEOUT / 4 * (arg as u32 + 1) / 2),
            _ => {}
        }
        h.pump();
    }
    // The end: the agent answers again, time runs out for whatever waits; all
    // is answered.
    h.agent.release();
    for _ in 0..4 {
        h.exchange();
        h.advance(TIMEOUT);
    }
    h.exchange();
    h.pump();
    assert!(
        h.qmp_pending.is_empty(),
        "QMP requests never answered: {:?}",
        h.qmp_pending
    );
    for c in h.slots.iter_mut().flatten() {
        c.receive();
        if c.untimed {
            assert!(c.replies >= c.sent.len(), "requests never answered");
        } else {
            assert_eq!(
                c.replies,
                c.sent.len(),
                "every request answered exactly once"
            );
        }
        assert!(!c.eof || c.write_closed, "the proxy closed a client");
        if c.write_closed {
            assert!(c.eof, "a half-closed client is closed once answered");
        }
    }
    drop(h);
    assert!(!path.exists(), "the socket is removed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_proxy_properties_hold() {
        qmp::fuzzing::check_corpus_and_random("agent_proxy", 300, agent_proxy);
    }
}
