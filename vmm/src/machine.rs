//! The VM's lifecycle as a pure state machine: [`Machine::handle`] takes an
//! [`Input`] (something the guest, a QMP client or the host did) and returns the
//! [`Effect`]s to carry out, in order: events to emit, vcpus to pause or resume,
//! the VM to rebuild, the process to end. It touches no KVM and no file
//! descriptor, so every transition is a unit test; [`crate::runtime`] carries the
//! effects out.

use crate::qmp_event::{Cause, PanicAction, QmpEvent};

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
    /// The VM failed and `--no-shutdown` kept the process.
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
    /// `--timeout` expired after this many seconds.
    Timeout(u64),
    /// SIGINT/SIGTERM/SIGHUP.
    Signal(i32),
    /// The guest panicked.
    Panicked,
    /// The guest wrote this value to isa-debug-exit (`--isa-debug-exit`).
    DebugExit(u32),
    /// `minivmm run`: the command ended (how, the run channel says).
    CommandEnded,
    /// The VM failed: a KVM error, a vcpu that died or stopped responding.
    Failed(String),
}

impl Outcome {
    /// Process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::PowerOff
            | Outcome::RebootRefused
            | Outcome::Quit
            | Outcome::QmpQuit
            | Outcome::CommandEnded => 0,
            Outcome::Timeout(_) => 124,
            Outcome::Signal(n) => 128 + n,
            Outcome::Panicked | Outcome::Failed(_) => 1,
            // As QEMU: exit((v << 1) | 1); the system keeps the low 8 bits.
            Outcome::DebugExit(v) => (devices::debug_exit::exit_status(*v) & 0xff) as i32,
        }
    }

    /// What to tell the user on stderr, if anything.
    pub fn message(&self) -> Option<String> {
        match self {
            Outcome::PowerOff
            | Outcome::QmpQuit
            | Outcome::DebugExit(_)
            | Outcome::CommandEnded => None,
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

/// Something that may change the VM's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The guest powered off.
    GuestPowerOff,
    /// The guest asked for a reset.
    GuestReset,
    /// The guest reported a panic.
    GuestPanic,
    /// The guest wrote this value to isa-debug-exit.
    GuestDebugExit(u32),
    /// `minivmm run`: the guest's init reported the command's end.
    CommandEnded,
    /// The VM failed (KVM error, a vcpu died or stopped responding); the text
    /// says what happened.
    VmFailed(String),
    /// A stop signal arrived.
    Signal(i32),
    /// `--timeout` expired.
    Timeout,
    /// Ctrl-A x on the console.
    ConsoleQuit,
    /// QMP `stop`.
    Stop,
    /// QMP `cont`.
    Cont,
    /// QMP `system_reset`.
    SystemReset,
    /// QMP `system_powerdown`.
    SystemPowerdown,
    /// QMP `quit`.
    Quit,
}

/// Something to carry out, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send an event to QMP clients (and tell the agent proxy).
    Emit(QmpEvent),
    /// Park every vcpu (pending I/O completed) and freeze the guest clock.
    Pause,
    /// Let the vcpus run again.
    Resume,
    /// Tear the VM down and build it afresh: running, or parked in prelaunch.
    Rebuild {
        /// Start the new vcpus.
        run: bool,
    },
    /// Press the ACPI power button.
    PressPowerButton,
    /// Tell the user about a failure the process survives (`--no-shutdown`).
    Report(String),
    /// End the process.
    Exit(Outcome),
}

/// Why a command was refused; the state did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `cont` in a state only a reset leaves.
    #[error("Resetting the Virtual Machine is required")]
    ResetRequired,
}

/// The choices of the command line that decide transitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the process when the guest stops (`--no-shutdown`).
    pub no_shutdown: bool,
    /// Exit instead of rebooting (`--no-reboot`).
    pub no_reboot: bool,
    /// `--timeout`, seconds (for the outcome's message).
    pub timeout: Option<u64>,
}

/// The lifecycle state. See the module documentation.
#[derive(Debug)]
pub struct Machine {
    state: RunState,
    policy: Policy,
    /// Counts VM builds: 0 for the first, +1 per rebuild.
    generation: u64,
    /// Set once an [`Effect::Exit`] was returned; later inputs change nothing.
    exiting: bool,
}

