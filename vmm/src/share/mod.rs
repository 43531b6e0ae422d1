//! Host directories shared with the guest over virtio-fs (`--share`).
//!
//! Each share is served by its own virtiofsd, an existing daemon (Debian 12:
//! `/usr/lib/qemu/virtiofsd` from `qemu-system-common`, the C one of QEMU
//! 7.2; newer systems: the Rust one, `/usr/libexec/virtiofsd`), never by
//! minivmm itself. [`daemon`] starts and stops it; this module parses the
//! command line and finds the daemon.
//!
//! The guest sees share N (counting from 0, in command-line order) as a
//! virtio-fs device with the tag `shareN`: `mount -t virtiofs share0 /mnt`.

pub mod daemon;
pub mod link;

use std::path::{Path, PathBuf};

use devices::virtio::fs::VhostUserFs;
use std::str::FromStr;

/// Where virtiofsd is looked for when `--virtiofsd` is not given, in order.
pub const VIRTIOFSD_PATHS: &[&str] = &[
    "/usr/libexec/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
    "/usr/lib/virtiofsd",
];

/// One `--share HOSTDIR:GUESTPATH[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// The host directory (absolute, as given or made absolute).
    pub host: PathBuf,
    /// Where `minivmm run`'s init mounts it in the guest.
    pub guest: PathBuf,
    /// The guest may not write (enforced on the host: a read-only bind mount).
    pub read_only: bool,
}

impl ShareSpec {
    /// The virtio-fs tag of the share at `index` (command-line order).
    pub fn tag(index: usize) -> String {
        format!("share{index}")
    }
}

impl FromStr for ShareSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "use HOSTDIR:GUESTPATH or HOSTDIR:GUESTPATH:ro (e.g. ./out:/out)";
        let (rest, read_only) = match s.strip_suffix(":ro") {
            Some(r) => (r, true),
            None => (s.strip_suffix(":rw").unwrap_or(s), false),
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            return Err(format!("'{s}': no guest path; {usage}"));
        };
        if host.is_empty() {
            return Err(format!("'{s}': no host directory; {usage}"));
        }
        if !guest.starts_with('/') {
            return Err(format!(
                "'{s}': the guest path '{guest}' must be absolute; {usage}"
            ));
        }
        let host_path = Path::new(host);
        let meta = std::fs::metadata(host_path)
            .map_err(|e| format!("'{s}': the host directory {host}: {e}"))?;
        if !meta.is_dir() {
            return Err(format!("'{s}': {host} is not a directory"));
        }
        let host = std::fs::canonicalize(host_path)
            .map_err(|e| format!("'{s}': the host directory {host}: {e}"))?;
        Ok(Self {
            host,
            guest: PathBuf::from(guest),
            read_only,
        })
    }
}

/// No usable virtiofsd.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FindError {
    /// `--virtiofsd PATH` is not an executable file.
    #[error("--virtiofsd {0}: not an executable file")]
    NotExecutable(PathBuf),
    /// None of the usual places has one.
    #[error(
        "--share needs virtiofsd, and none was found (looked in {}); on Debian 12 install \
         the qemu-system-common package (it has /usr/lib/qemu/virtiofsd), on newer \
         systems the virtiofsd package, or give --virtiofsd PATH",
        VIRTIOFSD_PATHS.join(", ")
    )]
    Missing,
}

/// The virtiofsd to use: `explicit` if given, else the first of
/// [`VIRTIOFSD_PATHS`] that is executable.
pub fn find_virtiofsd(explicit: Option<&Path>) -> Result<PathBuf, FindError> {
    if let Some(p) = explicit {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(FindError::NotExecutable(p.to_path_buf()))
        };
    }
    VIRTIOFSD_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .ok_or(FindError::Missing)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A share's virtio-fs device behind its virtio-mmio transport.
pub type FsPort =
    std::sync::Arc<std::sync::Mutex<devices::virtio::mmio::MmioTransport<VhostUserFs>>>;

/// The virtiofsd to start for each share, resolved once.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// The executable.
    pub bin: PathBuf,
    /// Its command-line dialect.
    pub flavor: daemon::Flavor,
}

/// Setting up shares failed.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// No virtiofsd.
    #[error(transparent)]
    Find(#[from] FindError),
    /// Its `--help` could not be run.
    #[error("cannot run {bin} --help")]
    Probe {
        /// The daemon.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A daemon did not start.
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    /// A daemon started but refused the vhost-user setup.
    #[error("{tag}: virtiofsd refused the connection ({cause}); {detail}")]
    Backend {
        /// The share's tag.
        tag: String,
        /// The failed request.
        cause: String,
        /// How the daemon ended and its last output.
        detail: String,
    },
}

impl Daemon {
    /// The daemon for `--virtiofsd` (or the one found) and its dialect.
    pub fn resolve(explicit: Option<&Path>) -> Result<Daemon, ShareError> {
        let bin = find_virtiofsd(explicit)?;
        let flavor = daemon::Flavor::detect(&bin).map_err(|source| ShareError::Probe {
            bin: bin.clone(),
            source,
        })?;
        Ok(Daemon { bin, flavor })
    }
}

/// Starts a daemon for each share and connects a virtio-fs device (tag
/// `shareN`) to it; each daemon lives as long as its device.
pub fn start_shares(shares: &[ShareSpec], d: &Daemon) -> Result<Vec<VhostUserFs>, ShareError> {
    let mut devs = Vec::with_capacity(shares.len());
    for (i, spec) in shares.iter().enumerate() {
        let tag = ShareSpec::tag(i);
        let mut daemon = daemon::Virtiofsd::start(&d.bin, d.flavor, spec, &tag)?;
        let Some(stream) = daemon.take_stream() else {
            unreachable!("a started daemon has its stream");
        };
        match VhostUserFs::new(&tag, stream) {
            Ok(fs) => {
                log::info!(
                    "{tag}: {} served by virtiofsd (pid {}){}",
                    spec.host.display(),
                    daemon.pid(),
                    if spec.read_only { ", read-only" } else { "" }
                );
                let exited = daemon
                    .exit_evt()
                    .map_err(|source| daemon::DaemonError::EventFd {
                        tag: tag.clone(),
                        source,
                    })?;
                devs.push(fs.on_backend_exit(exited).keep_alive(Box::new(daemon)));
            }
            Err(e) => {
                return Err(ShareError::Backend {
                    tag,
                    cause: e.to_string(),
                    detail: daemon.exit_output(),
                })
            }
        }
    }
    Ok(devs)
}

/// The virtiofsd of this machine, when the tests may start it (root: it
/// sandboxes itself with namespaces). In CI it must be there.
#[cfg(test)]
pub(crate) fn test_virtiofsd(test: &str) -> Option<PathBuf> {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    match find_virtiofsd(None) {
        Ok(p) if root => Some(p),
        found => {
            let why = match found {
                Ok(_) => "not root".to_string(),
                Err(e) => e.to_string(),
            };
            if minivmm_tests::must_run_everything() {
                panic!("{test}: cannot run virtiofsd: {why}");
            }
            minivmm_tests::loud(&format!("*** SKIPPED {test}: {why}"));
            None
        }
    }
}

#[cfg(test)]
mod fs_tests;
#[cfg(test)]
mod tests;
