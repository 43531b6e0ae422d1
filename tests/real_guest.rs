//! Real-guest tests: Debian's cloud kernel (bzImage and ELF vmlinux) with the
//! busybox test initrd from `resources/build-images.sh`.
//!
//! They need hardware-style KVM. Where the host has none they skip loudly, and the
//! test command (resources/run-tests.sh) runs this binary again inside the nested
//! runner's L1 VM with MINIVMM_REQUIRE_REAL_GUEST=1, where skipping is a failure.
//! Each test boots once and checks several facts; the guest boots with `quiet`
//! because serial output is slow in nested runs.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use minivmm_tests::{images_dir, real_guest_available, Vm};

/// Safety bound for one boot in a nested (TCG-emulated L1) run; boots take ~10 s.
const BOOT: Duration = Duration::from_secs(240);

fn image(name: &str) -> String {
    images_dir().join(name).display().to_string()
}

/// A guest that hangs is stopped by minivmm a little before the test gives
/// up ([`BOOT`]), so the failure shows where its vcpus were.
const HANG_TIMEOUT: &str = "230";

fn boot(kernel: &str, append: &str, extra: &[&str]) -> Vm {
    boot_initrd(kernel, "initrd.img", append, extra)
}

/// [`boot`] with another initrd of the test images.
fn boot_initrd(kernel: &str, initrd: &str, append: &str, extra: &[&str]) -> Vm {
    let (k, i) = (image(kernel), image(initrd));
    let mut args = vec!["--kernel", &k, "--initrd", &i, "--append", append];
    if !extra.contains(&"--timeout") {
        args.extend_from_slice(&["--timeout", HANG_TIMEOUT]);
    }
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
    let append =
        "console=ttyS0 quiet minivmm.action=poweroff minivmm.test=bz-42 -- echo ran-$((6*7))";
    let mut vm = boot("vmlinuz", append, &["--memory", "1G", "--cpus", "2"]);
    let b = vm.wait_banner(BOOT);
    vm.wait_line(BOOT, |l| l.trim_end() == "ran-42");
    assert!(b.release.contains("cloud-amd64"), "{b:?}");
    assert_eq!(b.cmdline, append, "--append reaches /proc/cmdline verbatim");
    assert_eq!(b.nproc, 2, "--cpus 2");
    assert!(within(b.memtotal_kb, 1 << 30, 0.15), "--memory 1G: {b:?}");
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "poweroff -f exits 0; stderr: {err}");
    assert!(
        !vm.seen.iter().any(|l| l.contains("panicked")),
        "{:?}",
        vm.seen
    );
}

#[test]
fn generic_kernel_with_acpi_off_finds_every_cpu_in_the_mp_table() {
    if !real_guest_available("generic_kernel_with_acpi_off_finds_every_cpu_in_the_mp_table") {
        return;
    }
    // Debian's generic kernel reads MP tables (the cloud kernel cannot); with
    // acpi=off the MADT is not read, so only the MP table tells of vcpu 1.
    let mut vm = boot(
        "l1/vmlinuz",
        "console=ttyS0 quiet acpi=off minivmm.action=hang",
        &["--cpus", "2"],
    );
    let b = vm.wait_banner(BOOT);
    assert!(!b.release.contains("cloud"), "the generic kernel: {b:?}");
    assert!(b.cmdline.contains("acpi=off"), "{b:?}");
    assert_eq!(b.nproc, 2, "acpi=off --cpus 2: {b:?}");
    vm.signal(libc::SIGTERM);
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(143), "stderr: {err}");
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

/// `--console virtio`: hvc0 is the guest's console (once the init loaded
/// virtio_console: Linux drops the messages from before, as with QEMU's
/// virtconsole), with the init's banner, a shell that takes typed input, and
/// the kernel's messages.
#[test]
fn virtio_console_carries_the_kernel_log_and_a_shell() {
    if !real_guest_available("virtio_console_carries_the_kernel_log_and_a_shell") {
        return;
    }
    // The agent image loads virtio_mmio and virtio_console; its init looks
    // for the agent's port, so the VM has one.
    let (sock, _) = qmp_socket("rg-hvc");
    let agent = format!("unix:{}", sock.with_file_name("vm.qga").display());
    let append = "console=hvc0 minivmm.action=shell";
    let extra = ["--console", "virtio", "--agent", &agent];
    let mut vm = boot_initrd("vmlinuz", "agent-initrd.img", append, &extra);
    let b = vm.wait_banner(BOOT);
    assert_eq!(b.cmdline, append);
    vm.wait_line(BOOT, |l| l.contains("poweroff -f"));
    // The shell computes the answer (the input reached it); the kernel's
    // console is hvc0, and what the kernel prints now comes there.
    vm.type_text("echo kernel-says-hi >/dev/kmsg\n");
    vm.wait_line(BOOT, |l| l.trim_end().ends_with("] kernel-says-hi"));
    vm.type_text("echo typed-$((6*7)) $(cat /sys/class/tty/console/active)\n");
    vm.wait_line(BOOT, |l| l.trim_end() == "typed-42 hvc0");
    vm.type_text("poweroff -f\n");
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
}

