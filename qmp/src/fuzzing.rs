//! Property harnesses driven by arbitrary bytes: the bodies of the cargo-fuzz
//! targets in `fuzz/` and of this crate's stable property tests. Each panics
//! when a property fails. Built with the `fuzzing` feature (and for tests).

use std::path::Path;

use serde_json::{json, Value};

use crate::stream::{Framed, JsonStreamer};

pub use crate::server::fuzzing::dispatch;

/// Message limit of the streamers under test: small, so that the fuzzer
/// reaches the size limit too.
const STREAM_MAX: usize = 4096;

/// A small deterministic generator (xorshift64*), for input-derived choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn feed_chunked(
    s: &mut JsonStreamer,
    input: &[u8],
    mut size: impl FnMut() -> usize,
) -> Vec<Framed> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = size().clamp(1, rest.len());
        s.feed(&rest[..n], &mut out);
        rest = &rest[n..];
        assert!(s.pending() <= STREAM_MAX, "buffer over its limit");
    }
    out
}

/// The JSON streamer: the same items however the input is chunked; raw mode
/// frames exactly the messages parse mode does; the buffer stays within its
/// limit; and whatever came before, `\xff\n{"a":1}` yields `{"a":1}` (0xFF
/// resets the stream anywhere, as in QEMU's lexer).
///
/// The first byte seeds the chunk sizes; the rest is the stream.
pub fn json_streamer(data: &[u8]) {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let whole = feed_chunked(&mut JsonStreamer::new(STREAM_MAX), input, || usize::MAX);
    let bytewise = feed_chunked(&mut JsonStreamer::new(STREAM_MAX), input, || 1);
    assert_eq!(whole, bytewise, "byte-by-byte feeding changes the items");
    let mut rng = Rng::new(u64::from(seed));
    let chunked = feed_chunked(&mut JsonStreamer::new(STREAM_MAX), input, || {
        1 + rng.below(16)
    });
    assert_eq!(whole, chunked, "chunked feeding changes the items");

    let raw = feed_chunked(&mut JsonStreamer::raw(STREAM_MAX), input, || usize::MAX);
    assert_eq!(raw.len(), whole.len(), "raw mode frames other messages");
    for (r, p) in raw.iter().zip(&whole) {
        match (r, p) {
            (Framed::Raw(bytes), Framed::Value(v)) => {
                let parsed: Value = serde_json::from_slice(bytes).expect("raw bytes of a value");
                assert_eq!(&parsed, v);
            }
            (Framed::Raw(bytes), Framed::Error(_)) => {
                assert!(serde_json::from_slice::<Value>(bytes).is_err());
            }
            (r, p) => assert_eq!(r, p),
        }
    }

    if whole.contains(&Framed::TooLarge) {
        return;
    }
    let mut s = JsonStreamer::new(STREAM_MAX);
    let mut out = Vec::new();
    s.feed(input, &mut out);
    if out.contains(&Framed::TooLarge) {
        return;
    }
    out.clear();
    s.feed(b"\xff\n{\"a\":1}", &mut out);
    assert_eq!(
        out.last(),
        Some(&Framed::Value(json!({"a": 1}))),
        "no recovery after 0xFF: {out:?}"
    );
    assert_eq!(s.pending(), 0);
}

/// Runs `harness` on every file of the committed fuzz corpus `target` (in
/// `fuzz/corpus/`) and on `random` inputs made by a seeded generator, the way
/// the stable property tests do. Returns how many inputs were run.
pub fn check_corpus_and_random(target: &str, random: usize, harness: impl Fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    for f in &files {
        harness(&std::fs::read(f).expect("a corpus file"));
        n += 1;
    }
    assert!(n > 0, "the corpus {} is empty", dir.display());
    let mut rng = Rng::new(target.len() as u64);
    for _ in 0..random {
        // Mostly mutations of corpus entries, some pure noise.
        let mut input = if rng.below(4) > 0 {
            std::fs::read(&files[rng.below(files.len())]).expect("a corpus file")
        } else {
            Vec::new()
        };
        for _ in 0..1 + rng.below(16) {
            let at = if input.is_empty() {
                0
            } else {
                rng.below(input.len() + 1)
            };
            match rng.below(3) {
                0 if at < input.len() => input[at] = rng.next_u64() as u8,
                1 if at < input.len() => {
                    input.remove(at);
                }
                _ => input.insert(at, rng.next_u64() as u8),
            }
        }
        harness(&input);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_streamer_properties_hold() {
        check_corpus_and_random("json_streamer", 3000, json_streamer);
    }

    #[test]
    fn dispatch_properties_hold() {
        check_corpus_and_random("qmp_dispatch", 300, dispatch);
    }
}
