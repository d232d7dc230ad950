//! The embedded backend: a hash map in the daemon, with an optional JSON snapshot on disk.
//!
//! One `std::sync::Mutex` guards the data; it is held only for map operations, never across an
//! `.await`, so it is cheap and cannot deadlock the runtime. Expiry deadlines are `Instant`s in
//! memory (immune to clock changes) and Unix milliseconds on disk. A min-heap of deadlines lets
//! the sweep remove expired keys without scanning the map; entries made stale by an overwrite or
//! a delete are skipped when they come up, and the heap is rebuilt when stale ones dominate.

use std::cmp::Reverse;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::glob::Glob;
use crate::{Checked, Op, Outcome, Published, StateError, StoreEvent};

/// How often expired keys are swept and a changed snapshot is written.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// Most expired keys removed under one lock acquisition, so a mass expiry does not stall callers.
const SWEEP_BATCH: usize = 10_000;

/// Written in every snapshot so a stray JSON file is not taken for one.
const SNAPSHOT_FORMAT: &str = "corral-state";
const SNAPSHOT_VERSION: u32 = 1;

#[derive(Debug)]
struct Entry {
    value: String,
    expires: Option<Instant>,
}

impl Entry {
    fn is_live(&self, now: impl FnOnce() -> Instant) -> bool {
        self.expires.is_none_or(|at| at > now())
    }
}

#[derive(Debug, Default)]
struct Data {
    map: HashMap<String, Entry>,
    /// Deadlines of keys set with a TTL, soonest first; may hold stale entries.
    deadlines: BinaryHeap<Reverse<(Instant, String)>>,
    /// Pattern subscriptions, in a stable order.
    patterns: BTreeMap<String, Glob>,
    /// Bumped on every change worth saving.
    version: u64,
}

impl Data {
    /// The live entry for `key`; removes it first when it has expired.
    fn live(&mut self, key: &str) -> Option<&mut Entry> {
        let expired = match self.map.get(key) {
            None => return None,
            Some(e) => !e.is_live(Instant::now),
        };
        if expired {
            self.map.remove(key);
            return None;
        }
        self.map.get_mut(key)
    }

    /// Sets `key`, reusing the existing allocation when the key is already there.
    fn put(&mut self, key: &str, value: &str, ttl_ms: Option<u64>) {
        let expires = ttl_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
        if let Some(e) = self.map.get_mut(key) {
            e.value.clear();
            e.value.push_str(value);
            e.expires = expires;
        } else {
            self.map.insert(
                key.to_owned(),
                Entry {
                    value: value.to_owned(),
                    expires,
                },
            );
        }
        if let Some(at) = expires {
            self.push_deadline(at, key);
        }
        self.version += 1;
    }

    fn push_deadline(&mut self, at: Instant, key: &str) {
        self.deadlines.push(Reverse((at, key.to_owned())));
        // Keys re-set with a TTL again and again leave stale deadlines behind; rebuild from the
        // map when they outnumber the keys. Amortised O(1) per push.
        if self.deadlines.len() > 2 * self.map.len() + 1024 {
            self.deadlines = self
                .map
                .iter()
                .filter_map(|(k, e)| e.expires.map(|at| Reverse((at, k.clone()))))
                .collect();
        }
    }

    /// Removes up to `limit` expired keys; true when there may be more.
    fn sweep(&mut self, now: Instant, limit: usize) -> bool {
        for _ in 0..limit {
            match self.deadlines.peek() {
                Some(Reverse((at, _))) if *at <= now => {}
                _ => return false,
            }
            let Some(Reverse((at, key))) = self.deadlines.pop() else {
                return false;
            };
            if let MapEntry::Occupied(o) = self.map.entry(key) {
                // Only when this deadline is still the key's own (not overwritten since).
                if o.get().expires == Some(at) {
                    o.remove();
                }
            }
        }
        true
    }
}

/// Saving state: which version is on disk and the last failure reported.
#[derive(Debug, Default)]
struct SaveStatus {
    saved_version: u64,
    last_failure: Option<String>,
}

