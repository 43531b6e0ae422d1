//! A stand-in for qemu-ga, for the unit tests and the property harness.

use qmp::stream::{Framed, JsonStreamer};
use serde_json::{json, Value};

use crate::{wire, AgentError, NO_REPLY_COMMANDS};

/// A stand-in for qemu-ga 7.2, byte for byte as in the reference transcript:
/// malformed input (including a 0xFF byte) gets a `JSON parse error` reply,
/// `guest-sync-delimited` replies start with 0xFF, replies end in "\n", and the
/// commands without success response write nothing.
pub(crate) struct FakeAgent {
    pub(crate) input: JsonStreamer,
    pub(crate) out: Vec<u8>,
    /// Requests seen, in order.
    pub(crate) seen: Vec<Value>,
    /// A hung agent: answers are kept in `held` until released.
    pub(crate) hung: bool,
    pub(crate) held: Vec<u8>,
    /// Write two replies for malformed input (qemu-ga does after some garbage).
    pub(crate) double_errors: bool,
}

impl FakeAgent {
    pub(crate) fn new() -> Self {
        Self {
            input: JsonStreamer::default(),
            out: Vec::new(),
            seen: Vec::new(),
            hung: false,
            held: Vec::new(),
            double_errors: false,
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        let mut items = vec![];
        self.input.feed(data, &mut items);
        for item in items {
            let mut out = Vec::new();
            match item {
                Framed::Value(v) => self.execute(v, &mut out),
                Framed::Error(msg) => {
                    let msg = msg.replace("\\uFFFD", "\u{FFFD}");
                    let e = Err(AgentError::generic(msg));
                    out.extend(wire::to_wire(&wire::reply(&e, None)));
                    if self.double_errors {
                        let e = Err(AgentError::generic("JSON parse error, expecting value"));
                        out.extend(wire::to_wire(&wire::reply(&e, None)));
                    }
                }
                Framed::TooLarge | Framed::Raw(_) => panic!("the proxy sent an oversized request"),
            }
            if self.hung {
                self.held.extend(out);
            } else {
                self.out.extend(out);
            }
        }
    }

    pub(crate) fn release(&mut self) {
        self.hung = false;
        let held = std::mem::take(&mut self.held);
        self.out.extend(held);
    }

    pub(crate) fn execute(&mut self, v: Value, out: &mut Vec<u8>) {
        self.seen.push(v.clone());
        let name = v["execute"].as_str().unwrap_or("").to_string();
        let args = &v["arguments"];
        let r = match name.as_str() {
            "guest-sync-delimited" => {
                out.push(0xff);
                Ok(args["id"].clone())
            }
            "guest-sync" => Ok(args["id"].clone()),
            "guest-ping" => Ok(json!({})),
            "guest-get-osinfo" => Ok(json!({
                "kernel-release": "6.1.0-56-cloud-amd64",
                "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)",
                "machine": "x86_64"
            })),
            "guest-exec-status" => Err(AgentError::generic("Invalid parameter 'pid'")),
            n if NO_REPLY_COMMANDS.contains(&n) => return,
            n => Err(AgentError {
                class: "CommandNotFound".into(),
                desc: format!("The command {n} has not been found"),
            }),
        };
        out.extend(wire::to_wire(&wire::reply(&r, v.get("id"))));
    }

    /// Names of the commands received.
    #[cfg(test)]
    pub(crate) fn commands(&self) -> Vec<String> {
        self.seen
            .iter()
            .map(|v| v["execute"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}
