use super::*;
use event_manager::{EventManager, SubscriberId, SubscriberOps};
use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::rc::Rc;

/// A stand-in for qemu-ga 7.2, byte for byte as in the reference transcript:
/// malformed input (including a 0xFF byte) gets a `JSON parse error` reply,
/// `guest-sync-delimited` replies start with 0xFF, replies end in "\n", and the
/// commands without success response write nothing.
struct FakeAgent {
    input: JsonStreamer,
    out: Vec<u8>,
    /// Requests seen, in order.
    seen: Vec<Value>,
    /// A hung agent: answers are kept in `held` until released.
    hung: bool,
    held: Vec<u8>,
    /// Write two replies for malformed input (qemu-ga does after some garbage).
    double_errors: bool,
}

impl FakeAgent {
    fn new() -> Self {
        Self {
            input: JsonStreamer::default(),
            out: Vec::new(),
            seen: Vec::new(),
            hung: false,
            held: Vec::new(),
            double_errors: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        let mut items = vec![];
        self.input.feed(data, &mut items);
        for item in items {
            let mut out = Vec::new();
            match item {
                Framed::Value(v) => self.execute(v, &mut out),
                Framed::Error(msg) => {
                    let msg = msg.replace("\\uFFFD", "\u{FFFD}");
                    let e = Err(AgentError::generic(msg));
                    out.extend(wire::to_wire(&wire::reply(&e, None)));
                    if self.double_errors {
                        let e = Err(AgentError::generic("JSON parse error, expecting value"));
                        out.extend(wire::to_wire(&wire::reply(&e, None)));
                    }
                }
                Framed::TooLarge => panic!("the proxy sent an oversized request"),
            }
            if self.hung {
                self.held.extend(out);
            } else {
                self.out.extend(out);
            }
        }
    }

    fn release(&mut self) {
        self.hung = false;
        let held = std::mem::take(&mut self.held);
        self.out.extend(held);
    }

    fn execute(&mut self, v: Value, out: &mut Vec<u8>) {
        self.seen.push(v.clone());
        let name = v["execute"].as_str().unwrap_or("").to_string();
        let args = &v["arguments"];
        let r = match name.as_str() {
            "guest-sync-delimited" => {
                out.push(0xff);
                Ok(args["id"].clone())
            }
            "guest-sync" => Ok(args["id"].clone()),
            "guest-ping" => Ok(json!({})),
            "guest-get-osinfo" => Ok(json!({
                "kernel-release": "6.1.0-56-cloud-amd64",
                "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)",
                "machine": "x86_64"
            })),
            "guest-exec-status" => Err(AgentError::generic("Invalid parameter 'pid'")),
            n if NO_REPLY_COMMANDS.contains(&n) => return,
            n => Err(AgentError {
                class: "CommandNotFound".into(),
                desc: format!("The command {n} has not been found"),
            }),
        };
        out.extend(wire::to_wire(&wire::reply(&r, v.get("id"))));
    }

    /// Names of the commands received.
    fn commands(&self) -> Vec<String> {
        self.seen
            .iter()
            .map(|v| v["execute"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

fn proxy(timeout: Duration) -> AgentProxy {
    AgentProxy::new(ProxyConfig {
        socket: None,
        timeout,
    })
    .unwrap()
}

/// Moves bytes both ways until neither side has anything; checks that the proxy
/// never has more than one message on its way to the agent.
fn exchange(p: &mut AgentProxy, a: &mut FakeAgent) -> usize {
    let mut moved = 0;
    loop {
        let to = p.take_to_guest();
        assert!(
            to.iter().filter(|&&b| b == b'\n').count() <= 1,
            "one request at a time: {:?}",
            String::from_utf8_lossy(&to)
        );
        a.feed(&to);
        let from = std::mem::take(&mut a.out);
        if to.is_empty() && from.is_empty() {
            return moved;
        }
        moved += to.len() + from.len();
        p.from_guest(&from);
    }
}

fn open_and_sync(p: &mut AgentProxy, a: &mut FakeAgent) {
    p.port_state(true);
    exchange(p, a);
    assert!(p.is_synced());
}

fn sync_id(bytes: &[u8]) -> i64 {
    assert_eq!(bytes[0], 0xff, "sync starts with the sentinel");
    assert_eq!(*bytes.last().unwrap(), b'\n');
    let v: Value = serde_json::from_slice(&bytes[1..]).unwrap();
    assert_eq!(v["execute"], "guest-sync-delimited");
    v["arguments"]["id"].as_i64().unwrap()
}

#[test]
fn sync_on_open_queues_requests_and_discards_stale_output() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    assert!(!p.is_connected());
    p.port_state(true);
    let sync = p.take_to_guest();
    let id = sync_id(&sync);
    assert!(id > 0);
    p.submit_qmp(1, json!({"execute": "guest-ping"}));
    assert!(p.take_to_guest().is_empty(), "requests wait for the sync");
    // Stale output of an earlier session, including a sentinel reply to some
    // other sync, then what qemu-ga answers to ours.
    p.from_guest(b"{\"return\": {\"stale\": tr");
    p.from_guest(b"ue}}\n{\"return\": 5}\n\xff{\"return\": 1}\n{\"ret");
    a.feed(&sync);
    let answer = std::mem::take(&mut a.out);
    assert!(
        answer.starts_with(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n\xff{\"return\": "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    for b in answer.chunks(1) {
        assert!(p.is_synced() || p.take_to_guest().is_empty());
        p.from_guest(b);
    }
    assert!(p.is_synced());
    assert_eq!(p.take_to_guest(), b"{\"execute\":\"guest-ping\"}\n");
    p.from_guest(b"{\"return\": {}}\n");
    assert_eq!(p.take_qmp_replies(), vec![(1, Ok(json!({})))]);
    assert!(p.take_to_guest().is_empty());
    // Re-opening and a fresh sync use a new id.
    p.port_state(false);
    p.port_state(true);
    assert_ne!(sync_id(&p.take_to_guest()), id);
}

#[test]
fn qmp_routing_one_request_at_a_time() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    open_and_sync(&mut p, &mut a);
    p.submit_qmp(10, json!({"execute": "guest-get-osinfo", "id": "ignored"}));
    p.submit_qmp(
        11,
        json!({"execute": "guest-exec-status", "arguments": {"pid": 1}}),
    );
    p.submit_qmp(12, json!({"execute": "guest-nope"}));
    p.submit_qmp(13, json!({"arguments": {}}));
    // Only the first is on its way.
    assert_eq!(
        p.take_to_guest(),
        b"{\"execute\":\"guest-get-osinfo\"}\n",
        "the QMP id is not forwarded"
    );
    p.from_guest(b"{\"return\": {\"machine\": \"x86_64\"}}\n");
    exchange(&mut p, &mut a);
    let r = p.take_qmp_replies();
    assert_eq!(
        r,
        vec![
            (
                13,
                Err(AgentError::generic("QMP input lacks member 'execute'"))
            ),
            (10, Ok(json!({"machine": "x86_64"}))),
            (11, Err(AgentError::generic("Invalid parameter 'pid'"))),
            (
                12,
                Err(AgentError {
                    class: "CommandNotFound".into(),
                    desc: "The command guest-nope has not been found".into()
                })
            ),
        ]
    );
    assert_eq!(
        a.seen[1..],
        [
            json!({"execute": "guest-exec-status", "arguments": {"pid": 1}}),
            json!({"execute": "guest-nope"})
        ]
    );
    // A QMP guest-sync-delimited works too (the sentinel is not part of the value).
    p.submit_qmp(
        14,
        json!({"execute": "guest-sync-delimited", "arguments": {"id": 77}}),
    );
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(14, Ok(json!(77)))]);
    assert!(p.is_synced());
}

#[test]
fn not_connected_and_port_closing() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    p.submit_qmp(1, json!({"execute": "guest-ping"}));
    assert_eq!(
        p.take_qmp_replies(),
        vec![(1, Err(AgentError::generic("Guest agent is not connected")))]
    );
    assert!(p.take_to_guest().is_empty());
    open_and_sync(&mut p, &mut a);
    a.hung = true;
    p.submit_qmp(2, json!({"execute": "guest-ping"}));
    p.submit_qmp(3, json!({"execute": "guest-ping"}));
    exchange(&mut p, &mut a);
    assert!(p.take_qmp_replies().is_empty());
    p.port_state(false);
    assert_eq!(
        p.take_qmp_replies(),
        vec![
            (
                2,
                Err(AgentError::generic(
                    "Guest agent disappeared while executing command"
                ))
            ),
            (3, Err(AgentError::generic("Guest agent is not connected"))),
        ]
    );
    // Output of the old session is ignored while closed and after re-opening.
    p.from_guest(b"{\"return\": {}}\n");
    a.release();
    p.port_state(true);
    let late = std::mem::take(&mut a.out);
    p.from_guest(&late);
    exchange(&mut p, &mut a);
    assert!(p.is_synced());
    p.submit_qmp(4, json!({"execute": "guest-get-osinfo"}));
    exchange(&mut p, &mut a);
    let r = p.take_qmp_replies();
    assert_eq!(r[0].0, 4);
    assert_eq!(r[0].1.as_ref().unwrap()["machine"], "x86_64");
}

#[test]
fn no_reply_commands_complete_on_vm_event_or_port_close() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    open_and_sync(&mut p, &mut a);
    p.submit_qmp(
        1,
        json!({"execute": "guest-shutdown", "arguments": {"mode": "reboot"}}),
    );
    p.submit_qmp(2, json!({"execute": "guest-ping"}));
    exchange(&mut p, &mut a);
    assert!(p.take_qmp_replies().is_empty());
    p.vm_event("STOP");
    assert!(p.take_qmp_replies().is_empty(), "not a completing event");
    p.vm_event("RESET");
    assert_eq!(p.take_qmp_replies(), vec![(1, Ok(json!({})))]);
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(2, Ok(json!({})))]);
    assert_eq!(
        a.commands(),
        [
            "guest-sync-delimited",
            "guest-shutdown",
            "guest-sync-delimited",
            "guest-ping"
        ],
        "a resync after the event"
    );
    p.submit_qmp(3, json!({"execute": "guest-shutdown"}));
    exchange(&mut p, &mut a);
    p.vm_event("SHUTDOWN");
    assert_eq!(p.take_qmp_replies(), vec![(3, Ok(json!({})))]);
    exchange(&mut p, &mut a);
    p.submit_qmp(4, json!({"execute": "guest-suspend-disk"}));
    exchange(&mut p, &mut a);
    p.port_state(false);
    assert_eq!(p.take_qmp_replies(), vec![(4, Ok(json!({})))]);
}

