//! Command line of the `minivmm` binary; it produces a [`VmConfig`].
//!
//! The flag names are a contract: tests, scripts and later features rely on them.

use std::path::PathBuf;

use clap::Parser;

use crate::config::ConsoleKind;

pub use crate::config::{Endpoint, SerialBackend, VmConfig};

/// Largest memory size accepted (1 TiB); KVM and the host decide the real limit.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Largest vcpu count accepted (the MADT uses 8-bit APIC ids).
pub const MAX_CPUS: u8 = 254;

const AFTER_HELP: &str = "\
Exit status:
  0    the guest powered off (or rebooted with --no-reboot), Ctrl-A x, QMP quit
  1    the VM failed (KVM error), the guest panicked, or the VM could not start
  2    bad command line
  124  --timeout expired
  130/143  stopped by SIGINT/SIGTERM (128 + signal number)
  (V << 1) | 1  the guest wrote V to isa-debug-exit (--isa-debug-exit), as QEMU

Serial console (when stdin is a terminal):
  Ctrl-A x  quit      Ctrl-A h  help      Ctrl-A Ctrl-A  send Ctrl-A

Examples:
  minivmm --kernel vmlinuz --initrd initrd.img --append \"console=ttyS0\" --memory 1G --cpus 2
  minivmm --kernel vmlinuz --initrd initrd.img --qmp unix:/tmp/vm.qmp --name ci-7 &
  socat - UNIX-CONNECT:/tmp/vm.qmp      # then type {\"execute\":\"qmp_capabilities\"}
  minivmm --kernel vmlinuz --initrd agent-initrd.img --agent unix:/tmp/vm.qga &
  echo '{\"execute\":\"guest-ping\"}' | socat - UNIX-CONNECT:/tmp/vm.qga

Run a command in a fresh guest and exit with its status (the CI one-liner):
  minivmm run --kernel vmlinuz -- uname -r          (see minivmm run --help)

Environment: RUST_LOG=info|debug for more log lines on stderr.";

