//! The init's own messages: into the kernel log (`/dev/kmsg`) and, for errors,
//! on the console (stderr) too, so that they show whatever the log level.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};

/// Where the init reports.
#[derive(Default)]
pub struct Log {
    kmsg: Option<File>,
}

impl Log {
    /// Opens `/dev/kmsg` for writing (once `/dev` is mounted); without it,
    /// messages go to stderr only.
    pub fn open() -> Log {
        Log {
            kmsg: OpenOptions::new().write(true).open("/dev/kmsg").ok(),
        }
    }

    /// A failure: kernel log and console.
    pub fn error(&self, msg: &str) {
        self.kmsg(3, msg);
        Self::console(msg);
    }

    /// Something that does not stop the run: kernel log (console without it).
    pub fn warn(&self, msg: &str) {
        if !self.kmsg(4, msg) {
            Self::console(msg);
        }
    }

    /// Writes one record at `level`; whether it went in.
    fn kmsg(&self, level: u8, msg: &str) -> bool {
        let Some(mut kmsg) = self.kmsg.as_ref() else {
            return false;
        };
        // One write is one record.
        kmsg.write(format!("<{level}>minivmm-init: {msg}\n").as_bytes())
            .is_ok()
    }

    fn console(msg: &str) {
        // Never `eprintln!`: it panics if stderr fails, and PID 1 must not.
        let _ = writeln!(io::stderr().lock(), "minivmm-init: {msg}");
    }
}
