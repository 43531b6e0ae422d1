//! virtio-console with VIRTIO_CONSOLE_F_MULTIPORT, carrying one named port for the
//! QEMU guest agent.
//!
//! Queues: 0/1 receive/transmit of port 0 (reserved for a console, as QEMU does;
//! never added), 2/3 control receive (host→guest) / transmit (guest→host), 4/5
//! receive/transmit of port 1, the agent port.
//!
//! Handshake (what Linux expects): the guest sends DEVICE_READY; the device sends
//! PORT_ADD for port 1; the guest answers PORT_READY; the device sends PORT_NAME
//! ("org.qemu.guest_agent.0") and PORT_OPEN (the host side is always connected:
//! the agent proxy is in-process). The guest's own PORT_OPEN messages say whether
//! a guest program has the port open.
//!
//! Host→guest data waits while the guest has the port closed; control messages
//! wait for control buffers; both are bounded. Guest mistakes (bad descriptors)
//! fail the device (NEEDS_RESET); messages for unknown ports are ignored.

use std::collections::VecDeque;

use virtio_queue::QueueT;

use super::{
    append_next_chain, complete, read_next_chain, ring_error, write_to_next_buffer, DeviceFailure,
    QueueContext, RxNotifications, VirtioDevice,
};

/// The name of the agent port.
pub const AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// VIRTIO_CONSOLE_F_MULTIPORT.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
/// Virtio device id of a console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// Host→guest bytes held while the guest is not reading.
pub const MAX_PENDING_TO_GUEST: usize = 4 << 20;
/// Guest→host bytes held until the VMM collects them: past this, the device
/// stops taking the guest's transmit buffers (they wait in the ring, the
/// guest's writes block) until [`Console::take_from_guest`] makes room. One
/// chain may cross it by up to [`MAX_CHAIN`].
pub const MAX_PENDING_FROM_GUEST: usize = 4 << 20;
/// The largest transmit chain the guest may post; a larger one fails the device.
pub const MAX_CHAIN: usize = 1 << 20;
/// The queue of the agent port's guest→host data: notify it again once
/// [`Console::tx_stalled`] and the host took the pending bytes.
pub const AGENT_TX_QUEUE: usize = TX1;
/// While the guest keeps writing, how long the device lets its buffers
/// gather before it takes them (see [`Console`]'s transmit polling).
pub const TX_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);
const MAX_PENDING_CONTROL: usize = 64;
const QUEUE_SIZE: u16 = 256;
const PORTS: u32 = 2;
const AGENT_PORT: u32 = 1;

const RX0: usize = 0;
const TX0: usize = 1;
const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;
const RX1: usize = 4;
const TX1: usize = 5;

/// Control events (struct virtio_console_control.event).
mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const PORT_ADD: u16 = 1;
    pub const PORT_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const RESIZE: u16 = 5;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

fn control(id: u32, ev: u16, value: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&ev.to_le_bytes());
    v.extend_from_slice(&value.to_le_bytes());
    v
}

/// The console device.
#[derive(Debug)]
pub struct Console {
    name: String,
    port_added: bool,
    guest_open: bool,
    to_guest: VecDeque<u8>,
    from_guest: Vec<u8>,
    control_out: VecDeque<Vec<u8>>,
    port_changes: Vec<bool>,
    /// The guest's transmit buffers wait for room in `from_guest`.
    tx_stalled: bool,
    /// The guest was told not to notify the transmit queue: the device
    /// looks at it every [`TX_POLL_INTERVAL`] instead, while data flows.
    tx_polling: bool,
    /// Transmit buffers read but not yet given back (see `transmit`).
    tx_held: Vec<u16>,
    /// Notifications of the agent port's receive buffers.
    rx: RxNotifications,
    /// Notifications of the control receive buffers.
    ctrl_rx: RxNotifications,
}

impl Default for Console {
    fn default() -> Self {
        Self::new(AGENT_PORT_NAME)
    }
}

