//! Command-line behaviour: help, and every bad input a user can give is answered with
//! one clear line and a non-zero exit, never a panic. None of this needs a guest.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use minivmm_tests::{code_out_then_halt, minivmm, temp_file, tiny_elf};
use std::process::Output;

fn run(args: &[&str]) -> Output {
    minivmm(args).output().expect("run minivmm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failed run whose stderr names `needle`, without a panic.
fn assert_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "should fail; stderr: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "panicked: {err}");
}

fn good_kernel(test: &str) -> String {
    temp_file(
        test,
        "kernel.elf",
        &tiny_elf(&code_out_then_halt(0x600, 0x34)),
    )
    .display()
    .to_string()
}

#[test]
fn help_documents_every_flag() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--append",
        "--memory",
        "--cpus",
        "--serial",
        "--name",
        "--uuid",
        "--no-reboot",
        "--timeout",
        "--qmp",
        "--paused",
        "--agent",
        "--agent-timeout",
        "--virtio-mmio-cmdline",
        "--no-shutdown",
        "--isa-debug-exit",
        "--share",
        "--virtiofsd",
        "--help",
        "--version",
        "Ctrl-A x",
        "Exit status",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
    assert!(run(&["--version"]).status.success());
}

#[test]
fn kernel_is_required() {
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert_error(&o, "--kernel");
}

