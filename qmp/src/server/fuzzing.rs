//! The QMP dispatch harness: clients on a real socket doing what the input
//! says, against a server with a fake handler. See [`dispatch`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use super::{Endpoint, Handler, QmpServer, Reply, MAX_QUEUED};
use crate::conn::testing::EventLoop;
use crate::conn::READ_CHUNK;
use crate::protocol::{self, CommandSpec, QmpError, Request};

const COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "query-status",
        args: &[],
    },
    CommandSpec {
        name: "stop",
        args: &[],
    },
    CommandSpec {
        name: "cont",
        args: &[],
    },
];

/// A handler that answers at once, except `guest-*` commands, which it defers
/// (their tokens wait in `deferred` until the harness completes them).
struct Fake {
    running: bool,
    next_token: u64,
    deferred: VecDeque<u64>,
}

impl Handler for Fake {
    fn commands(&self) -> &[CommandSpec] {
        COMMANDS
    }
    fn passes_through(&self, name: &str) -> bool {
        name.starts_with("guest-")
    }
    fn execute(&mut self, req: &Request, events: &mut Vec<Value>) -> Reply {
        match req.name.as_str() {
            "stop" | "cont" => {
                let run = req.name == "cont";
                if self.running != run {
                    self.running = run;
                    events.push(protocol::event(if run { "RESUME" } else { "STOP" }, None));
                }
                Reply::Now(Ok(json!({})))
            }
            "query-status" => Reply::Now(Ok(json!({"running": self.running}))),
            _ => {
                self.next_token += 1;
                self.deferred.push_back(self.next_token);
                Reply::Later(self.next_token)
            }
        }
    }
}

/// One test client and what it expects.
struct Client {
    sock: UnixStream,
    /// Unparsed input.
    rx: Vec<u8>,
    /// Ids of the commands it sent, in order.
    sent: Vec<String>,
    /// Ids of the replies it got, in order.
    got: Vec<String>,
    /// Prefix of every id it sends ("#c<slot>g<generation>s").
    prefix: String,
    seq: u64,
    /// Id of its `qmp_capabilities`, once sent.
    caps_id: Option<String>,
    negotiated: bool,
    greeted: bool,
    write_closed: bool,
    eof: bool,
}

impl Client {
    fn send(&mut self, bytes: &[u8], h: &mut Harness) {
        let mut rest = bytes;
        let mut stuck = 0;
        while !rest.is_empty() {
            match self.sock.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && stuck < 100 => {
                    stuck += 1;
                    h.complete_all();
                    h.pump();
                }
                Err(e) => panic!("the server stopped reading a client: {e}"),
            }
        }
    }

    fn command(&mut self, name: &str, args: Option<Value>, h: &mut Harness) {
        self.seq += 1;
        let id = format!("{}{}", self.prefix, self.seq);
        let mut msg = json!({"execute": name, "id": id});
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        if name == "qmp_capabilities" && self.caps_id.is_none() {
            self.caps_id = Some(id.clone());
        }
        self.sent.push(id);
        self.send(&protocol::to_wire(&msg), h);
    }

    /// Reads what is there and checks every line.
    fn receive(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    assert!(!self.eof, "data after EOF");
                    self.rx.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading a client: {e}"),
            }
        }
        while let Some(end) = self.rx.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = self.rx.drain(..end + 2).collect();
            let v: Value = serde_json::from_slice(&line).expect("every line is JSON");
            self.check(&v);
        }
    }

    fn check(&mut self, v: &Value) {
        if !self.greeted {
            assert!(v.get("QMP").is_some(), "the greeting comes first: {v}");
            self.greeted = true;
            return;
        }
        if v.get("event").is_some() {
            assert!(self.negotiated, "an event before negotiation: {v}");
            return;
        }
        assert!(
            v.get("return").is_some() != v.get("error").is_some(),
            "a reply has return or error: {v}"
        );
        let Some(id) = v.get("id").and_then(Value::as_str) else {
            return;
        };
        if !id.starts_with('#') {
            return;
        }
        assert!(
            id.starts_with(&self.prefix),
            "a reply for another client: {id} reached {}",
            self.prefix
        );
        if Some(id) == self.caps_id.as_deref() && v.get("return").is_some() {
            self.negotiated = true;
        }
        self.got.push(id.to_string());
        assert!(
            self.sent.starts_with(&self.got),
            "replies out of order or not asked for: sent {:?}, got {:?}",
            self.sent,
            self.got
        );
    }
}

struct Harness {
    lp: EventLoop<QmpServer>,
    handler: Fake,
}

impl Harness {
    /// Runs the loop, dispatch and flush as the VMM does until nothing moves;
    /// checks the inbox after each dispatch.
    fn pump(&mut self) {
        let mut idle = 0;
        while idle < 2 {
            let n = self.lp.run(0);
            let handler = &mut self.handler;
            let ran = self.lp.with_ops(|s, ops| {
                let ran = s.dispatch(handler);
                s.flush(ops);
                ran
            });
            self.check_inbox();
            idle = if n == 0 && !ran { idle + 1 } else { 0 };
        }
    }