#[derive(Debug)]
struct Shared {
    data: Mutex<Data>,
    events: mpsc::Sender<StoreEvent>,
    snapshot: Option<PathBuf>,
    /// Serialises snapshot writes (the periodic one and `flush`).
    save: tokio::sync::Mutex<SaveStatus>,
}

/// The embedded backend; dropping it ends its housekeeping task within a second.
#[derive(Debug)]
pub(crate) struct Embedded {
    shared: Arc<Shared>,
}

impl Embedded {
    /// Loads the snapshot (when given and present) and starts the housekeeping task.
    pub(crate) fn open(
        snapshot: Option<PathBuf>,
        events: mpsc::Sender<StoreEvent>,
    ) -> Result<Embedded, StateError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StateError::NoRuntime)?;
        let mut data = Data::default();
        if let Some(path) = &snapshot {
            load(path, &mut data)?;
        }
        let shared = Arc::new(Shared {
            data: Mutex::new(data),
            events,
            snapshot,
            save: tokio::sync::Mutex::new(SaveStatus::default()),
        });
        runtime.spawn(housekeeping(Arc::downgrade(&shared)));
        Ok(Embedded { shared })
    }

    pub(crate) fn describe(&self) -> String {
        match &self.shared.snapshot {
            None => "embedded, in memory".to_owned(),
            Some(path) => format!("embedded, saved in {}", path.display()),
        }
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.shared.data()
    }

    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.data().live(key).map(|e| e.value.clone())
    }

    pub(crate) fn set(&self, key: &str, value: &str, ttl_ms: Option<u64>) {
        self.data().put(key, value, ttl_ms);
    }

    pub(crate) fn del(&self, key: &str) -> bool {
        let mut data = self.data();
        match data.map.remove(key) {
            None => false,
            Some(e) => {
                data.version += 1;
                e.is_live(Instant::now)
            }
        }
    }

    pub(crate) fn incr(&self, key: &str, by: i64) -> Result<i64, StateError> {
        let mut data = self.data();
        let next = if let Some(e) = data.live(key) {
            let current = parse_redis_int(&e.value).ok_or_else(|| StateError::NotInteger {
                key: key.to_owned(),
            })?;
            let next = current
                .checked_add(by)
                .ok_or_else(|| StateError::Overflow {
                    key: key.to_owned(),
                })?;
            // Keep the TTL, as Redis's INCRBY does.
            e.value.clear();
            // Writing an integer to a String cannot fail.
            let _ = write_int(&mut e.value, next);
            next
        } else {
            data.map.insert(
                key.to_owned(),
                Entry {
                    value: by.to_string(),
                    expires: None,
                },
            );
            by
        };
        data.version += 1;
        Ok(next)
    }

    pub(crate) fn cas(
        &self,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
        ttl_ms: Option<u64>,
    ) -> bool {
        let mut data = self.data();
        let current = data.live(key).map(|e| e.value.as_str());
        if current != expected {
            return false;
        }
        match new {
            Some(value) => data.put(key, value, ttl_ms),
            None => {
                if data.map.remove(key).is_some() {
                    data.version += 1;
                }
            }
        }
        true
    }

    pub(crate) fn keys(&self, glob: &Glob) -> Vec<String> {
        let now = Instant::now();
        let mut keys: Vec<String> = {
            let data = self.data();
            data.map
                .iter()
                .filter(|(k, e)| e.is_live(|| now) && glob.matches(k))
                .map(|(k, _)| k.clone())
                .collect()
        };
        keys.sort_unstable();
        keys
    }

    pub(crate) async fn publish(&self, channel: &str, message: &str) -> u64 {
        let patterns: Vec<String> = {
            let data = self.data();
            data.patterns
                .iter()
                .filter(|(_, glob)| glob.matches(channel))
                .map(|(p, _)| p.clone())
                .collect()
        };
        for pattern in &patterns {
            let event = StoreEvent::Published(Published {
                pattern: pattern.clone(),
                channel: channel.to_owned(),
                message: message.to_owned(),
            });
            // Waits while the channel is full; fails only when the receiver is gone, and then
            // nobody is listening any more.
            let _ = self.shared.events.send(event).await;
        }
        patterns.len() as u64
    }

    /// One op of a pipeline.
    pub(crate) async fn run(&self, checked: Checked) -> Result<Outcome, StateError> {
        let ttl_ms = checked.ttl_ms;
        Ok(match checked.op {
            Op::Get { key } => Outcome::Value(self.get(&key)),
            Op::Set { key, value, .. } => {
                self.set(&key, &value, ttl_ms);
                Outcome::Done
            }
            Op::Del { key } => Outcome::Yes(self.del(&key)),
            Op::Incr { key, by } => Outcome::Number(self.incr(&key, by)?),
            Op::Cas {
                key, expected, new, ..
            } => Outcome::Yes(self.cas(&key, expected.as_deref(), new.as_deref(), ttl_ms)),
            Op::Publish { channel, message } => {
                Outcome::Count(self.publish(&channel, &message).await)
            }
        })
    }

    pub(crate) fn subscribe(&self, pattern: &str, glob: Glob) {
        self.data().patterns.insert(pattern.to_owned(), glob);
    }

    pub(crate) fn unsubscribe(&self, pattern: &str) {
        self.data().patterns.remove(pattern);
    }

    pub(crate) async fn flush(&self) -> Result<(), StateError> {
        self.shared.save().await
    }
}

