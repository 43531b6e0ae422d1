//! The VMM thread: builds the VM, then runs an event loop (event-manager) over the
//! lifecycle eventfds, signals, the timeout and the console input, until the VM's
//! fate is decided. Reboots rebuild the VM in place.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::serial::SerialDevice;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use agent_proxy::{AgentProxy, ProxyConfig};
use event_manager::SubscriberId;
use qmp::protocol::{greeting, QmpError};
use qmp::server::{QmpServer, ServerError};

use crate::agent;
use crate::builder::{self, Backends, BuildError};
use crate::config::{SerialBackend, VmConfig};
pub use crate::machine::Outcome;
use crate::machine::{self, Lifecycle, Machine};
use crate::terminal::{self, EscapeCommand, EscapeParser, RawTerminal};
use crate::vcpu::{self, VcpuEvents};

/// Errors of the VMM as a whole.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Building the VM failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A QMP endpoint could not be opened.
    #[error(transparent)]
    Qmp(#[from] ServerError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// Host setup (signals, timers) failed.
    #[error("host setup: {0}")]
    Setup(String),
}

type Requests = Rc<RefCell<VecDeque<Lifecycle>>>;

const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Blocks the stop signals in this thread (and so in every thread it starts later)
/// and returns a signalfd that receives them.
fn stop_signalfd() -> Result<OwnedFd, VmmError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in STOP_SIGNALS {
        // SAFETY: `set` is initialised and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: `set` is a valid, initialised signal set.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VmmError::Setup(format!(
            "cannot block signals: {}",
            io::Error::from_raw_os_error(rc)
        )));
    }
    // SAFETY: `set` is valid; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::Setup(format!(
            "signalfd: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_signal(fd: RawFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is a writable buffer of `size` bytes.
    let n = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// Lifecycle sources: vcpu events, stop signals, the timeout.
struct Controller {
    events: Arc<VcpuEvents>,
    signals: OwnedFd,
    timer: Option<TimerFd>,
    requests: Requests,
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &dyn AsRawFd| {
            if let Err(e) = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN)) {
                log::error!("cannot watch a lifecycle event: {e:?}");
            }
        };
        add(&self.events.shutdown);
        add(&self.events.reset);
        add(&self.events.error);
        add(&self.events.panic);
        add(&self.signals);
        if let Some(t) = &self.timer {
            add(t);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let push = |r| self.requests.borrow_mut().push_back(r);
        if fd == self.events.shutdown.as_raw_fd() {
            let _ = self.events.shutdown.read();
            push(Lifecycle::PowerOff);
        } else if fd == self.events.reset.as_raw_fd() {
            let _ = self.events.reset.read();
            push(Lifecycle::Reset);
        } else if fd == self.events.error.as_raw_fd() {
            let _ = self.events.error.read();
            push(Lifecycle::Failed);
        } else if fd == self.events.panic.as_raw_fd() {
            let _ = self.events.panic.read();
            push(Lifecycle::Panic);
        } else if fd == self.signals.as_raw_fd() {
            while let Some(sig) = read_signal(fd) {
                push(Lifecycle::Signal(sig));
            }
        } else if let Some(t) = self.timer.as_mut().filter(|t| t.as_raw_fd() == fd) {
            let _ = t.wait();
            push(Lifecycle::Timeout);
        }
    }
}

/// Console input: stdin into COM1, with back-pressure and Ctrl-A escapes.
struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    ready: EventFd,
    pending: VecDeque<u8>,
    escapes: Option<EscapeParser>,
    stdin_watched: bool,
    stdin_eof: bool,
    requests: Requests,
}

/// Bytes of console input read at once (and so at most held back).
const INPUT_CHUNK: usize = 256;

impl ConsoleInput {
    fn stdin_events() -> Events {
        Events::new_raw(libc::STDIN_FILENO, EventSet::IN)
    }

    fn push_pending(&mut self) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match serial.enqueue_input(a) {
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
        let want = !self.stdin_eof && self.pending.is_empty();
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
                            self.requests.borrow_mut().push_back(Lifecycle::Quit)
                        }
                    }
                }
                self.pending.extend(out);
            }
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

