//! The state journal (issue #21): an append-only file of records that lets a new turn-control
//! process take over the allocations, permissions and channels of the one before it.
//!
//! The journal knows nothing of what a record means; it keeps byte strings in order and
//! promises that whatever [`Journal::open`] returns is a prefix of what was appended, in whole
//! batches, however the previous writer died and wherever the file was cut or damaged.
//!
//! # Format
//!
//! ```text
//! file   = "XTJ1" version:u32le  record*
//! record = word:u32le  crc:u32le  payload[word & 0x7fff_ffff]
//! ```
//!
//! The low 31 bits of `word` are the payload length; the top bit marks the last record of a
//! batch (one [`Journal::append`]), so a batch is recovered whole or not at all: a writer
//! killed halfway through a large `write(2)` leaves a prefix of the batch on disk, and the
//! caller's state between two records of one batch may not be a state it ever meant to keep.
//! `crc` is CRC-32 (IEEE) over `word` and the payload. It covers the word as well as the
//! payload so that damage to the batch-end bit cannot make part of a batch pass for a whole
//! one, and so that a run of zero bytes (a file extended but never written, as some
//! filesystems leave it after a crash) is not read as empty records: the CRC-32 of an empty
//! payload is zero, that of a zero word is not.
//!
//! # Durability
//!
//! The journal lives on tmpfs (`/run/turn-control`): it has to outlive the process, not the
//! machine, and a power loss empties `/run` anyway. So appends are not flushed to a device;
//! [`Journal::sync`] is there for a caller that wants it. Compaction ([`Journal::rewrite`])
//! does flush, because its atomicity rests on the new file being complete before the rename.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The first four bytes of every journal.
const MAGIC: [u8; 4] = *b"XTJ1";
/// The framing this build writes and reads; a file of another version is refused.
const FORMAT_VERSION: u32 = 1;
/// `MAGIC` and `FORMAT_VERSION`.
const FILE_HEADER_LEN: usize = 8;
/// A record's length word and checksum.
const RECORD_HEADER_LEN: usize = 8;
/// The length word's bit that closes a batch.
const BATCH_END: u32 = 1 << 31;

/// The longest record any journal accepts: the length word keeps its top bit for [`BATCH_END`].
pub const MAX_RECORD_LIMIT: usize = (BATCH_END - 1) as usize;

/// How far the journal may grow past twice its compacted size before
/// [`Journal::should_compact`] says so. Without it a small state would be rewritten after
/// every few appends.
pub const COMPACTION_SLACK: u64 = 1 << 20;

/// An open journal, ready for appends. It holds an exclusive lock (`<path>.lock`) for as long
/// as it lives: two processes appending to one file would interleave their records, and a
/// second [`Journal::open`] would cut off a tail that a live writer is still writing. (A child
/// process forked meanwhile shares the lock until it execs or exits: the descriptor is
/// close-on-exec.)
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Held for its `flock`, released when the journal is dropped or the process dies.
    _lock: File,
    max_record: usize,
    /// Where the next batch goes: the end of the last whole batch.
    len: u64,
    /// `len` just after the last [`Journal::rewrite`], or after [`Journal::open`].
    compacted_len: u64,
}

/// What [`Journal::open`] found in an existing file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The records of every whole, intact batch before the first damage, in order.
    pub records: Vec<Vec<u8>>,
    /// The bytes cut off after them: an incomplete batch left by a killed writer, or
    /// everything from the first damaged record on. Zero after a clean shutdown.
    pub torn_bytes: u64,
}

