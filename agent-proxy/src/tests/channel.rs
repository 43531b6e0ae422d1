//! The proxy alone: syncing, routing, errors, limits.

use super::*;

#[test]
fn sync_on_open_queues_requests_and_discards_stale_output() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    assert!(!p.is_connected());
    p.port_state(true);
    let sync = p.take_to_guest();
    let id = sync_id(&sync);
    assert!(id > 0);
    p.submit_qmp(1, json!({"execute": "guest-ping"}));
    assert!(p.take_to_guest().is_empty(), "requests wait for the sync");
    // Stale output of an earlier session, including a sentinel reply to some
    // other sync, then what qemu-ga answers to ours.
    p.from_guest(b"{\"return\": {\"stale\": tr");
    p.from_guest(b"ue}}\n{\"return\": 5}\n\xff{\"return\": 1}\n{\"ret");
    a.feed(&sync);
    let answer = std::mem::take(&mut a.out);
    assert!(
        answer.starts_with(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n\xff{\"return\": "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    for b in answer.chunks(1) {
        assert!(p.is_synced() || p.take_to_guest().is_empty());
        p.from_guest(b);
    }
    assert!(p.is_synced());
    assert_eq!(p.take_to_guest(), b"{\"execute\":\"guest-ping\"}\n");
    p.from_guest(b"{\"return\": {}}\n");
    assert_eq!(p.take_qmp_replies(), vec![(1, ok(json!({})))]);
    assert!(p.take_to_guest().is_empty());
    // Re-opening and a fresh sync use a new id.
    p.port_state(false);
    p.port_state(true);
    assert_ne!(sync_id(&p.take_to_guest()), id);
}

#[test]
fn qmp_routing_one_request_at_a_time() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    open_and_sync(&mut p, &mut a);
    p.submit_qmp(10, json!({"execute": "guest-get-osinfo", "id": "ignored"}));
    p.submit_qmp(
        11,
        json!({"execute": "guest-exec-status", "arguments": {"pid": 1}}),
    );
    p.submit_qmp(12, json!({"execute": "guest-nope"}));
    p.submit_qmp(13, json!({"arguments": {}}));
    // Only the first is on its way.
    assert_eq!(
        p.take_to_guest(),
        b"{\"execute\":\"guest-get-osinfo\"}\n",
        "the QMP id is not forwarded"
    );
    p.from_guest(b"{\"return\": {\"machine\": \"x86_64\"}}\n");
    exchange(&mut p, &mut a);
    let r = p.take_qmp_replies();
    assert_eq!(
        r,
        vec![
            (
                13,
                Err(AgentError::generic("QMP input lacks member 'execute'"))
            ),
            (10, ok(json!({"machine": "x86_64"}))),
            (11, Err(AgentError::generic("Invalid parameter 'pid'"))),
            (
                12,
                Err(AgentError {
                    class: "CommandNotFound".into(),
                    desc: "The command guest-nope has not been found".into()
                })
            ),
        ]
    );
    assert_eq!(
        a.seen[1..],
        [
            json!({"execute": "guest-exec-status", "arguments": {"pid": 1}}),
            json!({"execute": "guest-nope"})
        ]
    );
    // A QMP guest-sync-delimited works too (the sentinel is not part of the value).
    p.submit_qmp(
        14,
        json!({"execute": "guest-sync-delimited", "arguments": {"id": 77}}),
    );
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(14, ok(json!(77)))]);
    assert!(p.is_synced());
}

#[test]
fn not_connected_and_port_closing() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    p.submit_qmp(1, json!({"execute": "guest-ping"}));
    assert_eq!(
        p.take_qmp_replies(),
        vec![(1, Err(AgentError::generic("Guest agent is not connected")))]
    );
    assert!(p.take_to_guest().is_empty());
    open_and_sync(&mut p, &mut a);
    a.hung = true;
    p.submit_qmp(2, json!({"execute": "guest-ping"}));
    p.submit_qmp(3, json!({"execute": "guest-ping"}));
    exchange(&mut p, &mut a);
    assert!(p.take_qmp_replies().is_empty());
    p.port_state(false);
    assert_eq!(
        p.take_qmp_replies(),
        vec![
            (
                2,
                Err(AgentError::generic(
                    "Guest agent disappeared while executing command"
                ))
            ),
            (3, Err(AgentError::generic("Guest agent is not connected"))),
        ]
    );
    // Output of the old session is ignored while closed and after re-opening.
    p.from_guest(b"{\"return\": {}}\n");
    a.release();
    p.port_state(true);
    let late = std::mem::take(&mut a.out);
    p.from_guest(&late);
    exchange(&mut p, &mut a);
    assert!(p.is_synced());
    p.submit_qmp(4, json!({"execute": "guest-get-osinfo"}));
    exchange(&mut p, &mut a);
    let r = p.take_qmp_replies();
    assert_eq!(r[0].0, 4);
    assert_eq!(value(r[0].1.as_ref().unwrap())["machine"], "x86_64");
}

