use super::testing::{socket_path, until_quiet, EventLoop, TestClient};
use super::*;
use event_manager::MutEventSubscriber;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

struct TestSession {
    reading: bool,
}

impl Session for TestSession {
    fn wants_input(&self) -> bool {
        self.reading
    }
}

const NAMES: Names = Names {
    client: "test client",
    accept_error: "test accept",
    label: |id, peer| format!("test client {id} ({peer})"),
};

/// A server that only collects what its clients send.
struct Server {
    listener: Listener,
    set: ConnSet<TestSession>,
    got: Vec<(u64, Framed)>,
}

impl MutEventSubscriber for Server {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new_raw(self.listener.fd(), EventSet::IN))
            .unwrap();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.fd() {
            self.set
                .accept(&self.listener, ops, |_| TestSession { reading: true });
        } else if let Some(id) = self.set.event(&events, ops) {
            let mut items = Vec::new();
            if let Some(c) = self.set.get_mut(id) {
                c.conn.read_framed(&mut items);
            }
            self.got.extend(items.into_iter().map(|i| (id, i)));
        }
        self.set.flush(ops);
    }
}

struct Harness {
    lp: EventLoop<Server>,
    path: PathBuf,
}

impl Harness {
    fn new(tag: &str, max_message: usize, max_output: usize) -> Self {
        let path = socket_path("conn-set", tag);
        let l = Listener::unix(&path).unwrap();
        Self::with_listener(l, path, max_message, max_output)
    }

    fn with_listener(
        listener: Listener,
        path: PathBuf,
        max_message: usize,
        max_output: usize,
    ) -> Self {
        let lp = EventLoop::new(Server {
            listener,
            set: ConnSet::new(NAMES, max_message, max_output),
            got: Vec::new(),
        });
        Harness { lp, path }
    }

    /// Runs the loop until it goes quiet.
    fn pump(&mut self) {
        until_quiet(2, || self.lp.run(2));
    }

    fn flush(&mut self) {
        self.lp.with_ops(|s, ops| s.set.flush(ops));
    }

    fn set(&self) -> std::cell::RefMut<'_, ConnSet<TestSession>> {
        std::cell::RefMut::map(self.lp.server.borrow_mut(), |s| &mut s.set)
    }

    /// Connects; returns the client and its id.
    fn connect(&mut self) -> (TestClient, u64) {
        let c = TestClient::connect(&self.path);
        self.pump();
        let id = self.set().iter().last().unwrap().conn.id();
        (c, id)
    }

    /// What arrived, per client.
    fn got(&self) -> BTreeMap<u64, Vec<Framed>> {
        let mut m = BTreeMap::<u64, Vec<Framed>>::new();
        for (id, item) in &self.lp.server.borrow().got {
            m.entry(*id).or_default().push(item.clone());
        }
        m
    }

    fn with_conn<R>(&self, id: u64, f: impl FnOnce(&mut Conn) -> R) -> R {
        f(&mut self.set().get_mut(id).unwrap().conn)
    }
}

fn v(x: serde_json::Value) -> Framed {
    Framed::Value(x)
}

#[test]
fn ids_are_unique_and_input_is_framed_per_connection() {
    let mut h = Harness::new("ids", 1 << 20, 1 << 20);
    let (mut a, ia) = h.connect();
    let (mut b, ib) = h.connect();
    assert_ne!(ia, ib);
    a.send(b"{\"a\": 1}{\"a\":");
    b.send(b"{\"b\": 1}");
    h.pump();
    a.send(b" 2}");
    h.pump();
    let got = h.got();
    assert_eq!(got[&ia], [v(json!({"a": 1})), v(json!({"a": 2}))]);
    assert_eq!(got[&ib], [v(json!({"b": 1}))]);
    // A new connection never gets an earlier one's id.
    drop(a);
    h.pump();
    assert!(h.set().get(ia).is_none(), "EOF drops it");
    let (_c, ic) = h.connect();
    assert!(ic > ib);
    assert_eq!(h.set().len(), 2);
}

