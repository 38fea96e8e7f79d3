//! State that outlives the process (`--state-dir`): the nonce key's seed, and per event-loop
//! thread a journal of its allocations ([`crate::journal`]) that a new process restores.
//!
//! Each thread owns one journal file, `thread-<index>.journal`, so that no two threads ever
//! write the same file: its first record names the format, the thread and the number of
//! threads; then come [`Record::Saved`] (an allocation as it stands after a change) and
//! [`Record::Deleted`]. Replaying them in order gives the thread's allocations as of its last
//! write; a torn or damaged tail is cut off by the journal (a prefix of what happened). The
//! records are JSON: a few hundred bytes per allocation, readable with `jq` when an operator
//! wants to see what a relay holds.
//!
//! A thread's clients reach it through the kernel's SO_REUSEPORT hash over the listener
//! group, which the next process rebuilds in the same order with the same number of sockets;
//! with another number of threads the clients land elsewhere, so such a journal is not
//! restored (its allocations end, and the first sync takes their channels out of the kernel).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use turn_control_core::{Change, FiveTuple, SavedAllocation, Transport};

use crate::journal::Journal;

/// The journal format this build writes and reads.
const FORMAT: u32 = 1;
/// The largest record accepted when reading: an allocation with the most permissions and
/// channels the limits allow is far below it; anything larger is damage.
const MAX_RECORD: usize = 1 << 20;

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The first record of every journal file.
    Header {
        /// [`FORMAT`].
        format: u32,
        /// The thread that writes the file.
        thread: usize,
        /// How many event-loop threads the daemon ran.
        threads: usize,
        /// The version of the daemon that wrote it (for the log).
        version: String,
    },
    /// An allocation as it stands.
    Saved(Box<SavedAllocation>),
    /// What a TCP connection handed over had read of its next frame: the next process reads
    /// on from there (only the last process's hand-over counts: a compaction drops it).
    Pending {
        /// The client.
        client: SocketAddr,
        /// The listener.
        server: SocketAddr,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The allocation of this 5-tuple ended.
    Deleted {
        /// The client.
        client: SocketAddr,
        /// The listener.
        server: SocketAddr,
        /// Its transport.
        transport: Transport,
    },
}

