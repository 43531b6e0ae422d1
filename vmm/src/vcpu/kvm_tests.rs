//! vcpu threads on a real KVM (PVM is enough): tiny hand-made 64-bit guests whose
//! port I/O reaches test devices. Skipped loudly where /dev/kvm cannot be used;
//! with `MINIVMM_REQUIRE_KVM=1` a missing KVM fails instead.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use devices::bus::{Bus, BusDevice};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::layout::KVM_TSS_ADDR;
use crate::{builder, cpu, memory};

/// Where the guest code is placed and where vcpu0 starts.
const ENTRY: u64 = 0x10_0000;
/// The port the guests write to.
const PORT: u16 = 0x510;
/// How long a test waits for something that should happen at once.
const BOUND: Duration = Duration::from_secs(20);

/// x86: `mov dx, PORT; mov al, v; out dx, al; hlt; jmp hlt`.
fn code_out_then_halt(v: u8) -> Vec<u8> {
    let p = PORT.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1], 0xb0, v, 0xee, 0xf4, 0xeb, 0xfd]
}

/// x86: `mov dx, PORT; again: out dx, al; inc al; jmp again`.
fn code_count() -> Vec<u8> {
    let p = PORT.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1], 0xee, 0xfe, 0xc0, 0xeb, 0xfb]
}

/// Opens KVM, or says loudly why the test is skipped.
fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match builder::open_kvm() {
        Ok(kvm) => Some(kvm),
        Err(e) if std::env::var("MINIVMM_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("MINIVMM_REQUIRE_KVM=1 but KVM cannot be used: {e}")
        }
        Err(e) => {
            // Straight to stderr, past libtest's capture, so the skip is seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED {test}: KVM cannot be used here: {e}\n"
            );
            None
        }
    }
}

/// A VM with `cpus` vcpus configured for the 64-bit entry at [`ENTRY`], where
/// `code` is. Only vcpu0 runs it; the others wait for INIT/SIPI.
struct TestVm {
    fds: Vec<VcpuFd>,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
}

fn test_vm(kvm: &Kvm, cpus: u8, code: &[u8]) -> TestVm {
    static KICK: Once = Once::new();
    KICK.call_once(|| install_kick_handler().expect("kick handler"));
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.set_tss_address(KVM_TSS_ADDR).expect("KVM_SET_TSS_ADDR");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let mem = memory::create_guest_memory(16 << 20, false).expect("guest memory");
    builder::register_memory(&vm, &mem).expect("memory slots");
    cpu::write_boot_structures(&mem).expect("page tables");
    mem.write_slice(code, GuestAddress(ENTRY)).expect("code");
    let cpuid = cpu::supported_cpuid(kvm).expect("cpuid");
    let fds = (0..cpus)
        .map(|id| {
            let fd = vm.create_vcpu(u64::from(id)).expect("KVM_CREATE_VCPU");
            cpu::configure_vcpu(&fd, id, cpus, &cpuid, GuestAddress(ENTRY)).expect("configure");
            fd
        })
        .collect();
    TestVm {
        fds,
        _vm: vm,
        _mem: mem,
    }
}

/// A port bus with `dev` at [`PORT`].
fn pio_with(dev: impl BusDevice + 'static) -> Arc<Bus> {
    let mut pio = Bus::new("pio");
    pio.insert(Arc::new(Mutex::new(dev)), u64::from(PORT), 1)
        .expect("insert");
    Arc::new(pio)
}

/// A device model with a bug: any write panics.
struct PanicOnWrite;

impl BusDevice for PanicOnWrite {
    fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: u64, data: &[u8]) {
        panic!("device model bug on write of {data:02x?}");
    }
}

/// Sends every byte written to it.
struct Tap(Sender<u8>);

impl BusDevice for Tap {
    fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: u64, data: &[u8]) {
        let _ = self.0.send(data[0]);
    }
}

/// Blocks every write until released: a device access that does not end.
struct Gate {
    entered: Sender<()>,
    release: Receiver<()>,
}

impl BusDevice for Gate {
    fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: u64, _: &[u8]) {
        let _ = self.entered.send(());
        let _ = self.release.recv();
    }
}

/// Waits (bounded) until `evt` is readable.
fn fired(evt: &EventFd, within: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, within.as_millis() as i32) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// Runs `f` on its own thread; panics if it does not return within [`BOUND`]
/// (the thread is left behind: the test has failed anyway).
fn within_bound<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(BOUND) {
        Ok(v) => v,
        Err(e) => panic!("{what} did not return within {BOUND:?}: {e}"),
    }
}

fn next_byte(rx: &Receiver<u8>) -> u8 {
    rx.recv_timeout(BOUND)
        .expect("the guest did not write to the port")
}

