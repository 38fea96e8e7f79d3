//! Where accounting records go: a file of JSON lines and a webhook, each fed by a thread of
//! its own through a bounded queue, so that the event loops hand a record over and never
//! wait for a disk or a collector.
//!
//! The file is append-only, one record per line, each line written whole with one write;
//! when logrotate renames it, the writer notices within [`ROTATION_CHECK`] and reopens the
//! path. The webhook gets one POST per record, in the order submitted, one at a time: a
//! record that fails is retried with [`Backoff`] before anything behind it is sent, so a
//! collector sees the records of an allocation in sequence. When the webhook's queue is
//! full a record is dropped for the webhook only (and counted); the file still has it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde::Serialize;

use crate::webhook::{Backoff, Client, Endpoint, Verdict};

/// How to reach the records' destinations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// A file to append JSON lines to; `-` is standard output.
    pub file: Option<PathBuf>,
    /// An `http://` or `https://` URL to POST each record to. An `https://` collector's
    /// certificate must chain to the system's trust store as `rustls-native-certs` reads it:
    /// setting the `SSL_CERT_FILE` environment variable to a PEM bundle (or `SSL_CERT_DIR`)
    /// replaces that store, as it does for OpenSSL (see [`crate::webhook::trusted_roots`]).
    pub webhook: Option<String>,
    /// Records waiting for the webhook before new ones are dropped for it.
    pub webhook_queue: usize,
    /// Longest wait for one delivery (connect, send, answer) before trying again.
    pub webhook_timeout: Duration,
    /// A PEM bundle of CA certificates an `https://` collector's certificate may also chain
    /// to, read at start-up in addition to the system's trust store; none by default. (The
    /// tests' CA: unlike `SSL_CERT_FILE`, it is not shared by the whole process.)
    pub webhook_extra_roots: Option<PathBuf>,
}

impl SinkConfig {
    pub const DEFAULT_WEBHOOK_QUEUE: usize = 10_000;
    pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
}

impl Default for SinkConfig {
    fn default() -> SinkConfig {
        SinkConfig {
            file: None,
            webhook: None,
            webhook_queue: SinkConfig::DEFAULT_WEBHOOK_QUEUE,
            webhook_timeout: SinkConfig::DEFAULT_WEBHOOK_TIMEOUT,
            webhook_extra_roots: None,
        }
    }
}

/// How often the file writer looks whether its path still names the file it writes.
pub const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// Lines waiting for the file writer before new ones are dropped: a disk that cannot take
/// this many in a row is failing, and the event loops must not wait for it.
const FILE_QUEUE: usize = 65_536;

/// Time the workers get past the shutdown deadline to notice it and stop.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// `turn_accounting_records_total{sink, result}`: records by destination and outcome.
pub const RECORDS_METRIC: &str = crate::metrics::name::ACCOUNTING_RECORDS;
/// `turn_accounting_webhook_queue_depth`: records waiting for the webhook.
pub const QUEUE_DEPTH_METRIC: &str = crate::metrics::name::ACCOUNTING_WEBHOOK_QUEUE;
/// `turn_accounting_webhook_retries_total`: deliveries tried again after a failure.
pub const RETRIES_METRIC: &str = crate::metrics::name::ACCOUNTING_WEBHOOK_RETRIES;

/// The destinations of accounting records. `Send + Sync`: the event loops may share one
/// (in an `Arc`); [`Sink::shutdown`] once they have stopped.
#[derive(Debug)]
pub struct Sink {
    file: Option<Worker>,
    webhook: Option<Worker>,
    /// The webhook worker's shutdown deadline.
    webhook_deadline: Arc<Deadline>,
    counters: Arc<Counters>,
}

/// What happened to the records so far, for tests and logs (the metrics say the same).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub file_written: u64,
    pub file_dropped: u64,
    pub file_errors: u64,
    /// Records taken into the webhook's queue.
    pub webhook_queued: u64,
    pub webhook_delivered: u64,
    pub webhook_dropped: u64,
    pub webhook_rejected: u64,
    pub webhook_retries: u64,
    /// Records that could not be serialised (for neither destination).
    pub unserialisable: u64,
}

