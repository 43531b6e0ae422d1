//! Non-blocking client connections, shared by the QMP server and the guest-agent
//! proxy: owner-only Unix and TCP [`Listener`]s, a [`Conn`] per client (a unique
//! id, a non-blocking stream, JSON framing of its input, a bounded output buffer,
//! the epoll interest it is registered with) and a [`ConnSet`] that accepts,
//! watches, flushes and drops the connections of one server.
//!
//! The layer has no policy of its own beyond its buffers' bounds: what a message
//! means, when a client may be read (back-pressure: [`Session::wants_input`]) and
//! what it gets is up to the server that owns the [`ConnSet`].
//!
//! Half-close: EOF from a client only ends its input ([`Conn::input_closed`]; it
//! is no longer watched for input). The connection stays until nothing more is
//! owed to it: no reply to come ([`Session::busy`]) and no output unwritten; then
//! [`ConnSet::flush`] closes it. So `echo cmd | socat - UNIX-CONNECT:...` gets
//! its reply, deferred ones included. A peer that closes both directions is
//! dropped at once (a write to it would fail anyway).
//!
//! Back-pressure and a per-client bound on input are [`Session::wants_input`]
//! returning false, which stops reading the client at the next flush; a client
//! is read at most [`READ_CHUNK`] bytes per readiness event, so what one client
//! may have queued is its owner's bound plus one chunk.
//!
//! A connection is known by its id, never by its descriptor number: the kernel
//! gives a closed client's number to the next one, so anything queued for a
//! client is keyed by [`Conn::id`]. Epoll events carry the id's low 32 bits as
//! their data, and an event whose data does not match the connection now on that
//! descriptor is ignored.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};

use crate::stream::{Framed, JsonStreamer};

mod listener;
mod set;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use listener::{bind_owner_only, Listener, UnixBindError};
pub use set::{Client, ConnSet, Names, Session};

/// Most bytes read from a connection per readiness event.
pub const READ_CHUNK: usize = 64 * 1024;

/// A connected stream socket.
#[derive(Debug)]
pub enum Stream {
    /// A Unix stream socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl Stream {
    /// Switches non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// One client connection: a non-blocking stream with framed input and bounded
/// output. Errors never surface as `Err`: a connection that fails, ends or
/// misbehaves is marked dead (with a log line where that is news) and its
/// [`ConnSet`] drops it at the next flush.
pub struct Conn {
    id: u64,
    label: String,
    stream: Stream,
    streamer: JsonStreamer,
    max_message: usize,
    out: VecDeque<u8>,
    max_output: usize,
    /// Interest registered with epoll.
    interest: EventSet,
    /// The peer will send nothing more (EOF, or closed by us).
    input_closed: bool,
    /// The connection must go.
    dead: bool,
}

impl Conn {
    /// A connection over a non-blocking `stream`; `label` names it in log lines
    /// ("QMP client #3 (/run/vm.qmp)").
    pub fn new(
        id: u64,
        label: String,
        stream: Stream,
        max_message: usize,
        max_output: usize,
    ) -> Self {
        Self {
            id,
            label,
            stream,
            streamer: JsonStreamer::new(max_message),
            max_message,
            out: VecDeque::new(),
            max_output,
            interest: EventSet::empty(),
            input_closed: false,
            dead: false,
        }
    }

    /// The connection's id, unique within its [`ConnSet`] for the server's life.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The name used in log lines.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The descriptor number (for epoll only: it is reused after close).
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The epoll data tag of this connection: the id's low 32 bits.
    fn tag(&self) -> u32 {
        self.id as u32
    }

    /// Whether the connection must go (it is dropped at the next flush).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Marks the connection to be dropped at the next flush.
    pub fn close(&mut self) {
        self.dead = true;
    }

    /// Whether the peer has closed its side (nothing more will be read).
    pub fn input_closed(&self) -> bool {
        self.input_closed
    }

    /// Bytes queued and not yet written.
    pub fn pending_output(&self) -> usize {
        self.out.len()
    }

