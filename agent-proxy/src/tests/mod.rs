//! Unit tests: a stand-in for qemu-ga, the proxy alone ([`channel`]) and with the
//! event loop and real sockets ([`sockets`]).

use super::*;
use serde_json::{json, Value};
use std::time::Instant;

mod channel;
mod sockets;

use crate::fake_agent::FakeAgent;

/// The value of a QMP-side result.
fn value(r: &qmp::protocol::RawJson) -> Value {
    serde_json::from_slice(r.as_bytes()).expect("valid JSON")
}

/// A QMP-side success carrying `v`.
fn ok(v: Value) -> Result<qmp::protocol::RawJson, AgentError> {
    Ok(v.into())
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

/// Allocation accounting for the current thread (the test binary's allocator):
/// what the proxy allocates while handling some input.
mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn track(delta: isize) {
        // `try_with`: the thread-locals may be gone while a thread exits.
        let _ = LIVE.try_with(|live| {
            let v = live.get() + delta;
            live.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    // SAFETY: every call is forwarded to the system allocator with the same
    // arguments; the bookkeeping only touches thread-local counters.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller's contract for `alloc` is passed on unchanged.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                track(layout.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` was allocated by `System` with `layout` (see `alloc`).
            unsafe { System.dealloc(ptr, layout) };
            track(-(layout.size() as isize));
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
            // SAFETY: as for `dealloc`; `new` is the caller's valid new size.
            let p = unsafe { System.realloc(ptr, layout, new) };
            if !p.is_null() {
                // The old block lives on until the copy is done: count both.
                track(new as isize);
                track(-(layout.size() as isize));
            }
            p
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Starts a measurement: the peak is reset to what is live now.
    pub fn start() -> isize {
        let live = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(live));
        live
    }

    /// Most bytes live on this thread since `start`, beyond what was live then.
    pub fn peak_since(start: isize) -> usize {
        (PEAK.with(Cell::get) - start).max(0) as usize
    }
}
