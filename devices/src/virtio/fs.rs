//! virtio-fs as a vhost-user frontend: another process (virtiofsd) serves the
//! queues; this device only tells it where they are.
//!
//! On activation it sends the backend (rust-vmm's `vhost` frontend does the
//! protocol) the negotiated features, the guest memory (memfd-backed regions,
//! so the daemon can map them), and for each queue its size, ring addresses,
//! the eventfd KVM signals when the guest notifies it (the transport's
//! ioeventfd: the VMM never reads it) and the device's irqfd as the eventfd to
//! signal when it used buffers. The daemon thus raises the interrupt itself,
//! without a trip through the VMM; the interrupt status therefore always
//! reads "used ring", as it cannot be set on the way (the guest then checks
//! its queues, which costs nothing when they are empty).
//!
//! When the backend dies, the device answers the guest itself: every request
//! fails with EIO ([`orphan`]).
//!
//! Queues: 0 high priority (FUSE_INTERRUPT, FORGET), 1 the one request queue.
//! Configuration: the tag (36 bytes, NUL padded) and the number of request
//! queues.

use std::os::unix::net::UnixStream;

use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceFailure, QueueContext, VirtioDevice};
use virtio_queue::QueueT;

pub mod orphan;
use orphan::Orphan;

/// Virtio device id of a file system.
pub const VIRTIO_ID_FS: u32 = 26;
/// The longest tag the configuration space holds.
pub const MAX_TAG: usize = 36;
/// vhost-user's "protocol features" bit (a backend-protocol bit, not a virtio
/// feature: never offered to the driver).
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Virtio features the backend may offer that the driver may take: indirect
/// descriptors, event index and VERSION_1 (the backend serves the rings).
const PASSED_FEATURES: u64 = (1 << 28) | (1 << 29) | (1 << 32);
const QUEUE_SIZE: u16 = 1024;
const QUEUES: usize = 2;
const REQUEST_QUEUES: u32 = 1;
/// The event-index feature (`VIRTIO_RING_F_EVENT_IDX`).
const EVENT_IDX: u64 = 1 << 29;

/// The backend refused the setup or broke the connection.
#[derive(Debug, thiserror::Error)]
#[error("vhost-user {step}: {source}")]
pub struct VhostUserError {
    /// The request that failed.
    pub step: &'static str,
    /// What the `vhost` crate said.
    #[source]
    pub source: vhost::Error,
}

fn step(step: &'static str) -> impl Fn(vhost::Error) -> DeviceFailure {
    move |e| DeviceFailure(format!("vhost-user {step}: {e}"))
}

/// A virtio-fs device served by a vhost-user backend.
pub struct VhostUserFs {
    tag: String,
    frontend: Frontend,
    /// Virtio features the backend offers (protocol bit removed).
    backend_features: u64,
    kicks: Vec<EventFd>,
    irqfd: Option<EventFd>,
    /// Queues the backend was given (stopped on reset).
    started: Vec<usize>,
    /// The features the driver took.
    negotiated: u64,
    /// Signalled when the backend's process ended unasked.
    exit_evt: Option<EventFd>,
    /// Set once the backend is gone: the device answers the guest itself.
    orphan: Option<Orphan>,
    /// What keeps the backend alive (the daemon's process), dropped with the
    /// device.
    _owner: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("tag", &self.tag)
            .field("backend_features", &self.backend_features)
            .field("started", &self.started)
            .field("orphan", &self.orphan)
            .finish()
    }
}

impl VhostUserFs {
    /// Takes over the backend connected on `stream` and learns its features.
    pub fn new(tag: &str, stream: UnixStream) -> Result<Self, VhostUserError> {
        let frontend = Frontend::from_stream(stream, QUEUES as u64);
        let err = |step| move |source| VhostUserError { step, source };
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        Ok(Self {
            tag: tag.chars().take(MAX_TAG).collect(),
            frontend,
            backend_features: features & !VHOST_USER_F_PROTOCOL_FEATURES,
            kicks: Vec::new(),
            irqfd: None,
            started: Vec::new(),
            negotiated: 0,
            exit_evt: None,
            orphan: None,
            _owner: None,
        })
    }

    /// Keeps `evt`, which says the backend's process ended (see
    /// [`VhostUserFs::backend_exit`]).
    pub fn on_backend_exit(mut self, evt: EventFd) -> Self {
        self.exit_evt = Some(evt);
        self
    }

