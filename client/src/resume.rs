//! What the app has been shown: the last `seq` and a bounded set of recent message ids,
//! used to remove duplicates, and its state file. A pure struct; the only I/O is in
//! [`Resume::load`] and [`Resume::save`], which the device calls from blocking threads.
//!
//! # State file
//!
//! One small JSON document, `{"format":1,"device_id":"…","last_seq":N,"recent_ids":[…]}`,
//! replaced atomically on each save: it is written to `<path>.tmp`, optionally synced,
//! then renamed over `<path>` (and the directory synced), so a crash leaves either the
//! old state or the new one, never a torn file.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// The state file's current format number.
const FORMAT: u32 = 1;

/// Whether an entry is new to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not shown before: hand it to the app.
    New,
    /// Its `seq` is at or below the last one shown: a resend.
    SeenSeq,
    /// Its `seq` is new but its message id was shown recently.
    SeenId,
}

/// The device's resume point: the last `seq` shown to the app and the ids of the most
/// recent messages shown, at most `max_recent_ids` of them.
///
/// Entries of one device carry strictly increasing `seq`s and arrive in `seq` order, so
/// `last_seq` alone removes every resend; the id set also catches a message that came
/// back under a new `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    device_id: String,
    last_seq: u64,
    recent: VecDeque<String>,
    recent_set: HashSet<String>,
    max_recent_ids: usize,
}

impl Resume {
    /// A device that has been shown nothing yet. `max_recent_ids` is raised to 1.
    pub fn new(device_id: impl Into<String>, max_recent_ids: usize) -> Resume {
        let max_recent_ids = max_recent_ids.max(1);
        Resume {
            device_id: device_id.into(),
            last_seq: 0,
            recent: VecDeque::with_capacity(max_recent_ids.min(1024)),
            recent_set: HashSet::with_capacity(max_recent_ids.min(1024)),
            max_recent_ids,
        }
    }

    /// The device this state belongs to.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The last `seq` shown to the app (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// How many recent ids are remembered.
    pub fn recent_ids(&self) -> usize {
        self.recent.len()
    }

    /// Classifies an entry without changing anything.
    pub fn check(&self, seq: u64, id: &str) -> Verdict {
        if seq <= self.last_seq {
            Verdict::SeenSeq
        } else if self.recent_set.contains(id) {
            Verdict::SeenId
        } else {
            Verdict::New
        }
    }

    /// Records that the entry was dealt with: shown to the app, or removed as a duplicate
    /// by id. `last_seq` never goes back; the oldest id is forgotten once the set is full.
    pub fn record(&mut self, seq: u64, id: &str) {
        self.last_seq = self.last_seq.max(seq);
        if self.recent_set.contains(id) {
            return;
        }
        if self.recent.len() == self.max_recent_ids
            && let Some(oldest) = self.recent.pop_front()
        {
            self.recent_set.remove(&oldest);
        }
        self.recent.push_back(id.to_owned());
        self.recent_set.insert(id.to_owned());
        debug_assert_eq!(self.recent.len(), self.recent_set.len());
        debug_assert!(self.recent.len() <= self.max_recent_ids);
    }

