//! Console input: stdin into the guest's console (COM1's receive FIFO, or the
//! virtio console's held input), and the Ctrl-A keys on a terminal.
//!
//! Without a terminal (a pipe, a file) stdin is read only while nothing is held
//! back for the guest: back-pressure, nothing is lost. On a terminal stdin is
//! always read, so Ctrl-A x works even when the guest never drains its UART;
//! keystrokes for the guest are held up to [`MAX_HELD`] bytes, and beyond that
//! dropped (with one log line per episode), as a real serial line would.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::serial::SerialDevice;
use devices::virtio::hvc::HvcInput;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::machine::Input;
use crate::terminal::{self, EscapeCommand, EscapeParser};
use crate::vmm::Inputs;

/// Where console input goes.
pub enum InputTarget {
    /// COM1's receive FIFO.
    Serial(Arc<Mutex<SerialDevice>>),
    /// The virtio console (`--console virtio`).
    Hvc(Arc<HvcInput>),
}

impl InputTarget {
    /// Hands over what fits of `data`; returns how much.
    fn enqueue(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Self::Serial(s) => s
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(data),
            Self::Hvc(h) => Ok(h.enqueue(data)),
        }
    }
}

/// Console input: stdin into the guest's console, with back-pressure and
/// Ctrl-A escapes.
pub struct ConsoleInput {
    target: InputTarget,
    ready: EventFd,
    pending: VecDeque<u8>,
    escapes: Option<EscapeParser>,
    stdin_watched: bool,
    stdin_eof: bool,
    /// Keystrokes were dropped since the guest last made room.
    dropping: bool,
    inputs: Inputs,
}

/// Console input held for a guest that does not read it (terminal only).
pub const MAX_HELD: usize = 4096;

/// Bytes of console input read at once (and so at most held back).
const INPUT_CHUNK: usize = 256;

impl ConsoleInput {
    fn stdin_events() -> Events {
        Events::new_raw(libc::STDIN_FILENO, EventSet::IN)
    }

    fn push_pending(&mut self) {
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match self.target.enqueue(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) => {
                    log::warn!("console input dropped: {e}");
                    self.pending.clear();
                }
            }
        }
    }

    fn update_watch(&mut self, ops: &mut EventOps) {
        let want = !self.stdin_eof && (self.pending.is_empty() || self.escapes.is_some());
        if want != self.stdin_watched {
            let r = if want {
                ops.add(Self::stdin_events())
            } else {
                ops.remove(Self::stdin_events())
            };
            match r {
                Ok(()) => self.stdin_watched = want,
                Err(e) => {
                    log::debug!("console input disabled (stdin cannot be polled): {e:?}");
                    self.stdin_eof = true;
                }
            }
        }
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; INPUT_CHUNK];
        // SAFETY: `buf` is a writable buffer of its length.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                log::warn!("console input: {e}; no more input");
                self.stdin_eof = true;
            }
            return;
        }
        if n == 0 {
            self.stdin_eof = true;
            return;
        }
        let input = &buf[..n as usize];
        match &mut self.escapes {
            None => self.pending.extend(input),
            Some(p) => {
                let mut out = Vec::with_capacity(input.len());
                for cmd in p.feed(input, &mut out) {
                    match cmd {
                        EscapeCommand::Help => {
                            let _ = io::stderr().write_all(terminal::HELP.as_bytes());
                        }
                        EscapeCommand::Quit => {
                            self.inputs.borrow_mut().push_back(Input::ConsoleQuit)
                        }
                    }
                }
                self.hold(&out);
            }
        }
    }

    /// Holds keystrokes for the guest, at most [`MAX_HELD`] bytes.
    fn hold(&mut self, keys: &[u8]) {
        let room = MAX_HELD.saturating_sub(self.pending.len());
        let n = room.min(keys.len());
        self.pending.extend(&keys[..n]);
        if n < keys.len() && !self.dropping {
            self.dropping = true;
            log::warn!("console input dropped: the guest is not reading its console");
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.ready, EventSet::IN)) {
            log::error!("cannot watch console readiness: {e:?}");
        }
        self.update_watch(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.ready.as_raw_fd() {
            let _ = self.ready.read();
            self.dropping = false;
        } else if events
            .event_set()
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.read_stdin();
        }
        self.push_pending();
        self.update_watch(ops);
    }
}

impl ConsoleInput {
    /// Console input into `target`; `ready` fires when the guest took input
    /// (drained the FIFO, filled receive buffers); with `escapes`, Ctrl-A keys
    /// are interpreted (Ctrl-A x queues [`Input::ConsoleQuit`] on `inputs`).
    pub fn new(target: InputTarget, ready: EventFd, escapes: bool, inputs: Inputs) -> Self {
        Self {
            target,
            ready,
            pending: VecDeque::new(),
            escapes: escapes.then(EscapeParser::default),
            stdin_watched: false,
            stdin_eof: false,
            dropping: false,
            inputs,
        }
    }
}
