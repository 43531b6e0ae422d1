//! Guest output to the host (the serial console's stdout or file), off the vcpu
//! threads and bounded.
//!
//! A vcpu writing to the UART must never wait for the host: a pipe nobody reads,
//! a slow terminal or a full disk would stop the guest, and a vcpu stuck in
//! `write(2)` cannot be paused or stopped. So [`GuestOutput`] is a bounded
//! buffer ([`OUTPUT_BUFFER`] bytes): the device appends to it and returns at
//! once; a writer thread of its own moves it to the sink with blocking writes.
//!
//! Nothing is lost silently:
//! * bytes that do not fit (the sink is slower than the guest) are dropped and
//!   counted;
//! * a write that fails (EPIPE, ENOSPC, EAGAIN on a non-blocking descriptor...)
//!   drops that chunk, counts it, logs once for the episode, and the writer tries
//!   again with later output: a transient error never silences all later output;
//! * at exit, [`GuestOutput::finish`] waits a bounded time for the buffer to
//!   drain and reports on stderr what could not be written.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of guest output held for a slow sink before further output is dropped.
pub const OUTPUT_BUFFER: usize = 1 << 20;

/// Largest write handed to the sink at once.
const WRITE_CHUNK: usize = 64 * 1024;

/// Pause after a failed write before the next attempt (EAGAIN, ENOSPC...).
const RETRY_PAUSE: Duration = Duration::from_millis(20);

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    cap: usize,
    /// Bytes dropped: no room, or the sink failed.
    dropped: u64,
    /// The writer holds a chunk it has not finished writing.
    writing: usize,
    /// The writer must stop once the buffer is empty.
    closing: bool,
    /// The last write failed (for logging once per episode).
    failing: bool,
    /// Signalled after each chunk written, for a producer waiting for room.
    progress_fd: Option<vmm_sys_util::eventfd::EventFd>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when data arrives or the output is closing.
    data: Condvar,
    /// Signalled when the writer finished a chunk.
    progress: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`GuestOutput::finish`] could not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Undelivered {
    /// Bytes dropped while running (no room, or the sink failed).
    pub dropped: u64,
    /// Bytes still buffered when the wait ended.
    pub unwritten: u64,
}

impl Undelivered {
    /// Total bytes lost.
    pub fn total(&self) -> u64 {
        self.dropped + self.unwritten
    }
}

/// A cloneable handle to the bounded guest output; every clone appends to the
/// same buffer. See the module documentation.
#[derive(Clone)]
pub struct GuestOutput {
    shared: Arc<Shared>,
}

impl GuestOutput {
    /// Starts the writer thread for `sink`, holding at most `cap` bytes.
    pub fn new(sink: Box<dyn Write + Send>, cap: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                cap,
                ..State::default()
            }),
            data: Condvar::new(),
            progress: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || writer(&s, sink))?;
        Ok(Self { shared })
    }

    /// Output that goes nowhere (no thread).
    pub fn sink() -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            data: Condvar::new(),
            progress: Condvar::new(),
        });
        shared.lock().closing = true;
        Self { shared }
    }

    /// Appends what fits; the rest is counted as dropped. Never blocks on the
    /// sink.
    pub fn push(&self, bytes: &[u8]) {
        let mut s = self.shared.lock();
        if s.closing && s.cap == 0 {
            return; // `sink()`: discarded by design, not lost.
        }
        let room = s.cap.saturating_sub(s.buf.len());
        let n = room.min(bytes.len());
        s.buf.extend(&bytes[..n]);
        s.dropped += (bytes.len() - n) as u64;
        drop(s);
        if n > 0 {
            self.shared.data.notify_one();
        }
    }

    /// Bytes that can be pushed now without dropping any.
    pub fn room(&self) -> usize {
        let s = self.shared.lock();
        s.cap.saturating_sub(s.buf.len())
    }

    /// Signals `evt` each time the writer finished a chunk, so that a producer
    /// that waits for [`Self::room`] (instead of dropping) can wake up.
    pub fn notify_progress(&self, evt: vmm_sys_util::eventfd::EventFd) {
        self.shared.lock().progress_fd = Some(evt);
    }

    /// Waits until everything pushed so far is written or `deadline` passes.
    /// Returns whether it was all written.
    pub fn drain(&self, deadline: Instant) -> bool {
        let mut s = self.shared.lock();
        while !s.buf.is_empty() || s.writing > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .shared
                .progress
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits at most until `deadline` for the output to drain, stops the
    /// writer, and says what was lost. The writer thread, if it is blocked in a
    /// write, is left behind (it ends with the process).
    pub fn finish(&self, deadline: Instant) -> Undelivered {
        self.drain(deadline);
        let mut s = self.shared.lock();
        s.closing = true;
        let unwritten = (s.buf.len() + s.writing) as u64;
        s.buf.clear();
        let r = Undelivered {
            dropped: s.dropped,
            unwritten,
        };
        drop(s);
        self.shared.data.notify_all();
        r
    }
}

impl Write for GuestOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }
    /// Does not wait for the sink (see [`GuestOutput::drain`]).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread: moves chunks from the buffer to the sink.
