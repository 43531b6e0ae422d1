//! The kernel's last words for a failed run's diagnostics, from two sources:
//!
//! * the records the init forwards from `/dev/kmsg` (whatever the console
//!   level, so also with `quiet`), formatted as `dmesg` prints them;
//! * the tail of the serial console, which alone has what the kernel printed
//!   after the init could last run: a panic's own lines (printed at a level
//!   `quiet` still shows).
//!
//! [`merge`] puts the console lines newer than the last forwarded record after
//! the records.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Lines kept from each source (and in the merged excerpt).
pub const LINES: usize = 50;
/// Longest line kept; the rest of a longer one is cut.
const LINE_MAX: usize = 512;

/// One `/dev/kmsg` record (`PRIO,SEQ,USEC,FLAGS;TEXT` and optional
/// dictionary lines) as `dmesg` shows it: `[SECONDS.MICROS] TEXT`.
pub fn format_record(record: &[u8]) -> String {
    let text = String::from_utf8_lossy(record);
    let first = text.lines().next().unwrap_or_default();
    let Some((head, msg)) = first.split_once(';') else {
        return first.trim_end().to_string();
    };
    let usec = head.split(',').nth(2).and_then(|u| u.parse::<u64>().ok());
    match usec {
        Some(us) => format!(
            "[{:5}.{:06}] {}",
            us / 1_000_000,
            us % 1_000_000,
            msg.trim_end()
        ),
        None => msg.trim_end().to_string(),
    }
}

/// The kernel timestamp of a line as `dmesg` or the console print it
/// (`[    1.234567] ...`), in microseconds.
fn timestamp(line: &str) -> Option<u64> {
    let rest = line.strip_prefix('[')?;
    let (stamp, _) = rest.split_once(']')?;
    let (secs, micros) = stamp.trim().split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    let micros: u64 = micros.parse().ok()?;
    Some(secs * 1_000_000 + micros)
}

/// What a panic's first line says; the excerpt keeps that line even when the
/// panic's stack trace alone fills [`LINES`].
const PANIC_MARK: &str = "Kernel panic - not syncing";

/// The excerpt: the forwarded records, then the console lines printed after
/// the last of them (the console shows only part of the log; what it has
/// that the records have too is not repeated); the last [`LINES`], the first
/// of them the panic's own line if there was a panic.
pub fn merge(records: &VecDeque<String>, console: &[String]) -> Vec<String> {
    let last = records.iter().rev().find_map(|r| timestamp(r));
    // After the last console line the records already have; lines without
    // a stamp (continuations, the init's own messages) go with the line
    // before them.
    let newer_from = match last {
        Some(t) => console
            .iter()
            .rposition(|l| timestamp(l).is_some_and(|s| s <= t))
            .map_or(0, |i| i + 1),
        None => 0,
    };
    let all: Vec<String> = records
        .iter()
        .cloned()
        .chain(console[newer_from..].iter().cloned())
        .collect();
    let skip = all.len().saturating_sub(LINES);
    match all.iter().rposition(|l| l.contains(PANIC_MARK)) {
        Some(i) if i < skip => std::iter::once(all[i].clone())
            .chain(all[skip + 1..].iter().cloned())
            .collect(),
        _ => all[skip..].to_vec(),
    }
}

/// The last [`LINES`] lines of a byte stream.
#[derive(Debug, Default)]
pub struct LineTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    /// The last panic line, kept when it scrolls out.
    panic_line: Option<String>,
}

impl LineTail {
    /// Takes more of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' => self.end_line(),
                b'\r' => {}
                _ if self.partial.len() < LINE_MAX => self.partial.push(b),
                _ => {}
            }
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        if line.contains(PANIC_MARK) {
            self.panic_line = Some(line.clone());
        }
        if self.lines.len() == LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The lines, with an unfinished last one, after the last panic line if
    /// that scrolled out.
    pub fn lines(&self) -> Vec<String> {
        let scrolled = self.panic_line.as_ref().filter(|p| !self.lines.contains(p));
        let mut v: Vec<String> = scrolled.into_iter().chain(&self.lines).cloned().collect();
        if !self.partial.is_empty() {
            v.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        v
    }
}

/// A console sink that also keeps the tail of what passes through.
pub struct TailWriter {
    inner: Box<dyn Write + Send>,
    tail: Arc<Mutex<LineTail>>,
}