#[test]
fn a_panicking_device_fails_the_vm_and_never_hangs_the_vmm() {
    let Some(kvm) = kvm_or_skip("a_panicking_device_fails_the_vm_and_never_hangs_the_vmm") else {
        return;
    };
    // vcpu0 writes to the buggy device; vcpu1 waits for a SIPI, inside KVM_RUN.
    let mut vm = test_vm(&kvm, 2, &code_out_then_halt(0x42));
    let events = Arc::new(VcpuEvents::new().expect("eventfds"));
    let vcpus = Vcpus::start(
        std::mem::take(&mut vm.fds),
        pio_with(PanicOnWrite),
        Arc::new(Bus::new("mmio")),
        events.clone(),
        false,
    )
    .expect("start");
    assert!(
        fired(&events.error, BOUND),
        "the vcpu's panic was not reported on the error eventfd"
    );
    let info = events
        .error_info
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_default();
    assert!(
        info.contains("vcpu0 panicked") && info.contains("device model bug on write of [42]"),
        "error_info does not name the panic: {info:?}"
    );
    let (vcpus, paused) = within_bound("pause with a dead vcpu", move || {
        let r = vcpus.pause();
        (vcpus, r)
    });
    assert!(
        paused.is_ok(),
        "vcpu1 parks, dead vcpu0 needs not: {paused:?}"
    );
    assert_eq!(vcpus.ctl.ids_in(VcpuState::Exited), [0]);
    assert_eq!(vcpus.ctl.ids_in(VcpuState::Paused), [1]);
    within_bound("dropping the vcpus", move || drop(vcpus));
}

#[test]
fn prelaunch_pause_resume_and_stop() {
    let Some(kvm) = kvm_or_skip("prelaunch_pause_resume_and_stop") else {
        return;
    };
    let mut vm = test_vm(&kvm, 1, &code_count());
    let (tx, rx) = mpsc::channel();
    let events = Arc::new(VcpuEvents::new().expect("eventfds"));
    let vcpus = Vcpus::start(
        std::mem::take(&mut vm.fds),
        pio_with(Tap(tx)),
        Arc::new(Bus::new("mmio")),
        events.clone(),
        true,
    )
    .expect("start");
    // Parked before entering the guest: nothing written yet.
    assert_eq!(rx.try_recv(), Err(mpsc::TryRecvError::Empty));
    assert_eq!(vcpus.thread_ids().len(), 1);
    assert_ne!(vcpus.thread_ids()[0], 0);
    vcpus.resume();
    assert_eq!(next_byte(&rx), 0, "the guest counts from al = 0");
    let (vcpus, paused) = within_bound("pause", move || {
        let r = vcpus.pause();
        (vcpus, r)
    });
    assert!(paused.is_ok(), "{paused:?}");
    assert_eq!(vcpus.ctl.ids_in(VcpuState::Paused), [0]);
    // Parked: its last OUT completed; drain what was written before the pause.
    let mut last = 0;
    while let Ok(v) = rx.try_recv() {
        last = v;
    }
    vcpus.resume();
    assert_eq!(
        next_byte(&rx),
        last.wrapping_add(1),
        "the guest resumed where it stopped"
    );
    within_bound("dropping the vcpus", move || drop(vcpus));
    assert!(!fired(&events.error, Duration::ZERO), "no failure reported");
}

#[test]
fn a_vcpu_stuck_in_a_device_is_named_and_left_behind() {
    let Some(kvm) = kvm_or_skip("a_vcpu_stuck_in_a_device_is_named_and_left_behind") else {
        return;
    };
    let mut vm = test_vm(&kvm, 1, &code_out_then_halt(1));
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let gate = Gate {
        entered: entered_tx,
        release: release_rx,
    };
    let events = Arc::new(VcpuEvents::new().expect("eventfds"));
    let vcpus = Vcpus::start_with_timeout(
        std::mem::take(&mut vm.fds),
        pio_with(gate),
        Arc::new(Bus::new("mmio")),
        events.clone(),
        false,
        Duration::from_secs(1),
    )
    .expect("start");
    let ctl = vcpus.ctl.clone();
    entered
        .recv_timeout(BOUND)
        .expect("the guest did not reach the device");
    let (vcpus, paused) = within_bound("pause with a stuck vcpu", move || {
        let r = vcpus.pause();
        (vcpus, r)
    });
    match &paused {
        Err(VcpuError::NoResponse { what, ids, .. }) => {
            assert_eq!((*what, ids.as_slice()), ("pause", &[0][..]));
        }
        other => panic!("pause should time out naming vcpu0: {other:?}"),
    }
    assert_eq!(
        paused.unwrap_err().to_string(),
        "vcpu0 did not pause within 1s"
    );
    within_bound("dropping the vcpus", move || drop(vcpus));
    // The thread left behind ends once its device access does.
    release.send(()).expect("release");
    assert_eq!(
        ctl.wait_all(BOUND, |s| s == VcpuState::Exited),
        Ok(()),
        "the left-behind vcpu thread did not end"
    );
    assert!(!fired(&events.error, Duration::ZERO), "not a failure");
}
