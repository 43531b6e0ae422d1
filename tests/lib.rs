//! Helpers for minivmm's integration tests: locating the binary and the guest
//! images, deciding whether real-guest tests can run, spawning a VM and reading its
//! serial console line by line, and building tiny hand-made guests.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};

mod qmp_support;
pub use qmp_support::{chardev, qmp_vm, query_status, vcpu_tids, Qmp, QmpVm};
use std::time::{Duration, Instant};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `minivmm` binary built next to this test (same profile), or `MINIVMM_BIN`.
pub fn minivmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MINIVMM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/minivmm
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("minivmm"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p minivmm`",
        bin.display()
    );
    bin
}

/// A `Command` for minivmm with `args`.
pub fn minivmm(args: &[&str]) -> Command {
    let mut c = Command::new(minivmm_bin());
    c.args(args);
    c
}

/// Where `resources/build-images.sh` put the guest images.
pub fn images_dir() -> PathBuf {
    std::env::var_os("MINIVMM_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/images"))
}

/// True when this host has hardware virtualization (vmx/svm) and /dev/kvm.
pub fn hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && Path::new("/dev/kvm").exists()
}

/// True when some /dev/kvm (hardware or not) can be opened.
pub fn any_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Skips `test` loudly (returns false), or fails it when everything must run
/// (`MINIVMM_REQUIRE_REAL_GUEST=1`).
pub fn skip_or_fail(test: &str, why: &str) -> bool {
    if std::env::var("MINIVMM_REQUIRE_REAL_GUEST").as_deref() == Ok("1") {
        panic!("{test}: cannot run: {why} (MINIVMM_REQUIRE_REAL_GUEST=1)");
    }
    loud(&format!(
        "*** SKIPPED {test}: {why}.\n*** Real-guest tests run through resources/run-tests.sh, nested where needed (see README)."
    ));
    false
}

/// Writes straight to stderr, past libtest's output capture, so skips are seen.
pub fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr(), "\n{msg}\n");
}

/// True in CI (`CI=true`) and wherever real-guest tests are required: optional
/// tools (socat, the qemu.qmp module) must then be present, not skipped.
pub fn must_run_everything() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("MINIVMM_REQUIRE_REAL_GUEST").as_deref() == Ok("1")
}

/// Whether a real Linux guest can be booted here; if not, says so loudly (or fails
/// when `MINIVMM_REQUIRE_REAL_GUEST=1`, as in CI).
pub fn real_guest_available(test: &str) -> bool {
    if !hardware_kvm() {
        return skip_or_fail(
            test,
            "needs hardware KVM (vmx/svm in /proc/cpuinfo and /dev/kvm)",
        );
    }
    for f in ["vmlinuz", "vmlinux", "initrd.img"] {
        if !images_dir().join(f).exists() {
            return skip_or_fail(
                test,
                &format!(
                    "guest image {} missing: run resources/build-images.sh",
                    images_dir().join(f).display()
                ),
            );
        }
    }
    true
}

/// Whether any KVM can be used (PVM is enough for hand-made guests).
pub fn kvm_available(test: &str) -> bool {
    if any_kvm() {
        return true;
    }
    if std::env::var("MINIVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: /dev/kvm cannot be opened (MINIVMM_REQUIRE_KVM=1)");
    }
    loud(&format!("*** SKIPPED {test}: /dev/kvm cannot be opened."));
    false
}

/// A child process killed (and reaped) when dropped, so that a failing test
/// leaves no VM behind.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A running VM whose serial console (stdout) is read line by line.
pub struct Vm {
    child: Child,
    lines: Receiver<String>,
    /// Every console line seen so far.
    pub seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Vm {
    /// Spawns minivmm with `args`, stdin a pipe, stdout and stderr captured.
    pub fn spawn(args: &[&str]) -> Vm {
        let mut child = minivmm(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn minivmm");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Vm {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// The VM's stdin.
    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.child.stdin.as_mut().expect("stdin piped")
    }

    /// Types `s` into the serial console.
    pub fn type_text(&mut self, s: &str) {
        let stdin = self.stdin();
        stdin.write_all(s.as_bytes()).expect("write stdin");
        stdin.flush().expect("flush stdin");
    }

    /// Waits (at most `limit`, a safety bound, not a synchronisation) for a console
    /// line satisfying `pred`; returns it, or panics with the console so far.
    pub fn wait_line(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    panic!(
                        "no matching console line within {limit:?}; console:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "VM ended ({status:?}) before a matching line; console:\n{}\nstderr:\n{}",
                        self.seen.join("\n"),
                        self.take_stderr()
                    )
                }
            }
        }
    }

    /// Waits for the banner line of the test initrd and parses it.
    pub fn wait_banner(&mut self, limit: Duration) -> Banner {
        let l = self.wait_line(limit, |l| l.contains("MINIVMM-BANNER "));
        Banner::parse(&l).unwrap_or_else(|| panic!("bad banner: {l}"))
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the VMM process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (at most `limit`) for the VMM to exit; drains the rest of the console
    /// into `seen`. Returns the exit status and stderr.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(l);
                }
                return (st, self.take_stderr());
            }
            // Console lines arriving meanwhile are kept; the receive doubles as the
            // poll interval for the exit status.
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(l);
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "VM did not exit within {limit:?}; console:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.take_stderr()
                );
            }
        }
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
        // A failed test shows what minivmm said (it may say why the guest
        // died: resources/run-tests.sh looks for a guest triple fault).
        if std::thread::panicking() {
            let err = self.take_stderr();
            if !err.is_empty() {
                eprintln!("minivmm's stderr:\n{err}");
            }
        }
    }
}

/// The facts the test initrd prints at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Banner {
    /// `uname -r`.
    pub release: String,
    /// `nproc`.
    pub nproc: u32,
    /// MemTotal in kB.
    pub memtotal_kb: u64,
    /// `/proc/cmdline`.
    pub cmdline: String,
}

impl Banner {
    /// Parses `MINIVMM-BANNER release=.. nproc=.. memtotal_kb=.. cmdline=..`.
    pub fn parse(line: &str) -> Option<Banner> {
        let rest = &line[line.find("MINIVMM-BANNER ")? + "MINIVMM-BANNER ".len()..];
        let (head, cmdline) = rest.split_once(" cmdline=")?;
        let mut release = None;
        let mut nproc = None;
        let mut mem = None;
        for kv in head.split_whitespace() {
            match kv.split_once('=')? {
                ("release", v) => release = Some(v.to_string()),
                ("nproc", v) => nproc = v.parse().ok(),
                ("memtotal_kb", v) => mem = v.parse().ok(),
                _ => {}
            }
        }
        Some(Banner {
            release: release?,
            nproc: nproc?,
            memtotal_kb: mem?,
            cmdline: cmdline.trim().to_string(),
        })
    }
}

/// Builds a minimal static ELF64 "kernel" whose code runs at its 64-bit entry:
/// enough to exercise the VMM's plumbing on any KVM, including PVM.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    let (ehsz, phsz) = (64u16, 56u16);
    let off = u64::from(ehsz + phsz);
    let total = off + code.len() as u64;
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    v.extend_from_slice(&[0u8; 8]);
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&(BASE + off).to_le_bytes()); // entry
    v.extend_from_slice(&u64::from(ehsz).to_le_bytes()); // phoff
    v.extend_from_slice(&0u64.to_le_bytes()); // shoff
    v.extend_from_slice(&0u32.to_le_bytes()); // flags
    for x in [ehsz, phsz, 1, 64, 0, 0] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for x in [0, BASE, BASE, total, total, 0x1000] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(code);
    v
}

/// x86 code: write `s` to COM1.
pub fn code_print(s: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in s {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// x86 code: write byte `v` to port `port`, then halt forever.
pub fn code_out_then_halt(port: u16, v: u8) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1], 0xb0, v, 0xee, 0xf4, 0xeb, 0xfd]
}

/// x86 code: write byte `v` to port `port` and continue.
pub fn code_out(port: u16, v: u8) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1], 0xb0, v, 0xee]
}

/// x86 code: spin forever.
pub const CODE_SPIN: [u8; 2] = [0xeb, 0xfe];

/// A fresh socket path for a test.
pub fn socket_path(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minivmm-test-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("qmp.sock")
}

/// The state a thread is in (R, S, ...), from /proc.
pub fn thread_state(pid: u32, tid: i64) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
    // pid (comm) STATE ...
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .unwrap_or('?')
}

/// Whether thread `tid` is parked (not runnable): it must be seen not running on
/// 50 consecutive reads within 5 s. A vcpu spinning in the guest is always
/// runnable ('R'), so it never passes; a parked one settles at once.
pub fn thread_parked(pid: u32, tid: i64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut quiet = 0;
    while Instant::now() < deadline {
        if thread_state(pid, tid) == 'R' {
            quiet = 0;
        } else {
            quiet += 1;
            if quiet == 50 {
                return true;
            }
        }
        std::thread::yield_now();
    }
    false
}

/// A tiny guest made of `parts` (x86 code), as an ELF kernel file; returns its path.
pub fn tiny_guest(test: &str, parts: &[&[u8]]) -> String {
    temp_file(test, "guest.elf", &tiny_elf(&parts.concat()))
        .display()
        .to_string()
}

/// A tiny guest that prints "boot" and spins.
pub fn spin_guest(test: &str) -> String {
    tiny_guest(test, &[&code_print(b"boot\n"), &CODE_SPIN])
}

/// virtiofsd processes whose command line names `dir` (a share's daemon;
/// the C one forks into its sandbox, so two processes): "PID CMDLINE" each.
pub fn virtiofsd_serving(dir: &Path) -> Vec<String> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != "virtiofsd" {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let pid = e.file_name().to_string_lossy().into_owned();
            found.push(format!(
                "{pid} {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

/// Writes `bytes` to a fresh file in a per-test temporary directory.
pub fn temp_file(test: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minivmm-test-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write temp file");
    p
}

/// The per-test temporary directory of [`temp_file`], holding `name`.
pub fn temp_dir_with(test: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let f = temp_file(test, name, bytes);
    f.parent().expect("a temp dir").to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_parses() {
        let b = Banner::parse("x MINIVMM-BANNER release=6.1.0-56-cloud-amd64 nproc=2 memtotal_kb=481180 cmdline=console=ttyS0 quiet a=b").unwrap();
        assert_eq!(b.release, "6.1.0-56-cloud-amd64");
        assert_eq!(b.nproc, 2);
        assert_eq!(b.memtotal_kb, 481180);
        assert_eq!(b.cmdline, "console=ttyS0 quiet a=b");
        assert!(Banner::parse("MINIVMM-BANNER nproc=2").is_none());
    }

    #[test]
    fn tiny_elf_is_elf() {
        let e = tiny_elf(&CODE_SPIN);
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(e.len(), 64 + 56 + 2);
    }
}
