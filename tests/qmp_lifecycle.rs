//! The VM lifecycle over QMP with tiny hand-made guests, on any /dev/kvm: stop and
//! cont (vcpu threads really parked), reset, prelaunch, and every guest-caused
//! transition with and without --no-shutdown/--no-reboot.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use minivmm_tests::{
    code_out, code_out_then_halt, code_print, kvm_available, qmp_vm, query_status, spin_guest,
    thread_parked, tiny_guest, vcpu_tids, Qmp, CODE_SPIN,
};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);
const S5: u8 = (5 << 2) | (1 << 5);

#[test]
fn stop_and_cont_reach_two_clients_and_really_stop_the_vcpus() {
    if !kvm_available("stop_and_cont_reach_two_clients_and_really_stop_the_vcpus") {
        return;
    }
    let k = spin_guest("stopcont");
    let mut s = qmp_vm("stopcont", &k, &["--cpus", "2"]);
    s.vm.wait_line(LIMIT, |l| l == "boot");
    let mut a = Qmp::negotiated(&s.sock);
    let mut b = Qmp::negotiated(&s.sock);
    let tids = vcpu_tids(&mut a);
    let pid = s.vm.pid();
    assert_eq!(
        a.cmd(r#"{"execute":"stop","id":1}"#),
        json!({"return": {}, "id": 1})
    );
    let stop = a.wait_event("STOP");
    assert!(stop["timestamp"]["seconds"].is_u64() && stop["timestamp"]["microseconds"].is_u64());
    assert_eq!(b.wait_event("STOP")["event"], "STOP");
    for tid in &tids {
        assert!(
            thread_parked(pid, *tid),
            "vcpu {tid} is parked while paused"
        );
    }
    assert_eq!(query_status(&mut a), "paused");
    assert_eq!(
        a.cmd(r#"{"execute":"query-status"}"#)["return"]["running"],
        false
    );
    // A second stop changes nothing: no second event.
    assert_eq!(b.cmd(r#"{"execute":"stop"}"#), json!({"return": {}}));
    assert_eq!(b.cmd(r#"{"execute":"cont"}"#), json!({"return": {}}));
    assert_eq!(b.wait_event("RESUME")["event"], "RESUME");
    assert_eq!(a.wait_event("RESUME")["event"], "RESUME");
    assert_eq!(b.cmd(r#"{"execute":"cont"}"#), json!({"return": {}}));
    assert_eq!(query_status(&mut a), "running");
    // vcpu 0 spins in the guest again (vcpu 1 is an AP the tiny guest never
    // starts: it waits for INIT/SIPI inside KVM either way).
    assert!(!thread_parked(pid, tids[0]), "vcpu 0 runs again");
    assert_eq!(
        a.event_names(),
        Vec::<String>::new(),
        "no events but STOP/RESUME once"
    );
    assert_eq!(b.event_names(), Vec::<String>::new());
    assert_eq!(a.cmd(r#"{"execute":"quit"}"#), json!({"return": {}}));
    // The SHUTDOWN event comes before the reply; then the connection closes.
    assert_eq!(
        a.wait_event("SHUTDOWN")["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert!(a.read().is_none(), "connection closed after quit");
    assert_eq!(b.wait_event("SHUTDOWN")["data"]["reason"], "host-qmp-quit");
    let (st, err) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0), "{err}");
}

#[test]
fn events_come_before_the_reply() {
    if !kvm_available("events_come_before_the_reply") {
        return;
    }
    let k = spin_guest("order");
    let s = qmp_vm("order", &k, &[]);
    let mut q = Qmp::negotiated(&s.sock);
    q.send("{\"execute\":\"stop\"}\n");
    assert_eq!(q.read().unwrap()["event"], "STOP");
    assert_eq!(q.read().unwrap(), json!({"return": {}}));
    q.send("{\"execute\":\"system_reset\"}\n");
    let ev = q.read().unwrap();
    assert_eq!(ev["event"], "RESET");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    assert_eq!(q.read().unwrap(), json!({"return": {}}));
    assert_eq!(
        query_status(&mut q),
        "prelaunch",
        "a reset while stopped comes back in prelaunch"
    );
    q.send("{\"execute\":\"system_powerdown\"}\n");
    assert_eq!(q.read().unwrap()["event"], "POWERDOWN");
    assert_eq!(q.read().unwrap(), json!({"return": {}}));
}

#[test]
fn system_reset_rebuilds_and_boots_again() {
    if !kvm_available("system_reset_rebuilds_and_boots_again") {
        return;
    }
    let k = spin_guest("reset");
    let mut s = qmp_vm("reset", &k, &[]);
    s.vm.wait_line(LIMIT, |l| l == "boot");
    let mut q = Qmp::negotiated(&s.sock);
    let before = vcpu_tids(&mut q);
    assert_eq!(
        q.cmd(r#"{"execute":"system_reset"}"#),
        json!({"return": {}})
    );
    assert_eq!(
        q.wait_event("RESET")["data"]["reason"],
        "host-qmp-system-reset"
    );
    s.vm.wait_line(LIMIT, |l| l == "boot");
    assert_eq!(query_status(&mut q), "running");
    assert_ne!(vcpu_tids(&mut q), before, "new vcpu threads");
    // The same client keeps working across the reset.
    assert_eq!(
        q.cmd(r#"{"execute":"query-kvm"}"#)["return"]["present"],
        true
    );
}

#[test]
fn paused_start_waits_for_cont() {
    if !kvm_available("paused_start_waits_for_cont") {
        return;
    }
    let k = spin_guest("paused");
    let mut s = qmp_vm("paused", &k, &["--paused"]);
    let mut q = Qmp::negotiated(&s.sock);
    assert_eq!(query_status(&mut q), "prelaunch");
    for tid in vcpu_tids(&mut q) {
        assert!(thread_parked(s.vm.pid(), tid));
    }
    assert_eq!(q.cmd(r#"{"execute":"stop"}"#), json!({"return": {}}));
    assert_eq!(
        query_status(&mut q),
        "prelaunch",
        "stop does not leave prelaunch"
    );
    assert_eq!(q.cmd(r#"{"execute":"cont"}"#), json!({"return": {}}));
    q.wait_event("RESUME");
    s.vm.wait_line(LIMIT, |l| l == "boot");
    assert_eq!(s.vm.seen, vec!["boot"], "no guest output before cont");
    assert_eq!(query_status(&mut q), "running");
}

#[test]
fn guest_poweroff_emits_shutdown_and_exits_zero() {
    if !kvm_available("guest_poweroff_emits_shutdown_and_exits_zero") {
        return;
    }
    // The guest waits to be started, then powers off.
    let k = tiny_guest(
        "poweroff",
        &[&code_print(b"bye\n"), &code_out_then_halt(0x600, S5)],
    );
    let mut s = qmp_vm("poweroff", &k, &["--paused"]);
    let mut q = Qmp::negotiated(&s.sock);
    q.cmd(r#"{"execute":"cont"}"#);
    assert_eq!(
        q.wait_event("SHUTDOWN")["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    assert!(q.read().is_none());
    let (st, _) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0));
    assert_eq!(s.vm.seen, vec!["bye"]);
}

#[test]
fn no_shutdown_keeps_the_process_and_reset_cont_boots_again() {
    if !kvm_available("no_shutdown_keeps_the_process_and_reset_cont_boots_again") {
        return;
    }
    let k = tiny_guest(
        "noshutdown",
        &[&code_print(b"bye\n"), &code_out_then_halt(0x600, S5)],
    );
    let mut s = qmp_vm("noshutdown", &k, &["--no-shutdown", "--paused"]);
    let mut q = Qmp::negotiated(&s.sock);
    for round in 0..2 {
        q.cmd(r#"{"execute":"cont"}"#);
        q.wait_event("RESUME");
        let ev = q.wait_event("SHUTDOWN");
        assert_eq!(
            ev["data"],
            json!({"guest": true, "reason": "guest-shutdown"}),
            "round {round}"
        );
        q.wait_event("STOP");
        assert_eq!(query_status(&mut q), "shutdown");
        assert_eq!(
            q.cmd(r#"{"execute":"cont"}"#),
            json!({"error": {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}})
        );
        assert_eq!(
            q.cmd(r#"{"execute":"system_reset"}"#),
            json!({"return": {}})
        );
        q.wait_event("RESET");
        assert_eq!(query_status(&mut q), "prelaunch");
    }
    q.cmd(r#"{"execute":"quit"}"#);
    let (st, _) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0));
    assert_eq!(
        s.vm.seen.iter().filter(|l| *l == "bye").count(),
        2,
        "booted twice"
    );
}

#[test]
fn guest_reset_events_with_and_without_no_reboot() {
    if !kvm_available("guest_reset_events_with_and_without_no_reboot") {
        return;
    }
    let k = tiny_guest(
        "guestreset",
        &[&code_print(b"boot\n"), &code_out_then_halt(0x604, 1)],
    );
    let s = qmp_vm("guestreset", &k, &["--paused"]);
    let mut q = Qmp::negotiated(&s.sock);
    q.cmd(r#"{"execute":"cont"}"#);
    assert_eq!(
        q.wait_event("RESET")["data"],
        json!({"guest": true, "reason": "guest-reset"})
    );
    assert_eq!(
        q.wait_event("RESET")["data"]["guest"],
        true,
        "and again: it reboots in a loop"
    );
    drop(s);

    let mut s = qmp_vm("guestreset2", &k, &["--paused", "--no-reboot"]);
    let mut q = Qmp::negotiated(&s.sock);
    q.cmd(r#"{"execute":"cont"}"#);
    assert_eq!(
        q.wait_event("SHUTDOWN")["data"],
        json!({"guest": true, "reason": "guest-reset"})
    );
    let (st, _) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0));
}

#[test]
fn guest_panic_via_pvpanic() {
    if !kvm_available("guest_panic_via_pvpanic") {
        return;
    }
    let k = tiny_guest(
        "panic",
        &[&code_print(b"oops\n"), &code_out(0x505, 1), &CODE_SPIN],
    );
    let mut s = qmp_vm("panic", &k, &["--paused"]);
    let mut q = Qmp::negotiated(&s.sock);
    q.cmd(r#"{"execute":"cont"}"#);
    assert_eq!(
        q.wait_event("GUEST_PANICKED")["data"],
        json!({"action": "poweroff"})
    );
    assert_eq!(
        q.wait_event("SHUTDOWN")["data"],
        json!({"guest": true, "reason": "guest-panic"})
    );
    let (st, err) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("panicked"), "{err}");

    let mut s = qmp_vm("panic2", &k, &["--paused", "--no-shutdown"]);
    let mut q = Qmp::negotiated(&s.sock);
    q.cmd(r#"{"execute":"cont"}"#);
    assert_eq!(
        q.wait_event("GUEST_PANICKED")["data"],
        json!({"action": "pause"})
    );
    q.wait_event("STOP");
    assert_eq!(query_status(&mut q), "guest-panicked");
    assert_eq!(
        q.cmd(r#"{"execute":"cont"}"#)["error"]["desc"],
        "Resetting the Virtual Machine is required"
    );
    q.cmd(r#"{"execute":"quit"}"#);
    assert_eq!(s.vm.wait_exit(LIMIT).0.code(), Some(0));
}

#[test]
fn kvm_failure_with_no_shutdown_is_internal_error_and_reset_recovers() {
    if !kvm_available("kvm_failure_with_no_shutdown_is_internal_error_and_reset_recovers") {
        return;
    }
    let k = tiny_guest(
        "interr",
        &[
            &code_print(b"x\n"),
            &[0xb8, 0x00, 0x00, 0x00, 0x30, 0xff, 0xe0],
        ],
    );
    let mut s = qmp_vm("interr", &k, &["--no-shutdown", "--memory", "64M"]);
    s.vm.wait_line(LIMIT, |l| l == "x");
    let mut q = Qmp::negotiated(&s.sock);
    // The failure may already have happened; STOP marks it.
    if query_status(&mut q) != "internal-error" {
        q.wait_event("STOP");
    }
    assert_eq!(query_status(&mut q), "internal-error");
    assert_eq!(
        q.cmd(r#"{"execute":"system_reset"}"#),
        json!({"return": {}})
    );
    assert_eq!(query_status(&mut q), "prelaunch");
    q.cmd(r#"{"execute":"quit"}"#);
    let (st, err) = s.vm.wait_exit(LIMIT);
    assert_eq!(st.code(), Some(0));
    assert!(err.contains("rip="), "the failure was reported: {err}");
}
