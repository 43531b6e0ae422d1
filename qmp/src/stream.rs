//! Splits a QMP byte stream into JSON messages, the way QEMU's JSON lexer and
//! streamer do: messages are delimited by bracket depth, not by lines, so a
//! command may arrive split across writes and several may arrive in one write.
//! After a lexical error the input is skipped up to the next structural or
//! control character, so a client can always recover: a newline does it after
//! an error, and a 0xFF byte (never valid in JSON text, as in QEMU's lexer)
//! does it anywhere, even inside an unfinished message or string. (A newline
//! inside an unfinished object is whitespace, so multi-line JSON works.)

use serde_json::Value;

/// Largest message accepted; a client that exceeds it is misbehaving.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;
/// Deepest nesting accepted (QEMU's limit).
pub const MAX_NESTING: usize = 1024;

/// One framed item.
#[derive(Debug, Clone, PartialEq)]
pub enum Framed {
    /// A complete JSON value.
    Value(Value),
    /// A complete message's bytes, not parsed ([`JsonStreamer::raw`]): framing
    /// found its end, but whether it is valid JSON is for the caller to check.
    Raw(Vec<u8>),
    /// Bad input; the text is QEMU's description ("JSON parse error, ...").
    Error(String),
    /// The message grew past the size limit: the stream is not usable any more.
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    String { escaped: bool },
    Scalar,
    Recovery,
}

/// Incremental JSON message splitter.
#[derive(Debug)]
pub struct JsonStreamer {
    state: State,
    buf: Vec<u8>,
    depth: usize,
    scalar_start: usize,
    bad_keyword: Option<String>,
    max: usize,
    failed: bool,
    /// Hand out messages as bytes instead of parsing them.
    raw: bool,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_MESSAGE)
    }
}

/// Whether `b` ends a run of plain string contents: a quote, a backslash, a
/// control byte or 0xFE/0xFF (see [`JsonStreamer::byte`]).
fn special_in_string(b: u8) -> bool {
    (b == b'"') | (b == b'\\') | !(0x20..0xfe).contains(&b)
}

/// How many bytes at the start of `s` are plain string contents. Whole
/// chunks are checked without an early exit, which the compiler vectorises:
/// most of a large message is such bytes (a file's base64), and a byte at a
/// time this scan was most of the proxy's work on an agent file read.
fn plain_run(s: &[u8]) -> usize {
    const CHUNK: usize = 64;
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + CHUNK) {
        if chunk
            .iter()
            .fold(false, |any, &b| any | special_in_string(b))
        {
            break;
        }
        i += CHUNK;
    }
    i + s[i..]
        .iter()
        .position(|&b| special_in_string(b))
        .unwrap_or(s.len() - i)
}

