//! The ring's one reader: a thread of its own that drains `EVENTS` on a timer, decodes each
//! batch, keeps the last records for `xdplb log`, hands them to followers and to the file
//! writer. Nothing here takes the daemon's lock, so a flood of records never slows its
//! other work, and a slow disk only costs records (counted), never the reader's pace.

use super::{
    file::FileWriter, monotonic_ns, wall_offset_ns, Decoder, Entry, Filter, LogSpec, Names,
};
use crate::api::Response;
use aya::maps::{MapData, RingBuf};
use lb_common::LogRecord;
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
use tracing::{error, warn};

/// How often the ring is drained: at the default budget about 200 records per pass, and the
/// 2 MiB ring holds well over a second of them.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Records kept for `xdplb log` without `--follow`.
pub const RECENT_RECORDS: usize = 10_000;
/// Records a follower may fall behind by before it is told it missed some.
const FOLLOW_BACKLOG: usize = 16_384;

/// Userspace counts, for metrics.
#[derive(Debug, Default)]
pub struct LogCounters {
    /// Records read from the ring.
    pub read: AtomicU64,
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
    pub fn start(events: Option<RingBuf<MapData>>, spec: Option<&LogSpec>) -> Self {
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

    /// The maps now mean `names` (called after every apply).
    pub fn set_names(&self, names: Names) {
        lock(&self.inner.decoder).push(monotonic_ns(), names);
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

fn read_loop(mut ring: RingBuf<MapData>, inner: &Inner) {
    let mut records: Vec<LogRecord> = Vec::new();
    while !inner.stop.load(Ordering::Relaxed) {
        std::thread::sleep(DRAIN_INTERVAL);
        while let Some(item) = ring.next() {
            match record_of(&item) {
                Some(record) => records.push(record),
                None => warn!(
                    len = item.len(),
                    "connection log: record of unexpected size"
                ),
            }
        }
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

/// The record in a ring item (the kernel reserves exactly one `LogRecord`).
fn record_of(bytes: &[u8]) -> Option<LogRecord> {
    if bytes.len() != std::mem::size_of::<LogRecord>() {
        return None;
    }
    // SAFETY: the length matches and LogRecord is plain old data (any bytes are valid);
    // read_unaligned makes no alignment assumption.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<LogRecord>()) })
}
