//! With the event loop and real sockets.

use super::*;
use qmp::conn::testing::{
    check_owner_only_socket, socket_path, until_quiet, EventLoop, TestClient,
};
use std::cell::RefCell;
use std::io::BufRead;
use std::rc::Rc;

struct Harness {
    lp: EventLoop<AgentProxy>,
    proxy: Rc<RefCell<AgentProxy>>,
    agent: FakeAgent,
    path: PathBuf,
}

impl Harness {
    fn new(tag: &str, timeout: Duration) -> Self {
        let path = socket_path("qga-test", tag);
        let lp = EventLoop::new(
            AgentProxy::new(ProxyConfig {
                socket: Some(path.clone()),
                timeout,
            })
            .unwrap(),
        );
        Harness {
            proxy: lp.server.clone(),
            lp,
            agent: FakeAgent::new(),
            path,
        }
    }

    /// One VMM round: the event loop, then the guest side, then client output.
    fn round(&mut self, ms: i32) -> usize {
        let n = self.lp.run(ms);
        let moved = exchange(&mut self.proxy.borrow_mut(), &mut self.agent);
        self.lp.with_ops(|p, ops| p.flush(ops));
        n + moved
    }

    /// Runs rounds until things go quiet.
    fn pump(&mut self) {
        until_quiet(3, || self.round(5));
    }

    fn open(&mut self) {
        self.proxy.borrow_mut().port_state(true);
        self.pump();
        assert!(self.proxy.borrow().is_synced());
    }

    fn connect(&mut self) -> TestClient {
        let c = TestClient::connect(&self.path);
        self.pump();
        c
    }

    fn clients(&self) -> usize {
        self.proxy.borrow().client_count()
    }
}

trait Replies {
    /// One reply, raw, including its "\n".
    fn reply(&mut self) -> Vec<u8>;
    fn reply_str(&mut self) -> String;
}

impl Replies for TestClient {
    fn reply(&mut self) -> Vec<u8> {
        self.read_line()
    }
    fn reply_str(&mut self) -> String {
        String::from_utf8(self.reply()).unwrap()
    }
}

#[test]
fn client_guest_sync_delimited_with_sentinel_like_qemu() {
    let mut h = Harness::new("sentinel", DEFAULT_TIMEOUT);
    h.open();
    let mut c = h.connect();
    c.send(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":1234}}\n");
    h.pump();
    // Exactly the bytes of the qemu-ga transcript.
    assert_eq!(
        c.reply(),
        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n"
    );
    assert_eq!(c.reply(), b"\xff{\"return\": 1234}\n");
    c.send(b"{\"execute\": \"guest-ping\"}\n");
    h.pump();
    assert_eq!(c.reply(), b"{\"return\": {}}\n");
    // Plain guest-sync, with an id member; a partial message dropped by a 0xFF;
    // malformed input answered like qemu-ga.
    c.send(b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":99},\"id\":\"x\"}\n{\"execute\":\"guest-pi\xff{\"execute\": garbage}\n");
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": 99, \"id\": \"x\"}\n");
    assert!(c.reply_str().contains("stray '\\uFFFD'"));
    assert_eq!(
        c.reply_str(),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid keyword 'garbage'\"}}\n"
    );
    assert!(c.nothing_pending());
    // The agent saw only whole, well-formed requests.
    assert_eq!(
        h.agent.commands(),
        [
            "guest-sync-delimited",
            "guest-sync-delimited",
            "guest-ping",
            "guest-sync"
        ]
    );
    assert_eq!(h.agent.seen[1]["arguments"]["id"], 1234);
    assert!(h.proxy.borrow().is_synced());
}

