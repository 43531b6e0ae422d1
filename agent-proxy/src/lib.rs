//! Host side of the guest-agent (qemu-ga) channel for minivmm.
//!
//! This crate will hold the agent proxy: the qga-compatible client sockets, request
//! routing between clients (and QMP) and the agent in the guest, channel
//! synchronisation with `guest-sync-delimited`, and timeouts. It is filled by the
//! "Guest-agent channel" work; until then it deliberately contains no code.
