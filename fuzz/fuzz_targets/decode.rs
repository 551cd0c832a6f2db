#![no_main]
// Ring-buffer records: any bytes decode or error, never panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tracer::events::decode(data);
});
