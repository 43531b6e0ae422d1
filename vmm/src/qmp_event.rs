//! The QMP events minivmm emits, as a type: what happened is decided by
//! [`crate::machine::Machine`]; this module only names it and writes it in
//! QEMU's wire shape (`{"timestamp": ..., "event": ..., "data": ...}`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Id of the guest-agent channel in `query-chardev` and `VSERPORT_CHANGE`.
pub const AGENT_CHANNEL_ID: &str = "qga0";

/// Why the guest stopped or was reset (QEMU's `ShutdownCause`, the members
/// minivmm can report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The guest powered off (ACPI S5, KVM shutdown event).
    GuestShutdown,
    /// The guest rebooted.
    GuestReset,
    /// The guest panicked (pvpanic).
    GuestPanic,
    /// QMP `quit`.
    HostQmpQuit,
    /// QMP `system_reset`.
    HostQmpSystemReset,
    /// SIGINT, SIGTERM or SIGHUP.
    HostSignal,
    /// Ctrl-A x on the console.
    HostUi,
}

impl Cause {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::GuestShutdown => "guest-shutdown",
            Cause::GuestReset => "guest-reset",
            Cause::GuestPanic => "guest-panic",
            Cause::HostQmpQuit => "host-qmp-quit",
            Cause::HostQmpSystemReset => "host-qmp-system-reset",
            Cause::HostSignal => "host-signal",
            Cause::HostUi => "host-ui",
        }
    }

    /// Whether the guest caused it (the events' `guest` member).
    pub fn by_guest(self) -> bool {
        matches!(
            self,
            Cause::GuestShutdown | Cause::GuestReset | Cause::GuestPanic
        )
    }
}

/// What a panicked guest is left in (`GUEST_PANICKED`'s `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanicAction {
    /// Kept, stopped (`--no-shutdown`).
    Pause,
    /// Powered off.
    Poweroff,
}

/// An event for QMP clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmpEvent {
    /// `SHUTDOWN`: the VM stops running guest code for good (or until reset).
    Shutdown(Cause),
    /// `RESET`: the VM is rebuilt and boots again.
    Reset(Cause),
    /// `STOP`: the vcpus stopped.
    Stop,
    /// `RESUME`: the vcpus run again.
    Resume,
    /// `POWERDOWN`: the ACPI power button was pressed.
    Powerdown,
    /// `GUEST_PANICKED`.
    GuestPanicked(PanicAction),
    /// `VSERPORT_CHANGE` of the guest-agent port: the guest opened or closed it.
    AgentPort {
        /// Whether the port is open now.
        open: bool,
    },
}

impl QmpEvent {
    /// The event's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            QmpEvent::Shutdown(_) => "SHUTDOWN",
            QmpEvent::Reset(_) => "RESET",
            QmpEvent::Stop => "STOP",
            QmpEvent::Resume => "RESUME",
            QmpEvent::Powerdown => "POWERDOWN",
            QmpEvent::GuestPanicked(_) => "GUEST_PANICKED",
            QmpEvent::AgentPort { .. } => "VSERPORT_CHANGE",
        }
    }

    /// The `data` member, if the event has one.
    pub fn data(self) -> Option<Value> {
        match self {
            QmpEvent::Shutdown(c) | QmpEvent::Reset(c) => {
                Some(json!({"guest": c.by_guest(), "reason": c.as_str()}))
            }
            QmpEvent::GuestPanicked(a) => Some(json!({"action": match a {
                PanicAction::Pause => "pause",
                PanicAction::Poweroff => "poweroff",
            }})),
            QmpEvent::AgentPort { open } => Some(json!({"id": AGENT_CHANNEL_ID, "open": open})),
            QmpEvent::Stop | QmpEvent::Resume | QmpEvent::Powerdown => None,
        }
    }

    /// The event as sent, stamped with the current time.
    pub fn to_value(self) -> Value {
        qmp::protocol::event(self.name(), self.data())
    }
}

/// QEMU's rate for `VSERPORT_CHANGE` (per port): at most one event a second.
pub const PORT_EVENT_PERIOD: Duration = Duration::from_secs(1);