impl Sink {
    /// Opens the file and starts the writer threads. Errors are one line: the file's path
    /// and the system's reason, what is wrong with the webhook's URL, or (`https://`) why
    /// there are no roots to trust its certificate by.
    pub fn start(config: SinkConfig) -> anyhow::Result<Sink> {
        Sink::start_with_backoff(config, Backoff::default())
    }

    /// The sink `settings` ask for (`--accounting-file`, `--accounting-webhook`,
    /// `--accounting-webhook-queue`), started; `None` when records go nowhere.
    pub fn configured(settings: &crate::config::Settings) -> anyhow::Result<Option<Sink>> {
        if settings.accounting_file.is_none() && settings.accounting_webhook.is_none() {
            return Ok(None);
        }
        Sink::start(SinkConfig {
            file: settings.accounting_file.clone(),
            webhook: settings.accounting_webhook.clone(),
            webhook_queue: settings.accounting_webhook_queue,
            ..SinkConfig::default()
        })
        .map(Some)
    }

    pub(crate) fn start_with_backoff(config: SinkConfig, backoff: Backoff) -> anyhow::Result<Sink> {
        let counters = Arc::new(Counters::default());
        let webhook_deadline = Arc::new(Deadline::default());
        let webhook = match &config.webhook {
            None => None,
            Some(url) => {
                let endpoint = Endpoint::parse(url)?;
                ensure!(
                    config.webhook_queue > 0,
                    "the accounting webhook's queue must hold at least one record"
                );
                ensure!(
                    !config.webhook_timeout.is_zero(),
                    "the accounting webhook's timeout must be more than zero"
                );
                let delivery = Delivery {
                    client: Client::new(endpoint, config.webhook_extra_roots.as_deref())?,
                    timeout: config.webhook_timeout,
                    backoff,
                    deadline: Arc::clone(&webhook_deadline),
                    counters: Arc::clone(&counters),
                    last_failure: None,
                };
                let worker =
                    Worker::spawn("accounting-webhook", config.webhook_queue, move |lines| {
                        delivery.run(lines)
                    })?;
                Some(worker)
            }
        };
        let file = match &config.file {
            None => None,
            Some(path) => {
                let target = Target::open(path)?;
                let writer = FileWriter::new(target, Arc::clone(&counters));
                Some(Worker::spawn(
                    "accounting-file",
                    FILE_QUEUE,
                    move |lines| writer.run(lines),
                )?)
            }
        };
        Ok(Sink {
            file,
            webhook,
            webhook_deadline,
            counters,
        })
    }

    /// Hands `record` to the destinations as one JSON line; never waits. A destination whose
    /// queue is full drops it (counted as `dropped`).
    pub fn submit(&self, record: &impl Serialize) {
        if self.file.is_none() && self.webhook.is_none() {
            return;
        }
        // Compact JSON escapes control characters in strings: the line has no newline.
        let line = match serde_json::to_string(record) {
            Ok(line) => line,
            Err(error) => {
                tracing::warn!(%error, "accounting record not serialisable; dropped");
                self.counters.unserialisable.fetch_add(1, Ordering::Relaxed);
                for (worker, sink) in [(&self.file, "file"), (&self.webhook, "webhook")] {
                    if worker.is_some() {
                        count_record(sink, "error");
                    }
                }
                return;
            }
        };
        match (&self.file, &self.webhook) {
            (Some(file), Some(webhook)) => {
                self.offer_file(file, line.clone());
                self.offer_webhook(webhook, line);
            }
            (Some(file), None) => self.offer_file(file, line),
            (None, Some(webhook)) => self.offer_webhook(webhook, line),
            (None, None) => {}
        }
    }

    /// What the sink has written, delivered, dropped and retried so far.
    pub fn stats(&self) -> SinkStats {
        self.counters.snapshot()
    }

