use super::*;
use crate::conn::testing::{
    check_owner_only_socket, socket_path, until_quiet, EventLoop, TestClient,
};
use crate::protocol::{CommandSpec, RawJson, Request};
use serde_json::json;
use std::cell::RefCell;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::rc::Rc;

const FAKE_COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "query-status",
        args: &[],
    },
    CommandSpec {
        name: "stop",
        args: &[],
    },
    CommandSpec {
        name: "query-kvm",
        args: &[],
    },
];

#[derive(Default)]
struct Fake {
    running: bool,
    deferred: Vec<String>,
}

impl Handler for Fake {
    fn commands(&self) -> &[CommandSpec] {
        FAKE_COMMANDS
    }
    fn passes_through(&self, name: &str) -> bool {
        name.starts_with("guest-")
    }
    fn execute(&mut self, req: &Request, events: &mut Vec<Value>) -> Reply {
        if req.name.starts_with("guest-") {
            self.deferred.push(req.name.clone());
            return Reply::Later(self.deferred.len() as u64);
        }
        Reply::Now(self.run_now(req, events))
    }
}

impl Fake {
    fn run_now(&mut self, req: &Request, events: &mut Vec<Value>) -> Result<Value, QmpError> {
        match req.name.as_str() {
            "stop" => {
                if self.running {
                    self.running = false;
                    events.push(protocol::event("STOP", None));
                }
                Ok(json!({}))
            }
            "query-kvm" => Ok(json!({"enabled": true, "present": true})),
            _ => Ok(
                json!({"status": if self.running {"running"} else {"paused"},
                           "singlestep": false, "running": self.running}),
            ),
        }
    }
}

struct Harness {
    lp: EventLoop<QmpServer>,
    server: Rc<RefCell<QmpServer>>,
    handler: Fake,
    path: PathBuf,
}

impl Harness {
    fn new(tag: &str) -> Self {
        let path = socket_path("qmp-test", tag);
        let lp = EventLoop::new(
            QmpServer::bind(
                &[Endpoint::Unix(path.clone())],
                protocol::greeting(&protocol::version_info(0, 1, 0, "minivmm")),
            )
            .unwrap(),
        );
        Harness {
            server: lp.server.clone(),
            lp,
            handler: Fake {
                running: true,
                deferred: Vec::new(),
            },
            path,
        }
    }

    /// Runs the loop, then dispatches and flushes as the VMM does, until it
    /// goes quiet.
    fn pump(&mut self) {
        let Harness { lp, handler, .. } = self;
        until_quiet(2, || {
            let n = lp.run(2);
            lp.with_ops(|s, ops| {
                s.dispatch(handler);
                s.flush(ops);
            });
            n
        });
    }

    /// Connects and reads the greeting.
    fn connect(&mut self) -> TestClient {
        let mut c = TestClient::connect(&self.path);
        self.pump();
        let g = c.line();
        assert!(g.starts_with("{\"QMP\": {\"version\": {\"qemu\": "), "{g}");
        c
    }
}

trait Lines {
    /// A reply or event, without its CRLF (which must be there).
    fn line(&mut self) -> String;
}

impl Lines for TestClient {
    fn line(&mut self) -> String {
        let l = String::from_utf8(self.read_line()).unwrap();
        assert!(l.ends_with("\r\n"), "line ends in CRLF: {l:?}");
        l.trim_end().to_string()
    }
}

