//! The real qemu-ga (Debian's, unmodified) in the cloud kernel's guest, reached
//! through the agent socket and through QMP.

use minivmm_tests::{chardev, images_dir, real_guest_available};

use std::time::Duration;

use super::{boot_initrd, qmp_socket, BOOT};

/// A qga-protocol client on the agent socket.
pub(crate) struct Agent {
    w: std::os::unix::net::UnixStream,
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Agent {
    pub(crate) fn connect(path: &std::path::Path) -> Agent {
        let s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(BOOT)).unwrap();
        Agent {
            r: std::io::BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.w.write_all(bytes).unwrap();
    }

    /// Reads one reply line (raw bytes, without the final newline).
    fn raw_line(&mut self) -> Vec<u8> {
        use std::io::BufRead;
        let mut l = Vec::new();
        self.r.read_until(b'\n', &mut l).unwrap();
        assert_eq!(l.last(), Some(&b'\n'), "reply ends in a newline: {l:?}");
        l.pop();
        l
    }

    fn line(&mut self) -> serde_json::Value {
        let l = self.raw_line();
        serde_json::from_slice(&l)
            .unwrap_or_else(|e| panic!("bad reply {:?}: {e}", String::from_utf8_lossy(&l)))
    }

    pub(crate) fn cmd(&mut self, s: &str) -> serde_json::Value {
        self.send(format!("{s}\n").as_bytes());
        self.line()
    }
}

fn b64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) fn unb64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for c in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, b) in c.iter().enumerate() {
            n |= u32::from(val(*b)) << (18 - 6 * i);
        }
        for i in 0..c.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[test]
