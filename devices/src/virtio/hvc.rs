//! A virtio console with one port and no MULTIPORT: Linux makes that port a
//! console, `hvc0` (what QEMU's `virtconsole` gives the guest). minivmm's
//! `--console virtio`.
//!
//! Queues: 0 receive (host→guest), 1 transmit (guest→host).
//!
//! Why: every byte a guest writes to the 16550 is a VM exit; the guest's tty
//! layer hands hvc up to a page per notification (the kernel's own console
//! messages go in pieces of up to 16 bytes), so the same output costs a small
//! fraction of the exits.
//!
//! Guest output goes to the same bounded host output as the 16550's
//! ([`GuestOutput`]): the guest never waits for the host; what does not fit is
//! dropped and counted, as for the UART. Host input waits in an [`HvcInput`],
//! which outlives the VM (a rebuilt VM's console gets what was typed
//! meanwhile), and goes into the guest's receive buffers as the guest posts
//! them.

use std::collections::VecDeque;
use std::io;
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::console::VIRTIO_ID_CONSOLE;
use super::{
    complete, read_next_chain, write_to_next_buffer, DeviceFailure, QueueContext, RxNotifications,
    VirtioDevice,
};
use crate::output::GuestOutput;

/// Host input held for the guest; [`HvcInput::enqueue`] takes no more.
pub const MAX_INPUT: usize = 4096;
/// The largest transmit chain the guest may post; a larger one fails the device.
pub const MAX_CHAIN: usize = 1 << 20;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Host input for the console, kept across VM rebuilds.
#[derive(Debug)]
pub struct HvcInput {
    held: Mutex<VecDeque<u8>>,
    /// Signalled when the device took input (there is room again).
    ready: EventFd,
    /// Signalled when input arrives (the VMM thread hands it to the device).
    pending: EventFd,
}

impl HvcInput {
    /// Empty, with fresh non-blocking eventfds.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            held: Mutex::new(VecDeque::new()),
            ready: EventFd::new(EFD_NONBLOCK)?,
            pending: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn held(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds as much of `data` as fits in [`MAX_INPUT`]; returns how much.
    pub fn enqueue(&self, data: &[u8]) -> usize {
        let mut held = self.held();
        let n = MAX_INPUT.saturating_sub(held.len()).min(data.len());
        held.extend(&data[..n]);
        if n > 0 {
            let _ = self.pending.write(1);
        }
        n
    }

    /// Bytes held for the guest.
    pub fn len(&self) -> usize {
        self.held().len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fires when the guest took input.
    pub fn ready(&self) -> &EventFd {
        &self.ready
    }

    /// Fires when input arrived for the guest.
    pub fn pending(&self) -> &EventFd {
        &self.pending
    }
}

/// The console device.
pub struct Hvc {
    out: GuestOutput,
    input: std::sync::Arc<HvcInput>,
    rx: RxNotifications,
}

impl std::fmt::Debug for Hvc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hvc").field("input", &self.input).finish()
    }
}

impl Hvc {
    /// A console writing to `out` and reading from `input`.
    pub fn new(out: GuestOutput, input: std::sync::Arc<HvcInput>) -> Self {
        Self {
            out,
            input,
            rx: RxNotifications::default(),
        }
    }

    /// Moves held input into the guest's receive buffers.
    fn flush_input(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        let mut moved = self.deliver(ctx)?;
        // Keyboard input is rare: the guest's new buffers need no
        // notification unless input waits for one.
        loop {
            let waiting = !self.input.held().is_empty();
            if !self.rx.update(ctx.mem, &mut ctx.queues[RX], waiting)? {
                break;
            }
            moved |= self.deliver(ctx)?;
        }
        if moved {
            ctx.notify_used(RX);
            let _ = self.input.ready.write(1);
        }
        Ok(())
    }

    /// Fills the guest's receive buffers with held input; whether any moved.
    fn deliver(&mut self, ctx: &mut QueueContext) -> Result<bool, DeviceFailure> {
        let mut moved = false;
        loop {
            let chunk: Vec<u8> = {
                let held = self.input.held();
                if held.is_empty() {
                    break;
                }
                held.iter().copied().collect()
            };
            let Some(n) = write_to_next_buffer(ctx.mem, &mut ctx.queues[RX], &chunk)? else {
                break;
            };
            self.input.held().drain(..n);
            moved = true;
        }
        Ok(moved)
    }

    fn take_output(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        let mut any = false;
        while let Some((head, data)) = read_next_chain(ctx.mem, &mut ctx.queues[TX], MAX_CHAIN)? {
            self.out.push(&data);
            complete(ctx.mem, &mut ctx.queues[TX], head)?;
            any = true;
        }
        if any {
            ctx.notify_used(TX);
        }
        Ok(())
    }
}

