//! The device against a fake backend speaking just enough vhost-user.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::*;
use crate::virtio::mock_guest::{mem, Guest};

const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;

/// A backend that answers SET_OWNER and GET_FEATURES (with `features`), and
/// records the requests it saw until the connection closes.
fn fake_backend(features: u64) -> (UnixStream, std::thread::JoinHandle<Vec<u32>>) {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut hdr = [0u8; 12];
        while theirs.read_exact(&mut hdr).is_ok() {
            let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size];
            if theirs.read_exact(&mut body).is_err() {
                break;
            }
            seen.push(req);
            if req == GET_FEATURES {
                let mut reply = Vec::new();
                reply.extend(GET_FEATURES.to_le_bytes());
                reply.extend((0x1u32 | 0x4).to_le_bytes()); // version 1, reply
                reply.extend(8u32.to_le_bytes());
                reply.extend(features.to_le_bytes());
                theirs.write_all(&reply).unwrap();
            }
        }
        seen
    });
    (ours, t)
}

#[test]
fn the_guest_sees_the_tag_one_request_queue_and_only_ring_features() {
    let offered = VHOST_USER_F_PROTOCOL_FEATURES | (1 << 28) | (1 << 29) | (1 << 32) | (1 << 33);
    let (stream, backend) = fake_backend(offered);
    let fs = VhostUserFs::new("share0", stream).unwrap();
    assert_eq!(fs.device_type(), VIRTIO_ID_FS);
    assert_eq!(
        fs.features(),
        (1 << 28) | (1 << 29),
        "no protocol bit, no feature the frontend does not know"
    );
    let mut cfg = [0xffu8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], b"share0");
    assert!(cfg[6..36].iter().all(|b| *b == 0), "NUL padded");
    assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
    assert!(fs.interrupts_bypass());
    assert_eq!(fs.queue_max_sizes().len(), 2);
    drop(fs);
    assert_eq!(backend.join().unwrap(), vec![SET_OWNER, GET_FEATURES]);
}

#[test]
fn a_long_tag_is_cut_to_what_the_configuration_holds() {
    let (stream, _backend) = fake_backend(0);
    let long = "t".repeat(50);
    let fs = VhostUserFs::new(&long, stream).unwrap();
    assert_eq!(fs.tag().len(), MAX_TAG);
}

#[test]
fn a_backend_that_hangs_up_is_an_error_naming_the_step() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    drop(theirs);
    let e = VhostUserFs::new("share0", ours).unwrap_err();
    assert!(e.step == "SET_OWNER" || e.step == "GET_FEATURES", "{e}");
}

#[test]
fn activation_without_the_transports_eventfds_fails_the_device() {
    let (stream, _backend) = fake_backend(1 << 32);
    let mut fs = VhostUserFs::new("share0", stream).unwrap();
    let m = mem();
    let mut g = Guest::new(&m);
    let e = fs.activate(1 << 32, &mut g.ctx()).unwrap_err();
    assert!(e.0.contains("eventfds"), "{}", e.0);
}

#[test]
fn activation_needs_shareable_guest_memory() {
    let (stream, _backend) = fake_backend(1 << 32);
    let mut fs = VhostUserFs::new("share0", stream).unwrap();
    let evts: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    fs.attach_eventfds(&evts, &EventFd::new(0).unwrap());
    let m = mem(); // anonymous memory: the daemon could not map it
    let mut g = Guest::new(&m);
    let e = fs.activate(1 << 32, &mut g.ctx()).unwrap_err();
    assert!(e.0.contains("cannot be shared"), "{}", e.0);
}

