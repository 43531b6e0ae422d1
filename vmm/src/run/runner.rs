//! `minivmm run`: checks the inputs, makes the initramfs, runs the VM with the
//! run channel, and turns how it ended into minivmm's exit status.

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use run_protocol::{Share, Spec};

use super::cli::RunCli;
use super::initramfs::{self, AddSpec};
use super::verdict::{ending, result_json};
use crate::config::{ConsoleKind, InitrdGate, SerialBackend, VmConfig};
use crate::error::error_chain;
use crate::share::ShareSpec;
use crate::vmm::{run_vm, RunChannel};

/// Modules the channel needs, when the kernel has them as modules.
const NEEDED_MODULES: &[&str] = &["virtio_mmio", "virtio_console"];
/// Modules packed when the tree has them: the kernel's panic reaches the host
/// through pvpanic.
const WANTED_MODULES: &[&str] = &["pvpanic", "pvpanic_mmio"];

/// Kernel command line before the user's `--append`: the console on COM1,
/// quiet (every byte on the 16550 is a VM exit), a panic reboots at once
/// (reported as a VM failure when pvpanic is not there to say "panic"), and
/// no crypto self-tests at boot (`cryptomgr.notests`: the longest initcall of
/// a Debian kernel; `--append cryptomgr.notests=0` runs them again).
const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 cryptomgr.notests";

/// Where `--host-root` mounts the host's `/` in the guest: the command's root.
const HOST_ROOT: &str = "/.minivmm/root";

