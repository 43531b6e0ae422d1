use super::*;
use crate::virtio::{DeviceFailure, INT_VRING};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

#[derive(Default)]
struct Fake {
    activated: Option<u64>,
    notified: Vec<usize>,
    resets: usize,
    fail_next: bool,
    /// Set by a notification of queue 1: the device then polls queue 0.
    polls: Option<usize>,
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        1 << 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn activate(&mut self, f: u64, _: &mut QueueContext) -> Result<(), DeviceFailure> {
        self.activated = Some(f);
        Ok(())
    }
    fn process_queue(&mut self, i: usize, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        if self.fail_next {
            return Err(DeviceFailure("bad chain".into()));
        }
        self.notified.push(i);
        if i == 1 {
            self.polls = Some(0);
        } else if self.polls == Some(i) {
            // One poll is enough.
            self.polls = None;
        }
        ctx.interrupt.trigger(INT_VRING);
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.activated = None;
        self.polls = None;
    }
    fn polling(&self) -> Option<(usize, std::time::Duration)> {
        self.polls.map(|q| (q, std::time::Duration::from_millis(1)))
    }
}

fn transport() -> (MmioTransport<Fake>, EventFd) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    (
        MmioTransport::new(Fake::default(), mem, irq.try_clone().unwrap()).unwrap(),
        irq,
    )
}

fn r(t: &mut MmioTransport<Fake>, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(0, u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport<Fake>, off: u32, v: u32) {
    t.write(0, u64::from(off), &v.to_le_bytes());
}

/// Sets up both queues (16 entries at distinct addresses) like a driver.
fn setup_queues(t: &mut MmioTransport<Fake>) {
    for q in 0..2u32 {
        w(t, VIRTIO_MMIO_QUEUE_SEL, q);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        let base = 0x1_0000 * (q + 1);
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
        w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(t, VIRTIO_MMIO_QUEUE_READY), 1);
    }
}

fn negotiate(t: &mut MmioTransport<Fake>, features: u64) {
    w(t, VIRTIO_MMIO_STATUS, 1);
    w(t, VIRTIO_MMIO_STATUS, 1 | 2);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
    w(t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
}

#[test]
fn identification_registers() {
    let (mut t, _) = transport();
    assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 1);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1");
    let mut cfg = [0u8; 2];
    t.read(0, 0x104, &mut cfg);
    assert_eq!(cfg, [4, 4], "config space at 0x100");
}

#[test]
fn negotiation_requires_version_1_and_offered_features() {
    let (mut t, _) = transport();
    negotiate(&mut t, 1 << 1);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS) & 8,
        0,
        "no VERSION_1: FEATURES_OK refused"
    );
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 5);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS) & 8,
        0,
        "unoffered feature refused"
    );
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & 8, 8);
}

#[test]
fn driver_ok_activates_and_notifications_reach_the_device() {
    let (mut t, irq) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 1);
    setup_queues(&mut t);
    w(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    assert!(t.is_active());
    assert_eq!(t.device().activated, Some(VIRTIO_F_VERSION_1 | 1 << 1));
    t.notify(1);
    t.notify(7); // out of range: ignored
    assert_eq!(t.device().notified, vec![1]);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    // A trapped QueueNotify write is forwarded to the queue's eventfd.
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
}

#[test]
fn driver_ok_with_bad_queue_fails_the_device() {
    let (mut t, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_f000); // outside memory
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    w(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    assert!(!t.is_active());
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & 0x40, 0, "NEEDS_RESET");
    assert_ne!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG, 0);
}

#[test]
fn device_failure_sets_needs_reset_and_reset_recovers() {
    let (mut t, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queues(&mut t);
    w(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    t.device.fail_next = true;
    t.notify(0);
    assert!(!t.is_active());
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & 0x40, 0);
    t.notify(0); // ignored while failed
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(t.device().resets, 1);
    t.device.fail_next = false;
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queues(&mut t);
    w(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    assert!(t.is_active());
}

#[test]
fn odd_accesses_are_harmless() {
    let (mut t, _) = transport();
    let mut b = [0xffu8; 2];
    t.read(0, 0x70, &mut b);
    assert_eq!(b, [0, 0]);
    t.write(0, 0x70, &[1, 2]);
    t.write(0, 0x100, &[1, 2, 3, 4]);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 9);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
    assert_eq!(r(&mut t, 0xf0), 0, "reserved register reads zero");
}

#[test]
fn aml_and_cmdline() {
    let mut v = Vec::new();
    VirtioMmioAml {
        index: 0,
        base: 0xd000_0000,
        gsi: 10,
    }
    .to_aml_bytes(&mut v);
    assert!(v.windows(8).any(|w| w == b"LNRO0005"));
    assert!(v.windows(4).any(|w| w == b"VR00"));
    assert_eq!(
        cmdline_device(0xd000_0000, 10),
        "virtio_mmio.device=4K@0xd0000000:10"
    );
}

#[test]
fn no_shared_memory_region_exists() {
    let (mut t, _irq) = transport();
    w(&mut t, SHM_SEL, 0);
    for reg in [0x0b0, 0x0b4, 0x0b8, 0x0bc] {
        assert_eq!(r(&mut t, reg), u32::MAX, "register {reg:#x}");
    }
}

/// Waits (bounded) for the transport's poll timer to fire.
fn poll_timer_fires(t: &MmioTransport<Fake>, within_ms: i32) -> bool {
    let mut fds = [libc::pollfd {
        fd: t.poll_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd for the length given.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, within_ms) };
    n == 1
}

#[test]
fn a_polling_device_gets_its_queue_processed_when_the_timer_fires() {
    let (mut t, _irq) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 1);
    setup_queues(&mut t);
    w(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    assert!(
        !poll_timer_fires(&t, 20),
        "no timer before the device polls"
    );
    t.notify(1);
    assert!(
        poll_timer_fires(&t, 5000),
        "the device polls: the timer fires"
    );
    t.poll_due();
    assert_eq!(
        t.device().notified,
        vec![1, 0],
        "the polled queue processed"
    );
    assert!(
        !poll_timer_fires(&t, 20),
        "the device stopped polling: no more timer"
    );
    // A spurious wake-up is harmless (the timer is non-blocking).
    t.poll_due();
    assert_eq!(t.device().notified, vec![1, 0]);
    // A reset while polling disarms the timer.
    t.notify(1);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!poll_timer_fires(&t, 20), "reset: no timer");
}
