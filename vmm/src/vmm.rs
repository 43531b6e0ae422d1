//! The VMM thread. It turns file descriptors into [`Input`]s (vcpu lifecycle
//! eventfds, stop signals, the `--timeout` timer, console keys) and QMP commands,
//! hands them to the [`Runtime`] (which asks the [`crate::machine::Machine`] what
//! to do and does it), and turns what comes out (events, replies, bytes for the
//! guest agent) into socket I/O, until the VM's fate is decided.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::timerfd::TimerFd;

use agent_proxy::{AgentProxy, ProxyConfig, ProxyError};
use qmp::protocol::greeting;
use qmp::server::{QmpServer, ServerError};

use crate::agent::AgentLink;
use crate::builder::{self, BuildError, Persistent};
use crate::config::{SerialBackend, VmConfig};
use crate::console::{ConsoleInput, InputTarget};
use crate::hvc::HvcLink;
use crate::machine::Input;
pub use crate::machine::Outcome;
use crate::qmp_event::QmpEvent;
use crate::run::link::{RunLink, RunReport};
use crate::runtime::{self, Runtime};
use crate::share::link::ShareLink;
use crate::terminal::RawTerminal;
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
    /// The guest-agent socket could not be opened.
    #[error(transparent)]
    Agent(#[from] ProxyError),
    /// The event loop could not be set up.
    #[error("cannot set up the event loop")]
    EventLoop(#[source] event_manager::Error),
    /// The stop signals could not be redirected to a signalfd.
    #[error("cannot receive stop signals")]
    Signals(#[source] io::Error),
    /// The vcpu kick signal handler could not be installed.
    #[error("cannot install the vcpu kick handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// The `--timeout` timer could not be set.
    #[error("cannot set the --timeout timer")]
    Timer(#[source] io::Error),
    /// The host side of the `minivmm run` channel could not be set up.
    #[error("cannot set up the run channel")]
    RunChannel(#[source] io::Error),
}

/// Inputs read from file descriptors, waiting for the runtime.
pub type Inputs = Rc<RefCell<VecDeque<Input>>>;

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
        return Err(VmmError::Signals(io::Error::from_raw_os_error(rc)));
    }
    // SAFETY: `set` is valid; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::Signals(io::Error::last_os_error()));
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
    inputs: Inputs,
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
        add(&self.events.debug_exit);
        add(&self.signals);
        if let Some(t) = &self.timer {
            add(t);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.signals.as_raw_fd() {
            while let Some(sig) = read_signal(fd) {
                self.inputs.borrow_mut().push_back(Input::Signal(sig));
            }
        } else if let Some(t) = self.timer.as_mut().filter(|t| t.as_raw_fd() == fd) {
            let _ = t.wait();
            self.inputs.borrow_mut().push_back(Input::Timeout);
        } else {
            guest_events(&self.events, &mut self.inputs.borrow_mut());
        }
    }
}

/// Every pending guest event, cause before effect whatever order the event
/// loop saw them in: a panicking kernel (or a test's isa-debug-exit write)
/// reboots or powers off right after telling us, and both may be pending
/// at one wake. A panic that then reboots is a panic.
fn guest_events(ev: &VcpuEvents, inputs: &mut VecDeque<Input>) {
    if ev.debug_exit.read().is_ok() {
        let v = *ev
            .debug_exit_value
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(v) = v {
            inputs.push_back(Input::GuestDebugExit(v));
        }
    }
    if ev.panic.read().is_ok() {
        inputs.push_back(Input::GuestPanic);
    }
    if ev.error.read().is_ok() {
        let info = ev
            .error_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        inputs.push_back(Input::VmFailed(
            info.unwrap_or_else(|| "unknown vcpu failure".into()),
        ));
    }
    if ev.shutdown.read().is_ok() {
        inputs.push_back(Input::GuestPowerOff);
    }
    if ev.reset.read().is_ok() {
        inputs.push_back(Input::GuestReset);
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

/// The QMP server and its subscriber id.
struct Monitor {
    server: Rc<RefCell<QmpServer>>,
    id: event_manager::SubscriberId,
}

/// Everything the VMM thread serves besides the lifecycle sources.
struct Io {
    inputs: Inputs,
    qmp: Option<Monitor>,
    agent: Option<AgentLink>,
    run: Option<RunLink>,
    hvc: Option<HvcLink>,
    shares: ShareLink,
}

impl Io {
    /// Works until nothing is left to do without new input: lifecycle inputs,
    /// bytes to and from the guest agent, events, agent replies, and every QMP
    /// command that can run (a command answered by the agent releases the ones
    /// its client sent after it). Each step consumes finite work, so this ends.
    fn settle(&mut self, em: &mut EventManager<Box<dyn MutEventSubscriber>>, rt: &mut Runtime) {
        loop {
            let mut progressed = false;
            loop {
                let next = self.inputs.borrow_mut().pop_front();
                let Some(input) = next else { break };
                progressed = true;
                // A refused input is only possible for QMP commands.
                let _ = rt.input(input);
            }
            if let Some(agent) = &mut self.agent {
                progressed |= agent.round(em, rt);
            }
            if let Some(run) = &mut self.run {
                progressed |= run.round(em, rt);
            }
            if let Some(hvc) = &mut self.hvc {
                hvc.follow(em, rt);
            }
            self.shares.follow(em, rt);
            let events = rt.take_events();
            if let Some(m) = &self.qmp {
                let mut server = m.server.borrow_mut();
                if !events.is_empty() {
                    progressed = true;
                    server.broadcast_all(
                        &events
                            .into_iter()
                            .map(QmpEvent::to_value)
                            .collect::<Vec<_>>(),
                    );
                }
                if let Some(agent) = &self.agent {
                    progressed |= agent.complete_qmp(&mut server);
                }
                progressed |= server.dispatch(rt);
            }
            if !progressed || rt.finished() {
                break;
            }
        }
    }

    /// When the loop must wake up even if no descriptor is ready.
    fn deadline(&self) -> Option<Instant> {
        self.agent.as_ref().and_then(AgentLink::deadline)
    }

    fn flush(&self, em: &mut EventManager<Box<dyn MutEventSubscriber>>) {
        if let Some(agent) = &self.agent {
            agent.flush(em);
        }
        if let Some(m) = &self.qmp {
            match em.event_ops(m.id) {
                Ok(mut ops) => m.server.borrow_mut().flush(&mut ops),
                Err(e) => log::error!("QMP: {e:?}"),
            }
        }
    }
}

/// Unread output a QMP client may leave when a guest agent is configured: the
/// largest agent reply ([`agent_proxy::MAX_REPLY`], passed through as the
/// `return` value), plus the usual allowance for events and other replies.
pub fn qmp_output_cap_with_agent() -> usize {
    agent_proxy::MAX_REPLY + qmp::server::MAX_PENDING_OUTPUT
}

/// Longest wait at exit for QMP clients to take their last replies and events.
pub const EXIT_FLUSH: Duration = Duration::from_millis(800);

/// Runs the VM described by `cfg` to its end; returns how it ended.
pub fn run(cfg: VmConfig) -> Result<Outcome, VmmError> {
    run_vm(cfg, None).map(|(outcome, _)| outcome)
}

/// What `minivmm run` adds to a VM: the host side of its channel.
#[derive(Debug, Clone, Copy)]
pub struct RunChannel {
    /// Kernel log records also go to stderr as they come.
    pub verbose: bool,
}

/// Runs the VM described by `cfg` to its end, with the run channel when
/// `channel` is given (then `cfg.run_channel` must be set); returns how it
/// ended and what the channel learned.
pub fn run_vm(
    cfg: VmConfig,
    channel: Option<RunChannel>,
) -> Result<(Outcome, Option<RunReport>), VmmError> {
    builder::preflight(&cfg)?;
    let signals = stop_signalfd()?;
    vcpu::install_kick_handler().map_err(VmmError::KickHandler)?;
    let server = if cfg.qmp.is_empty() {
        None
    } else {
        let s = QmpServer::bind(&cfg.qmp, greeting(&runtime::version()))?;
        Some(Rc::new(RefCell::new(s)))
    };
    if let (Some(server), Some(_)) = (&server, &cfg.agent) {
        server
            .borrow_mut()
            .set_max_output(qmp_output_cap_with_agent());
    }
    let proxy = match &cfg.agent {
        Some(path) => Some(Rc::new(RefCell::new(AgentProxy::new(ProxyConfig {
            socket: Some(path.clone()),
            timeout: Duration::from_secs(cfg.agent_timeout),
        })?))),
        None => None,
    };
    let persistent = Persistent::new(&cfg)?;
    let serial_tail = persistent.serial_tail.clone();

    let inputs: Inputs = Rc::new(RefCell::new(VecDeque::new()));
    let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new().map_err(VmmError::EventLoop)?;
    let timeout = cfg.timeout;
    let events = persistent.events.clone();
    let qmp = server.map(|server| Monitor {
        id: em.add_subscriber(Box::new(server.clone())),
        server,
    });
    let agent = proxy.clone().map(|p| AgentLink::new(&mut em, p));
    let run = match channel {
        Some(c) => Some(RunLink::new(&mut em, c.verbose).map_err(VmmError::RunChannel)?),
        None => None,
    };

    let interactive = cfg.serial == SerialBackend::Stdio && stdin_is_usable();
    let raw = if interactive {
        RawTerminal::enable()
    } else {
        None
    };
    if interactive {
        let (target, ready) = match &persistent.hvc_input {
            Some(input) => (InputTarget::Hvc(input.clone()), input.ready()),
            None => (
                InputTarget::Serial(persistent.serial.clone()),
                &persistent.serial_input_ready,
            ),
        };
        let ready = ready.try_clone().map_err(BuildError::EventFd)?;
        em.add_subscriber(Box::new(ConsoleInput::new(
            target,
            ready,
            raw.is_some(),
            inputs.clone(),
        )));
    }
    let hvc = persistent.hvc_input.clone().map(HvcLink::new);

    let monitors = qmp
        .as_ref()
        .map(|m| m.server.borrow().chardevs().to_vec())
        .unwrap_or_default();
    let name = cfg.name.clone().unwrap_or_else(|| "vm".into());
    let mut rt = Runtime::start(cfg, persistent, monitors, proxy)?;
    log::info!("{name}: started ({})", rt.state().as_str());
    // `--timeout` counts from here: the VM is built (`minivmm run`'s
    // initramfs, made meanwhile on another thread, is loaded).
    let timer = match timeout {
        Some(secs) => {
            let mut t = TimerFd::new().map_err(|e| VmmError::Timer(e.into()))?;
            t.reset(Duration::from_secs(secs), None)
                .map_err(|e| VmmError::Timer(e.into()))?;
            Some(t)
        }
        None => None,
    };
    em.add_subscriber(Box::new(Controller {
        events,
        signals,
        timer,
        inputs: inputs.clone(),
    }));
    let mut io = Io {
        inputs,
        qmp,
        agent,
        run,
        hvc,
        shares: ShareLink::default(),
    };
    // Attach what follows the VM (the virtio-console port's queues) before the
    // first wait: nothing else may wake the loop until the guest needs them.
    io.settle(&mut em, &mut rt);
    io.flush(&mut em);
    while !rt.finished() {
        let waited = match io.deadline() {
            Some(d) => {
                let ms = d.saturating_duration_since(Instant::now()).as_millis();
                // Round up: waking a little late is fine, spinning early is not.
                em.run_with_timeout(i32::try_from(ms + 1).unwrap_or(i32::MAX))
            }
            None => em.run(),
        };
        if let Err(e) = waited {
            // EINTR from a signal that was not ours is harmless.
            log::debug!("event loop interrupted: {e:?}");
        }
        io.settle(&mut em, &mut rt);
        io.flush(&mut em);
    }
    let registers = rt.timeout_registers().to_vec();
    let result = rt.finish();
    // Last replies: what waits for the agent is answered, then every client
    // gets what is pending, within one bound whatever the clients do.
    let deadline = Instant::now() + EXIT_FLUSH;
    if let Some(agent) = &io.agent {
        agent.close_for_exit(deadline);
        if let Some(m) = &io.qmp {
            agent.complete_qmp(&mut m.server.borrow_mut());
        }
    }
    if let Some(m) = &io.qmp {
        m.server
            .borrow_mut()
            .flush_before_exit(deadline.saturating_duration_since(Instant::now()));
    }
    drop(raw);
    if io.run.is_none() && !registers.is_empty() {
        // Where a guest that never finished was: for a plain VM the only
        // report (`minivmm run` puts it in its diagnostics).
        eprintln!("minivmm: the vcpus when the timeout expired:");
        for line in crate::run::verdict::describe_vcpus(&registers) {
            eprintln!("  {line}");
        }
    }
    let report = io.run.map(|r| {
        let mut report = r.finish();
        report.vcpus = registers;
        report.shares_lost = io.shares.lost();
        if let Some(tail) = &serial_tail {
            report.console = tail.lock().unwrap_or_else(|e| e.into_inner()).lines();
        }
        report
    });
    Ok((result?, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;
    use minivmm_tests::{code_print, kvm_available, tiny_guest, CODE_SPIN};

    /// A runtime for a tiny spinning guest, with neither QMP nor agent.
    fn tiny_runtime(test: &str) -> Option<Runtime> {
        if !kvm_available(test) {
            return None;
        }
        let kernel = tiny_guest(test, &[&code_print(b"boot\n"), &CODE_SPIN]);
        let cli = Cli::try_parse_from(["minivmm", "--kernel", &kernel, "--serial", "none"])
            .expect("valid command line");
        let cfg = VmConfig::from(cli);
        vcpu::install_kick_handler().expect("kick handler");
        let persistent = Persistent::new(&cfg).expect("KVM");
        Some(Runtime::start(cfg, persistent, Vec::new(), None).expect("VM"))
    }

    /// `--timeout` pauses the vcpus first and keeps where each was: in the
    /// tiny guest's code (loaded at 0x100000 + the ELF headers).
    #[test]
    fn a_timeout_records_where_the_vcpus_were() {
        let Some(mut rt) = tiny_runtime("timeout-registers") else {
            return;
        };
        rt.input(Input::Timeout).expect("timeout");
        assert!(rt.finished());
        let regs = rt.timeout_registers().to_vec();
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].id, 0);
        // It may not have run yet: anywhere from the entry to the spin loop.
        let entry = 0x10_0000 + 64 + 56;
        let spin = entry + code_print(b"boot\n").len() as u64;
        let rip = regs[0].regs.iter().find(|(n, _)| *n == "rip").map(|r| r.1);
        assert!(rip.is_some_and(|r| (entry..=spin).contains(&r)), "{regs:?}");
        assert!(regs[0].regs.iter().any(|(n, _)| *n == "cr3"));
    }

    /// Guest events pending together are taken cause first: the reboot of a
    /// panicking kernel was signalled last but may be seen first.
    #[test]
    fn a_panic_then_a_reset_is_taken_as_a_panic_first() {
        let ev = VcpuEvents::new().expect("eventfds");
        ev.reset.write(1).unwrap();
        ev.panic.write(1).unwrap();
        ev.shutdown.write(1).unwrap();
        let mut inputs = VecDeque::new();
        guest_events(&ev, &mut inputs);
        assert_eq!(
            format!("{inputs:?}"),
            "[GuestPanic, GuestPowerOff, GuestReset]"
        );
        // Each taken once: a second look finds nothing.
        guest_events(&ev, &mut inputs);
        assert_eq!(inputs.len(), 3);
        *ev.debug_exit_value.lock().unwrap() = Some(3);
        ev.reset.write(1).unwrap();
        ev.debug_exit.write(1).unwrap();
        inputs.clear();
        guest_events(&ev, &mut inputs);
        assert_eq!(format!("{inputs:?}"), "[GuestDebugExit(3), GuestReset]");
    }

    /// Any reply the agent may send reaches a QMP client: the QMP output cap
    /// holds the largest one with its envelope (`{"return": ..., "id": ...}`
    /// and an id of up to a request's size) and the events that may precede it.
    #[test]
    fn output_caps_agree() {
        let envelope = b"{\"return\": , \"id\": }\r\n".len() + agent_proxy::MAX_REQUEST;
        assert!(qmp_output_cap_with_agent() >= agent_proxy::MAX_REPLY + envelope);
        assert!(qmp_output_cap_with_agent() > qmp::server::MAX_PENDING_OUTPUT);
    }

    /// Regression: with no QMP client to send them to and no agent, the events of
    /// stop/cont and reset loops were also recorded in a list that only the agent
    /// side ever emptied, so it grew forever. Whatever is configured, one round of
    /// the loop leaves nothing queued.
    #[test]
    fn events_never_pile_up_without_qmp_or_agent() {
        let Some(mut rt) = tiny_runtime("events-never-pile-up") else {
            return;
        };
        let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new().expect("epoll");
        let mut io = Io {
            inputs: Rc::new(RefCell::new(VecDeque::new())),
            qmp: None,
            agent: None,
            run: None,
            hvc: None,
            shares: ShareLink::default(),
        };
        for round in 0..20 {
            let inputs = [Input::Stop, Input::Cont, Input::SystemReset];
            io.inputs.borrow_mut().extend(inputs);
            io.settle(&mut em, &mut rt);
            assert_eq!(rt.pending_events(), 0, "round {round}");
            assert!(io.inputs.borrow().is_empty());
            assert_eq!(rt.state().as_str(), "running");
        }
        assert!(!rt.finished());
        io.inputs.borrow_mut().push_back(Input::Quit);
        io.settle(&mut em, &mut rt);
        assert_eq!(rt.pending_events(), 0);
        assert_eq!(rt.finish().ok(), Some(Outcome::QmpQuit));
    }
}
