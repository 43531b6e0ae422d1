//! [`VmConfig`]: everything needed to build the VM, and to rebuild it on reboot.
//! The command line ([`crate::cli`]) produces it; nothing else in the VMM reads
//! the command line.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex};

pub use qmp::server::Endpoint;

/// Everything needed to build (and rebuild, on reboot) the VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// The initrd is still being written by another thread: the VM waits for
    /// it before loading it (`minivmm run` makes its initramfs meanwhile).
    pub initrd_gate: Option<InitrdGate>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vcpus.
    pub cpus: u8,
    /// Serial backend (also where a virtio console's output goes).
    pub serial: SerialBackend,
    /// The guest's own console: the 16550 or a virtio console (`hvc0`).
    pub console: ConsoleKind,
    /// VM name.
    pub name: Option<String>,
    /// VM UUID.
    pub uuid: Option<String>,
    /// Exit instead of rebooting.
    pub no_reboot: bool,
    /// Seconds until forced stop.
    pub timeout: Option<u64>,
    /// QMP endpoints.
    pub qmp: Vec<Endpoint>,
    /// Start in prelaunch.
    pub paused: bool,
    /// Keep the process when the guest stops.
    pub no_shutdown: bool,
    /// Guest-agent socket; the agent channel exists when set.
    pub agent: Option<PathBuf>,
    /// Agent reply timeout, seconds.
    pub agent_timeout: u64,
    /// Put virtio-mmio devices on the kernel command line too.
    pub virtio_mmio_cmdline: bool,
    /// QEMU's isa-debug-exit at port 0xf4.
    pub isa_debug_exit: bool,
    /// Host directories shared over virtio-fs (`--share`), tags `share0`...
    pub shares: Vec<crate::share::ShareSpec>,
    /// The virtiofsd to run for them (`--virtiofsd`); found if not given.
    pub virtiofsd: Option<PathBuf>,
    /// `minivmm run`: the virtio-console port is the run channel
    /// ([`run_protocol::PORT_NAME`]) instead of the guest agent's.
    pub run_channel: bool,
}

/// Opened once by whoever writes an initrd: whether it was made.
#[derive(Debug, Clone, Default)]
pub struct InitrdGate(Arc<(Mutex<Option<bool>>, Condvar)>);

impl InitrdGate {
    /// Says the initrd is there (`made`) or never will be.
    pub fn open(&self, made: bool) {
        let (state, cv) = &*self.0;
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            *s = Some(made);
        }
        cv.notify_all();
    }

    /// Waits until [`Self::open`]; whether the initrd was made.
    pub fn wait(&self) -> bool {
        let (state, cv) = &*self.0;
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(made) = *s {
                return made;
            }
            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Which device is the guest's own console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ConsoleKind {
    /// The 16550 UART (COM1, `ttyS0`): every byte is a VM exit.
    #[default]
    Serial,
    /// A virtio console (`hvc0`, QEMU's `virtconsole`): output in pages, far
    /// fewer exits; the 16550 stays for early boot messages.
    Virtio,
}

impl ConsoleKind {
    /// The kernel command line when the user gives none.
    pub fn default_cmdline(self) -> &'static str {
        match self {
            Self::Serial => "console=ttyS0",
            Self::Virtio => "console=hvc0",
        }
    }
}

/// Destination of the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackend {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded; no input.
    None,
    /// Output to stderr; no input (`minivmm run --verbose`).
    Stderr,
}

impl FromStr for SerialBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some("") => Err("file: needs a path, e.g. file:/tmp/console.log".into()),
                Some(p) => Ok(Self::File(PathBuf::from(p))),
                None => Err(format!(
                    "unknown serial backend '{s}': use stdio, file:PATH or none"
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InitrdGate;

    #[test]
    fn the_initrd_gate_says_once_whether_it_was_made() {
        let gate = InitrdGate::default();
        let waiter = {
            let g = gate.clone();
            std::thread::spawn(move || g.wait())
        };
        gate.open(false);
        gate.open(true); // too late: the first word stands
        assert!(!waiter.join().unwrap());
        assert!(!gate.wait());
        let made = InitrdGate::default();
        made.open(true);
        assert!(made.wait());
    }
}
