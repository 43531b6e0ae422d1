//! virtio-console over virtio-mmio with guest memory and register accesses from the input: no panic, writes only to writable descriptors and used rings, reset restores the initial state.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::virtio::fuzzing::virtio_console(data));
