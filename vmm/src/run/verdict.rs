//! How a run ended: the verdict, minivmm's exit status, and the result file.

use std::time::Instant;

use run_protocol::Exit;
use serde_json::{json, Map, Value};

use super::link::RunReport;
use crate::machine::Outcome;
use crate::vcpu::VcpuRegisters;

/// What happened to the command, as `--result` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It exited (its status is minivmm's).
    Exited,
    /// A signal killed it (minivmm exits 128 + the signal).
    Signaled,
    /// No such command (127).
    NotFound,
    /// Not executable (126).
    NotExecutable,
    /// `--timeout` expired (124).
    Timeout,
    /// The kernel panicked (125).
    Panic,
    /// The VM failed before the command finished (125).
    VmError,
}

impl Verdict {
    /// Its name in the result file.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Exited => "exited",
            Verdict::Signaled => "signaled",
            Verdict::NotFound => "not-found",
            Verdict::NotExecutable => "not-executable",
            Verdict::Timeout => "timeout",
            Verdict::Panic => "panic",
            Verdict::VmError => "vm-error",
        }
    }
}

/// The end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The verdict.
    pub verdict: Verdict,
    /// minivmm's exit status.
    pub status: i32,
    /// The command's own exit status, when it exited.
    pub command_status: Option<i32>,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// What to tell the user on stderr, if anything.
    pub message: Option<String>,
}

impl Ending {
    fn new(verdict: Verdict, status: i32) -> Self {
        Self {
            verdict,
            status,
            command_status: None,
            signal: None,
            message: None,
        }
    }

    fn say(mut self, msg: impl Into<String>) -> Self {
        self.message = Some(msg.into());
        self
    }
}

/// The verdict for a VM that ended with `outcome` after the channel reported
/// `report`. A share whose daemon ended during the run makes the
/// command's end untrustworthy (it got I/O errors on that share): the VM
/// failed, whatever the command's status (kept in the result).
pub fn ending(outcome: &Outcome, report: &RunReport) -> Ending {
    let end = ending_of(outcome, report);
    match (end.verdict, report.shares_lost.first()) {
        (
            Verdict::Exited | Verdict::Signaled | Verdict::NotFound | Verdict::NotExecutable,
            Some(lost),
        ) => {
            let what = match (end.command_status, end.signal) {
                (Some(c), _) => format!("the command exited {c}"),
                (_, Some(n)) => format!("the command was killed by signal {n}"),
                _ => end.message.clone().unwrap_or_default(),
            };
            Ending {
                verdict: Verdict::VmError,
                status: 125,
                message: Some(format!("{lost} during the run; {what}")),
                ..end
            }
        }
        _ => end,
    }
}

fn ending_of(outcome: &Outcome, report: &RunReport) -> Ending {
    let never_started = report.ready_at.is_none();
    match outcome {
        Outcome::CommandEnded => match report.ended.as_ref().map(|(_, e)| e) {
            Some(Exit::Exited(c)) => Ending {
                command_status: Some(*c),
                ..Ending::new(Verdict::Exited, c & 0xff)
            },
            Some(Exit::Signaled(n)) => Ending {
                signal: Some(*n),
                ..Ending::new(Verdict::Signaled, 128 + n)
            },
            Some(Exit::NotFound(t)) => Ending::new(Verdict::NotFound, 127).say(t.clone()),
            Some(Exit::NotExecutable(t)) => Ending::new(Verdict::NotExecutable, 126).say(t.clone()),
            Some(Exit::InitFailed(t)) => {
                Ending::new(Verdict::VmError, 125).say(format!("the guest's init failed: {t}"))
            }
            None => Ending::new(Verdict::VmError, 125).say("the command's end was not reported"),
        },
        Outcome::Timeout(s) => {
            let when = if never_started {
                "before the guest's init reached the host (the kernel was still booting)"
            } else if report.started_at.is_none() {
                "before the command started"
            } else {
                "while the command ran"
            };
            Ending::new(Verdict::Timeout, 124)
                .say(format!("--timeout of {s} s expired {when}; VM stopped"))
        }
        Outcome::Panicked => Ending::new(Verdict::Panic, 125).say("the guest kernel panicked"),
        Outcome::DebugExit(v) => {
            let status = (devices::debug_exit::exit_status(*v) & 0xff) as i32;
            Ending {
                command_status: Some(status),
                ..Ending::new(Verdict::Exited, status)
            }
        }
        Outcome::Signal(n) => {
            Ending::new(Verdict::VmError, 128 + n).say(outcome.message().unwrap_or_default())
        }
        Outcome::PowerOff if never_started => Ending::new(Verdict::VmError, 125).say(
            "the guest powered off before its init reached the host: the kernel may lack \
             virtio-mmio or virtio-console (build them in, or give --modules DIR)",
        ),
        Outcome::PowerOff => Ending::new(Verdict::VmError, 125)
            .say("the guest powered off before the command finished"),
        Outcome::RebootRefused => {
            Ending::new(Verdict::VmError, 125).say("the guest rebooted before the command finished")
        }
        Outcome::Failed(e) => Ending::new(Verdict::VmError, 125).say(format!("the VM failed: {e}")),
        Outcome::Quit | Outcome::QmpQuit => Ending::new(Verdict::VmError, 125)
            .say(outcome.message().unwrap_or_else(|| "quit over QMP".into())),
    }
}