    /// The eventfd signalled when the backend ended unasked: the VMM then calls
    /// [`VhostUserFs::backend_gone`] and serves the queues' eventfds itself.
    pub fn backend_exit(&self) -> Option<&EventFd> {
        self.exit_evt.as_ref()
    }

    /// The backend is gone: from now on the device answers every request on
    /// its queues with EIO (the VMM must process the queues' notifications).
    pub fn backend_gone(&mut self) {
        if self.orphan.is_none() {
            self.orphan = Some(Orphan::new(QUEUES));
            self.started.clear();
        }
    }

    /// Whether the backend is gone.
    pub fn orphaned(&self) -> bool {
        self.orphan.is_some()
    }

    /// Keeps `owner` (e.g. the daemon's process) as long as the device.
    pub fn keep_alive(mut self, owner: Box<dyn Send>) -> Self {
        self._owner = Some(owner);
        self
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn stop_rings(&mut self) {
        for i in std::mem::take(&mut self.started) {
            // GET_VRING_BASE stops the ring; a dead backend has stopped anyway.
            if let Err(e) = self.frontend.get_vring_base(i) {
                log::debug!("{}: stopping queue {i}: {e}", self.tag);
            }
        }
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSED_FEATURES & !(1 << 32)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut cfg = [0u8; MAX_TAG + 4];
        cfg[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        cfg[MAX_TAG..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn attach_eventfds(&mut self, queue_evts: &[EventFd], irqfd: &EventFd) {
        self.kicks = queue_evts
            .iter()
            .filter_map(|e| e.try_clone().ok())
            .collect();
        self.irqfd = irqfd.try_clone().ok();
    }

    fn interrupts_bypass(&self) -> bool {
        true
    }

    fn activate(&mut self, features: u64, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        self.negotiated = features;
        if let Some(o) = &mut self.orphan {
            // No backend to tell: the device answers on fresh rings.
            for q in ctx.queues.iter_mut() {
                q.set_event_idx(features & EVENT_IDX != 0);
            }
            o.activated();
            return Ok(());
        }
        let (Some(irqfd), true) = (&self.irqfd, self.kicks.len() == QUEUES) else {
            return Err(DeviceFailure(format!(
                "{}: the transport's eventfds are missing",
                self.tag
            )));
        };
        let fe = &self.frontend;
        fe.set_features(features & (self.backend_features | (1 << 32)))
            .map_err(step("SET_FEATURES"))?;
        let mut regions = Vec::new();
        for r in ctx.mem.iter() {
            let info = VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|e| {
                DeviceFailure(format!(
                    "{}: guest RAM at {:#x} cannot be shared with the daemon: {e}",
                    self.tag,
                    r.start_addr().0
                ))
            })?;
            regions.push(info);
        }
        fe.set_mem_table(&regions).map_err(step("SET_MEM_TABLE"))?;
        let host = |a: u64| -> Result<u64, DeviceFailure> {
            ctx.mem
                .get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|e| DeviceFailure(format!("queue address {a:#x}: {e}")))
        };
        for (i, q) in ctx.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            fe.set_vring_num(i, q.size())
                .map_err(step("SET_VRING_NUM"))?;
            fe.set_vring_addr(i, &config)
                .map_err(step("SET_VRING_ADDR"))?;
            fe.set_vring_base(i, q.next_avail())
                .map_err(step("SET_VRING_BASE"))?;
            fe.set_vring_call(i, irqfd)
                .map_err(step("SET_VRING_CALL"))?;
            // Without protocol features the backend starts the ring here.
            fe.set_vring_kick(i, &self.kicks[i])
                .map_err(step("SET_VRING_KICK"))?;
            self.started.push(i);
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext) -> Result<(), DeviceFailure> {
        match &mut self.orphan {
            Some(o) => o.process(index, ctx, self.negotiated & EVENT_IDX != 0),
            None => {
                // The backend watches the queues' eventfds; nothing to do here.
                log::debug!("{}: queue {index} notified through the VMM", self.tag);
                Ok(())
            }
        }
    }

    fn reset(&mut self) {
        match &mut self.orphan {
            Some(o) => o.reset(),
            None => self.stop_rings(),
        }
    }

    fn report(&self) -> Option<String> {
        Some(match &self.orphan {
            Some(o) => format!(
                "backend gone: {} requests answered with EIO by the device",
                o.answered
            ),
            None => format!("served by the backend (queues {:?})", self.started),
        })
    }
}

#[cfg(test)]
mod tests;