#[test]
fn an_event_for_an_earlier_connection_on_the_descriptor_is_ignored() {
    let mut h = Harness::new("stale", 1 << 20, 1 << 20);
    let (mut a, ia) = h.connect();
    a.send(b"[1]");
    let fd = h.with_conn(ia, |c| c.fd());
    h.lp.with_ops(|s, ops| {
        // Same descriptor, another connection's tag: not for this one.
        let stale = Events::with_data_raw(fd, (ia as u32).wrapping_add(1), EventSet::IN);
        assert_eq!(s.set.event(&stale, ops), None);
        let current = Events::with_data_raw(fd, ia as u32, EventSet::IN);
        assert_eq!(s.set.event(&current, ops), Some(ia));
        // A hang-up while not reading marks it dead; a stale one does not.
        s.set.get_mut(ia).unwrap().state.reading = false;
        s.set.flush(ops);
        let hup = |tag| Events::with_data_raw(fd, tag, EventSet::HANG_UP);
        assert_eq!(s.set.event(&hup(ia as u32 + 1), ops), None);
        assert!(!s.set.get(ia).unwrap().conn.is_dead());
        assert_eq!(s.set.event(&hup(ia as u32), ops), None);
        assert!(s.set.get(ia).unwrap().conn.is_dead());
        s.set.flush(ops);
        assert!(s.set.is_empty());
    });
}

#[test]
fn interest_follows_pending_output_and_back_pressure() {
    let mut h = Harness::new("interest", 1 << 20, 64 << 20);
    let (mut a, ia) = h.connect();
    assert_eq!(h.with_conn(ia, |c| c.interest()), EventSet::IN);
    // More than the socket takes: the rest waits for OUT.
    let big = vec![b'x'; 8 << 20];
    h.with_conn(ia, |c| {
        c.queue(&big);
        c.write_out();
    });
    h.flush();
    assert!(h.with_conn(ia, |c| c.pending_output()) > 0);
    assert_eq!(
        h.with_conn(ia, |c| c.interest()),
        EventSet::IN | EventSet::OUT
    );
    // Back-pressure: not reading.
    h.set().get_mut(ia).unwrap().state.reading = false;
    h.flush();
    assert_eq!(h.with_conn(ia, |c| c.interest()), EventSet::OUT);
    // The client reads everything; OUT events move the rest.
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0;
    while read < big.len() {
        h.pump();
        read += a.r.read(&mut buf).unwrap();
    }
    h.pump();
    assert_eq!(h.with_conn(ia, |c| c.interest()), EventSet::empty());
    h.set().get_mut(ia).unwrap().state.reading = true;
    h.flush();
    assert_eq!(h.with_conn(ia, |c| c.interest()), EventSet::IN);
}

#[test]
fn limits_close_only_the_offending_connection() {
    let mut h = Harness::new("limits", 64, 1000);
    let (mut a, ia) = h.connect();
    let (mut b, ib) = h.connect();
    let (_c, ic) = h.connect();
    // Too much unread output.
    h.with_conn(ia, |c| {
        c.queue(&[b'x'; 600]);
        c.queue(&[b'x'; 600]);
        assert!(c.is_dead());
        assert_eq!(c.pending_output(), 0);
        c.queue(b"more");
        assert_eq!(c.pending_output(), 0, "nothing queued for a dead one");
    });
    // An oversized message: what came before it is kept.
    b.send(b"{\"ok\": 1}[\"");
    b.send([b'y'; 100]);
    h.pump();
    assert!(h.set().get(ia).is_none());
    assert!(h.set().get(ib).is_none());
    assert!(h.set().get(ic).is_some());
    assert_eq!(h.got()[&ib], [v(json!({"ok": 1}))]);
    let mut rest = Vec::new();
    assert_eq!(a.r.read_to_end(&mut rest).unwrap(), 0, "EOF for a");
    assert!(b.r.read_to_end(&mut rest).is_ok());
}

#[test]
fn write_to_a_gone_peer_closes() {
    let mut h = Harness::new("epipe", 1 << 20, 1 << 20);
    let (a, ia) = h.connect();
    drop(a);
    h.with_conn(ia, |c| {
        c.queue(b"hello");
        c.write_out();
        assert!(c.is_dead(), "EPIPE");
    });
    h.flush();
    assert!(h.set().is_empty());
}

#[test]
fn graceful_close_delivers_everything_then_eof() {
    let listener = Listener::tcp("127.0.0.1:0").unwrap();
    let Listener::Tcp(t) = &listener else {
        unreachable!()
    };
    let addr = t.local_addr().unwrap();
    let mut h = Harness::with_listener(listener, PathBuf::new(), 1 << 20, 1 << 20);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.pump();
    let id = h.set().iter().next().unwrap().conn.id();
    assert!(h.with_conn(id, |c| c.label().starts_with("test client 1 (127.0.0.1:")));
    // Input the server never reads, and a reply it has not written yet.
    s.write_all(&[b' '; 1000]).unwrap();
    let reply: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    h.with_conn(id, |c| c.queue(&reply));
    h.set().flush_before_exit(Duration::from_secs(5));
    assert!(h.with_conn(id, |c| c.is_dead() && c.pending_output() == 0));
    drop(h);
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("EOF, not a reset");
    assert!(got == reply, "all {} bytes, got {}", reply.len(), got.len());
}
