//! The QMP command table: each command minivmm answers is declared once, with
//! its arguments and its handler. The QMP server checks arguments against it,
//! `query-commands` lists it, and [`Runtime`]'s [`Handler`] dispatches through it.
//! `guest-*` commands are not in the table: they pass through to the guest agent.

use std::sync::LazyLock;

use qmp::protocol::{version_info, ArgSpec, ArgType, CommandSpec, QmpError, Request};
use qmp::server::{Handler, Reply};
use serde_json::{json, Value};

use super::Runtime;
use crate::config::SerialBackend;
use crate::machine::{Input, RunState};
use crate::qmp_event::{QmpEvent, AGENT_CHANNEL_ID};

type Handle = fn(&mut Runtime, &Request) -> Result<Value, QmpError>;

/// One QMP command.
pub struct Command {
    /// Name and arguments, checked by the QMP server before `run`.
    pub spec: CommandSpec,
    run: Handle,
}

const fn cmd(name: &'static str, run: Handle) -> Command {
    Command {
        spec: CommandSpec { name, args: &[] },
        run,
    }
}

fn empty() -> Value {
    json!({})
}

/// Runs a lifecycle command through the machine; `{}` on success.
fn lifecycle(rt: &mut Runtime, input: Input) -> Result<Value, QmpError> {
    rt.input(input).map(|()| empty())
}

/// Every command minivmm answers besides `qmp_capabilities` (which the server
/// handles), in `query-commands` order.
pub const COMMANDS: &[Command] = &[
    cmd("query-status", |rt, _| Ok(rt.query_status())),
    cmd("query-kvm", |_, _| {
        Ok(json!({"enabled": true, "present": true}))
    }),
    cmd("query-version", |_, _| Ok(version())),
    cmd("query-name", |rt, _| {
        Ok(match &rt.cfg.name {
            Some(n) => json!({"name": n}),
            None => empty(),
        })
    }),
    cmd("query-uuid", |rt, _| {
        let uuid = rt.cfg.uuid.as_deref();
        Ok(json!({"UUID": uuid.unwrap_or("00000000-0000-0000-0000-000000000000")}))
    }),
    cmd("query-commands", |_, _| Ok(query_commands())),
    cmd("query-chardev", |rt, _| Ok(rt.query_chardev())),
    cmd("query-cpus-fast", |rt, _| Ok(rt.query_cpus_fast())),
    cmd("query-cpus", |rt, _| Ok(rt.query_cpus())),
    cmd("query-block", |_, _| Ok(json!([]))),
    cmd("query-blockstats", |_, _| Ok(json!([]))),
    cmd("query-mice", |_, _| Ok(json!([]))),
    cmd("query-vnc", |_, _| Ok(json!({"enabled": false}))),
    cmd("query-spice", |_, _| Ok(json!({"enabled": false}))),
    cmd("query-migrate", |_, _| Ok(empty())),
    cmd("stop", |rt, _| lifecycle(rt, Input::Stop)),
    cmd("cont", |rt, _| lifecycle(rt, Input::Cont)),
    cmd("system_reset", |rt, _| lifecycle(rt, Input::SystemReset)),
    cmd("system_powerdown", |rt, _| {
        lifecycle(rt, Input::SystemPowerdown)
    }),
    cmd("quit", |rt, _| lifecycle(rt, Input::Quit)),
    Command {
        spec: CommandSpec {
            name: "cpu",
            args: &[ArgSpec {
                name: "index",
                ty: ArgType::Int,
                required: true,
            }],
        },
        // A no-op kept for compatibility, as in QEMU.
        run: |_, _| Ok(empty()),
    },
];

static SPECS: LazyLock<Vec<CommandSpec>> =
    LazyLock::new(|| COMMANDS.iter().map(|c| c.spec).collect());

fn query_commands() -> Value {
    let names = COMMANDS
        .iter()
        .map(|c| c.spec.name)
        .chain(["qmp_capabilities"])
        .map(|n| json!({"name": n}));
    Value::Array(names.collect())
}

/// The greeting's and `query-version`'s version object.
pub fn version() -> Value {
    let n = |s: &str| s.parse::<u64>().unwrap_or(0);
    version_info(
        n(env!("CARGO_PKG_VERSION_MAJOR")),
        n(env!("CARGO_PKG_VERSION_MINOR")),
        n(env!("CARGO_PKG_VERSION_PATCH")),
        concat!("minivmm ", env!("CARGO_PKG_VERSION")),
    )
}

