//! The VMM side of the `minivmm run` channel: frames from the guest's init
//! become the command's stdout and stderr (byte for byte, each to its own host
//! descriptor, through bounded writer threads), kernel log records and the
//! command's end; minivmm's stdin goes to the command.
//!
//! Back-pressure, never loss: output frames are taken from the port only while
//! the host writer has room for them, so a slow reader of minivmm's stdout
//! makes the guest's writes wait (the virtio-console keeps its transmit
//! buffers), and the VMM thread never blocks on the host descriptors.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use devices::output::GuestOutput;
use devices::virtio::console::AGENT_TX_QUEUE;
use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use run_protocol::{Deframer, Exit};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::builder::AgentPort;
use crate::machine::Input;
use crate::port_watch::PortWatch;
use crate::runtime::Runtime;

/// Bytes of the command's output held for a slow host reader, per stream.
const OUTPUT_CAP: usize = 1 << 20;
/// Bytes for the command's stdin held before minivmm's stdin is no longer read.
const STDIN_CAP: usize = 1 << 20;
/// Longest wait at exit for the command's output to reach the host.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(10);

/// What the run learned, for the verdict and the result file.
#[derive(Debug, Default, Clone)]
pub struct RunReport {
    /// When the init said it runs.
    pub ready_at: Option<Instant>,
    /// When the command started.
    pub started_at: Option<Instant>,
    /// When and how the command ended.
    pub ended: Option<(Instant, Exit)>,
    /// The last kernel log records the init forwarded, as `dmesg` shows them.
    pub kmsg: VecDeque<String>,
    /// The last lines of the serial console.
    pub console: Vec<String>,
    /// The channel broke (a malformed frame).
    pub broken: Option<String>,
    /// Where the vcpus were when `--timeout` stopped them.
    pub vcpus: Vec<crate::vcpu::VcpuRegisters>,
    /// The shares whose virtiofsd ended unasked, one line each.
    pub shares_lost: Vec<String>,
}

/// State shared with the wake-up subscriber.
#[derive(Default)]
struct Wake {
    /// minivmm's stdin is readable (or at EOF).
    stdin_ready: bool,
    /// A writer made room.
    room: bool,
}

/// Watches minivmm's stdin and the output writers' progress.
struct WakeSub {
    wake: Rc<RefCell<Wake>>,
    stdin: Option<RawFd>,
    progress: EventFd,
}

impl MutEventSubscriber for WakeSub {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.progress, EventSet::IN)) {
            log::error!("run: cannot watch the output writers: {e:?}");
        }
        if let Some(fd) = self.stdin {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                // Not pollable (a regular file): read it as if always ready.
                log::debug!("run: stdin not watched ({e:?}); read when asked");
                self.wake.borrow_mut().stdin_ready = true;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.progress.as_raw_fd() {
            let _ = self.progress.read();
            self.wake.borrow_mut().room = true;
        } else if Some(events.fd()) == self.stdin {
            self.wake.borrow_mut().stdin_ready = true;
            // Level-triggered: stop watching until the link read it.
            let _ = ops.remove(Events::new_raw(events.fd(), EventSet::IN));
        }
    }
}

/// The host side of the run channel across the VM's life.
pub struct RunLink {
    watch: PortWatch,
    deframer: Deframer,
    stdout: GuestOutput,
    stderr: GuestOutput,
    wake: Rc<RefCell<Wake>>,
    wake_id: SubscriberId,
    /// minivmm's stdin, until it ends.
    stdin: Option<RawFd>,
    /// Frames for the guest not handed to the port yet.
    to_guest: Vec<u8>,
    /// One read of minivmm's stdin (allocated once).
    stdin_buf: Vec<u8>,
    /// Whether kernel log records also go to stderr as they come.
    verbose: bool,
    report: RunReport,
    ended: bool,
}

impl RunLink {
    /// Starts the output writers and watches minivmm's stdin.
    pub fn new(
        em: &mut EventManager<Box<dyn MutEventSubscriber>>,
        verbose: bool,
    ) -> io::Result<Self> {
        let progress = EventFd::new(EFD_NONBLOCK)?;
        let stdout = GuestOutput::new(Box::new(io::stdout()), OUTPUT_CAP)?;
        let stderr = GuestOutput::new(Box::new(io::stderr()), OUTPUT_CAP)?;
        stdout.notify_progress(progress.try_clone()?);
        stderr.notify_progress(progress.try_clone()?);
        let stdin = stdin_fd();
        let wake = Rc::new(RefCell::new(Wake::default()));
        let wake_id = em.add_subscriber(Box::new(WakeSub {
            wake: wake.clone(),
            stdin,
            progress,
        }));
        if stdin.is_none() {
            wake.borrow_mut().stdin_ready = true;
        }
        Ok(Self {
            watch: PortWatch::default(),
            deframer: Deframer::default(),
            stdout,
            stderr,
            wake,
            wake_id,
            stdin,
            to_guest: Vec::new(),
            stdin_buf: Vec::new(),
            verbose,
            report: RunReport::default(),
            ended: false,
        })
    }

    /// Follows the current VM's port and moves what can move. Returns whether
    /// anything happened.
    pub fn round(
        &mut self,
        em: &mut EventManager<Box<dyn MutEventSubscriber>>,
        rt: &mut Runtime,
    ) -> bool {
        let port = rt.agent_port();
        self.watch.follow(em, &port, None, "run channel");
        let Some((_, port)) = port else { return false };
        let mut moved = std::mem::take(&mut self.wake.borrow_mut().room);
        moved |= self.take_from_guest(&port);
        moved |= self.handle_frames(rt);
        moved |= self.read_stdin(em);
        moved |= self.send_to_guest(&port);
        moved
    }

