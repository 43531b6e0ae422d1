//! Run states of the vcpus of one VM, and the control block that the VMM thread
//! and the vcpu threads share.
//!
//! The VMM thread posts one [`Request`] for all vcpus ([`Control::post`]) and
//! waits, bounded, until every vcpu reached a state it accepts
//! ([`Control::wait_all`]). Each vcpu thread moves only its own [`VcpuState`], and
//! only through [`Control::park`] and [`Control::exited`]; every change goes
//! through [`Shared::set`], which checks it against [`VcpuState::allows`]:
//!
//! ```text
//!              Pause posted                 Run posted
//!   Running ───────────────▶ Paused ─────────────────────▶ Running
//!      │
//!      │ HLT, power-off, reset, failure
//!      ├───────────────────▶ Halted   (until Stop is posted)
//!      │
//!      │ thread ends: Stop posted (from any state), or a panic
//!      └───────────────────▶ Exited   (final)
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the VMM thread asks of every vcpu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Request {
    /// Run the guest.
    Run,
    /// Leave the guest, complete pending I/O and park until `Run` (or `Stop`).
    Pause,
    /// End the thread.
    Stop,
}

/// Where one vcpu is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// In the guest or on its way in or out (handling an exit, starting up).
    Running,
    /// Parked by the VMM (a pause), its pending I/O completed; runs again when
    /// the VMM resumes it.
    Paused,
    /// Parked for good: the guest halted, asked for power-off or reset, or the
    /// vcpu failed. Waits to be stopped.
    Halted,
    /// Its thread has ended: stopped, or died (panicked).
    Exited,
}

impl VcpuState {
    /// Whether a vcpu may go from `self` to `to` (see the module docs).
    pub fn allows(self, to: VcpuState) -> bool {
        use VcpuState::*;
        matches!(
            (self, to),
            (Running, Paused) | (Paused, Running) | (Running, Halted)
        ) || (self != Exited && to == Exited)
    }

    /// Out of the guest, until resumed or for good: what a pause waits for. A
    /// dead vcpu needs no parking.
    pub fn is_parked(self) -> bool {
        self != VcpuState::Running
    }
}

/// The state behind [`Control`]'s mutex.
pub(super) struct Shared {
    request: Request,
    vcpus: Vec<VcpuState>,
}

impl Shared {
    /// The one place a vcpu's state changes.
    fn set(&mut self, id: usize, to: VcpuState) {
        let Some(state) = self.vcpus.get_mut(id) else {
            log::error!("vcpu{id}: no such vcpu (moving to {to:?})");
            return;
        };
        if !state.allows(to) {
            // A bug in this module; the move is still recorded so that waits
            // see the truth.
            log::error!("vcpu{id}: unexpected state change {state:?} -> {to:?}");
        }
        *state = to;
    }
}

/// Shared between the VMM thread and the vcpu threads of one VM.
pub(super) struct Control {
    shared: Mutex<Shared>,
    cv: Condvar,
    /// Fast-path hint for the vcpu loop: set whenever the request is not `Run`.
    attention: AtomicBool,
}

impl Control {
    /// `count` vcpus, all `Running` (starting up), asked to run or, with
    /// `paused`, to park before entering the guest.
    pub(super) fn new(count: usize, paused: bool) -> Self {
        let request = if paused { Request::Pause } else { Request::Run };
        Self {
            shared: Mutex::new(Shared {
                request,
                vcpus: vec![VcpuState::Running; count],
            }),
            cv: Condvar::new(),
            attention: AtomicBool::new(paused),
        }
    }

