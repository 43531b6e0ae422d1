//! The agent proxy under random operations and a manual clock: every request answered exactly once, one in flight, latency within the timeout, memory bounded by the input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agent_proxy::fuzzing::agent_proxy(data));
