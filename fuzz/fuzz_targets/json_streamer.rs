//! The JSON streamer: the same messages however the input is chunked; garbage then a newline and an object always yields it; buffers bounded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp::fuzzing::json_streamer(data));
