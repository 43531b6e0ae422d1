//! The VM's lifecycle as QMP sees it: run states, the transitions driven by the
//! guest (power-off, reset, panic, failure) and by the host (QMP commands,
//! signals), the events each transition emits, and the QMP command handler.

use qmp::protocol::{event, version_info, ArgSpec, ArgType, CommandSpec, QmpError, Request};
use qmp::server::Reply;
use std::cell::RefCell;
use std::rc::Rc;

use agent_proxy::AgentProxy;

/// Id of the guest-agent channel in `query-chardev` and `VSERPORT_CHANGE`.
pub const AGENT_CHANNEL_ID: &str = "qga0";
use serde_json::{json, Value};

use crate::builder::{self, Backends, BuildError, Vm};
use crate::config::{SerialBackend, VmConfig};

/// QMP run states minivmm can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Built, vcpus never started (`--paused`, or after a reset while stopped).
    Prelaunch,
    /// vcpus running.
    Running,
    /// Stopped by QMP `stop`.
    Paused,
    /// The guest powered off and `--no-shutdown` kept the process.
    Shutdown,
    /// The guest panicked and `--no-shutdown` kept the process.
    GuestPanicked,
    /// KVM failed and `--no-shutdown` kept the process.
    InternalError,
}

impl RunState {
    /// QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::GuestPanicked => "guest-panicked",
            RunState::InternalError => "internal-error",
        }
    }

    /// States only a reset leaves.
    pub fn needs_reset(self) -> bool {
        matches!(
            self,
            RunState::Shutdown | RunState::GuestPanicked | RunState::InternalError
        )
    }
}

/// Why the VMM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted and `--no-reboot` was given.
    RebootRefused,
    /// Ctrl-A x.
    Quit,
    /// QMP `quit`.
    QmpQuit,
    /// `--timeout` expired.
    Timeout(u64),
    /// SIGINT/SIGTERM/SIGHUP.
    Signal(i32),
    /// The guest panicked.
    Panicked,
    /// A vcpu failed.
    Failed(String),
}

impl Outcome {
    /// Process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::PowerOff | Outcome::RebootRefused | Outcome::Quit | Outcome::QmpQuit => 0,
            Outcome::Timeout(_) => 124,
            Outcome::Signal(n) => 128 + n,
            Outcome::Panicked | Outcome::Failed(_) => 1,
        }
    }

    /// What to tell the user on stderr, if anything.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::PowerOff | Outcome::QmpQuit => None,
            Outcome::RebootRefused => Some("guest rebooted; exiting because of --no-reboot".into()),
            Outcome::Quit => Some("quit from the console (Ctrl-A x)".into()),
            Outcome::Timeout(s) => Some(format!("--timeout of {s} s expired; VM stopped")),
            Outcome::Signal(n) => Some(format!("received {}; VM stopped", signal_name(*n))),
            Outcome::Panicked => Some("error: the guest panicked".into()),
            Outcome::Failed(e) => Some(format!("error: the VM failed: {e}")),
        }
    }
}