#[test]
fn transcript_errors_and_ids() {
    let mut h = Harness::new("errors");
    let mut c = h.connect();
    let cases: &[(&str, &str)] = &[
        (
            "{\"execute\":\"query-status\"}",
            r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
        ),
        (
            "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}",
            r#"{"return": {}}"#,
        ),
        (
            "{\"execute\":\"qmp_capabilities\"}",
            r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#,
        ),
        (
            "{\"execute\":\"query-status\",\"id\":{\"a\":[1,2]}}",
            r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": {"a": [1, 2]}}"#,
        ),
        (
            "{\"execute\":\"nonexistent-cmd\"}",
            r#"{"error": {"class": "CommandNotFound", "desc": "The command nonexistent-cmd has not been found"}}"#,
        ),
        (
            "{\"execute\":\"stop\",\"arguments\":{\"bogus\":1}}",
            r#"{"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}"#,
        ),
        (
            "{\"execute\":42}",
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#,
        ),
        (
            "{\"arguments\":{}}",
            r#"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
        ),
        (
            "[1,2,3]",
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
        ),
        (
            "\"just a string\"",
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
        ),
        (
            "{bad json}",
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'bad'"}}"#,
        ),
        (
            "{\"exec-oob\":\"query-status\",\"id\":1}",
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "The command query-status does not support OOB"}}"#,
        ),
        (
            "{\"execute\":\"nope\",\"id\":\"i\"}",
            r#"{"id": "i", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
        ),
    ];
    for (input, expected) in cases {
        c.send(input);
        c.send("\n");
        h.pump();
        assert_eq!(&c.line(), expected, "for input {input}");
    }
}