/// Command line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "minivmm",
    version,
    about = "Boot a Linux guest under KVM with a serial console",
    long_about = "minivmm boots a Linux kernel (bzImage or uncompressed ELF vmlinux) with an \
optional initrd under KVM, with the guest's first serial port (COM1, ttyS0) on this \
terminal. It exits when the guest powers off.",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Guest kernel: a bzImage (e.g. /boot/vmlinuz-*) or an uncompressed ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk loaded next to the kernel (cpio, optionally compressed).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line, passed verbatim [default: console=ttyS0, or
    /// console=hvc0 with --console virtio].
    #[arg(long, value_name = "STR")]
    pub append: Option<String>,

    /// Guest RAM; a number of bytes with an optional K, M, G or T suffix (powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub memory: u64,

    /// Number of vcpus (1-254).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_cpus)]
    pub cpus: u8,

    /// Where the guest's serial console goes: "stdio" (this terminal, input too),
    /// "file:PATH" (output appended to PATH), or "none".
    #[arg(long, value_name = "BACKEND", default_value = "stdio")]
    pub serial: SerialBackend,

    /// The guest's own console: "serial" (the 16550, ttyS0) or "virtio" (a
    /// virtio console, hvc0, as QEMU's virtconsole: the same output costs a
    /// small fraction of the VM exits). With "virtio" console input goes to
    /// hvc0 and its output where --serial says, with the 16550's; the guest
    /// needs virtio_mmio and virtio_console, built in or loaded by its initrd
    /// (Linux prints nothing on hvc0 from before: add console=ttyS0 to see
    /// early boot too).
    #[arg(long, value_name = "KIND", value_enum, default_value_t = ConsoleKind::Serial)]
    pub console: ConsoleKind,

    /// Name of the VM, used in log lines.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// UUID of the VM (e.g. 12345678-1234-1234-1234-123456789abc).
    #[arg(long, value_name = "UUID", value_parser = parse_uuid)]
    pub uuid: Option<String>,

    /// When the guest reboots, exit with status 0 instead of booting it again.
    #[arg(long)]
    pub no_reboot: bool,

    /// Stop the VM and exit with status 124 after this many seconds (counted
    /// from when the VM is built); where each vcpu was (its registers) goes to
    /// stderr.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<u64>,

    /// Serve QMP (the QEMU Machine Protocol) on "unix:PATH" or "tcp:HOST:PORT";
    /// repeatable, many clients per endpoint. QMP has no authentication: a Unix
    /// socket is created owner-only; TCP listens on exactly the address given.
    /// QEMU's ",server,nowait" suffix is accepted (it is what minivmm does).
    #[arg(long, value_name = "ENDPOINT")]
    pub qmp: Vec<Endpoint>,

    /// Start with the vcpus stopped (QMP state "prelaunch"); QMP "cont" starts
    /// them. Needs --qmp.
    #[arg(long, requires = "qmp")]
    pub paused: bool,

    /// Guest-agent channel: a virtio-console port named org.qemu.guest_agent.0 for
    /// qemu-ga in the guest, and a qga-compatible socket at "unix:PATH" for host
    /// clients (what they would send to qemu-ga through QEMU works unchanged).
    /// `guest-*` commands also work on every QMP socket.
    #[arg(long, value_name = "unix:PATH", value_parser = parse_agent)]
    pub agent: Option<PathBuf>,

    /// Seconds to wait for the guest agent's reply before failing the request.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = parse_timeout)]
    pub agent_timeout: u64,

    /// Also describe virtio-mmio devices on the kernel command line
    /// (virtio_mmio.device=4K@ADDR:IRQ), for kernels built with
    /// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES. Off by default: stock distro kernels find
    /// them through ACPI, and listing them twice would add them twice.
    #[arg(long)]
    pub virtio_mmio_cmdline: bool,

    /// When the guest powers off, panics or fails, keep the process (and QMP)
    /// alive in state "shutdown", "guest-panicked" or "internal-error" instead of
    /// exiting; QMP "system_reset" then "cont" boots it again.
    #[arg(long)]
    pub no_shutdown: bool,

    /// Add QEMU's isa-debug-exit device at I/O port 0xf4 (4 ports): a guest
    /// write of value V ends minivmm with exit status (V << 1) | 1, as QEMU's
    /// `-device isa-debug-exit,iobase=0xf4,iosize=0x04` (e.g. `outb 3` → 7), so
    /// test images written for QEMU work unchanged.
    #[arg(long)]
    pub isa_debug_exit: bool,

    /// Share host directory HOSTDIR with the guest over virtio-fs (repeatable);
    /// `:ro` makes it read-only (the host refuses writes). The N-th --share
    /// (from 0) has the tag shareN: in the guest, `mount -t virtiofs share0
    /// /mnt`. Each share is served by its own virtiofsd, which minivmm starts
    /// and stops; guest RAM becomes a shared memfd so the daemon can map it.
    #[arg(long, value_name = "HOSTDIR:GUESTPATH[:ro]")]
    pub share: Vec<crate::share::ShareSpec>,

    /// The virtiofsd to run for --share (default: the first of
    /// /usr/libexec/virtiofsd, /usr/lib/qemu/virtiofsd, /usr/lib/virtiofsd;
    /// Debian 12 has it in the qemu-system-common package).
    #[arg(long, value_name = "PATH", requires = "share")]
    pub virtiofsd: Option<PathBuf>,
}

/// Parses "512M", "1G", "4096" (bytes), "64k".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let not_a_size = || format!("'{s}' is not a size (examples: 512M, 1G, 2048M)");
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| not_a_size())?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ if suffix.chars().all(|c| c.is_ascii_alphabetic()) => {
            return Err(format!(
                "'{s}': unknown size suffix '{suffix}' (use K, M, G or T)"
            ))
        }
        _ => return Err(not_a_size()),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .filter(|b| *b <= MAX_MEMORY)
        .ok_or_else(|| format!("'{s}' is too large (at most 1T)"))?;
    if bytes < (16 << 20) {
        return Err(format!(
            "'{s}' is too small: a Linux guest needs at least 16M"
        ));
    }
    Ok(bytes)
}

pub fn parse_cpus(s: &str) -> Result<u8, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of vcpus"))?;
    match n {
        0 => Err("a VM needs at least 1 vcpu".into()),
        n if n > MAX_CPUS as u32 => Err(format!("at most {MAX_CPUS} vcpus are supported")),
        n => Ok(n as u8),
    }
}

