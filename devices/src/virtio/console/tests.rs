//! The console device against virtio-queue's mock queues.
use super::*;
use crate::virtio::mock_guest::{mem, Guest, BUF_BASE};
use crate::virtio::INT_VRING;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Runs the Linux handshake; returns the console with port 1 open.
fn handshake(g: &mut Guest) -> Console {
    let mut c = Console::default();
    c.activate(VIRTIO_CONSOLE_F_MULTIPORT, &mut g.ctx())
        .unwrap();
    let ctl: Vec<u64> = (0..4).map(|_| g.offer(CTRL_RX, 64)).collect();
    g.send(CTRL_TX, &control(0xffff_ffff, event::DEVICE_READY, 1));
    c.process_queue(CTRL_TX, &mut g.ctx()).unwrap();
    assert_eq!(g.used(CTRL_TX).len(), 1, "control message consumed");
    let used = g.used(CTRL_RX);
    assert_eq!(used, vec![(0, 8)]);
    assert_eq!(g.read(ctl[0], 8), control(1, event::PORT_ADD, 0));
    g.send(CTRL_TX, &control(1, event::PORT_READY, 1));
    c.process_queue(CTRL_TX, &mut g.ctx()).unwrap();
    let used = g.used(CTRL_RX);
    assert_eq!(used.len(), 2);
    let mut name = control(1, event::PORT_NAME, 1);
    name.extend_from_slice(AGENT_PORT_NAME.as_bytes());
    assert_eq!(used[0].1 as usize, name.len());
    assert_eq!(g.read(ctl[1], name.len() as u32), name);
    assert_eq!(
        g.read(ctl[2], 8),
        control(1, event::PORT_OPEN, 1),
        "host side open"
    );
    assert!(!c.guest_open());
    g.send(CTRL_TX, &control(1, event::PORT_OPEN, 1));
    c.process_queue(CTRL_TX, &mut g.ctx()).unwrap();
    assert!(c.guest_open());
    assert_eq!(c.take_port_changes(), vec![true]);
    assert_ne!(g.interrupt.status() & INT_VRING, 0);
    c
}

#[test]
fn config_space_advertises_two_ports_and_features() {
    let c = Console::default();
    let mut b = [0u8; 4];
    c.read_config(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 2);
    assert_eq!(c.features() & 1, 0, "no VIRTIO_CONSOLE_F_SIZE");
    assert_ne!(c.features() & VIRTIO_CONSOLE_F_MULTIPORT, 0);
    assert_eq!(c.queue_max_sizes().len(), 6);
    let mut far = [0xffu8; 2];
    c.read_config(100, &mut far);
    assert_eq!(far, [0, 0]);
}

#[test]
fn handshake_then_data_both_ways() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    // Host → guest.
    let rx = g.offer(RX1, 64);
    assert_eq!(
        c.send_to_guest(b"{\"return\": {}}\n", &mut g.ctx())
            .unwrap(),
        15
    );
    assert_eq!(g.used(RX1), vec![(0, 15)]);
    assert_eq!(g.read(rx, 15), b"{\"return\": {}}\n");
    // Guest → host.
    g.send(TX1, b"{\"execute\":\"guest-ping\"}\n");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.take_from_guest(), b"{\"execute\":\"guest-ping\"}\n");
    assert!(g.used(TX1).is_empty(), "the buffer goes back later");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(TX1).len(), 1, "when a look finds no more writes");
    assert!(c.take_from_guest().is_empty());
}

#[test]
fn data_waits_while_the_guest_has_the_port_closed() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    g.send(CTRL_TX, &control(1, event::PORT_OPEN, 0));
    c.process_queue(CTRL_TX, &mut g.ctx()).unwrap();
    assert_eq!(c.take_port_changes(), vec![false]);
    let rx = g.offer(RX1, 64);
    c.send_to_guest(b"held", &mut g.ctx()).unwrap();
    assert!(g.used(RX1).is_empty(), "nothing delivered while closed");
    assert_eq!(c.pending_to_guest(), 4);
    g.send(CTRL_TX, &control(1, event::PORT_OPEN, 1));
    c.process_queue(CTRL_TX, &mut g.ctx()).unwrap();
    assert_eq!(g.used(RX1), vec![(0, 4)]);
    assert_eq!(g.read(rx, 4), b"held");
}

