//! `--flow-log -|PATH`: the state hands over each flow once ([`Shared::flow_log_take`]); this
//! turns them into NDJSON lines ([`FlowLogRecord`]) on the agent's tick and writes them on a
//! thread of its own, so a slow disk or a full stdout pipe never holds the tick, the API or
//! the ring reader. Between the two sits a bounded queue: when it is full, lines are dropped
//! and counted (`/metrics`, `/healthz`), never buffered without bound.
use std::{
    io::Write,
    path::PathBuf,
    str::FromStr,
    sync::{
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracer_model::FlowLogRecord;

use super::AgentError;
use crate::{clock::mono_now_ns, state::Shared};

/// Lines queued for the writer at most (a line is 1-2 KiB).
const QUEUE_LINES: usize = 8192;
/// Lines gathered into one write at most.
const BATCH_BYTES: usize = 64 * 1024;
/// How long shutdown waits for the writer to write what is left.
const FINISH_WITHIN: Duration = Duration::from_secs(5);

/// Where the flow log goes: `-` is stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowLogTarget {
    Stdout,
    File(PathBuf),
}

impl FromStr for FlowLogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("give `-` for stdout or a file path".into()),
            "-" => Ok(FlowLogTarget::Stdout),
            path => Ok(FlowLogTarget::File(path.into())),
        }
    }
}

/// Where the lines go, opened.
pub struct Sink(Box<dyn Write + Send>);

/// The flow log of a running agent.
pub struct FlowLog {
    tx: Mutex<Option<SyncSender<String>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    node: Option<String>,
}

impl FlowLog {
    /// Opens the target: a file for appending, created if missing.
    pub fn open(target: &FlowLogTarget) -> Result<Sink, AgentError> {
        Ok(Sink(match target {
            FlowLogTarget::Stdout => Box::new(std::io::stdout()),
            FlowLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(|e| AgentError::FlowLog(path.display().to_string(), e))?,
            ),
        }))
    }

    /// Starts the writer on `sink`.
    pub fn start(
        sink: Sink,
        node: Option<String>,
        shared: Arc<Shared>,
    ) -> Result<FlowLog, AgentError> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let writer = std::thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || write_lines(rx, sink.0, &shared))
            .map_err(|e| AgentError::FlowLog("(writer thread)".into(), e))?;
        Ok(FlowLog {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            node,
        })
    }

    /// Queues the flows due now; never waits for the writer.
    pub fn tick(&self, shared: &Shared) {
        self.send(shared, false, None);
    }

    /// Queues every flow not written yet (the reader has stopped), then waits a while for the
    /// writer to write them all.
    pub fn finish(&self, shared: &Shared) {
        let deadline = Instant::now() + FINISH_WITHIN;
        self.send(shared, true, Some(deadline));
        // Closing the queue ends the writer once it has written what is queued.
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            while !w.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if w.is_finished() {
                let _ = w.join();
            } else {
                tracing::warn!("the flow log's writer did not finish in time; lines may be lost");
            }
        }
    }

    fn send(&self, shared: &Shared, shutdown: bool, wait_until: Option<Instant>) {
        let Some(counters) = shared.flow_log_counters() else {
            return;
        };
        let flows = shared.flow_log_take(shutdown);
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(tx) = tx else { return };
        let logged_at = shared.clock.rfc3339(mono_now_ns());
        for (logged, flow) in flows {
            let record = FlowLogRecord {
                logged,
                logged_at: logged_at.clone(),
                node: self.node.clone(),
                flow,
            };
            let mut line = match serde_json::to_string(&record) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "flow log: a flow could not be serialised");
                    counters.write_failed(1);
                    continue;
                }
            };
            line.push('\n');
            if queue(&tx, line, wait_until) {
                counters.queued(logged);
            } else {
                counters.dropped();
            }
        }
    }
}

/// Hands `line` to the writer; waits for room until `wait_until` if given. False: dropped.
fn queue(tx: &SyncSender<String>, mut line: String, wait_until: Option<Instant>) -> bool {
    loop {
        match tx.try_send(line) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(back)) => match wait_until {
                Some(t) if Instant::now() < t => {
                    line = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => return false,
            },
        }
    }
}

/// The writer: gathers what is queued into one write, until the queue closes.
fn write_lines(rx: Receiver<String>, mut out: Box<dyn Write + Send>, shared: &Shared) {
    let mut batch = String::new();
    while let Ok(first) = rx.recv() {
        batch.clear();
        batch.push_str(&first);
        let mut lines = 1u64;
        while batch.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(l) => {
                    batch.push_str(&l);
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        if let Err(e) = out.write_all(batch.as_bytes()).and_then(|()| out.flush()) {
            let errors = shared
                .flow_log_counters()
                .map_or(lines, |c| c.write_failed(lines));
            // Said on the first loss and then on every doubling, not once per line.
            if errors == lines || errors.is_power_of_two() {
                tracing::warn!(error = %e, lost = errors, "flow log: writing failed; lines lost");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_stdout_or_a_path() {
        assert_eq!("-".parse(), Ok(FlowLogTarget::Stdout));
        assert_eq!(
            "/var/log/f.ndjson".parse(),
            Ok(FlowLogTarget::File("/var/log/f.ndjson".into()))
        );
        assert!("".parse::<FlowLogTarget>().is_err());
    }
}