#[test]
fn missing_kernel_is_named() {
    assert_error(
        &run(&["--kernel", "/nonexistent/vmlinuz"]),
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn bad_shares_are_one_clear_line_each() {
    let file = temp_file("badshare", "file.txt", b"x");
    let f = file.to_str().unwrap();
    for (share, needle) in [
        ("/nonexistent/dir:/mnt".to_string(), "/nonexistent/dir"),
        (format!("{f}:/mnt"), "is not a directory"),
        ("/tmp:mnt".to_string(), "must be absolute"),
        ("/tmp".to_string(), "no guest path"),
    ] {
        let o = run(&["--kernel", "k", "--share", &share]);
        assert_eq!(o.status.code(), Some(2), "{share}");
        assert_error(&o, needle);
    }
    let dir = file.parent().unwrap().to_str().unwrap().to_string();
    let kernel = good_kernel("badshare");
    let o = run(&[
        "--kernel",
        &kernel,
        "--share",
        &format!("{dir}:/mnt"),
        "--virtiofsd",
        f,
    ]);
    assert_error(&o, "not an executable file");
}

#[test]
fn unreadable_kernel_is_named() {
    // A directory cannot be read as a file, even by root.
    let dir = std::env::temp_dir();
    let o = run(&["--kernel", dir.to_str().unwrap()]);
    assert_error(&o, dir.to_str().unwrap());
}

#[test]
fn non_kernel_is_rejected() {
    let p = temp_file("nonkernel", "notes.txt", b"just some text, not a kernel\n");
    assert_error(
        &run(&["--kernel", p.to_str().unwrap()]),
        "is not a Linux kernel image",
    );
    let empty = temp_file("nonkernel", "empty", b"");
    assert_error(&run(&["--kernel", empty.to_str().unwrap()]), "empty");
}

#[test]
fn missing_initrd_is_named() {
    let k = good_kernel("initrd");
    assert_error(
        &run(&["--kernel", &k, "--initrd", "/nonexistent/initrd.img"]),
        "/nonexistent/initrd.img",
    );
}

#[test]
fn bad_sizes_are_explained() {
    let k = good_kernel("sizes");
    for (size, needle) in [
        ("lots", "not a size"),
        ("12Q", "unknown size suffix"),
        ("2T", "too large"),
        ("1M", "too small"),
    ] {
        let o = run(&["--kernel", &k, "--memory", size]);
        assert_eq!(o.status.code(), Some(2), "{size}");
        assert_error(&o, needle);
    }
}

#[test]
fn memory_the_host_cannot_back_is_an_error() {
    let k = good_kernel("hugemem");
    assert_error(
        &run(&["--kernel", &k, "--memory", "1T"]),
        "cannot allocate 1048576 MiB of guest memory",
    );
}

#[test]
fn zero_and_too_many_cpus() {
    let k = good_kernel("cpus");
    assert_error(&run(&["--kernel", &k, "--cpus", "0"]), "at least 1 vcpu");
    assert_error(&run(&["--kernel", &k, "--cpus", "300"]), "at most 254");
}

#[test]
fn bad_serial_and_timeout() {
    let k = good_kernel("serial");
    assert_error(
        &run(&["--kernel", &k, "--serial", "tcp:1"]),
        "unknown serial backend",
    );
    assert_error(
        &run(&["--kernel", &k, "--timeout", "0"]),
        "at least 1 second",
    );
    assert_error(
        &run(&[
            "--kernel",
            &k,
            "--serial",
            "file:/nonexistent/dir/console.log",
        ]),
        "/nonexistent/dir/console.log",
    );
}

#[test]
fn missing_kvm_device_says_what_to_do() {
    let k = good_kernel("nokvm");
    let o = minivmm(&["--kernel", &k])
        .env("MINIVMM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    assert_error(&o, "/nonexistent/kvm does not exist");
    assert_error(&o, "kvm-amd");
}

#[test]
fn kvm_permission_denied_says_kvm_group() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "*** SKIPPED kvm_permission_denied_says_kvm_group: needs root to drop to another user"
        );
        return;
    }
    // A device node only root may open, opened as user `nobody`.
    let dir = std::env::temp_dir().join(format!("minivmm-test-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = dir.join("kernel.elf");
    std::fs::write(&k, tiny_elf(&code_out_then_halt(0x600, 0x34))).unwrap();
    let dev = dir.join("kvm");
    std::fs::write(&dev, b"").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bin = minivmm_tests::minivmm_bin();
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["--kernel", k.to_str().unwrap()])
        .env("MINIVMM_KVM_DEVICE", &dev)
        .output();
    let o = match o {
        Ok(o) => o,
        Err(e) => {
            minivmm_tests::loud(&format!(
                "*** SKIPPED kvm_permission_denied_says_kvm_group: setpriv unavailable: {e}"
            ));
            return;
        }
    };
    if stderr(&o).contains("Permission denied") && stderr(&o).contains("setpriv") {
        eprintln!(
            "*** SKIPPED kvm_permission_denied_says_kvm_group: {}",
            stderr(&o)
        );
        return;
    }
    assert_error(&o, "permission denied opening");
    assert_error(&o, "'kvm' group");
}

/// Errors are printed as one line with each cause once ("top: cause"), whatever
/// crate they come from: no level repeats what its cause says.
#[test]
fn error_chains_say_each_cause_once() {
    let k = good_kernel("chains");
    let truncated = temp_file("chains", "truncated.elf", &tiny_elf(&[0u8; 8])[..100]);
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--qmp", "unix:/nonexistent-dir/q.sock"],
            "cannot listen on QMP endpoint unix:/nonexistent-dir/q.sock: No such file or directory",
        ),
        (
            vec!["--agent", "unix:/nonexistent-dir/a.sock"],
            "cannot listen on guest agent socket /nonexistent-dir/a.sock: No such file or directory",
        ),
        (
            vec!["--serial", "file:/nonexistent-dir/console.log"],
            "cannot open serial output /nonexistent-dir/console.log: No such file or directory",
        ),
        (
            vec!["--initrd", "/nonexistent-dir/initrd.img"],
            "cannot read initrd /nonexistent-dir/initrd.img: No such file or directory",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--kernel", k.as_str()];
        args.extend(extra);
        let o = run(&args);
        assert_error(&o, want);
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert_eq!(err.matches("No such file").count(), 1, "{err}");
    }
    // A foreign error that describes its own causes is not repeated either.
    let o = run(&["--kernel", truncated.to_str().unwrap(), "--serial", "none"]);
    assert_error(&o, "cannot load kernel");
    let err = stderr(&o);
    let root_cause = err.trim_end().rsplit(": ").next().unwrap_or_default();
    assert!(!root_cause.is_empty(), "{err}");
    assert_eq!(err.matches(root_cause).count(), 1, "repeated: {err}");
}

