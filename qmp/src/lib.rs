//! QMP — the QEMU Machine Protocol — for minivmm.
//!
//! - [`stream`]: splits a byte stream into JSON messages as QEMU does;
//! - [`protocol`]: requests, replies, errors and events in QEMU's wire format;
//! - [`conn`]: non-blocking client connections (owner-only Unix and TCP
//!   listeners, framed input, bounded output, epoll interest, graceful close),
//!   shared by the QMP server and the guest-agent proxy;
//! - [`server`]: Unix and TCP endpoints serving many clients each, with
//!   per-client capability negotiation and bounded buffers. Commands are
//!   executed, in order, by a [`server::Handler`] the VMM provides.
//!
//! With the `fuzzing` feature, `fuzzing` holds the property harnesses of the
//! cargo-fuzz targets in `fuzz/` (the JSON streamer, QMP dispatch).

pub mod conn;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod protocol;
pub mod server;
pub mod stream;
