//! Running the command and relaying it: one `poll` loop over the channel, the
//! command's pipes, the kernel log and SIGCHLD. No sleeps, no threads.
//!
//! - Host `STDIN` frames go to the command's stdin pipe (non-blocking); what it
//!   does not take yet waits in a buffer, and while that holds
//!   [`STDIN_BUFFER`] bytes the channel is not read (the host waits, not our
//!   memory). `STDIN_EOF`, or the host closing the channel, closes the pipe
//!   once the buffer is written.
//! - The command's stdout and stderr go out as `STDOUT`/`STDERR` frames.
//! - Kernel log records go out as `KMSG` frames or are kept ([`Kmsg`]).
//! - When the command ends, what its pipes hold is read without waiting (a
//!   background process may keep them open forever), and the run ends.
//!
//! [`run_command`] then [`report_exit`] are the whole run after `READY`; the
//! tests drive them over a socket pair.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};

use run_protocol::{Deframer, Exit, EXIT, MAX_PAYLOAD, STARTED, STDERR, STDIN, STDIN_EOF, STDOUT};

use crate::command::{self, Child};
use crate::kmsg::Kmsg;
use crate::port::Port;
use crate::reaper::Reaper;
use crate::sys::{self, is_transient};

/// The most stdin bytes held for the command before the channel waits.
pub const STDIN_BUFFER: usize = 1 << 20;

/// Kernel log records read in one go, so that a flood does not hold up the
/// command's output.
const KMSG_BATCH: usize = 64;

/// Starts `argv`, sends `STARTED` and relays until it ends; returns how it
/// ended (not yet sent: see [`report_exit`]). A failure to start is an
/// `Ok` end too (not found, not executable); `Err` is a broken channel.
pub fn run_command(
    port: &Port,
    kmsg: Option<&mut Kmsg>,
    reaper: &Reaper,
    argv: &[Vec<u8>],
    place: command::Place,
) -> io::Result<Exit> {
    let child = match command::spawn(argv, command::PATH, place) {
        Ok(child) => child,
        Err(exit) => return Ok(exit),
    };
    port.send(STARTED, &[])?;
    Pump::new(port, kmsg, reaper, child).run()
}

/// Sends `EXIT`, after the kernel log records not sent yet (the log may say
/// why a run failed, e.g. the OOM killer or a segfault).
pub fn report_exit(port: &Port, kmsg: Option<&mut Kmsg>, exit: &Exit) -> io::Result<()> {
    if let Some(kmsg) = kmsg {
        kmsg.flush(port)?;
    }
    port.send(EXIT, &exit.encode())
}

/// What a `pollfd` is for.
#[derive(Clone, Copy)]
enum Source {
    Host,
    Stdin,
    Stdout,
    Stderr,
    Kmsg,
    Children,
}

struct Pump<'a> {
    port: &'a Port,
    kmsg: Option<&'a mut Kmsg>,
    reaper: &'a Reaper,
    pid: libc::pid_t,
    /// Frames from the host.
    host_frames: Deframer,
    /// The channel is still read.
    host_open: bool,
    stdin: Option<File>,
    /// Bytes for stdin that it did not take yet.
    stdin_buf: VecDeque<u8>,
    /// Close stdin once `stdin_buf` is written.
    stdin_eof: bool,
    stdout: Option<File>,
    stderr: Option<File>,
    /// How the command ended, once it did.
    status: Option<Exit>,
    buf: Vec<u8>,
}

impl<'a> Pump<'a> {
    fn new(port: &'a Port, kmsg: Option<&'a mut Kmsg>, reaper: &'a Reaper, child: Child) -> Self {
        Pump {
            port,
            kmsg,
            reaper,
            pid: child.pid,
            host_frames: Deframer::default(),
            host_open: true,
            stdin: Some(child.stdin),
            stdin_buf: VecDeque::new(),
            stdin_eof: false,
            stdout: Some(child.stdout),
            stderr: Some(child.stderr),
            status: None,
            buf: vec![0; MAX_PAYLOAD],
        }
    }

    fn run(mut self) -> io::Result<Exit> {
        // The boot's last kernel log records, while the command starts.
        if let Some(kmsg) = self.kmsg.as_deref_mut() {
            kmsg.send_pending(self.port)?;
        }
        // A SIGCHLD that came before is pending on the signalfd: no race.
        let status = loop {
            if let Some(status) = self.status.take() {
                break status;
            }
            self.step()?;
        };
        self.drain_output()?;
        Ok(status)
    }