/// Longest timeout accepted (`u32::MAX` seconds, 136 years): deadlines must stay
/// representable.
const MAX_TIMEOUT_SECS: u64 = u32::MAX as u64;

pub fn parse_timeout(s: &str) -> Result<u64, String> {
    let t = s.trim();
    match t.parse::<u64>() {
        Ok(0) => Err("the timeout must be at least 1 second".into()),
        Ok(n) if n <= MAX_TIMEOUT_SECS => Ok(n),
        Ok(_) => Err(format!(
            "'{s}' is too long: at most {MAX_TIMEOUT_SECS} seconds"
        )),
        Err(_) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => Err(format!(
            "'{s}' is too long: at most {MAX_TIMEOUT_SECS} seconds"
        )),
        Err(_) => Err(format!("'{s}' is not a whole number of seconds")),
    }
}

fn parse_agent(s: &str) -> Result<PathBuf, String> {
    let s = &qmp::server::strip_qemu_options(s)?;
    match s.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(format!("'{s}': expected unix:PATH, e.g. unix:/tmp/vm.qga")),
    }
}

fn parse_uuid(s: &str) -> Result<String, String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, l)| g.len() == l && g.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "'{s}' is not a UUID (expected 8-4-4-4-12 hex digits, e.g. 12345678-1234-1234-1234-123456789abc)"
        ))
    }
}

impl From<Cli> for VmConfig {
    fn from(c: Cli) -> Self {
        Self {
            kernel: c.kernel,
            initrd: c.initrd,
            initrd_gate: None,
            cmdline: c
                .append
                .unwrap_or_else(|| c.console.default_cmdline().to_string()),
            memory: c.memory,
            cpus: c.cpus,
            serial: c.serial,
            console: c.console,
            name: c.name,
            uuid: c.uuid,
            no_reboot: c.no_reboot,
            timeout: c.timeout,
            qmp: c.qmp,
            paused: c.paused,
            no_shutdown: c.no_shutdown,
            agent: c.agent,
            agent_timeout: c.agent_timeout,
            virtio_mmio_cmdline: c.virtio_mmio_cmdline,
            isa_debug_exit: c.isa_debug_exit,
            shares: c.share,
            virtiofsd: c.virtiofsd,
            run_channel: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("minivmm").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--kernel", "k"]).unwrap();
        assert_eq!(c.memory, 512 << 20);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.append, None);
        assert_eq!(VmConfig::from(c).cmdline, "console=ttyS0");
        let c = parse(&["--kernel", "k", "--console", "virtio"]).unwrap();
        assert_eq!(VmConfig::from(c).cmdline, "console=hvc0");
        let c = parse(&["--kernel", "k", "--console", "virtio", "--append", "x"]).unwrap();
        assert_eq!(VmConfig::from(c).cmdline, "x", "--append is verbatim");
        assert!(parse(&["--kernel", "k", "--console", "hvc"]).is_err());
        let c = parse(&["--kernel", "k"]).unwrap();
        assert_eq!(c.console, ConsoleKind::Serial);
        assert_eq!(c.serial, SerialBackend::Stdio);
        assert!(c.initrd.is_none() && c.timeout.is_none() && !c.no_reboot);
    }

    #[test]
    fn all_flags() {
        let c = parse(&[
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--append",
            "quiet x=1",
            "--memory",
            "1G",
            "--cpus",
            "2",
            "--serial",
            "file:/tmp/s",
            "--name",
            "vm1",
            "--uuid",
            "12345678-1234-1234-1234-123456789ABC",
            "--no-reboot",
            "--timeout",
            "5",
        ])
        .unwrap();
        let cfg = VmConfig::from(c);
        assert_eq!(cfg.memory, 1 << 30);
        assert_eq!(cfg.cpus, 2);
        assert_eq!(cfg.cmdline, "quiet x=1");
        assert_eq!(cfg.serial, SerialBackend::File("/tmp/s".into()));
        assert_eq!(
            cfg.uuid.as_deref(),
            Some("12345678-1234-1234-1234-123456789abc")
        );
        assert!(cfg.no_reboot);
        assert_eq!(cfg.timeout, Some(5));
    }

