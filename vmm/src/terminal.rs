//! The interactive console: raw mode for a terminal on stdin (restored on every
//! exit path), and the Ctrl-A escape keys.

use std::sync::Mutex;

/// Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// Help shown for Ctrl-A h.
pub const HELP: &str = "\r\nminivmm console keys:\r\n  Ctrl-A x       quit (stops the VM)\r\n  Ctrl-A h       this help\r\n  Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n";

/// A console command typed after Ctrl-A.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeCommand {
    /// Ctrl-A x.
    Quit,
    /// Ctrl-A h.
    Help,
}

/// Splits terminal input into bytes for the guest and escape commands.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_escape: bool,
}

impl EscapeParser {
    /// Feeds `input`; appends guest bytes to `out` and returns the commands seen,
    /// in order. A lone Ctrl-A at the end is held until the next call.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Vec<EscapeCommand> {
        let mut cmds = Vec::new();
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => cmds.push(EscapeCommand::Quit),
                    b'h' | b'H' | b'?' => cmds.push(EscapeCommand::Help),
                    ESCAPE => out.push(ESCAPE),
                    other => {
                        // Unknown escape: pass both keys through.
                        out.push(ESCAPE);
                        out.push(other);
                    }
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                out.push(b);
            }
        }
        cmds
    }
}

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts the terminal on stdin in raw mode; restores it when dropped, and from a
/// panic hook installed here.
pub struct RawTerminal;

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; `None` otherwise.
    pub fn enable() -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; an all-zero value is valid to pass to tcgetattr.
        let mut orig: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `orig` is a valid, writable termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut orig) } != 0 {
            return None;
        }
        let mut raw = orig;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still start lines.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `raw` is a valid termios for stdin.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(orig);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        Some(Self)
    }
}

/// Restores the saved terminal settings, if any. Safe to call more than once.
pub fn restore() {
    let saved = match SAVED.try_lock() {
        Ok(mut g) => g.take(),
        Err(_) => None,
    };
    if let Some(orig) = saved {
        // SAFETY: `orig` came from tcgetattr on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &orig) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_pass_through() {
        let mut p = EscapeParser::default();
        let mut out = vec![];
        assert!(p.feed(b"ls -l\r", &mut out).is_empty());
        assert_eq!(out, b"ls -l\r");
    }

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_h_helps() {
        let mut p = EscapeParser::default();
        let mut out = vec![];
        assert_eq!(
            p.feed(b"a\x01hb\x01x", &mut out),
            vec![EscapeCommand::Help, EscapeCommand::Quit]
        );
        assert_eq!(out, b"ab");
    }

    #[test]
    fn double_ctrl_a_sends_one_and_split_escape_works() {
        let mut p = EscapeParser::default();
        let mut out = vec![];
        assert!(p.feed(b"\x01", &mut out).is_empty());
        assert!(out.is_empty(), "escape held");
        assert!(p.feed(b"\x01z\x01", &mut out).is_empty());
        assert_eq!(out, b"\x01z");
        assert_eq!(p.feed(b"x", &mut out), vec![EscapeCommand::Quit]);
    }

    #[test]
    fn unknown_escape_passes_both_keys() {
        let mut p = EscapeParser::default();
        let mut out = vec![];
        p.feed(b"\x01c", &mut out);
        assert_eq!(out, b"\x01c");
    }
}
