//! The JSON-lines file: a thread of its own that writes batches from the reader, so a slow or
//! full disk delays nobody. Reopened on request (SIGHUP, `xdplb reload`): logrotate renames
//! the file, the next batch goes to a new one at the configured path.

use super::{reader::LogCounters, Entry};
use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tracing::{error, info};

/// Batches (one per drain of the ring, about 10 ms) the writer may be behind by: seconds of
/// records at the default budget; beyond that, records are dropped and counted.
const FILE_BACKLOG: usize = 512;
/// How often a file that failed to open is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// A requested reopen is seen within this time even without records.
const IDLE_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("the file writer has stopped; records are no longer written")]
pub struct WriterGone;

/// The reader's handle on the writer thread.
pub struct FileWriter {
    batches: SyncSender<Vec<Arc<Entry>>>,
    /// A path to (re)open (`Some(None)`: close, no file), taken by the writer.
    reopen: Arc<Mutex<Option<Option<PathBuf>>>>,
    /// A file is configured: batches are worth sending.
    enabled: AtomicBool,
    counters: Arc<LogCounters>,
}

impl FileWriter {
    pub fn start(counters: Arc<LogCounters>) -> Self {
        let (batches, receiver) = mpsc::sync_channel(FILE_BACKLOG);
        let reopen = Arc::new(Mutex::new(None));
        let writer = Writer {
            reopen: reopen.clone(),
            counters: counters.clone(),
            path: None,
            file: None,
            failed_at: None,
        };
        std::thread::Builder::new()
            .name("xdplb-connlog-file".into())
            .spawn(move || writer.run(&receiver))
            .expect("spawning the connection-log writer");
        Self {
            batches,
            reopen,
            enabled: AtomicBool::new(false),
            counters,
        }
    }

    /// Writes to `path` from the next batch on (reopening it if it is the same), or stops
    /// writing (`None`).
    pub fn open(&self, path: Option<PathBuf>) {
        self.enabled.store(path.is_some(), Ordering::Relaxed);
        *self
            .reopen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(path);
    }

    /// Queues a batch; a full queue drops it (counted).
    pub fn write(&self, batch: Vec<Arc<Entry>>) -> Result<(), WriterGone> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let len = batch.len() as u64;
        match self.batches.try_send(batch) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.counters
                    .dropped_file_backlog
                    .fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => Err(WriterGone),
        }
    }
}

struct Writer {
    reopen: Arc<Mutex<Option<Option<PathBuf>>>>,
    counters: Arc<LogCounters>,
    path: Option<PathBuf>,
    file: Option<BufWriter<File>>,
    /// When opening last failed (retried after [`RETRY_INTERVAL`]).
    failed_at: Option<Instant>,
}

impl Writer {
    fn run(mut self, batches: &Receiver<Vec<Arc<Entry>>>) {
        loop {
            let batch = match batches.recv_timeout(IDLE_CHECK) {
                Ok(batch) => Some(batch),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let requested = self
                .reopen
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(path) = requested {
                self.close();
                self.path = path;
                self.failed_at = None;
            }
            if let Some(batch) = batch {
                self.write(&batch);
            }
        }
    }

    fn close(&mut self) {
        if let Some(mut file) = self.file.take() {
            if let Err(e) = file.flush() {
                self.failed(format_args!("flushing before reopening: {e}"));
            }
        }
    }

    fn failed(&self, what: std::fmt::Arguments) {
        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        error!("connection log {:?}: {what}", self.path);
    }

    /// The open file, opening it (append, creating its directory) when needed.
    fn file(&mut self) -> Option<&mut BufWriter<File>> {
        if self.file.is_none() {
            let path = self.path.clone()?;
            if self
                .failed_at
                .is_some_and(|at| at.elapsed() < RETRY_INTERVAL)
            {
                return None;
            }
            let opened = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| OpenOptions::new().create(true).append(true).open(&path));
            match opened {
                Ok(file) => {
                    info!(path = %path.display(), "connection log file opened");
                    self.file = Some(BufWriter::with_capacity(256 * 1024, file));
                    self.failed_at = None;
                }
                Err(e) => {
                    self.failed(format_args!("opening: {e}"));
                    self.failed_at = Some(Instant::now());
                    return None;
                }
            }
        }
        self.file.as_mut()
    }

    fn write(&mut self, batch: &[Arc<Entry>]) {
        let Some(file) = self.file() else {
            return;
        };
        let mut result = Ok(());
        for entry in batch {
            result = serde_json::to_writer(&mut *file, &**entry)
                .map_err(std::io::Error::from)
                .and_then(|()| file.write_all(b"\n"));
            if result.is_err() {
                break;
            }
        }
        // One flush per batch: lines reach the file within a drain interval.
        let result = result.and_then(|()| file.flush());
        match result {
            Ok(()) => {
                self.counters
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed(format_args!("writing: {e}"));
                // Reopened on the next batch (the disk may have been replaced or freed).
                self.file = None;
            }
        }
    }
}