impl Shared {
    fn data(&self) -> MutexGuard<'_, Data> {
        // A panic while holding the lock cannot leave the map half-updated in a way that matters
        // more than losing the store, so carry on with what is there.
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the snapshot if anything changed since the last write.
    async fn save(&self) -> Result<(), StateError> {
        let Some(path) = &self.snapshot else {
            return Ok(());
        };
        let mut status = self.save.lock().await;
        let (version, file) = {
            let data = self.data();
            if data.version == status.saved_version {
                return Ok(());
            }
            (data.version, snapshot_of(&data))
        };
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomically(&target, &file))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("the writer task failed: {e}"))));
        match written {
            Ok(()) => {
                status.saved_version = version;
                status.last_failure = None;
                Ok(())
            }
            Err(source) => Err(StateError::Io {
                path: path.clone(),
                source,
            }),
        }
    }

    /// The periodic save: reports a failure once per distinct reason.
    async fn save_in_background(&self) {
        let Err(StateError::Io { path, source }) = self.save().await else {
            return;
        };
        let reason = source.to_string();
        let new = {
            let mut status = self.save.lock().await;
            if status.last_failure.as_deref() == Some(reason.as_str()) {
                false
            } else {
                status.last_failure = Some(reason.clone());
                true
            }
        };
        if new {
            let _ = self
                .events
                .send(StoreEvent::SaveFailed { path, reason })
                .await;
        }
    }
}

/// Sweeps expired keys and saves the snapshot every second, until the store is dropped.
async fn housekeeping(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        while shared.data().sweep(now, SWEEP_BATCH) {
            tokio::task::yield_now().await;
        }
        shared.save_in_background().await;
    }
}

