//! VMM plumbing and lifecycle with tiny hand-made guests (a few bytes of 64-bit code
//! loaded as an ELF kernel). They need a /dev/kvm but not hardware virtualization,
//! so they run directly on PVM hosts as well as in the nested runner.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use minivmm_tests::{
    code_out_then_halt, code_print, kvm_available, temp_file, tiny_guest, Vm, CODE_SPIN,
};

const LIMIT: Duration = Duration::from_secs(30);
const PM_PORT: u16 = 0x600;
const S5: u8 = (5 << 2) | (1 << 5);
const RESET_PORT: u16 = 0x604;

#[test]
fn acpi_poweroff_exits_zero_with_output_flushed() {
    if !kvm_available("acpi_poweroff_exits_zero_with_output_flushed") {
        return;
    }
    let k = tiny_guest(
        "poweroff",
        &[
            &code_print(b"hello from the guest\n"),
            &code_out_then_halt(PM_PORT, S5),
        ],
    );
    let mut vm = Vm::spawn(&["--kernel", &k, "--cpus", "2"]);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
    assert_eq!(vm.seen, vec!["hello from the guest"]);
}

#[test]
fn reset_register_reboots_in_the_same_process() {
    if !kvm_available("reset_register_reboots_in_the_same_process") {
        return;
    }
    let k = tiny_guest(
        "reset",
        &[&code_print(b"boot\n"), &code_out_then_halt(RESET_PORT, 1)],
    );
    let mut vm = Vm::spawn(&["--kernel", &k]);
    vm.wait_line(LIMIT, |l| l == "boot");
    vm.wait_line(LIMIT, |l| l == "boot");
    vm.signal(libc::SIGTERM);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "stderr: {err}");
    assert!(err.contains("SIGTERM"), "{err}");
}

#[test]
fn i8042_reset_reboots_and_no_reboot_exits_zero() {
    if !kvm_available("i8042_reset_reboots_and_no_reboot_exits_zero") {
        return;
    }
    let k = tiny_guest(
        "i8042",
        &[&code_print(b"boot\n"), &code_out_then_halt(0x64, 0xfe)],
    );
    let mut vm = Vm::spawn(&["--kernel", &k, "--no-reboot"]);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
    assert_eq!(vm.seen, vec!["boot"], "booted once only");
    assert!(err.contains("--no-reboot"), "{err}");
}

#[test]
fn timeout_exits_124() {
    if !kvm_available("timeout_exits_124") {
        return;
    }
    let k = tiny_guest("timeout", &[&code_print(b"spinning\n"), &CODE_SPIN]);
    let mut vm = Vm::spawn(&["--kernel", &k, "--timeout", "1", "--cpus", "2"]);
    vm.wait_line(LIMIT, |l| l == "spinning");
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(124), "stderr: {err}");
    assert!(err.contains("timeout"), "{err}");
    // Where each vcpu was: vcpu 0 spinning in the guest's code (loaded at
    // 0x100000), vcpu 1 an AP never started.
    assert!(err.contains("the vcpus when the timeout expired:"), "{err}");
    assert!(err.contains("  vcpu0: rip=0x1000"), "{err}");
    assert!(err.contains("  vcpu1: rip="), "{err}");
}

#[test]
fn sigint_exits_130() {
    if !kvm_available("sigint_exits_130") {
        return;
    }
    let k = tiny_guest("sigint", &[&code_print(b"up\n"), &CODE_SPIN]);
    let mut vm = Vm::spawn(&["--kernel", &k]);
    vm.wait_line(LIMIT, |l| l == "up");
    vm.signal(libc::SIGINT);
    let (st, _) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(130));
}

#[test]
fn serial_to_file_and_none() {
    if !kvm_available("serial_to_file_and_none") {
        return;
    }
    let k = tiny_guest(
        "serialfile",
        &[
            &code_print(b"to the file\n"),
            &code_out_then_halt(PM_PORT, S5),
        ],
    );
    let log = temp_file("serialfile", "console.log", b"previous line\n");
    let spec = format!("file:{}", log.display());
    let mut vm = Vm::spawn(&["--kernel", &k, "--serial", &spec]);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(vm.seen.is_empty(), "nothing on stdout: {:?}", vm.seen);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "previous line\nto the file\n",
        "appended"
    );
    let mut vm = Vm::spawn(&["--kernel", &k, "--serial", "none"]);
    let (st, _) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0));
    assert!(vm.seen.is_empty());
}

#[test]
fn triple_fault_is_a_reset() {
    if !kvm_available("triple_fault_is_a_reset") {
        return;
    }
    // ud2 with no IDT: the #UD escalates to a triple fault, which is a reset.
    let k = tiny_guest("triplefault", &[&code_print(b"x\n"), &[0x0f, 0x0b]]);
    let mut vm = Vm::spawn(&["--kernel", &k, "--no-reboot"]);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(vm.seen, vec!["x"]);
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains("--no-reboot"), "{err}");
    // Told apart from a reset the guest asked for.
    assert!(err.contains("vcpu0: triple fault"), "{err}");
}

#[test]
fn kvm_failure_exits_one_with_registers() {
    if !kvm_available("kvm_failure_exits_one_with_registers") {
        return;
    }
    // Jump to 0x3000_0000: mapped by the boot page tables but not guest RAM, so
    // KVM cannot fetch the next instruction and reports an error.
    let k = tiny_guest(
        "kvmfail",
        &[
            &code_print(b"x\n"),
            &[0xb8, 0x00, 0x00, 0x00, 0x30, 0xff, 0xe0],
        ],
    );
    let mut vm = Vm::spawn(&["--kernel", &k, "--memory", "64M"]);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(vm.seen, vec!["x"]);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("the VM failed"), "{err}");
    assert!(err.contains("rip="), "registers shown: {err}");
}

