//! The rings' one reader: a thread of its own that drains `EVENTS` on a timer, decodes each
//! batch, keeps the last records for `xdplb log`, hands them to followers and to the file
//! writer. Nothing here takes the daemon's lock, so a flood of records never slows its
//! other work, and a slow disk only costs records (counted), never the reader's pace.

use super::{
    file::FileWriter, monotonic_ns, wall_offset_ns, Decoder, Entry, Filter, LogRing, LogSpec, Names,
};
use crate::api::Response;
use lb_common::{LogRecord, LOG_RECORDS_PER_CPU};
use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::Duration,
};
use tokio::sync::{broadcast, mpsc};
use tracing::error;

/// How often the rings are read at most: at the default budget about 200 records per pass,
/// and each CPU's ring holds 4096.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// How often at least: when records come faster, the reader comes back sooner (see
/// [`next_pass`]).
const MIN_DRAIN_INTERVAL: Duration = Duration::from_millis(1);
/// Records per pass the reader aims to stay under: a quarter of one CPU's ring, so even a
/// burst on one CPU has room before it overwrites anything.
const PASS_RECORDS: f64 = LOG_RECORDS_PER_CPU as f64 / 4.0;
/// Records kept for `xdplb log` without `--follow`.
pub const RECENT_RECORDS: usize = 10_000;
/// Records a follower may fall behind by before it is told it missed some.
const FOLLOW_BACKLOG: usize = 16_384;

/// Userspace counts, for metrics.
#[derive(Debug, Default)]
pub struct LogCounters {
    /// Records read from the rings.
    pub read: AtomicU64,
    /// Records their CPU overwrote before they were read (the reader was too slow).
    pub dropped_overrun: AtomicU64,
    /// Records written to the file.
    pub written: AtomicU64,
    /// Records the file writer could not take (it is behind: slow disk).
    pub dropped_file_backlog: AtomicU64,
    /// Failed opens and writes of the file.
    pub write_errors: AtomicU64,
}

struct Inner {
    decoder: Mutex<Decoder>,
    recent: Mutex<VecDeque<Arc<Entry>>>,
    follow: broadcast::Sender<Arc<Entry>>,
    counters: Arc<LogCounters>,
    file: FileWriter,
    stop: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The connection log of a running daemon.
pub struct ConnLog {
    inner: Arc<Inner>,
    reader: Option<JoinHandle<()>>,
}

impl ConnLog {
    /// Starts reading `events` (when the object has the ring) and writing `spec`'s file.
    pub fn start(events: Option<LogRing>, spec: Option<&LogSpec>) -> Self {
        let counters = Arc::new(LogCounters::default());
        let inner = Arc::new(Inner {
            decoder: Mutex::new(Decoder::default()),
            recent: Mutex::new(VecDeque::new()),
            follow: broadcast::channel(FOLLOW_BACKLOG).0,
            file: FileWriter::start(counters.clone()),
            counters,
            stop: AtomicBool::new(false),
        });
        inner.file.open(spec.and_then(|s| s.path.clone()));
        let reader = events.map(|ring| {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("xdplb-connlog".into())
                .spawn(move || read_loop(ring, &inner))
                .expect("spawning the connection-log reader")
        });
        Self { inner, reader }
    }

    /// The maps now mean `names` (called after every apply). Record times come from jiffies
    /// and run up to two ticks behind `CLOCK_MONOTONIC` (see `lb_common::jiffies_to_ns`):
    /// stamped that much earlier, the set covers every record made from now on, and records
    /// of the last two ticks before the apply may get the new names too.
    pub fn set_names(&self, names: Names) {
        let since = monotonic_ns().saturating_sub(2 * crate::clock::tick_ns());
        lock(&self.inner.decoder).push(since, names);
    }

    /// Reopens the file, or switches to `spec`'s (SIGHUP / `xdplb reload`: logrotate).
    pub fn configure(&self, spec: Option<&LogSpec>) {
        self.inner.file.open(spec.and_then(|s| s.path.clone()));
    }

    /// The last `limit` records matching `filter`, oldest first.
    pub fn recent(&self, filter: &Filter, limit: usize) -> Vec<Entry> {
        last_matching(&lock(&self.inner.recent), filter, limit)
    }