    /// After dispatch only input of clients waiting for a deferred reply is
    /// left, each client's share within its bound, and the counts agree.
    fn check_inbox(&self) {
        let s = self.lp.server.borrow();
        let mut total = 0;
        for c in s.clients.iter() {
            let mine = s.inbox.iter().filter(|(id, _)| *id == c.conn.id()).count();
            assert_eq!(
                mine,
                c.state.queued,
                "queued count of client {}",
                c.conn.id()
            );
            assert!(
                mine == 0 || c.state.waiting.is_some(),
                "input left undispatched for a client that waits for nothing"
            );
            assert!(
                mine <= MAX_QUEUED + READ_CHUNK,
                "a client's inbox over its bound"
            );
            total += mine;
        }
        assert!(total <= s.inbox.len());
    }

    fn complete_one(&mut self, ok: bool) {
        if let Some(token) = self.handler.deferred.pop_front() {
            let r = if ok {
                Ok(json!({}))
            } else {
                Err(QmpError::generic("failed"))
            };
            self.lp.server.borrow_mut().complete(token, r);
        }
    }

    fn complete_all(&mut self) {
        while !self.handler.deferred.is_empty() {
            self.complete_one(true);
        }
    }
}

static NEXT_PATH: AtomicU64 = AtomicU64::new(0);

fn socket_path() -> PathBuf {
    let n = NEXT_PATH.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("qmp-fuzz-{}-{n}.sock", std::process::id()))
}

/// Garbage from the input, unable to forge a harness id (no `#`, no escapes)
/// or to negotiate behind the harness's back (no `_`), then 0xFF and a
/// newline, which end whatever it left unfinished.
fn garbage(bytes: &[u8]) -> Vec<u8> {
    let mut g: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|&b| !matches!(b, b'#' | b'\\' | b'_'))
        .collect();
    g.extend_from_slice(b"\xff\n");
    g
}

/// QMP dispatch with a fake handler and up to four clients connecting,
/// sending commands (deferred ones too) and garbage, half-closing and
/// closing as the input says. Properties: every command of a client still
/// connected gets exactly one reply, in order, and never another client's;
/// events only reach negotiated clients; a half-closed client gets all its
/// replies and then EOF; after each dispatch the inbox holds only what must
/// wait (for a deferred reply), within each client's bound.
pub fn dispatch(data: &[u8]) {
    let path = socket_path();
    let server = QmpServer::bind(
        &[Endpoint::Unix(path.clone())],
        protocol::greeting(&protocol::version_info(7, 2, 0, "fuzz")),
    )
    .expect("the server binds");
    let mut h = Harness {
        lp: EventLoop::new(server),
        handler: Fake {
            running: true,
            next_token: 0,
            deferred: VecDeque::new(),
        },
    };
    let mut slots: [Option<Client>; 4] = Default::default();
    let mut generation = 0u64;
    let mut input = data.iter().copied();
    while let Some(op) = input.next() {
        let slot = usize::from(op >> 5) % slots.len();
        match op & 0x1f {
            0..=2 => {
                if slots[slot].is_none() {
                    generation += 1;
                    let sock = UnixStream::connect(&path).expect("the server listens");
                    sock.set_nonblocking(true).expect("non-blocking");
                    slots[slot] = Some(Client {
                        sock,
                        rx: Vec::new(),
                        sent: Vec::new(),
                        got: Vec::new(),
                        prefix: format!("#c{slot}g{generation}s"),
                        seq: 0,
                        caps_id: None,
                        negotiated: false,
                        greeted: false,
                        write_closed: false,
                        eof: false,
                    });
                }
            }
            3..=13 => {
                let (name, args) = match op & 0x1f {
                    3 | 4 => ("qmp_capabilities", None),
                    5 | 6 => ("query-status", None),
                    7 => ("stop", None),
                    8 => ("cont", None),
                    9 | 10 => ("guest-ping", None),
                    11 => ("query-status", Some(json!({"bogus": 1}))),
                    12 => ("no-such-command", None),
                    _ => ("qmp_capabilities", Some(json!({"enable": ["oob"]}))),
                };
                if let Some(c) = slots[slot].as_mut().filter(|c| !c.write_closed) {
                    c.command(name, args, &mut h);
                }
            }
            14 | 15 => {
                let len = usize::from(input.next().unwrap_or(0));
                let bytes: Vec<u8> = input.by_ref().take(len).collect();
                if let Some(c) = slots[slot].as_mut().filter(|c| !c.write_closed) {
                    c.send(&garbage(&bytes), &mut h);
                }
            }
            16 => {
                if let Some(c) = slots[slot].as_mut() {
                    c.sock.shutdown(Shutdown::Write).expect("shutdown");
                    c.write_closed = true;
                }
            }
            17 => slots[slot] = None,
            18..=21 => h.complete_one(op & 1 == 0),
            22..=25 => {
                for c in slots.iter_mut().flatten() {
                    c.receive();
                }
            }
            _ => h.pump(),
        }
        if op & 0x1f < 22 {
            h.pump();
        }
    }
    // Everything completes: every client still there gets all its replies.
    loop {
        h.complete_all();
        h.pump();
        if h.handler.deferred.is_empty() {
            break;
        }
    }
    for c in slots.iter_mut().flatten() {
        c.receive();
        assert_eq!(
            c.sent, c.got,
            "every command answered exactly once, in order"
        );
        assert!(!c.eof || c.write_closed, "the server closed a client");
        if c.write_closed {
            assert!(c.eof, "a half-closed client is closed once answered");
        }
    }
    drop(h);
    assert!(!path.exists(), "the socket is removed");
}