fn signal_name(n: i32) -> String {
    match n {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// Lifecycle requests from outside QMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Guest power-off.
    PowerOff,
    /// Guest reset.
    Reset,
    /// Guest panic.
    Panic,
    /// vcpu failure.
    Failed,
    /// Stop signal.
    Signal(i32),
    /// `--timeout` expired.
    Timeout,
    /// Ctrl-A x.
    Quit,
}

fn shutdown_event(guest: bool, reason: &str) -> Value {
    event("SHUTDOWN", Some(json!({"guest": guest, "reason": reason})))
}

/// The VM, its state, and what QMP may ask of it.
pub struct Machine {
    cfg: VmConfig,
    backends: Backends,
    vm: Option<Vm>,
    state: RunState,
    /// Set when the process must end.
    pub exit: Option<Outcome>,
    /// A failure that leaves no VM to run (a rebuild that failed).
    pub fatal: Option<BuildError>,
    monitors: Vec<qmp::server::ChardevInfo>,
    /// Names of the events emitted since the last [`Machine::take_event_names`].
    event_names: Vec<String>,
    /// The guest-agent proxy, for `guest-*` commands.
    agent: Option<Rc<RefCell<AgentProxy>>>,
    next_agent_token: u64,
    /// Whether the guest has the agent port open (for `query-chardev`).
    pub agent_open: bool,
}

impl Machine {
    fn emit(&mut self, events: &mut Vec<Value>, ev: Value) {
        if let Some(n) = ev["event"].as_str() {
            self.event_names.push(n.to_string());
        }
        events.push(ev);
    }

    /// Names of the events emitted since the last call.
    pub fn take_event_names(&mut self) -> Vec<String> {
        std::mem::take(&mut self.event_names)
    }

    /// Connects the guest-agent proxy.
    pub fn set_agent(&mut self, agent: Rc<RefCell<AgentProxy>>) {
        self.agent = Some(agent);
    }

    /// The current VM's guest-agent port, if any.
    pub fn agent_port(&self) -> Option<builder::AgentPort> {
        self.vm.as_ref().and_then(|v| v.agent_port().cloned())
    }

    /// Builds the VM; running, or parked in prelaunch with `--paused`.
    pub fn start(
        cfg: VmConfig,
        backends: Backends,
        monitors: Vec<qmp::server::ChardevInfo>,
    ) -> Result<Self, BuildError> {
        let vm = builder::build_vm(&cfg, &backends, cfg.paused)?;
        let state = if cfg.paused {
            RunState::Prelaunch
        } else {
            RunState::Running
        };
        Ok(Self {
            cfg,
            backends,
            vm: Some(vm),
            state,
            exit: None,
            fatal: None,
            monitors,
            event_names: Vec::new(),
            agent: None,
            next_agent_token: 0,
            agent_open: false,
        })
    }

    /// Current state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// The host-side backends.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Stops the vcpus and releases the VM.
    pub fn teardown(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.stop();
        }
        self.backends.flush_serial();
    }

    fn pause_vcpus(&mut self) {
        if let Some(vm) = self.vm.as_mut() {
            vm.pause();
        }
    }

    /// Stops a running VM into `to`, emitting STOP.
    fn halt(&mut self, to: RunState, events: &mut Vec<Value>) {
        if self.state == RunState::Running {
            self.pause_vcpus();
            self.emit(events, event("STOP", None));
        } else {
            // Prelaunch/paused vcpus are parked already.
            self.pause_vcpus();
        }
        self.state = to;
    }

    /// QMP `stop`.
    pub fn stop(&mut self, events: &mut Vec<Value>) {
        if self.state == RunState::Running {
            self.halt(RunState::Paused, events);
        }
    }

    /// QMP `cont`.
    pub fn cont(&mut self, events: &mut Vec<Value>) -> Result<(), QmpError> {
        if self.state.needs_reset() {
            return Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            ));
        }
        if self.state != RunState::Running {
            if let Some(vm) = self.vm.as_mut() {
                vm.resume();
            }
            self.state = RunState::Running;
            self.emit(events, event("RESUME", None));
        }
        Ok(())
    }

    /// Rebuilds the VM from its config. A running VM runs again; a stopped one
    /// comes back in prelaunch (as QEMU does).
    pub fn reset(&mut self, guest: bool, events: &mut Vec<Value>) -> Result<(), BuildError> {
        let reason = if guest {
            "guest-reset"
        } else {
            "host-qmp-system-reset"
        };
        self.emit(
            events,
            event("RESET", Some(json!({"guest": guest, "reason": reason}))),
        );
        let run = self.state == RunState::Running;
        if let Some(vm) = self.vm.take() {
            vm.stop();
        }
        self.backends.events.drain();
        log::info!("reset ({reason}): rebuilding the VM");
        self.vm = Some(builder::build_vm(&self.cfg, &self.backends, !run)?);
        self.state = if run {
            RunState::Running
        } else {
            RunState::Prelaunch
        };
        Ok(())
    }

    /// Handles a lifecycle request from the guest or the host.
    pub fn on_request(&mut self, req: Lifecycle, events: &mut Vec<Value>) {
        if self.exit.is_some() {
            return;
        }
        let guest_stopped = self.state.needs_reset();
        let no_shutdown = self.cfg.no_shutdown;
        match req {
            Lifecycle::PowerOff | Lifecycle::Reset | Lifecycle::Panic | Lifecycle::Failed
                if guest_stopped =>
            {
                log::debug!("ignoring {req:?} in state {}", self.state.as_str());
            }
            Lifecycle::PowerOff => {
                self.emit(events, shutdown_event(true, "guest-shutdown"));
                if no_shutdown {
                    self.halt(RunState::Shutdown, events);
                } else {
                    self.exit = Some(Outcome::PowerOff);
                }
            }
            Lifecycle::Reset if self.cfg.no_reboot => {
                self.emit(events, shutdown_event(true, "guest-reset"));
                if no_shutdown {
                    self.halt(RunState::Shutdown, events);
                } else {
                    self.exit = Some(Outcome::RebootRefused);
                }
            }
            Lifecycle::Reset => {
                if let Err(e) = self.reset(true, events) {
                    self.fatal = Some(e);
                }
            }
            Lifecycle::Panic => {
                if no_shutdown {
                    self.emit(
                        events,
                        event("GUEST_PANICKED", Some(json!({"action": "pause"}))),
                    );
                    self.halt(RunState::GuestPanicked, events);
                } else {
                    self.emit(
                        events,
                        event("GUEST_PANICKED", Some(json!({"action": "poweroff"}))),
                    );
                    self.emit(events, shutdown_event(true, "guest-panic"));
                    self.exit = Some(Outcome::Panicked);
                }
            }
            Lifecycle::Failed => {
                let info = self
                    .backends
                    .events
                    .error_info
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_else(|| "unknown vcpu failure".into());
                if no_shutdown {
                    eprintln!("minivmm: error: the VM failed: {info}\r");
                    self.halt(RunState::InternalError, events);
                } else {
                    self.exit = Some(Outcome::Failed(info));
                }
            }
            Lifecycle::Signal(n) => {
                self.emit(events, shutdown_event(false, "host-signal"));
                self.exit = Some(Outcome::Signal(n));
            }
            Lifecycle::Timeout => self.exit = Some(Outcome::Timeout(self.cfg.timeout.unwrap_or(0))),
            Lifecycle::Quit => {
                self.emit(events, shutdown_event(false, "host-ui"));
                self.exit = Some(Outcome::Quit);
            }
        }
    }

    fn serial_filename(&self) -> String {
        match &self.cfg.serial {
            SerialBackend::Stdio => "stdio".into(),
            SerialBackend::File(p) => format!("file:{}", p.display()),
            SerialBackend::None => "null".into(),
        }
    }

    fn thread_ids(&self) -> Vec<i32> {
        self.vm
            .as_ref()
            .map(|v| v.vcpu_thread_ids().to_vec())
            .unwrap_or_default()
    }
}

