//! Loading kernel modules with `finit_module`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::log::Log;
use crate::sys::cvt;

/// `finit_module` flag: the file is compressed; the kernel decompresses it
/// (Linux 6.2+, `CONFIG_MODULE_DECOMPRESS`).
pub const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// The `finit_module` flags for the module at `path`.
pub fn flags_for(path: &str) -> libc::c_uint {
    if [".xz", ".zst", ".gz"].iter().any(|ext| path.ends_with(ext)) {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    }
}

/// Loads the module at `path`; one already loaded is fine. The error says
/// what went wrong.
pub fn load(path: &str) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("open it: {e}"))?;
    // SAFETY: a descriptor we own, an empty NUL-terminated parameter string
    // and flags; the kernel reads the file itself.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c"".as_ptr(),
            flags_for(path),
        )
    };
    match cvt(rc) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(explain(&e, path)),
        _ => Ok(()),
    }
}

/// Loads `paths` in order. A failure is logged and the others are still
/// tried (those that need the failed one fail too); the error names the first.
pub fn load_all(paths: &[String], log: &Log) -> Result<(), String> {
    let mut failed = Vec::new();
    for path in paths {
        if let Err(e) = load(path) {
            let msg = format!("load kernel module {path}: {e}");
            log.error(&msg);
            failed.push(msg);
        }
    }
    match failed.len() {
        0 => Ok(()),
        1 => Err(failed.swap_remove(0)),
        n => Err(format!(
            "{} (and {} more failed; see the kernel log)",
            failed[0],
            n - 1
        )),
    }
}

/// A `finit_module` error, with what it usually means.
fn explain(e: &io::Error, path: &str) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::ENOEXEC) => "not a module of this kernel",
        Some(libc::ENOENT) => "unknown symbols: a module it needs is missing or comes later",
        Some(libc::EINVAL) if flags_for(path) != 0 => {
            "the kernel may not decompress modules (CONFIG_MODULE_DECOMPRESS)"
        }
        Some(libc::ENOSYS) => "the kernel has no module support",
        _ => return e.to_string(),
    };
    format!("{e} ({hint})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_modules_get_the_flag() {
        assert_eq!(flags_for("/lib/modules/6.1/virtio_console.ko"), 0);
        for p in ["a.ko.xz", "a.ko.zst", "a.ko.gz"] {
            assert_eq!(flags_for(p), MODULE_INIT_COMPRESSED_FILE, "{p}");
        }
        assert_eq!(flags_for("a.ko.bz2"), 0);
    }

    #[test]
    fn a_missing_module_is_an_error_naming_it() {
        let err = load_all(&["/nonexistent/x.ko".into()], &Log::default()).unwrap_err();
        assert!(err.contains("/nonexistent/x.ko"), "{err}");
        let err = load_all(
            &["/nonexistent/a.ko".into(), "/nonexistent/b.ko".into()],
            &Log::default(),
        )
        .unwrap_err();
        assert!(err.contains("a.ko") && err.contains("1 more"), "{err}");
    }
}