/// A failure before the VM starts: one line for the user, status 125.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command is empty.
    #[error("no command to run: give one after `--`, e.g. `minivmm run --kernel K -- uname -r`")]
    NoCommand,
    /// The kernel is missing or unreadable.
    #[error("cannot read the kernel {path}")]
    Kernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--serial stdio` makes no sense here.
    #[error("--serial stdio is not available with run (the command's output is on stdout): use file:PATH, or --verbose for stderr")]
    SerialStdio,
    /// The kernel has no virtiofs.
    #[error("--share/--host-root need the kernel's virtiofs file system (CONFIG_VIRTIO_FS): the module virtiofs is neither in {} nor built in", .0.display())]
    NoVirtiofs(PathBuf),
    /// `--virtiofsd` without anything to serve.
    #[error("--virtiofsd is only used with --share or --host-root")]
    VirtiofsdWithoutShare,
    /// The current directory (for `--host-root`).
    #[error("--host-root shares the current directory, which cannot be found")]
    Cwd(#[source] std::io::Error),
    /// Making the initramfs failed.
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    /// The initramfs could not be handed to the VM.
    #[error("cannot hold the generated initramfs in memory")]
    Memfd(#[source] std::io::Error),
    /// The thread making the initramfs could not start.
    #[error("cannot start the thread making the initramfs")]
    Thread(#[source] std::io::Error),
    /// The thread making the initramfs panicked (a bug).
    #[error("making the initramfs failed unexpectedly")]
    InitramfsPanicked,
    /// The result file could not be written.
    #[error("cannot write the result file {path}")]
    Result {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The modules to pack: from `--modules DIR`, or `/lib/modules/VERSION` when
/// it exists; none when there is no tree (the kernel must have them built in).
fn modules(cli: &RunCli, shares: bool) -> Result<Vec<(PathBuf, String)>, RunError> {
    let version = initramfs::kernel_version_of(&cli.kernel)?;
    let dir = match &cli.modules {
        Some(d) => d.clone(),
        None => {
            let d = Path::new("/lib/modules").join(&version);
            if !d.exists() {
                log::info!(
                    "no modules tree {} for kernel {version}: assuming virtio-mmio and \
                     virtio-console are built in (else give --modules DIR)",
                    d.display()
                );
                return Ok(Vec::new());
            }
            d
        }
    };
    let mut needed = NEEDED_MODULES.to_vec();
    if shares {
        needed.push("virtiofs");
    }
    initramfs::resolve_modules(&dir, &version, &needed, WANTED_MODULES).map_err(|e| match e {
        initramfs::InitramfsError::ModuleNotFound { name, dir } if name == "virtiofs" => {
            RunError::NoVirtiofs(dir)
        }
        e => e.into(),
    })
}

/// The host directories of a run: what the VMM serves, and what the init
/// mounts where.
#[derive(Debug, Default)]
struct Layout {
    shares: Vec<ShareSpec>,
    mounts: Vec<Share>,
    root: Option<Vec<u8>>,
    cwd: Option<Vec<u8>>,
}

/// With `--host-root`: the host's `/` (read-only) as the command's root and
/// the current directory (read-write) at its own path, where the command
/// starts; then each `--share`, under that root.
fn layout(cli: &RunCli) -> Result<Layout, RunError> {
    let mut l = Layout::default();
    let prefix = if cli.host_root {
        let cwd = std::env::current_dir()
            .and_then(std::fs::canonicalize)
            .map_err(RunError::Cwd)?;
        l.shares.push(ShareSpec {
            host: "/".into(),
            guest: "/".into(),
            read_only: true,
        });
        if cwd != Path::new("/") {
            l.shares.push(ShareSpec {
                host: cwd.clone(),
                guest: cwd.clone(),
                read_only: false,
            });
        }
        l.root = Some(HOST_ROOT.as_bytes().to_vec());
        l.cwd = Some(cwd.into_os_string().into_vec());
        HOST_ROOT
    } else {
        ""
    };
    l.shares.extend(cli.share.iter().cloned());
    l.mounts = l
        .shares
        .iter()
        .enumerate()
        .map(|(i, sh)| {
            // Under the root (the root itself for `/`).
            let mut path = prefix.as_bytes().to_vec();
            if prefix.is_empty() || sh.guest != Path::new("/") {
                path.extend_from_slice(sh.guest.as_os_str().as_bytes());
            }
            Share {
                tag: ShareSpec::tag(i),
                path,
                read_only: sh.read_only,
            }
        })
        .collect();
    Ok(l)
}

/// An empty in-memory file, and a path the loader can open it by.
fn empty_memfd() -> Result<(OwnedFd, PathBuf), RunError> {
    // SAFETY: memfd_create with a NUL-terminated name; no other memory passed.
    let fd = unsafe { libc::memfd_create(c"minivmm-initramfs".as_ptr(), 0) };
    if fd < 0 {
        return Err(RunError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((owned, PathBuf::from(format!("/proc/self/fd/{fd}"))))
}

/// With `--verbose` the kernel log goes to stderr: through the console, or
/// as records from the init when the console goes to a file.
fn log_to_stderr(cli: &RunCli) -> bool {
    cli.verbose && cli.serial.is_some()
}

/// The thread making the initramfs.
type Making = std::thread::JoinHandle<Result<(), RunError>>;

fn prepare(cli: &RunCli) -> Result<(VmConfig, OwnedFd, Making), RunError> {
    if cli.command.is_empty() || cli.command[0].is_empty() {
        return Err(RunError::NoCommand);
    }
    if cli.virtiofsd.is_some() && cli.share.is_empty() && !cli.host_root {
        return Err(RunError::VirtiofsdWithoutShare);
    }
    std::fs::File::open(&cli.kernel).map_err(|source| RunError::Kernel {
        path: cli.kernel.clone(),
        source,
    })?;
    let serial = match &cli.serial {
        Some(SerialBackend::Stdio) => return Err(RunError::SerialStdio),
        Some(s) => s.clone(),
        None if cli.verbose => SerialBackend::Stderr,
        None => SerialBackend::None,
    };
    let adds = cli
        .add
        .iter()
        .map(|a| AddSpec::parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    let layout = layout(cli)?;
    let modules = modules(cli, !layout.shares.is_empty())?;
    let spec = Spec {
        modules: modules.iter().map(|(_, guest)| guest.clone()).collect(),
        shares: layout.mounts,
        root: layout.root,
        cwd: layout.cwd,
        argv: cli
            .command
            .iter()
            .map(|a| OsStr::as_bytes(a).to_vec())
            .collect(),
        // The log records go to stderr too when the console does not.
        verbose: log_to_stderr(cli),
    };
    // The initramfs (reading and unpacking the initrd, the modules, the
    // added files) is made on a thread while the VM is set up; the VM waits
    // for it before loading it.
    let (fd, path) = empty_memfd()?;
    let mut file = std::fs::File::from(fd.try_clone().map_err(RunError::Memfd)?);
    let gate = InitrdGate::default();
    let opened = gate.clone();
    let initrd = cli.initrd.clone();
    let making = std::thread::Builder::new()
        .name("initramfs".into())
        .spawn(move || {
            // Opens the gate whatever happens, a panic included.
            struct Open(InitrdGate, bool);
            impl Drop for Open {
                fn drop(&mut self) {
                    self.0.open(self.1);
                }
            }
            let mut open = Open(opened, false);
            let made = Instant::now();
            let image = initramfs::build(
                super::init::INIT_ELF,
                &spec,
                initrd.as_deref(),
                &modules,
                &adds,
            )?;
            file.write_all(&image).map_err(RunError::Memfd)?;
            log::debug!(
                "run: initramfs of {} bytes made in {:?}",
                image.len(),
                made.elapsed()
            );
            open.1 = true;
            Ok(())
        })
        .map_err(RunError::Thread)?;
    let mut cmdline = BASE_CMDLINE.to_string();
    if !cli.verbose {
        cmdline.push_str(" quiet");
    }
    if !cli.append.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(cli.append.trim());
    }
    let cfg = VmConfig {
        kernel: cli.kernel.clone(),
        initrd: Some(path),
        initrd_gate: Some(gate),
        cmdline,
        memory: cli.memory,
        cpus: cli.cpus,
        serial,
        console: ConsoleKind::Serial,
        name: Some("run".into()),
        uuid: None,
        no_reboot: true,
        timeout: cli.timeout,
        qmp: cli.qmp.clone(),
        paused: false,
        no_shutdown: false,
        agent: None,
        agent_timeout: 30,
        virtio_mmio_cmdline: false,
        isa_debug_exit: cli.isa_debug_exit,
        shares: layout.shares,
        virtiofsd: cli.virtiofsd.clone(),
        run_channel: true,
    };
    Ok((cfg, fd, making))
}

/// Runs `cli`; returns minivmm's exit status. `spawned` is when minivmm
/// started (for the timings).
pub fn execute(cli: RunCli, spawned: Instant) -> u8 {
    let (cfg, _initramfs, making) = match prepare(&cli) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("minivmm: error: {}", error_chain(&e));
            return 125;
        }
    };
    let ran = run_vm(
        cfg,
        Some(RunChannel {
            verbose: log_to_stderr(&cli),
        }),
    );
    // The VM loaded the initramfs or gave up on it: the thread is done.
    let made = making.join().unwrap_or(Err(RunError::InitramfsPanicked));
    if let Err(e) = made {
        eprintln!("minivmm: error: {}", error_chain(&e));
        return 125;
    }
    let (outcome, report) = match ran {
        Ok((o, Some(r))) => (o, r),
        Ok((o, None)) => (o, Default::default()),
        Err(e) => {
            eprintln!("minivmm: error: {}", error_chain(&e));
            return 125;
        }
    };
    let end = ending(&outcome, &report);
    if let Some(m) = &end.message {
        eprintln!("minivmm: {m}");
    }
    if !report.vcpus.is_empty() && end.verdict == super::verdict::Verdict::Timeout {
        eprintln!("minivmm: where the vcpus were when the time ran out:");
        for l in super::verdict::describe_vcpus(&report.vcpus) {
            eprintln!("  {l}");
        }
    }
    if end.verdict != super::verdict::Verdict::Exited
        && end.verdict != super::verdict::Verdict::Signaled
    {
        let excerpt = super::klog::merge(&report.kmsg, &report.console);
        if !excerpt.is_empty() {
            eprintln!("minivmm: the kernel log's last lines:");
        }
        for l in &excerpt {
            eprintln!("  {l}");
        }
    }
    if let Some(path) = &cli.result {
        let v = result_json(&end, &report, spawned, Instant::now());
        let written = std::fs::write(path, format!("{v}\n")).map_err(|source| RunError::Result {
            path: path.clone(),
            source,
        });
        if let Err(e) = written {
            eprintln!("minivmm: error: {}", error_chain(&e));
        }
    }
    u8::try_from(end.status & 0xff).unwrap_or(125)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cli(args: &[&str]) -> RunCli {
        RunCli::try_parse_from(
            ["minivmm run", "--kernel", "k"]
                .iter()
                .chain(args)
                .chain(&["--", "true"]),
        )
        .unwrap()
    }

    fn mount(tag: &str, path: &str, read_only: bool) -> Share {
        Share {
            tag: tag.into(),
            path: path.as_bytes().to_vec(),
            read_only,
        }
    }

    #[test]
    fn shares_are_mounted_at_their_guest_paths() {
        assert!(layout(&cli(&[])).unwrap().shares.is_empty());
        let tmp = std::env::temp_dir();
        let spec = format!("{}:/out:ro", tmp.display());
        let l = layout(&cli(&["--share", &spec])).unwrap();
        assert_eq!(l.shares.len(), 1);
        assert_eq!(l.mounts, [mount("share0", "/out", true)]);
        assert_eq!((l.root, l.cwd), (None, None));
    }

    #[test]
    fn host_root_is_the_hosts_root_and_the_current_directory() {
        let tmp = std::env::temp_dir();
        let spec = format!("{}:/out", tmp.display());
        let l = layout(&cli(&["--host-root", "--share", &spec])).unwrap();
        let cwd = std::env::current_dir()
            .unwrap()
            .canonicalize()
            .unwrap()
            .display()
            .to_string();
        assert_eq!(l.shares[0].host, Path::new("/"));
        assert!(l.shares[0].read_only);
        assert_eq!(l.shares[1].host, Path::new(&cwd));
        assert!(!l.shares[1].read_only, "the current directory is writable");
        assert_eq!(
            l.mounts,
            [
                mount("share0", HOST_ROOT, true),
                mount("share1", &format!("{HOST_ROOT}{cwd}"), false),
                mount("share2", &format!("{HOST_ROOT}/out"), false),
            ]
        );
        assert_eq!(l.root.as_deref(), Some(HOST_ROOT.as_bytes()));
        assert_eq!(l.cwd.as_deref(), Some(cwd.as_bytes()));
    }

    #[test]
    fn bad_share_combinations_are_refused() {
        let parse = |args: &[&str]| {
            RunCli::try_parse_from(
                ["minivmm run", "--kernel", "k"]
                    .iter()
                    .chain(args)
                    .chain(&["--", "true"]),
            )
        };
        assert!(parse(&["--host-root", "--add", "/bin/true"]).is_err());
        assert!(parse(&["--host-root", "--initrd", "i.img"]).is_err());
        assert!(parse(&["--share", "/nonexistent-minivmm:/x"]).is_err());
        let e = prepare(&cli(&["--virtiofsd", "/usr/lib/qemu/virtiofsd"])).unwrap_err();
        assert!(matches!(e, RunError::VirtiofsdWithoutShare), "{e}");
    }
}