#[test]
fn no_reply_commands_complete_on_vm_event_or_port_close() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    open_and_sync(&mut p, &mut a);
    p.submit_qmp(
        1,
        json!({"execute": "guest-shutdown", "arguments": {"mode": "reboot"}}),
    );
    p.submit_qmp(2, json!({"execute": "guest-ping"}));
    exchange(&mut p, &mut a);
    assert!(p.take_qmp_replies().is_empty());
    p.vm_event("STOP");
    assert!(p.take_qmp_replies().is_empty(), "not a completing event");
    p.vm_event("RESET");
    assert_eq!(p.take_qmp_replies(), vec![(1, ok(json!({})))]);
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(2, ok(json!({})))]);
    assert_eq!(
        a.commands(),
        [
            "guest-sync-delimited",
            "guest-shutdown",
            "guest-sync-delimited",
            "guest-ping"
        ],
        "a resync after the event"
    );
    p.submit_qmp(3, json!({"execute": "guest-shutdown"}));
    exchange(&mut p, &mut a);
    p.vm_event("SHUTDOWN");
    assert_eq!(p.take_qmp_replies(), vec![(3, ok(json!({})))]);
    exchange(&mut p, &mut a);
    p.submit_qmp(4, json!({"execute": "guest-suspend-disk"}));
    exchange(&mut p, &mut a);
    p.port_state(false);
    assert_eq!(p.take_qmp_replies(), vec![(4, ok(json!({})))]);
}

#[test]
fn garbage_from_the_agent_resyncs() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    a.double_errors = true; // two replies to the sync's 0xFF: still in sync
    open_and_sync(&mut p, &mut a);
    // Output while nothing is in flight.
    p.from_guest(b"}}garbage\x01\n");
    assert!(!p.is_synced());
    p.submit_qmp(1, json!({"execute": "guest-ping"}));
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(1, ok(json!({})))]);
    // Something that is not a reply while a request is in flight.
    p.submit_qmp(2, json!({"execute": "guest-ping"}));
    p.submit_qmp(3, json!({"execute": "guest-get-osinfo"}));
    assert_eq!(p.take_to_guest(), b"{\"execute\":\"guest-ping\"}\n");
    p.from_guest(b"[1, 2]\n{\"return\": {}}\n");
    assert_eq!(
        p.take_qmp_replies(),
        vec![(
            2,
            Err(AgentError::generic("Guest agent sent an invalid reply"))
        )]
    );
    assert!(!p.is_synced());
    exchange(&mut p, &mut a);
    let r = p.take_qmp_replies();
    assert_eq!(r.len(), 1);
    assert_eq!(value(r[0].1.as_ref().unwrap())["machine"], "x86_64");
    // Two replies after malformed input: the first answers, the second must not
    // be taken for the reply to the next request.
    p.submit_qmp(4, json!({"execute": "guest-ping"}));
    p.submit_qmp(5, json!({"execute": "guest-sync", "arguments": {"id": 5}}));
    assert_eq!(p.take_to_guest(), b"{\"execute\":\"guest-ping\"}\n");
    p.from_guest(
        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid keyword 'garbage'\"}}\n",
    );
    p.from_guest(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\n");
    exchange(&mut p, &mut a);
    assert_eq!(
        p.take_qmp_replies(),
        vec![
            (
                4,
                Err(AgentError::generic(
                    "JSON parse error, invalid keyword 'garbage'"
                ))
            ),
            (5, ok(json!(5))),
        ]
    );
}