    /// The last `limit` records matching `filter`, then every new one, as `Log` batches
    /// (`LogMissed` when the follower fell behind). The stream ends when the receiver is
    /// dropped.
    pub fn follow(&self, filter: Filter, limit: usize) -> mpsc::Receiver<Response> {
        let (mut records, last) = {
            let recent = lock(&self.inner.recent);
            (
                self.inner.follow.subscribe(),
                last_matching(&recent, &filter, limit),
            )
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            if tx.send(Response::Log(last)).await.is_err() {
                return;
            }
            loop {
                let first = tokio::select! {
                    received = records.recv() => received,
                    _ = tx.closed() => return,
                };
                let message = match first {
                    Ok(entry) => {
                        // Whatever else is already queued goes in the same batch.
                        let mut batch = vec![entry];
                        while let Ok(entry) = records.try_recv() {
                            batch.push(entry);
                        }
                        let batch: Vec<Entry> = batch
                            .into_iter()
                            .filter(|e| filter.matches(e))
                            .map(|e| (*e).clone())
                            .collect();
                        if batch.is_empty() {
                            continue;
                        }
                        Response::Log(batch)
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => Response::LogMissed(missed),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    pub fn counters(&self) -> &LogCounters {
        &self.inner.counters
    }
}

impl Drop for ConnLog {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The last `limit` of `recent` matching `filter`, oldest first.
fn last_matching(recent: &VecDeque<Arc<Entry>>, filter: &Filter, limit: usize) -> Vec<Entry> {
    let mut out: Vec<Entry> = recent
        .iter()
        .rev()
        .filter(|e| filter.matches(e))
        .take(limit)
        .map(|e| (**e).clone())
        .collect();
    out.reverse();
    out
}

/// The pause before the next pass after `records` came in `elapsed`: the time
/// [`PASS_RECORDS`] take at that rate, within [`MIN_DRAIN_INTERVAL`]..=[`DRAIN_INTERVAL`].
fn next_pass(records: usize, elapsed: Duration) -> Duration {
    if records == 0 {
        return DRAIN_INTERVAL;
    }
    elapsed
        .mul_f64(PASS_RECORDS / records as f64)
        .clamp(MIN_DRAIN_INTERVAL, DRAIN_INTERVAL)
}

fn read_loop(mut ring: LogRing, inner: &Inner) {
    let mut records: Vec<LogRecord> = Vec::new();
    let mut pause = DRAIN_INTERVAL;
    let mut last_pass = std::time::Instant::now();
    while !inner.stop.load(Ordering::Relaxed) {
        std::thread::sleep(pause);
        let lost = ring.read(&mut records);
        pause = next_pass(records.len() + lost as usize, last_pass.elapsed());
        last_pass = std::time::Instant::now();
        inner
            .counters
            .dropped_overrun
            .fetch_add(lost, Ordering::Relaxed);
        // One ring per CPU: merged in time order (stable, so each CPU's order stays).
        records.sort_by_key(|r| r.time_ns);
        if records.is_empty() {
            continue;
        }
        inner
            .counters
            .read
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        let offset = wall_offset_ns();
        let batch: Vec<Arc<Entry>> = {
            let decoder = lock(&inner.decoder);
            records
                .drain(..)
                .map(|r| Arc::new(decoder.decode(&r, offset)))
                .collect()
        };
        {
            // Sent to followers under the lock: a follower that subscribes under it sees
            // each record either in the recent ones or in its stream, never both or neither.
            let mut recent = lock(&inner.recent);
            recent.extend(batch.iter().cloned());
            let excess = recent.len().saturating_sub(RECENT_RECORDS);
            recent.drain(..excess);
            for entry in &batch {
                // No follower is not an error.
                let _ = inner.follow.send(entry.clone());
            }
        }
        if let Err(e) = inner.file.write(batch) {
            error!("connection log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reader_comes_back_sooner_when_records_come_faster() {
        // Idle or at the default budget (200 per 10 ms): every 10 ms.
        assert_eq!(next_pass(0, DRAIN_INTERVAL), DRAIN_INTERVAL);
        assert_eq!(next_pass(200, DRAIN_INTERVAL), DRAIN_INTERVAL);
        // 2,048 in 10 ms: back after 5 ms, for about 1,024.
        assert_eq!(next_pass(2048, DRAIN_INTERVAL), Duration::from_millis(5));
        // A flood: never more often than every millisecond.
        assert_eq!(next_pass(100_000, DRAIN_INTERVAL), MIN_DRAIN_INTERVAL);
    }
}