fn writer(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    loop {
        {
            let mut s = shared.lock();
            while s.buf.is_empty() && !s.closing {
                s = shared.data.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.buf.is_empty() {
                return; // closing and drained
            }
            let n = s.buf.len().min(WRITE_CHUNK);
            chunk.clear();
            chunk.extend(s.buf.drain(..n));
            s.writing = n;
        }
        let result = write_chunk(&mut *sink, &chunk);
        let mut s = shared.lock();
        s.writing = 0;
        match result {
            Ok(()) => {
                if s.failing {
                    s.failing = false;
                    log::info!("console output: writing again");
                }
            }
            Err(e) => {
                s.dropped += chunk.len() as u64;
                if !s.failing {
                    s.failing = true;
                    log::warn!(
                        "console output: write failed ({e}); guest output is dropped (and counted) until writing works again"
                    );
                }
            }
        }
        let failed = s.failing;
        if let Some(fd) = &s.progress_fd {
            let _ = fd.write(1);
        }
        drop(s);
        shared.progress.notify_all();
        if failed {
            std::thread::sleep(RETRY_PAUSE);
        }
    }
}

/// Writes all of `chunk`, retrying after EINTR and waiting out EAGAIN (a
/// non-blocking descriptor) for a while.
fn write_chunk(sink: &mut dyn Write, mut chunk: &[u8]) -> io::Result<()> {
    let mut stalls = 0;
    while !chunk.is_empty() {
        match sink.write(chunk) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                chunk = &chunk[n..];
                stalls = 0;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && stalls < 50 => {
                stalls += 1;
                std::thread::sleep(RETRY_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
    sink.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that blocks until told to go on, then records.
    struct Gate {
        go: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<u8>>>,
        fail_first: usize,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.go.recv().map_err(|_| io::Error::other("closed"))?;
            if self.fail_first > 0 {
                self.fail_first -= 1;
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn gated(
        cap: usize,
        fail_first: usize,
    ) -> (GuestOutput, mpsc::Sender<()>, Arc<Mutex<Vec<u8>>>) {
        let (tx, rx) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Gate {
            go: rx,
            got: got.clone(),
            fail_first,
        };
        (GuestOutput::new(Box::new(sink), cap).unwrap(), tx, got)
    }

    #[test]
    fn a_stuck_sink_never_blocks_the_writer_of_guest_output() {
        let (out, tx, got) = gated(1000, 0);
        // The sink does not move: pushes return at once, what does not fit is
        // counted.
        for _ in 0..100 {
            out.push(&[b'x'; 100]);
        }
        assert!(!out.drain(Instant::now() + Duration::from_millis(50)));
        let lost = out.finish(Instant::now());
        assert_eq!(lost.total(), 10_000 - got.lock().unwrap().len() as u64);
        // At most the buffer (1000) plus the chunk the writer thread took
        // before the sink stuck (at most a buffer's worth) were kept.
        assert!(lost.dropped >= 8_000, "{lost:?}");
        assert!(lost.unwritten <= 2_000, "{lost:?}");
        drop(tx);
    }

    #[test]
    fn a_producer_waiting_for_room_loses_nothing() {
        use vmm_sys_util::eventfd::EventFd;
        let (out, tx, got) = gated(1000, 0);
        let evt = EventFd::new(0).unwrap();
        out.notify_progress(evt.try_clone().unwrap());
        std::thread::spawn(move || while tx.send(()).is_ok() {});
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        for c in data.chunks(300) {
            while out.room() < c.len() {
                // Blocks until the writer finished a chunk.
                evt.read().unwrap();
            }
            out.push(c);
        }
        assert!(out.drain(Instant::now() + Duration::from_secs(10)));
        assert_eq!(*got.lock().unwrap(), data);
        assert_eq!(out.finish(Instant::now()).total(), 0);
    }

    #[test]
    fn everything_arrives_in_order_when_the_sink_keeps_up() {
        let (out, tx, got) = gated(1 << 20, 0);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for c in data.chunks(777) {
            out.push(c);
        }
        std::thread::spawn(move || while tx.send(()).is_ok() {});
        assert!(out.drain(Instant::now() + Duration::from_secs(10)));
        assert_eq!(*got.lock().unwrap(), data);
        assert_eq!(out.finish(Instant::now()).total(), 0);
    }

    #[test]
    fn a_transient_error_loses_only_what_was_being_written() {
        let (out, tx, got) = gated(1 << 20, 1);
        std::thread::spawn(move || while tx.send(()).is_ok() {});
        out.push(b"lost"); // the sink answers ENOSPC to this one
        assert!(out.drain(Instant::now() + Duration::from_secs(10)));
        assert!(got.lock().unwrap().is_empty());
        // Later output goes through: the error did not silence the console.
        out.push(b"kept");
        assert!(out.drain(Instant::now() + Duration::from_secs(10)));
        assert_eq!(*got.lock().unwrap(), b"kept");
        let lost = out.finish(Instant::now());
        assert_eq!(
            lost,
            Undelivered {
                dropped: 4,
                unwritten: 0
            }
        );
    }

    #[test]
    fn sink_discards_without_counting() {
        let out = GuestOutput::sink();
        out.push(b"anything");
        assert!(out.drain(Instant::now()));
        assert_eq!(out.finish(Instant::now()).total(), 0);
    }
}