#[test]
fn deferred_replies_keep_each_clients_order() {
    let mut h = Harness::new("deferred");
    let mut a = h.connect();
    let mut b = h.connect();
    for c in [&mut a, &mut b] {
        c.send("{\"execute\":\"qmp_capabilities\"}");
        h.pump();
        assert_eq!(c.line(), r#"{"return": {}}"#);
    }
    // a waits for the guest; its next command waits behind it, b is served.
    a.send("{\"execute\":\"guest-ping\",\"id\":\"p\"}{\"execute\":\"query-kvm\",\"id\":\"k\"}");
    h.pump();
    b.send("{\"execute\":\"query-kvm\"}");
    h.pump();
    assert_eq!(
        b.line(),
        r#"{"return": {"enabled": true, "present": true}}"#
    );
    assert_eq!(h.handler.deferred, vec!["guest-ping"]);
    assert!(h.server.borrow_mut().complete(1, Ok(json!({}))));
    h.pump();
    assert_eq!(a.line(), r#"{"return": {}, "id": "p"}"#);
    assert_eq!(
        a.line(),
        r#"{"return": {"enabled": true, "present": true}, "id": "k"}"#
    );
    assert!(
        !h.server.borrow_mut().complete(1, Ok(json!({}))),
        "already delivered"
    );
    // Errors and unknown tokens.
    a.send("{\"execute\":\"guest-info\"}");
    h.pump();
    h.server.borrow_mut().complete(
        2,
        Err::<RawJson, _>(QmpError::generic("Guest agent is not connected")),
    );
    h.pump();
    assert_eq!(
        a.line(),
        r#"{"error": {"class": "GenericError", "desc": "Guest agent is not connected"}}"#
    );
    assert!(!h.server.borrow_mut().complete(99, Ok(json!({}))));
}

#[test]
fn split_and_joined_commands() {
    let mut h = Harness::new("split");
    let mut c = h.connect();
    c.send("{\"execute\":\"qmp_capabilities\"}");
    h.pump();
    assert_eq!(c.line(), r#"{"return": {}}"#);
    c.send("{\"execute\": \"query-kvm\"");
    h.pump();
    c.send("\n}");
    h.pump();
    assert_eq!(
        c.line(),
        r#"{"return": {"enabled": true, "present": true}}"#
    );
    c.send("{\"execute\":\"query-kvm\"}{\"execute\":\"query-status\"}");
    h.pump();
    assert_eq!(
        c.line(),
        r#"{"return": {"enabled": true, "present": true}}"#
    );
    assert!(c.line().starts_with(r#"{"return": {"status": "running""#));
}

#[test]
fn events_go_to_every_negotiated_client_before_the_reply() {
    let mut h = Harness::new("events");
    let mut a = h.connect();
    let mut b = h.connect();
    let mut late = h.connect(); // never negotiates: gets no events
    for c in [&mut a, &mut b] {
        c.send("{\"execute\":\"qmp_capabilities\"}");
        h.pump();
        assert_eq!(c.line(), r#"{"return": {}}"#);
    }
    a.send("{\"execute\":\"stop\",\"id\":5}");
    h.pump();
    let ev = a.line();
    assert!(ev.contains(r#""event": "STOP""#), "{ev}");
    assert_eq!(a.line(), r#"{"return": {}, "id": 5}"#);
    assert!(b.line().contains(r#""event": "STOP""#));
    // A second stop changes nothing: no event.
    a.send("{\"execute\":\"stop\"}");
    h.pump();
    assert_eq!(a.line(), r#"{"return": {}}"#);
    late.send("{\"execute\":\"query-kvm\"}");
    h.pump();
    assert!(late.line().contains("Expecting capabilities negotiation"));
}

#[test]
fn oversized_input_disconnects_only_that_client() {
    let mut h = Harness::new("big");
    let mut good = h.connect();
    let mut bad = h.connect();
    bad.send("{\"execute\":\"");
    bad.flood(b'a', 2 * DEFAULT_MAX_MESSAGE, || h.pump());
    h.pump();
    assert_eq!(h.server.borrow().client_count(), 1, "bad client dropped");
    good.send("{\"execute\":\"qmp_capabilities\"}");
    h.pump();
    assert_eq!(good.line(), r#"{"return": {}}"#);
}

#[test]
fn client_that_never_reads_is_dropped_without_blocking() {
    let mut h = Harness::new("noread");
    let mut c = h.connect();
    c.send("{\"execute\":\"qmp_capabilities\"}");
    h.pump();
    // Ask for far more output than the server will hold, never reading it.
    let req = "{\"execute\":\"query-status\"}".repeat(1000);
    c.w.set_nonblocking(true).unwrap();
    for _ in 0..400 {
        if c.w.write_all(req.as_bytes()).is_err() {
            break;
        }
        h.pump();
        if h.server.borrow().client_count() == 0 {
            break;
        }
    }
    assert_eq!(h.server.borrow().client_count(), 0);
}

#[test]
fn socket_is_owner_only_and_live_socket_is_refused() {
    let h = Harness::new("perm");
    let p = h.path.clone();
    check_owner_only_socket(
        &p,
        h,
        || QmpServer::bind(&[Endpoint::Unix(p.clone())], json!({})),
        |e| matches!(e, ServerError::InUse(_)),
    );
}

#[test]
fn disconnect_mid_command_is_harmless() {
    let mut h = Harness::new("hangup");
    let mut c = h.connect();
    c.send("{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-sta");
    drop(c);
    h.pump();
    assert_eq!(h.server.borrow().client_count(), 0);
    let mut c2 = h.connect();
    c2.send("{\"execute\":\"qmp_capabilities\"}");
    h.pump();
    assert_eq!(c2.line(), r#"{"return": {}}"#);
}

/// Server-side descriptors of the connected clients.
fn client_fds(s: &QmpServer) -> Vec<RawFd> {
    s.clients.fds()
}

#[test]
fn a_new_client_on_a_recycled_fd_gets_nothing_of_the_old_one() {
    let mut h = Harness::new("recycle");
    // Other tests open descriptors in parallel: retry until the new client
    // really gets the old one's descriptor number.
    for _ in 0..50 {
        let mut a = h.connect();
        a.send("{\"execute\":\"qmp_capabilities\"}");
        h.pump();
        assert_eq!(a.line(), r#"{"return": {}}"#);
        let old = client_fds(&h.server.borrow());
        // a waits for the guest; its later commands are held back.
        a.send(concat!(
            "{\"execute\":\"guest-ping\",\"id\":\"a-ping\"}",
            "{\"execute\":\"qmp_capabilities\",\"id\":\"a-caps\"}",
            "{\"execute\":\"query-kvm\",\"id\":\"a-kvm\"}"
        ));
        h.pump();
        // a hangs up and b connects in the same event-loop round.
        drop(a);
        let mut b = TestClient::connect(&h.path);
        h.pump();
        assert!(b.line().starts_with("{\"QMP\": "));
        let recycled = client_fds(&h.server.borrow()) == old;
        // b has not negotiated: nothing of a's reaches it or counts for it.
        b.send("{\"execute\":\"query-kvm\",\"id\":\"b\"}");
        h.pump();
        assert_eq!(
            b.line(),
            r#"{"id": "b", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
        );
        drop(b);
        h.pump();
        if recycled {
            return;
        }
    }
    eprintln!("*** SKIPPED a_new_client_on_a_recycled_fd_gets_nothing_of_the_old_one: the descriptor was never reused");
}

#[test]
fn half_closed_client_gets_every_reply_then_eof() {
    let mut h = Harness::new("halfclose");
    let mut c = h.connect();
    // As `printf '...' | socat - UNIX-CONNECT:...` does: send, then shut down
    // the write side, then read until EOF.
    c.send(concat!(
        "{\"execute\":\"qmp_capabilities\"}\n",
        "{\"execute\":\"guest-ping\",\"id\":1}\n",
        "{\"execute\":\"query-kvm\",\"id\":2}\n"
    ));
    c.w.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    assert_eq!(c.line(), r#"{"return": {}}"#);
    // The deferred reply is still owed: the connection stays.
    assert_eq!(h.server.borrow().client_count(), 1);
    assert!(h.server.borrow_mut().complete(1, Ok(json!({}))));
    h.pump();
    assert_eq!(c.line(), r#"{"return": {}, "id": 1}"#);
    assert_eq!(
        c.line(),
        r#"{"return": {"enabled": true, "present": true}, "id": 2}"#
    );
    // Then EOF: nothing more is owed.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut c.r, &mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(h.server.borrow().client_count(), 0);
}

#[test]
fn a_client_with_queued_commands_is_not_read_until_they_are_done() {
    use std::io::{BufRead, ErrorKind};
    const N: usize = 5000;
    let mut h = Harness::new("backpressure");
    let mut c = h.connect();
    c.send("{\"execute\":\"qmp_capabilities\"}");
    h.pump();
    assert_eq!(c.line(), r#"{"return": {}}"#);
    // One command waits for the guest; more are sent behind it, one write
    // each, without blocking, until the socket is full.
    c.send("{\"execute\":\"guest-ping\",\"id\":0}");
    h.pump();
    c.w.set_nonblocking(true).unwrap();
    let cmd = |i: usize| format!("{{\"execute\":\"query-kvm\",\"id\":{i}}}");
    let mut next = 1;
    let mut full = false;
    while next <= N && !full {
        match c.w.write(cmd(next).as_bytes()) {
            Ok(_) => next += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => full = true,
            Err(e) => panic!("{e}"),
        }
        if next % 100 == 0 {
            h.pump();
        }
    }
    // The server read the first batch and then stopped reading: the socket
    // filled up instead of the server's memory.
    assert!(
        full,
        "the server kept reading ({} queued)",
        h.server.borrow().inbox.len()
    );
    let queued = h.server.borrow().inbox.len();
    assert!(queued <= 100, "{queued} queued");
    // Once the deferred reply arrives everything is answered, in order.
    assert!(h.server.borrow_mut().complete(1, Ok(json!({}))));
    let mut expect = 0;
    let mut line = String::new();
    while expect <= N {
        h.pump();
        while next <= N {
            match c.w.write(cmd(next).as_bytes()) {
                Ok(_) => next += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        loop {
            match c.r.read_line(&mut line) {
                Ok(0) => panic!("EOF at reply {expect}"),
                Ok(_) if line.ends_with('\n') => {
                    assert!(
                        line.ends_with(&format!("\"id\": {expect}}}\r\n")),
                        "{expect}: {line}"
                    );
                    expect += 1;
                    line.clear();
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
}

#[test]
fn clients_over_the_cap_are_closed_at_once() {
    let mut h = Harness::new("cap");
    h.server.borrow_mut().clients.set_max_per_listener(3);
    let mut kept: Vec<TestClient> = (0..3).map(|_| h.connect()).collect();
    assert_eq!(h.server.borrow().client_count(), 3);
    // The fourth gets no greeting: EOF at once.
    let mut extra = TestClient::connect(&h.path);
    h.pump();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut extra.r, &mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(h.server.borrow().client_count(), 3);
    // The others still work; once one leaves, a new client is served.
    kept[0].send("{\"execute\":\"qmp_capabilities\"}");
    h.pump();
    assert_eq!(kept[0].line(), r#"{"return": {}}"#);
    drop(kept.pop());
    h.pump();
    let mut again = h.connect();
    again.send("{\"execute\":\"qmp_capabilities\"}");
    h.pump();
    assert_eq!(again.line(), r#"{"return": {}}"#);
}