fn stdin_is_usable() -> bool {
    // SAFETY: F_GETFD only queries the descriptor.
    unsafe { libc::fcntl(libc::STDIN_FILENO, libc::F_GETFD) >= 0 }
}

/// Makes sure descriptors 0-2 are open (on /dev/null if need be), so no file the
/// VMM opens can land on them.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: opening /dev/null; the lowest free descriptor is `fd`.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

/// Forwards the agent's replies to waiting QMP clients; true if there were any.
fn complete_agent_replies(server: &mut QmpServer, proxy: &Rc<RefCell<AgentProxy>>) -> bool {
    let replies = proxy.borrow_mut().take_qmp_replies();
    let any = !replies.is_empty();
    for (token, result) in replies {
        // Keep the agent's error class where QMP has it (qemu-ga uses
        // GenericError and CommandNotFound).
        let result = result.map_err(|e| match e.class.as_str() {
            "CommandNotFound" => QmpError::not_found(e.desc),
            _ => QmpError::generic(e.desc),
        });
        if !server.complete(token, result) {
            log::debug!("agent reply {token} had no waiting QMP client");
        }
    }
    any
}

/// The VMM side of the guest-agent channel across VM rebuilds.
#[derive(Default)]
struct AgentLink {
    /// The port the queue subscriber watches, and that subscriber.
    attached: Option<(usize, SubscriberId)>,
    open: bool,
}

impl AgentLink {
    fn round(
        &mut self,
        em: &mut EventManager<Box<dyn MutEventSubscriber>>,
        machine: &mut Machine,
        proxy: &Rc<RefCell<AgentProxy>>,
        proxy_id: SubscriberId,
        events: &mut Vec<serde_json::Value>,
    ) {
        let port = machine.agent_port();
        let key = port.as_ref().map(|p| Arc::as_ptr(p) as usize);
        if key != self.attached.map(|(k, _)| k) {
            if let Some((_, id)) = self.attached.take() {
                let _ = em.remove_subscriber(id);
            }
            if self.open {
                // The VM was rebuilt: the guest side of the old port is gone.
                self.open = false;
                proxy.borrow_mut().port_state(false);
                events.push(qmp::protocol::event(
                    "VSERPORT_CHANGE",
                    Some(serde_json::json!({"id": machine::AGENT_CHANNEL_ID, "open": false})),
                ));
            }
            if let (Some(p), Some(k)) = (&port, key) {
                match agent::AgentQueues::new(p.clone()) {
                    Ok(sub) => self.attached = Some((k, em.add_subscriber(Box::new(sub)))),
                    Err(e) => log::error!("guest agent port: {e}"),
                }
            }
        }
        if let Some(p) = &port {
            events.extend(agent::exchange(p, proxy, &mut self.open));
        }
        machine.agent_open = self.open;
        for name in machine.take_event_names() {
            if name == "SHUTDOWN" || name == "RESET" {
                proxy.borrow_mut().vm_event(&name);
            }
        }
        // Requests the lifecycle just completed may have produced bytes.
        if let Some(p) = &port {
            events.extend(agent::exchange(p, proxy, &mut self.open));
        }
        match em.event_ops(proxy_id) {
            Ok(mut ops) => proxy.borrow_mut().flush(&mut ops),
            Err(e) => log::error!("agent proxy: {e:?}"),
        }
    }
}