    /// Reads what is available, at most [`READ_CHUNK`] bytes. Returns nothing
    /// when nothing is available now, at EOF and on errors; EOF and errors
    /// close the connection.
    pub fn read_chunk(&mut self) -> Vec<u8> {
        if self.dead || self.input_closed {
            return Vec::new();
        }
        let mut buf = vec![0u8; READ_CHUNK];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                // Half-close: it still gets what it is owed (see the module doc).
                self.input_closed = true;
                buf.clear();
            }
            Ok(n) => buf.truncate(n),
            Err(e) => {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    log::debug!("{}: read: {e}", self.label);
                    self.dead = true;
                }
                buf.clear();
            }
        }
        buf
    }

    /// Frames `bytes` of input, appending the complete messages to `items`. A
    /// message over the size limit closes the connection (with a log line) and
    /// returns true; the items before it are kept, nothing after it is framed.
    pub fn feed(&mut self, bytes: &[u8], items: &mut Vec<Framed>) -> bool {
        if self.dead {
            return false;
        }
        let start = items.len();
        self.streamer.feed(bytes, items);
        if let Some(i) = items[start..].iter().position(|x| *x == Framed::TooLarge) {
            log::warn!(
                "{} sent a message over {} bytes: disconnecting it",
                self.label,
                self.max_message
            );
            items.truncate(start + i);
            self.dead = true;
            return true;
        }
        false
    }

    /// Reads a chunk and frames it ([`Self::read_chunk`], [`Self::feed`]);
    /// true if a message was over the size limit.
    pub fn read_framed(&mut self, items: &mut Vec<Framed>) -> bool {
        let data = self.read_chunk();
        self.feed(&data, items)
    }

    /// Drops the partial message being framed.
    pub fn reset_input(&mut self) {
        self.streamer = JsonStreamer::new(self.max_message);
    }

    /// Queues output. A client that leaves more than its limit unread is
    /// disconnected (with a log line); nothing is queued for a dead one.
    pub fn queue(&mut self, bytes: &[u8]) {
        if self.dead {
            return;
        }
        self.out.extend(bytes);
        if self.out.len() > self.max_output {
            log::warn!(
                "{} is not reading its replies ({} bytes pending): disconnecting it",
                self.label,
                self.out.len()
            );
            self.dead = true;
            self.out.clear();
        }
    }

    /// Changes the output limit (checked at the next [`Self::queue`]).
    pub fn set_max_output(&mut self, max: usize) {
        self.max_output = max;
    }

    /// Writes what the socket takes now.
    pub fn write_out(&mut self) {
        while !self.out.is_empty() && !self.dead {
            let (a, _) = self.out.as_slices();
            match self.stream.write(a) {
                Ok(0) => self.dead = true,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EPIPE and the like: the peer is gone.
                    log::debug!("{}: write: {e}", self.label);
                    self.dead = true;
                }
            }
        }
    }

    /// The interest this connection needs: input while the owner wants it and
    /// the peer may still send, output while some is pending.
    pub fn wanted_interest(&self, wants_input: bool) -> EventSet {
        let mut set = EventSet::empty();
        if wants_input && !self.input_closed {
            set |= EventSet::IN;
        }
        if !self.out.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// The interest registered with epoll.
    pub fn interest(&self) -> EventSet {
        self.interest
    }

    fn events(&self, set: EventSet) -> Events {
        Events::with_data_raw(self.fd(), self.tag(), set)
    }

    /// Registers the connection with epoll.
    fn watch(&mut self, ops: &mut EventOps, wants_input: bool) -> event_manager::Result<()> {
        let want = self.wanted_interest(wants_input);
        ops.add(self.events(want))?;
        self.interest = want;
        Ok(())
    }

    /// Updates the registered interest, only when the wanted set changed.
    pub fn sync_interest(&mut self, ops: &mut EventOps, wants_input: bool) {
        let want = self.wanted_interest(wants_input);
        if want != self.interest && ops.modify(self.events(want)).is_ok() {
            self.interest = want;
        }
    }

    /// Whether an epoll event is for this connection (not for an earlier one
    /// that had the same descriptor number).
    fn is_for(&self, ev: &Events) -> bool {
        ev.fd() == self.fd() && ev.data() == self.tag()
    }

    /// Closes gracefully before exit: writes what is pending (blocking, until
    /// `deadline` at the latest), shuts the write side, and reads and drops
    /// unread input (also until `deadline`), so that the peer sees EOF after
    /// the last reply rather than a reset that may discard it. Once the
    /// deadline has passed it only writes what the socket takes at once and
    /// shuts the write side.
    pub fn close_gracefully(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.write_out();
            self.dead = true;
            self.input_closed = true;
            self.out.clear();
            let _ = self.stream.shutdown(Shutdown::Write);
            return;
        }
        self.dead = true;
        self.input_closed = true;
        if self.stream.set_nonblocking(false).is_ok() {
            let _ = self.stream.set_write_timeout(Some(left));
            let (a, b) = self.out.as_slices();
            let _ = self
                .stream
                .write_all(a)
                .and_then(|_| self.stream.write_all(b));
        }
        self.out.clear();
        let _ = self.stream.shutdown(Shutdown::Write);
        if self.stream.set_nonblocking(true).is_ok() {
            let mut sink = [0u8; 4096];
            while Instant::now() < deadline && matches!(self.stream.read(&mut sink), Ok(n) if n > 0)
            {
            }
        }
    }
}

#[cfg(test)]
mod tests;
