//! QMP with tiny hand-made guests, on any /dev/kvm (PVM included): greeting,
//! errors, queries, endpoints, misbehaving clients, socat and qemu.qmp. The
//! lifecycle (every state transition and its events) is in qmp_lifecycle.rs;
//! real-guest QMP tests (ACPI power button, reboot of a Linux guest) in
//! real_guest.rs.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use minivmm_tests::{
    kvm_available, qmp_vm, query_status, socket_path, spin_guest, vcpu_tids, Qmp, Vm,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn greeting_errors_and_queries_over_a_real_socket() {
    if !kvm_available("greeting_errors_and_queries_over_a_real_socket") {
        return;
    }
    let k = spin_guest("queries");
    let mut s = qmp_vm(
        "queries",
        &k,
        &[
            "--name",
            "ci-7",
            "--uuid",
            "12345678-1234-1234-1234-123456789abc",
            "--cpus",
            "2",
        ],
    );
    let mut q = Qmp::connect(&s.sock);
    let g = q.greeting["QMP"].clone();
    assert_eq!(g["capabilities"], json!(["oob"]));
    assert!(g["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("minivmm"));
    assert!(g["version"]["qemu"]["major"].is_u64());
    assert_eq!(
        q.cmd(r#"{"execute":"query-status","id":"early"}"#),
        json!({"id": "early", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
    );
    assert_eq!(
        q.cmd(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#),
        json!({"return": {}})
    );
    assert_eq!(
        q.cmd(r#"{"execute":"qmp_capabilities"}"#)["error"]["desc"],
        "Capabilities negotiation is already complete, command ignored"
    );
    assert_eq!(
        q.cmd(r#"{"execute":"query-status","id":{"a":[1,2]}}"#),
        json!({"return": {"status": "running", "singlestep": false, "running": true}, "id": {"a": [1, 2]}})
    );
    assert_eq!(
        q.cmd(r#"{"execute":"query-kvm"}"#),
        json!({"return": {"enabled": true, "present": true}})
    );
    assert_eq!(
        q.cmd(r#"{"execute":"query-name"}"#),
        json!({"return": {"name": "ci-7"}})
    );
    assert_eq!(
        q.cmd(r#"{"execute":"query-uuid"}"#),
        json!({"return": {"UUID": "12345678-1234-1234-1234-123456789abc"}})
    );
    assert_eq!(
        q.cmd(r#"{"execute":"query-version"}"#)["return"],
        g["version"]
    );
    let cmds: Vec<String> = q.cmd(r#"{"execute":"query-commands"}"#)["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for c in [
        "qmp_capabilities",
        "query-status",
        "stop",
        "cont",
        "system_reset",
        "system_powerdown",
        "quit",
        "query-cpus-fast",
        "query-chardev",
        "cpu",
    ] {
        assert!(cmds.iter().any(|x| x == c), "query-commands lacks {c}");
    }
    let chardevs = q.cmd(r#"{"execute":"query-chardev"}"#)["return"].clone();
    assert_eq!(
        chardevs[0],
        json!({"frontend-open": true, "filename": "stdio", "label": "serial0"})
    );
    assert_eq!(chardevs[1]["label"], "compat_monitor0");
    assert_eq!(
        chardevs[1]["filename"],
        format!("unix:{},server=on", s.sock.display())
    );
    let tids = vcpu_tids(&mut q);
    assert_eq!(tids.len(), 2);
    for tid in &tids {
        let comm =
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", s.vm.pid())).unwrap();
        assert!(
            comm.starts_with("vcpu"),
            "thread {tid} is a vcpu thread: {comm}"
        );
    }
    let cpus = q.cmd(r#"{"execute":"query-cpus"}"#)["return"].clone();
    assert_eq!(cpus[0]["CPU"], 0);
    assert_eq!(cpus[1]["thread_id"], tids[1]);
    for (cmd, ret) in [
        ("query-block", json!([])),
        ("query-blockstats", json!([])),
        ("query-mice", json!([])),
        ("query-vnc", json!({"enabled": false})),
        ("query-spice", json!({"enabled": false})),
        ("query-migrate", json!({})),
    ] {
        assert_eq!(
            q.cmd(&format!(r#"{{"execute":"{cmd}"}}"#)),
            json!({"return": ret}),
            "{cmd}"
        );
    }
    assert_eq!(
        q.cmd(r#"{"execute":"cpu","arguments":{"index":0}}"#),
        json!({"return": {}})
    );
    assert_eq!(
        q.cmd(r#"{"execute":"cpu"}"#)["error"]["desc"],
        "Parameter 'index' is missing"
    );
    assert_eq!(
        q.cmd(r#"{"execute":"stop","arguments":{"bogus":1}}"#)["error"]["desc"],
        "Parameter 'bogus' is unexpected"
    );
    assert_eq!(
        q.cmd(r#"{"execute":"nonexistent-cmd"}"#),
        json!({"error": {"class": "CommandNotFound", "desc": "The command nonexistent-cmd has not been found"}})
    );
    assert_eq!(
        q.cmd(r#"{bad json}"#)["error"]["desc"],
        "JSON parse error, invalid keyword 'bad'"
    );
    assert_eq!(
        q.cmd(r#"[1,2,3]"#)["error"]["desc"],
        "QMP input must be a JSON object"
    );
    // Split across writes, and two in one write.
    q.send("{\"execute\": \"query-kvm\"");
    q.send("\n}\n{\"execute\":\"query-kvm\",\"id\":2}{\"execute\":\"query-kvm\",\"id\":3}\n");
    assert_eq!(q.reply()["return"]["enabled"], true);
    assert_eq!(q.reply()["id"], 2);
    assert_eq!(q.reply()["id"], 3);
    assert!(q.events.is_empty(), "no events: {:?}", q.events);
    s.vm.signal(libc::SIGTERM);
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    let (st, _) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(143));
}

#[test]
fn endpoints_tcp_permissions_stale_and_live_sockets() {
    use std::os::unix::fs::PermissionsExt;
    if !kvm_available("endpoints_tcp_permissions_stale_and_live_sockets") {
        return;
    }
    let k = spin_guest("endpoints");
    let sock = socket_path("endpoints");
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let unix = format!("unix:{}", sock.display());
    let tcp = format!("tcp:127.0.0.1:{port}");
    let mut vm = Vm::spawn(&["--kernel", &k, "--qmp", &unix, "--qmp", &tcp]);
    let mut q = Qmp::negotiated(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "owner-only socket");
    // TCP client.
    let mut t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    t.set_read_timeout(Some(LIMIT)).unwrap();
    let mut r = std::io::BufReader::new(t.try_clone().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut r, &mut line).unwrap();
    assert!(line.starts_with("{\"QMP\""), "{line}");
    t.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-chardev\"}\n")
        .unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut r, &mut line).unwrap();
    assert_eq!(line, "{\"return\": {}}\r\n");
    line.clear();
    std::io::BufRead::read_line(&mut r, &mut line).unwrap();
    assert!(
        line.contains(&format!("tcp:127.0.0.1:{port},server=on")),
        "{line}"
    );
    // A second VMM on the same live socket refuses to start.
    let o = minivmm_tests::minivmm(&["--kernel", &k, "--qmp", &unix])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use by another process"));
    assert_eq!(
        query_status(&mut q),
        "running",
        "the first VM is unaffected"
    );
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(LIMIT).0.code(), Some(143));
    assert!(!sock.exists(), "socket removed on exit");
}

#[test]
fn unread_stdout_never_wedges_the_vm() {
    use std::os::fd::AsRawFd;
    if !kvm_available("unread_stdout_never_wedges_the_vm") {
        return;
    }
    // A guest that prints "x" forever, to a stdout pipe nobody reads.
    let k = minivmm_tests::tiny_guest(
        "unread",
        &[
            &minivmm_tests::code_print(b"boot\n"),
            &[0xb0, b'x', 0xee, 0xeb, 0xfb], // l: mov al,'x'; out dx,al; jmp l
        ],
    );
    let sock = socket_path("unread");
    let spec = format!("unix:{}", sock.display());
    // A one-page pipe, full before minivmm starts: the host can write
    // nothing of the guest's output. (Waiting for the guest to fill it was
    // racy: a one-page pipe refuses a write that does not fit in what is left
    // of its page, so it may stop short of full for good.)
    let (out, mut w) = std::io::pipe().unwrap();
    // SAFETY: F_SETPIPE_SZ on our own pipe; no memory is passed.
    assert!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } >= 4096);
    w.write_all(&[b'.'; 4096]).unwrap();
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes the number of unread bytes into `n`.
    let rc = unsafe { libc::ioctl(out.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    assert_eq!(n, 4096, "the pipe is full");
    let mut child = minivmm_tests::KillOnDrop(
        minivmm_tests::minivmm(&["--kernel", &k, "--qmp", &spec])
            .stdin(Stdio::null())
            .stdout(Stdio::from(w))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut q = Qmp::negotiated(&sock);
    // The guest keeps running (its vcpu is not stuck in a write), QMP answers.
    // (A vcpu blocked writing to the pipe would sleep in every sample; one
    // running guest code sleeps at most briefly, on the output buffer's lock.)
    let tid = vcpu_tids(&mut q)[0];
    let mut asleep = 0;
    for _ in 0..50 {
        assert_eq!(query_status(&mut q), "running");
        if minivmm_tests::thread_state(child.id(), tid) == 'S' {
            asleep += 1;
        }
    }
    assert!(
        asleep < 25,
        "the vcpu thread slept in {asleep} of 50 samples"
    );
    // SIGTERM ends it within 2 s, and the lost output is reported.
    let start = std::time::Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("SIGTERM did not stop the VMM within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    assert_eq!(st.code(), Some(143));
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("bytes of guest console output could not be written"),
        "stderr: {err}"
    );
    drop(out);
}

#[test]
fn only_stale_sockets_are_replaced() {
    if !kvm_available("only_stale_sockets_are_replaced") {
        return;
    }
    let k = spin_guest("notasocket");
    let dir = socket_path("notasocket").parent().unwrap().to_path_buf();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "my notes\n").unwrap();
    let subdir = dir.join("subdir");
    std::fs::create_dir_all(&subdir).unwrap();
    for (flag, path, what) in [
        ("--qmp", &notes, "a regular file"),
        ("--agent", &notes, "a regular file"),
        ("--qmp", &subdir, "a directory"),
        ("--agent", &subdir, "a directory"),
    ] {
        let ep = format!("unix:{}", path.display());
        let o = minivmm_tests::minivmm(&["--kernel", &k, flag, &ep])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{flag} {ep}: {err}");
        assert!(
            err.contains(&format!("it is {what}, which is left untouched")),
            "{flag} {ep}: {err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes\n");
    assert!(subdir.is_dir());
}

#[test]
fn misbehaving_clients_do_not_block_the_vm() {
    if !kvm_available("misbehaving_clients_do_not_block_the_vm") {
        return;
    }
    let k = spin_guest("misbehave");
    let mut s = qmp_vm("misbehave", &k, &[]);
    let mut good = Qmp::negotiated(&s.sock);
    // One client floods 10 MiB without a newline, one never reads, one hangs up
    // mid-command.
    let mut flood = std::os::unix::net::UnixStream::connect(&s.sock).unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut lazy = Qmp::negotiated(&s.sock);
    let mut hangup = std::os::unix::net::UnixStream::connect(&s.sock).unwrap();
    hangup
        .write_all(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-sta")
        .unwrap();
    drop(hangup);
    flood.write_all(b"{\"execute\":\"").unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut flood_closed = false;
    for _ in 0..10 {
        if flood.write_all(&chunk).is_err() {
            flood_closed = true;
            break;
        }
    }
    lazy.send(&"{\"execute\":\"query-commands\"}".repeat(2000));
    for _ in 0..20 {
        assert_eq!(query_status(&mut good), "running");
    }
    assert!(
        flood_closed || {
            // The server closed it; a read sees EOF after the greeting.
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut flood, &mut buf);
            String::from_utf8_lossy(&buf).starts_with("{\"QMP\"")
        }
    );
    // Exit is bounded (~1 s of flushing) although `lazy` reads nothing of
    // megabytes of replies.
    let start = std::time::Instant::now();
    s.vm.signal(libc::SIGTERM);
    let (st, err) = s.vm.wait_exit(LIMIT);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    assert_eq!(st.code(), Some(143));
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn socat_session() {
    if !kvm_available("socat_session") {
        return;
    }
    if Command::new("socat").arg("-V").output().is_err() {
        minivmm_tests::loud(
            "*** SKIPPED socat_session: socat is not installed (apt-get install socat)",
        );
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI installs socat"
        );
        return;
    }
    let k = spin_guest("socat");
    let s = qmp_vm("socat", &k, &["--name", "ci-7"]);
    Qmp::connect(&s.sock); // wait until it listens
    let mut socat = Command::new("socat")
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", s.sock.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = "{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-name\"}\n{\"execute\":\"stop\"}\n{\"execute\":\"quit\"}\n";
    socat
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = socat.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines[0].get("QMP").is_some());
    assert_eq!(lines[1], json!({"return": {}}));
    assert_eq!(lines[2], json!({"return": {"name": "ci-7"}}));
    assert_eq!(lines[3]["event"], "STOP");
    assert_eq!(lines[4], json!({"return": {}}));
    assert_eq!(lines[5]["event"], "SHUTDOWN");
    assert_eq!(lines[6], json!({"return": {}}));
    assert_eq!(lines.len(), 7);
}

#[test]
fn qemu_qmp_library_drives_the_vm() {
    if !kvm_available("qemu_qmp_library_drives_the_vm") {
        return;
    }
    let script = minivmm_tests::repo_root().join("tests/qmp_client.py");
    let probe = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        minivmm_tests::loud("*** SKIPPED qemu_qmp_library_drives_the_vm: python3 module qemu.qmp missing (pip install qemu.qmp)");
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI installs qemu.qmp"
        );
        return;
    }
    let k = spin_guest("pyqmp");
    let mut s = qmp_vm("pyqmp", &k, &["--name", "py"]);
    s.vm.wait_line(LIMIT, |l| l == "boot");
    let o = Command::new("python3")
        .arg(&script)
        .arg(&s.sock)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qmp_client.py failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let (st, _) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0), "quit from the library");
}

/// CPU time (user + system, in clock ticks) of one thread of `pid`.
fn thread_cpu_ticks(pid: u32, tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is 3rd,
    // utime 14th, stime 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Sets the soft limit on open descriptors of a running process.
fn set_nofile(pid: u32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit(2) reading our child's limit into `old`.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit(2) setting our child's limit from `new`.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn out_of_descriptors_refuses_clients_without_spinning_and_reboot_works_after() {
    use std::io::Read;
    if !kvm_available("out_of_descriptors_refuses_clients_without_spinning_and_reboot_works_after")
    {
        return;
    }
    let k = spin_guest("nofile");
    let mut s = qmp_vm("nofile", &k, &[]);
    s.vm.wait_line(LIMIT, |l| l == "boot");
    let mut q = Qmp::negotiated(&s.sock);
    let pid = s.vm.pid();
    // Leave room for two more clients only.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    set_nofile(pid, open + 2);
    let mut clients: Vec<std::os::unix::net::UnixStream> = (0..8)
        .map(|_| std::os::unix::net::UnixStream::connect(&s.sock).unwrap())
        .collect();
    // Each client gets the greeting (accepted) or EOF (refused), none waits.
    let (mut greeted, mut refused) = (0, 0);
    for c in &mut clients {
        c.set_read_timeout(Some(LIMIT)).unwrap();
        let mut buf = [0u8; 512];
        match c.read(&mut buf) {
            Ok(0) => refused += 1,
            Ok(_) => {
                assert!(buf.starts_with(b"{\"QMP\""));
                greeted += 1;
            }
            Err(e) => panic!("a client neither greeted nor refused: {e}"),
        }
    }
    // Room for two (give or take a descriptor the VMM opens or closes on its
    // own meanwhile); the rest are refused.
    assert!(
        greeted <= 4 && refused >= 4,
        "{greeted} greeted, {refused} refused"
    );
    // More clients wait in the listen queue now; the VMM thread must not spin
    // on the readable listener: a spinning loop burns a whole second per
    // second, an idle one next to nothing. Measured over one idle second (a
    // measurement window, not a wait for something).
    let more: Vec<_> = (0..4)
        .map(|_| std::os::unix::net::UnixStream::connect(&s.sock).unwrap())
        .collect();
    assert_eq!(query_status(&mut q), "running");
    let before = thread_cpu_ticks(pid, pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = thread_cpu_ticks(pid, pid) - before;
    assert_eq!(query_status(&mut q), "running");
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        used < hz / 2,
        "the VMM thread used {used} of {hz} ticks in a second while out of descriptors"
    );
    // Everyone leaves; a reboot (which opens new KVM descriptors) works, and
    // new clients are served again.
    drop(more);
    drop(clients);
    assert_eq!(
        q.cmd(r#"{"execute":"system_reset"}"#),
        json!({"return": {}})
    );
    q.wait_event("RESET");
    s.vm.wait_line(LIMIT, |l| l == "boot");
    assert_eq!(query_status(&mut q), "running");
    let mut late = Qmp::negotiated(&s.sock);
    assert_eq!(query_status(&mut late), "running");
    s.vm.signal(libc::SIGTERM);
    let (st, err) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(143));
    assert_eq!(
        err.matches("refusing new clients").count(),
        1,
        "logged once per episode: {err}"
    );
}