    /// Stops taking records, lets the file writer write what it holds, and gives the
    /// webhook until `deadline` from now to deliver its queue. Returns the records left
    /// undelivered to the webhook (also logged).
    pub fn shutdown(self, deadline: Duration) -> u64 {
        let until = Instant::now() + deadline;
        let Sink {
            file,
            webhook,
            webhook_deadline,
            counters,
        } = self;
        webhook_deadline.set(until);
        // Both queues close now; the workers end once their queues are empty.
        let file = file.map(Worker::close);
        let webhook = webhook.map(Worker::close);
        if let Some(file) = file
            && !file.wait(until + SHUTDOWN_GRACE)
        {
            tracing::warn!("the accounting file writer did not finish by the shutdown deadline");
        }
        let Some(webhook) = webhook else {
            return 0;
        };
        if !webhook.wait(until + SHUTDOWN_GRACE) {
            tracing::warn!("the accounting webhook was still sending at the shutdown deadline");
        }
        let stats = counters.snapshot();
        let undelivered = stats
            .webhook_queued
            .saturating_sub(stats.webhook_delivered + stats.webhook_rejected);
        if undelivered > 0 {
            tracing::warn!(
                undelivered,
                "accounting records not delivered to the webhook"
            );
        }
        undelivered
    }

    /// A full queue drops the line; so does a closed one (its worker ended early).
    fn offer_file(&self, file: &Worker, line: String) {
        if file.send(line).is_err() {
            self.counters.file_dropped.fetch_add(1, Ordering::Relaxed);
            count_record("file", "dropped");
        }
    }

    fn offer_webhook(&self, webhook: &Worker, line: String) {
        // Counted as queued before the send so that the worker never takes it out first.
        self.counters.queued();
        if webhook.send(line).is_err() {
            self.counters.unqueued();
            self.counters
                .webhook_dropped
                .fetch_add(1, Ordering::Relaxed);
            count_record("webhook", "dropped");
        }
    }
}

fn count_record(sink: &'static str, result: &'static str) {
    metrics::counter!(RECORDS_METRIC, "sink" => sink, "result" => result).increment(1);
}

/// The counts behind [`SinkStats`], shared with the workers.
#[derive(Debug, Default)]
struct Counters {
    file_written: AtomicU64,
    file_dropped: AtomicU64,
    file_errors: AtomicU64,
    webhook_queued: AtomicU64,
    webhook_delivered: AtomicU64,
    webhook_dropped: AtomicU64,
    webhook_rejected: AtomicU64,
    webhook_retries: AtomicU64,
    unserialisable: AtomicU64,
}

impl Counters {
    fn queued(&self) {
        self.webhook_queued.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(QUEUE_DEPTH_METRIC).increment(1.0);
    }

    fn unqueued(&self) {
        self.webhook_queued.fetch_sub(1, Ordering::Relaxed);
        self.taken();
    }

    /// A record left the webhook's queue.
    fn taken(&self) {
        metrics::gauge!(QUEUE_DEPTH_METRIC).decrement(1.0);
    }

    fn snapshot(&self) -> SinkStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SinkStats {
            file_written: read(&self.file_written),
            file_dropped: read(&self.file_dropped),
            file_errors: read(&self.file_errors),
            webhook_queued: read(&self.webhook_queued),
            webhook_delivered: read(&self.webhook_delivered),
            webhook_dropped: read(&self.webhook_dropped),
            webhook_rejected: read(&self.webhook_rejected),
            webhook_retries: read(&self.webhook_retries),
            unserialisable: read(&self.unserialisable),
        }
    }
}

/// A thread draining a bounded queue of lines.
#[derive(Debug)]
struct Worker {
    sender: SyncSender<String>,
    /// In a mutex only to make the sink `Sync`: a receiver is not, and only `close` takes it.
    finished: Mutex<Finished>,
}

/// The end of a worker whose queue is closed.
#[derive(Debug)]
struct Finished {
    /// Disconnected when the thread ends (its sender is dropped with it).
    done: Receiver<()>,
    thread: JoinHandle<()>,
}