    /// The state file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let file = StateFileV1 {
            format: FORMAT,
            device_id: self.device_id.clone(),
            last_seq: self.last_seq,
            recent_ids: self.recent.iter().cloned().collect(),
        };
        serde_json::to_vec(&file).expect("serialising strings and integers cannot fail")
    }

    /// Parses state file bytes for `device_id`. `path` is only used in errors.
    pub fn from_bytes(
        bytes: &[u8],
        device_id: &str,
        max_recent_ids: usize,
        path: &Path,
    ) -> Result<Resume, Error> {
        let corrupt = |reason: String| Error::StateCorrupt {
            path: path.to_owned(),
            reason,
        };
        let file: StateFileV1 =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a state file: {e}")))?;
        if file.format != FORMAT {
            return Err(corrupt(format!(
                "format {} is not supported (this SDK reads format {FORMAT})",
                file.format
            )));
        }
        if file.device_id != device_id {
            return Err(Error::StateWrongDevice {
                path: path.to_owned(),
                expected: device_id.to_owned(),
                found: file.device_id,
            });
        }
        let mut state = Resume::new(device_id, max_recent_ids);
        state.last_seq = file.last_seq;
        // Keep the newest ids if the file holds more than this device remembers.
        let skip = file.recent_ids.len().saturating_sub(state.max_recent_ids);
        for id in file.recent_ids.into_iter().skip(skip) {
            if state.recent_set.insert(id.clone()) {
                state.recent.push_back(id);
            }
        }
        Ok(state)
    }

    /// Loads the state file at `path`; a missing file is a fresh state. An unreadable,
    /// corrupt or other device's file is an error: starting afresh could show the app
    /// messages it has already seen, so the caller decides (for example by deleting it).
    pub fn load(path: &Path, device_id: &str, max_recent_ids: usize) -> Result<Resume, Error> {
        match std::fs::read(path) {
            Ok(bytes) => Resume::from_bytes(&bytes, device_id, max_recent_ids, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Resume::new(device_id, max_recent_ids))
            }
            Err(source) => Err(Error::StateRead {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Replaces the state file at `path` atomically (temporary file, then rename). With
    /// `sync`, the data and the rename are flushed to the disk before this returns, so
    /// the state survives a power loss as well as a crash.
    pub fn save(&self, path: &Path, sync: bool) -> Result<(), Error> {
        write_atomically(path, &self.to_bytes(), sync).map_err(|source| Error::StateWrite {
            path: path.to_owned(),
            source,
        })
    }
}

/// The state file, version 1. Kept apart from [`Resume`] so the file format changes only
/// on purpose.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFileV1 {
    format: u32,
    device_id: String,
    last_seq: u64,
    recent_ids: Vec<String>,
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn write_atomically(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)?;
    if sync {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // Makes the rename durable. Not every platform can open a directory; there the
        // rename is as durable as the platform makes it.
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "herald-client-{name}-{}-{}",
                std::process::id(),
                crate::backoff::random_seed()
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_seq_at_or_below_the_last_shown_is_a_duplicate() {
        let mut r = Resume::new("d", 8);
        assert_eq!(r.check(1, "a"), Verdict::New);
        r.record(1, "a");
        r.record(2, "b");
        assert_eq!(r.check(1, "a"), Verdict::SeenSeq);
        assert_eq!(r.check(2, "b"), Verdict::SeenSeq);
        // Even under a new id, an old seq is a resend.
        assert_eq!(r.check(2, "zz"), Verdict::SeenSeq);
        assert_eq!(r.check(3, "c"), Verdict::New);
        // Gaps are fine: expired or acknowledged entries are skipped by the gateway.
        assert_eq!(r.check(10, "j"), Verdict::New);
        assert_eq!(r.last_seq(), 2);
    }

    #[test]
    fn a_recent_id_under_a_new_seq_is_a_duplicate() {
        let mut r = Resume::new("d", 8);
        r.record(1, "a");
        assert_eq!(r.check(5, "a"), Verdict::SeenId);
        // Recording the duplicate moves last_seq on, so its resend is a seq duplicate.
        r.record(5, "a");
        assert_eq!(r.last_seq(), 5);
        assert_eq!(r.recent_ids(), 1);
        assert_eq!(r.check(5, "a"), Verdict::SeenSeq);
    }

    #[test]
    fn the_id_set_is_bounded_and_forgets_the_oldest() {
        let mut r = Resume::new("d", 3);
        for (seq, id) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            r.record(seq, id);
        }
        assert_eq!(r.recent_ids(), 3);
        assert_eq!(r.check(10, "a"), Verdict::New, "a was forgotten");
        assert_eq!(r.check(10, "b"), Verdict::SeenId);
        assert_eq!(r.check(10, "d"), Verdict::SeenId);
    }

    #[test]
    fn last_seq_never_goes_back() {
        let mut r = Resume::new("d", 3);
        r.record(7, "x");
        r.record(3, "y");
        assert_eq!(r.last_seq(), 7);
    }

    #[test]
    fn state_file_round_trip() {
        let dir = TempDir::new("round-trip");
        let path = dir.0.join("state.json");
        let mut r = Resume::new("dev-1", 4);
        for seq in 1..=6 {
            r.record(seq, &format!("m{seq}"));
        }
        r.save(&path, true).expect("save");
        assert!(
            !temp_path(&path).exists(),
            "the temporary file is renamed away"
        );
        let back = Resume::load(&path, "dev-1", 4).expect("load");
        assert_eq!(back, r);
        assert_eq!(back.check(6, "new"), Verdict::SeenSeq);
        assert_eq!(back.check(7, "m5"), Verdict::SeenId);
        assert_eq!(back.check(7, "m1"), Verdict::New);

        // Saving again replaces the file.
        r.record(9, "m9");
        r.save(&path, false).expect("save again");
        assert_eq!(Resume::load(&path, "dev-1", 4).expect("load").last_seq(), 9);
    }

    #[test]
    fn loading_with_a_smaller_id_set_keeps_the_newest_ids() {
        let dir = TempDir::new("smaller");
        let path = dir.0.join("state.json");
        let mut r = Resume::new("dev-1", 10);
        for seq in 1..=5 {
            r.record(seq, &format!("m{seq}"));
        }
        r.save(&path, false).expect("save");
        let back = Resume::load(&path, "dev-1", 2).expect("load");
        assert_eq!(back.recent_ids(), 2);
        assert_eq!(back.check(9, "m5"), Verdict::SeenId);
        assert_eq!(back.check(9, "m3"), Verdict::New);
    }

    #[test]
    fn a_missing_state_file_is_a_fresh_start() {
        let dir = TempDir::new("missing");
        let r = Resume::load(&dir.0.join("nope.json"), "dev-1", 4).expect("load");
        assert_eq!(r.last_seq(), 0);
        assert_eq!(r.recent_ids(), 0);
    }

    #[test]
    fn a_corrupt_state_file_is_a_clear_error() {
        let dir = TempDir::new("corrupt");
        let path = dir.0.join("state.json");
        for bytes in [
            &b""[..],
            b"{\"format\":1,\"device_id\":\"dev-1\",\"last_se",
            b"\x00\x01garbage",
            b"{\"format\":1,\"device_id\":\"dev-1\",\"last_seq\":-1,\"recent_ids\":[]}",
            b"{\"format\":1,\"device_id\":\"dev-1\",\"last_seq\":1,\"recent_ids\":[],\"x\":1}",
        ] {
            std::fs::write(&path, bytes).expect("write");
            let err = Resume::load(&path, "dev-1", 4).expect_err("corrupt");
            assert!(matches!(err, Error::StateCorrupt { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.contains("state.json"), "names the file: {text}");
            assert!(text.contains("corrupt"), "{text}");
        }
    }

    #[test]
    fn a_newer_format_is_refused_not_misread() {
        let dir = TempDir::new("format");
        let path = dir.0.join("state.json");
        std::fs::write(
            &path,
            b"{\"format\":2,\"device_id\":\"dev-1\",\"last_seq\":1,\"recent_ids\":[]}",
        )
        .expect("write");
        let err = Resume::load(&path, "dev-1", 4).expect_err("format 2");
        assert!(err.to_string().contains("format 2"), "{err}");
    }

    #[test]
    fn another_devices_state_file_is_refused() {
        let dir = TempDir::new("wrong-device");
        let path = dir.0.join("state.json");
        Resume::new("dev-1", 4).save(&path, false).expect("save");
        let err = Resume::load(&path, "dev-2", 4).expect_err("wrong device");
        assert!(
            matches!(&err, Error::StateWrongDevice { expected, found, .. } if expected == "dev-2" && found == "dev-1"),
            "{err:?}"
        );
    }

    #[test]
    fn an_unwritable_state_file_is_an_error() {
        let dir = TempDir::new("unwritable");
        let path = dir.0.join("no-such-dir").join("state.json");
        let err = Resume::new("dev-1", 4)
            .save(&path, false)
            .expect_err("no dir");
        assert!(matches!(err, Error::StateWrite { .. }), "{err:?}");
    }
}