fn is_structural(b: u8) -> bool {
    matches!(b, b'[' | b']' | b'{' | b'}' | b':' | b',')
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

fn stray(b: u8) -> String {
    let c = if b.is_ascii() {
        char::from(b).escape_default().to_string()
    } else {
        "\\uFFFD".to_string()
    };
    format!("JSON parse error, stray '{c}'")
}

impl JsonStreamer {
    /// A streamer accepting messages of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            state: State::Start,
            buf: Vec::new(),
            depth: 0,
            scalar_start: 0,
            bad_keyword: None,
            max,
            failed: false,
            raw: false,
        }
    }

    /// A streamer that hands out each message's bytes ([`Framed::Raw`]) instead
    /// of a parsed value: its memory is the message's bytes, whatever they hold
    /// (a `serde_json::Value` of `[0,0,0,...]` takes 16 times its text).
    pub fn raw(max: usize) -> Self {
        Self {
            raw: true,
            ..Self::new(max)
        }
    }

    /// Bytes of the message being assembled.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.bad_keyword = None;
    }

    fn complete(&mut self, out: &mut Vec<Framed>) {
        let item = if let Some(kw) = self.bad_keyword.take() {
            Framed::Error(format!("JSON parse error, invalid keyword '{kw}'"))
        } else if self.raw {
            Framed::Raw(std::mem::take(&mut self.buf))
        } else {
            match serde_json::from_slice::<Value>(&self.buf) {
                Ok(v) => Framed::Value(v),
                Err(e) => Framed::Error(format!("JSON parse error, {}", describe(&e))),
            }
        };
        out.push(item);
        self.reset();
    }

    fn end_scalar(&mut self) {
        let tok = &self.buf[self.scalar_start..];
        if tok[0].is_ascii_alphabetic() && !matches!(tok, b"true" | b"false" | b"null") {
            self.bad_keyword
                .get_or_insert_with(|| String::from_utf8_lossy(tok).into_owned());
        }
    }

    fn error(&mut self, msg: String, out: &mut Vec<Framed>) {
        out.push(Framed::Error(msg));
        self.reset();
        self.state = State::Recovery;
    }

    /// Feeds bytes; appends the items they complete to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Framed>) {
        if self.failed {
            return;
        }
        let mut i = 0;
        while i < input.len() {
            // Fast path for the plain bytes inside a string (most of a large
            // message, e.g. a file's base64): one copy for the whole run. The
            // same as `byte` for each of them.
            let run = match self.state {
                State::String { escaped: false } => plain_run(&input[i..]),
                _ => 0,
            };
            if run > 0 {
                self.buf.extend_from_slice(&input[i..i + run]);
                i += run;
            } else {
                self.byte(input[i], out);
                i += 1;
            }
            if self.buf.len() > self.max {
                self.failed = true;
                self.reset();
                out.push(Framed::TooLarge);
                return;
            }
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Framed>) {
        loop {
            match self.state {
                State::Recovery => {
                    if b < 0x20 && b != b'\t' || b >= 0xfe || is_structural(b) {
                        self.state = State::Start;
                        continue;
                    }
                    return;
                }
                State::String { escaped } => {
                    // As QEMU's lexer: control characters and 0xFE/0xFF (never
                    // in UTF-8) end a string with an error, so 0xFF resets the
                    // stream wherever it comes.
                    if !(0x20..0xfe).contains(&b) {
                        return self.error(stray(b), out);
                    }
                    self.buf.push(b);
                    self.state = match (escaped, b) {
                        (true, _) => State::String { escaped: false },
                        (false, b'\\') => State::String { escaped: true },
                        (false, b'"') => {
                            self.state = State::Start;
                            if self.depth == 0 {
                                self.complete(out);
                            }
                            return;
                        }
                        _ => State::String { escaped: false },
                    };
                    return;
                }
                State::Scalar => {
                    if is_scalar_byte(b) {
                        self.buf.push(b);
                        return;
                    }
                    self.end_scalar();
                    self.state = State::Start;
                    if self.depth == 0 {
                        self.complete(out);
                    }
                    continue;
                }
                State::Start => {
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {
                            if self.depth > 0 {
                                self.buf.push(b);
                            }
                        }
                        b'{' | b'[' => {
                            self.depth += 1;
                            self.buf.push(b);
                            if self.depth > MAX_NESTING {
                                self.error("JSON nesting depth limit exceeded".into(), out);
                            }
                        }
                        b'}' | b']' | b':' | b',' => {
                            self.buf.push(b);
                            if matches!(b, b'}' | b']') {
                                self.depth = self.depth.saturating_sub(1);
                            }
                            if self.depth == 0 {
                                self.complete(out);
                            }
                        }
                        b'"' => {
                            self.buf.push(b);
                            self.state = State::String { escaped: false };
                        }
                        b if is_scalar_byte(b) => {
                            self.scalar_start = self.buf.len();
                            self.buf.push(b);
                            self.state = State::Scalar;
                        }
                        b => self.error(stray(b), out),
                    }
                    return;
                }
            }
        }
    }
}