impl Journal {
    /// Opens the journal at `path`, creating it (mode 0600) if there is none, and returns the
    /// records it holds.
    ///
    /// Reading stops at the first record that is incomplete, fails its checksum or is longer
    /// than `max_record` (capped at [`MAX_RECORD_LIMIT`]), and drops the part of the batch read
    /// before it. Nothing after damage is trusted, even if it looks intact. The file is cut to
    /// the end of the last whole batch, so appends continue from there.
    ///
    /// A stale `<path>.tmp` from an interrupted [`Journal::rewrite`] is removed.
    ///
    /// Errors: `InvalidData` if the file is not a journal of this format (its header is wrong
    /// or cut short; the file is left untouched, for the caller to move aside or remove);
    /// `ResourceBusy` if another open journal holds `path`; any I/O error.
    pub fn open(path: &Path, max_record: usize) -> io::Result<(Journal, Recovered)> {
        let max_record = max_record.min(MAX_RECORD_LIMIT);
        let lock = lock(path)?;
        remove_if_present(&sibling(path, ".tmp"))?;
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            // Created like a rewrite, so that no crash can leave a journal without its header.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let file = write_replacement(path, &FILE_HEADER)?;
                sync_directory(path)?;
                file
            }
            Err(error) => return Err(error),
        };
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes)?;
        check_file_header(&bytes)?;
        let Scan { records, end } = scan(&bytes, max_record);
        let torn_bytes = bytes.len() as u64 - end;
        if torn_bytes > 0 {
            file.set_len(end)?;
        }
        let journal = Journal {
            path: path.to_owned(),
            file,
            _lock: lock,
            max_record,
            len: end,
            compacted_len: end,
        };
        Ok((
            journal,
            Recovered {
                records,
                torn_bytes,
            },
        ))
    }

    /// Appends `records` as one batch, with one `write(2)`: a later [`Journal::open`] returns
    /// all of them or none. An empty batch writes nothing.
    ///
    /// Errors: `InvalidInput` if a record is longer than the journal's `max_record` (nothing is
    /// written); any I/O error, after which none of the batch is in the journal and it no
    /// longer holds the caller's state: a [`Journal::rewrite`] of the whole state brings it
    /// back.
    pub fn append<'a>(&mut self, records: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
        let mut batch = Vec::new();
        frame_batch(&mut batch, records, self.max_record)?;
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(error) = self.file.write_all_at(&batch, self.len) {
            // A short write leaves a prefix of the batch without its batch end, which no open
            // would return and the next append overwrites; cutting it off keeps `torn_bytes`
            // for real tears. Best effort for the same reason.
            let _ = self.file.set_len(self.len);
            return Err(error);
        }
        self.len += batch.len() as u64;
        Ok(())
    }

    /// Replaces the journal's records with `records` (one batch): the compaction step, given
    /// the caller's whole current state.
    ///
    /// The new file is written to `<path>.tmp`, flushed and renamed over the journal; rename(2)
    /// is atomic, so a crash at any point leaves the old journal or the new one, never a mix.
    /// On an error before the rename the old journal stays in use, unchanged.
    pub fn rewrite<'a>(&mut self, records: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
        let mut contents = FILE_HEADER.to_vec();
        frame_batch(&mut contents, records, self.max_record)?;
        self.file = write_replacement(&self.path, &contents)?;
        self.len = contents.len() as u64;
        self.compacted_len = self.len;
        // Only the rename's durability depends on this, and the new file is in use already.
        sync_directory(&self.path)
    }

    /// Whether the file has grown past twice its compacted size plus [`COMPACTION_SLACK`],
    /// the moment to [`Journal::rewrite`] it. A caller that asks after every append keeps the
    /// file (what a new process reads) within twice the last snapshot plus the slack and one
    /// batch; and since the appends since the last rewrite then outweigh the old snapshot,
    /// the new one (at most the old plus what was appended) costs less than twice those
    /// appends: compaction is amortised O(1) per appended byte.
    pub fn should_compact(&self) -> bool {
        self.len > 2 * self.compacted_len + COMPACTION_SLACK
    }
}

/// Size and durability, for callers that want them (the state journal uses none yet).
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "offered to callers; turn-control uses none of them yet"
    )
)]
impl Journal {
    /// Flushes the appended records to the device. Not needed on tmpfs (see the module doc).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The file's size: the end of the last whole batch.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// The file's size just after the last [`Journal::rewrite`], or after [`Journal::open`].
    pub fn compacted_bytes(&self) -> u64 {
        self.compacted_len
    }
}