#[test]
fn interleaved_clients_get_their_own_replies() {
    let mut h = Harness::new("interleave", DEFAULT_TIMEOUT);
    h.open();
    let mut a = h.connect();
    let mut b = h.connect();
    let mut c = h.connect();
    let sync = |id: u64| format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}\n");
    // Everything arrives before the loop runs; a QMP request in the middle.
    a.send(format!("{}{}", sync(1), sync(2)).as_bytes());
    b.send(sync(101).as_bytes());
    h.proxy.borrow_mut().submit_qmp(
        5,
        json!({"execute": "guest-sync", "arguments": {"id": 500}}),
    );
    // Split across writes and rounds.
    let s = sync(201);
    c.send(&s.as_bytes()[..10]);
    h.round(5);
    c.send(&s.as_bytes()[10..]);
    a.send(sync(3).as_bytes());
    b.send(b"\xff");
    b.send(sync(102).as_bytes());
    h.pump();
    assert_eq!(a.reply_str(), "{\"return\": 1}\n");
    assert_eq!(a.reply_str(), "{\"return\": 2}\n");
    assert_eq!(a.reply_str(), "{\"return\": 3}\n");
    assert_eq!(b.reply_str(), "{\"return\": 101}\n");
    assert!(b.reply_str().contains("stray"));
    assert_eq!(b.reply_str(), "{\"return\": 102}\n");
    assert_eq!(c.reply_str(), "{\"return\": 201}\n");
    assert_eq!(
        h.proxy.borrow_mut().take_qmp_replies(),
        vec![(5, ok(json!(500)))]
    );
    for x in [&mut a, &mut b, &mut c] {
        assert!(x.nothing_pending());
    }
    // Many pipelined requests: read in bounded batches, all answered in order.
    let many: String = (1000..1100).map(sync).collect();
    a.send(many.as_bytes());
    h.pump();
    for i in 1000..1100 {
        assert_eq!(a.reply_str(), format!("{{\"return\": {i}}}\n"));
    }
}

