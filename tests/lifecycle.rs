//! VMM plumbing and lifecycle with tiny hand-made guests (a few bytes of 64-bit code
//! loaded as an ELF kernel). They need a /dev/kvm but not hardware virtualization,
//! so they run directly on PVM hosts as well as in the nested runner.

use std::time::Duration;

use minivmm_tests::{
    code_out_then_halt, code_print, kvm_available, temp_file, tiny_elf, Vm, CODE_SPIN,
};

const LIMIT: Duration = Duration::from_secs(30);
const PM_PORT: u16 = 0x600;
const S5: u8 = (5 << 2) | (1 << 5);
const RESET_PORT: u16 = 0x604;

fn guest(test: &str, parts: &[&[u8]]) -> String {
    let code: Vec<u8> = parts.concat();
    temp_file(test, "guest.elf", &tiny_elf(&code))
        .display()
        .to_string()
}

#[test]
fn acpi_poweroff_exits_zero_with_output_flushed() {
    if !kvm_available("acpi_poweroff_exits_zero_with_output_flushed") {
        return;
    }
    let k = guest(
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
    let k = guest(
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
    let k = guest(
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
    let k = guest("timeout", &[&code_print(b"spinning\n"), &CODE_SPIN]);
    let mut vm = Vm::spawn(&["--kernel", &k, "--timeout", "1", "--cpus", "2"]);
    vm.wait_line(LIMIT, |l| l == "spinning");
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(124), "stderr: {err}");
    assert!(err.contains("timeout"), "{err}");
}

#[test]
fn sigint_exits_130() {
    if !kvm_available("sigint_exits_130") {
        return;
    }
    let k = guest("sigint", &[&code_print(b"up\n"), &CODE_SPIN]);
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
    let k = guest(
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
    let k = guest("triplefault", &[&code_print(b"x\n"), &[0x0f, 0x0b]]);
    let mut vm = Vm::spawn(&["--kernel", &k, "--no-reboot"]);
    let (st, err) = vm.wait_exit(LIMIT);
    assert_eq!(vm.seen, vec!["x"]);
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(err.contains("--no-reboot"), "{err}");
}

#[test]
fn kvm_failure_exits_one_with_registers() {
    if !kvm_available("kvm_failure_exits_one_with_registers") {
        return;
    }
    // Jump to 0x3000_0000: mapped by the boot page tables but not guest RAM, so
    // KVM cannot fetch the next instruction and reports an error.
    let k = guest(
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