fn describe(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    // serde_json appends " at line L column C"; QEMU's messages have no position.
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed_all(s: &mut JsonStreamer, chunks: &[&[u8]]) -> Vec<Framed> {
        let mut out = vec![];
        for c in chunks {
            s.feed(c, &mut out);
        }
        out
    }

    /// Whole chunks (the fast path through strings) and single bytes frame
    /// the same: strings with escapes, control bytes, 0xFF, a size limit.
    #[test]
    fn runs_inside_strings_frame_as_single_bytes_do() {
        let long = format!("{{\"s\": \"{}\"}}", "x".repeat(300));
        let inputs: [&[u8]; 6] = [
            b"{\"a\": \"plain\", \"b\": \"esc \\\" \\\\ \\u0041 end\"} [\"x\"]",
            b"{\"a\": \"ctl \x01 here\"} {\"b\": 1}",
            b"{\"a\": \"ff \xff\"} {\"c\": \"\xfe\"} 7 ",
            b"\"top-level string\" {\"u\": \"\xc3\xa9\"}",
            long.as_bytes(),
            b"{\"unterminated\": \"abc",
        ];
        for input in inputs {
            for max in [64, 1 << 20] {
                let mut whole = JsonStreamer::new(max);
                let a = feed_all(&mut whole, &[input]);
                let mut bytes = JsonStreamer::new(max);
                let chunks: Vec<&[u8]> = input.chunks(1).collect();
                let b = feed_all(&mut bytes, &chunks);
                assert_eq!(a, b, "{:?} max {max}", String::from_utf8_lossy(input));
            }
        }
    }

    #[test]
    fn plain_runs_end_at_the_first_special_byte() {
        for len in [0, 1, 63, 64, 65, 200] {
            let plain = vec![b'A'; len];
            assert_eq!(plain_run(&plain), len);
            for special in [b'"', b'\\', 0x00, 0x1f, 0xfe, 0xff] {
                for at in [0, len / 2, len] {
                    let mut s = plain.clone();
                    s.insert(at, special);
                    s.extend_from_slice(b"tail");
                    assert_eq!(plain_run(&s), at, "len {len} byte {special:#x} at {at}");
                }
            }
        }
        assert_eq!(plain_run(b"\x7f and \xc3\xa9 are plain\""), 18);
    }

    #[test]
    fn split_and_joined_messages() {
        let mut s = JsonStreamer::default();
        let out = feed_all(&mut s, &[b"{\"execute\": \"query-kvm\"", b"\n", b"}"]);
        assert_eq!(out, vec![Framed::Value(json!({"execute": "query-kvm"}))]);
        let out = feed_all(&mut s, &[b"{\"a\":1}{\"b\":[2,{\"c\":\"}\"}]}  "]);
        assert_eq!(
            out,
            vec![
                Framed::Value(json!({"a": 1})),
                Framed::Value(json!({"b": [2, {"c": "}"}]}))
            ]
        );
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn byte_by_byte() {
        let mut s = JsonStreamer::default();
        let msg = br#"{"execute":"qmp_capabilities","id":{"x":[1,"\"y"]}}"#;
        let chunks: Vec<&[u8]> = msg.chunks(1).collect();
        let out = feed_all(&mut s, &chunks);
        assert_eq!(
            out,
            vec![Framed::Value(
                json!({"execute":"qmp_capabilities","id":{"x":[1,"\"y"]}})
            )]
        );
    }

    #[test]
    fn top_level_scalars_and_arrays() {
        let mut s = JsonStreamer::default();
        let out = feed_all(&mut s, &[b"[1,2,3]\n\"just a string\"\n42\n"]);
        assert_eq!(
            out,
            vec![
                Framed::Value(json!([1, 2, 3])),
                Framed::Value(json!("just a string")),
                Framed::Value(json!(42)),
            ]
        );
    }

    #[test]
    fn invalid_keyword_like_qemu_then_recovery() {
        let mut s = JsonStreamer::default();
        let out = feed_all(&mut s, &[b"{bad json}\n{\"execute\":\"x\"}\n"]);
        assert_eq!(
            out,
            vec![
                Framed::Error("JSON parse error, invalid keyword 'bad'".into()),
                Framed::Value(json!({"execute": "x"})),
            ]
        );
    }

    #[test]
    fn stray_bytes_and_recovery() {
        let mut s = JsonStreamer::default();
        let out = feed_all(&mut s, &[b"\xff{\"execute\":\"x\"}\n"]);
        assert_eq!(
            out[0],
            Framed::Error("JSON parse error, stray '\\uFFFD'".into())
        );
        assert_eq!(out[1], Framed::Value(json!({"execute": "x"})));
        let out = feed_all(&mut s, &[b"{\"a\": \x01 garbage garbage\n{\"b\":1}"]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], Framed::Error(e) if e.starts_with("JSON parse error, stray")));
        assert_eq!(out[1], Framed::Value(json!({"b": 1})));
    }

    #[test]
    fn syntax_errors_are_reported_once() {
        let mut s = JsonStreamer::default();
        let out = feed_all(&mut s, &[b"{\"a\" 1}{\"ok\":true}"]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], Framed::Error(e) if e.starts_with("JSON parse error, ")));
        assert_eq!(out[1], Framed::Value(json!({"ok": true})));
        let out = feed_all(&mut s, &[b"}"]);
        assert!(matches!(&out[0], Framed::Error(_)), "stray close: {out:?}");
    }

    #[test]
    fn oversized_message_fails_the_stream() {
        let mut s = JsonStreamer::new(1000);
        let mut out = vec![];
        s.feed(b"{\"execute\":\"", &mut out);
        s.feed(&[b'a'; 2000], &mut out);
        assert_eq!(out, vec![Framed::TooLarge]);
        s.feed(b"\"}", &mut out);
        assert_eq!(out.len(), 1, "nothing after failure");
        assert!(s.pending() <= 1001);
        // Whitespace between messages costs nothing.
        let mut s = JsonStreamer::new(1000);
        s.feed(&[b' '; 5000], &mut out);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn deep_nesting_is_an_error() {
        let mut s = JsonStreamer::default();
        let mut out = vec![];
        s.feed(&vec![b'['; MAX_NESTING + 1], &mut out);
        assert_eq!(
            out,
            vec![Framed::Error("JSON nesting depth limit exceeded".into())]
        );
    }
}