/// A file with a bzImage setup header whose version string is `version`
/// (enough for `minivmm run` to read the version; it cannot boot).
fn fake_bzimage(test: &str, version: &str) -> String {
    let mut img = vec![0u8; 0x1000];
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    // kernel_version: offset of the string, minus 0x200.
    img[0x20e..0x210].copy_from_slice(&0x0400u16.to_le_bytes());
    let s = format!("{version} (builder@host) #1 SMP\0");
    img[0x600..0x600 + s.len()].copy_from_slice(s.as_bytes());
    temp_file(test, "bzImage", &img).display().to_string()
}

#[test]
fn run_help_teaches_every_flag_and_the_exit_statuses() {
    let o = run(&["run", "--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--modules",
        "--add",
        "--result",
        "--timeout",
        "--memory",
        "--cpus",
        "--append",
        "--qmp",
        "--verbose",
        "--serial",
        "--isa-debug-exit",
        "128+N",
        "127",
        "126",
        "124",
        "125",
        "Examples",
    ] {
        assert!(out.contains(flag), "run --help lacks {flag}:\n{out}");
    }
    assert!(stderr(&run(&["--help"])).is_empty());
    assert!(String::from_utf8_lossy(&run(&["--help"]).stdout).contains("minivmm run"));
}

#[test]
fn run_bad_inputs_are_one_clear_line_each() {
    let k = fake_bzimage("run-bad", "6.1.0-99-test");
    let dir = std::path::Path::new(&k).parent().unwrap().to_path_buf();
    // A modules tree without the channel's modules.
    let tree = dir.join("modules");
    std::fs::create_dir_all(tree.join("kernel")).unwrap();
    std::fs::write(tree.join("modules.dep"), "kernel/other.ko:\n").unwrap();
    std::fs::write(tree.join("kernel/other.ko"), b"").unwrap();
    let tree = tree.display().to_string();
    // A kernel with the channel built in but no virtiofs, asked for a share.
    let builtin = dir.join("modules-builtin");
    std::fs::create_dir_all(&builtin).unwrap();
    std::fs::write(builtin.join("modules.dep"), "").unwrap();
    std::fs::write(
        builtin.join("modules.builtin"),
        "kernel/drivers/virtio/virtio_mmio.ko\nkernel/drivers/char/virtio_console.ko\n",
    )
    .unwrap();
    let builtin = builtin.display().to_string();
    let share = format!("{}:/mnt", dir.display());
    let not_cpio = dir.join("not-cpio.img");
    std::fs::write(&not_cpio, "plain text\n").unwrap();
    let not_cpio = not_cpio.display().to_string();
    // (kernel, options, command, what the one line names); each runs as
    // `run --kernel KERNEL OPTIONS -- COMMAND`.
    let cases: Vec<(&str, Vec<&str>, &str, &str)> = vec![
        (
            &k,
            vec!["--modules", &builtin, "--share", &share],
            "true",
            "CONFIG_VIRTIO_FS",
        ),
        (
            "/nonexistent/vmlinuz",
            vec![],
            "true",
            "/nonexistent/vmlinuz",
        ),
        (
            &k,
            vec!["--modules", "/nonexistent/mods"],
            "true",
            "/nonexistent/mods",
        ),
        (&k, vec!["--modules", &tree], "true", "virtio_mmio"),
        (
            &k,
            vec!["--modules", &tree, "--add", "/nonexistent/file"],
            "true",
            "/nonexistent/file",
        ),
        // Found while the initramfs is made, on its own thread as the VM
        // is set up: the same one line.
        (
            &k,
            vec!["--modules", &builtin, "--initrd", &not_cpio],
            "true",
            "is not a newc cpio initramfs",
        ),
        (&k, vec![], "", "no command"),
        (
            &k,
            vec!["--serial", "stdio"],
            "true",
            "--serial stdio is not available with run",
        ),
    ];
    for (kernel, options, command, needle) in cases {
        let mut args = vec!["run", "--kernel", kernel];
        args.extend(options);
        args.extend(["--", command]);
        let o = run(&args);
        assert_error(&o, needle);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
        assert_eq!(
            stderr(&o).lines().count(),
            1,
            "{args:?}: one line: {}",
            stderr(&o)
        );
    }
    // No command at all: a usage error.
    let o = run(&["run", "--kernel", &k]);
    assert_eq!(o.status.code(), Some(2));
    assert_error(&o, "CMD");
}