impl Worker {
    fn spawn(
        name: &str,
        capacity: usize,
        run: impl FnOnce(Receiver<String>) + Send + 'static,
    ) -> anyhow::Result<Worker> {
        let (sender, lines) = mpsc::sync_channel(capacity);
        let (alive, done) = mpsc::sync_channel::<()>(0);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _alive = alive;
                run(lines);
            })
            .with_context(|| format!("cannot start the {name} thread"))?;
        Ok(Worker {
            sender,
            finished: Mutex::new(Finished { done, thread }),
        })
    }

    fn send(&self, line: String) -> Result<(), TrySendError<String>> {
        self.sender.try_send(line)
    }

    /// Closes the queue; the thread ends once it has taken what is left.
    fn close(self) -> Finished {
        self.finished
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Finished {
    /// Waits for the thread to end until `until`; false if it is still running.
    fn wait(self, until: Instant) -> bool {
        let left = until.saturating_duration_since(Instant::now());
        match self.done.recv_timeout(left) {
            Err(RecvTimeoutError::Disconnected) => {
                if self.thread.join().is_err() {
                    tracing::error!("an accounting worker panicked");
                }
                true
            }
            Ok(()) | Err(RecvTimeoutError::Timeout) => false,
        }
    }
}

/// The webhook worker's shutdown deadline, set once; waiting on it wakes when it is set.
#[derive(Debug, Default)]
struct Deadline {
    at: Mutex<Option<Instant>>,
    set: Condvar,
}

impl Deadline {
    fn set(&self, at: Instant) {
        *self.at.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
        self.set.notify_all();
    }

    /// How long the next attempt may take: `timeout`, cut at the deadline; None past it.
    fn attempt(&self, timeout: Duration) -> Option<Duration> {
        let at = *self.at.lock().unwrap_or_else(PoisonError::into_inner);
        match at {
            None => Some(timeout),
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                (!left.is_zero()).then(|| timeout.min(left))
            }
        }
    }

    /// Sleeps `delay`, or less if the deadline comes first; false if it did.
    fn sleep(&self, delay: Duration) -> bool {
        let end = Instant::now() + delay;
        let mut at = self.at.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            if at.is_some_and(|at| now >= at) {
                return false;
            }
            if now >= end {
                return true;
            }
            let wake = at.map_or(end, |at| at.min(end));
            at = self
                .set
                .wait_timeout(at, wake - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The webhook worker: sends the queue's records one at a time, in order.
struct Delivery {
    client: Client,
    timeout: Duration,
    backoff: Backoff,
    deadline: Arc<Deadline>,
    counters: Arc<Counters>,
    /// Why the last attempt failed, while the collector is failing: warned about once per
    /// distinct reason, not once per attempt.
    last_failure: Option<String>,
}

impl Delivery {
    fn run(mut self, lines: Receiver<String>) {
        tracing::info!(endpoint = %self.client.endpoint(), "accounting webhook started");
        // Ends when the sink closes the queue and it is empty, or at the shutdown deadline.
        while let Ok(line) = lines.recv() {
            self.counters.taken();
            if !self.deliver(&line) {
                return;
            }
        }
    }

    /// Sends `line` until the collector takes or rejects it; false at the deadline.
    fn deliver(&mut self, line: &str) -> bool {
        self.backoff.reset();
        let mut failures = 0_u32;
        loop {
            let Some(timeout) = self.deadline.attempt(self.timeout) else {
                return false;
            };
            let failure = match self.client.post(line.as_bytes(), timeout) {
                Ok(status) => match Verdict::of(status) {
                    Verdict::Delivered => {
                        if failures > 0 {
                            tracing::info!(failures, "accounting webhook delivering again");
                        }
                        self.last_failure = None;
                        self.counters
                            .webhook_delivered
                            .fetch_add(1, Ordering::Relaxed);
                        count_record("webhook", "delivered");
                        return true;
                    }
                    Verdict::Rejected => {
                        tracing::warn!(
                            status,
                            record = line,
                            "accounting webhook rejected a record"
                        );
                        self.counters
                            .webhook_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        count_record("webhook", "rejected");
                        self.last_failure = None;
                        return true;
                    }
                    Verdict::Retry => format!("answered {status}"),
                },
                Err(error) => error.to_string(),
            };
            // One warning per reason ("answered 503", "TLS handshake with ... failed:
            // certificate not trusted"...), not one per attempt or per record held up.
            if self.last_failure.as_ref() != Some(&failure) {
                tracing::warn!(failure, "accounting webhook failed; retrying with backoff");
            } else {
                tracing::debug!(failure, failures, "accounting webhook failed again");
            }
            self.last_failure = Some(failure);
            failures += 1;
            self.counters
                .webhook_retries
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!(RETRIES_METRIC).increment(1);
            if !self.deadline.sleep(self.backoff.next_delay()) {
                return false;
            }
        }
    }
}

/// Where the file writer writes.
enum Target {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        /// Device and inode of `file`, to see the path renamed away from it.
        identity: (u64, u64),
    },
}

impl Target {
    fn open(path: &Path) -> anyhow::Result<Target> {
        if path == Path::new("-") {
            return Ok(Target::Stdout);
        }
        let (file, identity) = open_append(path)
            .with_context(|| format!("cannot open the accounting file {}", path.display()))?;
        Ok(Target::File {
            path: path.to_owned(),
            file,
            identity,
        })
    }

    /// Reopens the path if it no longer names the open file (renamed or removed by log
    /// rotation); a failure keeps the old file and is returned.
    fn follow_rotation(&mut self) -> io::Result<bool> {
        let Target::File {
            path,
            file,
            identity,
        } = self
        else {
            return Ok(false);
        };
        match std::fs::metadata(&*path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) == *identity => return Ok(false),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        (*file, *identity) = open_append(path)?;
        Ok(true)
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            // One write per line: O_APPEND places it whole at the end, even if another
            // process appends to the same file.
            Target::File { file, .. } => file.write_all(line),
            Target::Stdout => io::stdout().lock().write_all(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Target::File { .. } => Ok(()),
            Target::Stdout => io::stdout().lock().flush(),
        }
    }
}

fn open_append(path: &Path) -> io::Result<(File, (u64, u64))> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)?;
    let metadata = file.metadata()?;
    Ok((file, (metadata.dev(), metadata.ino())))
}

