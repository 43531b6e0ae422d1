//! qemu-ga's wire format: replies serialized the way QEMU's JSON writer does
//! (`{"return": {}}` with ", " and ": " separators, characters outside printable
//! ASCII escaped as `\uXXXX`), each followed by a single "\n".

use qmp::protocol::RawJson;
use serde::Deserialize;
use serde_json::value::RawValue;
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

/// What the proxy reads of an agent reply: `return` stays text (it is passed
/// through, never built into a [`Value`]), `error` is looked at only if small.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    /// The `return` member's text.
    #[serde(rename = "return", borrow, default)]
    pub ret: Option<&'a RawValue>,
    /// The `error` member's text.
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
    /// The `id` member's text (qemu-ga echoes the request's).
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
}

/// Largest `error` member read for its class and description.
const MAX_ERROR: usize = 64 << 10;

impl<'a> Envelope<'a> {
    /// The envelope of `msg` if it is a reply: a valid JSON object with a
    /// `return` or an `error` member. Costs no allocation beyond the error's.
    pub fn parse(msg: &'a [u8]) -> Option<Self> {
        let first = msg.iter().find(|b| !b.is_ascii_whitespace())?;
        if *first != b'{' {
            return None;
        }
        let env: Self = serde_json::from_slice(msg).ok()?;
        (env.ret.is_some() || env.error.is_some()).then_some(env)
    }

    /// The QMP-side result: the `return` text as it is, or the error.
    pub fn result(&self) -> Result<RawJson, AgentError> {
        if let Some(r) = self.ret {
            let text = r.get().as_bytes();
            return Ok(RawJson::new(text.to_vec()).unwrap_or_else(|| {
                // Line breaks (as whitespace) inside: rewrite it on one line.
                serde_json::from_slice::<Value>(text)
                    .map(RawJson::from)
                    .unwrap_or_else(|_| RawJson::from(Value::Null))
            }));
        }
        let e = self
            .error
            .filter(|e| e.get().len() <= MAX_ERROR)
            .and_then(|e| serde_json::from_str::<Value>(e.get()).ok());
        let field = |name: &str| {
            e.as_ref()
                .and_then(|e| e.get(name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Err(AgentError {
            class: field("class").unwrap_or_else(|| "GenericError".into()),
            desc: field("desc")
                .unwrap_or_else(|| "Guest agent returned an error without description".into()),
        })
    }

    /// Whether it is qemu-ga's answer to input it could not parse.
    pub fn is_parse_error(&self) -> bool {
        self.ret.is_none()
            && self
                .result()
                .is_err_and(|e| e.desc.starts_with("JSON parse error"))
    }

    /// Whether it carries an `id` that is not `request_id` (the id of the
    /// request in flight): then it answers an earlier request, one that ended
    /// without this reply (answered by stray output, or abandoned). Numbers
    /// compare by value (an agent may write `1.0` as `1`).
    pub fn answers_another(&self, request_id: Option<&Value>) -> bool {
        let Some(id) = self.id else { return false };
        let Some(request_id) = request_id else {
            return true;
        };
        match serde_json::from_str::<Value>(id.get()) {
            Ok(Value::Number(a)) => match request_id {
                Value::Number(b) => a != *b && a.as_f64() != b.as_f64(),
                _ => true,
            },
            Ok(v) => v != *request_id,
            Err(_) => true,
        }
    }

    /// Whether it is `{"return": id}`.
    pub fn returns_id(&self, id: i64) -> bool {
        self.error.is_none()
            && self
                .ret
                .is_some_and(|r| serde_json::from_str::<i64>(r.get()).ok() == Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &Value) -> Vec<u8> {
        to_wire(v)
    }

    #[test]
    fn replies_are_matched_on_their_id() {
        let env = |m: &'static str| Envelope::parse(m.as_bytes()).expect("a reply");
        let ours = json!("#c1");
        assert!(!env(r##"{"return": {}, "id": "#c1"}"##).answers_another(Some(&ours)));
        assert!(env(r##"{"return": {}, "id": "#c0"}"##).answers_another(Some(&ours)));
        assert!(env(r##"{"return": {}, "id": "#c0"}"##).answers_another(None));
        // No id in the reply (qemu-ga's parse errors): not known to be stale.
        assert!(!env(r#"{"return": {}}"#).answers_another(Some(&ours)));
        assert!(!env(r#"{"return": {}, "id": 1}"#).answers_another(Some(&json!(1.0))));
        assert!(env(r#"{"return": {}, "id": 2}"#).answers_another(Some(&json!(1))));
        let obj = json!({"b": 1, "a": [1, "x"]});
        assert!(!env(r#"{"id": {"a": [1, "x"], "b": 1}, "return": 0}"#).answers_another(Some(&obj)));
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
        let env = |m: &str| Envelope::parse(m.as_bytes()).map(|e| e.result());
        assert_eq!(
            env(r#"{"return": [1, {"a": "b"}]}"#),
            Some(Ok(RawJson::new(br#"[1, {"a": "b"}]"#.to_vec()).unwrap()))
        );
        assert_eq!(
            env(r#"{"error": {"class": "CommandNotFound", "desc": "d"}}"#),
            Some(Err(AgentError {
                class: "CommandNotFound".into(),
                desc: "d".into()
            }))
        );
        assert_eq!(
            env(r#"{"error": 5}"#).unwrap().unwrap_err().class,
            "GenericError"
        );
        // Not replies.
        for m in [
            r#"[1]"#,
            r#"{"event": "X"}"#,
            r#"{"return": 1"#,
            "7",
            r#"  [{"return": 1}]"#,
        ] {
            assert!(Envelope::parse(m.as_bytes()).is_none(), "{m}");
        }
        // A payload with line breaks is put on one line.
        assert_eq!(
            env("{\"return\": {\n  \"a\": 1\n}}"),
            Some(Ok(RawJson::from(json!({"a": 1}))))
        );
        let e = Envelope::parse(br#"{"return": 42}"#).unwrap();
        assert!(e.returns_id(42) && !e.returns_id(43) && !e.is_parse_error());
        let e = Envelope::parse(
            br#"{"error": {"class": "GenericError", "desc": "JSON parse error, x"}}"#,
        )
        .unwrap();
        assert!(e.is_parse_error() && !e.returns_id(42));
    }
}
