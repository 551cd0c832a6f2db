//! What the ring reader writes: decoded records into the flow table, and how far the evidence
//! reaches (lost records, the drain point).
use super::{lock, Shared};
use crate::{
    events::Observation,
    flows::{Gaps, Iface},
    hooks::KernelCounters,
};

impl Shared {
    /// The reader has emptied the ring at `now_ns`: notes how far the evidence reaches and
    /// whether the kernel had to drop records since the last time.
    pub(crate) fn reader_drained(&self, now_ns: u64) {
        let lost = lock(&self.counters).as_ref().map(KernelCounters::lost);
        let mut gaps = lock(&self.gaps);
        match lost {
            Some(lost) => gaps.look(now_ns, lost),
            None => gaps.drained(now_ns),
        }
    }

    /// The reader has been idle a while with the ring empty.
    pub(crate) fn reader_idle(&self, now_ns: u64) {
        if let Some(c) = lock(&self.counters).as_mut() {
            c.clear_pending();
        }
        self.reader_drained(now_ns);
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