fn qmp_socket(test: &str) -> (std::path::PathBuf, String) {
    let p = minivmm_tests::socket_path(test);
    let spec = format!("unix:{}", p.display());
    (p, spec)
}

#[test]
fn qmp_drives_a_linux_guest_through_reset_and_acpi_powerdown() {
    use minivmm_tests::Qmp;
    use serde_json::json;
    if !real_guest_available("qmp_drives_a_linux_guest_through_reset_and_acpi_powerdown") {
        return;
    }
    let (sock, spec) = qmp_socket("rg-qmp");
    let mut vm = boot(
        "vmlinuz",
        "console=ttyS0 quiet minivmm.action=wait",
        &["--qmp", &spec, "--paused", "--cpus", "2"],
    );
    let mut fresh = Qmp::connect(&sock);
    assert!(fresh.greeting["QMP"]["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("minivmm"));
    assert_eq!(
        fresh.cmd(r#"{"execute":"stop"}"#)["error"]["class"],
        "CommandNotFound",
        "commands before negotiation are refused"
    );
    let mut a = Qmp::negotiated(&sock);
    let mut b = Qmp::negotiated(&sock);
    let status = |q: &mut Qmp| q.cmd(r#"{"execute":"query-status"}"#)["return"]["status"].clone();
    assert_eq!(status(&mut a), "prelaunch");
    assert_eq!(a.cmd(r#"{"execute":"cont"}"#), json!({"return": {}}));
    a.wait_event("RESUME");
    b.wait_event("RESUME");
    let banner = vm.wait_banner(BOOT);
    assert_eq!(banner.nproc, 2);

    // stop/cont with events to both clients.
    assert_eq!(a.cmd(r#"{"execute":"stop"}"#), json!({"return": {}}));
    a.wait_event("STOP");
    b.wait_event("STOP");
    assert_eq!(status(&mut b), "paused");
    assert_eq!(b.cmd(r#"{"execute":"cont"}"#), json!({"return": {}}));
    a.wait_event("RESUME");
    b.wait_event("RESUME");
    assert_eq!(status(&mut a), "running");

    // system_reset reboots the guest: banner twice.
    assert_eq!(
        a.cmd(r#"{"execute":"system_reset"}"#),
        json!({"return": {}})
    );
    assert_eq!(
        b.wait_event("RESET")["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    a.wait_event("RESET");
    vm.wait_banner(BOOT);

    // A socat session alongside.
    if std::process::Command::new("socat")
        .arg("-V")
        .output()
        .is_ok()
    {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf '%s\\n' '{{\"execute\":\"qmp_capabilities\"}}' '{{\"execute\":\"query-status\"}}' | socat - UNIX-CONNECT:{}",
                sock.display()
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(
                r#"{"return": {"status": "running", "singlestep": false, "running": true}}"#
            ),
            "socat session: {text}"
        );
    } else {
        assert!(!minivmm_tests::must_run_everything(), "CI installs socat");
    }

    // ACPI power button: the guest's acpid powers it off.
    assert_eq!(
        a.cmd(r#"{"execute":"system_powerdown"}"#),
        json!({"return": {}})
    );
    a.wait_event("POWERDOWN");
    assert_eq!(
        b.wait_event("SHUTDOWN")["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
}

#[test]
fn qemu_qmp_library_and_guest_panic() {
    use minivmm_tests::Qmp;
    use serde_json::json;
    if !real_guest_available("qemu_qmp_library_and_guest_panic") {
        return;
    }
    // qemu.qmp: query-status, stop/cont, system_reset, quit (tests/qmp_client.py).
    let probe = std::process::Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        let (sock, spec) = qmp_socket("rg-py");
        let mut vm = boot(
            "vmlinuz",
            "console=ttyS0 quiet minivmm.action=wait",
            &["--qmp", &spec, "--name", "py"],
        );
        vm.wait_banner(BOOT);
        let o = std::process::Command::new("python3")
            .arg(minivmm_tests::repo_root().join("tests/qmp_client.py"))
            .arg(&sock)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "qmp_client.py:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let (st, err) = vm.wait_exit(BOOT);
        assert_eq!(st.code(), Some(0), "quit: {err}");
    } else {
        assert!(
            !minivmm_tests::must_run_everything(),
            "CI installs qemu.qmp"
        );
        minivmm_tests::loud("*** SKIPPED the qemu.qmp part: python3 module qemu.qmp missing");
    }

    // A kernel panic reaches the host through pvpanic.
    let (sock, spec) = qmp_socket("rg-panic");
    let mut vm = boot(
        "vmlinuz",
        "console=ttyS0 quiet minivmm.action=panic",
        &["--qmp", &spec],
    );
    let mut q = Qmp::negotiated(&sock);
    assert_eq!(
        q.wait_event("GUEST_PANICKED")["data"],
        json!({"action": "poweroff"})
    );
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(1), "a panicked guest exits 1: {err}");
    assert!(err.contains("panicked"), "{err}");
}

#[path = "real_guest_agent/mod.rs"]
mod agent;

/// `minivmm run` (same binary, so one nested boot of L1 runs them all).
#[path = "real_guest_run/mod.rs"]
mod run;

/// `--share` in a plain VM.
#[path = "real_guest_share/mod.rs"]
mod share;
