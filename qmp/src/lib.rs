//! QMP — the QEMU Machine Protocol — for minivmm.
//!
//! This crate will hold the protocol (JSON stream framing, command and event types,
//! QEMU-compatible error classes) and the socket server. It is filled by the
//! "QMP server and VM lifecycle" work; until then it deliberately contains no code.