    /// Waits for something to do and does it.
    fn step(&mut self) -> io::Result<()> {
        let mut fds = Vec::with_capacity(6);
        let mut sources = Vec::with_capacity(6);
        let mut add = |fd: libc::pollfd, s: Source| {
            fds.push(fd);
            sources.push(s);
        };
        if self.host_open && self.stdin_buf.len() < STDIN_BUFFER {
            add(sys::pollfd(self.port, libc::POLLIN), Source::Host);
        }
        if let Some(stdin) = self.stdin.as_ref().filter(|_| !self.stdin_buf.is_empty()) {
            add(sys::pollfd(stdin, libc::POLLOUT), Source::Stdin);
        }
        if let Some(stdout) = &self.stdout {
            add(sys::pollfd(stdout, libc::POLLIN), Source::Stdout);
        }
        if let Some(stderr) = &self.stderr {
            add(sys::pollfd(stderr, libc::POLLIN), Source::Stderr);
        }
        if let Some(kmsg) = self.kmsg.as_deref().filter(|k| k.active()) {
            add(sys::pollfd(kmsg, libc::POLLIN), Source::Kmsg);
        }
        add(sys::pollfd(self.reaper, libc::POLLIN), Source::Children);

        sys::poll(&mut fds, None).map_err(|e| sys::context(e, "poll"))?;
        for (fd, source) in fds.iter().zip(sources) {
            if fd.revents == 0 {
                continue;
            }
            match source {
                Source::Host => self.read_host()?,
                Source::Stdin => self.write_stdin(),
                Source::Stdout => self.forward(STDOUT, None)?,
                Source::Stderr => self.forward(STDERR, None)?,
                Source::Kmsg => {
                    if let Some(kmsg) = self.kmsg.as_deref_mut() {
                        kmsg.forward(self.port, KMSG_BATCH)?;
                    }
                }
                Source::Children => {
                    if let Some(status) = self.reaper.reap(self.pid) {
                        self.status = Some(status);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads from the channel and takes the whole frames.
    fn read_host(&mut self) -> io::Result<()> {
        let n = match self.port.read(&mut self.buf) {
            Ok(n) => n,
            Err(e) if is_transient(&e) => return Ok(()),
            Err(e) => return Err(sys::context(e, "read the host channel")),
        };
        if n == 0 {
            // The host is gone: nothing more will come for stdin.
            self.host_open = false;
            self.stdin_eof = true;
        }
        self.host_frames.feed(&self.buf[..n]);
        loop {
            match self.host_frames.next_frame() {
                Ok(None) => break,
                Ok(Some((STDIN, data))) => {
                    // After the end, or once the command closed its stdin,
                    // the bytes have nowhere to go.
                    if self.stdin.is_some() && !self.stdin_eof {
                        self.stdin_buf.extend(data);
                    }
                }
                Ok(Some((STDIN_EOF, _))) => self.stdin_eof = true,
                // A kind this init does not know: skipped.
                Ok(Some(_)) => {}
                Err(bad) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the host channel is broken: {bad}"),
                    ))
                }
            }
        }
        self.write_stdin();
        Ok(())
    }

    /// Writes what stdin takes now; closes it at the end (or when the command
    /// closed it).
    fn write_stdin(&mut self) {
        while let Some(stdin) = &self.stdin {
            if self.stdin_buf.is_empty() {
                if self.stdin_eof {
                    self.stdin = None;
                }
                return;
            }
            let (front, _) = self.stdin_buf.as_slices();
            match (&*stdin).write(front) {
                Ok(0) => return,
                Ok(n) => {
                    self.stdin_buf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // EPIPE: the command closed its stdin.
                Err(_) => {
                    self.stdin = None;
                    self.stdin_buf = VecDeque::new();
                }
            }
        }
    }

    /// Reads stdout or stderr once, or with a `budget` until that many bytes
    /// came, its end, or nothing more is there now; sends what came.
    fn forward(&mut self, kind: u8, budget: Option<usize>) -> io::Result<()> {
        let pipe = if kind == STDOUT {
            &mut self.stdout
        } else {
            &mut self.stderr
        };
        let mut sent = 0;
        while let Some(file) = pipe.as_ref() {
            match (&*file).read(&mut self.buf) {
                Ok(0) => *pipe = None,
                Ok(n) => {
                    self.port.send(kind, &self.buf[..n])?;
                    sent += n;
                    if budget.is_some_and(|b| sent < b) {
                        continue;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => *pipe = None,
            }
            break;
        }
        Ok(())
    }

    /// After the command ended: sends what its pipes hold, without waiting
    /// for their end (a background process may keep them open). Everything
    /// it wrote is in the pipe, and a pipe holds at most its capacity, so
    /// reading that much takes all of it even if others keep writing.
    fn drain_output(&mut self) -> io::Result<()> {
        for kind in [STDOUT, STDERR] {
            let pipe = if kind == STDOUT {
                &self.stdout
            } else {
                &self.stderr
            };
            let Some(file) = pipe else { continue };
            let capacity = sys::pipe_size(file).unwrap_or(STDIN_BUFFER);
            self.forward(kind, Some(capacity))?;
        }
        Ok(())
    }
}