/// The file worker: writes the queue's lines in batches, following log rotation.
struct FileWriter {
    target: Target,
    counters: Arc<Counters>,
    last_check: Instant,
    /// Whether the last write failed, to warn once per run of failures.
    failing: bool,
    line: Vec<u8>,
}

/// Most lines written between two looks at rotation.
const BATCH: usize = 1024;

impl FileWriter {
    fn new(target: Target, counters: Arc<Counters>) -> FileWriter {
        FileWriter {
            target,
            counters,
            last_check: Instant::now(),
            failing: false,
            line: Vec::new(),
        }
    }

    fn run(mut self, lines: Receiver<String>) {
        loop {
            let first = match lines.recv_timeout(ROTATION_CHECK) {
                Ok(line) => Some(line),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if self.last_check.elapsed() >= ROTATION_CHECK {
                self.follow_rotation();
            }
            let Some(first) = first else { continue };
            self.write(&first);
            for line in lines.try_iter().take(BATCH - 1) {
                self.write(&line);
            }
            if let Err(error) = self.target.flush() {
                tracing::warn!(%error, "cannot flush the accounting output");
            }
        }
    }

    fn follow_rotation(&mut self) {
        self.last_check = Instant::now();
        match self.target.follow_rotation() {
            Ok(false) => {}
            Ok(true) => tracing::info!("accounting file reopened after rotation"),
            Err(error) => tracing::warn!(%error, "cannot reopen the rotated accounting file"),
        }
    }

    fn write(&mut self, line: &str) {
        self.line.clear();
        self.line.extend_from_slice(line.as_bytes());
        self.line.push(b'\n');
        match self.target.write_line(&self.line) {
            Ok(()) => {
                self.failing = false;
                self.counters.file_written.fetch_add(1, Ordering::Relaxed);
                count_record("file", "written");
            }
            Err(error) => {
                if !self.failing {
                    tracing::warn!(%error, "cannot write to the accounting file; records lost");
                }
                self.failing = true;
                self.counters.file_errors.fetch_add(1, Ordering::Relaxed);
                count_record("file", "error");
            }
        }
    }
}

#[cfg(test)]
mod tests;