impl TailWriter {
    /// Wraps `inner`; `tail` gets a copy of every byte.
    pub fn new(inner: Box<dyn Write + Send>, tail: Arc<Mutex<LineTail>>) -> Self {
        Self { inner, tail }
    }
}

impl Write for TailWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .feed(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_as_dmesg_prints_them() {
        assert_eq!(
            format_record(b"6,339,1234567,-;virtio_mmio: probe\n SUBSYSTEM=x\n"),
            "[    1.234567] virtio_mmio: probe"
        );
        assert_eq!(
            format_record(b"0,1,1001000000,c;Kernel panic"),
            "[ 1001.000000] Kernel panic"
        );
        assert_eq!(format_record(b"no header"), "no header");
        assert_eq!(format_record(b"6,1,x,-;odd stamp\n"), "odd stamp");
    }

    #[test]
    fn console_lines_after_the_last_record_follow_it() {
        let records: VecDeque<String> = [
            "[    1.000000] one".to_string(),
            "[    2.000000] sysrq: Trigger a crash".to_string(),
        ]
        .into();
        let console = [
            "[    0.500000] early, also a record".to_string(),
            "[    2.000000] sysrq: Trigger a crash".to_string(),
            "[    2.000100] Kernel panic - not syncing: sysrq triggered crash".to_string(),
            "CPU: 0 PID: 1 (no stamp: goes with the line before)".to_string(),
        ];
        let m = merge(&records, &console);
        assert_eq!(m.len(), 4, "{m:?}");
        // The init's messages (no stamp) after the records come along.
        let late = [
            "[    1.000000] one".to_string(),
            "minivmm-init: cannot do something".to_string(),
            "[    3.000000] reboot: Power down".to_string(),
        ];
        assert_eq!(merge(&records, &late)[2..], late[1..]);
        assert_eq!(m[1], "[    2.000000] sysrq: Trigger a crash");
        assert!(m[2].contains("Kernel panic"));
        assert!(m[3].starts_with("CPU: 0"));
        // No records at all (the init never ran): the console alone.
        assert_eq!(merge(&VecDeque::new(), &console).len(), 4);
        // At most LINES.
        let many: Vec<String> = (0..200).map(|i| format!("[{i:5}.000000] x")).collect();
        let m = merge(&records, &many);
        assert_eq!(m.len(), LINES);
        assert_eq!(m[LINES - 1], "[  199.000000] x");
    }

    /// A panic whose stack trace is longer than the excerpt: its first line
    /// stays, first, so the excerpt says what happened.
    #[test]
    fn the_panic_line_outlives_a_long_stack_trace() {
        let mut t = LineTail::default();
        t.feed(b"[    2.000000] sysrq: Trigger a crash\n");
        t.feed(b"[    2.000100] Kernel panic - not syncing: sysrq triggered crash\n");
        for i in 0..LINES + 10 {
            t.feed(format!("[    2.000200]  ? frame_{i}+0x5/0x10\n").as_bytes());
        }
        let lines = t.lines();
        assert_eq!(lines.len(), LINES + 1);
        assert!(lines[0].contains("Kernel panic - not syncing: sysrq"));
        let records: VecDeque<String> = ["[    2.000000] sysrq: Trigger a crash".into()].into();
        let m = merge(&records, &lines);
        assert_eq!(m.len(), LINES);
        assert!(m[0].contains("Kernel panic - not syncing: sysrq"), "{m:?}");
        assert!(m[LINES - 1].contains(&format!("frame_{}", LINES + 9)));
        // Without a panic nothing is pinned.
        let plain: Vec<String> = (0..LINES + 5)
            .map(|i| format!("[    3.000000] {i}"))
            .collect();
        assert_eq!(merge(&VecDeque::new(), &plain)[0], "[    3.000000] 5");
    }

    #[test]
    fn the_tail_keeps_the_last_lines_bounded() {
        let mut t = LineTail::default();
        for i in 0..LINES + 3 {
            t.feed(format!("line {i}\r\n").as_bytes());
        }
        t.feed(&[b'y'; 2 * LINE_MAX]);
        let lines = t.lines();
        assert_eq!(lines.len(), LINES + 1);
        assert_eq!(lines[0], "line 3");
        assert_eq!(lines[LINES].len(), LINE_MAX, "a long line is cut");
        let tail = Arc::new(Mutex::new(LineTail::default()));
        let mut w = TailWriter::new(Box::new(io::sink()), tail.clone());
        w.write_all(b"a\nb").unwrap();
        assert_eq!(tail.lock().unwrap().lines(), ["a", "b"]);
    }
}