/// A pseudo-terminal pair for console tests.
struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
}

fn open_pty() -> Pty {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two descriptors into `m` and `s`; the other arguments
    // may be null.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: `m` is a new descriptor owned by nobody else.
    let master = unsafe { std::fs::File::from_raw_fd(m) };
    // SAFETY: likewise for `s`.
    let slave = unsafe { std::fs::File::from_raw_fd(s) };
    Pty { master, slave }
}

fn lflag(f: &std::fs::File) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and termios pointer.
    assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn ctrl_a_x_works_when_the_guest_never_reads_its_uart() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    if !kvm_available("ctrl_a_x_works_when_the_guest_never_reads_its_uart") {
        return;
    }
    // The guest never reads COM1: its receive FIFO fills after a few bytes.
    let k = tiny_guest("pty-full", &[&code_print(b"guest-up\n"), &CODE_SPIN]);
    let mut pty = open_pty();
    let io = || Stdio::from(pty.slave.try_clone().unwrap());
    let mut child = minivmm_tests::minivmm(&["--kernel", &k])
        .stdin(io())
        .stdout(io())
        .stderr(io())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("guest-up") {
        let n = pty.master.read(&mut buf).expect("read pty");
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    // 64 KiB of keystrokes the guest never takes, then Ctrl-A x, from another
    // thread (a VMM that stopped reading would block this write forever).
    let mut w = pty.master.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = w.write_all(&[b'a'; 64 * 1024]);
        let _ = w.write_all(b"\x01x");
    });
    // Keep reading the terminal (the VMM's log line about dropped input).
    let mut r = pty.master.try_clone().unwrap();
    std::thread::spawn(move || while matches!(r.read(&mut [0u8; 4096]), Ok(n) if n > 0) {});
    let deadline = std::time::Instant::now() + LIMIT;
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("Ctrl-A x was not seen behind input the guest does not read");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0));
}

#[test]
fn terminal_console_raw_mode_escape_keys_and_restore() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    if !kvm_available("terminal_console_raw_mode_escape_keys_and_restore") {
        return;
    }
    let k = tiny_guest("pty", &[&code_print(b"guest-up\n"), &CODE_SPIN]);
    let mut pty = open_pty();
    let canon = libc::ICANON | libc::ECHO;
    assert_eq!(lflag(&pty.slave) & canon, canon, "a new pty starts cooked");
    let spawn_on_pty = |slave: &std::fs::File| {
        let io = || Stdio::from(slave.try_clone().unwrap());
        minivmm_tests::minivmm(&["--kernel", &k])
            .stdin(io())
            .stdout(io())
            .stderr(io())
            .spawn()
            .unwrap()
    };
    let mut child = spawn_on_pty(&pty.slave);
    // Read the terminal until `needle` appears.
    let mut seen = Vec::new();
    let mut read_until = |master: &mut std::fs::File, needle: &str| {
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = master.read(&mut buf).expect("read pty");
            assert!(
                n > 0,
                "pty closed; saw {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    };
    read_until(&mut pty.master, "guest-up");
    assert_eq!(lflag(&pty.slave) & canon, 0, "raw mode while the VM runs");
    pty.master.write_all(b"\x01h").unwrap();
    read_until(&mut pty.master, "Ctrl-A x");
    pty.master.write_all(b"\x01x").unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert_eq!(
        lflag(&pty.slave) & canon,
        canon,
        "terminal restored on exit"
    );

    // Restored on a signal too.
    let mut child = spawn_on_pty(&pty.slave);
    seen.clear();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("guest-up") {
        let n = pty.master.read(&mut buf).expect("read pty");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(lflag(&pty.slave) & canon, 0);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert_eq!(
        lflag(&pty.slave) & canon,
        canon,
        "terminal restored after SIGTERM"
    );
}

#[test]
fn isa_debug_exit_ends_with_qemus_status() {
    if !kvm_available("isa_debug_exit_ends_with_qemus_status") {
        return;
    }
    // mov dx, 0xf4; mov eax, 3; out dx, eax (a 4-byte write, as QEMU test
    // images do), then power off (reached only without the device).
    let out3 = [0x66, 0xba, 0xf4, 0x00, 0xb8, 3, 0, 0, 0, 0xef];
    let k = tiny_guest(
        "debugexit",
        &[
            &code_print(b"hi\n"),
            &out3,
            &code_out_then_halt(PM_PORT, S5),
        ],
    );
    let mut vm = Vm::spawn(&["--kernel", &k, "--isa-debug-exit"]);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(7), "stderr: {err}");
    let writes_3 = k;
    assert_eq!(vm.seen, vec!["hi"], "output before the write is kept");
    assert!(!err.contains("error"), "{err}");
    // A one-byte write of 0x3f: status 127.
    let k = tiny_guest("debugexit-byte", &[&code_out_then_halt(0xf4, 0x3f)]);
    let mut vm = Vm::spawn(&["--kernel", &k, "--isa-debug-exit", "--no-shutdown"]);
    assert_eq!(vm.wait_exit(LIMIT).0.code(), Some(127));
    // Without the flag the port is not there: the guest goes on and powers off.
    let mut vm = Vm::spawn(&["--kernel", &writes_3]);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
}
