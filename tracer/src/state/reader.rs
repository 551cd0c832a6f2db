//! What the ring reader writes: decoded records into the flow table, and how far the evidence
//! reaches (lost records, the drain point).
use super::{lock, Shared};
use crate::{
    clock::mono_now_ns,
    events::Observation,
    flows::{CounterRead, Gaps, Iface},
};

impl Shared {
    /// The reader found the ring empty at `drained_ns` (and has ingested everything before):
    /// notes how far the evidence reaches and whether the kernel had to drop records since the
    /// last time. The counter read is timed on its own: the reader may have been busy for a
    /// while since `drained_ns`, and losses in that while are counted by this read.
    pub(crate) fn reader_drained(&self, drained_ns: u64) {
        let read = lock(&self.counters).as_ref().map(|c| {
            let start_ns = mono_now_ns();
            let lost = c.lost();
            CounterRead {
                lost,
                start_ns,
                end_ns: mono_now_ns(),
            }
        });
        let mut gaps = lock(&self.gaps);
        match read {
            Some(read) => gaps.look(drained_ns, read),
            None => gaps.drained(drained_ns),
        }
    }

    /// The reader has been idle a while with the ring empty: the kernel's pending-bytes gauge
    /// is stale. (The reader's next pass notes the drain point itself.)
    pub(crate) fn reader_idle(&self) {
        if let Some(c) = lock(&self.counters).as_mut() {
            c.clear_pending();
        }
    }

    /// Lost records and the reader's progress, for /diagnoses and /metrics.
    pub fn gaps(&self) -> Gaps {
        lock(&self.gaps).clone()
    }

    /// Ingests a batch of decoded records; `decode_errors` counts the ones that were not.
    pub fn ingest(&self, batch: &[Observation], decode_errors: u64) {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        // Asked once per new hop, not per record.
        let lookup = |ifindex: u32| match names.get(&ifindex) {
            Some(i) => i.clone(),
            None => Iface::unnamed(ifindex),
        };
        {
            let mut table = lock(&self.table);
            for obs in batch {
                table.ingest(obs, &lookup);
            }
        }
        let mut st = lock(&self.reader);
        st.records += batch.len() as u64 + decode_errors;
        st.decode_errors += decode_errors;
    }

    pub(crate) fn sweep(&self, now_ns: u64) {
        lock(&self.table).sweep(now_ns);
        // Follow wall-clock steps (NTP) in rendered times and since= filters.
        self.clock.resync();
    }
}
