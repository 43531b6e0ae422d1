//! Rate-limited log lines, for messages a guest (or a guest agent) can cause at
//! will: a guest that misbehaves in a loop must not flood the host's log (and,
//! with stderr a pipe nobody reads, must not block the VMM on it).
//!
//! Each call site of [`warn_limited!`] may log [`BURST`] lines per [`WINDOW`];
//! further lines in the window are counted, and the next line logged after it
//! says how many were suppressed.
//!
//! ```
//! for i in 0..100 {
//!     log_ratelimit::warn_limited!("guest wrote to unknown port {i}");
//! }
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log per window.
pub const BURST: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// The state of one call site (see [`warn_limited!`]).
#[derive(Debug)]
pub struct RateLimit(Mutex<Window>);

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    /// A call site that has logged nothing yet.
    pub const fn new() -> Self {
        Self(Mutex::new(Window {
            start: None,
            logged: 0,
            suppressed: 0,
        }))
    }

    /// Whether a line may be logged at `now`; if so, how many were suppressed
    /// since the last one logged.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if w.start
            .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW)
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < BURST {
            w.logged += 1;
            return Some(std::mem::take(&mut w.suppressed));
        }
        w.suppressed += 1;
        None
    }

    /// [`Self::allow_at`] now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }
}

/// `log::warn!`, at most [`BURST`] lines per [`WINDOW`] from this call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::RateLimit = $crate::RateLimit::new();
        match LIMIT.allow() {
            Some(0) => $crate::log::warn!($($arg)+),
            Some(n) => $crate::log::warn!(
                "{} ({n} similar lines suppressed)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    }};
}

#[doc(hidden)]
pub use log;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_suppressed() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.allow_at(t0), Some(0));
        }
        for i in 0..1000 {
            assert_eq!(l.allow_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(
            l.allow_at(t0 + WINDOW),
            Some(1000),
            "the count comes with the next line"
        );
        assert_eq!(l.allow_at(t0 + WINDOW), Some(0));
    }

    #[test]
    fn the_macro_compiles_with_arguments() {
        for i in 0..20 {
            warn_limited!("line {i} of {}", 20);
        }
    }
}
