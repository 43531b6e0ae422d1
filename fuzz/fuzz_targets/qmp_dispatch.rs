//! QMP dispatch over real sockets with a fake handler: replies exactly once, in order, never to another client; inbox bounded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qmp::fuzzing::dispatch(data));
