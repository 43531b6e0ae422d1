//! vcpu threads: one per vcpu, running `KVM_RUN` and dispatching port I/O and MMIO
//! exits to the buses. A vcpu thread never decides the VM's fate: power-off, reset
//! and failures are signalled to the VMM thread through eventfds.
//!
//! Stopping uses `immediate_exit`, as Firecracker does: the VMM sets the stop flag
//! and sends the vcpu thread a real-time signal whose handler sets
//! `kvm_run.immediate_exit`, so a vcpu that was about to enter the guest returns
//! at once instead of missing the signal.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use devices::bus::Bus;
use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

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

/// What vcpus tell the VMM thread.
#[derive(Debug)]
pub struct VcpuEvents {
    /// The guest powered off (ACPI S5 or KVM system event).
    pub shutdown: EventFd,
    /// The guest asked for a reset (reset register, i8042, triple fault).
    pub reset: EventFd,
    /// A vcpu failed; the description is in `error_info`.
    pub error: EventFd,
    /// The guest reported a panic (pvpanic).
    pub panic: EventFd,
    /// Description of the first failure.
    pub error_info: Mutex<Option<String>>,
}

impl VcpuEvents {
    /// Fresh, non-blocking eventfds.
    pub fn new() -> std::io::Result<Self> {
        let e = || EventFd::new(libc::EFD_NONBLOCK);
        Ok(Self {
            shutdown: e()?,
            reset: e()?,
            error: e()?,
            panic: e()?,
            error_info: Mutex::new(None),
        })
    }

    fn fail(&self, msg: String) {
        let mut info = self.error_info.lock().unwrap_or_else(|e| e.into_inner());
        info.get_or_insert(msg);
        if let Err(e) = self.error.write(1) {
            log::error!("cannot signal vcpu failure: {e}");
        }
    }

    fn signal(evt: &EventFd, what: &str) {
        if let Err(e) = evt.write(1) {
            log::error!("cannot signal {what}: {e}");
        }
    }

    /// Clears pending signals (between a VM and its rebuilt successor).
    pub fn drain(&self) {
        for e in [&self.shutdown, &self.reset, &self.error, &self.panic] {
            let _ = e.read();
        }
        self.error_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

struct CtlState {
    paused: bool,
    stop: bool,
    parked: usize,
}

/// Shared between the VMM thread and the vcpu threads of one VM.
struct Control {
    state: Mutex<CtlState>,
    cv: Condvar,
    /// Fast-path hint: set whenever `paused` or `stop` is.
    attention: AtomicBool,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(
        &self,
        g: std::sync::MutexGuard<'a, CtlState>,
    ) -> std::sync::MutexGuard<'a, CtlState> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// The vcpu threads of one VM.
pub struct Vcpus {
    threads: Vec<JoinHandle<()>>,
    tids: Vec<i32>,
    ctl: Arc<Control>,
}

impl Vcpus {
    /// Starts one thread per vcpu; with `paused` they park before entering the
    /// guest until [`Vcpus::resume`].
    pub fn start(
        fds: Vec<VcpuFd>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: Arc<VcpuEvents>,
        paused: bool,
    ) -> std::io::Result<Self> {
        let ctl = Arc::new(Control {
            state: Mutex::new(CtlState {
                paused,
                stop: false,
                parked: 0,
            }),
            cv: Condvar::new(),
            attention: AtomicBool::new(paused),
        });
        let mut vcpus = Self {
            threads: Vec::new(),
            tids: Vec::new(),
            ctl: ctl.clone(),
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
            };
            let tx = tid_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let _ = tx.send((id, unsafe { libc::gettid() }));
                    vcpu.run()
                })?;
            vcpus.threads.push(thread);
        }
        drop(tid_tx);
        let mut tids = vec![0; vcpus.threads.len()];
        for (id, tid) in tid_rx.iter().take(tids.len()) {
            tids[id] = tid;
        }
        vcpus.tids = tids;
        if paused {
            // Prelaunch: return once every vcpu is parked.
            vcpus.wait_parked();
        }
        Ok(vcpus)
    }

    /// Host thread id of each vcpu.
    pub fn thread_ids(&self) -> &[i32] {
        &self.tids
    }

    fn kick(&self) {
        for t in &self.threads {
            if let Err(e) = t.kill(kick_signal()) {
                log::debug!("kick vcpu: {e}");
            }
        }
    }