#[test]
fn data_larger_than_buffers_is_split_and_waits_for_buffers() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    c.send_to_guest(b"0123456789", &mut g.ctx()).unwrap();
    assert_eq!(c.pending_to_guest(), 10, "no buffer yet");
    let a = g.offer(RX1, 4);
    let b = g.offer(RX1, 4);
    c.process_queue(RX1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(RX1), vec![(0, 4), (1, 4)]);
    assert_eq!(g.read(a, 4), b"0123");
    assert_eq!(g.read(b, 4), b"4567");
    assert_eq!(c.pending_to_guest(), 2);
}

#[test]
fn control_messages_wait_for_control_buffers() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = Console::default();
    g.send(CTRL_TX, &control(0, event::DEVICE_READY, 1));
    c.process_queue(CTRL_TX, &mut g.ctx()).unwrap();
    assert!(g.used(CTRL_RX).is_empty());
    let buf = g.offer(CTRL_RX, 64);
    c.process_queue(CTRL_RX, &mut g.ctx()).unwrap();
    assert_eq!(g.used(CTRL_RX), vec![(0, 8)]);
    assert_eq!(g.read(buf, 8), control(1, event::PORT_ADD, 0));
}

#[test]
fn misbehaving_guest_never_panics() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    // Control messages for unknown ports, short messages, host-only events.
    g.send(CTRL_TX, &control(7, event::PORT_OPEN, 1));
    g.send(CTRL_TX, &[1, 2, 3]);
    g.send(CTRL_TX, &control(1, event::PORT_NAME, 1));
    g.send(CTRL_TX, &control(1, 99, 1));
    c.process_queue(CTRL_TX, &mut g.ctx()).unwrap();
    assert!(c.guest_open(), "port 1 unaffected");
    // A zero-length receive buffer is returned empty.
    g.offer(RX1, 0);
    let rx = g.offer(RX1, 8);
    c.send_to_guest(b"abc", &mut g.ctx()).unwrap();
    assert_eq!(g.used(RX1), vec![(0, 0), (1, 3)]);
    assert_eq!(g.read(rx, 3), b"abc");
    // Data on the never-added port 0 is discarded.
    g.send(TX0, b"junk");
    c.process_queue(TX0, &mut g.ctx()).unwrap();
    assert!(c.take_from_guest().is_empty());
    // A descriptor outside guest memory fails the device instead of panicking.
    g.add(TX1, 0x1_0000_0000, 16, false);
    assert!(c.process_queue(TX1, &mut g.ctx()).is_err());
}

#[test]
fn oversized_guest_buffer_fails_the_device() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    g.add(CTRL_TX, BUF_BASE, 1 << 20, false);
    assert!(c.process_queue(CTRL_TX, &mut g.ctx()).is_err());
}

#[test]
fn host_to_guest_data_is_bounded() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    let big = vec![b'x'; MAX_PENDING_TO_GUEST + 100];
    assert_eq!(
        c.send_to_guest(&big, &mut g.ctx()).unwrap(),
        MAX_PENDING_TO_GUEST
    );
    assert_eq!(c.send_to_guest(b"more", &mut g.ctx()).unwrap(), 0);
    c.discard_to_guest();
    assert_eq!(c.pending_to_guest(), 0);
}

#[test]
fn reset_forgets_the_port_and_reports_it_closed() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    c.reset();
    assert!(!c.guest_open());
    assert_eq!(c.take_port_changes(), vec![false]);
}

