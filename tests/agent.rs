//! The guest-agent channel without an agent in the guest (tiny hand-made guests on
//! any KVM): the socket, error answers, QMP routing and query-chardev. The real
//! qemu-ga in a real Debian guest is exercised in real_guest.rs.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use minivmm_tests::{
    chardev, kvm_available, socket_path, spin_guest, temp_file, tiny_elf, Qmp, Vm, CODE_SPIN,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

fn agent_line(r: &mut BufReader<UnixStream>) -> Value {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    assert!(
        l.ends_with('\n') && !l.ends_with("\r\n"),
        "qga lines end in a single LF: {l:?}"
    );
    serde_json::from_str(&l).unwrap()
}

/// A spinning tiny guest with a QMP socket and an agent socket (and no agent in
/// the guest), once it printed "boot". Returns the VM and both socket paths.
fn vm_with_agent_channel(test: &str) -> (Vm, PathBuf, PathBuf) {
    let k = spin_guest(test);
    let qmp = socket_path(test);
    let qga = qmp.with_file_name("vm.qga");
    let q_spec = format!("unix:{}", qmp.display());
    let a_spec = format!("unix:{}", qga.display());
    let mut vm = Vm::spawn(&["--kernel", &k, "--qmp", &q_spec, "--agent", &a_spec]);
    vm.wait_line(LIMIT, |l| l == "boot");
    (vm, qmp, qga)
}

#[test]
fn agent_socket_without_an_agent_answers_not_connected() {
    if !kvm_available("agent_socket_without_an_agent_answers_not_connected") {
        return;
    }
    let (mut vm, qmp, qga) = vm_with_agent_channel("agent-none");
    let mut q = Qmp::negotiated(&qmp);
    let mode = std::fs::metadata(&qga).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "owner-only agent socket");

    // Two agent clients at once, each answered immediately.
    let mut clients: Vec<(UnixStream, BufReader<UnixStream>)> = (0..2)
        .map(|_| {
            let s = UnixStream::connect(&qga).unwrap();
            s.set_read_timeout(Some(LIMIT)).unwrap();
            let r = BufReader::new(s.try_clone().unwrap());
            (s, r)
        })
        .collect();
    for (i, (w, r)) in clients.iter_mut().enumerate() {
        w.write_all(format!("{{\"execute\":\"guest-ping\",\"id\":{i}}}\n").as_bytes())
            .unwrap();
        assert_eq!(
            agent_line(r),
            json!({"id": i, "error": {"class": "GenericError", "desc": "Guest agent is not connected"}})
        );
    }
    // Through QMP.
    assert_eq!(
        q.cmd(r#"{"execute":"guest-info","id":"g"}"#),
        json!({"id": "g", "error": {"class": "GenericError", "desc": "Guest agent is not connected"}})
    );
    // Commands after a deferred one keep their order.
    q.send("{\"execute\":\"guest-ping\",\"id\":1}\n{\"execute\":\"query-kvm\",\"id\":2}\n");
    assert_eq!(q.reply()["id"], 1);
    assert_eq!(q.reply()["id"], 2);
    let qga0 = chardev(&mut q, "qga0");
    assert_eq!(qga0["frontend-open"], false);
    assert_eq!(
        qga0["filename"],
        format!("unix:{},server=on", qga.display())
    );
    q.cmd(r#"{"execute":"quit"}"#);
    assert_eq!(vm.wait_exit(LIMIT).0.code(), Some(0));
    assert!(!qga.exists(), "agent socket removed on exit");
}

#[test]
fn guest_commands_without_agent_option_are_explained() {
    if !kvm_available("guest_commands_without_agent_option_are_explained") {
        return;
    }
    let k = spin_guest("agent-off");
    let qmp = socket_path("agent-off");
    let q_spec = format!("unix:{}", qmp.display());
    let mut vm = Vm::spawn(&["--kernel", &k, "--qmp", &q_spec]);
    let mut q = Qmp::negotiated(&qmp);
    let e = q.cmd(r#"{"execute":"guest-ping"}"#);
    assert!(
        e["error"]["desc"].as_str().unwrap().contains("--agent"),
        "{e}"
    );
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(LIMIT).0.code(), Some(143));
}

#[test]
fn bad_agent_options_are_rejected() {
    let k = temp_file("agent-bad", "g.elf", &tiny_elf(&CODE_SPIN));
    let o = minivmm_tests::minivmm(&["--kernel", k.to_str().unwrap(), "--agent", "/tmp/x.qga"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected unix:PATH"));
}

/// Regression: more than 64 pipelined commands that the agent side answers at
/// once used to stall after 64 replies (a capped dispatch loop) until some
/// unrelated event woke the VMM. Every command must be answered, in order.
#[test]
fn many_pipelined_agent_commands_all_complete() {
    if !kvm_available("many_pipelined_agent_commands_all_complete") {
        return;
    }
    let (mut vm, qmp, _qga) = vm_with_agent_channel("agent-pipeline");
    let mut q = Qmp::connect(&qmp);
    q.set_read_timeout(LIMIT);
    const N: usize = 70;
    let mut burst = String::from("{\"execute\":\"qmp_capabilities\"}\n");
    for i in 0..N {
        burst.push_str(&format!("{{\"execute\":\"guest-ping\",\"id\":{i}}}\n"));
    }
    // One write, as a script piping a file into socat would do.
    q.send(&burst);
    assert_eq!(q.reply(), json!({"return": {}}));
    for i in 0..N {
        let r = q.reply();
        assert_eq!(r["id"], i, "replies in order: {r}");
        assert_eq!(r["error"]["desc"], "Guest agent is not connected", "{r}");
    }
    q.cmd(r#"{"execute":"quit"}"#);
    assert_eq!(vm.wait_exit(LIMIT).0.code(), Some(0));
}
