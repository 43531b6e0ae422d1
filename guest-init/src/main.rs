//! `minivmm-init`: PID 1 of a `minivmm run` guest (see the library's docs).
//!
//! `main` never returns and never lets a panic out: every way through ends in
//! [`power_off`] (PID 1 exiting would panic the kernel).

use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use minivmm_guest_init::command::Place;
use minivmm_guest_init::kmsg::Kmsg;
use minivmm_guest_init::log::Log;
use minivmm_guest_init::port::{self, DevWatch, Port};
use minivmm_guest_init::reaper::Reaper;
use minivmm_guest_init::{modules, mounts, pump};
use run_protocol::{Exit, Spec, PORT_NAME, READY, SPEC_PATH};

fn main() {
    // SAFETY: no arguments.
    if unsafe { libc::getpid() } != 1 {
        // Not in a guest: mounting and powering off here would hurt.
        let _ = writeln!(
            io::stderr(),
            "minivmm-init: the init of a `minivmm run` guest; it runs only as PID 1"
        );
        std::process::exit(2);
    }
    let mut init = Init::default();
    let exit = match panic::catch_unwind(AssertUnwindSafe(|| init.run())) {
        Ok(Ok(exit)) => exit,
        Ok(Err(msg)) => Exit::InitFailed(msg),
        Err(payload) => Exit::InitFailed(format!("panicked: {}", panic_message(&*payload))),
    };
    if panic::catch_unwind(AssertUnwindSafe(|| init.finish(&exit))).is_err() {
        init.log.error("panicked while reporting the end");
    }
    power_off(&init.log)
}

/// The message of a panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// What the init has opened so far.
#[derive(Default)]
struct Init {
    log: Log,
    kmsg: Option<Kmsg>,
    port: Option<Port>,
}

impl Init {
    /// Everything up to the command's end; `Err` is a failure of the init.
    fn run(&mut self) -> Result<Exit, String> {
        let mounted = mounts::mount_all();
        // /dev may be there even if a later mount failed.
        self.log = Log::open();
        let warnings = mounted?;
        for w in &warnings {
            self.log.warn(w);
        }
        self.kmsg = match Kmsg::open() {
            Ok(kmsg) => Some(kmsg),
            Err(e) => {
                self.log.warn(&format!("read /dev/kmsg: {e}"));
                None
            }
        };
        // Before the modules load: the port's node may appear any time after.
        let watch = DevWatch::new(Path::new("/dev")).map_err(|e| format!("watch /dev: {e}"))?;

        // Failures up to here cannot be reported to the host; from here on
        // the port is still looked for, to say what went wrong.
        let spec = std::fs::read(SPEC_PATH)
            .map_err(|e| format!("read the run spec {SPEC_PATH}: {e}"))
            .and_then(|bytes| {
                Spec::decode(&bytes).map_err(|e| format!("the run spec {SPEC_PATH}: {e}"))
            });
        let early = match &spec {
            Ok(spec) => {
                if let Some(kmsg) = &mut self.kmsg {
                    kmsg.set_verbose(spec.verbose);
                    // The boot's records, kept (the last of them) for the
                    // first send.
                    kmsg.read_records(usize::MAX);
                }
                modules::load_all(&spec.modules, &self.log)
                    .and_then(|()| mounts::mount_shares(&spec.shares, spec.root.as_deref()))
                    .err()
            }
            Err(e) => Some(e.clone()),
        };

        let path = watch
            .wait_for_port(Path::new(port::SYS_PORTS), PORT_NAME, port::PORT_TIMEOUT)
            .map_err(|e| match &early {
                Some(first) => format!("{first}; then: {e}"),
                None => e,
            })?;
        let port = Port::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
        let port = self.port.insert(port);
        port.send(READY, &[]).map_err(|e| e.to_string())?;
        if let Some(e) = early {
            return Err(e);
        }
        let spec = spec?;

        let reaper = Reaper::new().map_err(|e| format!("set up SIGCHLD: {e}"))?;
        let place = Place {
            root: spec.root.as_deref(),
            cwd: spec.cwd.as_deref().unwrap_or(b"/"),
        };
        pump::run_command(port, self.kmsg.as_mut(), &reaper, &spec.argv, place)
            .map_err(|e| e.to_string())
    }

    /// Logs a failure of the init and tells the host how the run ended.
    fn finish(&mut self, exit: &Exit) {
        if let Exit::InitFailed(msg) = exit {
            self.log.error(msg);
        }
        if let Some(port) = &self.port {
            match pump::report_exit(port, self.kmsg.as_mut(), exit) {
                // The host stops the VM once it has read the end; powering
                // off first could overtake the frames still on their way.
                Ok(()) => port::wait_for_the_end(port, port::END_WAIT),
                Err(e) => self.log.error(&format!("report the end to the host: {e}")),
            }
        }
    }
}

/// Syncs and powers the machine off; never returns.
fn power_off(log: &Log) -> ! {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
    // SAFETY: no pointers; as PID 1 this does not return on success.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    log.error(&format!("power off: {}", io::Error::last_os_error()));
    loop {
        // SAFETY: no arguments; waits for a signal, which never comes.
        unsafe { libc::pause() };
    }
}
