//! Command line of `minivmm run`. The flag names are a contract.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::cli::{parse_cpus, parse_size, parse_timeout};
use crate::config::{Endpoint, SerialBackend};

const RUN_AFTER_HELP: &str = "\
Exit status:
  the command's own status
  128+N  the command was killed by signal N
  127    the command was not found      126  it is not executable
  124    --timeout expired
  125    the VM failed before the command finished (kernel panic, KVM error,
         the guest powered off or rebooted, the init could not start)
  2      bad command line

The command runs as root in a fresh guest whose root filesystem is an initramfs
minivmm makes (no tools needed on the host): its own static init, the files of
--initrd IMG (its /init is not run), of each --add, and the kernel modules the
channel needs. Its stdout and stderr stream live to minivmm's stdout and
stderr, byte for byte; minivmm's stdin is its stdin. The kernel's console goes
nowhere unless --verbose (stderr) or --serial file:PATH. With --host-root the
command sees the host's files instead (read-only, but for the current
directory); --share mounts more host directories in either case.

Examples:
  minivmm run --kernel /boot/vmlinuz-$(uname -r) -- uname -r
  minivmm run --kernel bzImage --add ./my-test -- ./my-test --quick
  minivmm run --kernel bzImage --host-root -- ./my-test --quick
  minivmm run --kernel bzImage --share ./out:/out -- sh -c 'dmesg > /out/dmesg.txt'
  minivmm run --kernel vmlinuz --initrd rootfs.cpio.gz --timeout 60 --result r.json -- sh -c 'make check'";

/// Arguments of `minivmm run`.
#[derive(Debug, Parser)]
#[command(
    name = "minivmm run",
    version,
    about = "Run a command in a fresh guest, stream its output, exit with its status",
    after_help = RUN_AFTER_HELP
)]
pub struct RunCli {
    /// Guest kernel: a bzImage or an uncompressed ELF vmlinux. It needs
    /// virtio-mmio and virtio-console, built in or as modules (see --modules).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// A cpio initrd (optionally gzip-compressed) whose files become the guest's
    /// root filesystem; its /init is not run.
    #[arg(long, value_name = "IMG")]
    pub initrd: Option<PathBuf>,

    /// The kernel's modules tree (holding modules.dep, as depmod leaves it);
    /// default /lib/modules/VERSION, VERSION read from the kernel image. The
    /// modules the channel needs (virtio_mmio, virtio_console) are packed with
    /// their dependencies.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,

    /// Put a host file or directory into the guest at GUEST (default: the same
    /// absolute path); repeatable. A dynamically linked program brings its
    /// interpreter and shared libraries.
    #[arg(long = "add", value_name = "HOST[:GUEST]")]
    pub add: Vec<String>,

    /// Mount host directory HOSTDIR at GUESTPATH before the command starts
    /// (virtio-fs, served by a virtiofsd minivmm starts and stops); `:ro`
    /// makes it read-only; repeatable. The kernel needs virtiofs (built in,
    /// or the virtiofs module, which is packed).
    #[arg(long, value_name = "HOSTDIR:GUESTPATH[:ro]")]
    pub share: Vec<crate::share::ShareSpec>,

    /// Run the command in the host's own userspace: the host's `/` read-only
    /// as its root (with fresh /proc, /sys, /dev, /tmp and /run) and the
    /// current directory read-write at the same path, where the command
    /// starts (so `-- ./my-test` runs the host's ./my-test against the kernel).
    #[arg(long, conflicts_with_all = ["initrd", "add"])]
    pub host_root: bool,

    /// The virtiofsd to run for --share and --host-root (default: the first
    /// of /usr/libexec/virtiofsd, /usr/lib/qemu/virtiofsd, /usr/lib/virtiofsd;
    /// Debian 12 has it in the qemu-system-common package).
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,

    /// Write the verdict, statuses and timings as one JSON object to FILE.
    #[arg(long, value_name = "FILE")]
    pub result: Option<PathBuf>,

    /// Stop the VM after this many seconds (counted from when the VM is built,
    /// its initramfs loaded): exit status 124.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<u64>,

    /// Guest RAM, e.g. 512M, 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub memory: u64,

    /// Number of vcpus (1-254).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_cpus)]
    pub cpus: u8,

    /// More kernel command-line arguments, after minivmm's own: "console=ttyS0
    /// panic=-1 cryptomgr.notests" and "quiet" unless --verbose (a later
    /// argument wins: "cryptomgr.notests=0" runs the crypto self-tests).
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub append: String,

    /// Serve QMP on "unix:PATH" or "tcp:HOST:PORT" (repeatable), as without run.
    #[arg(long, value_name = "ENDPOINT")]
    pub qmp: Vec<Endpoint>,

    /// Show the kernel's log on stderr: its console (without `quiet`), or
    /// with --serial file:PATH the log records the init forwards.
    #[arg(long)]
    pub verbose: bool,

    /// Where the kernel's console goes: "file:PATH" or "none" (default: none,
    /// or stderr with --verbose).
    #[arg(long, value_name = "BACKEND")]
    pub serial: Option<SerialBackend>,

    /// Add QEMU's isa-debug-exit at port 0xf4: a guest write of V ends the run
    /// with status (V << 1) | 1.
    #[arg(long)]
    pub isa_debug_exit: bool,

    /// The command and its arguments, after `--`; looked up in the guest's PATH.
    #[arg(last = true, value_name = "CMD", required = true, num_args = 1..)]
    pub command: Vec<OsString>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunCli, clap::Error> {
        RunCli::try_parse_from(std::iter::once("minivmm run").chain(args.iter().copied()))
    }

    #[test]
    fn flags_and_command() {
        let c = parse(&[
            "--kernel",
            "k",
            "--add",
            "/a",
            "--add",
            "./b:/c",
            "--timeout",
            "5",
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("k"));
        assert_eq!(c.add, ["/a", "./b:/c"]);
        assert_eq!(c.timeout, Some(5));
        assert_eq!(c.command, ["sh", "-c", "exit 7"]);
        assert_eq!(c.memory, 512 << 20);
        assert!(!c.verbose);
    }

    #[test]
    fn a_command_is_required() {
        let e = parse(&["--kernel", "k"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(parse(&["--kernel", "k", "--"]).is_err());
        assert!(parse(&["--", "true"]).is_err(), "--kernel is required");
    }
}