#[test]
fn garbage_from_the_agent_resyncs() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    a.double_errors = true; // two replies to the sync's 0xFF: still in sync
    open_and_sync(&mut p, &mut a);
    // Output while nothing is in flight.
    p.from_guest(b"}}garbage\x01\n");
    assert!(!p.is_synced());
    p.submit_qmp(1, json!({"execute": "guest-ping"}));
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(1, Ok(json!({})))]);
    // Something that is not a reply while a request is in flight.
    p.submit_qmp(2, json!({"execute": "guest-ping"}));
    p.submit_qmp(3, json!({"execute": "guest-get-osinfo"}));
    assert_eq!(p.take_to_guest(), b"{\"execute\":\"guest-ping\"}\n");
    p.from_guest(b"[1, 2]\n{\"return\": {}}\n");
    assert_eq!(
        p.take_qmp_replies(),
        vec![(
            2,
            Err(AgentError::generic("Guest agent sent an invalid reply"))
        )]
    );
    assert!(!p.is_synced());
    exchange(&mut p, &mut a);
    let r = p.take_qmp_replies();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1.as_ref().unwrap()["machine"], "x86_64");
    // Two replies after malformed input: the first answers, the second must not
    // be taken for the reply to the next request.
    p.submit_qmp(4, json!({"execute": "guest-ping"}));
    p.submit_qmp(5, json!({"execute": "guest-sync", "arguments": {"id": 5}}));
    assert_eq!(p.take_to_guest(), b"{\"execute\":\"guest-ping\"}\n");
    p.from_guest(
        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid keyword 'garbage'\"}}\n",
    );
    p.from_guest(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\n");
    exchange(&mut p, &mut a);
    assert_eq!(
        p.take_qmp_replies(),
        vec![
            (
                4,
                Err(AgentError::generic(
                    "JSON parse error, invalid keyword 'garbage'"
                ))
            ),
            (5, Ok(json!(5))),
        ]
    );
}

