#![no_main]
// Sequences of arbitrary records through decode and the flow table: correlation never panics
// and the table stays within its cap.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let size = std::mem::size_of::<tracer_common::PacketEvent>();
    let mut table = tracer::flows::FlowTable::new(64);
    let lookup = |i: u32| tracer::flows::Iface::unnamed(i);
    for chunk in data.chunks(size) {
        if let Ok(obs) = tracer::events::decode(chunk) {
            table.ingest(&obs, &lookup);
        }
    }
    assert!(table.len() <= 64);
    // Every stored flow resolves its hops to tuples without panicking.
    for f in table.iter_newest() {
        assert!(f.path().count() == f.hops.len());
    }
});
