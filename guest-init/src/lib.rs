//! `minivmm-init`: the init (PID 1) of a `minivmm run` guest.
//!
//! `minivmm run` boots a kernel with an initramfs it generates: this program as
//! `/init`, the run spec at [`run_protocol::SPEC_PATH`], kernel modules and the
//! user's files. The init then:
//!
//! 1. mounts `/proc`, `/sys`, `/dev` (devtmpfs), `/dev/pts`, `/dev/shm`,
//!    `/tmp` and `/run` ([`mounts`]);
//! 2. watches `/dev` for new nodes ([`port::DevWatch`]), reads the spec and
//!    loads the modules in order ([`modules`]);
//! 3. waits for the virtio-console port named [`run_protocol::PORT_NAME`],
//!    opens it and sends `READY` ([`port`]);
//! 4. starts the command ([`command`]), sends `STARTED` and relays its stdin,
//!    stdout and stderr and the kernel log until it exits ([`pump`]);
//! 5. sends `EXIT`, syncs and powers the machine off.
//!
//! Any failure ends the same way: a line in the kernel log and on the console,
//! `EXIT` with [`run_protocol::Exit::InitFailed`] if the port is open, power
//! off. PID 1 never returns from `main` (that would panic the kernel).
//!
//! The binary is linked statically (see `vmm/build.rs`). Rust's runtime needs
//! file descriptors 0-2 open before `main` (it aborts if it cannot open
//! `/dev/null` for a closed one), so the initramfs must hold `/dev/console`,
//! which the kernel opens for them.

pub mod command;
pub mod kmsg;
pub mod log;
pub mod modules;
pub mod mounts;
pub mod port;
pub mod pump;
pub mod reaper;
mod sys;

#[cfg(test)]
mod testutil;
