//! `minivmm run` with Debian's cloud kernel (its virtio drivers are modules,
//! packed from `target/images/modules`) and the busybox test initrd as the root
//! filesystem. Each test is one or a few boots; statuses, streams and the
//! result file are checked together.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use minivmm_tests::{images_dir, minivmm, real_guest_available, temp_file};
use serde_json::Value;

/// Safety bound for one run in a nested (TCG-emulated L1) VM.
const RUN: Duration = Duration::from_secs(240);

/// A run that hangs is stopped by minivmm's own `--timeout` a little before
/// the test gives up ([`RUN`]), so the failure shows minivmm's diagnostics
/// (kernel log, vcpus, virtio queues) instead of a silent kill.
const HANG_TIMEOUT: &str = "220";

fn base_args(k: &str, i: &str, m: &str) -> Vec<String> {
    ["run", "--kernel", k, "--initrd", i, "--modules", m]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// `minivmm run` on the cloud kernel and the busybox initrd, with `extra`
/// flags, then `--` and `cmd`.
fn run_cmd(extra: &[&str], cmd: &[&str]) -> Command {
    let dir = images_dir();
    let (k, i, m) = (
        dir.join("vmlinuz").display().to_string(),
        dir.join("initrd.img").display().to_string(),
        dir.join("modules").display().to_string(),
    );
    let mut args = base_args(&k, &i, &m);
    if !extra.contains(&"--timeout") {
        args.extend(["--timeout".to_string(), HANG_TIMEOUT.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.extend(cmd.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    minivmm(&refs)
}

/// Runs to the end (bounded by [`RUN`]) with `stdin` as input.
fn output(mut c: Command, stdin: &[u8]) -> Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = w.write_all(&input);
    });
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < RUN {
            std::thread::park_timeout(Duration::from_secs(1));
            // SAFETY: kill(pid, 0) only checks the process exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    let _ = feeder.join();
    watchdog.thread().unpark();
    out
}

fn result(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("the result file")).expect("JSON")
}

#[test]
fn run_exit_status_streams_stdin_and_result() {
    if !real_guest_available("run_exit_status_streams_stdin_and_result") {
        return;
    }
    let res = temp_file("run-basic", "result.json", b"");
    let out = output(
        run_cmd(
            &["--result", res.to_str().unwrap()],
            &[
                "sh",
                "-c",
                "cat; echo out-line; echo err-line >&2; printf '\\001\\000\\377'; exit 7",
            ],
        ),
        b"from stdin\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "stderr: {err}");
    assert_eq!(
        out.stdout, b"from stdin\nout-line\n\x01\x00\xff",
        "stderr: {err}"
    );
    assert_eq!(err, "err-line\n", "stderr carries only the command's");
    let r = result(&res);
    assert_eq!(r["verdict"], "exited", "{r}");
    assert_eq!(r["exit_status"], 7);
    assert_eq!(r["command_status"], 7);
    let t = &r["timings_ms"];
    for k in ["to_init", "to_command_start", "command", "total"] {
        assert!(t[k].is_u64(), "{k} in {r}");
    }
    assert!(t["to_init"].as_u64() <= t["to_command_start"].as_u64());
    assert!(t["to_command_start"].as_u64() <= t["total"].as_u64());
}

#[test]
fn run_signals_missing_commands_and_a_mebibyte_of_output() {
    if !real_guest_available("run_signals_missing_commands_and_a_mebibyte_of_output") {
        return;
    }
    let out = output(run_cmd(&[], &["sh", "-c", "kill -9 $$"]), b"");
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = output(run_cmd(&[], &["no-such-command-here"]), b"");
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-command-here"), "{err}");
    // 1 MiB, byte-exact.
    let out = output(
        run_cmd(&[], &["sh", "-c", "yes 0123456789abcdef | head -c 1048576"]),
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 1 << 20);
    let expected: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    assert!(out.stdout == expected, "the output differs");
}

#[test]
fn run_output_is_live_and_added_files_are_there() {
    if !real_guest_available("run_output_is_live_and_added_files_are_there") {
        return;
    }
    let file = temp_file("run-add", "hello.txt", b"added file\n");
    let dir = file.parent().unwrap().join("tree");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/leaf"), b"leaf\n").unwrap();
    let add_file = format!("{}:/data/hello.txt", file.display());
    let add_dir = format!("{}:/data/tree", dir.display());
    // Under /tmp too: the init must not hide it under a fresh tmpfs.
    let add_tmp = format!("{}:/tmp/in-tmp.txt", file.display());
    let mut child = run_cmd(
        &["--add", &add_file, "--add", &add_dir, "--add", &add_tmp],
        &[
            "sh",
            "-c",
            "echo early; cat /data/hello.txt /data/tree/sub/leaf /tmp/in-tmp.txt; \
             echo w > /tmp/w && cat /tmp/w; sleep 3; echo late",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    let early_at = Instant::now();
    assert_eq!(first, "early\n");
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    let st = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(st.code(), Some(0), "stderr: {err}");
    assert_eq!(rest, "added file\nleaf\nadded file\nw\nlate\n");
    assert!(
        early_at.elapsed() >= Duration::from_secs(2),
        "the first line arrived only {:?} before the end",
        early_at.elapsed()
    );
}

#[test]
fn run_panic_and_timeout_verdicts() {
    if !real_guest_available("run_panic_and_timeout_verdicts") {
        return;
    }
    let res = temp_file("run-panic", "result.json", b"");
    let out = output(
        run_cmd(
            &["--result", res.to_str().unwrap()],
            &[
                "sh",
                "-c",
                "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger",
            ],
        ),
        b"",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "stderr: {err}");
    let r = result(&res);
    assert_eq!(r["verdict"], "panic", "{r}");
    assert_eq!(r["exit_status"], 125);
    // The kernel's last words, with `quiet`: the panic itself, which only
    // the console saw; its first line stays even when its stack trace alone
    // fills the 50 lines.
    let log = kernel_log(&r);
    assert!(log.len() <= 50, "{r}");
    assert!(
        log.iter()
            .any(|l| l.contains("Kernel panic - not syncing: sysrq triggered crash")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.starts_with('[') && l.contains("] ")),
        "dmesg-style lines: {log:#?}"
    );
    assert!(err.contains("the kernel log's last lines"), "{err}");
    assert!(err.contains("the kernel log's last lines:\n  ["), "{err}");

    let out = output(
        run_cmd(
            &["--timeout", "5", "--result", res.to_str().unwrap()],
            &["sleep", "1000"],
        ),
        b"",
    );
    assert_eq!(out.status.code(), Some(124));
    let r = result(&res);
    assert_eq!(r["verdict"], "timeout", "{r}");
    // Where the vcpu was, read before the VM stopped: a kernel address.
    let rip = r["diagnostics"]["vcpus"][0]["rip"]
        .as_str()
        .unwrap_or_default();
    assert!(rip.starts_with("0xffffffff"), "{r}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vcpu0: rip=0xffffffff"), "{err}");
    // The boot's log came over the channel although the console was quiet.
    let log = kernel_log(&r);
    assert!(!log.is_empty() && log.len() <= 50, "{r}");
    assert!(log.iter().all(|l| l.starts_with('[')), "{log:#?}");
}

/// `diagnostics.kernel_log` of a result.
fn kernel_log(r: &Value) -> Vec<String> {
    r["diagnostics"]["kernel_log"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn run_isa_debug_exit_from_an_added_dynamic_program() {
    if !real_guest_available("run_isa_debug_exit_from_an_added_dynamic_program") {
        return;
    }
    // A dynamically linked host program, added at its own path: its loader
    // and libraries come along. It writes 3 to port 0xf4: status 7, as QEMU.
    let prog = env!("CARGO_BIN_EXE_minivmm-test-debug-exit");
    let res = temp_file("run-debug-exit", "result.json", b"");
    let out = output(
        run_cmd(
            &[
                "--isa-debug-exit",
                "--add",
                prog,
                "--result",
                res.to_str().unwrap(),
            ],
            &[prog, "3"],
        ),
        b"",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "stderr: {err}");
    let r = result(&res);
    assert_eq!(r["verdict"], "exited", "{r}");
    assert_eq!(r["exit_status"], 7, "{r}");
    // Without the device the write does nothing and the program says so.
    let out = output(run_cmd(&["--add", prog], &[prog, "3"]), b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("did not end the VM"), "{err}");
}

mod share;
