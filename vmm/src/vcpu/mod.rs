//! vcpu threads: one per vcpu, running `KVM_RUN` and dispatching port I/O and MMIO
//! exits to the buses (module `exit`). A vcpu thread never decides the VM's fate:
//! power-off, reset and failures are signalled to the VMM thread through
//! eventfds ([`VcpuEvents`]).
//!
//! The VMM thread asks all vcpus to run, pause or stop, and each vcpu answers by
//! moving through its run states ([`VcpuState`], module `state`). Taking vcpus out
//! of the guest uses `immediate_exit`, as Firecracker does: the VMM posts the
//! request and sends each running vcpu thread a real-time signal whose handler
//! sets `kvm_run.immediate_exit`, so a vcpu that was about to enter the guest
//! returns at once instead of missing the signal. A pausing vcpu completes its
//! pending I/O and tells a kvmclock guest it was stopped (`KVM_KVMCLOCK_CTRL`)
//! before it parks.
//!
//! The VMM never waits for a vcpu without a bound ([`RESPONSE_TIMEOUT`]): a vcpu
//! thread that panics (a buggy device model) is caught, reported as a vcpu
//! failure and counted as `Exited`; one that does not answer in time is named
//! in a [`VcpuError::NoResponse`], and left behind if it cannot be joined.

use std::cell::Cell;
use std::ptr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

mod events;
mod exit;
mod state;
mod thread;

pub use events::VcpuEvents;
pub use state::VcpuState;
use state::{Control, Request};
use thread::Vcpu;

/// How long the VMM waits for vcpus to start, park or end. A vcpu answers within
/// microseconds unless a device access blocks it (a console writing to a stalled
/// host terminal, say); such a vcpu still answers once that access completes.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting or controlling vcpu threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vcpu thread could not be created.
    #[error("cannot start a vcpu thread")]
    Spawn(#[source] std::io::Error),
    /// Some vcpus did not answer a request within `timeout`.
    #[error("{} did not {what} within {timeout:?}", vcpu_names(.ids))]
    NoResponse {
        /// What they were asked: "start", "pause", "stop".
        what: &'static str,
        /// Which vcpus did not answer.
        ids: Vec<usize>,
        /// How long they were given.
        timeout: Duration,
    },
}

fn vcpu_names(ids: &[usize]) -> String {
    let names: Vec<String> = ids.iter().map(|i| format!("vcpu{i}")).collect();
    names.join(", ")
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// Signal used to kick vcpus out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's mapped `kvm_run`, published by the vcpu loop
        // while its `VcpuFd` is alive and cleared before it is dropped.
        let field = unsafe { ptr::addr_of_mut!((*run).immediate_exit) };
        // SAFETY: `field` points into that live mapping; a volatile byte store is
        // async-signal-safe.
        unsafe { ptr::write_volatile(field, 1) };
    }
}

/// Installs the kick handler; call once per process before starting vcpus.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// One vcpu's registers as it last parked: (name, value) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuRegisters {
    /// The vcpu's index.
    pub id: usize,
    /// General and control registers, in a fixed order (`rip` first).
    pub regs: Vec<(&'static str, u64)>,
}

