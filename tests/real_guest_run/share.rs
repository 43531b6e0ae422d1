//! `minivmm run --share` and `--host-root`: host directories over virtio-fs,
//! served by Debian's virtiofsd, mounted by the init before the command.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use minivmm_tests::{images_dir, minivmm, real_guest_available, temp_dir_with, virtiofsd_serving};

use super::{output, run_cmd, HANG_TIMEOUT};

/// 64 MiB, the size the issue asks to cross both ways.
const BIG: usize = 64 << 20;

/// `minivmm run` on the cloud kernel with its modules tree, `extra` flags,
/// then `--` and `cmd` (no initrd: `--host-root` refuses one).
fn run_bare(extra: &[&str], cmd: &[&str]) -> Command {
    let dir = images_dir();
    let (k, m) = (
        dir.join("vmlinuz").display().to_string(),
        dir.join("modules").display().to_string(),
    );
    let mut args: Vec<&str> = vec!["run", "--kernel", &k, "--modules", &m];
    args.extend(["--timeout", HANG_TIMEOUT]);
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    minivmm(&args)
}

/// Deterministic bytes that no simple pattern reproduces by accident.
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// The run exited 0 and its stdout was exactly `expected`.
fn exits_zero_printing(out: &std::process::Output, expected: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(stdout, expected, "stderr: {stderr}");
}