impl VirtioDevice for Hvc {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        // Neither MULTIPORT (one port, a console) nor SIZE (no window size).
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // struct virtio_console_config: nothing valid without SIZE or MULTIPORT.
        data.fill(0);
    }

    fn activate(&mut self, _features: u64, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        // Input held from before the driver came waits for its buffers.
        self.flush_input(ctx)
    }

    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        match index {
            RX => self.flush_input(ctx),
            TX => self.take_output(ctx),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        // Held input waits for the next driver.
        self.rx = RxNotifications::default();
    }
}

#[cfg(test)]
mod tests {
    use crate::virtio::INT_VRING;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::virtio::mock_guest::{mem, Guest};

    /// A host output into a socket, and the socket's other end.
    fn output() -> (GuestOutput, UnixStream) {
        let (r, w) = UnixStream::pair().unwrap();
        (GuestOutput::new(Box::new(w), 1 << 16).unwrap(), r)
    }

    #[test]
    fn a_console_without_multiport() {
        let (out, _r) = output();
        let d = Hvc::new(out, Arc::new(HvcInput::new().unwrap()));
        assert_eq!(d.device_type(), 3);
        assert_eq!(d.features(), 0, "no MULTIPORT: Linux makes port 0 hvc0");
        assert_eq!(d.queue_max_sizes().len(), 2);
        let mut cfg = [0xffu8; 12];
        d.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 12]);
    }

    #[test]
    fn guest_output_reaches_the_host_output_in_order() {
        let m = mem();
        let mut g = Guest::with_queues(&m, 2);
        let (out, mut r) = output();
        let mut d = Hvc::new(out.clone(), Arc::new(HvcInput::new().unwrap()));
        d.activate(0, &mut g.ctx()).unwrap();
        g.send(TX, b"Linux version ");
        g.send(TX, b"6.1\n");
        d.process_queue(TX, &mut g.ctx()).unwrap();
        assert_eq!(g.used(TX).len(), 2, "both buffers given back");
        assert_ne!(g.interrupt.status() & INT_VRING, 0);
        assert!(out.drain(Instant::now() + Duration::from_secs(5)));
        let mut got = vec![0u8; 18];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got, b"Linux version 6.1\n");
    }

    #[test]
    fn input_waits_for_buffers_then_fills_them_and_says_so() {
        let m = mem();
        let mut g = Guest::with_queues(&m, 2);
        let (out, _r) = output();
        let input = Arc::new(HvcInput::new().unwrap());
        let mut d = Hvc::new(out, input.clone());
        d.activate(0, &mut g.ctx()).unwrap();
        assert!(
            !g.notifications_wanted(RX),
            "no input: the guest need not notify its buffers"
        );
        assert_eq!(input.enqueue(b"ls -l\n"), 6);
        assert_eq!(input.pending().read().unwrap(), 1, "the VMM thread is told");
        // No receive buffer yet: held, and the next buffer must be notified.
        d.process_queue(RX, &mut g.ctx()).unwrap();
        assert_eq!(input.len(), 6);
        assert!(g.notifications_wanted(RX));
        assert!(input.ready().read().is_err(), "nothing taken yet");
        // A 4-byte buffer takes 4, a second one the rest.
        let a = g.offer(RX, 4);
        d.process_queue(RX, &mut g.ctx()).unwrap();
        assert_eq!(g.used(RX), vec![(0, 4)]);
        assert_eq!(g.read(a, 4), b"ls -");
        assert_eq!(input.len(), 2);
        assert_eq!(input.ready().read().unwrap(), 1, "room again");
        let b = g.offer(RX, 64);
        d.process_queue(RX, &mut g.ctx()).unwrap();
        assert_eq!(g.used(RX), vec![(1, 2)]);
        assert_eq!(g.read(b, 2), b"l\n");
        assert!(input.is_empty());
    }

    #[test]
    fn held_input_is_bounded_and_survives_a_reset() {
        let (out, _r) = output();
        let input = Arc::new(HvcInput::new().unwrap());
        let mut d = Hvc::new(out, input.clone());
        let big = vec![b'y'; MAX_INPUT + 100];
        assert_eq!(input.enqueue(&big), MAX_INPUT);
        assert_eq!(input.enqueue(b"z"), 0, "full");
        d.reset();
        assert_eq!(input.len(), MAX_INPUT, "kept for the next driver");
    }

    #[test]
    fn an_oversized_transmit_chain_fails_the_device() {
        let m = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 4 << 20)])
            .unwrap();
        let mut g = Guest::with_queues(&m, 2);
        let (out, _r) = output();
        let mut d = Hvc::new(out, Arc::new(HvcInput::new().unwrap()));
        let a = g.alloc((MAX_CHAIN + 1) as u32);
        g.add(TX, a, (MAX_CHAIN + 1) as u32, false);
        assert!(d.process_queue(TX, &mut g.ctx()).is_err());
    }
}