impl Record {
    fn header(thread: usize, threads: usize) -> Self {
        Record::Header {
            format: FORMAT,
            thread,
            threads,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    fn of(change: Change) -> Self {
        match change {
            Change::Saved(saved) => Record::Saved(Box::new(saved)),
            Change::Deleted(tuple) => Record::Deleted {
                client: tuple.client.0,
                server: tuple.server,
                transport: tuple.transport,
            },
        }
    }

    fn encode(&self) -> Vec<u8> {
        // Serializing plain data with derived impls cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Loads the seed of the nonce key from `dir`, or makes one and saves it: a new process with
/// the same seed accepts the nonces the old one issued (RFC 8489 §9.2), so clients do not
/// meet a 438 after a restart. Only the nonce key: ports, transaction ids and tokens come
/// from a seed of each start, so that none of their sequences repeats.
pub fn seed(dir: &Path) -> anyhow::Result<[u8; 32]> {
    let path = dir.join("seed");
    match std::fs::read(&path) {
        Ok(bytes) => {
            return bytes
                .as_slice()
                .try_into()
                .with_context(|| format!("{}: not a 32-byte seed", path.display()));
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    }
    let mut seed = [0u8; 32];
    {
        use rand::TryRng as _;
        rand::rngs::SysRng
            .try_fill_bytes(&mut seed)
            .context("seeding the random number generator from the OS")?;
    }
    // Written to a temporary file and renamed: a crash leaves no half seed.
    let tmp = dir.join("seed.tmp");
    {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(&seed)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(seed)
}

/// Makes `dir` if it is missing (0700: it holds keys) and checks that it is a directory.
pub fn prepare(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let metadata = std::fs::metadata(dir).with_context(|| format!("{}", dir.display()))?;
    anyhow::ensure!(metadata.is_dir(), "{} is not a directory", dir.display());
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "the state directory is readable by others; it holds allocation keys (mode 0700 advised)");
    }
    Ok(())
}

/// One thread's journal and what it held when the thread started.
#[derive(Debug)]
pub struct ThreadJournal {
    journal: Journal,
    thread: usize,
    threads: usize,
    path: PathBuf,
}

/// What a thread's journal held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The allocations as of the last record, in no order.
    pub allocations: Vec<SavedAllocation>,
    /// Why the journal's allocations were all set aside, if they were: the reason label of
    /// `turn_restart_dropped_total` and the detail for the log.
    pub discarded: Option<(&'static str, String)>,
    /// Bytes of a torn or damaged tail that were cut off.
    pub torn_bytes: u64,
    /// What handed-over TCP connections had read of their next frame, by listener and client.
    pub pending: HashMap<(SocketAddr, SocketAddr), Vec<u8>>,
}

impl ThreadJournal {
    /// Opens (or creates) the journal of thread `thread` of `threads` in `dir` and replays it.
    pub fn open(dir: &Path, thread: usize, threads: usize) -> anyhow::Result<(Self, Loaded)> {
        let path = dir.join(format!("thread-{thread}.journal"));
        let mut set_aside = None;
        let (journal, recovered) = match Journal::open(&path, MAX_RECORD) {
            // Not a journal of this format (damaged at its head, or another program's file):
            // kept for a look, out of the way, and a new journal begins.
            Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                let aside = path.with_extension("journal.unreadable");
                std::fs::rename(&path, &aside)
                    .with_context(|| format!("moving {} aside", path.display()))?;
                set_aside = Some((
                    "journal_unreadable",
                    format!("{error}; moved to {}", aside.display()),
                ));
                Journal::open(&path, MAX_RECORD)
            }
            other => other,
        }
        .with_context(|| format!("opening {}", path.display()))?;
        let mut loaded = Loaded {
            torn_bytes: recovered.torn_bytes,
            discarded: set_aside,
            ..Loaded::default()
        };
        let mut records = recovered.records.iter();
        match records
            .next()
            .map(|bytes| serde_json::from_slice::<Record>(bytes))
        {
            None => {}
            Some(Ok(Record::Header {
                format,
                threads: then,
                thread: written_by,
                ..
            })) => {
                if format != FORMAT {
                    loaded.discarded = Some((
                        "journal_format",
                        format!("journal format {format}, not {FORMAT}"),
                    ));
                } else if then != threads || written_by != thread {
                    loaded.discarded = Some((
                        "threads_changed",
                        format!("written by thread {written_by} of {then}, now {threads} threads"),
                    ));
                }
            }
            Some(_) => {
                loaded.discarded = Some(("journal_unreadable", "no journal header".to_owned()));
            }
        }
        if loaded.discarded.is_none() {
            let mut allocations: HashMap<FiveTuple, SavedAllocation> = HashMap::new();
            for bytes in records {
                match serde_json::from_slice::<Record>(bytes) {
                    Ok(Record::Saved(saved)) => {
                        allocations.insert(saved.tuple(), *saved);
                    }
                    Ok(Record::Pending {
                        client,
                        server,
                        bytes,
                    }) => {
                        loaded.pending.insert((server, client), bytes);
                    }
                    Ok(Record::Deleted {
                        client,
                        server,
                        transport,
                    }) => {
                        allocations.retain(|tuple, _| {
                            (tuple.client.0, tuple.server, tuple.transport)
                                != (client, server, transport)
                        });
                    }
                    // A header in the middle, or a record this build cannot read: the rest is
                    // not trusted, as after damage.
                    Ok(Record::Header { .. }) | Err(_) => {
                        tracing::warn!(path = %path.display(), "unreadable journal record; restoring what came before it");
                        break;
                    }
                }
            }
            loaded.allocations = allocations.into_values().collect();
        }
        Ok((
            Self {
                journal,
                thread,
                threads,
                path,
            },
            loaded,
        ))
    }

    /// Appends the changes of one loop iteration in one write.
    pub fn append(&mut self, changes: Vec<Change>) {
        self.write(changes.into_iter().map(Record::of));
    }

    /// Records what the handed-over TCP connections had read of their next frames.
    pub fn append_pending(&mut self, pending: Vec<((SocketAddr, SocketAddr), Vec<u8>)>) {
        self.write(
            pending
                .into_iter()
                .filter(|(_, bytes)| !bytes.is_empty())
                .map(|((server, client), bytes)| Record::Pending {
                    client,
                    server,
                    bytes,
                }),
        );
    }

    /// Appends `records` in one write (none: nothing); a failure is counted and logged, the
    /// journal stays as it was.
    fn write(&mut self, records: impl Iterator<Item = Record>) {
        let records: Vec<Vec<u8>> = records.map(|record| record.encode()).collect();
        if records.is_empty() {
            return;
        }
        if let Err(error) = self.journal.append(records.iter().map(Vec::as_slice)) {
            metrics::counter!(crate::metrics::name::JOURNAL_ERRORS).increment(1);
            tracing::error!(path = %self.path.display(), %error, "journal write failed; a restart now would lose these changes");
        }
    }

    /// Whether the journal has grown enough to be rewritten from a snapshot.
    pub fn should_compact(&self) -> bool {
        self.journal.should_compact()
    }

    /// Rewrites the journal as the header and `allocations` (a snapshot of the thread).
    pub fn compact(&mut self, allocations: Vec<SavedAllocation>) {
        let records: Vec<Vec<u8>> = std::iter::once(Record::header(self.thread, self.threads))
            .chain(allocations.into_iter().map(|a| Record::Saved(Box::new(a))))
            .map(|record| record.encode())
            .collect();
        if let Err(error) = self.journal.rewrite(records.iter().map(Vec::as_slice)) {
            metrics::counter!(crate::metrics::name::JOURNAL_ERRORS).increment(1);
            tracing::error!(path = %self.path.display(), %error, "journal compaction failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back() {
        let header = Record::header(1, 2);
        let text = String::from_utf8(header.encode()).unwrap();
        assert!(
            text.starts_with(r#"{"kind":"header","format":1,"thread":1,"threads":2"#),
            "{text}"
        );
        let deleted = Record::Deleted {
            client: "192.0.2.1:5000".parse().unwrap(),
            server: "192.0.2.10:3478".parse().unwrap(),
            transport: Transport::Udp,
        };
        let back: Record = serde_json::from_slice(&deleted.encode()).unwrap();
        assert_eq!(back, deleted);
    }
}