const NO_ARGS: &[ArgSpec] = &[];

/// Every command minivmm answers besides `qmp_capabilities`.
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "query-status",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-kvm",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-version",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-name",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-uuid",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-commands",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-chardev",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-cpus-fast",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-cpus",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-block",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-blockstats",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-mice",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-vnc",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-spice",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "query-migrate",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "stop",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "cont",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "system_reset",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "system_powerdown",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "quit",
        args: NO_ARGS,
    },
    CommandSpec {
        name: "cpu",
        args: &[ArgSpec {
            name: "index",
            ty: ArgType::Int,
            required: true,
        }],
    },
];

/// The greeting's and `query-version`'s version object.
pub fn version() -> Value {
    let n = |s: &str| s.parse::<u64>().unwrap_or(0);
    version_info(
        n(env!("CARGO_PKG_VERSION_MAJOR")),
        n(env!("CARGO_PKG_VERSION_MINOR")),
        n(env!("CARGO_PKG_VERSION_PATCH")),
        concat!("minivmm ", env!("CARGO_PKG_VERSION")),
    )
}

impl qmp::server::Handler for Machine {
    fn commands(&self) -> &[CommandSpec] {
        COMMANDS
    }

    fn passes_through(&self, name: &str) -> bool {
        name.starts_with("guest-")
    }

    fn execute(&mut self, req: &Request, events: &mut Vec<Value>) -> Reply {
        if req.name.starts_with("guest-") {
            let Some(agent) = &self.agent else {
                return Reply::Now(Err(QmpError::generic(
                    "No guest agent channel: start minivmm with --agent unix:PATH",
                )));
            };
            self.next_agent_token += 1;
            let token = self.next_agent_token;
            let mut cmd = serde_json::Map::new();
            cmd.insert("execute".into(), json!(req.name));
            if !req.args.is_empty() {
                cmd.insert("arguments".into(), Value::Object(req.args.clone()));
            }
            agent.borrow_mut().submit_qmp(token, Value::Object(cmd));
            return Reply::Later(token);
        }
        Reply::Now(self.execute_now(req, events))
    }
}

