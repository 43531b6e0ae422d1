//! The body of a vcpu thread: the `KVM_RUN` loop, parking, failure reports, and
//! the net that catches a panic (a buggy device model, say) so that a dead vcpu
//! is reported instead of vanishing.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::bus::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;

use super::exit::{handle_exit, Next};
use super::state::{Control, Request, VcpuState};
use super::{VcpuEvents, KVM_RUN};

/// One vcpu, owned by its thread.
pub(super) struct Vcpu {
    pub(super) id: usize,
    pub(super) fd: VcpuFd,
    pub(super) pio: Arc<Bus>,
    pub(super) mmio: Arc<Bus>,
    pub(super) events: Arc<VcpuEvents>,
    pub(super) ctl: Arc<Control>,
    /// Where the registers go each time the vcpu parks.
    pub(super) snapshots: Arc<super::Snapshots>,
}

/// Starts the thread of `vcpu`. The thread first sends its host thread id on
/// `tid`; whatever way it ends (stopped, or panicking), its last act is to mark
/// the vcpu `Exited`, and a panic is reported as a vcpu failure.
pub(super) fn spawn(vcpu: Vcpu, tid: Sender<(usize, i32)>) -> std::io::Result<JoinHandle<()>> {
    let id = vcpu.id;
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let _ = tid.send((id, unsafe { libc::gettid() }));
            drop(tid);
            let (ctl, events) = (vcpu.ctl.clone(), vcpu.events.clone());
            // The guest state is not touched after a panic: the VM is failed,
            // and other vcpus reach devices only through poison-tolerant locks.
            if let Err(payload) = catch_unwind(AssertUnwindSafe(move || vcpu.run())) {
                events.fail(format!("vcpu{id} panicked: {}", panic_message(&*payload)));
            }
            ctl.exited(id);
        })
}

/// The message of a panic payload (`panic!` makes a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a panic without a message)"
    }
}

/// Publishes this thread's `kvm_run` to the kick handler while alive.
struct PublishedKvmRun;

impl PublishedKvmRun {
    fn new(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|r| r.set(run));
        Self
    }
}

impl Drop for PublishedKvmRun {
    /// Also runs while unwinding, before the `VcpuFd` (and its mapping) goes.
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(ptr::null_mut()));
    }
}

impl Vcpu {
    fn run(mut self) {
        // Dropped before `self` (a parameter outlives the body's locals).
        let _published = PublishedKvmRun::new(self.fd.get_kvm_run());
        loop {
            if self.ctl.needs_attention() && !self.attend() {
                return;
            }
            if let Next::Park = self.run_once() {
                // Halted for good, or failed: wait to be stopped.
                self.snapshot();
                self.ctl.park(self.id, VcpuState::Halted);
                return;
            }
        }
    }

    /// Handles a pause or stop request; returns false when the thread must end.
    fn attend(&mut self) -> bool {
        match self.ctl.request() {
            Request::Run => return true,
            Request::Stop => return false,
            Request::Pause => {}
        }
        // Complete the exit just handled (an IN's data, an MMIO read) so guest
        // state is consistent while parked: KVM finishes it on the next KVM_RUN,
        // which returns at once with immediate_exit set.
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => log::debug!("vcpu{}: completing I/O before pause: {other:?}", self.id),
        }
        self.fd.set_kvm_immediate_exit(0);
        // Tell a kvmclock guest it was stopped (no soft-lockup warnings on resume).
        let _ = self.fd.kvmclock_ctrl();
        self.snapshot();
        self.ctl.park(self.id, VcpuState::Paused) == Request::Run
    }

    /// Runs the guest until its next exit and handles it. Returns `Continue` or
    /// `Park` (failures are reported here, then park).
    fn run_once(&mut self) -> Next {
        let next = match self.fd.run() {
            Ok(exit) => handle_exit(self.id, exit, &self.pio, &self.mmio, &self.events),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: the loop looks at the request next.
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Fail(format!("KVM_RUN failed: {e}")),
        };
        match next {
            Next::Fail(what) => {
                self.fail(&what);
                Next::Park
            }
            Next::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the
                // `internal` member of the exit union.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                self.fail(&format!("KVM internal error (suberror {suberror})"));
                Next::Park
            }
            next => next,
        }
    }

    /// General and control registers as (name, value), `rip` first; what
    /// cannot be read is left out.
    fn registers(&self) -> Vec<(&'static str, u64)> {
        let mut regs = Vec::new();
        if let Ok(r) = self.fd.get_regs() {
            regs.extend([
                ("rip", r.rip),
                ("rsp", r.rsp),
                ("rflags", r.rflags),
                ("rax", r.rax),
                ("rbx", r.rbx),
                ("rcx", r.rcx),
                ("rdx", r.rdx),
                ("rsi", r.rsi),
                ("rdi", r.rdi),
                ("rbp", r.rbp),
            ]);
        }
        if let Ok(r) = self.fd.get_sregs() {
            regs.extend([
                ("cr0", r.cr0),
                ("cr2", r.cr2),
                ("cr3", r.cr3),
                ("cr4", r.cr4),
                ("efer", r.efer),
                ("cs", u64::from(r.cs.selector)),
            ]);
        }
        regs
    }

    /// Records the registers (for diagnostics after a pause).
    fn snapshot(&self) {
        self.snapshots.set(self.id, self.registers());
    }

    fn fail(&self, what: &str) {
        let regs = self.describe_registers();
        self.events.fail(format!("vcpu{}: {what}\n{regs}", self.id));
    }

    fn describe_registers(&self) -> String {
        let regs = self.registers();
        if regs.is_empty() {
            return "  (registers unavailable)".into();
        }
        regs.chunks(5)
            .map(|line| {
                let l: Vec<String> = line.iter().map(|(n, v)| format!("{n}={v:#x}")).collect();
                format!("  {}", l.join(" "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_recovered() {
        // (The harness captures the panic messages of a passing test.)
        let msg = |f: fn()| panic_message(&*catch_unwind(f).unwrap_err()).to_owned();
        assert_eq!(msg(|| panic!("plain")), "plain");
        assert_eq!(msg(|| panic!("formatted {}", 42)), "formatted 42");
        assert_eq!(
            msg(|| std::panic::panic_any(7u32)),
            "(a panic without a message)"
        );
    }
}
