//! Carries out what the [`Machine`] decides: the one place that holds the VM
//! (its vcpus, devices and memory) and turns [`Effect`]s into pauses, rebuilds,
//! button presses and the process's end. QMP commands arrive here too
//! ([`commands`]); lifecycle commands become [`Input`]s like everything else.

mod commands;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use agent_proxy::AgentProxy;
use qmp::protocol::QmpError;
use qmp::server::ChardevInfo;

use crate::builder::{self, AgentPort, BuildError, Persistent, Vm};
use crate::config::VmConfig;
use crate::error::error_chain;
use crate::machine::{Effect, Input, Machine, Outcome, Policy, RunState};
use crate::qmp_event::QmpEvent;

/// Longest wait at exit for the console output to be written (a reader that
/// does not read must not keep the VMM alive; SIGTERM ends it within 2 s).
pub const OUTPUT_DRAIN: Duration = Duration::from_millis(800);

pub use commands::{version, COMMANDS};

/// The running VM and its lifecycle. See the module documentation.
pub struct Runtime {
    cfg: VmConfig,
    persistent: Persistent,
    /// The current VM; `None` only while it is being rebuilt or after a rebuild
    /// failed.
    vm: Option<Vm>,
    machine: Machine,
    /// QMP endpoints, for `query-chardev`.
    monitors: Vec<ChardevInfo>,
    /// The guest-agent proxy, for `guest-*` commands and VM events.
    agent: Option<Rc<RefCell<AgentProxy>>>,
    next_agent_token: u64,
    /// Events emitted and not yet sent to QMP clients.
    events: Vec<QmpEvent>,
    outcome: Option<Outcome>,
    /// A rebuild failed: there is no VM to run.
    fatal: Option<BuildError>,
    /// Where the vcpus were when `--timeout` stopped them.
    timeout_registers: Vec<crate::vcpu::VcpuRegisters>,
}

impl Runtime {
    /// Builds the first VM: running, or parked in prelaunch with `--paused`.
    pub fn start(
        cfg: VmConfig,
        persistent: Persistent,
        monitors: Vec<ChardevInfo>,
        agent: Option<Rc<RefCell<AgentProxy>>>,
    ) -> Result<Self, BuildError> {
        let vm = builder::build_vm(&cfg, &persistent, cfg.paused)?;
        let policy = Policy {
            no_shutdown: cfg.no_shutdown,
            no_reboot: cfg.no_reboot,
            timeout: cfg.timeout,
        };
        let machine = Machine::new(policy, cfg.paused);
        Ok(Self {
            cfg,
            persistent,
            vm: Some(vm),
            machine,
            monitors,
            agent,
            next_agent_token: 0,
            events: Vec::new(),
            outcome: None,
            fatal: None,
            timeout_registers: Vec::new(),
        })
    }

    /// Current run state.
    pub fn state(&self) -> RunState {
        self.machine.state()
    }

    /// Feeds `input` to the machine and carries out its effects. An error is
    /// for the QMP client that asked (a refused `cont`, a failed reset).
    pub fn input(&mut self, input: Input) -> Result<(), QmpError> {
        log::debug!("input {input:?} in state {}", self.state().as_str());
        let effects = self
            .machine
            .handle(input)
            .map_err(|r| QmpError::generic(r.to_string()))?;
        let mut result = Ok(());
        for effect in effects {
            if let Err(e) = self.apply(effect) {
                result = result.and(Err(e));
            }
        }
        result
    }

