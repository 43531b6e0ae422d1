//! A QMP client for tests, and a VM started with a QMP socket.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{socket_path, Vm};

/// A QMP client over a Unix socket, for tests.
pub struct Qmp {
    r: BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
    /// Events received and not yet consumed by [`Qmp::wait_event`].
    pub events: Vec<serde_json::Value>,
    /// The greeting.
    pub greeting: serde_json::Value,
}

impl Qmp {
    /// Connects to `path`, retrying while minivmm is still starting (bounded),
    /// and reads the greeting.
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(240)))
            .expect("timeout");
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: s,
            events: Vec::new(),
            greeting: serde_json::Value::Null,
        };
        q.greeting = q.read().expect("greeting");
        q
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        assert_eq!(
            q.cmd(r#"{"execute":"qmp_capabilities"}"#),
            serde_json::json!({"return": {}})
        );
        q
    }

    /// Changes how long a read may block before the test fails (240 s by default,
    /// for slow nested guests).
    pub fn set_read_timeout(&self, limit: Duration) {
        self.w.set_read_timeout(Some(limit)).expect("timeout");
    }

    /// Reads one message; None at EOF.
    pub fn read(&mut self) -> Option<serde_json::Value> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => None,
            Ok(_) => {
                assert!(l.ends_with("\r\n"), "QMP lines end in CRLF: {l:?}");
                Some(serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
            }
            Err(e) => panic!("QMP read: {e}"),
        }
    }

    /// Sends raw text.
    pub fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).expect("QMP write");
    }

    /// Sends a command and returns its reply; events seen meanwhile are kept.
    pub fn cmd(&mut self, s: &str) -> serde_json::Value {
        self.send(&format!("{s}\n"));
        self.reply()
    }

    /// Reads up to the next reply, keeping events.
    pub fn reply(&mut self) -> serde_json::Value {
        loop {
            let v = self.read().expect("EOF before the reply");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Returns (and consumes) the first event named `name`, reading if needed.
    pub fn wait_event(&mut self, name: &str) -> serde_json::Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            let v = self.read().unwrap_or_else(|| {
                panic!("EOF while waiting for {name}; events: {:?}", self.events)
            });
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                panic!("unexpected reply while waiting for {name}: {v}");
            }
        }
    }

    /// Names of the events received so far and not consumed.
    pub fn event_names(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["event"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

/// A VM started with one QMP Unix socket.
pub struct QmpVm {
    /// The VM.
    pub vm: Vm,
    /// Its QMP socket.
    pub sock: PathBuf,
}

/// Spawns minivmm with `--kernel kernel --qmp unix:<fresh path>` and `extra`.
pub fn qmp_vm(test: &str, kernel: &str, extra: &[&str]) -> QmpVm {
    let sock = socket_path(test);
    let spec = format!("unix:{}", sock.display());
    let mut args = vec!["--kernel", kernel, "--qmp", &spec];
    args.extend_from_slice(extra);
    QmpVm {
        vm: Vm::spawn(&args),
        sock,
    }
}

/// The run state `query-status` reports.
pub fn query_status(q: &mut Qmp) -> String {
    let r = q.cmd(r#"{"execute":"query-status"}"#);
    r["return"]["status"]
        .as_str()
        .unwrap_or_else(|| panic!("bad query-status reply {r}"))
        .to_string()
}

/// The vcpu threads' ids, from `query-cpus-fast`.
pub fn vcpu_tids(q: &mut Qmp) -> Vec<i64> {
    let r = q.cmd(r#"{"execute":"query-cpus-fast"}"#);
    r["return"]
        .as_array()
        .unwrap_or_else(|| panic!("bad query-cpus-fast reply {r}"))
        .iter()
        .filter_map(|c| c["thread-id"].as_i64())
        .collect()
}

/// The `query-chardev` entry labelled `label`.
pub fn chardev(q: &mut Qmp, label: &str) -> serde_json::Value {
    let r = q.cmd(r#"{"execute":"query-chardev"}"#);
    r["return"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["label"] == label))
        .unwrap_or_else(|| panic!("no chardev {label} in {r}"))
        .clone()
}