/// The registers each vcpu recorded when it last parked.
#[derive(Debug, Default)]
pub struct Snapshots(std::sync::Mutex<Vec<Vec<(&'static str, u64)>>>);

impl Snapshots {
    fn set(&self, id: usize, regs: Vec<(&'static str, u64)>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() <= id {
            v.resize(id + 1, Vec::new());
        }
        v[id] = regs;
    }
}

/// The vcpu threads of one VM. Dropping it stops them.
pub struct Vcpus {
    /// Indexed by vcpu id.
    threads: Vec<JoinHandle<()>>,
    tids: Vec<i32>,
    ctl: Arc<Control>,
    /// Bound of every wait for the vcpus.
    timeout: Duration,
    snapshots: Arc<Snapshots>,
}

impl Vcpus {
    /// Starts one thread per vcpu; with `paused` they park before entering the
    /// guest until [`Vcpus::resume`], and this returns once they have.
    pub fn start(
        fds: Vec<VcpuFd>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: Arc<VcpuEvents>,
        paused: bool,
    ) -> Result<Self, VcpuError> {
        Self::start_with_timeout(fds, pio, mmio, events, paused, RESPONSE_TIMEOUT)
    }

    fn start_with_timeout(
        fds: Vec<VcpuFd>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: Arc<VcpuEvents>,
        paused: bool,
        timeout: Duration,
    ) -> Result<Self, VcpuError> {
        let count = fds.len();
        let ctl = Arc::new(Control::new(count, paused));
        // On an early return, dropping `vcpus` stops the threads started so far.
        let mut vcpus = Self {
            threads: Vec::with_capacity(count),
            tids: vec![0; count],
            ctl: ctl.clone(),
            timeout,
            snapshots: Arc::new(Snapshots::default()),
        };
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        for (id, fd) in fds.into_iter().enumerate() {
            let vcpu = Vcpu {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                events: events.clone(),
                ctl: ctl.clone(),
                snapshots: vcpus.snapshots.clone(),
            };
            match thread::spawn(vcpu, tid_tx.clone()) {
                Ok(t) => vcpus.threads.push(t),
                Err(e) => {
                    // These never ran.
                    (id..count).for_each(|i| ctl.exited(i));
                    return Err(VcpuError::Spawn(e));
                }
            }
        }
        drop(tid_tx);
        let deadline = Instant::now() + timeout;
        for _ in 0..count {
            match tid_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((id, tid)) => vcpus.tids[id] = tid,
                Err(_) => {
                    let ids = (0..count).filter(|&i| vcpus.tids[i] == 0).collect();
                    return Err(vcpus.no_response("start", ids));
                }
            }
        }
        if paused {
            // Prelaunch: return once every vcpu is parked.
            vcpus
                .ctl
                .wait_all(timeout, VcpuState::is_parked)
                .map_err(|ids| vcpus.no_response("start", ids))?;
        }
        Ok(vcpus)
    }

    fn no_response(&self, what: &'static str, ids: Vec<usize>) -> VcpuError {
        VcpuError::NoResponse {
            what,
            ids,
            timeout: self.timeout,
        }
    }

    /// Host thread id of each vcpu.
    pub fn thread_ids(&self) -> &[i32] {
        &self.tids
    }

    /// Takes the running vcpus out of `KVM_RUN` (or keeps them from entering it).
    fn kick(&self) {
        for id in self.ctl.ids_in(VcpuState::Running) {
            if let Some(Err(e)) = self.threads.get(id).map(|t| t.kill(kick_signal())) {
                log::debug!("kick vcpu{id}: {e}");
            }
        }
    }

    /// Takes every vcpu out of the guest and waits, at most [`RESPONSE_TIMEOUT`],
    /// until all are parked with their pending port/MMIO accesses completed. A
    /// halted or dead vcpu counts as parked. On expiry the late vcpus are named;
    /// they stay asked to pause, and park once they can.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.ctl.post(Request::Pause);
        self.kick();
        self.ctl
            .wait_all(self.timeout, VcpuState::is_parked)
            .map_err(|ids| self.no_response("pause", ids))
    }

    /// The registers of every vcpu as it last parked (after [`Self::pause`]:
    /// where each stopped). A vcpu that never parked has none.
    pub fn registers(&self) -> Vec<VcpuRegisters> {
        let v = self.snapshots.0.lock().unwrap_or_else(|e| e.into_inner());
        (0..self.tids.len())
            .map(|id| VcpuRegisters {
                id,
                regs: v.get(id).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Lets paused vcpus run again (halted ones stay halted).
    pub fn resume(&self) {
        self.ctl.post(Request::Run);
    }
}

impl Drop for Vcpus {
    /// Stops every vcpu and joins its thread, waiting at most
    /// [`RESPONSE_TIMEOUT`]: a thread that has not ended by then is logged and
    /// left behind (detached); it ends on its own once it looks at its request.
    fn drop(&mut self) {
        self.ctl.post(Request::Stop);
        self.kick();
        if let Err(ids) = self.ctl.wait_all(self.timeout, |s| s == VcpuState::Exited) {
            log::error!(
                "{}; leaving their threads behind",
                self.no_response("stop", ids)
            );
        }
        let exited = self.ctl.ids_in(VcpuState::Exited);
        for (id, t) in self.threads.drain(..).enumerate() {
            // An `Exited` thread has done all it does: the join is immediate.
            if exited.contains(&id) && t.join().is_err() {
                log::error!("vcpu{id}: thread panicked after its run loop");
            }
        }
    }
}

#[cfg(test)]
mod kvm_tests;
