//! The file systems every run needs.

use std::ffi::{CStr, CString};
use std::fs::DirBuilder;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use run_protocol::Share;

use crate::sys::cvt;

/// One mount.
struct Mount {
    fstype: &'static CStr,
    target: &'static str,
    flags: libc::c_ulong,
    data: &'static CStr,
    /// A failure stops the run (else it is a warning).
    required: bool,
    /// Left alone when the directory already holds files (put there with
    /// `--add` or by the initrd): the root file system is writable anyway.
    keep_contents: bool,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// In order: a mount's parent directory comes first.
const MOUNTS: &[Mount] = &[
    Mount {
        fstype: c"proc",
        target: "/proc",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: c"",
        required: true,
        keep_contents: false,
    },
    Mount {
        fstype: c"sysfs",
        target: "/sys",
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: c"",
        required: true,
        keep_contents: false,
    },
    Mount {
        fstype: c"devtmpfs",
        target: "/dev",
        flags: libc::MS_NOSUID,
        data: c"mode=0755",
        required: true,
        keep_contents: false,
    },
    Mount {
        fstype: c"devpts",
        target: "/dev/pts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: c"gid=5,mode=0620,ptmxmode=0666",
        required: false,
        keep_contents: false,
    },
    Mount {
        fstype: c"tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV,
        data: c"mode=1777",
        required: false,
        keep_contents: false,
    },
    Mount {
        fstype: c"tmpfs",
        target: "/tmp",
        flags: NOSUID_NODEV,
        data: c"mode=1777",
        required: true,
        keep_contents: true,
    },
    Mount {
        fstype: c"tmpfs",
        target: "/run",
        flags: NOSUID_NODEV,
        data: c"mode=0755",
        required: true,
        keep_contents: true,
    },
];

/// Whether the directory `dir` holds anything.
fn has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Mounts them all, skipping what is already mounted. `Err` says what
/// required mount failed; `Ok` holds the failures of optional ones.
pub fn mount_all() -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    for m in MOUNTS {
        if let Err(e) = mount(m) {
            let msg = format!("mount {} on {}: {e}", m.fstype.to_string_lossy(), m.target);
            if m.required {
                return Err(msg);
            }
            warnings.push(msg);
        }
    }
    Ok(warnings)
}

fn mount(m: &Mount) -> io::Result<()> {
    let target = Path::new(m.target);
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(target)?;
    if is_mountpoint(target) || (m.keep_contents && has_entries(target)) {
        return Ok(());
    }
    // The source is the file system's name, as `mount -t proc proc` does.
    let source = m.fstype.to_str().unwrap_or("none");
    match sys_mount(source, target, m.fstype, m.flags, m.data) {
        Ok(()) => Ok(()),
        // Something is mounted there already.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(io::Error::new(
            e.kind(),
            format!("{e}: the kernel lacks this file system"),
        )),
        Err(e) => Err(e),
    }
}

/// What `mount` says about a virtio-fs share, for the user.
fn share_error(e: io::Error, tag: &str, path: &str) -> String {
    let why = match e.raw_os_error() {
        Some(libc::ENODEV) => "the kernel has no virtiofs file system \
             (CONFIG_VIRTIO_FS, built in or the virtiofs module)"
            .to_string(),
        Some(libc::ENOENT) => format!("no virtio-fs device with the tag {tag} ({e})"),
        _ => e.to_string(),
    };
    format!("mount the host directory {tag} on {path}: {why}")
}

/// Mounts each host directory (virtio-fs) at its path, in order; a missing
/// mount point is made. With a `root` (`--host-root`), that share gets fresh
/// `/proc`, `/sys`, `/dev`, `/tmp` and `/run` right after it is mounted
/// (before the shares below it, so one under `/tmp` stays visible).
pub fn mount_shares(shares: &[Share], root: Option<&[u8]>) -> Result<(), String> {
    for sh in shares {
        let path = String::from_utf8_lossy(&sh.path).into_owned();
        let dir = Path::new(std::ffi::OsStr::from_bytes(&sh.path));
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| format!("make the mount point {path}: {e}"))?;
        let flags = if sh.read_only { libc::MS_RDONLY } else { 0 };
        sys_mount(&sh.tag, dir, c"virtiofs", flags, c"")
            .map_err(|e| share_error(e, &sh.tag, &path))?;
        if root == Some(&sh.path[..]) {
            prepare_root(dir)?;
        }
    }
    Ok(())
}