fn real_qemu_ga_through_the_agent_socket_and_qmp() {
    use minivmm_tests::Qmp;
    use serde_json::json;
    if !real_guest_available("real_qemu_ga_through_the_agent_socket_and_qmp") {
        return;
    }
    let initrd = images_dir().join("agent-initrd.img");
    if !initrd.exists() {
        assert!(
            !minivmm_tests::must_run_everything(),
            "agent-initrd.img missing"
        );
        minivmm_tests::loud(
            "*** SKIPPED real_qemu_ga...: agent-initrd.img missing (resources/build-images.sh)",
        );
        return;
    }
    let (qmp, q_spec) = qmp_socket("rg-agent");
    let qga = qmp.with_file_name("vm.qga");
    let a_spec = format!("unix:{}", qga.display());
    let extra = [
        "--qmp",
        &q_spec,
        "--agent",
        &a_spec,
        // A margin for the 7 MiB read below (9.3 MiB of base64 through the
        // emulated virtio-console, nested, on a busy host): this test checks
        // that it arrives intact; its speed is the benchmark's business.
        "--agent-timeout",
        "120",
        // The whole test, many steps of one VM: longer than one boot.
        "--timeout",
        "900",
    ];
    let append = "console=ttyS0 quiet minivmm.action=wait";
    let mut vm = boot_initrd("vmlinuz", "agent-initrd.img", append, &extra);
    let mut q = Qmp::negotiated(&qmp);
    let banner = vm.wait_banner(BOOT);
    // qemu-ga opens the port.
    let ev = q.wait_event("VSERPORT_CHANGE");
    assert_eq!(ev["data"], json!({"id": "qga0", "open": true}));

    let mut a = Agent::connect(&qga);
    // The client's own sync, with the 0xFF sentinel both ways, as qemu-ga answers.
    a.send(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":42}}\n");
    let first = a.line();
    assert_eq!(
        first["error"]["class"], "GenericError",
        "parse-error reply to 0xFF: {first}"
    );
    assert_eq!(a.raw_line(), b"\xff{\"return\": 42}");
    assert_eq!(a.cmd(r#"{"execute":"guest-ping"}"#), json!({"return": {}}));
    let info = a.cmd(r#"{"execute":"guest-info"}"#);
    assert!(
        info["return"]["version"]
            .as_str()
            .unwrap()
            .starts_with("7.2."),
        "{info}"
    );

    // guest-exec with captured output.
    let pid = a.cmd(r#"{"execute":"guest-exec","arguments":{"path":"/bin/uname","arg":["-r"],"capture-output":true}}"#)
        ["return"]["pid"]
        .as_i64()
        .unwrap();
    let status = loop {
        let st = a.cmd(&format!(
            r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#
        ));
        if st["return"]["exited"] == true {
            break st;
        }
    };
    assert_eq!(status["return"]["exitcode"], 0);
    let out = unb64(status["return"]["out-data"].as_str().unwrap());
    assert_eq!(String::from_utf8_lossy(&out).trim(), banner.release);

    // Linux named the port as QEMU's guests see it.
    let pid = a.cmd(r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","cat /sys/class/virtio-ports/vport0p1/name; ls /dev/vport0p1"],"capture-output":true}}"#)
        ["return"]["pid"]
        .as_i64()
        .unwrap();
    let st = loop {
        let st = a.cmd(&format!(
            r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#
        ));
        if st["return"]["exited"] == true {
            break st;
        }
    };
    let out = String::from_utf8(unb64(st["return"]["out-data"].as_str().unwrap())).unwrap();
    assert_eq!(out, "org.qemu.guest_agent.0\n/dev/vport0p1\n");

    // The guest clock stands still while the VM is stopped (KVM_GET/SET_CLOCK):
    // the pause itself is what is measured here.
    let guest_ns = |a: &mut Agent| {
        a.cmd(r#"{"execute":"guest-get-time"}"#)["return"]
            .as_i64()
            .unwrap()
    };
    let t0 = guest_ns(&mut a);
    let host0 = std::time::Instant::now();
    q.cmd(r#"{"execute":"stop"}"#);
    std::thread::sleep(Duration::from_secs(4));
    q.cmd(r#"{"execute":"cont"}"#);
    let t1 = guest_ns(&mut a);
    let host_elapsed = host0.elapsed().as_nanos() as i64;
    let guest_elapsed = t1 - t0;
    assert!(
        guest_elapsed < host_elapsed - 3_000_000_000,
        "guest time advanced {guest_elapsed} ns over a {host_elapsed} ns window with 4 s paused"
    );
    q.wait_event("STOP");
    q.wait_event("RESUME");

    // A 1 MiB file written (in 256 KiB writes: client messages are capped at 1 MiB)
    // and read back in one reply.
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let h = a.cmd(r#"{"execute":"guest-file-open","arguments":{"path":"/tmp/big","mode":"w"}}"#)
        ["return"]
        .as_i64()
        .unwrap();
    for chunk in data.chunks(256 * 1024) {
        let r = a.cmd(&format!(
            r#"{{"execute":"guest-file-write","arguments":{{"handle":{h},"buf-b64":"{}"}}}}"#,
            b64(chunk)
        ));
        assert_eq!(r["return"]["count"], chunk.len(), "{r}");
    }
    a.cmd(&format!(
        r#"{{"execute":"guest-file-close","arguments":{{"handle":{h}}}}}"#
    ));
    let h = a.cmd(r#"{"execute":"guest-file-open","arguments":{"path":"/tmp/big","mode":"r"}}"#)
        ["return"]
        .as_i64()
        .unwrap();
    let r = a.cmd(&format!(
        r#"{{"execute":"guest-file-read","arguments":{{"handle":{h},"count":{}}}}}"#,
        1 << 20
    ));
    assert_eq!(r["return"]["count"], 1 << 20);
    assert!(
        unb64(r["return"]["buf-b64"].as_str().unwrap()) == data,
        "file read back intact"
    );
    a.cmd(&format!(
        r#"{{"execute":"guest-file-close","arguments":{{"handle":{h}}}}}"#
    ));

    // A reply beyond QMP's usual 8 MiB output allowance reaches a QMP client
    // intact (7 MiB read: 9.3 MiB of base64 in one reply).
    let n = 7usize << 20;
    let pid = a.cmd(&format!(
        r#"{{"execute":"guest-exec","arguments":{{"path":"/bin/sh","arg":["-c","yes 0123456789abcde | head -c {n} > /tmp/huge"]}}}}"#
    ))["return"]["pid"]
        .as_i64()
        .unwrap();
    let st = loop {
        let st = a.cmd(&format!(
            r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#
        ));
        if st["return"]["exited"] == true {
            break st;
        }
    };
    assert_eq!(st["return"]["exitcode"], 0, "{st}");
    let h = q.cmd(r#"{"execute":"guest-file-open","arguments":{"path":"/tmp/huge","mode":"r"}}"#)
        ["return"]
        .as_i64()
        .unwrap();
    let r = q.cmd(&format!(
        r#"{{"execute":"guest-file-read","arguments":{{"handle":{h},"count":{n}}}}}"#
    ));
    assert_eq!(
        r["return"]["count"], n,
        "QMP reply of a 7 MiB read: error {}",
        r["error"]
    );
    let expected: Vec<u8> = b"0123456789abcde\n"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect();
    assert!(
        unb64(r["return"]["buf-b64"].as_str().unwrap()) == expected,
        "7 MiB read back intact over QMP"
    );
    q.cmd(&format!(
        r#"{{"execute":"guest-file-close","arguments":{{"handle":{h}}}}}"#
    ));

    // Garbage, then recovery.
    let e = a.cmd(r#"{"execute": garbage}"#);
    assert_eq!(e["error"]["class"], "GenericError");
    assert_eq!(
        a.cmd(r#"{"execute":"guest-ping","id":"after"}"#),
        json!({"return": {}, "id": "after"})
    );

    // Two clients at once.
    let mut b = Agent::connect(&qga);
    a.send(b"{\"execute\":\"guest-ping\",\"id\":\"a\"}\n");
    b.send(b"{\"execute\":\"guest-info\",\"id\":\"b\"}\n");
    assert_eq!(a.line()["id"], "a");
    assert_eq!(b.line()["id"], "b");

    // The same commands through QMP.
    assert_eq!(
        q.cmd(r#"{"execute":"guest-ping","id":7}"#),
        json!({"return": {}, "id": 7})
    );
    assert!(q.cmd(r#"{"execute":"guest-info"}"#)["return"]["version"].is_string());
    assert_eq!(
        q.cmd(r#"{"execute":"guest-no-such-command"}"#)["error"]["class"],
        "CommandNotFound",
        "the agent's error class reaches QMP"
    );

    // qemu-ga killed inside the guest: the port closes, requests fail at once;
    // the guest's init respawns it and the channel recovers (after a sync).
    let kill = q.cmd(
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","sleep 0.2; kill $(pidof qemu-ga)"]}}"#,
    );
    assert!(kill["return"]["pid"].is_i64(), "{kill}");
    assert_eq!(
        q.wait_event("VSERPORT_CHANGE")["data"],
        json!({"id": "qga0", "open": false})
    );
    assert_eq!(
        a.cmd(r#"{"execute":"guest-ping"}"#)["error"]["desc"],
        "Guest agent is not connected"
    );
    let qga0 = chardev(&mut q, "qga0");
    assert_eq!(qga0["frontend-open"], false);
    assert_eq!(
        q.wait_event("VSERPORT_CHANGE")["data"],
        json!({"id": "qga0", "open": true})
    );
    assert_eq!(
        a.cmd(r#"{"execute":"guest-ping","id":"back"}"#),
        json!({"return": {}, "id": "back"})
    );

    // guest-shutdown: qemu-ga runs /sbin/shutdown; the guest powers off.
    assert_eq!(
        q.cmd(r#"{"execute":"guest-shutdown"}"#),
        json!({"return": {}})
    );
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "stderr: {err}");
}
