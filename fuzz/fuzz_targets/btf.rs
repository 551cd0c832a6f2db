#![no_main]
// BTF blobs: the agent parses the kernel's, but a corrupt one must not take it down.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = tracer::btf::Btf::parse(data) {
        let _ = btf.member_offset("sk_buff", "head");
    }
});
