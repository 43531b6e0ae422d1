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