/// Runs rounds until a QMP caller's reply arrives.
fn await_qmp_reply(h: &mut Harness) -> Vec<(u64, Result<qmp::protocol::RawJson, AgentError>)> {
    let start = Instant::now();
    h.pump();
    loop {
        let replies = h.proxy.borrow_mut().take_qmp_replies();
        if !replies.is_empty() {
            return replies;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no reply");
        // Blocks in epoll until something happens (the timer, at the latest).
        h.round(1000);
        let replies = h.proxy.borrow_mut().take_qmp_replies();
        if !replies.is_empty() {
            return replies;
        }
    }
}

#[test]
fn answered_requests_do_not_rearm_the_timer() {
    let mut h = Harness::new("lazy-timer", Duration::from_secs(30));
    h.open();
    let arms = h.proxy.borrow().timer_arms;
    for i in 0..10 {
        h.proxy
            .borrow_mut()
            .submit_qmp(i, json!({"execute": "guest-sync", "arguments": {"id": i}}));
        let replies = await_qmp_reply(&mut h);
        assert_eq!(replies.len(), 1);
        assert!(replies[0].1.is_ok(), "{replies:?}");
    }
    // The timer armed for the sync's deadline (or the first request's) stays
    // armed: each request would otherwise arm it and disarm it again.
    assert!(
        h.proxy.borrow().timer_arms - arms <= 1,
        "the timer was armed {} times for 10 answered requests",
        h.proxy.borrow().timer_arms - arms
    );
}

#[test]
fn a_timer_left_armed_fires_early_without_failing_a_request() {
    let timeout = Duration::from_millis(300);
    let mut h = Harness::new("early-timer", timeout);
    h.open();
    h.proxy
        .borrow_mut()
        .submit_qmp(1, json!({"execute": "guest-sync", "arguments": {"id": 1}}));
    assert!(await_qmp_reply(&mut h)[0].1.is_ok());
    // The timer is still armed for a deadline before the next request's: let
    // half the timeout pass so that it fires while that request waits.
    std::thread::sleep(timeout / 2);
    h.agent.hung = true;
    let sent = Instant::now();
    h.proxy
        .borrow_mut()
        .submit_qmp(2, json!({"execute": "guest-sync", "arguments": {"id": 2}}));
    let replies = await_qmp_reply(&mut h);
    assert!(
        sent.elapsed() >= timeout,
        "failed after {:?}, before its timeout",
        sent.elapsed()
    );
    assert_eq!(
        replies,
        vec![(
            2,
            Err(AgentError::generic(
                "Guest agent did not respond within 0.3 seconds"
            ))
        )]
    );
}

#[test]
fn timeout_errors_then_resyncs() {
    let mut h = Harness::new("timeout", Duration::from_millis(200));
    h.open();
    let mut c = h.connect();
    h.agent.hung = true;
    h.proxy
        .borrow_mut()
        .submit_qmp(1, json!({"execute": "guest-sync", "arguments": {"id": 1}}));
    c.send(b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":2}}\n");
    let start = Instant::now();
    let mut replies = Vec::new();
    while replies.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "no timeout");
        // Blocks in epoll until the timer fires.
        h.round(1000);
        replies = h.proxy.borrow_mut().take_qmp_replies();
    }
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(
        replies,
        vec![(
            1,
            Err(AgentError::generic(
                "Guest agent did not respond within 0.2 seconds"
            ))
        )]
    );
    assert!(!h.proxy.borrow().is_synced(), "resync after the timeout");
    assert_eq!(
        h.proxy.borrow().timeouts(),
        1,
        "the in-flight timeout is counted"
    );
    // The client's request, queued behind it since the same moment, timed out
    // with it: the timeout runs from submission, not from being sent (its
    // deadline is a moment later: one more round).
    h.round(1000);
    assert_eq!(
        c.reply_str(),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent did not respond within 0.2 seconds\"}}\n"
    );
    // The agent wakes up: its late reply is discarded; the next request works.
    h.agent.release();
    h.pump();
    c.send(b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":2}}\n");
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": 2}\n");
    assert!(c.nothing_pending());
    // The timed-out request, then syncs (one more if the first resync timed out
    // too while the agent was hung), then the new request.
    let cmds = h.agent.commands();
    assert_eq!(
        cmds[..2],
        ["guest-sync-delimited", "guest-sync"],
        "{cmds:?}"
    );
    assert_eq!(
        cmds.last().map(String::as_str),
        Some("guest-sync"),
        "{cmds:?}"
    );
    let middle = &cmds[2..cmds.len() - 1];
    assert!(
        !middle.is_empty() && middle.iter().all(|c| c == "guest-sync-delimited"),
        "{cmds:?}"
    );

    // A sync that gets no answer: queued requests fail after the timeout, and the
    // proxy keeps trying with a new id.
    h.agent.hung = true;
    h.proxy.borrow_mut().port_state(false);
    h.proxy.borrow_mut().port_state(true);
    c.send(b"{\"execute\":\"guest-ping\",\"id\":7}\n");
    let start = Instant::now();
    let mut reply = None;
    while reply.is_none() {
        assert!(start.elapsed() < Duration::from_secs(5), "no timeout");
        h.round(1000);
        c.w.set_nonblocking(true).unwrap();
        let mut l = Vec::new();
        if c.r.read_until(b'\n', &mut l).is_ok() && !l.is_empty() {
            reply = Some(l);
        }
        c.w.set_nonblocking(false).unwrap();
    }
    assert_eq!(
        reply.unwrap(),
        b"{\"id\": 7, \"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent did not respond within 0.2 seconds\"}}\n"
    );
    h.agent.release();
    h.pump();
    assert!(h.proxy.borrow().is_synced());
    c.send(b"{\"execute\":\"guest-ping\"}\n");
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": {}}\n");
}

#[test]
fn every_request_is_answered_within_the_timeout_of_its_submission() {
    // An agent that answers syncs but never a `guest-suspend-ram`: five of them
    // (two from each of two clients, one from QMP), submitted together, all fail
    // one timeout after submission, not one timeout after another.
    let t = Duration::from_millis(1000);
    let mut h = Harness::new("deadlines", t);
    h.open();
    let mut a = h.connect();
    let mut b = h.connect();
    let start = Instant::now();
    let cmd = b"{\"execute\":\"guest-suspend-ram\"}\n";
    a.send(cmd);
    b.send(cmd);
    h.proxy
        .borrow_mut()
        .submit_qmp(9, json!({"execute": "guest-suspend-ram"}));
    a.send(cmd);
    b.send(cmd);
    h.pump();
    let expected = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent did not respond within 1 seconds\"}}\n";
    let mut got = 0;
    let mut qmp = Vec::new();
    for c in [&mut a, &mut b] {
        c.w.set_nonblocking(true).unwrap();
    }
    while got < 4 || qmp.is_empty() {
        assert!(
            start.elapsed() < t + Duration::from_secs(1),
            "not all answered within the timeout + 1 s ({got} of 4 socket replies)"
        );
        h.round(100);
        qmp.extend(h.proxy.borrow_mut().take_qmp_replies());
        for c in [&mut a, &mut b] {
            let mut l = Vec::new();
            while c.r.read_until(b'\n', &mut l).is_ok() && l.ends_with(b"\n") {
                assert_eq!(String::from_utf8_lossy(&l), expected);
                got += 1;
                l.clear();
            }
        }
    }
    assert!(start.elapsed() >= t);
    assert_eq!(got, 4);
    assert_eq!(
        qmp,
        vec![(
            9,
            Err(AgentError::generic(
                "Guest agent did not respond within 1 seconds"
            ))
        )]
    );
}

