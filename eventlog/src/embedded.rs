//! The embedded event log: append-only segment files with a checksum on every record,
//! and group commit.
//!
//! # Format
//! `<dir>/<base offset, 20 digits>.seg` files, each a run of records:
//!
//! ```text
//! [body length: u32 LE][CRC-32 of body: u32 LE]
//! [body: offset u64 LE | group u64 LE | key length u32 LE | key | value]
//! ```
//!
//! A segment is closed when it passes [`SEGMENT_BYTES`]; the next one starts at the next
//! offset. Every record names its own offset, so a misplaced or repeated record is caught
//! like a damaged one, and the first offset of its group commit (`group`), so recovery
//! can tell the unsynced last group from data that was synced.
//!
//! # Durability
//! An append is durable when its future resolves `Ok`: its records were written and the
//! segment was `fdatasync`'d (a new segment's directory entry is synced too). One
//! committer thread takes every append that is waiting, writes them with one `write` and
//! syncs once, so N concurrent appends cost one sync, not N. A failed write or sync
//! poisons the log: every later append fails with [`Error::Poisoned`], because after a
//! failed fsync the kernel may have dropped the dirty pages and a retry that "succeeds"
//! would lie.
//!
//! # Resources
//! What the log needs before it writes anything is had first, and lacking it is not a
//! durability failure: the append fails with [`Error::Exhausted`], nothing was written,
//! and the next append tries again. The committer writes through descriptors it already
//! holds (the active segment, the directory) and keeps the next segment's file open
//! ahead of time (`next.spare`, renamed into place when the active segment is full), so
//! a process out of file descriptors still appends and even rolls a segment; it
//! reserves the disk blocks of a group (`fallocate`, where the file system has it)
//! before writing it, so a full disk refuses the append instead of failing the write.
//!
//! # Recovery
//! Opening the log reads every record and checks its checksum and offset. A damaged
//! record in the last segment after which no record of a *later* group commit is intact
//! is a torn tail — the end of a group write cut short by a crash (after a power loss
//! its pages may reach the disk out of order, so later records of the same group can be
//! intact) — and is truncated and logged. Groups are synced in order, so damage followed
//! by an intact later group is corruption of synced data: opening fails with an error
//! that names the offset, file and byte position. Nothing is ever skipped silently. (The
//! one case this cannot tell apart: damage inside the last group after it was synced is
//! treated as a torn tail, logged with its offset.)

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};

use futures::future::BoxFuture;
use tokio::sync::{oneshot, watch};

use crate::{Append, Error, EventLog, Health, Offset, Record, Stored};

/// The largest record (key + value) the log accepts.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// The most records one group commit writes before syncing.
pub const MAX_BATCH_RECORDS: usize = 8192;
/// A segment is closed once it holds this many bytes (the default of
/// [`Options::segment_bytes`]).
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// The file that becomes the next segment, created ahead of time.
const SPARE: &str = "next.spare";

/// How often at most the committer tries again to create a spare segment it could not.
const SPARE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How the log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: SEGMENT_BYTES,
        }
    }
}

const HEADER: usize = 8;
const BODY_FIXED: usize = 20;

/// What opening the log found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// A torn tail that was cut off: the offset of its first damaged record and how many
    /// bytes were removed.
    pub truncated_tail: Option<(Offset, u64)>,
}

struct Segment {
    base: Offset,
    path: PathBuf,
    /// Shared with the committer, which writes through it without a descriptor of its own.
    file: Arc<File>,
    /// Byte position of each record; the record `base + i` starts at `positions[i]`.
    positions: Vec<u64>,
    /// Bytes of intact records.
    len: u64,
}

impl Segment {
    fn end(&self) -> Offset {
        self.base + self.positions.len() as u64
    }
}

struct Shared {
    segments: RwLock<Vec<Segment>>,
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Segment>> {
        self.segments.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Segment>> {
        self.segments.write().unwrap_or_else(|e| e.into_inner())
    }
}

struct AppendRequest {
    records: Vec<Record>,
    reply: oneshot::Sender<Result<Vec<Offset>, Error>>,
}

/// The embedded log. Share it in an `Arc`.
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    requests: Option<std_mpsc::SyncSender<AppendRequest>>,
    end: watch::Receiver<Offset>,
    poisoned: Arc<AtomicBool>,
    /// Why the last group was refused for want of a resource, until one succeeds.
    refusing: Arc<Mutex<Option<String>>>,
    fsyncs: Arc<AtomicU64>,
    recovery: Recovery,
    _lock: Option<File>,
    #[cfg(test)]
    inject: Arc<Mutex<Option<Injected>>>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("durable_end", &*self.end.borrow())
            .finish()
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Storage(format!("{what} {}: {e}", path.display()))
}