    /// Takes every vcpu out of the guest and waits until all are parked, with
    /// their pending port/MMIO accesses completed.
    pub fn pause(&self) {
        {
            let mut st = self.ctl.lock();
            st.paused = true;
            self.ctl.attention.store(true, Ordering::SeqCst);
        }
        self.kick();
        self.wait_parked();
    }

    fn wait_parked(&self) {
        let mut st = self.ctl.lock();
        while st.parked < self.threads.len() && !st.stop {
            st = self.ctl.wait(st);
        }
    }

    /// Lets paused vcpus run again.
    pub fn resume(&self) {
        let mut st = self.ctl.lock();
        st.paused = false;
        self.ctl.attention.store(st.stop, Ordering::SeqCst);
        self.ctl.cv.notify_all();
    }

    /// Stops every vcpu and waits for its thread to end.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        {
            let mut st = self.ctl.lock();
            st.stop = true;
            self.ctl.attention.store(true, Ordering::SeqCst);
            self.ctl.cv.notify_all();
        }
        self.kick();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vcpu thread panicked");
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct Vcpu {
    id: usize,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: Arc<VcpuEvents>,
    ctl: Arc<Control>,
}

enum Next {
    Continue,
    /// Stop running the guest; wait to be stopped.
    Park,
}

impl Vcpu {
    fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        loop {
            if self.ctl.attention.load(Ordering::SeqCst) && !self.attend() {
                break;
            }
            if let Next::Park = self.run_once() {
                // Halted for good, or failed: wait (counted as parked) to be stopped.
                let mut st = self.ctl.lock();
                st.parked += 1;
                self.ctl.cv.notify_all();
                while !st.stop {
                    st = self.ctl.wait(st);
                }
                break;
            }
        }
        KVM_RUN.with(|r| r.set(ptr::null_mut()));
    }

    /// Handles a pause or stop request; returns false when the thread must end.
    fn attend(&mut self) -> bool {
        let mut st = self.ctl.lock();
        if st.stop {
            return false;
        }
        if !st.paused {
            return true;
        }
        drop(st);
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
        st = self.ctl.lock();
        st.parked += 1;
        self.ctl.cv.notify_all();
        while st.paused && !st.stop {
            st = self.ctl.wait(st);
        }
        st.parked -= 1;
        !st.stop
    }

    fn run_once(&mut self) -> Next {
        let id = self.id;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                    Next::Continue
                }
                VcpuExit::Hlt => {
                    log::debug!("vcpu{id}: halted");
                    Next::Park
                }
                VcpuExit::Shutdown => {
                    log::info!("vcpu{id}: triple fault, resetting the VM");
                    VcpuEvents::signal(&self.events.reset, "reset");
                    Next::Park
                }
                VcpuExit::SystemEvent(kind, _) => {
                    match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => {
                            VcpuEvents::signal(&self.events.shutdown, "shutdown")
                        }
                        KVM_SYSTEM_EVENT_RESET => VcpuEvents::signal(&self.events.reset, "reset"),
                        KVM_SYSTEM_EVENT_CRASH => self.fail("the guest crashed (KVM system event)"),
                        other => self.fail(&format!("unknown KVM system event {other}")),
                    }
                    Next::Park
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    self.fail(&format!(
                        "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host cpu {cpu})"
                    ));
                    Next::Park
                }
                VcpuExit::InternalError => {
                    let sub = self.fd.get_kvm_run();
                    // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the
                    // `internal` member of the exit union.
                    let suberror = unsafe { sub.__bindgen_anon_1.internal.suberror };
                    self.fail(&format!("KVM internal error (suberror {suberror})"));
                    Next::Park
                }
                other => {
                    let what = format!("unexpected vcpu exit: {other:?}");
                    self.fail(&what);
                    Next::Park
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => {
                self.fail(&format!("KVM_RUN failed: {e}"));
                Next::Park
            }
        }
    }

    fn fail(&self, what: &str) {
        let regs = self.describe_registers();
        self.events.fail(format!("vcpu{}: {what}\n{regs}", self.id));
    }

    fn describe_registers(&self) -> String {
        let mut s = String::new();
        match self.fd.get_regs() {
            Ok(r) => s.push_str(&format!(
                "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
            )),
            Err(e) => s.push_str(&format!("  (registers unavailable: {e})\n")),
        }
        match self.fd.get_sregs() {
            Ok(r) => s.push_str(&format!(
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.cr0, r.cr2, r.cr3, r.cr4, r.efer, r.cs.selector
            )),
            Err(e) => s.push_str(&format!("  (special registers unavailable: {e})")),
        }
        s
    }
}
