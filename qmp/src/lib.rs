//! QMP — the QEMU Machine Protocol — for minivmm.
//!
//! - [`stream`]: splits a byte stream into JSON messages as QEMU does;
//! - [`protocol`]: requests, replies, errors and events in QEMU's wire format;
//! - [`server`]: Unix and TCP endpoints serving many clients each, with
//!   per-client capability negotiation and bounded buffers. Commands are
//!   executed, in order, by a [`server::Handler`] the VMM provides.

pub mod protocol;
pub mod server;
pub mod stream;