/// The resource `e` says the process or the machine lacks (descriptors, disk space,
/// memory), if it is that rather than the storage failing. Also the metric's label.
fn lacking(e: &std::io::Error) -> Option<&'static str> {
    use rustix::io::Errno;
    let errno = Errno::from_raw_os_error(e.raw_os_error()?);
    if errno == Errno::MFILE || errno == Errno::NFILE {
        Some("files")
    } else if errno == Errno::NOSPC || errno == Errno::DQUOT {
        Some("disk")
    } else if errno == Errno::NOMEM {
        Some("memory")
    } else {
        None
    }
}

/// An error of a step taken before anything was written: [`Error::Exhausted`] (its
/// text starts with what was lacking) when a resource was lacking, else a storage
/// failure.
fn before_write(what: &str, path: &Path, e: std::io::Error) -> Error {
    match lacking(&e) {
        Some(resource) => Error::Exhausted(format!("{resource}: {what} {}: {e}", path.display())),
        None => io(what, path, e),
    }
}

fn segment_name(base: Offset) -> String {
    format!("{base:020}.seg")
}

/// Encodes one record of the group commit that starts at `group`, appending it to `out`.
fn encode_record(out: &mut Vec<u8>, offset: Offset, group: Offset, record: &Record) {
    let body_len = BODY_FIXED + record.key.len() + record.value.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&(record.key.len() as u32).to_le_bytes());
    out.extend_from_slice(&record.key);
    out.extend_from_slice(&record.value);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why the bytes at a position are not an intact record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    /// The file ends inside the header or the body.
    Truncated,
    /// The length field is impossible.
    BadLength,
    /// The checksum does not match.
    Checksum,
    /// The record names another offset than its place says.
    WrongOffset,
}

impl Damage {
    fn describe(self) -> &'static str {
        match self {
            Damage::Truncated => "record is cut short",
            Damage::BadLength => "record length is impossible",
            Damage::Checksum => "checksum mismatch",
            Damage::WrongOffset => "record holds the wrong offset",
        }
    }
}

/// A parsed record: its total length in bytes, its key, its value, and its place.
type Parsed<'a> = (usize, &'a [u8], &'a [u8], Place);

/// An intact record's place: its offset and the first offset of its group commit.
#[derive(Debug, Clone, Copy)]
struct Place {
    offset: Offset,
    group: Offset,
}