impl Machine {
    fn execute_now(&mut self, req: &Request, events: &mut Vec<Value>) -> Result<Value, QmpError> {
        let ok = Ok(json!({}));
        match req.name.as_str() {
            "query-status" => Ok(json!({
                "status": self.state.as_str(),
                "singlestep": false,
                "running": self.state == RunState::Running,
            })),
            "query-kvm" => Ok(json!({"enabled": true, "present": true})),
            "query-version" => Ok(version()),
            "query-name" => Ok(match &self.cfg.name {
                Some(n) => json!({"name": n}),
                None => json!({}),
            }),
            "query-uuid" => Ok(json!({
                "UUID": self.cfg.uuid.as_deref().unwrap_or("00000000-0000-0000-0000-000000000000")
            })),
            "query-commands" => {
                let mut names: Vec<Value> =
                    COMMANDS.iter().map(|c| json!({"name": c.name})).collect();
                names.push(json!({"name": "qmp_capabilities"}));
                Ok(Value::Array(names))
            }
            "query-chardev" => {
                let mut v = vec![json!({
                    "frontend-open": true,
                    "filename": self.serial_filename(),
                    "label": "serial0",
                })];
                for m in &self.monitors {
                    v.push(json!({"frontend-open": true, "filename": m.filename, "label": m.label}));
                }
                if let Some(filename) = self.agent.as_ref().and_then(|a| a.borrow().socket_filename()) {
                    v.push(json!({
                        "frontend-open": self.agent_open,
                        "filename": filename,
                        "label": AGENT_CHANNEL_ID,
                    }));
                }
                Ok(Value::Array(v))
            }
            "query-cpus-fast" => Ok(Value::Array(
                self.thread_ids()
                    .iter()
                    .enumerate()
                    .map(|(i, tid)| {
                        json!({
                            "thread-id": tid,
                            "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                            "qom-path": format!("/machine/unattached/device[{i}]"),
                            "cpu-index": i,
                            "target": "x86_64",
                        })
                    })
                    .collect(),
            )),
            "query-cpus" => Ok(Value::Array(
                self.thread_ids()
                    .iter()
                    .enumerate()
                    .map(|(i, tid)| {
                        json!({"CPU": i, "current": i == 0, "halted": false, "thread_id": tid})
                    })
                    .collect(),
            )),
            "query-block" | "query-blockstats" | "query-mice" => Ok(json!([])),
            "query-vnc" | "query-spice" => Ok(json!({"enabled": false})),
            "query-migrate" => ok,
            "cpu" => ok,
            "stop" => {
                self.stop(events);
                ok
            }
            "cont" => self.cont(events).map(|_| json!({})),
            "system_reset" => match self.reset(false, events) {
                Ok(()) => ok,
                Err(e) => {
                    let msg = format!("reset failed: {e}");
                    self.fatal = Some(e);
                    Err(QmpError::generic(msg))
                }
            },
            "system_powerdown" => {
                self.emit(events, event("POWERDOWN", None));
                if let Some(vm) = &self.vm {
                    vm.press_power_button()
                        .map_err(|e| QmpError::generic(format!("power button: {e}")))?;
                }
                ok
            }
            "quit" => {
                self.emit(events, shutdown_event(false, "host-qmp-quit"));
                self.exit = Some(Outcome::QmpQuit);
                ok
            }
            other => Err(QmpError::not_found(format!(
                "The command {other} has not been found"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(Outcome::PowerOff.exit_code(), 0);
        assert_eq!(Outcome::RebootRefused.exit_code(), 0);
        assert_eq!(Outcome::Quit.exit_code(), 0);
        assert_eq!(Outcome::QmpQuit.exit_code(), 0);
        assert_eq!(Outcome::Timeout(5).exit_code(), 124);
        assert_eq!(Outcome::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(Outcome::Signal(libc::SIGINT).exit_code(), 130);
        assert_eq!(Outcome::Failed("x".into()).exit_code(), 1);
        assert_eq!(Outcome::Panicked.exit_code(), 1);
        assert!(Outcome::PowerOff.message().is_none());
        assert!(Outcome::Signal(libc::SIGTERM)
            .message()
            .unwrap()
            .contains("SIGTERM"));
    }

    #[test]
    fn run_states() {
        assert_eq!(RunState::GuestPanicked.as_str(), "guest-panicked");
        assert!(RunState::Shutdown.needs_reset());
        assert!(!RunState::Paused.needs_reset());
        assert!(!RunState::Prelaunch.needs_reset());
    }

    #[test]
    fn version_names_minivmm() {
        let v = version();
        assert!(v["package"].as_str().unwrap().starts_with("minivmm "));
        assert!(v["qemu"]["major"].is_u64());
    }

    #[test]
    fn command_table_is_unique() {
        let mut names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COMMANDS.len());
    }
}