    fn apply(&mut self, effect: Effect) -> Result<(), QmpError> {
        match effect {
            Effect::Emit(ev) => self.emit(ev),
            Effect::Pause => {
                let paused = self.vm.as_mut().map_or(Ok(()), Vm::pause);
                if let Err(e) = paused {
                    // A vcpu that cannot be stopped is a failed VM. (Ignored when
                    // the VM is already failed: that is what made it stop.)
                    let _ = self.input(Input::VmFailed(e.to_string()));
                }
            }
            Effect::Resume => {
                if let Some(vm) = self.vm.as_mut() {
                    vm.resume();
                }
            }
            Effect::Rebuild { run } => return self.rebuild(run),
            Effect::PressPowerButton => {
                if let Some(vm) = &self.vm {
                    vm.press_power_button()
                        .map_err(|e| QmpError::generic(format!("power button: {e}")))?;
                }
            }
            Effect::Report(what) => eprintln!("minivmm: error: the VM failed: {what}\r"),
            Effect::Exit(outcome) => {
                if let (Outcome::Timeout(_), Some(vm)) = (&outcome, &self.vm) {
                    self.timeout_registers = vm.vcpu_registers();
                    for line in vm.virtio_report() {
                        log::warn!("at the timeout: virtio {line}");
                    }
                }
                self.outcome = Some(outcome);
            }
        }
        Ok(())
    }

    fn rebuild(&mut self, run: bool) -> Result<(), QmpError> {
        // The old VM's vcpus stop and its memory goes before the new one exists.
        drop(self.vm.take());
        self.persistent.events.drain();
        log::info!(
            "rebuilding the VM (generation {})",
            self.machine.generation()
        );
        match builder::build_vm(&self.cfg, &self.persistent, !run) {
            Ok(vm) => {
                self.vm = Some(vm);
                Ok(())
            }
            Err(e) => {
                let msg = format!("reset failed: {}", error_chain(&e));
                self.fatal = Some(e);
                Err(QmpError::generic(msg))
            }
        }
    }

    /// Queues an event for QMP clients; VM events also complete the guest-agent
    /// commands that have no success reply (`guest-shutdown`, ...).
    pub fn emit(&mut self, ev: QmpEvent) {
        if matches!(ev, QmpEvent::Shutdown(_) | QmpEvent::Reset(_)) {
            if let Some(agent) = &self.agent {
                agent.borrow_mut().vm_event(ev.name());
            }
        }
        self.events.push(ev);
    }

    /// Events emitted since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    /// Number of events emitted and not yet taken.
    #[cfg(test)]
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// Where the vcpus were when `--timeout` stopped them (empty otherwise).
    pub fn timeout_registers(&self) -> &[crate::vcpu::VcpuRegisters] {
        &self.timeout_registers
    }

    /// Whether the process must end now.
    pub fn finished(&self) -> bool {
        self.outcome.is_some() || self.fatal.is_some()
    }

    /// The current VM's guest-agent port, with the VM's generation (a new
    /// generation means a new port).
    pub fn agent_port(&self) -> Option<(u64, AgentPort)> {
        let port = self.vm.as_ref()?.agent_port()?.clone();
        Some((self.machine.generation(), port))
    }

    /// The current VM's virtio console, with the VM's generation.
    pub fn hvc_port(&self) -> Option<(u64, crate::builder::HvcPort)> {
        let port = self.vm.as_ref()?.hvc_port()?.clone();
        Some((self.machine.generation(), port))
    }

    /// The current VM's `--share` devices, with the VM's generation (None
    /// without a VM or without shares).
    pub fn fs_ports(&self) -> Option<(u64, &[crate::share::FsPort])> {
        let ports = self.vm.as_ref()?.fs_ports();
        if ports.is_empty() {
            return None;
        }
        Some((self.machine.generation(), ports))
    }

    /// Stops the vcpus, releases the VM, writes out the console (waiting at most
    /// [`OUTPUT_DRAIN`]; what could not be written is reported on stderr); says
    /// how it ended.
    pub fn finish(mut self) -> Result<Outcome, BuildError> {
        drop(self.vm.take());
        let lost = self.persistent.finish_serial(Instant::now() + OUTPUT_DRAIN);
        if lost.total() > 0 {
            eprintln!(
                "minivmm: {} bytes of guest console output could not be written ({} dropped while running, {} still unwritten at exit): the output was not read fast enough or failed",
                lost.total(),
                lost.dropped,
                lost.unwritten
            );
        }
        match (self.fatal, self.outcome) {
            (Some(e), _) => Err(e),
            (None, Some(o)) => Ok(o),
            // The event loop only ends once the machine decided; never reached.
            (None, None) => Ok(Outcome::Failed("the VMM stopped unexpectedly".into())),
        }
    }
}