/// Parses the record at `buf[pos..]`, expected to hold `offset`. Returns the record's
/// total length, its key and value, and its place.
fn parse_place(buf: &[u8], pos: usize, offset: Option<Offset>) -> Result<Parsed<'_>, Damage> {
    let header = buf.get(pos..pos + HEADER).ok_or(Damage::Truncated)?;
    let body_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(BODY_FIXED..=BODY_FIXED + MAX_RECORD_BYTES).contains(&body_len) {
        return Err(Damage::BadLength);
    }
    let body = buf
        .get(pos + HEADER..pos + HEADER + body_len)
        .ok_or(Damage::Truncated)?;
    if crc32fast::hash(body) != crc {
        return Err(Damage::Checksum);
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&body[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let found = word(0);
    let group = word(8);
    if offset.is_some_and(|o| o != found) || group > found {
        return Err(Damage::WrongOffset);
    }
    let key_len = u32::from_le_bytes([body[16], body[17], body[18], body[19]]) as usize;
    if BODY_FIXED + key_len > body_len {
        return Err(Damage::BadLength);
    }
    let key = &body[BODY_FIXED..BODY_FIXED + key_len];
    let value = &body[BODY_FIXED + key_len..];
    Ok((
        HEADER + body_len,
        key,
        value,
        Place {
            offset: found,
            group,
        },
    ))
}

/// [`parse_place`] without the place.
fn parse_at(
    buf: &[u8],
    pos: usize,
    offset: Option<Offset>,
) -> Result<(usize, &[u8], &[u8]), Damage> {
    parse_place(buf, pos, offset).map(|(n, k, v, _)| (n, k, v))
}

/// Whether an intact record of a group commit that started after `damaged` lies after
/// `pos`: then the damaged record's group was synced before it, and the damage is not a
/// torn tail. Intact records of the damaged record's own group (a torn write whose later
/// pages reached the disk) and stale bytes naming older offsets do not count.
fn later_group_after(buf: &[u8], pos: usize, damaged: Offset) -> bool {
    (pos + 1..buf.len().saturating_sub(HEADER + BODY_FIXED - 1)).any(|p| {
        parse_place(buf, p, None)
            .is_ok_and(|(_, _, _, place)| place.offset > damaged && place.group > damaged)
    })
}

/// Opens or creates the log directory, reads every segment, and returns them with what
/// recovery did. With `repair`, a torn tail is truncated; without, it is just left out.
fn scan(dir: &Path, repair: bool) -> Result<(Vec<Segment>, Recovery), Error> {
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
    let mut bases: Vec<(Offset, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))? {
        let path = entry.map_err(|e| io("cannot list", dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(base) = name.strip_suffix(".seg") {
            let base: Offset = base.parse().map_err(|_| Error::Corrupt {
                offset: 0,
                reason: format!("unexpected segment file name {name}"),
            })?;
            bases.push((base, path));
        }
    }
    bases.sort();
    let mut segments = Vec::new();
    let mut recovery = Recovery::default();
    let mut expected: Offset = 0;
    let count = bases.len();
    for (i, (base, path)) in bases.into_iter().enumerate() {
        if base != expected {
            return Err(Error::Corrupt {
                offset: expected,
                reason: format!(
                    "segment {} starts at offset {base}, but the log before it ends at {expected}: a segment is missing",
                    path.display()
                ),
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(repair)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(|e| io("cannot read", &path, e))?;
        let mut positions = Vec::new();
        let mut pos = 0usize;
        while pos < buf.len() {
            match parse_at(&buf, pos, Some(expected)) {
                Ok((n, _, _)) => {
                    positions.push(pos as u64);
                    pos += n;
                    expected += 1;
                }
                Err(damage) => {
                    let last = i + 1 == count;
                    if !last || later_group_after(&buf, pos, expected) {
                        return Err(Error::Corrupt {
                            offset: expected,
                            reason: format!(
                                "{} in {} at byte {pos}, with intact records after it; refusing to start (restore the data dir from a backup, or move this segment aside to serve only what precedes it)",
                                damage.describe(),
                                path.display()
                            ),
                        });
                    }
                    let cut = (buf.len() - pos) as u64;
                    tracing::warn!(
                        offset = expected,
                        bytes = cut,
                        file = %path.display(),
                        reason = damage.describe(),
                        "torn tail in the event log (a write cut short by a crash, never acknowledged); truncating it"
                    );
                    recovery.truncated_tail = Some((expected, cut));
                    if repair {
                        file.set_len(pos as u64)
                            .map_err(|e| io("cannot truncate", &path, e))?;
                        file.sync_all().map_err(|e| io("cannot sync", &path, e))?;
                    }
                    break;
                }
            }
        }
        let len = positions
            .last()
            .map(|&p| {
                let n = parse_at(&buf, p as usize, None)
                    .map(|(n, _, _)| n)
                    .unwrap_or(0);
                p + n as u64
            })
            .unwrap_or(0);
        segments.push(Segment {
            base,
            path,
            file: Arc::new(file),
            positions,
            len,
        });
    }
    Ok((segments, recovery))
}

/// Opens `path` for reading and writing, created empty.
fn create_segment_file(path: &Path) -> std::io::Result<File> {
    // Truncating is safe: a file at the next segment's name or the spare's holds no
    // durable record (a segment is named by the durable end when it starts).
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir` for reading and appending, recovers it (see
    /// the module docs) and starts its committer thread. One process at a time: the
    /// directory is locked.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        Self::open_with(dir, Options::default())
    }

    /// [`EmbeddedLog::open`] with `options`.
    pub fn open_with(dir: &Path, options: Options) -> Result<Self, Error> {
        if options.segment_bytes < 1024 {
            return Err(Error::Storage(format!(
                "a segment must hold at least 1024 bytes, not {}",
                options.segment_bytes
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("cannot open", &lock_path, e))?;
        lock.try_lock().map_err(|_| {
            Error::Storage(format!(
                "the event log in {} is in use by another process (is herald serve running?)",
                dir.display()
            ))
        })?;
        let dir_handle = File::open(dir).map_err(|e| io("cannot open", dir, e))?;
        let (segments, recovery) = scan(dir, true)?;
        let next = segments.last().map(Segment::end).unwrap_or(0);
        let shared = Arc::new(Shared {
            segments: RwLock::new(segments),
        });
        let (end_tx, end) = watch::channel(next);
        // Bounded: when the disk cannot keep up, appenders wait here instead of queueing
        // without limit.
        let (requests, rx) = std_mpsc::sync_channel(4096);
        let poisoned = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(Mutex::new(None));
        let fsyncs = Arc::new(AtomicU64::new(0));
        #[cfg(test)]
        let inject = Arc::new(Mutex::new(None));
        let mut committer = Committer {
            dir: dir.to_owned(),
            dir_handle,
            options,
            shared: shared.clone(),
            next,
            end: end_tx,
            poisoned: poisoned.clone(),
            refusing: refusing.clone(),
            fsyncs: fsyncs.clone(),
            buf: Vec::new(),
            spare: None,
            spare_tried: None,
            fallocate: true,
            #[cfg(test)]
            inject: inject.clone(),
        };
        // The first segment of a new log, and the spare that will follow the active one.
        if committer.shared.read().is_empty() {
            committer.roll()?;
        }
        committer.make_spare();
        std::thread::Builder::new()
            .name("herald-log-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(|e| Error::Storage(e.to_string()))?;
        Ok(EmbeddedLog {
            shared,
            requests: Some(requests),
            end,
            poisoned,
            refusing,
            fsyncs,
            recovery,
            _lock: Some(lock),
            #[cfg(test)]
            inject,
        })
    }

    /// Opens the log in `dir` for reading only, without a lock, so a running server's
    /// log can be read (by `herald replay`). Sees the records intact when it was opened;
    /// an incomplete record at the very end (a write in progress) is left out, not
    /// repaired. Appends fail with [`Error::Closed`].
    pub fn open_read_only(dir: &Path) -> Result<Self, Error> {
        if !dir.is_dir() {
            return Err(Error::Storage(format!("no event log in {}", dir.display())));
        }
        let (segments, recovery) = scan(dir, false)?;
        let next = segments.last().map(Segment::end).unwrap_or(0);
        let (_end_tx, end) = watch::channel(next);
        Ok(EmbeddedLog {
            shared: Arc::new(Shared {
                segments: RwLock::new(segments),
            }),
            requests: None,
            end,
            poisoned: Arc::new(AtomicBool::new(false)),
            refusing: Arc::new(Mutex::new(None)),
            fsyncs: Arc::new(AtomicU64::new(0)),
            recovery,
            _lock: None,
            #[cfg(test)]
            inject: Arc::new(Mutex::new(None)),
        })
    }

    /// How many fsyncs the log has done since it was opened (group commit makes this
    /// smaller than the number of appends under concurrency).
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// What opening the log found and repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Reads records `[from, to)`, checking each one's checksum and offset again.
    pub fn read_blocking(&self, from: Offset, to: Offset) -> Result<Vec<Stored>, Error> {
        self.shared.read_range(from, to)
    }
}

impl Shared {
    fn read_range(&self, from: Offset, to: Offset) -> Result<Vec<Stored>, Error> {
        let segments = self.read();
        let mut out = Vec::with_capacity(to.saturating_sub(from) as usize);
        let mut at = from;
        while at < to {
            let i = segments.partition_point(|s| s.base <= at);
            let Some(seg) = i.checked_sub(1).and_then(|i| segments.get(i)) else {
                break;
            };
            if at >= seg.end() {
                break;
            }
            let last = to.min(seg.end());
            let start = seg.positions[(at - seg.base) as usize];
            let stop = if last == seg.end() {
                seg.len
            } else {
                seg.positions[(last - seg.base) as usize]
            };
            let mut buf = vec![0u8; (stop - start) as usize];
            seg.file
                .read_exact_at(&mut buf, start)
                .map_err(|e| io("cannot read", &seg.path, e))?;
            let mut pos = 0;
            while at < last {
                let (n, key, value) =
                    parse_at(&buf, pos, Some(at)).map_err(|d| Error::Corrupt {
                        offset: at,
                        reason: format!(
                            "{} in {} at byte {} on read-back",
                            d.describe(),
                            seg.path.display(),
                            start + pos as u64
                        ),
                    })?;
                out.push(Stored {
                    offset: at,
                    key: key.to_vec(),
                    value: value.to_vec(),
                });
                pos += n;
                at += 1;
            }
        }
        Ok(out)
    }
}

impl Append for EmbeddedLog {
    fn append(&self, records: Vec<Record>) -> BoxFuture<'static, Result<Vec<Offset>, Error>> {
        if self.poisoned.load(Ordering::Acquire) {
            return Box::pin(async { Err(Error::Poisoned) });
        }
        let Some(requests) = self.requests.clone() else {
            return Box::pin(async { Err(Error::Closed) });
        };
        if let Some(big) = records
            .iter()
            .find(|r| r.key.len() + r.value.len() > MAX_RECORD_BYTES)
        {
            let size = big.key.len() + big.value.len();
            return Box::pin(async move {
                Err(Error::RecordTooLarge {
                    size,
                    max: MAX_RECORD_BYTES,
                })
            });
        }
        let (reply, rx) = oneshot::channel();
        Box::pin(async move {
            if records.is_empty() {
                return Ok(Vec::new());
            }
            // The queue is bounded; waiting for room must not block the runtime.
            let req = AppendRequest { records, reply };
            match requests.try_send(req) {
                Ok(()) => {}
                Err(std_mpsc::TrySendError::Full(req)) => {
                    tokio::task::spawn_blocking(move || requests.send(req))
                        .await
                        .map_err(|_| Error::Closed)?
                        .map_err(|_| Error::Closed)?;
                }
                Err(std_mpsc::TrySendError::Disconnected(_)) => return Err(Error::Closed),
            }
            rx.await.map_err(|_| Error::Closed)?
        })
    }
}

impl EventLog for EmbeddedLog {
    fn read(&self, from: Offset, max: usize) -> BoxFuture<'_, Result<Vec<Stored>, Error>> {
        let end = *self.end.borrow();
        Box::pin(async move {
            if from >= end || max == 0 {
                return Ok(Vec::new());
            }
            let to = end.min(from.saturating_add(max as u64));
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || shared.read_range(from, to))
                .await
                .map_err(|_| Error::Closed)?
        })
    }

    fn durable_end(&self) -> watch::Receiver<Offset> {
        self.end.clone()
    }

    fn health(&self) -> Health {
        if self.poisoned.load(Ordering::Acquire) {
            return Health::Failed(Error::Poisoned.to_string());
        }
        match &*self.refusing.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Health::Degraded(why.clone()),
            None => Health::Ok,
        }
    }
}

struct Committer {
    dir: PathBuf,
    /// The log's directory, held open to sync it after a segment starts.
    dir_handle: File,
    options: Options,
    shared: Arc<Shared>,
    next: Offset,
    end: watch::Sender<Offset>,
    poisoned: Arc<AtomicBool>,
    refusing: Arc<Mutex<Option<String>>>,
    fsyncs: Arc<AtomicU64>,
    buf: Vec<u8>,
    /// The next segment's file, open ahead of time ([`SPARE`]).
    spare: Option<File>,
    /// When creating the spare last failed.
    spare_tried: Option<std::time::Instant>,
    /// Whether the file system reserves blocks (`fallocate`); off after it said it
    /// does not.
    fallocate: bool,
    /// A failure the next group meets (unit tests only).
    #[cfg(test)]
    inject: Arc<Mutex<Option<Injected>>>,
}

/// A storage failure a unit test makes the committer meet (the switch exists only in test
/// builds).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injected {
    /// The group's write fails.
    Write,
    /// The group is written, and its fsync fails.
    Sync,
}

#[cfg(test)]
fn injected_failure() -> std::io::Error {
    std::io::Error::from_raw_os_error(5) // EIO, as a dying disk answers.
}

impl Committer {
    fn run(mut self, rx: std_mpsc::Receiver<AppendRequest>) {
        // Block for the first waiting append, then take every other one already waiting:
        // they all share the one sync below.
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            let mut count = group[0].records.len();
            while count < MAX_BATCH_RECORDS {
                match rx.try_recv() {
                    Ok(req) => {
                        count += req.records.len();
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
            if self.poisoned.load(Ordering::Acquire) {
                for req in group {
                    let _ = req.reply.send(Err(Error::Poisoned));
                }
                continue;
            }
            let start = self.next;
            let began = std::time::Instant::now();
            match self.commit(&group) {
                Ok(()) => {
                    self.set_refusing(None);
                    herald_telemetry::metrics::log_synced(count, began.elapsed());
                    // Readers see the records before their appenders hear back, so a
                    // reader started after an answer always finds the record.
                    self.end.send_replace(self.next);
                    let mut offset = start;
                    for req in group {
                        let n = req.records.len() as u64;
                        let _ = req.reply.send(Ok((offset..offset + n).collect()));
                        offset += n;
                    }
                    assert_eq!(offset, self.next, "group commit assigned offsets densely");
                }
                Err(Error::Exhausted(why)) => {
                    // Nothing was written: refuse this group, keep the log.
                    let resource = ["files", "disk", "memory"]
                        .into_iter()
                        .find(|r| why.starts_with(r))
                        .unwrap_or("other");
                    herald_telemetry::metrics::log_refused(resource);
                    self.set_refusing(Some(why.clone()));
                    for req in group {
                        let _ = req.reply.send(Err(Error::Exhausted(why.clone())));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "event log write failed; poisoning the log");
                    self.poisoned.store(true, Ordering::Release);
                    for req in group {
                        let _ = req.reply.send(Err(Error::Poisoned));
                    }
                }
            }
        }
    }

    /// Notes (or clears) why appends are refused, logging only the changes.
    fn set_refusing(&self, why: Option<String>) {
        let mut r = self.refusing.lock().unwrap_or_else(|e| e.into_inner());
        match (&*r, &why) {
            (None, Some(w)) => tracing::warn!(
                reason = %w,
                "the event log is refusing appends (nothing written, not poisoned) until the resource is back"
            ),
            (Some(_), None) => tracing::info!("the event log takes appends again"),
            _ => {}
        }
        *r = why;
    }

    /// Creates the spare segment file if there is none, at most once a second after a
    /// failure. A failure here costs nothing yet: the roll tries again.
    fn make_spare(&mut self) {
        if self.spare.is_some() || self.spare_tried.is_some_and(|t| t.elapsed() < SPARE_RETRY) {
            return;
        }
        let path = self.dir.join(SPARE);
        match create_segment_file(&path) {
            Ok(f) => {
                self.spare = Some(f);
                self.spare_tried = None;
            }
            Err(e) => {
                if self.spare_tried.is_none() {
                    tracing::warn!(error = %e, path = %path.display(), "cannot create the next segment ahead of time; will try again");
                }
                self.spare_tried = Some(std::time::Instant::now());
            }
        }
    }

    /// Starts the segment at `self.next`: the spare renamed into place, or a new file
    /// when there is no spare; the directory is synced either way. A file that could not
    /// be had is [`Error::Exhausted`]: nothing was written.
    fn roll(&mut self) -> Result<(), Error> {
        let path = self.dir.join(segment_name(self.next));
        let file = match self.spare.take() {
            Some(spare) => match std::fs::rename(self.dir.join(SPARE), &path) {
                Ok(()) => spare,
                Err(e) => return Err(before_write("cannot start segment", &path, e)),
            },
            None => {
                create_segment_file(&path).map_err(|e| before_write("cannot create", &path, e))?
            }
        };
        // The segment's name must be durable before any record in it is acknowledged.
        self.dir_handle
            .sync_all()
            .map_err(|e| io("cannot sync directory", &self.dir, e))?;
        self.shared.write().push(Segment {
            base: self.next,
            path,
            file: Arc::new(file),
            positions: Vec::new(),
            len: 0,
        });
        Ok(())
    }

    /// Reserves the disk blocks of `len` bytes at `at` of `file`, so a full disk shows
    /// before the write. Off for good on a file system that cannot.
    fn reserve(&mut self, file: &File, at: u64, len: u64, path: &Path) -> Result<(), Error> {
        use rustix::fs::{FallocateFlags, fallocate};
        use rustix::io::Errno;
        if !self.fallocate || len == 0 {
            return Ok(());
        }
        match fallocate(file, FallocateFlags::KEEP_SIZE, at, len) {
            Ok(()) => Ok(()),
            Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                self.fallocate = false;
                Ok(())
            }
            Err(e) => Err(before_write(
                "cannot reserve space in",
                path,
                std::io::Error::from(e),
            )),
        }
    }

    fn commit(&mut self, group: &[AppendRequest]) -> Result<(), Error> {
        // Close the active segment once it is full.
        let full = self
            .shared
            .read()
            .last()
            .is_none_or(|s| s.len >= self.options.segment_bytes);
        if full {
            self.roll()?;
        }
        self.make_spare();
        self.buf.clear();
        let mut positions = Vec::with_capacity(group.iter().map(|r| r.records.len()).sum());
        let mut offset = self.next;
        let first = self.next;
        for req in group {
            for record in &req.records {
                positions.push(self.buf.len() as u64);
                encode_record(&mut self.buf, offset, first, record);
                offset += 1;
            }
        }
        let (file, at, path) = {
            let segs = self.shared.read();
            let seg = segs.last().ok_or(Error::Closed)?;
            (seg.file.clone(), seg.len, seg.path.clone())
        };
        self.reserve(&file, at, self.buf.len() as u64, &path)?;
        #[cfg(test)]
        let injected = self.inject.lock().unwrap_or_else(|e| e.into_inner()).take();
        #[cfg(test)]
        if injected == Some(Injected::Write) {
            return Err(io("cannot write", &path, injected_failure()));
        }
        file.write_all_at(&self.buf, at)
            .map_err(|e| io("cannot write", &path, e))?;
        #[cfg(test)]
        if injected == Some(Injected::Sync) {
            return Err(io("cannot sync", &path, injected_failure()));
        }
        file.sync_data().map_err(|e| io("cannot sync", &path, e))?;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        {
            let mut segs = self.shared.write();
            let seg = segs.last_mut().ok_or(Error::Closed)?;
            seg.positions.extend(positions.iter().map(|p| p + at));
            seg.len = at + self.buf.len() as u64;
            assert_eq!(
                seg.end(),
                offset,
                "segment index matches the offsets written"
            );
        }
        self.next = offset;
        Ok(())
    }
}

/// Appends records to a file the way the log does, for tests that damage a log on
/// purpose.
#[doc(hidden)]
pub fn encode_for_tests(offset: Offset, record: &Record) -> Vec<u8> {
    let mut v = Vec::new();
    encode_record(&mut v, offset, offset, record);
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    fn rec(i: u32) -> Record {
        Record {
            key: format!("k{i}").into_bytes(),
            value: i.to_be_bytes().to_vec(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_or_fsync_poisons_until_a_restart() {
        for failure in [Injected::Write, Injected::Sync] {
            let dir = tempfile::tempdir().unwrap();
            let log = EmbeddedLog::open(dir.path()).unwrap();
            assert_eq!(log.append(vec![rec(0)]).await.unwrap(), vec![0]);
            *log.inject.lock().unwrap() = Some(failure);
            assert!(
                matches!(log.append(vec![rec(1)]).await, Err(Error::Poisoned)),
                "{failure:?}"
            );
            // Poisoned: the failure has passed, but nothing is taken until a restart,
            // and the health says a restart is what it needs.
            assert!(matches!(
                log.append(vec![rec(2)]).await,
                Err(Error::Poisoned)
            ));
            assert!(
                matches!(log.health(), Health::Failed(_)),
                "{:?}",
                log.health()
            );
            assert_eq!(
                *log.durable_end().borrow(),
                1,
                "nothing after the failure is read"
            );
            drop(log);
            // A restart decides from the disk: what was acknowledged is there; the group
            // that failed was never acknowledged (a torn tail, or whole if its bytes
            // reached the disk: then it is read as written, never half).
            let log = EmbeddedLog::open(dir.path()).unwrap();
            let end = *log.durable_end().borrow();
            assert!((1..=2).contains(&end), "{failure:?}: end {end}");
            let read = log.read(0, 10).await.unwrap();
            assert_eq!(read[0].key, b"k0");
            assert_eq!(log.health(), Health::Ok);
            assert_eq!(log.append(vec![rec(9)]).await.unwrap(), vec![end]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn append_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path()).unwrap();
            assert_eq!(log.append(vec![rec(0), rec(1)]).await.unwrap(), vec![0, 1]);
            assert_eq!(log.append(vec![rec(2)]).await.unwrap(), vec![2]);
            let got = log.read(1, 10).await.unwrap();
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].offset, 1);
            assert_eq!(got[0].key, b"k1");
            assert_eq!(got[1].value, 2u32.to_be_bytes());
            assert!(log.read(3, 10).await.unwrap().is_empty());
            // A second writer is refused while the first holds the log.
            assert!(EmbeddedLog::open(dir.path()).is_err());
            // A reader is not.
            let ro = EmbeddedLog::open_read_only(dir.path()).unwrap();
            assert_eq!(ro.read(0, 10).await.unwrap().len(), 3);
        }
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(*log.durable_end().borrow(), 3);
        assert_eq!(log.recovery(), &Recovery::default());
        assert_eq!(log.append(vec![rec(3)]).await.unwrap(), vec![3]);
        assert_eq!(log.read(0, 100).await.unwrap().len(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_get_dense_distinct_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move { log.append(vec![rec(i)]).await }));
        }
        let mut offsets = Vec::new();
        for t in tasks {
            offsets.extend(t.await.unwrap().unwrap());
        }
        offsets.sort_unstable();
        assert_eq!(offsets, (0..200).collect::<Vec<_>>());
        assert_eq!(*log.durable_end().borrow(), 200);
        // Group commit: 200 concurrent appends shared far fewer than 200 fsyncs.
        assert!(log.fsyncs() < 200, "fsyncs: {}", log.fsyncs());
        assert_eq!(log.read(0, 500).await.unwrap().len(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        let big = Record {
            key: vec![],
            value: vec![0; MAX_RECORD_BYTES + 1],
        };
        assert!(matches!(
            log.append(vec![big]).await,
            Err(Error::RecordTooLarge { .. })
        ));
        assert_eq!(log.append(vec![rec(0)]).await.unwrap(), vec![0]);
    }

    async fn log_with(dir: &Path, n: u32) {
        let log = EmbeddedLog::open(dir).unwrap();
        for i in 0..n {
            log.append(vec![rec(i)]).await.unwrap();
        }
    }

    fn segment(dir: &Path) -> PathBuf {
        dir.join(segment_name(0))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn torn_tail_is_truncated_and_reported() {
        for cut in [1usize, 5, 9, 17] {
            let dir = tempfile::tempdir().unwrap();
            log_with(dir.path(), 10).await;
            let path = segment(dir.path());
            let len = std::fs::metadata(&path).unwrap().len();
            // A crash cut the last record short...
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(len - cut as u64).unwrap();
            drop(f);
            let log = EmbeddedLog::open(dir.path()).unwrap();
            assert_eq!(*log.durable_end().borrow(), 9, "cut {cut}");
            assert_eq!(log.recovery().truncated_tail.map(|t| t.0), Some(9));
            // ...and the log goes on after it.
            assert_eq!(log.append(vec![rec(9)]).await.unwrap(), vec![9]);
            assert_eq!(log.read(0, 100).await.unwrap().len(), 10);
        }
        // Garbage after the last record (a torn write of a new one) is cut too.
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 3).await;
        let mut f = OpenOptions::new()
            .append(true)
            .open(segment(dir.path()))
            .unwrap();
        f.write_all(&[0x55; 11]).unwrap();
        drop(f);
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.recovery().truncated_tail, Some((3, 11)));
        assert_eq!(*log.durable_end().borrow(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corruption_before_the_tail_stops_start_up_naming_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 10).await;
        let path = segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip one byte inside record 4.
        let each = bytes.len() / 10;
        bytes[4 * each + HEADER + 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = EmbeddedLog::open(dir.path()).unwrap_err();
        match &err {
            Error::Corrupt { offset, reason } => {
                assert_eq!(*offset, 4);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(err.to_string().contains("offset 4"), "{err}");
        // The bytes were left as they were: nothing was truncated.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);

        // A record cut out of the middle is corruption too, not a tail.
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 10).await;
        let path = segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let each = bytes.len() / 10;
        bytes.drain(2 * each + 3..2 * each + 9);
        std::fs::write(&path, &bytes).unwrap();
        match EmbeddedLog::open(dir.path()).unwrap_err() {
            Error::Corrupt { offset, .. } => assert_eq!(offset, 2),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damage_inside_the_last_group_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path()).unwrap();
            log.append(vec![rec(0), rec(1)]).await.unwrap();
            // One group commit of five records (offsets 2..=6).
            log.append((2..7).map(rec).collect()).await.unwrap();
        }
        let path = segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let each = bytes.len() / 7;
        // A power loss left a hole inside the last group (record 3); records 4..=6 of the
        // same group reached the disk. Nothing of that group was acknowledged.
        bytes[3 * each + HEADER + 2] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.recovery().truncated_tail.map(|t| t.0), Some(3));
        assert_eq!(*log.durable_end().borrow(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_segment_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        log_with(dir.path(), 2).await;
        std::fs::rename(segment(dir.path()), dir.path().join(segment_name(5))).unwrap();
        assert!(matches!(
            EmbeddedLog::open(dir.path()),
            Err(Error::Corrupt { offset: 0, .. })
        ));
    }
}