/// Fresh kernel file systems in the command's root: the init's `/proc`,
/// `/sys` and `/dev` (with `/dev/pts` and `/dev/shm`) bound there, and new
/// tmpfs on `/tmp` and `/run`.
fn prepare_root(root: &Path) -> Result<(), String> {
    for dir in ["/proc", "/sys", "/dev"] {
        let target = root.join(&dir[1..]);
        sys_mount(dir, &target, c"", libc::MS_BIND | libc::MS_REC, c"")
            .map_err(|e| format!("bind {dir} into the root at {}: {e}", target.display()))?;
    }
    for (dir, data) in [("tmp", c"mode=1777"), ("run", c"mode=0755")] {
        let target = root.join(dir);
        sys_mount("tmpfs", &target, c"tmpfs", NOSUID_NODEV, data)
            .map_err(|e| format!("mount tmpfs on {}: {e}", target.display()))?;
    }
    Ok(())
}

/// mount(2) of `source` on `target`.
fn sys_mount(
    source: &str,
    target: &Path,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: &CStr,
) -> io::Result<()> {
    let c_source = CString::new(source)?;
    let c_target = CString::new(target.as_os_str().as_bytes())?;
    let fstype = (!fstype.is_empty()).then_some(fstype.as_ptr());
    // SAFETY: all strings are valid and NUL-terminated (a null file system
    // type for a bind mount); mount copies them.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            fstype.unwrap_or(std::ptr::null()),
            flags,
            data.as_ptr().cast(),
        )
    };
    cvt(rc).map(drop)
}

/// Whether a file system is mounted at `dir`: it is on another device than
/// its parent.
pub fn is_mountpoint(dir: &Path) -> bool {
    match (dir.metadata(), dir.join("..").metadata()) {
        (Ok(d), Ok(parent)) => d.dev() != parent.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn mountpoints_are_told_apart() {
        assert!(is_mountpoint(Path::new("/proc")));
        let dir = TempDir::new("mnt");
        assert!(!is_mountpoint(dir.path()));
        assert!(!is_mountpoint(&dir.path().join("missing")));
    }

    #[test]
    fn tmp_and_run_keep_what_the_initramfs_put_there() {
        for m in MOUNTS {
            assert_eq!(
                m.keep_contents,
                m.target == "/tmp" || m.target == "/run",
                "{}",
                m.target
            );
        }
        let dir = std::env::temp_dir().join(format!("minivmm-init-has-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!has_entries(&dir));
        std::fs::write(dir.join("f"), b"x").unwrap();
        assert!(has_entries(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!has_entries(&dir), "a missing directory holds nothing");
    }

    #[test]
    fn share_errors_say_what_is_missing() {
        let e = share_error(io::Error::from_raw_os_error(libc::ENODEV), "share0", "/out");
        assert!(
            e.starts_with("mount the host directory share0 on /out: "),
            "{e}"
        );
        assert!(
            e.contains("CONFIG_VIRTIO_FS") && e.contains("virtiofs module"),
            "{e}"
        );
        let e = share_error(io::Error::from_raw_os_error(libc::ENOENT), "share1", "/x");
        assert!(e.contains("no virtio-fs device with the tag share1"), "{e}");
        // No such file system here either: the message is the kernel's.
        let r = mount_shares(
            &[Share {
                tag: "minivmm-test-no-such-tag".into(),
                path: std::env::temp_dir()
                    .join(format!("minivmm-share-{}", std::process::id()))
                    .into_os_string()
                    .into_encoded_bytes(),
                read_only: true,
            }],
            None,
        );
        assert!(
            r.unwrap_err().contains("minivmm-test-no-such-tag"),
            "a failed mount names the share"
        );
    }

    #[test]
    fn parents_are_mounted_first() {
        for (i, m) in MOUNTS.iter().enumerate() {
            for later in &MOUNTS[i + 1..] {
                assert!(
                    !Path::new(m.target).starts_with(later.target),
                    "{} before {}",
                    m.target,
                    later.target
                );
            }
        }
    }
}