    /// Every flag clap knows appears in `--help` with a description, so a flag
    /// added later cannot go undocumented.
    #[test]
    fn help_describes_every_flag() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd.render_help().to_string();
        let mut seen = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            seen += 1;
            let flag = format!("--{long}");
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&flag) || l.contains(&format!(" {flag}")))
                .unwrap_or_else(|| panic!("--help lacks {flag}:\n{help}"));
            assert!(
                arg.get_help().is_some() || arg.get_long_help().is_some(),
                "{flag} has no description ({line})"
            );
        }
        assert!(seen >= 18, "only {seen} flags found");
    }

    #[test]
    fn kernel_is_required() {
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("65536k"), Ok(64 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("33554432"), Ok(32 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("12Q")
            .unwrap_err()
            .contains("unknown size suffix"));
        for bad in [
            "",
            "G",
            "12X",
            "-1G",
            "1.5G",
            "2T",
            "99999999999999999999",
            "1M",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cpus_and_timeout_bounds() {
        assert!(parse(&["--kernel", "k", "--cpus", "0"]).is_err());
        assert!(parse(&["--kernel", "k", "--cpus", "255"]).is_err());
        assert!(parse(&["--kernel", "k", "--cpus", "two"]).is_err());
        assert!(parse(&["--kernel", "k", "--timeout", "0"]).is_err());
        assert_eq!(
            parse(&["--kernel", "k", "--cpus", "254"]).unwrap().cpus,
            254
        );
    }

    #[test]
    fn qmp_flags() {
        let c = parse(&[
            "--kernel",
            "k",
            "--qmp",
            "unix:/tmp/a",
            "--qmp",
            "tcp:127.0.0.1:4444",
            "--paused",
            "--no-shutdown",
        ])
        .unwrap();
        assert_eq!(c.qmp.len(), 2);
        assert!(c.paused && c.no_shutdown);
        assert!(
            parse(&["--kernel", "k", "--paused"]).is_err(),
            "--paused needs --qmp"
        );
        assert!(parse(&["--kernel", "k", "--qmp", "tcp:nope"]).is_err());
    }

    #[test]
    fn agent_flags() {
        let c = parse(&["--kernel", "k", "--agent", "unix:/tmp/vm.qga"]).unwrap();
        assert_eq!(c.agent, Some(PathBuf::from("/tmp/vm.qga")));
        assert_eq!(c.agent_timeout, 30);
        assert!(!c.virtio_mmio_cmdline);
        assert!(parse(&["--kernel", "k", "--agent", "/tmp/vm.qga"]).is_err());
        // QEMU's chardev habit: `,server,nowait` is the only behaviour anyway.
        let c = parse(&["--kernel", "k", "--agent", "unix:/tmp/q,server,nowait"]).unwrap();
        assert_eq!(c.agent, Some(PathBuf::from("/tmp/q")));
        assert!(parse(&["--kernel", "k", "--agent-timeout", "0"]).is_err());
        for huge in [
            "4294967296",
            "18446744073709551615",
            "99999999999999999999999",
        ] {
            let e = parse(&["--kernel", "k", "--agent-timeout", huge]).unwrap_err();
            assert!(e.to_string().contains("too long"), "{e}");
            let e = parse(&["--kernel", "k", "--timeout", huge]).unwrap_err();
            assert!(e.to_string().contains("too long"), "{e}");
        }
        let c = parse(&["--kernel", "k", "--agent-timeout", "4294967295"]).unwrap();
        assert_eq!(c.agent_timeout, 4294967295);
        let c = parse(&[
            "--kernel",
            "k",
            "--agent-timeout",
            "5",
            "--virtio-mmio-cmdline",
        ])
        .unwrap();
        assert_eq!(c.agent_timeout, 5);
        assert!(c.virtio_mmio_cmdline);
    }

    #[test]
    fn serial_backends() {
        assert_eq!("none".parse(), Ok(SerialBackend::None));
        assert!("file:".parse::<SerialBackend>().is_err());
        assert!("tcp:1".parse::<SerialBackend>().is_err());
    }

    #[test]
    fn bad_uuid_rejected() {
        assert!(parse(&["--kernel", "k", "--uuid", "nope"]).is_err());
        assert!(parse(&[
            "--kernel",
            "k",
            "--uuid",
            "12345678-1234-1234-1234-12345678zabc"
        ])
        .is_err());
    }
}