/// `{"id": 0, "rip": "0x...", ...}`.
fn vcpu_json(v: &VcpuRegisters) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(v.id));
    for (name, value) in &v.regs {
        m.insert((*name).into(), json!(format!("{value:#x}")));
    }
    Value::Object(m)
}

/// The vcpus' registers as lines for stderr.
pub fn describe_vcpus(vcpus: &[VcpuRegisters]) -> Vec<String> {
    vcpus
        .iter()
        .map(|v| {
            let regs: Vec<String> = v.regs.iter().map(|(n, x)| format!("{n}={x:#x}")).collect();
            format!("vcpu{}: {}", v.id, regs.join(" "))
        })
        .collect()
}

fn ms(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_millis() as u64
}

/// The `--result` object.
pub fn result_json(end: &Ending, report: &RunReport, spawned: Instant, now: Instant) -> Value {
    let mut r = Map::new();
    r.insert("verdict".into(), json!(end.verdict.as_str()));
    r.insert("exit_status".into(), json!(end.status));
    if let Some(c) = end.command_status {
        r.insert("command_status".into(), json!(c));
    }
    if let Some(s) = end.signal {
        r.insert("signal".into(), json!(s));
    }
    let mut t = Map::new();
    if let Some(ready) = report.ready_at {
        t.insert("to_init".into(), json!(ms(spawned, ready)));
    }
    if let Some(started) = report.started_at {
        t.insert("to_command_start".into(), json!(ms(spawned, started)));
        let end_at = report.ended.as_ref().map_or(now, |(at, _)| *at);
        t.insert("command".into(), json!(ms(started, end_at)));
    }
    t.insert("total".into(), json!(ms(spawned, now)));
    r.insert("timings_ms".into(), Value::Object(t));
    if let Some(m) = &end.message {
        r.insert("message".into(), json!(m));
    }
    if matches!(
        end.verdict,
        Verdict::Panic | Verdict::Timeout | Verdict::VmError
    ) {
        let mut d = Map::new();
        d.insert(
            "kernel_log".into(),
            json!(super::klog::merge(&report.kmsg, &report.console)),
        );
        if !report.vcpus.is_empty() {
            d.insert(
                "vcpus".into(),
                Value::Array(report.vcpus.iter().map(vcpu_json).collect()),
            );
        }
        r.insert("diagnostics".into(), Value::Object(d));
    }
    Value::Object(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(e: Exit) -> RunReport {
        let now = Instant::now();
        RunReport {
            ready_at: Some(now),
            started_at: Some(now),
            ended: Some((now, e)),
            ..RunReport::default()
        }
    }

    #[test]
    fn statuses_follow_the_table() {
        let cases = [
            (Exit::Exited(0), Verdict::Exited, 0),
            (Exit::Exited(7), Verdict::Exited, 7),
            (Exit::Signaled(9), Verdict::Signaled, 137),
            (
                Exit::NotFound("x: not found".into()),
                Verdict::NotFound,
                127,
            ),
            (Exit::NotExecutable("x".into()), Verdict::NotExecutable, 126),
            (Exit::InitFailed("mount".into()), Verdict::VmError, 125),
        ];
        for (exit, verdict, status) in cases {
            let e = ending(&Outcome::CommandEnded, &ended(exit.clone()));
            assert_eq!((e.verdict, e.status), (verdict, status), "{exit:?}");
        }
        let none = RunReport::default();
        assert!(ending(&Outcome::Timeout(5), &none)
            .message
            .unwrap()
            .contains("expired before the guest's init reached the host"));
        for (o, v, s) in [
            (Outcome::Timeout(5), Verdict::Timeout, 124),
            (Outcome::Panicked, Verdict::Panic, 125),
            (Outcome::PowerOff, Verdict::VmError, 125),
            (Outcome::RebootRefused, Verdict::VmError, 125),
            (Outcome::Failed("KVM".into()), Verdict::VmError, 125),
            (Outcome::DebugExit(3), Verdict::Exited, 7),
            (Outcome::Signal(15), Verdict::VmError, 143),
        ] {
            let e = ending(&o, &none);
            assert_eq!((e.verdict, e.status), (v, s), "{o:?}");
        }
        assert!(ending(&Outcome::PowerOff, &none)
            .message
            .unwrap()
            .contains("--modules"));
    }

    #[test]
    fn the_result_object() {
        let t0 = Instant::now();
        let mut rep = ended(Exit::Exited(3));
        rep.kmsg.push_back("6,1,2,-;hello".into());
        let e = ending(&Outcome::CommandEnded, &rep);
        let v = result_json(&e, &rep, t0, Instant::now());
        assert_eq!(v["verdict"], "exited");
        assert_eq!(v["exit_status"], 3);
        assert_eq!(v["command_status"], 3);
        for k in ["to_init", "to_command_start", "command", "total"] {
            assert!(v["timings_ms"][k].is_u64(), "{k} in {v}");
        }
        assert!(v.get("diagnostics").is_none());
        let e = ending(&Outcome::Panicked, &rep);
        let v = result_json(&e, &rep, t0, Instant::now());
        assert_eq!(v["verdict"], "panic");
        assert_eq!(v["diagnostics"]["kernel_log"][0], "6,1,2,-;hello");
        assert!(v["diagnostics"].get("vcpus").is_none());
        rep.vcpus = vec![VcpuRegisters {
            id: 0,
            regs: vec![("rip", 0xffff_ffff_8100_0000), ("rsp", 0x1000)],
        }];
        let e = ending(&Outcome::Timeout(5), &rep);
        assert_eq!(
            e.message.as_deref(),
            Some("--timeout of 5 s expired while the command ran; VM stopped")
        );
        let v = result_json(&e, &rep, t0, Instant::now());
        assert_eq!(
            v["diagnostics"]["vcpus"],
            json!([{"id": 0, "rip": "0xffffffff81000000", "rsp": "0x1000"}])
        );
        assert_eq!(
            describe_vcpus(&rep.vcpus),
            ["vcpu0: rip=0xffffffff81000000 rsp=0x1000"]
        );
    }

    #[test]
    fn a_share_lost_while_the_command_ran_is_a_vm_error() {
        let lost = "the virtiofsd of share0 ended (the guest got I/O errors on that share)";
        let mut rep = ended(Exit::Exited(1));
        rep.shares_lost = vec![lost.to_string()];
        let e = ending(&Outcome::CommandEnded, &rep);
        assert_eq!(
            (e.verdict, e.status, e.command_status),
            (Verdict::VmError, 125, Some(1)),
            "the command's own status is kept for the result file"
        );
        assert_eq!(
            e.message.as_deref(),
            Some(format!("{lost} during the run; the command exited 1").as_str())
        );
        let mut rep = ended(Exit::Signaled(9));
        rep.shares_lost = vec![lost.to_string()];
        let e = ending(&Outcome::CommandEnded, &rep);
        assert_eq!((e.verdict, e.signal), (Verdict::VmError, Some(9)));
        // What already says the VM failed or timed out stays as it is.
        assert_eq!(ending(&Outcome::Timeout(5), &rep).verdict, Verdict::Timeout);
        assert_eq!(ending(&Outcome::Panicked, &rep).verdict, Verdict::Panic);
        // Without a lost share nothing changes.
        let e = ending(&Outcome::CommandEnded, &ended(Exit::Exited(1)));
        assert_eq!((e.verdict, e.status), (Verdict::Exited, 1));
    }
}