/// Rate limit for a guest-driven event, as QEMU's monitor applies to
/// `VSERPORT_CHANGE`: the first event goes out at once and opens a period;
/// events during the period replace each other, and the last one goes out when
/// the period ends (opening a new one). So a guest that opens and closes its
/// port in a loop costs one event a second, and the last state is always told.
#[derive(Debug)]
pub struct Throttle {
    period: Duration,
    /// End of the current period, if one is open.
    until: Option<Instant>,
    pending: Option<QmpEvent>,
}

impl Throttle {
    /// A throttle letting one event through per `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            until: None,
            pending: None,
        }
    }

    /// An event happened at `now`: returns it if it may go out now, otherwise
    /// keeps it (replacing an earlier pending one) for [`Self::due`].
    pub fn offer(&mut self, ev: QmpEvent, now: Instant) -> Option<QmpEvent> {
        if let Some(e) = self.due(now) {
            // The period ended: what was pending goes out; `ev` waits.
            self.pending = Some(ev);
            return Some(e);
        }
        if self.until.is_some() {
            self.pending = Some(ev);
            return None;
        }
        self.until = Some(now + self.period);
        Some(ev)
    }

    /// The pending event, if its period has ended by `now`.
    pub fn due(&mut self, now: Instant) -> Option<QmpEvent> {
        let until = self.until?;
        if now < until {
            return None;
        }
        let ev = self.pending.take();
        self.until = ev.map(|_| now + self.period);
        ev
    }

    /// When [`Self::due`] has something to give.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.and(self.until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_event_a_period_through_and_keeps_the_last() {
        let open = QmpEvent::AgentPort { open: true };
        let closed = QmpEvent::AgentPort { open: false };
        let p = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut t = Throttle::new(p);
        assert_eq!(t.deadline(), None);
        assert_eq!(t.offer(open, t0), Some(open), "the first goes out");
        // A flood within the period: nothing goes out, the last is kept.
        for i in 1..1000u32 {
            let ev = if i % 2 == 1 { closed } else { open };
            assert_eq!(t.offer(ev, t0 + p * i / 1000), None);
        }
        assert_eq!(t.deadline(), Some(t0 + p));
        assert_eq!(t.due(t0 + p / 2), None);
        assert_eq!(t.due(t0 + p), Some(closed), "the last state is told");
        // A new period started then: an event inside it waits.
        assert_eq!(t.offer(open, t0 + p + p / 2), None);
        assert_eq!(t.due(t0 + p * 2), Some(open));
        // A quiet period closes the throttle: the next event goes out at once.
        assert_eq!(t.due(t0 + p * 3), None);
        assert_eq!(t.deadline(), None);
        assert_eq!(t.offer(closed, t0 + p * 10), Some(closed));
        // An event offered after a period ended with one pending: the pending
        // one goes out first, the new one waits for the next period.
        assert_eq!(t.offer(open, t0 + p * 10 + p / 2), None);
        assert_eq!(t.offer(closed, t0 + p * 12), Some(open));
        assert_eq!(t.due(t0 + p * 13), Some(closed));
    }

    #[test]
    fn wire_shapes() {
        let v = QmpEvent::Shutdown(Cause::HostSignal).to_value();
        assert_eq!(v["event"], "SHUTDOWN");
        assert_eq!(v["data"], json!({"guest": false, "reason": "host-signal"}));
        assert!(v["timestamp"]["seconds"].is_u64());
        assert_eq!(
            QmpEvent::Reset(Cause::GuestReset).data(),
            Some(json!({"guest": true, "reason": "guest-reset"}))
        );
        assert_eq!(
            QmpEvent::GuestPanicked(PanicAction::Pause).data(),
            Some(json!({"action": "pause"}))
        );
        assert_eq!(
            QmpEvent::AgentPort { open: true }.to_value()["data"],
            json!({"id": "qga0", "open": true})
        );
        let stop = QmpEvent::Stop.to_value();
        assert_eq!(stop["event"], "STOP");
        assert!(stop.get("data").is_none());
    }

    #[test]
    fn causes_say_who() {
        for c in [Cause::GuestShutdown, Cause::GuestReset, Cause::GuestPanic] {
            assert!(c.by_guest(), "{c:?}");
            assert!(c.as_str().starts_with("guest-"));
        }
        for c in [
            Cause::HostQmpQuit,
            Cause::HostQmpSystemReset,
            Cause::HostSignal,
            Cause::HostUi,
        ] {
            assert!(!c.by_guest(), "{c:?}");
            assert!(c.as_str().starts_with("host-"));
        }
    }
}