/// The header of a journal of this build's format.
const FILE_HEADER: [u8; FILE_HEADER_LEN] = {
    let version = FORMAT_VERSION.to_le_bytes();
    [
        MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], version[0], version[1], version[2], version[3],
    ]
};

/// The records of the whole batches at the start of a file, and where the last one ends.
struct Scan {
    records: Vec<Vec<u8>>,
    end: u64,
}

fn scan(bytes: &[u8], max_record: usize) -> Scan {
    let mut records = Vec::new();
    let mut whole_batches = (0, FILE_HEADER_LEN);
    let mut offset = FILE_HEADER_LEN;
    while let Some(word) = u32_at(bytes, offset)
        && let Some(crc) = u32_at(bytes, offset + 4)
    {
        let len = (word & !BATCH_END) as usize;
        if len > max_record {
            break;
        }
        let start = offset + RECORD_HEADER_LEN;
        let Some(payload) = bytes.get(start..start + len) else {
            break;
        };
        if checksum(word, payload) != crc {
            break;
        }
        records.push(payload.to_vec());
        offset = start + len;
        if word & BATCH_END != 0 {
            whole_batches = (records.len(), offset);
        }
    }
    let (count, end) = whole_batches;
    records.truncate(count);
    Scan {
        records,
        end: end as u64,
    }
}

/// Frames `records` onto `out`, the last one closing the batch.
fn frame_batch<'a>(
    out: &mut Vec<u8>,
    records: impl IntoIterator<Item = &'a [u8]>,
    max_record: usize,
) -> io::Result<()> {
    let mut records = records.into_iter().peekable();
    while let Some(payload) = records.next() {
        if payload.len() > max_record {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a journal record of {} bytes is longer than the limit of {max_record}",
                    payload.len()
                ),
            ));
        }
        // No truncation: `max_record` is at most MAX_RECORD_LIMIT, below BATCH_END.
        let mut word = payload.len() as u32;
        if records.peek().is_none() {
            word |= BATCH_END;
        }
        out.extend_from_slice(&word.to_le_bytes());
        out.extend_from_slice(&checksum(word, payload).to_le_bytes());
        out.extend_from_slice(payload);
    }
    Ok(())
}

fn checksum(word: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&word.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let word = bytes.get(offset..offset + 4)?;
    Some(u32::from_le_bytes(word.try_into().ok()?))
}

fn check_file_header(bytes: &[u8]) -> io::Result<()> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let Some(header) = bytes.get(..FILE_HEADER_LEN) else {
        return Err(invalid(format!(
            "not a journal: {} bytes, shorter than the header",
            bytes.len()
        )));
    };
    if header[..4] != MAGIC {
        return Err(invalid(format!(
            "not a journal: starts with {:02x?}, not \"XTJ1\"",
            &header[..4]
        )));
    }
    let version = u32_at(header, 4).unwrap_or_default();
    if version != FORMAT_VERSION {
        return Err(invalid(format!(
            "a journal of format version {version}; this build reads version {FORMAT_VERSION}"
        )));
    }
    Ok(())
}

/// Takes the journal's exclusive lock, or fails with `ResourceBusy` if someone holds it.
fn lock(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(sibling(path, ".lock"))?;
    // SAFETY: flock takes a descriptor, open for as long as `file` lives, and flags.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "the journal is open in another process",
            ));
        }
        return Err(error);
    }
    Ok(file)
}

