//! `minivmm run`: boot a kernel with a generated initramfs and run one command
//! in it, streaming its output and exiting with its status.
//!
//! * [`cli`]: the command line (`minivmm run --help`);
//! * [`initramfs`]: the initramfs made in process (the init, the spec, modules,
//!   `--initrd` and `--add` files with their libraries);
//! * [`init`]: the guest-side init (crate `minivmm-guest-init`), built static
//!   and embedded;
//! * [`link`]: the host side of the channel (a virtio-console port);
//! * [`klog`]: the kernel log excerpt for a failed run's diagnostics;
//! * [`verdict`]: how the run ended, minivmm's status, the `--result` file;
//! * [`runner`]: puts them together.

pub mod cli;
pub mod init;
pub mod initramfs;
pub mod klog;
pub mod link;
pub mod runner;
pub mod verdict;