    /// Takes the guest's bytes when what is held of them is small.
    fn take_from_guest(&mut self, port: &AgentPort) -> bool {
        if self.deframer.pending() > run_protocol::MAX_PAYLOAD + run_protocol::HEADER {
            return false;
        }
        let mut t = port.lock().unwrap_or_else(|e| e.into_inner());
        let _ = t.device_mut().take_port_changes();
        let data = t.device_mut().take_from_guest();
        if t.device().tx_stalled() {
            t.notify(AGENT_TX_QUEUE);
        }
        drop(t);
        self.deframer.feed(&data);
        !data.is_empty()
    }

    /// Acts on every whole frame whose output fits in the writers now.
    fn handle_frames(&mut self, rt: &mut Runtime) -> bool {
        let mut moved = false;
        while !self.ended && self.report.broken.is_none() {
            let room = self.stdout.room().min(self.stderr.room());
            if room < run_protocol::MAX_PAYLOAD {
                break;
            }
            let (kind, payload) = match self.deframer.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    log::error!("run channel: the guest sent {e}; the channel is broken");
                    self.report.broken = Some(e.to_string());
                    break;
                }
            };
            moved = true;
            let now = Instant::now();
            match kind {
                run_protocol::READY => self.report.ready_at = Some(now),
                run_protocol::STARTED => self.report.started_at = Some(now),
                run_protocol::STDOUT => self.stdout.push(&payload),
                run_protocol::STDERR => self.stderr.push(&payload),
                run_protocol::KMSG => self.kmsg(&payload),
                run_protocol::EXIT => match Exit::decode(&payload) {
                    Some(exit) => {
                        self.report.ended = Some((now, exit));
                        self.ended = true;
                        let _ = rt.input(Input::CommandEnded);
                    }
                    None => log::warn!("run channel: a malformed exit record"),
                },
                other => log::debug!("run channel: frame type {other} ignored"),
            }
        }
        moved
    }

    fn kmsg(&mut self, payload: &[u8]) {
        let text = super::klog::format_record(payload);
        if self.verbose {
            self.stderr.push(format!("{text}\n").as_bytes());
        }
        if self.report.kmsg.len() == super::klog::LINES {
            self.report.kmsg.pop_front();
        }
        self.report.kmsg.push_back(text);
    }

    /// Reads minivmm's stdin into frames once the init runs, while little is
    /// waiting for the guest.
    fn read_stdin(&mut self, em: &mut EventManager<Box<dyn MutEventSubscriber>>) -> bool {
        if self.report.ready_at.is_none() || self.to_guest.len() >= STDIN_CAP {
            return false;
        }
        if !std::mem::take(&mut self.wake.borrow_mut().stdin_ready) {
            return false;
        }
        let Some(fd) = self.stdin else { return false };
        if self.stdin_buf.is_empty() {
            self.stdin_buf = vec![0u8; run_protocol::MAX_PAYLOAD];
        }
        // SAFETY: reading into `stdin_buf`, which we own, from a descriptor we do
        // not close; `ManuallyDrop` keeps the `File` from closing it.
        let mut f = std::mem::ManuallyDrop::new(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        });
        match f.read(&mut self.stdin_buf) {
            Ok(0) => {
                run_protocol::frame(run_protocol::STDIN_EOF, &[], &mut self.to_guest);
                self.stdin = None;
                return true;
            }
            Ok(n) => run_protocol::frame(
                run_protocol::STDIN,
                &self.stdin_buf[..n],
                &mut self.to_guest,
            ),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("run: reading stdin: {e}; the command's stdin ends");
                run_protocol::frame(run_protocol::STDIN_EOF, &[], &mut self.to_guest);
                self.stdin = None;
                return true;
            }
        }
        // Watch it again for the next read.
        if let Ok(mut ops) = em.event_ops(self.wake_id) {
            if ops.add(Events::new_raw(fd, EventSet::IN)).is_err() {
                self.wake.borrow_mut().stdin_ready = true;
            }
        }
        true
    }

    /// Hands pending frames to the port.
    fn send_to_guest(&mut self, port: &AgentPort) -> bool {
        if self.to_guest.is_empty() {
            return false;
        }
        let mut t = port.lock().unwrap_or_else(|e| e.into_inner());
        let out = std::mem::take(&mut self.to_guest);
        match t.with_device(|c, ctx| c.send_to_guest(&out, ctx)) {
            Some(n) => self.to_guest = out[n..].to_vec(),
            None => self.to_guest = out,
        }
        true
    }

    /// At exit: waits (at most [`OUTPUT_DRAIN`]) for the command's output to
    /// reach the host, says on stderr what could not be written, and returns
    /// what the run learned.
    pub fn finish(self) -> RunReport {
        let deadline = Instant::now() + OUTPUT_DRAIN;
        let out = self.stdout.finish(deadline);
        let err = self.stderr.finish(deadline);
        if out.total() + err.total() > 0 {
            eprintln!(
                "minivmm: {} bytes of the command's stdout and {} of its stderr could not be written",
                out.total(),
                err.total()
            );
        }
        self.report
    }
}

/// minivmm's stdin if it is open, made non-blocking when it is a pipe or a
/// socket (never a terminal: that would change it for the shell too).
fn stdin_fd() -> Option<RawFd> {
    let fd = libc::STDIN_FILENO;
    // SAFETY: F_GETFL only queries the descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return None;
    }
    // SAFETY: fstat into a zeroed stat we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let kind = st.st_mode & libc::S_IFMT;
    if kind == libc::S_IFIFO || kind == libc::S_IFSOCK {
        // SAFETY: F_SETFL on our own stdin; no memory is passed.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    }
    Some(fd)
}
