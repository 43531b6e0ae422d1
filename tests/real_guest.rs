//! Real-guest tests: Debian's cloud kernel (bzImage and ELF vmlinux) with the
//! busybox test initrd from `resources/build-images.sh`.
//!
//! They need hardware-style KVM. Where the host has none they skip loudly, and the
//! test command (resources/run-tests.sh) runs this binary again inside the nested
//! runner's L1 VM with MINIVMM_REQUIRE_REAL_GUEST=1, where skipping is a failure.
//! Each test boots once and checks several facts; the guest boots with `quiet`
//! because serial output is slow in nested runs.

use std::time::Duration;

use minivmm_tests::{images_dir, real_guest_available, Vm};

/// Safety bound for one boot in a nested (TCG-emulated L1) run; boots take ~10 s.
const BOOT: Duration = Duration::from_secs(240);

fn image(name: &str) -> String {
    images_dir().join(name).display().to_string()
}

fn boot(kernel: &str, append: &str, extra: &[&str]) -> Vm {
    let (k, i) = (image(kernel), image("initrd.img"));
    let mut args = vec!["--kernel", &k, "--initrd", &i, "--append", append];
    args.extend_from_slice(extra);
    Vm::spawn(&args)
}

fn within(actual_kb: u64, expected_bytes: u64, tolerance: f64) -> bool {
    let expected_kb = (expected_bytes / 1024) as f64;
    (actual_kb as f64 - expected_kb).abs() <= expected_kb * tolerance
}

#[test]
fn bzimage_boots_with_cmdline_cpus_and_memory_then_powers_off() {
    if !real_guest_available("bzimage_boots_with_cmdline_cpus_and_memory_then_powers_off") {
        return;
    }
    let append = "console=ttyS0 quiet minivmm.action=poweroff minivmm.test=bz-42";
    let mut vm = boot("vmlinuz", append, &["--memory", "1G", "--cpus", "2"]);
    let b = vm.wait_banner(BOOT);
    assert!(b.release.contains("cloud-amd64"), "{b:?}");
    assert_eq!(b.cmdline, append, "--append reaches /proc/cmdline verbatim");
    assert_eq!(b.nproc, 2, "--cpus 2");
    assert!(within(b.memtotal_kb, 1 << 30, 0.15), "--memory 1G: {b:?}");
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "poweroff -f exits 0; stderr: {err}");
}

#[test]
fn elf_vmlinux_boots_with_4g() {
    if !real_guest_available("elf_vmlinux_boots_with_4g") {
        return;
    }
    let append = "console=ttyS0 quiet minivmm.action=poweroff";
    let mut vm = boot("vmlinux", append, &["--memory", "4G"]);
    let b = vm.wait_banner(BOOT);
    assert_eq!(b.nproc, 1, "default --cpus is 1");
    assert!(
        within(b.memtotal_kb, 4 << 30, 0.15),
        "--memory 4G (RAM above the 32-bit hole is used): {b:?}"
    );
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
}

#[test]
fn guest_reboot_boots_again_in_the_same_process() {
    if !real_guest_available("guest_reboot_boots_again_in_the_same_process") {
        return;
    }
    let mut vm = boot("vmlinuz", "console=ttyS0 quiet minivmm.action=reboot", &[]);
    vm.wait_banner(BOOT);
    vm.wait_banner(BOOT);
    vm.signal(libc::SIGTERM);
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(143), "stderr: {err}");
}

#[test]
fn guest_reboot_with_no_reboot_exits_zero() {
    if !real_guest_available("guest_reboot_with_no_reboot_exits_zero") {
        return;
    }
    let mut vm = boot(
        "vmlinuz",
        "console=ttyS0 quiet minivmm.action=reboot",
        &["--no-reboot"],
    );
    vm.wait_banner(BOOT);
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
    let banners = vm
        .seen
        .iter()
        .filter(|l| l.contains("MINIVMM-BANNER"))
        .count();
    assert_eq!(banners, 1, "booted once: {:?}", vm.seen);
}

#[test]
fn timeout_stops_a_guest_that_never_stops() {
    if !real_guest_available("timeout_stops_a_guest_that_never_stops") {
        return;
    }
    let mut vm = boot(
        "vmlinuz",
        "console=ttyS0 quiet minivmm.action=hang",
        &["--timeout", "5"],
    );
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(124), "stderr: {err}");
    assert!(err.contains("--timeout of 5 s expired"), "{err}");
}

#[test]
fn serial_console_takes_input() {
    if !real_guest_available("serial_console_takes_input") {
        return;
    }
    let mut vm = boot("vmlinuz", "console=ttyS0 quiet minivmm.action=shell", &[]);
    vm.wait_banner(BOOT);
    vm.wait_line(BOOT, |l| l.contains("poweroff -f"));
    // The shell computes the answer, so seeing it proves the input reached it.
    vm.type_text("echo typed-$((6*7))\n");
    vm.wait_line(BOOT, |l| l.trim_end() == "typed-42");
    vm.type_text("poweroff -f\n");
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
}