#[test]
fn a_host_not_reading_stalls_the_guest_without_losing_bytes() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 12 << 20)]).unwrap();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    // 8 chains of 1 MiB, each byte telling its chain: twice the bound.
    for i in 0..8u8 {
        g.send(TX1, &vec![i; MAX_CHAIN]);
    }
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert!(
        c.tx_stalled(),
        "past the bound the device stops taking buffers"
    );
    let report = c.report().unwrap();
    assert!(
        report.contains(&format!(
            "{MAX_PENDING_FROM_GUEST} bytes from the guest not yet taken (transmit stalled true, polled false, 0 buffers held)"
        )),
        "{report}"
    );
    let first = g.used(TX1).len();
    assert_eq!(
        first,
        MAX_PENDING_FROM_GUEST / MAX_CHAIN,
        "the rest wait in the ring"
    );
    let mut got = c.take_from_guest();
    // The host took the bytes: the transmit queue is notified again.
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(first + g.used(TX1).len(), 8);
    got.extend(c.take_from_guest());
    let want: Vec<u8> = (0..8u8).flat_map(|i| vec![i; MAX_CHAIN]).collect();
    assert!(got == want, "every byte, in order");
}

#[test]
fn no_interrupt_when_the_driver_asks_for_none() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    g.interrupt.ack(INT_VRING);
    // A driver that needs no interrupt for its transmit buffers.
    g.suppress_interrupts(TX1, true);
    g.send(TX1, b"quiet");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.take_from_guest(), b"quiet");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(TX1).len(), 1, "the buffer is used all the same");
    assert_eq!(g.interrupt.status() & INT_VRING, 0, "no interrupt");
    g.suppress_interrupts(TX1, false);
    g.send(TX1, b"loud");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(TX1).len(), 1);
    assert_ne!(g.interrupt.status() & INT_VRING, 0, "an interrupt");
}

#[test]
fn a_guest_writing_on_is_polled_instead_of_notifying() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    assert!(g.notifications_wanted(TX1));
    assert_eq!(c.polling(), None);
    g.send(TX1, b"one");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.take_from_guest(), b"one");
    assert!(
        !g.notifications_wanted(TX1),
        "data flows: the guest is told not to notify"
    );
    assert_eq!(c.polling(), Some((TX1, TX_POLL_INTERVAL)));
    // Two writes without a notification, taken by the next poll at once.
    g.interrupt.ack(INT_VRING);
    g.send(TX1, b"two");
    g.send(TX1, b"three");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.take_from_guest(), b"twothree");
    assert!(g.used(TX1).is_empty(), "held while the guest writes on");
    assert_eq!(g.interrupt.status() & INT_VRING, 0, "no interrupt");
    assert_eq!(c.polling(), Some((TX1, TX_POLL_INTERVAL)), "still flowing");
    // A poll that finds nothing: all three back, notifications again.
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(TX1).len(), 3, "all in one round");
    assert_ne!(g.interrupt.status() & INT_VRING, 0, "one interrupt");
    assert!(g.notifications_wanted(TX1));
    assert_eq!(c.polling(), None);
    // A notification then starts over.
    g.send(TX1, b"four");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.take_from_guest(), b"four");
    assert_eq!(c.polling(), Some((TX1, TX_POLL_INTERVAL)));
}

#[test]
fn a_request_for_the_guest_ends_polling_and_takes_what_waits() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    g.send(TX1, b"reply-part-1");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.polling(), Some((TX1, TX_POLL_INTERVAL)));
    // Posted while notifications are off, not yet polled.
    g.send(TX1, b"reply-part-2");
    g.offer(RX1, 64);
    assert_eq!(c.send_to_guest(b"next", &mut g.ctx()).unwrap(), 4);
    assert_eq!(
        c.take_from_guest(),
        b"reply-part-1reply-part-2",
        "what waited is taken when notifications come back on"
    );
    // What waited means data still flows: polling goes on from here.
    assert_eq!(c.polling(), Some((TX1, TX_POLL_INTERVAL)));
    g.offer(RX1, 64);
    c.send_to_guest(b"again", &mut g.ctx()).unwrap();
    assert_eq!(c.polling(), None, "a request with nothing waiting");
    assert!(g.notifications_wanted(TX1));
}