#[test]
fn oversized_agent_reply_is_an_error_then_resync() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    p.set_max_reply(64 * 1024);
    open_and_sync(&mut p, &mut a);
    p.submit_qmp(1, json!({"execute": "guest-file-read"}));
    p.submit_qmp(2, json!({"execute": "guest-ping"}));
    assert!(!p.take_to_guest().is_empty());
    p.from_guest(b"{\"return\": {\"count\": 100000, \"buf-b64\": \"");
    let chunk = vec![b'A'; 16 * 1024];
    for _ in 0..8 {
        p.from_guest(&chunk);
    }
    assert_eq!(
        p.take_qmp_replies(),
        vec![(
            1,
            Err(AgentError::generic(
                "Guest agent reply exceeds the size limit of 65536 bytes"
            ))
        )]
    );
    // The rest of the big reply is skipped without being buffered.
    for _ in 0..64 {
        p.from_guest(&chunk);
    }
    p.from_guest(b"\", \"eof\": true}}\n");
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(2, Ok(json!({})))]);
}

#[test]
fn large_reply_within_the_default_limit_passes() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    open_and_sync(&mut p, &mut a);
    p.submit_qmp(1, json!({"execute": "guest-file-read"}));
    p.take_to_guest();
    // qemu-ga caps guest-file-read at 48 MiB of data: 64 MiB of base64.
    let mut payload = "QUJD".repeat(16 << 20);
    let reply =
        wire::to_wire(&json!({"return": {"count": 48 << 20, "buf-b64": payload, "eof": false}}));
    assert!(reply.len() > 64 << 20 && reply.len() < MAX_REPLY);
    for c in reply.chunks(1 << 20) {
        p.from_guest(c);
    }
    let r = p.take_qmp_replies();
    assert_eq!(r.len(), 1);
    let v = r[0].1.as_ref().unwrap();
    assert_eq!(v["buf-b64"].as_str().unwrap().len(), 64 << 20);
    assert_eq!(v["eof"], false);
    drop(r);
    // Over the limit fails, and the channel recovers.
    p.submit_qmp(2, json!({"execute": "guest-file-read"}));
    p.take_to_guest();
    payload = "QUJD".repeat((16 << 20) + (16 << 10) + 1);
    let big = wire::to_wire(&json!({"return": {"count": 0, "buf-b64": payload}}));
    assert!(big.len() > MAX_REPLY);
    for c in big.chunks(1 << 20) {
        p.from_guest(c);
    }
    assert_eq!(
        p.take_qmp_replies(),
        vec![(
            2,
            Err(AgentError::generic(
                "Guest agent reply exceeds the size limit of 67174400 bytes"
            ))
        )]
    );
    p.submit_qmp(3, json!({"execute": "guest-ping"}));
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(3, Ok(json!({})))]);
}