    /// Never panics: a thread that panicked while holding the lock left the
    /// state consistent (every change is a single assignment).
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Shared>) -> MutexGuard<'a, Shared> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// VMM side: asks every vcpu for `request` and wakes the parked ones.
    pub(super) fn post(&self, request: Request) {
        let mut g = self.lock();
        g.request = request;
        self.attention
            .store(request != Request::Run, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// VMM side: waits until every vcpu's state satisfies `done`, for at most
    /// `timeout`. On expiry, returns the ids of the vcpus that did not get there.
    pub(super) fn wait_all(
        &self,
        timeout: Duration,
        done: impl Fn(VcpuState) -> bool,
    ) -> Result<(), Vec<usize>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            let late: Vec<usize> = (0..g.vcpus.len()).filter(|&i| !done(g.vcpus[i])).collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if late.is_empty() {
                return Ok(());
            }
            if left.is_zero() {
                return Err(late);
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The ids of the vcpus now in `state`.
    pub(super) fn ids_in(&self, state: VcpuState) -> Vec<usize> {
        let g = self.lock();
        (0..g.vcpus.len())
            .filter(|&i| g.vcpus[i] == state)
            .collect()
    }

    /// vcpu side: whether to look at the request before entering the guest.
    pub(super) fn needs_attention(&self) -> bool {
        self.attention.load(Ordering::SeqCst)
    }

    /// vcpu side: the current request.
    pub(super) fn request(&self) -> Request {
        self.lock().request
    }

    /// vcpu side: parks vcpu `id` as `how` (`Paused` or `Halted`) and blocks
    /// while that is what the VMM wants. Returns `Run` (the vcpu is `Running`
    /// again; only from `Paused`) or `Stop` (the thread must end).
    pub(super) fn park(&self, id: usize, how: VcpuState) -> Request {
        let mut g = self.lock();
        g.set(id, how);
        self.cv.notify_all();
        loop {
            match (g.request, how) {
                (Request::Stop, _) => return Request::Stop,
                (Request::Run, VcpuState::Paused) => {
                    g.set(id, VcpuState::Running);
                    return Request::Run;
                }
                _ => g = self.wait(g),
            }
        }
    }

    /// vcpu side: the thread of vcpu `id` ends (last thing it does).
    pub(super) fn exited(&self, id: usize) {
        self.lock().set(id, VcpuState::Exited);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use VcpuState::*;

    const ALL: [VcpuState; 4] = [Running, Paused, Halted, Exited];

    #[test]
    fn transitions_follow_the_diagram() {
        let allowed: Vec<(VcpuState, VcpuState)> = ALL
            .iter()
            .flat_map(|&a| ALL.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| a.allows(b))
            .collect();
        assert_eq!(
            allowed,
            [
                (Running, Paused),
                (Running, Halted),
                (Running, Exited),
                (Paused, Running),
                (Paused, Exited),
                (Halted, Exited),
            ]
        );
    }

    #[test]
    fn only_running_is_unparked() {
        let parked: Vec<_> = ALL.into_iter().filter(|s| s.is_parked()).collect();
        assert_eq!(parked, [Paused, Halted, Exited]);
    }

    #[test]
    fn posting_sets_the_attention_hint() {
        let ctl = Control::new(1, true);
        assert!(ctl.needs_attention());
        assert_eq!(ctl.request(), Request::Pause);
        ctl.post(Request::Run);
        assert!(!ctl.needs_attention());
        ctl.post(Request::Stop);
        assert!(ctl.needs_attention());
        assert_eq!(ctl.request(), Request::Stop);
    }

    #[test]
    fn an_expired_wait_names_the_late_vcpus() {
        let ctl = Control::new(3, false);
        ctl.exited(1);
        assert_eq!(
            ctl.wait_all(Duration::from_millis(1), VcpuState::is_parked),
            Err(vec![0, 2])
        );
        assert_eq!(ctl.ids_in(Running), [0, 2]);
        assert_eq!(ctl.ids_in(Exited), [1]);
    }

    #[test]
    fn a_paused_vcpu_runs_again_on_run_and_a_halted_one_waits_for_stop() {
        let ctl = Arc::new(Control::new(2, true));
        let spawn = |id, how| {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                let r = ctl.park(id, how);
                if r == Request::Stop {
                    ctl.exited(id);
                }
                r
            })
        };
        let paused = spawn(0, Paused);
        let halted = spawn(1, Halted);
        assert_eq!(
            ctl.wait_all(Duration::from_secs(20), VcpuState::is_parked),
            Ok(())
        );
        ctl.post(Request::Run);
        assert_eq!(paused.join().unwrap(), Request::Run);
        assert_eq!(ctl.ids_in(Running), [0]);
        // vcpu1 stays halted through Run; it leaves on Stop.
        assert_eq!(ctl.ids_in(Halted), [1]);
        ctl.post(Request::Stop);
        assert_eq!(halted.join().unwrap(), Request::Stop);
        assert_eq!(ctl.ids_in(Exited), [1]);
    }

    #[test]
    fn a_stop_ends_a_pause() {
        let ctl = Arc::new(Control::new(1, true));
        let c = ctl.clone();
        let t = std::thread::spawn(move || c.park(0, Paused));
        assert_eq!(
            ctl.wait_all(Duration::from_secs(20), |s| s == Paused),
            Ok(())
        );
        ctl.post(Request::Stop);
        assert_eq!(t.join().unwrap(), Request::Stop);
    }
}
