//! Host checks before a VM is built: the kernel and initrd are readable, the
//! memory fits the host, and the KVM device opens with the capabilities we need.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;

use kvm_ioctls::{Cap, Kvm};

use super::BuildError;
use crate::boot::{self, BootError};
use crate::config::VmConfig;

/// What to tell the user when the KVM device at `path` cannot be opened.
pub(super) fn kvm_open_advice(path: &str, e: &kvm_ioctls::Error) -> String {
    match e.errno() {
        libc::ENOENT => format!(
            "{path} does not exist: KVM is not available on this host (load the kvm-intel or kvm-amd module, and enable virtualization in the firmware)"
        ),
        libc::EACCES | libc::EPERM => format!(
            "permission denied opening {path}: add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root"
        ),
        _ => format!("cannot open {path}"),
    }
}

/// Checks, before touching KVM, that the kernel and initrd can be read and the
/// kernel is a kernel, so such mistakes are reported first and by name.
pub fn preflight(cfg: &VmConfig) -> Result<(), BuildError> {
    let mut f = File::open(&cfg.kernel).map_err(|source| BootError::KernelFile {
        path: cfg.kernel.clone(),
        source,
    })?;
    let mut head = Vec::with_capacity(0x210);
    (&mut f)
        .take(0x210)
        .read_to_end(&mut head)
        .map_err(|source| BootError::KernelFile {
            path: cfg.kernel.clone(),
            source,
        })?;
    if boot::detect_format(&head).is_none() {
        return Err(BootError::NotAKernel(cfg.kernel.clone()).into());
    }
    if let Some(p) = &cfg.initrd {
        let mut f = File::open(p).map_err(|source| BootError::InitrdFile {
            path: p.clone(),
            source,
        })?;
        f.read(&mut [0u8; 1])
            .map_err(|source| BootError::InitrdFile {
                path: p.clone(),
                source,
            })?;
    }
    let host = host_memory_bytes();
    if let Some(host) = host {
        if cfg.memory > host {
            return Err(BuildError::MemoryTooLarge {
                wanted: cfg.memory >> 20,
                host: host >> 20,
            });
        }
    }
    Ok(())
}

/// RAM + swap of the host, from /proc/meminfo.
fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    Some((field("MemTotal:")? + field("SwapTotal:").unwrap_or(0)) * 1024)
}

/// Opens the KVM device, explaining the usual failures.
pub fn open_kvm() -> Result<Kvm, BuildError> {
    let path = std::env::var("MINIVMM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
    let cpath = CString::new(path.clone()).map_err(|source| BuildError::KvmPath {
        path: path.clone(),
        source,
    })?;
    let kvm =
        Kvm::new_with_path(&cpath).map_err(|source| BuildError::KvmUnavailable { path, source })?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Pit2, "an in-kernel PIT"),
        (Cap::Irqfd, "irqfd"),
        (Cap::ImmediateExit, "immediate_exit"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::Ioeventfd, "ioeventfd"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(BuildError::MissingCap(name));
        }
    }
    Ok(kvm)
}