/// No virtiofsd serves any of `dirs` any more; then they are removed.
fn no_daemon_left_then_remove(dirs: &[&Path]) {
    for dir in dirs {
        assert_eq!(
            virtiofsd_serving(dir),
            Vec::<String>::new(),
            "no daemon left for {}",
            dir.display()
        );
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A run in progress, its stdout read line by line.
struct Running {
    child: std::process::Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Running {
    /// Spawns `cmd` with stdin, stdout and stderr piped; returns it with the
    /// first line it printed.
    fn spawn(mut cmd: Command) -> (Self, String) {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let run = Self { child, stdout };
        if first.is_empty() {
            // It ended before printing: say how, with minivmm's diagnostics.
            let (st, _, err) = run.finish(b"");
            panic!("the run ended before its first line: {st}; stderr: {err}");
        }
        (run, first)
    }

    /// Writes `input` and closes stdin, then waits for the end: the exit
    /// status, the rest of stdout, all of stderr.
    fn finish(mut self, input: &[u8]) -> (std::process::ExitStatus, String, String) {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        drop(stdin);
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let st = self.child.wait().unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (st, rest, err)
    }
}

#[test]
fn run_share_reads_writes_and_refuses_writes_to_ro() {
    if !real_guest_available("run_share_reads_writes_and_refuses_writes_to_ro") {
        return;
    }
    let rw = temp_dir_with("share-rw", "from-host", b"written on the host\n");
    let ro = temp_dir_with("share-ro", "ro.txt", b"read-only data\n");
    let big = noise(BIG);
    std::fs::write(rw.join("big"), &big).unwrap();
    std::fs::create_dir_all(rw.join("many")).unwrap();
    for i in 0..10_000 {
        std::fs::write(rw.join(format!("many/f{i}")), i.to_string()).unwrap();
    }
    let rw_spec = format!("{}:/mnt/rw", rw.display());
    let ro_spec = format!("{}:/mnt/ro:ro", ro.display());
    let script = "set -e; cd /mnt/rw; cat from-host; echo written in the guest > from-guest; \
        cp big big.copy; yes 0123456789abcde | head -c 67108864 > gen; \
        if touch /mnt/ro/new 2>/dev/null; then echo ro-writable; else echo ro-refused; fi; \
        cat /mnt/ro/ro.txt; \
        exec 3<>unlinked; echo hello-unlinked >&3; rm unlinked; \
        echo unlinked-size $(stat -L -c %s /proc/$$/fd/3); \
        echo unlinked-data $(cat /proc/$$/fd/3); \
        echo listed $(ls many | wc -l) found $(find many -type f | wc -l)";
    let out = output(
        run_cmd(
            &["--share", &rw_spec, "--share", &ro_spec],
            &["sh", "-c", script],
        ),
        b"",
    );
    exits_zero_printing(
        &out,
        "written on the host\nro-refused\nread-only data\nunlinked-size 15\n\
         unlinked-data hello-unlinked\nlisted 10000 found 10000\n",
    );
    assert_eq!(
        std::fs::read(rw.join("from-guest")).unwrap(),
        b"written in the guest\n"
    );
    assert!(
        std::fs::read(rw.join("big.copy")).unwrap() == big,
        "64 MiB read by the guest and written back byte-exact"
    );
    let gen = std::fs::read(rw.join("gen")).unwrap();
    assert_eq!(gen.len(), BIG);
    assert!(
        gen.chunks(16)
            .all(|c| c == &b"0123456789abcde\n"[..c.len()]),
        "64 MiB written by the guest read byte-exact on the host"
    );
    assert!(
        !ro.join("new").exists(),
        ":ro refused the write on the host"
    );
    assert!(!rw.join("unlinked").exists());
    no_daemon_left_then_remove(&[&rw, &ro]);
}

#[test]
fn run_host_root_runs_a_host_program_in_the_current_directory() {
    if !real_guest_available("run_host_root_runs_a_host_program_in_the_current_directory") {
        return;
    }
    let cwd = temp_dir_with("host-root", "marker", b"");
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let py = "import os, platform; \
        open('result.txt', 'w').write(platform.release() + ' ' + os.getcwd() + ' ' + \
        str(os.path.exists('marker')))";
    let probe = format!(
        "/usr/bin/python3 -c \"{py}\" && \
         if touch /etc/minivmm-probe 2>/dev/null; then echo root-writable; else echo root-ro; fi && \
         echo tmp > /tmp/t && cat /tmp/t && ls /proc/1/exe >/dev/null && echo proc"
    );
    let mut cmd = run_bare(&["--host-root"], &["/bin/sh", "-c", &probe]);
    cmd.current_dir(&cwd);
    let out = output(cmd, b"");
    exits_zero_printing(&out, "root-ro\ntmp\nproc\n");
    let result = std::fs::read_to_string(cwd.join("result.txt")).expect("result.txt");
    let (release, rest) = result.split_once(' ').unwrap();
    assert!(
        release.contains("cloud-amd64") && release != host_release.trim(),
        "the guest's kernel ran the host's python3: {result}"
    );
    assert_eq!(rest, format!("{} True", cwd.display()));
    assert!(!Path::new("/etc/minivmm-probe").exists());
    assert_eq!(
        virtiofsd_serving(&cwd),
        Vec::<String>::new(),
        "no daemon left"
    );
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn run_share_whose_daemon_dies_gives_io_errors_then_a_vm_error() {
    if !real_guest_available("run_share_whose_daemon_dies_gives_io_errors_then_a_vm_error") {
        return;
    }
    let dir = temp_dir_with("share-dies", "a", b"first\n");
    std::fs::write(dir.join("b"), b"second\n").unwrap();
    let result_file = dir.with_extension("json");
    let spec = format!("{}:/mnt", dir.display());
    // /mnt/b is not looked up before the daemon is gone.
    let script = "cat /mnt/a; read line; \
        if cat /mnt/b; then echo read-b; else echo b-failed; fi; echo still-running";
    let (run, first) = Running::spawn(run_cmd(
        &[
            "--share",
            &spec,
            "--result",
            &result_file.display().to_string(),
        ],
        &["sh", "-c", script],
    ));
    assert_eq!(first, "first\n", "the share works before");
    let daemons = virtiofsd_serving(&dir);
    assert!(!daemons.is_empty(), "a virtiofsd serves the share");
    for d in &daemons {
        let pid: i32 = d.split(' ').next().unwrap().parse().unwrap();
        // SAFETY: kill(2) on a virtiofsd minivmm started for this test's share.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let (st, rest, err) = run.finish(b"go\n");
    assert_eq!(
        rest, "b-failed\nstill-running\n",
        "I/O errors, and the command goes on; stderr: {err}"
    );
    assert!(err.contains("I/O error"), "the guest's cat says why: {err}");
    assert_eq!(
        err.matches("virtiofsd ended").count(),
        1,
        "minivmm logs the loss once: {err}"
    );
    assert_eq!(st.code(), Some(125), "stderr: {err}");
    assert!(
        err.contains("the virtiofsd of share0 ended"),
        "the verdict names the share: {err}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result_file).expect("result file")).unwrap();
    assert_eq!(v["verdict"], "vm-error", "{v}");
    assert_eq!(v["command_status"], 0, "{v}");
    assert_eq!(
        virtiofsd_serving(&dir),
        Vec::<String>::new(),
        "no daemon left"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&result_file);
}

/// Starts `minivmm run --share DIR:/mnt` with `extra` flags running `script`
/// and waits until the command printed `first` (it read the share).
fn running_on_a_share(dir: &Path, extra: &[&str], script: &str) -> std::process::Child {
    let spec = format!("{}:/mnt", dir.display());
    let mut args = vec!["--share", spec.as_str()];
    args.extend_from_slice(extra);
    let mut child = run_cmd(&args, &["sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 6];
    if let Err(e) = child.stdout.as_mut().unwrap().read_exact(&mut first) {
        // It ended before the command printed: say how, with minivmm's
        // diagnostics (a nested guest's triple fault or hang shows there).
        let out = child.wait_with_output().unwrap();
        panic!(
            "the run ended before the command read the share ({e}): {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(&first, b"first\n", "the command read the share");
    assert!(!virtiofsd_serving(dir).is_empty(), "a daemon serves it");
    child
}

#[test]
fn run_share_daemons_are_gone_after_a_signal_and_a_timeout() {
    if !real_guest_available("run_share_daemons_are_gone_after_a_signal_and_a_timeout") {
        return;
    }
    let dir = temp_dir_with("share-ends", "a", b"first\n");
    let script = "cat /mnt/a; exec sleep 600";

    // SIGTERM to minivmm while the command runs.
    let child = running_on_a_share(&dir, &[], script);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(143),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        virtiofsd_serving(&dir),
        Vec::<String>::new(),
        "none after SIGTERM"
    );

    // --timeout while the command runs: long enough for a nested boot beside
    // the other tests' guests (40 s was not, once, in CI on a slow host).
    let child = running_on_a_share(&dir, &["--timeout", "90"], script);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "stderr: {err}");
    assert!(err.contains("expired while the command ran"), "{err}");
    assert_eq!(
        virtiofsd_serving(&dir),
        Vec::<String>::new(),
        "none after --timeout"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Rust virtiofsd `resources/run-tests.sh` builds (Debian 12 has only
/// the C one), from `MINIVMM_RUST_VIRTIOFSD`.
fn rust_virtiofsd(test: &str) -> Option<String> {
    match std::env::var("MINIVMM_RUST_VIRTIOFSD") {
        Ok(p) if Path::new(&p).is_file() => Some(p),
        found => {
            let why = format!(
                "no Rust virtiofsd (MINIVMM_RUST_VIRTIOFSD={found:?}; resources/run-tests.sh \
                 builds one)"
            );
            minivmm_tests::skip_or_fail(test, &why);
            None
        }
    }
}

#[test]
fn run_share_with_the_rust_virtiofsd() {
    let test = "run_share_with_the_rust_virtiofsd";
    if !real_guest_available(test) {
        return;
    }
    let Some(bin) = rust_virtiofsd(test) else {
        return;
    };
    let rw = temp_dir_with("share-rust", "x", b"hello\n");
    let ro = temp_dir_with("share-rust-ro", "r", b"ro-data\n");
    let rw_spec = format!("{}:/mnt", rw.display());
    let ro_spec = format!("{}:/ro:ro", ro.display());
    let script = "cat /mnt/x; read line; echo from-guest > /mnt/y; cat /ro/r; \
        if touch /ro/new 2>/dev/null; then echo ro-writable; else echo ro-refused; fi";
    let (run, first) = Running::spawn(run_cmd(
        &[
            "--share",
            &rw_spec,
            "--share",
            &ro_spec,
            "--virtiofsd",
            &bin,
        ],
        &["sh", "-c", script],
    ));
    assert_eq!(first, "hello\n");
    // The Rust daemon's own flags: it is the one serving.
    for dir in [&rw, &ro] {
        let daemons = virtiofsd_serving(dir);
        assert!(
            daemons
                .iter()
                .any(|d| d.contains(&bin) && d.contains("--shared-dir")),
            "the Rust virtiofsd serves {}: {daemons:?}",
            dir.display()
        );
    }
    let (st, rest, err) = run.finish(b"go\n");
    assert_eq!(st.code(), Some(0), "stderr: {err}");
    assert_eq!(rest, "ro-data\nro-refused\n", "stderr: {err}");
    assert_eq!(std::fs::read(rw.join("y")).unwrap(), b"from-guest\n");
    assert!(
        !ro.join("new").exists(),
        ":ro refused the write on the host"
    );
    no_daemon_left_then_remove(&[&rw, &ro]);
}