impl Machine {
    /// A machine whose first VM runs, or waits in prelaunch when `paused`.
    pub fn new(policy: Policy, paused: bool) -> Self {
        Self {
            state: if paused {
                RunState::Prelaunch
            } else {
                RunState::Running
            },
            policy,
            generation: 0,
            exiting: false,
        }
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Which VM build is current: it changes exactly when an
    /// [`Effect::Rebuild`] is returned, so holders of per-VM resources (the
    /// agent port) can tell that the VM they knew is gone.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the process is ending.
    pub fn is_exiting(&self) -> bool {
        self.exiting
    }

    /// Applies `input`; returns what to do, in order.
    pub fn handle(&mut self, input: Input) -> Result<Vec<Effect>, Refusal> {
        use Effect::*;
        if self.exiting {
            log::debug!("ignoring {input:?}: the VMM is exiting");
            return Ok(Vec::new());
        }
        let guest_input = matches!(
            input,
            Input::GuestPowerOff | Input::GuestReset | Input::GuestPanic | Input::VmFailed(_)
        );
        if guest_input && self.state.needs_reset() {
            log::debug!("ignoring {input:?} in state {}", self.state.as_str());
            return Ok(Vec::new());
        }
        let keep = self.policy.no_shutdown;
        let fx = match input {
            Input::GuestPowerOff => {
                let mut fx = vec![Emit(QmpEvent::Shutdown(Cause::GuestShutdown))];
                self.stop_or_exit(&mut fx, RunState::Shutdown, Outcome::PowerOff);
                fx
            }
            Input::GuestReset if self.policy.no_reboot => {
                let mut fx = vec![Emit(QmpEvent::Shutdown(Cause::GuestReset))];
                self.stop_or_exit(&mut fx, RunState::Shutdown, Outcome::RebootRefused);
                fx
            }
            Input::GuestReset => self.rebuild(Cause::GuestReset),
            Input::GuestPanic if keep => {
                let mut fx = vec![Emit(QmpEvent::GuestPanicked(PanicAction::Pause))];
                self.park_into(&mut fx, RunState::GuestPanicked);
                fx
            }
            Input::GuestPanic => {
                let fx = vec![
                    Emit(QmpEvent::GuestPanicked(PanicAction::Poweroff)),
                    Emit(QmpEvent::Shutdown(Cause::GuestPanic)),
                ];
                self.exit(fx, Outcome::Panicked)
            }
            Input::VmFailed(what) if keep => {
                let mut fx = vec![Report(what)];
                self.park_into(&mut fx, RunState::InternalError);
                fx
            }
            Input::VmFailed(what) => self.exit(Vec::new(), Outcome::Failed(what)),
            // QEMU exits at once, with no event, whatever --no-shutdown says.
            Input::GuestDebugExit(v) => self.exit(Vec::new(), Outcome::DebugExit(v)),
            Input::CommandEnded => self.exit(Vec::new(), Outcome::CommandEnded),
            Input::Signal(n) => self.exit(
                vec![Emit(QmpEvent::Shutdown(Cause::HostSignal))],
                Outcome::Signal(n),
            ),
            Input::Timeout => {
                // Paused first, so that where the vcpus were is on record.
                let secs = self.policy.timeout.unwrap_or(0);
                self.exit(vec![Pause], Outcome::Timeout(secs))
            }
            Input::ConsoleQuit => {
                self.exit(vec![Emit(QmpEvent::Shutdown(Cause::HostUi))], Outcome::Quit)
            }
            Input::Quit => self.exit(
                vec![Emit(QmpEvent::Shutdown(Cause::HostQmpQuit))],
                Outcome::QmpQuit,
            ),
            Input::Stop => {
                let mut fx = Vec::new();
                if self.state == RunState::Running {
                    self.park_into(&mut fx, RunState::Paused);
                }
                fx
            }
            Input::Cont => {
                if self.state.needs_reset() {
                    return Err(Refusal::ResetRequired);
                }
                if self.state == RunState::Running {
                    Vec::new()
                } else {
                    self.state = RunState::Running;
                    vec![Resume, Emit(QmpEvent::Resume)]
                }
            }
            Input::SystemReset => self.rebuild(Cause::HostQmpSystemReset),
            Input::SystemPowerdown => vec![Emit(QmpEvent::Powerdown), PressPowerButton],
        };
        Ok(fx)
    }

    /// The guest stopped: kept in `state` with `--no-shutdown`, else the end.
    fn stop_or_exit(&mut self, fx: &mut Vec<Effect>, state: RunState, outcome: Outcome) {
        if self.policy.no_shutdown {
            self.park_into(fx, state);
        } else {
            self.exiting = true;
            fx.push(Effect::Exit(outcome));
        }
    }

    /// Parks the vcpus (STOP if they were running) and enters `state`.
    fn park_into(&mut self, fx: &mut Vec<Effect>, state: RunState) {
        // Prelaunch or paused vcpus are parked already; pausing again is harmless
        // and covers vcpus that stopped on their own (halted, failed).
        fx.push(Effect::Pause);
        if self.state == RunState::Running {
            fx.push(Effect::Emit(QmpEvent::Stop));
        }
        self.state = state;
    }

    fn exit(&mut self, mut fx: Vec<Effect>, outcome: Outcome) -> Vec<Effect> {
        self.exiting = true;
        fx.push(Effect::Exit(outcome));
        fx
    }

    /// A reset: a running VM runs again, a stopped one comes back in prelaunch
    /// (as QEMU does).
    fn rebuild(&mut self, cause: Cause) -> Vec<Effect> {
        let run = self.state == RunState::Running;
        self.state = if run {
            RunState::Running
        } else {
            RunState::Prelaunch
        };
        self.generation += 1;
        vec![
            Effect::Emit(QmpEvent::Reset(cause)),
            Effect::Rebuild { run },
        ]
    }
}

#[cfg(test)]
mod tests;