#[test]
fn half_closed_client_gets_its_replies_then_eof() {
    // `echo '{"execute":"guest-ping"}' | socat - UNIX-CONNECT:...`: the request,
    // then EOF on the client's write side, then the reply, then EOF back.
    let mut h = Harness::new("halfclose", Duration::from_secs(5));
    h.open();
    let mut c = h.connect();
    h.agent.hung = true;
    c.send(
        b"{\"execute\":\"guest-ping\"}\n{\"execute\":\"guest-sync\",\"arguments\":{\"id\":5}}\n",
    );
    c.w.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    assert_eq!(h.clients(), 1, "kept while replies are owed");
    h.agent.release();
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": {}}\n");
    assert_eq!(c.reply_str(), "{\"return\": 5}\n");
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut c.r, &mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(h.clients(), 0);
}

#[test]
fn port_closed_replies_on_the_socket() {
    let mut h = Harness::new("closed", DEFAULT_TIMEOUT);
    let mut c = h.connect();
    c.send(b"{\"execute\":\"guest-ping\",\"id\":3}\n{\"execute\":\"guest-ping\"}\n");
    h.pump();
    assert_eq!(
        c.reply_str(),
        "{\"id\": 3, \"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent is not connected\"}}\n"
    );
    assert_eq!(
        c.reply_str(),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent is not connected\"}}\n"
    );
    h.open();
    h.agent.hung = true;
    c.send(b"{\"execute\":\"guest-ping\"}\n{\"execute\":\"guest-ping\"}\n");
    h.pump();
    h.proxy.borrow_mut().port_state(false);
    h.pump();
    assert!(c
        .reply_str()
        .contains("Guest agent disappeared while executing command"));
    assert!(c.reply_str().contains("Guest agent is not connected"));
}

#[test]
fn no_reply_command_from_a_client_completes_on_port_close() {
    let mut h = Harness::new("noreply", DEFAULT_TIMEOUT);
    h.open();
    let mut c = h.connect();
    c.send(b"{\"execute\":\"guest-suspend-ram\",\"id\":9}\n");
    h.pump();
    assert!(c.nothing_pending());
    h.proxy.borrow_mut().port_state(false);
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": {}, \"id\": 9}\n");
    h.open();
    c.send(b"{\"execute\":\"guest-shutdown\"}\n");
    h.pump();
    h.proxy.borrow_mut().vm_event("SHUTDOWN");
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": {}}\n");
}

#[test]
fn oversized_client_message_disconnects_only_that_client() {
    let mut h = Harness::new("big", DEFAULT_TIMEOUT);
    h.open();
    let mut good = h.connect();
    let mut bad = h.connect();
    assert_eq!(h.clients(), 2);
    bad.send(b"{\"execute\":\"guest-file-write\",\"arguments\":{\"buf-b64\":\"");
    bad.flood(b'A', 2 * MAX_REQUEST, || h.pump());
    h.pump();
    assert_eq!(h.clients(), 1, "bad client dropped");
    assert_eq!(h.agent.commands(), ["guest-sync-delimited"]);
    good.send(b"{\"execute\":\"guest-ping\"}\n");
    h.pump();
    assert_eq!(good.reply_str(), "{\"return\": {}}\n");
}

