#![no_main]
// HTTP query strings as a user (or an attacker) sends them.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = tracer_model::FlowQuery::parse(Some(s));
    }
});