/// Writes `contents` to `<path>.tmp`, flushes it and renames it over `path`; returns the new
/// file, open for appends. On an error the tmp file is removed and `path` is untouched.
fn write_replacement(path: &Path, contents: &[u8]) -> io::Result<File> {
    let tmp = sibling(path, ".tmp");
    let written = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all_at(contents, 0)?;
        // The rename must not reach the disk before the contents do.
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(file)
    })();
    if written.is_err() {
        // Best effort: the next open removes a tmp file left behind anyway.
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Flushes the directory entry of `path`, so that a rename survives a power loss.
fn sync_directory(path: &Path) -> io::Result<()> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(directory)?.sync_all()
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// `<path><suffix>`, in the same directory, so that a rename stays within one filesystem.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::{BufRead as _, BufReader};
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    /// A directory of its own under the system's temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "turn-control-journal-{}-{}-{label}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn journal(&self) -> PathBuf {
            self.0.join("state.journal")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const MAX: usize = 1 << 20;

    fn slices(records: &[Vec<u8>]) -> impl Iterator<Item = &[u8]> {
        records.iter().map(Vec::as_slice)
    }

    fn records(texts: &[&str]) -> Vec<Vec<u8>> {
        texts.iter().map(|text| text.as_bytes().to_vec()).collect()
    }

    /// `Journal::open`, waiting out a lock held by the child process of another test: between
    /// its fork and its exec a child holds a copy of every descriptor of this process, the
    /// locks of journals that tests here have just closed included.
    fn open(path: &Path, max_record: usize) -> io::Result<(Journal, Recovered)> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match Journal::open(path, max_record) {
                Err(error)
                    if error.kind() == io::ErrorKind::ResourceBusy && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                result => return result,
            }
        }
    }

    fn reopen(path: &Path) -> Recovered {
        open(path, MAX).unwrap().1
    }

    #[test]
    fn a_missing_journal_is_created_private_and_empty() {
        let dir = TempDir::new("create");
        let path = dir.journal();
        let (journal, recovered) = open(&path, MAX).unwrap();
        assert_eq!(recovered, Recovered::default());
        assert_eq!(journal.len_bytes(), FILE_HEADER_LEN as u64);
        let metadata = fs::metadata(&path).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&path).unwrap(), FILE_HEADER);
    }

    #[test]
    fn batches_come_back_in_order_empty_records_included() {
        let dir = TempDir::new("order");
        let path = dir.journal();
        let first = records(&["allocation", "", "permission"]);
        let second = records(&["channel"]);
        {
            let (mut journal, _) = open(&path, MAX).unwrap();
            journal.append(slices(&first)).unwrap();
            journal.append(slices(&[])).unwrap();
            journal.append(slices(&second)).unwrap();
        }
        let recovered = reopen(&path);
        assert_eq!(recovered.records, [first, second].concat());
        assert_eq!(recovered.torn_bytes, 0);
    }

    #[test]
    fn a_file_of_another_format_is_refused_and_left_alone() {
        let dir = TempDir::new("format");
        let path = dir.journal();
        let mut other_version = FILE_HEADER;
        other_version[4] = 2;
        for contents in [&b"{\"allocations\": []}"[..], b"XTJ", b"", &other_version] {
            fs::write(&path, contents).unwrap();
            let error = open(&path, MAX).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            assert_eq!(fs::read(&path).unwrap(), contents);
        }
    }

    #[test]
    fn a_record_longer_than_max_record_ends_the_recovery() {
        let dir = TempDir::new("long-record");
        let path = dir.journal();
        let kept = records(&["short"]);
        {
            let (mut journal, _) = open(&path, MAX).unwrap();
            journal.append(slices(&kept)).unwrap();
            journal
                .append(slices(&records(&["longer than eight"])))
                .unwrap();
            journal.append(slices(&records(&["tiny"]))).unwrap();
        }
        let (_journal, recovered) = open(&path, 8).unwrap();
        assert_eq!(recovered.records, kept);
        let cut = (2 * RECORD_HEADER_LEN + "longer than eight".len() + "tiny".len()) as u64;
        assert_eq!(recovered.torn_bytes, cut);
    }

    #[test]
    fn append_refuses_a_record_longer_than_max_record_and_writes_nothing() {
        let dir = TempDir::new("refuse");
        let path = dir.journal();
        let (mut journal, _) = open(&path, 4).unwrap();
        let error = journal
            .append(slices(&records(&["fits", "does not fit"])))
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(journal.len_bytes(), FILE_HEADER_LEN as u64);
        drop(journal);
        assert_eq!(fs::read(&path).unwrap(), FILE_HEADER);
    }

    #[test]
    fn zeroes_past_the_end_are_not_read_as_records() {
        let dir = TempDir::new("zeroes");
        let path = dir.journal();
        let kept = records(&["allocation"]);
        {
            let (mut journal, _) = open(&path, MAX).unwrap();
            journal.append(slices(&kept)).unwrap();
        }
        let len = fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len + 4096)
            .unwrap();
        let recovered = reopen(&path);
        assert_eq!(recovered.records, kept);
        assert_eq!(recovered.torn_bytes, 4096);
    }

    #[test]
    fn damage_to_a_batch_end_bit_does_not_make_part_of_a_batch_whole() {
        let dir = TempDir::new("batch-end");
        let path = dir.journal();
        {
            let (mut journal, _) = open(&path, MAX).unwrap();
            journal
                .append(slices(&records(&["allocation", "permission"])))
                .unwrap();
        }
        // A writer killed inside the second record, and the first one's top bit flipped.
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 1);
        bytes[FILE_HEADER_LEN + 3] |= 0x80;
        fs::write(&path, &bytes).unwrap();
        let recovered = reopen(&path);
        assert_eq!(recovered.records, Vec::<Vec<u8>>::new());
        assert_eq!(recovered.torn_bytes, (bytes.len() - FILE_HEADER_LEN) as u64);
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_journal_lives() {
        let dir = TempDir::new("lock");
        let path = dir.journal();
        let (journal, _) = open(&path, MAX).unwrap();
        let error = Journal::open(&path, MAX).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ResourceBusy);
        drop(journal);
        open(&path, MAX).unwrap();
    }

    #[test]
    fn a_rewrite_replaces_the_records_and_appends_continue_after_it() {
        let dir = TempDir::new("rewrite");
        let path = dir.journal();
        let state = records(&["allocation 1", "permission 1"]);
        let later = records(&["channel 1"]);
        {
            let (mut journal, _) = open(&path, MAX).unwrap();
            journal
                .append(slices(&records(&["allocation 0", "allocation 1"])))
                .unwrap();
            journal
                .append(slices(&records(&["permission 1", "gone 0"])))
                .unwrap();
            journal.rewrite(slices(&state)).unwrap();
            assert_eq!(journal.compacted_bytes(), journal.len_bytes());
            assert_eq!(fs::metadata(&path).unwrap().len(), journal.len_bytes());
            journal.append(slices(&later)).unwrap();
            journal.sync().unwrap();
        }
        assert!(!sibling(&path, ".tmp").exists());
        let metadata = fs::metadata(&path).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        assert_eq!(reopen(&path).records, [state, later].concat());
    }

    #[test]
    fn an_interrupted_rewrite_leaves_the_old_journal_and_its_tmp_is_removed() {
        let dir = TempDir::new("interrupted");
        let path = dir.journal();
        let old = records(&["allocation 1", "permission 1"]);
        {
            let (mut journal, _) = open(&path, MAX).unwrap();
            journal.append(slices(&old)).unwrap();
        }
        // What a rewrite killed before its rename leaves: half of a new file.
        let mut half = FILE_HEADER.to_vec();
        frame_batch(&mut half, slices(&records(&["compacted state"])), MAX).unwrap();
        half.truncate(half.len() / 2);
        let tmp = sibling(&path, ".tmp");
        fs::write(&tmp, &half).unwrap();

        let (mut journal, recovered) = open(&path, MAX).unwrap();
        assert_eq!(recovered.records, old);
        assert_eq!(recovered.torn_bytes, 0);
        assert!(!tmp.exists());
        // And a rewrite still works where the stale file was.
        journal.rewrite(slices(&old[..1])).unwrap();
        drop(journal);
        assert_eq!(reopen(&path).records, old[..1]);
    }

    #[test]
    fn should_compact_once_the_file_outgrows_twice_its_compacted_size_plus_slack() {
        let dir = TempDir::new("compact");
        let path = dir.journal();
        let (mut journal, _) = open(&path, MAX).unwrap();
        let state = vec![7u8; 64 * 1024];
        journal.rewrite([state.as_slice()]).unwrap();
        let compacted = journal.compacted_bytes();
        assert_eq!(
            compacted,
            (FILE_HEADER_LEN + RECORD_HEADER_LEN + state.len()) as u64
        );

        let update = vec![1u8; 4096 - RECORD_HEADER_LEN];
        while journal.len_bytes() + 4096 <= 2 * compacted + COMPACTION_SLACK {
            journal.append([update.as_slice()]).unwrap();
            assert!(!journal.should_compact());
        }
        journal.append([update.as_slice()]).unwrap();
        assert!(journal.should_compact());

        journal.rewrite([state.as_slice()]).unwrap();
        assert!(!journal.should_compact());
        assert_eq!(journal.compacted_bytes(), compacted);
    }

    /// Where each record of `batches` starts and each batch ends in the file that appending
    /// them writes.
    fn batch_ends(batches: &[Vec<Vec<u8>>]) -> (Vec<usize>, Vec<usize>) {
        let mut record_starts = Vec::new();
        let mut ends = Vec::new();
        let mut offset = FILE_HEADER_LEN;
        for batch in batches {
            for record in batch {
                record_starts.push(offset);
                offset += RECORD_HEADER_LEN + record.len();
            }
            ends.push(offset);
        }
        (record_starts, ends)
    }

    proptest! {
        /// Issue #21: a writer killed at any byte (the cut) or a file damaged at any byte (the
        /// flip) never loads a wrong state: exactly the whole batches before the first damage
        /// come back, all of them when nothing happened, and appends carry on after them.
        #[test]
        fn a_cut_or_damaged_journal_recovers_exactly_the_whole_batches_before_the_damage(
            batches in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5),
                0..12,
            ),
            cut in proptest::option::of(any::<Index>()),
            flip in proptest::option::of((any::<Index>(), 1u8..=255)),
            next in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..4),
        ) {
            let dir = TempDir::new("prop");
            let path = dir.journal();
            {
                let (mut journal, _) = open(&path, MAX).unwrap();
                for batch in &batches {
                    journal.append(slices(batch)).unwrap();
                }
            }
            let mut bytes = fs::read(&path).unwrap();
            let (record_starts, ends) = batch_ends(&batches);
            prop_assert_eq!(bytes.len(), ends.last().copied().unwrap_or(FILE_HEADER_LEN));

            let mut intact = bytes.len();
            if let Some(cut) = cut {
                intact = cut.index(bytes.len() + 1);
                bytes.truncate(intact);
            }
            if let Some((at, mask)) = flip && !bytes.is_empty() {
                let at = at.index(bytes.len());
                bytes[at] ^= mask;
                // Caught for certain in a checksum or payload (CRC-32 catches every burst of
                // up to 32 bits); in a length, unless the checksum collides (2^-32).
                let damaged_record = record_starts.iter().rev().find(|&&start| start <= at);
                intact = damaged_record.copied().unwrap_or(at).min(intact);
            }
            fs::write(&path, &bytes).unwrap();

            if intact < FILE_HEADER_LEN {
                let error = open(&path, MAX).unwrap_err();
                prop_assert_eq!(error.kind(), io::ErrorKind::InvalidData);
                return Ok(());
            }
            let whole = ends.iter().take_while(|&&end| end <= intact).count();
            let end = if whole == 0 { FILE_HEADER_LEN } else { ends[whole - 1] };
            let expected = batches[..whole].concat();
            {
                let (mut journal, recovered) = open(&path, MAX).unwrap();
                prop_assert_eq!(&recovered.records, &expected);
                prop_assert_eq!(recovered.torn_bytes, (bytes.len() - end) as u64);
                prop_assert_eq!(fs::metadata(&path).unwrap().len(), end as u64);
                journal.append(slices(&next)).unwrap();
            }
            let recovered = reopen(&path);
            prop_assert_eq!(recovered.records, [expected, next].concat());
            prop_assert_eq!(recovered.torn_bytes, 0);
        }
    }

    /// Where a test run as a child process ([`child`]) finds its journal.
    const CHILD_JOURNAL: &str = "TURN_CONTROL_JOURNAL_TEST_CHILD";

    /// This test binary, to run the ignored test `test` alone on the journal at `path`: for
    /// what a test cannot do to its own process (be killed, limit its file size).
    fn child(test: &str, path: &Path) -> Command {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                format!("journal::tests::{test}").as_str(),
                "--exact",
                "--ignored",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_JOURNAL, path);
        command
    }

    #[test]
    #[ignore = "the child process of a_failed_append_leaves_nothing_of_its_batch"]
    fn append_past_the_file_size_limit() {
        let Some(path) = std::env::var_os(CHILD_JOURNAL) else {
            return;
        };
        let path = Path::new(&path);
        let (mut journal, _) = open(path, MAX).unwrap();
        journal.append(slices(&records(&["before"]))).unwrap();
        let limit = journal.len_bytes() + 4096;
        // SAFETY: SIG_IGN installs no handler; setrlimit reads one valid rlimit. Past the
        // limit write(2) then fails with EFBIG instead of the process dying of SIGXFSZ.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        }
        // The first write(2) stops at the limit, inside the last record; the next fails.
        let failed = [vec![1; 100], vec![2; 100], vec![3; 8192]];
        let error = journal.append(slices(&failed)).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EFBIG), "{error}");
        assert_eq!(fs::metadata(path).unwrap().len(), journal.len_bytes());
        journal.append(slices(&records(&["after"]))).unwrap();
    }

    #[test]
    fn a_failed_append_leaves_nothing_of_its_batch() {
        let dir = TempDir::new("failed-append");
        let path = dir.journal();
        let status = child("append_past_the_file_size_limit", &path)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let recovered = reopen(&path);
        assert_eq!(recovered.records, records(&["before", "after"]));
        assert_eq!(recovered.torn_bytes, 0);
    }

    // A writer process killed with SIGKILL at a random moment: the state a new process loads
    // is one the writer had after some whole batch. The writer is this test binary again,
    // running `killed_writer` with CHILD_JOURNAL set; its history is a pure function of the
    // batch number, so the parent knows every state it went through.

    const WRITER_READY: &str = "journal writer ready";
    /// The key of the record that says which batch the state is after.
    const COUNTER_KEY: u16 = u16::MAX;

    /// key -> (the batch that last set it, its value).
    type State = BTreeMap<u16, (u64, Vec<u8>)>;

    /// The changes of batch `batch`, the counter last: `Some(len)` sets `key` to a value of
    /// `len` bytes, `None` removes it.
    fn history(batch: u64) -> Vec<(u16, Option<usize>)> {
        // splitmix64: cheap, and the same in parent and child.
        let mut seed = batch;
        let mut next = move || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let changes = 1 + next() % 8;
        let mut batch_changes: Vec<_> = (0..changes)
            .map(|_| {
                let key = (next() % 64) as u16;
                match next() % 16 {
                    0 => (key, None),
                    // Now and then a value of hundreds of KiB, so that a kill can land inside
                    // one write(2) (the kernel stops a killed writer between pages) or
                    // inside a rewrite.
                    1 => (key, Some(64 * 1024 + (next() % (512 * 1024)) as usize)),
                    _ => (key, Some((next() % 1500) as usize)),
                }
            })
            .collect();
        batch_changes.push((COUNTER_KEY, Some(0)));
        batch_changes
    }

    /// A memset: the writer spends its time writing, where the kills should land.
    fn value(batch: u64, key: u16, len: usize) -> Vec<u8> {
        vec![(batch as u8).wrapping_mul(31) ^ (key as u8); len]
    }

    /// A record: [removed:u8][key:u16le][batch:u64le][value].
    fn encode(key: u16, batch: u64, value: Option<&[u8]>) -> Vec<u8> {
        let mut record = vec![u8::from(value.is_none())];
        record.extend_from_slice(&key.to_le_bytes());
        record.extend_from_slice(&batch.to_le_bytes());
        record.extend_from_slice(value.unwrap_or_default());
        record
    }

    fn replay(records: &[Vec<u8>]) -> State {
        let mut state = State::new();
        for record in records {
            let key = u16::from_le_bytes(record[1..3].try_into().unwrap());
            let batch = u64::from_le_bytes(record[3..11].try_into().unwrap());
            if record[0] == 1 {
                state.remove(&key);
            } else {
                state.insert(key, (batch, record[11..].to_vec()));
            }
        }
        state
    }

    fn snapshot(state: &State) -> Vec<Vec<u8>> {
        state
            .iter()
            .map(|(&key, (batch, value))| encode(key, *batch, Some(value)))
            .collect()
    }

    fn batches_done(state: &State) -> u64 {
        state.get(&COUNTER_KEY).map_or(0, |&(batch, _)| batch)
    }

    /// The state after `batches` batches of `history`.
    fn expected_state(batches: u64) -> State {
        let mut lengths = BTreeMap::new();
        for batch in 1..=batches {
            for (key, len) in history(batch) {
                match len {
                    Some(len) => lengths.insert(key, (batch, len)),
                    None => lengths.remove(&key),
                };
            }
        }
        lengths
            .into_iter()
            .map(|(key, (batch, len))| (key, (batch, value(batch, key, len))))
            .collect()
    }

    #[test]
    #[ignore = "the child process of killed_writers_leave_a_state_they_had"]
    fn killed_writer() {
        let Some(path) = std::env::var_os(CHILD_JOURNAL) else {
            return;
        };
        let (mut journal, recovered) = open(Path::new(&path), MAX).unwrap();
        let mut state = replay(&recovered.records);
        let mut batch = batches_done(&state);
        println!("{WRITER_READY}");
        // Bounded, should the parent die before it kills us.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            batch += 1;
            let mut records = Vec::new();
            for (key, len) in history(batch) {
                let value = len.map(|len| value(batch, key, len));
                records.push(encode(key, batch, value.as_deref()));
                match value {
                    Some(value) => state.insert(key, (batch, value)),
                    None => state.remove(&key),
                };
            }
            journal.append(slices(&records)).unwrap();
            if journal.should_compact() {
                journal.rewrite(slices(&snapshot(&state))).unwrap();
            }
        }
    }

    #[test]
    fn killed_writers_leave_a_state_they_had() {
        let dir = TempDir::new("killed");
        let path = dir.journal();
        let mut done_before = 0;
        for _ in 0..8 {
            let mut writer = child("killed_writer", &path)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = BufReader::new(writer.stdout.take().unwrap());
            let ready = stdout
                .lines()
                .map_while(Result::ok)
                .any(|line| line.ends_with(WRITER_READY));
            assert!(ready, "the writer exited before it was ready");
            std::thread::sleep(Duration::from_micros(rand::random_range(0..60_000)));
            writer.kill().unwrap();
            writer.wait().unwrap();

            let (_journal, recovered) = open(&path, MAX).unwrap();
            let state = replay(&recovered.records);
            let done = batches_done(&state);
            assert!(
                done >= done_before,
                "batch {done} after batch {done_before}"
            );
            assert!(
                state == expected_state(done),
                "the state after batch {done} is not the one the writer had"
            );
            done_before = done;
        }
        assert!(done_before > 0, "the writers wrote nothing");
    }
}