// ---- with the event loop and real sockets ----------------------------------

struct Harness {
    em: EventManager<Box<dyn MutEventSubscriber>>,
    proxy: Rc<RefCell<AgentProxy>>,
    id: SubscriberId,
    agent: FakeAgent,
    path: PathBuf,
}

impl Harness {
    fn new(tag: &str, timeout: Duration) -> Self {
        let path = std::env::temp_dir().join(format!("qga-test-{}-{tag}.sock", std::process::id()));
        let proxy = Rc::new(RefCell::new(
            AgentProxy::new(ProxyConfig {
                socket: Some(path.clone()),
                timeout,
            })
            .unwrap(),
        ));
        let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new().unwrap();
        let id = em.add_subscriber(Box::new(proxy.clone()));
        Harness {
            em,
            proxy,
            id,
            agent: FakeAgent::new(),
            path,
        }
    }

    /// One VMM round: the event loop, then the guest side, then client output.
    fn round(&mut self, ms: i32) -> usize {
        let n = self.em.run_with_timeout(ms).unwrap();
        let moved = exchange(&mut self.proxy.borrow_mut(), &mut self.agent);
        let mut ops = self.em.event_ops(self.id).unwrap();
        self.proxy.borrow_mut().flush(&mut ops);
        n + moved
    }