#[test]
fn a_stalled_transmit_queue_is_not_polled() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 12 << 20)]).unwrap();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    for i in 0..5u8 {
        g.send(TX1, &vec![i; MAX_CHAIN]);
    }
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert!(c.tx_stalled());
    assert_eq!(c.polling(), None, "the host's notify resumes a stall");
    assert!(g.notifications_wanted(TX1));
    c.take_from_guest();
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.take_from_guest(), vec![4; MAX_CHAIN]);
    assert_eq!(c.polling(), Some((TX1, TX_POLL_INTERVAL)));
}

#[test]
fn reset_ends_polling() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    g.send(TX1, b"x");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert!(c.polling().is_some());
    c.reset();
    assert_eq!(c.polling(), None);
}

#[test]
fn receive_buffers_are_notified_only_while_bytes_wait_for_one() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    let rx = g.offer(RX1, 4);
    c.send_to_guest(b"ab", &mut g.ctx()).unwrap();
    assert_eq!(g.read(rx, 2), b"ab");
    assert!(
        !g.notifications_wanted(RX1),
        "nothing waits: the guest need not notify its next buffer"
    );
    // More than the guest has room for: it must tell of its next buffer.
    g.offer(RX1, 4);
    c.send_to_guest(b"cdefgh", &mut g.ctx()).unwrap();
    assert_eq!(c.pending_to_guest(), 2);
    assert!(g.notifications_wanted(RX1));
    let rest = g.offer(RX1, 4);
    c.process_queue(RX1, &mut g.ctx()).unwrap();
    assert_eq!(g.read(rest, 2), b"gh");
    assert_eq!(c.pending_to_guest(), 0);
    assert!(!g.notifications_wanted(RX1));
}

#[test]
fn receive_queues_ask_for_no_notifications_until_something_waits() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = Console::default();
    c.activate(VIRTIO_CONSOLE_F_MULTIPORT, &mut g.ctx())
        .unwrap();
    assert!(
        !g.notifications_wanted(CTRL_RX) && !g.notifications_wanted(RX1),
        "the guest's hundreds of receive buffers need no notification"
    );
    // DEVICE_READY with no control buffer: PORT_ADD waits for one.
    g.send(CTRL_TX, &control(0xffff_ffff, event::DEVICE_READY, 1));
    c.process_queue(CTRL_TX, &mut g.ctx()).unwrap();
    assert!(g.notifications_wanted(CTRL_RX));
    let buf = g.offer(CTRL_RX, 64);
    c.process_queue(CTRL_RX, &mut g.ctx()).unwrap();
    assert_eq!(g.read(buf, 8), control(1, event::PORT_ADD, 0));
    assert!(!g.notifications_wanted(CTRL_RX));
}

#[test]
fn a_reply_goes_back_with_the_next_request_or_when_half_the_ring_is_out() {
    let m = mem();
    let mut g = Guest::new(&m);
    let mut c = handshake(&mut g);
    g.send(TX1, b"{\"return\": {}}\n");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.take_from_guest(), b"{\"return\": {}}\n");
    assert!(g.used(TX1).is_empty());
    // The next request: its delivery gives the reply's buffer back, with
    // one interrupt for both queues.
    let rx = g.offer(RX1, 64);
    g.interrupt.take_raised();
    c.send_to_guest(b"{\"execute\":\"guest-ping\"}\n", &mut g.ctx())
        .unwrap();
    assert_eq!(g.used(TX1).len(), 1);
    assert_eq!(g.used(RX1).len(), 1);
    assert_eq!(
        g.interrupt.take_raised(),
        1,
        "one interrupt for both queues"
    );
    assert_eq!(g.read(rx, 4), b"{\"ex");
    assert_eq!(c.polling(), None);
    // Ten writes on a ring of 16: when 8 are out, they go back at once.
    for i in 0..10u8 {
        g.send(TX1, &[b'0' + i]);
    }
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(c.take_from_guest(), b"0123456789");
    assert_eq!(g.used(TX1).len(), 8);
    g.send(TX1, b"a");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert!(g.used(TX1).is_empty(), "a look that finds more holds on");
    c.process_queue(TX1, &mut g.ctx()).unwrap();
    assert_eq!(g.used(TX1).len(), 3, "the rest when the writes stop");
}