/// The on-disk form.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    format: String,
    version: u32,
    /// When it was written, in Unix milliseconds (for people reading the file).
    #[serde(default)]
    saved_at_ms: u64,
    entries: Vec<SnapshotEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotEntry {
    key: String,
    value: String,
    /// Absolute expiry in Unix milliseconds; absent for keys without TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Copies the live entries out (under the lock; the slow part, writing, happens outside it).
fn snapshot_of(data: &Data) -> SnapshotFile {
    let now = Instant::now();
    let now_ms = unix_now_ms();
    let entries = data
        .map
        .iter()
        .filter(|(_, e)| e.is_live(|| now))
        .map(|(k, e)| SnapshotEntry {
            key: k.clone(),
            value: e.value.clone(),
            expires_at_ms: e.expires.map(|at| {
                let left = at.saturating_duration_since(now);
                now_ms + left.as_nanos().div_ceil(1_000_000) as u64
            }),
        })
        .collect();
    SnapshotFile {
        format: SNAPSHOT_FORMAT.to_owned(),
        version: SNAPSHOT_VERSION,
        saved_at_ms: now_ms,
        entries,
    }
}

/// Fills `data` from the snapshot at `path`; a missing file is an empty store.
fn load(path: &Path, data: &mut Data) -> Result<(), StateError> {
    let bad = |reason: String| StateError::Snapshot {
        path: path.to_owned(),
        reason,
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(bad(format!("cannot read it: {e}"))),
    };
    let file: SnapshotFile = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("it is not a valid snapshot ({e})")))?;
    if file.format != SNAPSHOT_FORMAT {
        return Err(bad(format!(
            "its format is {:?}, not {SNAPSHOT_FORMAT:?}",
            file.format
        )));
    }
    if file.version != SNAPSHOT_VERSION {
        return Err(bad(format!(
            "it is version {} and this corral reads version {SNAPSHOT_VERSION}",
            file.version
        )));
    }
    let now = Instant::now();
    let now_ms = unix_now_ms();
    for entry in file.entries {
        let expires = match entry.expires_at_ms {
            None => None,
            Some(at) if at <= now_ms => continue,
            Some(at) => Some(now + Duration::from_millis(at - now_ms)),
        };
        if let Some(at) = expires {
            data.deadlines.push(Reverse((at, entry.key.clone())));
        }
        data.map.insert(
            entry.key,
            Entry {
                value: entry.value,
                expires,
            },
        );
    }
    Ok(())
}

/// Writes `file` to a temporary file beside `path`, syncs it and renames it over `path`, so a
/// crash or a full disk leaves either the old or the new snapshot, never a torn one.
fn write_atomically(path: &Path, file: &SnapshotFile) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "snapshot".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            // Values may be secrets: only the daemon's user may read them.
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let out = options.open(&tmp)?;
        let mut writer = io::BufWriter::with_capacity(256 * 1024, out);
        serde_json::to_writer(&mut writer, file).map_err(io::Error::other)?;
        writer.flush()?;
        let out = writer
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        out.sync_all()?;
        drop(out);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Do not leave a partial file taking space on a full disk.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; not all file systems allow syncing a directory.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Parses an integer the way Redis does for INCRBY (`string2ll`): optional `-`, then digits
/// without leading zeros (`0` itself is fine), nothing else; `-0`, `+1`, `01`, ` 1` are not
/// integers.
fn parse_redis_int(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b == b"0" {
        return Some(0);
    }
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.parse().ok()
}

fn write_int(out: &mut String, n: i64) -> std::fmt::Result {
    use std::fmt::Write as _;
    write!(out, "{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_read_like_redis() {
        assert_eq!(parse_redis_int("0"), Some(0));
        assert_eq!(parse_redis_int("42"), Some(42));
        assert_eq!(parse_redis_int("-42"), Some(-42));
        assert_eq!(
            parse_redis_int("9223372036854775807"),
            Some(i64::MAX),
            "i64::MAX"
        );
        assert_eq!(parse_redis_int("-9223372036854775808"), Some(i64::MIN));
        for bad in [
            "",
            "-",
            "-0",
            "+1",
            "01",
            " 1",
            "1 ",
            "1.0",
            "1e3",
            "abc",
            "9223372036854775808",
        ] {
            assert_eq!(parse_redis_int(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sweep_removes_only_expired_and_skips_stale_deadlines() {
        let mut data = Data::default();
        data.put("short", "1", Some(1));
        data.put("long", "1", Some(60_000));
        data.put("plain", "1", None);
        // Re-set without TTL: its old deadline is stale and must not delete it.
        data.put("reset", "1", Some(1));
        data.put("reset", "2", None);
        let later = Instant::now() + Duration::from_millis(5);
        assert!(!data.sweep(later, usize::MAX));
        let mut left: Vec<_> = data.map.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["long", "plain", "reset"]);
        assert_eq!(data.map["reset"].value, "2");
    }

    #[test]
    fn stale_deadlines_do_not_pile_up() {
        let mut data = Data::default();
        for i in 0..100_000 {
            data.put("k", &i.to_string(), Some(3_600_000));
        }
        assert!(data.deadlines.len() <= 2 * data.map.len() + 1025);
    }
}