/// A FUSE request header (`struct fuse_in_header`, 40 bytes) for `unique`.
fn fuse_request(opcode: u32, unique: u64) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0..4].copy_from_slice(&40u32.to_le_bytes());
    h[4..8].copy_from_slice(&opcode.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// An orphaned device over a backend that is already gone.
fn orphaned() -> VhostUserFs {
    let (stream, _backend) = fake_backend(1 << 32);
    let mut fs = VhostUserFs::new("share0", stream).unwrap();
    assert!(!fs.orphaned());
    fs.backend_gone();
    assert!(fs.orphaned());
    fs
}

#[test]
fn without_its_backend_the_device_answers_every_request_with_eio() {
    let mut fs = orphaned();
    let m = mem();
    let mut g = Guest::with_queues(&m, 2);
    fs.activate(1 << 32, &mut g.ctx()).unwrap();
    // FUSE_LOOKUP (1) on the request queue, FUSE_FORGET (2) on hiprio.
    let (head, reply) = g.request(1, &fuse_request(1, 0x1234_5678_9abc), 64);
    let (forget, _) = g.request(0, &fuse_request(2, 7), 0);
    fs.process_queue(1, &mut g.ctx()).unwrap();
    fs.process_queue(0, &mut g.ctx()).unwrap();
    assert_eq!(g.used(1), vec![(u32::from(head), 16)]);
    let out = g.read(reply, 16);
    assert_eq!(u32::from_le_bytes(out[0..4].try_into().unwrap()), 16);
    assert_eq!(
        i32::from_le_bytes(out[4..8].try_into().unwrap()),
        -libc::EIO
    );
    assert_eq!(
        u64::from_le_bytes(out[8..16].try_into().unwrap()),
        0x1234_5678_9abc,
        "the reply names the request"
    );
    assert_eq!(
        g.used(0),
        vec![(u32::from(forget), 0)],
        "FORGET gets no reply"
    );
    assert!(g.interrupt.status() & crate::virtio::INT_VRING != 0);
    assert!(fs
        .report()
        .unwrap()
        .contains("2 requests answered with EIO"));
}

#[test]
fn the_takeover_starts_where_the_backend_left_the_used_ring() {
    let (stream, _backend) = fake_backend(1 << 32);
    let mut fs = VhostUserFs::new("share0", stream).unwrap();
    let m = mem();
    let mut g = Guest::with_queues(&m, 2);
    // Two requests; the backend answered the first, then died.
    let (_, first_reply) = g.request(1, &fuse_request(1, 1), 64);
    let (second, second_reply) = g.request(1, &fuse_request(1, 2), 64);
    g.used_elsewhere(1, 1);
    fs.backend_gone();
    fs.process_queue(1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(1), vec![(u32::from(second), 16)], "only the second");
    assert_eq!(
        g.read(first_reply, 16),
        vec![0; 16],
        "the first is left alone"
    );
    assert_eq!(
        u64::from_le_bytes(g.read(second_reply, 16)[8..16].try_into().unwrap()),
        2
    );
    // A request made after the takeover is answered too.
    let (third, _) = g.request(1, &fuse_request(1, 3), 64);
    fs.process_queue(1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(1), vec![(u32::from(third), 16)]);
}

#[test]
fn after_the_takeover_the_guest_notifies_every_request() {
    for event_idx in [false, true] {
        let (stream, _backend) = fake_backend(1 << 32);
        let mut fs = VhostUserFs::new("share0", stream).unwrap();
        fs.negotiated = (1 << 32) | if event_idx { EVENT_IDX } else { 0 };
        let m = mem();
        let mut g = Guest::with_queues(&m, 2);
        // The daemon answered one request with notifications off, and died.
        g.request(1, &fuse_request(1, 1), 64);
        g.used_elsewhere(1, 1);
        g.notifications_left_off(1);
        assert!(
            !g.would_notify(1, event_idx),
            "the set-up (event_idx {event_idx})"
        );
        // The takeover looks at every queue once.
        fs.backend_gone();
        fs.process_queue(1, &mut g.ctx()).unwrap();
        for unique in 2..5 {
            assert!(
                g.would_notify(1, event_idx),
                "request {unique} is notified (event_idx {event_idx})"
            );
            let (head, _) = g.request(1, &fuse_request(1, unique), 64);
            fs.process_queue(1, &mut g.ctx()).unwrap();
            assert_eq!(g.used(1), vec![(u32::from(head), 16)]);
        }
    }
}

#[test]
fn an_orphaned_device_survives_a_reset_and_answers_on_the_new_rings() {
    let mut fs = orphaned();
    fs.reset();
    let m = mem();
    let mut g = Guest::with_queues(&m, 2);
    fs.activate((1 << 32) | (1 << 29), &mut g.ctx()).unwrap();
    let (head, _) = g.request(1, &fuse_request(1, 9), 16);
    fs.process_queue(1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(1), vec![(u32::from(head), 16)]);
}

#[test]
fn a_request_with_a_tiny_or_no_reply_buffer_gets_what_fits() {
    let mut fs = orphaned();
    let m = mem();
    let mut g = Guest::with_queues(&m, 2);
    fs.activate(1 << 32, &mut g.ctx()).unwrap();
    let (a, _) = g.request(1, &fuse_request(1, 1), 4);
    let (b, _) = g.request(1, &[1, 2, 3], 0);
    fs.process_queue(1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(1), vec![(u32::from(a), 4), (u32::from(b), 0)]);
}
