//! qemu-ga's wire format: replies serialized the way QEMU's JSON writer does
//! (`{"return": {}}` with ", " and ": " separators, characters outside printable
//! ASCII escaped as `\uXXXX`), each followed by a single "\n".

use serde_json::Value;

use crate::AgentError;

/// The byte qemu-ga writes before the reply to `guest-sync-delimited`, and that a
/// client writes to make the agent drop partial input. It never occurs in JSON text.
pub const SENTINEL: u8 = 0xFF;

/// The error qemu-ga 7.2 answers to a 0xFF byte in its input.
pub const STRAY_SENTINEL: &str = "JSON parse error, stray '\u{FFFD}'";

/// Serializes `v` like qemu-ga and appends "\n".
pub fn to_wire(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    qmp::protocol::write_json(v, &mut out);
    out.push(b'\n');
    out
}

/// Compact serialization (what the proxy sends to the agent), with "\n".
pub fn to_request_wire(v: &Value) -> Vec<u8> {
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// A reply object in QEMU's member order: `{"return": ..., "id": ...}` or
/// `{"id": ..., "error": {"class": ..., "desc": ...}}`.
pub fn reply(result: &Result<Value, AgentError>, id: Option<&Value>) -> Value {
    let result = result
        .as_ref()
        .map_err(|e| (e.class.as_str(), e.desc.as_str()));
    qmp::protocol::reply_parts(result, id)
}

/// Whether `v` has the shape of an agent reply (an object with `return` or `error`).
pub fn is_reply(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|m| m.contains_key("return") || m.contains_key("error"))
}

/// Converts an agent reply into the QMP-side result.
pub fn reply_result(v: &Value) -> Result<Value, AgentError> {
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    let e = v.get("error");
    let field = |name: &str| e.and_then(|e| e.get(name)).and_then(Value::as_str);
    Err(AgentError {
        class: field("class").unwrap_or("GenericError").to_string(),
        desc: field("desc")
            .unwrap_or("Guest agent returned an error without description")
            .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &Value) -> Vec<u8> {
        to_wire(v)
    }

    #[test]
    fn matches_qemu_ga_bytes() {
        // Byte-for-byte lines from the qemu-ga 7.2 transcript.
        let e = AgentError::generic(STRAY_SENTINEL);
        assert_eq!(
            s(&reply(&Err(e), None)),
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n"
        );
        assert_eq!(s(&json!({"return": 1234})), b"{\"return\": 1234}\n");
        assert_eq!(
            s(&json!({"return": {"kernel-release": "6.1.0-56-cloud-amd64", "machine": "x86_64"}})),
            b"{\"return\": {\"kernel-release\": \"6.1.0-56-cloud-amd64\", \"machine\": \"x86_64\"}}\n"
        );
        assert_eq!(
            s(&json!({"a": ["\u{7f}\u{1}\"\\/\n", "\u{1F600}", null, true, -1.5]})),
            b"{\"a\": [\"\\u007F\\u0001\\\"\\\\/\\n\", \"\\uD83D\\uDE00\", null, true, -1.5]}\n"
        );
    }

    #[test]
    fn reply_shapes() {
        assert_eq!(
            reply(&Ok(json!({})), Some(&json!(7))).to_string(),
            r#"{"return":{},"id":7}"#
        );
        assert_eq!(
            reply(&Err(AgentError::generic("x")), Some(&json!("a"))).to_string(),
            r#"{"id":"a","error":{"class":"GenericError","desc":"x"}}"#
        );
        assert!(is_reply(&json!({"return": 1})));
        assert!(is_reply(&json!({"error": {}})));
        assert!(!is_reply(&json!([1])));
        assert!(!is_reply(&json!({"event": "X"})));
        assert_eq!(reply_result(&json!({"return": [1]})), Ok(json!([1])));
        assert_eq!(
            reply_result(&json!({"error": {"class": "CommandNotFound", "desc": "d"}})),
            Err(AgentError {
                class: "CommandNotFound".into(),
                desc: "d".into()
            })
        );
        assert_eq!(
            reply_result(&json!({"error": 5})).unwrap_err().class,
            "GenericError"
        );
    }
}