#[test]
fn oversized_agent_reply_is_an_error_then_resync() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    p.set_max_reply(64 * 1024);
    open_and_sync(&mut p, &mut a);
    p.submit_qmp(1, json!({"execute": "guest-file-read"}));
    p.submit_qmp(2, json!({"execute": "guest-ping"}));
    assert!(!p.take_to_guest().is_empty());
    p.from_guest(b"{\"return\": {\"count\": 100000, \"buf-b64\": \"");
    let chunk = vec![b'A'; 16 * 1024];
    for _ in 0..8 {
        p.from_guest(&chunk);
    }
    assert_eq!(
        p.take_qmp_replies(),
        vec![(
            1,
            Err(AgentError::generic(
                "Guest agent reply exceeds the size limit of 65536 bytes"
            ))
        )]
    );
    // The rest of the big reply is skipped without being buffered.
    for _ in 0..64 {
        p.from_guest(&chunk);
    }
    p.from_guest(b"\", \"eof\": true}}\n");
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(2, ok(json!({})))]);
}

#[test]
fn large_reply_within_the_default_limit_passes() {
    let mut p = proxy(DEFAULT_TIMEOUT);
    let mut a = FakeAgent::new();
    open_and_sync(&mut p, &mut a);
    p.submit_qmp(1, json!({"execute": "guest-file-read"}));
    p.take_to_guest();
    // qemu-ga caps guest-file-read at 48 MiB of data: 64 MiB of base64.
    let mut payload = "QUJD".repeat(16 << 20);
    let reply =
        wire::to_wire(&json!({"return": {"count": 48 << 20, "buf-b64": payload, "eof": false}}));
    assert!(reply.len() > 64 << 20 && reply.len() < MAX_REPLY);
    for c in reply.chunks(1 << 20) {
        p.from_guest(c);
    }
    let r = p.take_qmp_replies();
    assert_eq!(r.len(), 1);
    let v = value(r[0].1.as_ref().unwrap());
    assert_eq!(v["buf-b64"].as_str().unwrap().len(), 64 << 20);
    assert_eq!(v["eof"], false);
    drop(r);
    // Over the limit fails, and the channel recovers.
    p.submit_qmp(2, json!({"execute": "guest-file-read"}));
    p.take_to_guest();
    payload = "QUJD".repeat((16 << 20) + (16 << 10) + 1);
    let big = wire::to_wire(&json!({"return": {"count": 0, "buf-b64": payload}}));
    assert!(big.len() > MAX_REPLY);
    for c in big.chunks(1 << 20) {
        p.from_guest(c);
    }
    assert_eq!(
        p.take_qmp_replies(),
        vec![(
            2,
            Err(AgentError::generic(
                "Guest agent reply exceeds the size limit of 67174400 bytes"
            ))
        )]
    );
    p.submit_qmp(3, json!({"execute": "guest-ping"}));
    exchange(&mut p, &mut a);
    assert_eq!(p.take_qmp_replies(), vec![(3, ok(json!({})))]);
}

#[test]
fn a_huge_or_stray_reply_costs_a_small_multiple_of_its_bytes() {
    // 4 MiB of `[0,0,0,...]`: as a `serde_json::Value` that would take 16 times
    // its size; passed through, a few times at most.
    let zeros = format!("[{}0]", "0,".repeat(2 << 20));
    let mut p = proxy(Duration::from_secs(30));
    let mut a = FakeAgent::new();
    open_and_sync(&mut p, &mut a);
    a.hung = true;
    p.submit_qmp(1, json!({"execute": "guest-file-read"}));
    exchange(&mut p, &mut a);
    let reply = format!("{{\"return\": {zeros}}}\n");
    let start = alloc_count::start();
    for chunk in reply.as_bytes().chunks(64 << 10) {
        p.from_guest(chunk);
    }
    let r = p.take_qmp_replies();
    let peak = alloc_count::peak_since(start);
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].1.as_ref().unwrap().as_bytes(),
        zeros.as_bytes(),
        "passed through intact"
    );
    assert!(
        peak <= 4 * reply.len(),
        "{peak} bytes allocated for a {} byte reply",
        reply.len()
    );
    drop(r);

    // The same while nothing is in flight: not a reply to anything; dropped,
    // and the channel resynchronised.
    let start = alloc_count::start();
    for chunk in reply.as_bytes().chunks(64 << 10) {
        p.from_guest(chunk);
    }
    let peak = alloc_count::peak_since(start);
    assert!(peak <= 4 * reply.len(), "{peak} bytes for stray output");
    assert!(!p.is_synced(), "stray output starts a resync");
    assert!(p.take_qmp_replies().is_empty());
}
