//! QMP messages: requests, replies, errors and events, serialized exactly as QEMU
//! 7.2 writes them (`{"return": {}}` with ", " and ": " separators, QEMU's member
//! order, lines ending in "\r\n").

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// QMP error classes used by minivmm (QEMU's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// Unknown command, or command refused during negotiation.
    CommandNotFound,
}

impl ErrorClass {
    fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class:?}: {desc}")]
pub struct QmpError {
    /// Class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A GenericError.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A CommandNotFound error.
    pub fn not_found(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

/// A reply to a command: `{"return": ..., "id": ...}` or `{"id": ..., "error": ...}`
/// (QEMU's member order).
pub fn reply(result: &Result<Value, QmpError>, id: Option<&Value>) -> Value {
    match result {
        Ok(v) => reply_parts(Ok(v), id),
        Err(e) => reply_parts(Err((e.class.as_str(), &e.desc)), id),
    }
}

/// JSON text passed through as it is (a guest agent's `return` value): one
/// valid JSON value on one line. Replies carrying it are written without
/// building a [`Value`] of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawJson(Vec<u8>);

impl RawJson {
    /// `bytes` if they are one valid JSON value with no line break (a client
    /// reading line by line must get the reply on one line).
    pub fn new(bytes: Vec<u8>) -> Option<Self> {
        if bytes.iter().any(|&b| b == b'\n' || b == b'\r') {
            return None;
        }
        serde_json::from_slice::<&serde_json::value::RawValue>(&bytes).ok()?;
        Some(Self(bytes))
    }

    /// The text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&Value> for RawJson {
    /// `v` written the way QEMU does.
    fn from(v: &Value) -> Self {
        let mut out = Vec::new();
        write_json(v, &mut out);
        Self(out)
    }
}

impl From<Value> for RawJson {
    fn from(v: Value) -> Self {
        Self::from(&v)
    }
}

/// A reply carrying a [`RawJson`] result, on the wire (with "\r\n"), in QEMU's
/// member order.
pub fn reply_wire(result: &Result<RawJson, QmpError>, id: Option<&Value>) -> Vec<u8> {
    match result {
        Ok(raw) => {
            let mut out = Vec::with_capacity(raw.0.len() + 32);
            out.extend_from_slice(b"{\"return\": ");
            out.extend_from_slice(&raw.0);
            if let Some(id) = id {
                out.extend_from_slice(b", \"id\": ");
                write_json(id, &mut out);
            }
            out.extend_from_slice(b"}\r\n");
            out
        }
        Err(e) => to_wire(&reply(&Err(e.clone()), id)),
    }
}

/// [`reply`] for any error class name (the guest agent has its own).
pub fn reply_parts(result: Result<&Value, (&str, &str)>, id: Option<&Value>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(v) => {
            m.insert("return".into(), v.clone());
            if let Some(id) = id {
                m.insert("id".into(), id.clone());
            }
        }
        Err((class, desc)) => {
            if let Some(id) = id {
                m.insert("id".into(), id.clone());
            }
            m.insert("error".into(), json!({"class": class, "desc": desc}));
        }
    }
    Value::Object(m)
}

/// An event with the current time.
pub fn event(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    event_at(name, data, now.as_secs(), now.subsec_micros())
}

/// An event with a given timestamp.
pub fn event_at(name: &str, data: Option<Value>, seconds: u64, micros: u32) -> Value {
    let mut m = Map::new();
    m.insert(
        "timestamp".into(),
        json!({"seconds": seconds, "microseconds": micros}),
    );
    m.insert("event".into(), json!(name));
    if let Some(d) = data {
        m.insert("data".into(), d);
    }
    Value::Object(m)
}

/// The version object (`{"qemu": {"micro", "minor", "major"}, "package"}`).
pub fn version_info(major: u64, minor: u64, micro: u64, package: &str) -> Value {
    json!({"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package})
}

/// The greeting sent on connect.
pub fn greeting(version: &Value) -> Value {
    json!({"QMP": {"version": version, "capabilities": ["oob"]}})
}

/// Serializes like QEMU: `{"a": 1, "b": [1, 2]}`, then "\r\n".
pub fn to_wire(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_json(v, &mut out);
    out.extend_from_slice(b"\r\n");
    out
}

/// Appends `v` serialized the way QEMU's JSON writer does (used by QMP and by
/// qemu-ga): ", " and ": " separators, characters outside printable ASCII
/// escaped as `\uXXXX` (upper-case hex, surrogate pairs beyond the BMP).
pub fn write_json(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            out.push(b'{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_str(k, out);
                out.extend_from_slice(b": ");
                write_json(v, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_json(v, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_str(s, out),
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            ' '..='~' => out.push(c as u8),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{u:04X}").as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

/// Types of command arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    /// JSON integer.
    Int,
    /// JSON string.
    Str,
    /// JSON boolean.
    Bool,
    /// Array of strings.
    StrList,
    /// Anything.
    Any,
}

impl ArgType {
    fn matches(self, v: &Value) -> bool {
        match self {
            ArgType::Int => v.is_i64() || v.is_u64(),
            ArgType::Str => v.is_string(),
            ArgType::Bool => v.is_boolean(),
            ArgType::StrList => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            ArgType::Any => true,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ArgType::Int => "integer",
            ArgType::Str => "string",
            ArgType::Bool => "boolean",
            ArgType::StrList => "array",
            ArgType::Any => "any",
        }
    }
}

/// One argument of a command.
#[derive(Debug, Clone, Copy)]
pub struct ArgSpec {
    /// Name.
    pub name: &'static str,
    /// Type.
    pub ty: ArgType,
    /// Whether it must be present.
    pub required: bool,
}

/// A command a server knows.
#[derive(Debug, Clone, Copy)]
pub struct CommandSpec {
    /// Name.
    pub name: &'static str,
    /// Arguments it accepts.
    pub args: &'static [ArgSpec],
}

/// Checks `args` against `spec` with QEMU's messages.
pub fn check_args(spec: &CommandSpec, args: &Map<String, Value>) -> Result<(), QmpError> {
    for k in args.keys() {
        if !spec.args.iter().any(|a| a.name == k) {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
    }
    for a in spec.args {
        match args.get(a.name) {
            None if a.required => {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is missing",
                    a.name
                )))
            }
            Some(v) if !a.ty.matches(v) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{}', expected: {}",
                    a.name,
                    a.ty.name()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Command name.
    pub name: String,
    /// Arguments (empty when absent).
    pub args: Map<String, Value>,
    /// The `id` member, echoed verbatim.
    pub id: Option<Value>,
    /// Sent as `exec-oob`.
    pub oob: bool,
}

/// Validates the shape of an input value as QEMU does. On error, returns the
/// error and the id to echo (if the input was an object with one).
pub fn parse_request(v: Value) -> Result<Request, (QmpError, Option<Value>)> {
    let Value::Object(mut m) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = m.remove("id");
    let fail = |desc: String, id: Option<Value>| Err((QmpError::generic(desc), id));
    let (cmd, oob) = match (m.remove("execute"), m.remove("exec-oob")) {
        (Some(_), Some(_)) => {
            return fail(
                "QMP input must not have both 'execute' and 'exec-oob'".into(),
                id,
            )
        }
        (Some(c), None) => (c, false),
        (None, Some(c)) => (c, true),
        (None, None) => return fail("QMP input lacks member 'execute'".into(), id),
    };
    let member = if oob { "exec-oob" } else { "execute" };
    let Value::String(name) = cmd else {
        return fail(format!("QMP input member '{member}' must be a string"), id);
    };
    let args = match m.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), id),
    };
    if let Some(k) = m.keys().next() {
        return fail(format!("QMP input member '{k}' is unexpected"), id);
    }
    Ok(Request {
        name,
        args,
        id,
        oob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(v: &Value) -> String {
        String::from_utf8(to_wire(v)).unwrap()
    }

    #[test]
    fn replies_match_qemu_bytes() {
        assert_eq!(wire(&reply(&Ok(json!({})), None)), "{\"return\": {}}\r\n");
        assert_eq!(
            wire(&reply(
                &Ok(json!({"status": "running", "singlestep": false, "running": true})),
                Some(&json!("x-query-status"))
            )),
            "{\"return\": {\"status\": \"running\", \"singlestep\": false, \"running\": true}, \"id\": \"x-query-status\"}\r\n"
        );
        assert_eq!(
            wire(&reply(
                &Err(QmpError::generic("The command query-status does not support OOB")),
                Some(&json!(1))
            )),
            "{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"The command query-status does not support OOB\"}}\r\n"
        );
        assert_eq!(
            wire(&reply(
                &Ok(json!({"x": [1, 2]})),
                Some(&json!({"a": [1, 2]}))
            )),
            "{\"return\": {\"x\": [1, 2]}, \"id\": {\"a\": [1, 2]}}\r\n"
        );
    }

    #[test]
    fn events_and_greeting_match_qemu_bytes() {
        assert_eq!(
            wire(&event_at("STOP", None, 1795254469, 163832)),
            "{\"timestamp\": {\"seconds\": 1795254469, \"microseconds\": 163832}, \"event\": \"STOP\"}\r\n"
        );
        assert_eq!(
            wire(&event_at(
                "RESET",
                Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
                1,
                2
            )),
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"RESET\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-system-reset\"}}\r\n"
        );
        assert_eq!(
            wire(&greeting(&version_info(7, 2, 22, "Debian 1:7.2+dfsg-7+deb12u18+b3"))),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
        let e = event("POWERDOWN", None);
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_700_000_000);
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(wire(&json!({"a\"": "b\n"})), "{\"a\\\"\": \"b\\n\"}\r\n");
        assert_eq!(
            wire(&json!("\u{e9}\u{1F600}\u{7f}")),
            "\"\\u00E9\\uD83D\\uDE00\\u007F\"\r\n"
        );
    }

    #[test]
    fn request_shapes_like_qemu() {
        let e = |v: Value| parse_request(v).unwrap_err();
        assert_eq!(
            e(json!([1, 2, 3])).0.desc,
            "QMP input must be a JSON object"
        );
        assert_eq!(
            e(json!("just a string")).0.desc,
            "QMP input must be a JSON object"
        );
        assert_eq!(
            e(json!({"arguments": {}})).0.desc,
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            e(json!({"execute": 42, "id": 7})),
            (
                QmpError::generic("QMP input member 'execute' must be a string"),
                Some(json!(7))
            )
        );
        assert_eq!(
            e(json!({"execute": "stop", "arguments": 1})).0.desc,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            e(json!({"execute": "stop", "extra": 1})).0.desc,
            "QMP input member 'extra' is unexpected"
        );
        let r = parse_request(json!({"exec-oob": "query-status", "id": 1})).unwrap();
        assert!(r.oob);
        let r = parse_request(json!({"execute": "cpu", "arguments": {"index": 0}, "id": null}))
            .unwrap();
        assert_eq!(r.id, Some(Value::Null), "a null id is still echoed");
        assert_eq!(r.args["index"], json!(0));
    }

    #[test]
    fn argument_checks_like_qemu() {
        const CPU: CommandSpec = CommandSpec {
            name: "cpu",
            args: &[ArgSpec {
                name: "index",
                ty: ArgType::Int,
                required: true,
            }],
        };
        let args = |v: Value| v.as_object().unwrap().clone();
        assert!(check_args(&CPU, &args(json!({"index": 1}))).is_ok());
        assert_eq!(
            check_args(&CPU, &args(json!({}))).unwrap_err().desc,
            "Parameter 'index' is missing"
        );
        assert_eq!(
            check_args(&CPU, &args(json!({"index": "x"})))
                .unwrap_err()
                .desc,
            "Invalid parameter type for 'index', expected: integer"
        );
        assert_eq!(
            check_args(&CPU, &args(json!({"index": 1, "bogus": 1})))
                .unwrap_err()
                .desc,
            "Parameter 'bogus' is unexpected"
        );
    }
}
