//! The file systems every run needs.

use std::ffi::{CStr, CString};
use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

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
    let c_target = CString::new(m.target)?;
    // SAFETY: all strings are valid and NUL-terminated; mount copies them.
    let rc = unsafe {
        libc::mount(
            m.fstype.as_ptr(),
            c_target.as_ptr(),
            m.fstype.as_ptr(),
            m.flags,
            m.data.as_ptr().cast(),
        )
    };
    match cvt(rc) {
        Ok(_) => Ok(()),
        // Something is mounted there already.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(io::Error::new(
            e.kind(),
            format!("{e}: the kernel lacks this file system"),
        )),
        Err(e) => Err(e),
    }
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