/// Runs the VM described by `cfg` to its end; returns how it ended.
pub fn run(cfg: VmConfig) -> Result<Outcome, VmmError> {
    builder::preflight(&cfg)?;
    let signals = stop_signalfd()?;
    vcpu::install_kick_handler()
        .map_err(|e| VmmError::Setup(format!("cannot install the vcpu kick handler: {e}")))?;
    let server = if cfg.qmp.is_empty() {
        None
    } else {
        let s = QmpServer::bind(&cfg.qmp, greeting(&machine::version()))?;
        Some(Rc::new(RefCell::new(s)))
    };
    let proxy = match &cfg.agent {
        Some(path) => {
            let p = AgentProxy::new(ProxyConfig {
                socket: Some(path.clone()),
                timeout: Duration::from_secs(cfg.agent_timeout),
            })
            .map_err(|e| VmmError::Setup(format!("guest agent: {e}")))?;
            Some(Rc::new(RefCell::new(p)))
        }
        None => None,
    };
    let backends = Backends::new(&cfg)?;

    let requests: Requests = Rc::new(RefCell::new(VecDeque::new()));
    let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new()
        .map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
    let timer = match cfg.timeout {
        Some(secs) => {
            let mut t = TimerFd::new().map_err(|e| VmmError::Setup(format!("timerfd: {e}")))?;
            t.reset(Duration::from_secs(secs), None)
                .map_err(|e| VmmError::Setup(format!("timerfd: {e}")))?;
            Some(t)
        }
        None => None,
    };
    em.add_subscriber(Box::new(Controller {
        events: backends.events.clone(),
        signals,
        timer,
        requests: requests.clone(),
    }));
    let qmp_id = server
        .as_ref()
        .map(|s| em.add_subscriber(Box::new(s.clone())));
    let proxy_id = proxy
        .as_ref()
        .map(|p| em.add_subscriber(Box::new(p.clone())));

    let interactive = cfg.serial == SerialBackend::Stdio && stdin_is_usable();
    let raw = if interactive {
        RawTerminal::enable()
    } else {
        None
    };
    if interactive {
        em.add_subscriber(Box::new(ConsoleInput {
            serial: backends.serial.clone(),
            ready: backends
                .serial_input_ready
                .try_clone()
                .map_err(|e| VmmError::Setup(e.to_string()))?,
            pending: VecDeque::new(),
            escapes: raw.as_ref().map(|_| EscapeParser::default()),
            stdin_watched: false,
            stdin_eof: false,
            requests: requests.clone(),
        }));
    }

    let monitors = server
        .as_ref()
        .map(|s| s.borrow().chardevs().to_vec())
        .unwrap_or_default();
    let name = cfg.name.clone().unwrap_or_else(|| "vm".into());
    let mut machine = Machine::start(cfg, backends, monitors)?;
    if let Some(p) = &proxy {
        machine.set_agent(p.clone());
    }
    log::info!("{name}: started ({})", machine.state().as_str());
    let mut agent = AgentLink::default();
    let result = loop {
        if let Err(e) = em.run() {
            // EINTR from a signal that was not ours is harmless.
            log::debug!("event loop interrupted: {e:?}");
        }
        let mut events = Vec::new();
        loop {
            let Some(req) = requests.borrow_mut().pop_front() else {
                break;
            };
            machine.on_request(req, &mut events);
        }
        if let (Some(p), Some(pid)) = (&proxy, proxy_id) {
            agent.round(&mut em, &mut machine, p, pid, &mut events);
        }
        if let (Some(server), Some(id)) = (&server, qmp_id) {
            server.borrow_mut().broadcast_all(&events);
            // Dispatch until quiet: agent replies complete deferred commands, which
            // releases the commands their clients sent after them.
            for _ in 0..64 {
                let mut progressed = false;
                if let Some(p) = &proxy {
                    progressed |= complete_agent_replies(&mut server.borrow_mut(), p);
                }
                progressed |= server.borrow_mut().dispatch(&mut machine);
                if let (Some(p), Some(pid)) = (&proxy, proxy_id) {
                    // Forwarded commands' bytes and lifecycle events, now.
                    let mut later = Vec::new();
                    agent.round(&mut em, &mut machine, p, pid, &mut later);
                    server.borrow_mut().broadcast_all(&later);
                    progressed |= complete_agent_replies(&mut server.borrow_mut(), p);
                }
                if !progressed {
                    break;
                }
            }
            match em.event_ops(id) {
                Ok(mut ops) => server.borrow_mut().flush(&mut ops),
                Err(e) => log::error!("QMP: {e:?}"),
            }
        }
        if let Some(e) = machine.fatal.take() {
            break Err(VmmError::Build(e));
        }
        if let Some(outcome) = machine.exit.take() {
            break Ok(outcome);
        }
    };
    machine.teardown();
    if let Some(server) = &server {
        server
            .borrow_mut()
            .flush_before_exit(Duration::from_secs(1));
    }
    drop(raw);
    result
}