#[test]
fn client_disconnecting_mid_request_does_not_break_the_channel() {
    let mut h = Harness::new("hangup", DEFAULT_TIMEOUT);
    h.open();
    let mut gone = h.connect();
    h.agent.hung = true;
    gone.send(b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":1}}\n{\"execute\":\"guest-sync\",\"arguments\":{\"id\":2}}\n{\"execute\":\"guest-pi");
    h.pump();
    drop(gone);
    h.pump();
    assert_eq!(h.clients(), 0);
    let mut c = h.connect();
    c.send(b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":3}}\n");
    h.pump();
    h.agent.release();
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": 3}\n");
    assert!(c.nothing_pending());
    assert!(h.proxy.borrow().is_synced());
}

#[test]
fn socket_is_owner_only_stale_replaced_live_refused() {
    let h = Harness::new("perm", DEFAULT_TIMEOUT);
    let p = h.path.clone();
    assert_eq!(
        h.proxy.borrow().socket_filename(),
        Some(format!("unix:{},server=on", p.display()))
    );
    let config = ProxyConfig {
        socket: Some(p.clone()),
        timeout: DEFAULT_TIMEOUT,
    };
    check_owner_only_socket(
        &p,
        h,
        || AgentProxy::new(config.clone()),
        |e| matches!(e, ProxyError::InUse(_)),
    );
    assert!(proxy(DEFAULT_TIMEOUT).socket_filename().is_none());
}

#[test]
fn a_late_reply_for_an_earlier_request_is_dropped_by_its_id() {
    // Found by the agent_proxy fuzz target: stray output answered request
    // "a"; the agent's real answer to "a" then came while "b" was in flight
    // and reached the client as the answer to "b".
    let mut h = Harness::new("late-id", DEFAULT_TIMEOUT);
    h.open();
    let mut c = h.connect();
    h.agent.hung = true;
    c.send(b"{\"execute\":\"guest-ping\",\"id\":\"a\"}\n");
    h.pump();
    h.proxy.borrow_mut().from_guest(b"{\"return\": 7}");
    c.send(b"{\"execute\":\"guest-ping\",\"id\":\"b\"}\n");
    h.pump();
    h.agent.release();
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": 7}\n");
    assert_eq!(c.reply_str(), "{\"return\": {}, \"id\": \"b\"}\n");
    assert!(c.nothing_pending());
    // The channel stays usable.
    c.send(b"{\"execute\":\"guest-ping\",\"id\":3}\n");
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": {}, \"id\": 3}\n");
}

#[test]
fn exit_answers_what_waits_within_the_bound_whatever_clients_do() {
    let mut h = Harness::new("exit", DEFAULT_TIMEOUT);
    h.open();
    // A client that never reads, with ~900 KB of reply pending (more than a
    // socket buffer takes), connected first.
    let mut lazy = h.connect();
    let big = "x".repeat(900_000);
    let msg = format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":\"{big}\"}}}}\n");
    lazy.w.set_nonblocking(true).unwrap();
    let mut rest = msg.as_bytes();
    while !rest.is_empty() {
        match std::io::Write::write(&mut lazy.w, rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                h.round(5);
            }
            Err(e) => panic!("{e}"),
        }
    }
    h.pump();
    assert!(h
        .proxy
        .borrow()
        .clients
        .iter()
        .any(|c| c.conn.pending_output() > 100_000));
    // A reader with one request in flight (the agent hangs) and one queued,
    // and a QMP request queued.
    let mut a = h.connect();
    h.agent.hung = true;
    a.send(b"{\"execute\":\"guest-ping\",\"id\":1}\n{\"execute\":\"guest-ping\",\"id\":2}\n");
    h.pump();
    h.proxy
        .borrow_mut()
        .submit_qmp(7, json!({"execute": "guest-ping"}));
    let start = Instant::now();
    h.proxy
        .borrow_mut()
        .close_for_exit(start + Duration::from_millis(300));
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(
        a.reply_str(),
        "{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent disappeared while executing command\"}}\n"
    );
    assert_eq!(
        a.reply_str(),
        "{\"id\": 2, \"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent is not connected\"}}\n"
    );
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut a.r, &mut rest).expect("EOF after the replies");
    assert!(rest.is_empty());
    assert_eq!(
        h.proxy.borrow_mut().take_qmp_replies(),
        vec![(7, Err(AgentError::generic(NOT_CONNECTED)))]
    );
    drop(lazy);
}