impl Runtime {
    fn query_status(&self) -> Value {
        let state = self.state();
        json!({
            "status": state.as_str(),
            "singlestep": false,
            "running": state == RunState::Running,
        })
    }

    fn query_chardev(&self) -> Value {
        let serial = match &self.cfg.serial {
            SerialBackend::Stdio => "stdio".into(),
            SerialBackend::File(p) => format!("file:{}", p.display()),
            SerialBackend::None => "null".into(),
            SerialBackend::Stderr => "file:/dev/stderr".into(),
        };
        let mut v = vec![json!({"frontend-open": true, "filename": serial, "label": "serial0"})];
        for m in &self.monitors {
            v.push(json!({"frontend-open": true, "filename": m.filename, "label": m.label}));
        }
        if let Some(agent) = &self.agent {
            let agent = agent.borrow();
            if let Some(filename) = agent.socket_filename() {
                v.push(json!({
                    "frontend-open": agent.is_connected(),
                    "filename": filename,
                    "label": AGENT_CHANNEL_ID,
                }));
            }
        }
        Value::Array(v)
    }

    fn thread_ids(&self) -> Vec<i32> {
        let vm = self.vm.as_ref();
        vm.map(|v| v.vcpu_thread_ids().to_vec()).unwrap_or_default()
    }

    fn query_cpus_fast(&self) -> Value {
        let cpus = self.thread_ids().into_iter().enumerate().map(|(i, tid)| {
            json!({
                "thread-id": tid,
                "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                "qom-path": format!("/machine/unattached/device[{i}]"),
                "cpu-index": i,
                "target": "x86_64",
            })
        });
        Value::Array(cpus.collect())
    }

    fn query_cpus(&self) -> Value {
        let cpus = self.thread_ids().into_iter().enumerate().map(
            |(i, tid)| json!({"CPU": i, "current": i == 0, "halted": false, "thread_id": tid}),
        );
        Value::Array(cpus.collect())
    }

    /// Hands a `guest-*` command to the agent proxy; the reply comes later.
    fn forward_to_agent(&mut self, req: &Request) -> Reply {
        let Some(agent) = &self.agent else {
            return Reply::Now(Err(QmpError::generic(
                "No guest agent channel: start minivmm with --agent unix:PATH",
            )));
        };
        self.next_agent_token += 1;
        let token = self.next_agent_token;
        let mut cmd = serde_json::Map::new();
        cmd.insert("execute".into(), json!(req.name));
        if !req.args.is_empty() {
            cmd.insert("arguments".into(), Value::Object(req.args.clone()));
        }
        agent.borrow_mut().submit_qmp(token, Value::Object(cmd));
        Reply::Later(token)
    }
}

impl Handler for Runtime {
    fn commands(&self) -> &[CommandSpec] {
        &SPECS
    }

    fn passes_through(&self, name: &str) -> bool {
        name.starts_with("guest-")
    }

    fn execute(&mut self, req: &Request, events: &mut Vec<Value>) -> Reply {
        let reply = if self.passes_through(&req.name) {
            self.forward_to_agent(req)
        } else {
            match COMMANDS.iter().find(|c| c.spec.name == req.name) {
                Some(c) => Reply::Now((c.run)(self, req)),
                None => Reply::Now(Err(QmpError::not_found(format!(
                    "The command {} has not been found",
                    req.name
                )))),
            }
        };
        events.extend(self.take_events().into_iter().map(QmpEvent::to_value));
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_unique_and_listed() {
        let mut names: Vec<&str> = COMMANDS.iter().map(|c| c.spec.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COMMANDS.len());
        let listed = query_commands();
        let listed: Vec<&str> = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(listed.len(), COMMANDS.len() + 1);
        assert_eq!(listed.last(), Some(&"qmp_capabilities"));
        assert_eq!(SPECS.len(), COMMANDS.len());
        assert!(SPECS
            .iter()
            .zip(COMMANDS)
            .all(|(s, c)| s.name == c.spec.name));
    }

    #[test]
    fn version_names_minivmm() {
        let v = version();
        assert!(v["package"]
            .as_str()
            .is_some_and(|p| p.starts_with("minivmm ")));
        assert!(v["qemu"]["major"].is_u64());
    }
}