impl Console {
    /// A console whose port 1 is called `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            port_added: false,
            guest_open: false,
            to_guest: VecDeque::new(),
            from_guest: Vec::new(),
            control_out: VecDeque::new(),
            port_changes: Vec::new(),
            tx_stalled: false,
            tx_polling: false,
            tx_held: Vec::new(),
            rx: RxNotifications::default(),
            ctrl_rx: RxNotifications::default(),
        }
    }

    /// Whether a guest program has the port open.
    pub fn guest_open(&self) -> bool {
        self.guest_open
    }

    /// Open/close changes of the guest side since the last call, in order.
    pub fn take_port_changes(&mut self) -> Vec<bool> {
        std::mem::take(&mut self.port_changes)
    }

    /// Bytes the guest wrote to the port since the last call.
    pub fn take_from_guest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.from_guest)
    }

    /// Whether guest transmit buffers may wait because the host had not taken
    /// what the guest wrote: after [`Self::take_from_guest`], notify
    /// [`AGENT_TX_QUEUE`] to resume.
    pub fn tx_stalled(&self) -> bool {
        self.tx_stalled
    }

    /// Bytes waiting to reach the guest.
    pub fn pending_to_guest(&self) -> usize {
        self.to_guest.len()
    }

    /// Queues `data` for the guest and delivers what the guest's buffers take;
    /// returns how many bytes were accepted (the rest would exceed the bound).
    pub fn send_to_guest(
        &mut self,
        data: &[u8],
        ctx: &mut QueueContext,
    ) -> Result<usize, DeviceFailure> {
        let room = MAX_PENDING_TO_GUEST.saturating_sub(self.to_guest.len());
        let n = room.min(data.len());
        self.to_guest.extend(&data[..n]);
        self.flush_rx(ctx)?;
        Ok(n)
    }

    /// Drops host→guest bytes not yet delivered (the host side lost its peer).
    pub fn discard_to_guest(&mut self) {
        self.to_guest.clear();
    }

    fn queue_control(&mut self, msg: Vec<u8>) {
        if self.control_out.len() >= MAX_PENDING_CONTROL {
            log_ratelimit::warn_limited!(
                "virtio-console: control queue full; dropping a control message"
            );
            return;
        }
        self.control_out.push_back(msg);
    }

    fn flush_control(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        let mut used = false;
        loop {
            while let Some(msg) = self.control_out.front() {
                let Some(n) = write_to_next_buffer(ctx.mem, &mut ctx.queues[CTRL_RX], msg)? else {
                    break;
                };
                if n < msg.len() {
                    log_ratelimit::warn_limited!(
                        "virtio-console: control buffer too small ({n} < {})",
                        msg.len()
                    );
                }
                self.control_out.pop_front();
                used = true;
            }
            let waiting = !self.control_out.is_empty();
            if !self
                .ctrl_rx
                .update(ctx.mem, &mut ctx.queues[CTRL_RX], waiting)?
            {
                break;
            }
        }
        if used {
            ctx.notify_used(CTRL_RX);
        }
        Ok(())
    }

    /// Delivers host bytes into the guest's receive buffers.
    ///
    /// The guest's notifications of new receive buffers matter only while
    /// bytes wait for one: otherwise the device asks for none, which saves
    /// the guest an exit for each buffer it gives back after a read.
    fn flush_rx(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        if !self.guest_open {
            return Ok(());
        }
        let mut used = false;
        loop {
            while !self.to_guest.is_empty() {
                let (a, b) = self.to_guest.as_slices();
                let chunk: Vec<u8> = if a.len() >= 64 * 1024 || b.is_empty() {
                    a[..a.len().min(64 * 1024)].to_vec()
                } else {
                    a.iter().chain(b.iter()).take(64 * 1024).copied().collect()
                };
                let Some(n) = write_to_next_buffer(ctx.mem, &mut ctx.queues[RX1], &chunk)? else {
                    break;
                };
                self.to_guest.drain(..n);
                used = true;
            }
            let waiting = !self.to_guest.is_empty();
            if !self.rx.update(ctx.mem, &mut ctx.queues[RX1], waiting)? {
                break;
            }
        }
        if used {
            // One interrupt for both: the request, and the buffers of the
            // last reply (held since, see `transmit`).
            if self.return_held(ctx)? {
                ctx.notify_used(TX1);
            }
            ctx.notify_used(RX1);
            if self.tx_polling {
                self.stop_polling(ctx)?;
            }
        }
        Ok(())
    }

    /// Takes the agent port's transmit buffers.
    ///
    /// Batching (the guest writes a reply of a megabyte in thousands of
    /// small writes; a notification and an interrupt for each cost it three
    /// exits): once a notification brings data, the device asks the guest
    /// for no more notifications (`VRING_USED_F_NO_NOTIFY`) and looks at the
    /// queue every [`TX_POLL_INTERVAL`] instead. A look that finds nothing,
    /// or host data for the guest (a new request: its reply should not wait
    /// for a poll), turns notifications back on.
    ///
    /// The bytes are taken at once, but the buffers go back to the guest
    /// later, many with one interrupt: when half the ring is out, when the
    /// guest stops writing (a look that finds nothing), or with the next
    /// host data for the guest. The guest's writes never wait for them
    /// (Linux's port writes wait only for a full ring), a stream costs an
    /// interrupt per half ring instead of one per write, and an agent's
    /// reply costs none of its own: the next request's carries its buffers
    /// back.
    fn transmit(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        let mut returned = false;
        let mut took = false;
        // Back-pressure, never a loss: past the bound, the guest's
        // buffers stay in the ring until the host takes its bytes.
        self.tx_stalled = false;
        loop {
            if self.from_guest.len() >= MAX_PENDING_FROM_GUEST {
                self.tx_stalled = true;
                break;
            }
            let Some(head) = append_next_chain(
                ctx.mem,
                &mut ctx.queues[TX1],
                MAX_CHAIN,
                &mut self.from_guest,
            )?
            else {
                break;
            };
            self.tx_held.push(head);
            took = true;
            if self.tx_held.len() >= usize::from(ctx.queues[TX1].size() / 2).max(1) {
                // Half the ring out: the guest's writes would soon wait.
                returned |= self.return_held(ctx)?;
            }
        }
        let flowing = took && !self.tx_stalled;
        if !flowing {
            returned |= self.return_held(ctx)?;
        }
        if returned {
            ctx.notify_used(TX1);
        }
        if flowing {
            if !self.tx_polling {
                ctx.queues[TX1]
                    .disable_notification(ctx.mem)
                    .map_err(ring_error)?;
                self.tx_polling = true;
            }
            Ok(())
        } else if self.tx_polling {
            // A stall resumes with the host's notify, not a poll.
            self.stop_polling(ctx)
        } else {
            Ok(())
        }
    }

    /// Gives the guest back the transmit buffers taken but not yet returned;
    /// whether there were any (the caller notifies).
    fn return_held(&mut self, ctx: &mut QueueContext) -> Result<bool, DeviceFailure> {
        if self.tx_held.is_empty() {
            return Ok(false);
        }
        for head in self.tx_held.drain(..) {
            complete(ctx.mem, &mut ctx.queues[TX1], head)?;
        }
        Ok(true)
    }

    /// Turns the guest's transmit notifications back on; takes what it
    /// posted while they were off.
    fn stop_polling(&mut self, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        self.tx_polling = false;
        let pending = ctx.queues[TX1]
            .enable_notification(ctx.mem)
            .map_err(ring_error)?;
        if pending && !self.tx_stalled {
            self.transmit(ctx)?;
        }
        Ok(())
    }

    fn handle_control(&mut self, msg: &[u8]) {
        if msg.len() < 8 {
            log::debug!(
                "virtio-console: short control message ({} bytes)",
                msg.len()
            );
            return;
        }
        let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let ev = u16::from_le_bytes([msg[4], msg[5]]);
        let value = u16::from_le_bytes([msg[6], msg[7]]);
        match ev {
            event::DEVICE_READY => {
                if value != 1 {
                    log_ratelimit::warn_limited!(
                        "virtio-console: the guest driver failed to initialise"
                    );
                    return;
                }
                if !self.port_added {
                    self.port_added = true;
                    self.queue_control(control(AGENT_PORT, event::PORT_ADD, 0));
                }
            }
            event::PORT_READY if id == AGENT_PORT => {
                if value != 1 {
                    log_ratelimit::warn_limited!(
                        "virtio-console: the guest could not add port {id}"
                    );
                    return;
                }
                let mut name = control(AGENT_PORT, event::PORT_NAME, 1);
                name.extend_from_slice(self.name.as_bytes());
                self.queue_control(name);
                self.queue_control(control(AGENT_PORT, event::PORT_OPEN, 1));
            }
            event::PORT_OPEN if id == AGENT_PORT => {
                let open = value == 1;
                if open != self.guest_open {
                    self.guest_open = open;
                    self.port_changes.push(open);
                }
            }
            event::PORT_READY | event::PORT_OPEN => {
                log_ratelimit::warn_limited!(
                    "virtio-console: control message for unknown port {id} ignored"
                );
            }
            event::PORT_ADD
            | event::PORT_REMOVE
            | event::CONSOLE_PORT
            | event::RESIZE
            | event::PORT_NAME => {
                log::debug!("virtio-console: guest sent host-only control event {ev}");
            }
            other => log::debug!("virtio-console: unknown control event {other}"),
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 6]
    }

    fn features(&self) -> u64 {
        VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_console_config { u16 cols; u16 rows; u32 max_nr_ports; u32 emerg_wr; }
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&PORTS.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, features: u64, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        if features & VIRTIO_CONSOLE_F_MULTIPORT == 0 {
            return Err(DeviceFailure(
                "the driver did not accept VIRTIO_CONSOLE_F_MULTIPORT".into(),
            ));
        }
        // Nothing waits for the guest yet: it need not notify the receive
        // buffers it is about to add (hundreds of them).
        self.ctrl_rx
            .update(ctx.mem, &mut ctx.queues[CTRL_RX], false)?;
        self.rx.update(ctx.mem, &mut ctx.queues[RX1], false)?;
        Ok(())
    }

    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        match index {
            CTRL_TX => {
                let mut any = false;
                while let Some((head, msg)) =
                    read_next_chain(ctx.mem, &mut ctx.queues[CTRL_TX], 4096)?
                {
                    self.handle_control(&msg);
                    complete(ctx.mem, &mut ctx.queues[CTRL_TX], head)?;
                    any = true;
                }
                if any {
                    ctx.notify_used(CTRL_TX);
                }
                self.flush_control(ctx)?;
                self.flush_rx(ctx)
            }
            TX1 => self.transmit(ctx),
            TX0 => {
                // Port 0 was never added: discard anything sent on it.
                let mut any = false;
                while let Some((head, _)) =
                    read_next_chain(ctx.mem, &mut ctx.queues[TX0], MAX_CHAIN)?
                {
                    complete(ctx.mem, &mut ctx.queues[TX0], head)?;
                    any = true;
                }
                if any {
                    ctx.notify_used(TX0);
                }
                Ok(())
            }
            CTRL_RX => self.flush_control(ctx),
            RX1 => self.flush_rx(ctx),
            RX0 => Ok(()),
            _ => Ok(()),
        }
    }

    fn polling(&self) -> Option<(usize, std::time::Duration)> {
        self.tx_polling.then_some((TX1, TX_POLL_INTERVAL))
    }

    fn report(&self) -> Option<String> {
        Some(format!(
            "port open by the guest {}, {} bytes from the guest not yet taken (transmit stalled {}, polled {}, {} buffers held), {} bytes and {} control messages waiting for the guest",
            self.guest_open,
            self.from_guest.len(),
            self.tx_stalled,
            self.tx_polling,
            self.tx_held.len(),
            self.to_guest.len(),
            self.control_out.len()
        ))
    }

    fn reset(&mut self) {
        let name = std::mem::take(&mut self.name);
        let was_open = self.guest_open;
        *self = Console::new(&name);
        if was_open {
            self.port_changes.push(false);
        }
    }
}

#[cfg(test)]
mod tests;