    /// Runs rounds until things go quiet.
    fn pump(&mut self) {
        let mut idle = 0;
        while idle < 3 {
            idle = if self.round(5) == 0 { idle + 1 } else { 0 };
        }
    }

    fn open(&mut self) {
        self.proxy.borrow_mut().port_state(true);
        self.pump();
        assert!(self.proxy.borrow().is_synced());
    }

    fn connect(&mut self) -> Conn {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        self.pump();
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn clients(&self) -> usize {
        self.proxy.borrow().client_count()
    }
}

struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Conn {
    fn send(&mut self, s: &[u8]) {
        self.w.write_all(s).unwrap();
    }
    /// One reply, raw, including its "\n".
    fn reply(&mut self) -> Vec<u8> {
        let mut l = Vec::new();
        self.r.read_until(b'\n', &mut l).unwrap();
        assert!(l.ends_with(b"\n"), "reply ends in LF: {l:?}");
        l
    }
    fn reply_str(&mut self) -> String {
        String::from_utf8(self.reply()).unwrap()
    }
    fn nothing_pending(&mut self) -> bool {
        self.w.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = matches!(self.r.get_mut().read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            && self.r.buffer().is_empty();
        self.w.set_nonblocking(false).unwrap();
        r
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
        vec![(5, Ok(json!(500)))]
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
    // The agent wakes up: its late reply is discarded, the queued client request
    // goes after the sync.
    h.agent.release();
    h.pump();
    assert_eq!(c.reply_str(), "{\"return\": 2}\n");
    assert!(c.nothing_pending());
    assert_eq!(
        h.agent.commands(),
        [
            "guest-sync-delimited",
            "guest-sync",
            "guest-sync-delimited",
            "guest-sync"
        ]
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
    let chunk = vec![b'A'; 64 * 1024];
    bad.w.set_nonblocking(true).unwrap();
    let mut sent = 0;
    while sent < 2 * MAX_REQUEST {
        match bad.w.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => h.pump(),
            Err(_) => break,
        }
    }
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
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new("perm", DEFAULT_TIMEOUT);
    let mode = std::fs::metadata(&h.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        h.proxy.borrow().socket_filename(),
        Some(format!("unix:{},server=on", h.path.display()))
    );
    let again = AgentProxy::new(ProxyConfig {
        socket: Some(h.path.clone()),
        timeout: DEFAULT_TIMEOUT,
    });
    assert!(matches!(again, Err(ProxyError::InUse(_))));
    let p = h.path.clone();
    drop(h);
    assert!(!p.exists(), "socket removed on drop");
    let stale = UnixListener::bind(&p).unwrap();
    drop(stale);
    assert!(p.exists());
    let p2 = AgentProxy::new(ProxyConfig {
        socket: Some(p.clone()),
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap();
    drop(p2);
    assert!(proxy(DEFAULT_TIMEOUT).socket_filename().is_none());
}
