//! Program output to log files: whole lines only, no loss, bounded memory, size-based rotation,
//! and followers that read the files (so a slow follower never makes the daemon buffer).
//!
//! One [`LogSink`] per stream of an instance lives as long as the instance, across restarts. The
//! pipe of each process is drained by [`pump`], which writes only complete lines to the sink. When
//! the file cannot be written (a full disk), the pump stops reading and retries: the program
//! blocks on its own output instead of losing it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::net::unix::pipe::Receiver;
use tokio::sync::watch;

/// A line longer than this is cut into pieces of this size: the bound on what a pump holds.
pub const MAX_LINE: usize = 256 * 1024;

const READ_CHUNK: usize = 64 * 1024;
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// The log file of one stream of one instance.
#[derive(Debug)]
pub struct LogSink {
    path: PathBuf,
    inner: Mutex<SinkFile>,
    /// Bumped on every write; the generation changes when the file is rotated or emptied.
    changed: watch::Sender<Position>,
    closed: AtomicBool,
}

/// What followers watch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// Changes when the file at the path is a new one (rotated, flushed).
    pub generation: u64,
    /// Bytes written to the current file.
    pub len: u64,
}

#[derive(Debug)]
struct SinkFile {
    file: Option<File>,
    size: u64,
    max_size: u64,
    keep: u32,
    generation: u64,
}

impl LogSink {
    /// A sink appending to `path`; the file is opened now if it can be, else at the first write.
    pub fn new(path: PathBuf, max_size: u64, keep: u32) -> Arc<LogSink> {
        let file = open_append(&path).ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        let (changed, _) = watch::channel(Position {
            generation: 0,
            len: size,
        });
        Arc::new(LogSink {
            path,
            inner: Mutex::new(SinkFile {
                file,
                size,
                max_size,
                keep,
                generation: 0,
            }),
            changed,
            closed: AtomicBool::new(false),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Watches writes and rotations.
    pub fn subscribe(&self) -> watch::Receiver<Position> {
        self.changed.subscribe()
    }

    /// Marks the sink as abandoned (its app was deleted): pumps stop retrying failed writes.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkFile> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `data` (whole lines), rotating wherever the next line would take the file past its
    /// size limit, so that a batch of lines never makes one file overgrow. On failure, says how
    /// many bytes did reach the files.
    pub fn write(&self, data: &[u8]) -> Result<(), (usize, io::Error)> {
        let mut done = 0;
        while done < data.len() {
            done += self
                .write_some(&data[done..])
                .map_err(|(written, e)| (done + written, e))?;
        }
        Ok(())
    }

    /// Writes the lines of `data` that fit in the current file, after a rotation when not even
    /// one does; returns how many bytes that was.
    fn write_some(&self, data: &[u8]) -> Result<usize, (usize, io::Error)> {
        let mut inner = self.lock();
        let mut len = fitting(data, inner.size, inner.max_size);
        if inner.max_size > 0 && inner.size > 0 && inner.size + len as u64 > inner.max_size {
            self.rotate(&mut inner).map_err(|e| (0, e))?;
            len = fitting(data, 0, inner.max_size);
        }
        let data = &data[..len];
        if inner.file.is_none() {
            inner.file = Some(open_append(&self.path).map_err(|e| (0, e))?);
            inner.size = 0;
        }
        let file = inner.file.as_mut().expect("opened above");
        let mut written = 0;
        let result = loop {
            if written == data.len() {
                break Ok(());
            }
            match file.write(&data[written..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        inner.size += written as u64;
        let position = Position {
            generation: inner.generation,
            len: inner.size,
        };
        drop(inner);
        if written > 0 {
            self.changed.send_replace(position);
        }
        result.map(|()| len).map_err(|e| (written, e))
    }

    /// `out.log` → `out.log.1` → ... → `out.log.<keep>`, the oldest dropped; a new empty file.
    fn rotate(&self, inner: &mut SinkFile) -> io::Result<()> {
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        if inner.keep == 0 {
            fs::remove_file(&self.path).or_else(ignore_missing)?;
        } else {
            fs::remove_file(numbered(inner.keep)).or_else(ignore_missing)?;
            for n in (1..inner.keep).rev() {
                fs::rename(numbered(n), numbered(n + 1)).or_else(ignore_missing)?;
            }
            fs::rename(&self.path, numbered(1)).or_else(ignore_missing)?;
        }
        inner.file = Some(open_append(&self.path)?);
        inner.size = 0;
        inner.generation += 1;
        Ok(())
    }

    /// Empties the file and removes its rotated copies.
    pub fn flush(&self) -> io::Result<()> {
        let mut inner = self.lock();
        for n in 1..=inner.keep.max(1) + 1 {
            fs::remove_file(format!("{}.{n}", self.path.display())).or_else(ignore_missing)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.path)?;
        drop(file);
        inner.file = Some(open_append(&self.path)?);
        inner.size = 0;
        inner.generation += 1;
        let position = Position {
            generation: inner.generation,
            len: 0,
        };
        drop(inner);
        self.changed.send_replace(position);
        Ok(())
    }
}

/// How much of `data` goes into a file of `size` bytes limited to `max` (0: no limit): every line
/// that fits; when not even one does, the first line alone (the caller then rotates first, unless
/// the file is empty and the line is longer than a whole file).
fn fitting(data: &[u8], size: u64, max: u64) -> usize {
    let room = max.saturating_sub(size);
    if max == 0 || data.len() as u64 <= room {
        return data.len();
    }
    match data[..room as usize].iter().rposition(|&b| b == b'\n') {
        Some(end) => end + 1,
        None => data
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |end| end + 1),
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Drains one pipe into `sink` until end of file: whole lines, an optional timestamp before each,
/// the last line written with a newline even when the program left it without one.
///
/// The read buffer exists only while output flows: an idle program's pumps hold no buffer, so
/// the daemon's memory does not grow with the number of quiet instances.
pub async fn pump(pipe: Receiver, sink: Arc<LogSink>, timestamps: bool) {
    let mut buf: Vec<u8> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    loop {
        if let Err(e) = pipe.readable().await {
            crate::log!("reading output for {}: {e}", sink.path().display());
            break;
        }
        if buf.is_empty() {
            buf = vec![0; READ_CHUNK];
        }
        let n = match pipe.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained: give the memory back until the program writes again.
                buf = Vec::new();
                out = Vec::new();
                if pending.capacity() > 4096 {
                    pending.shrink_to_fit();
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                crate::log!("reading output for {}: {e}", sink.path().display());
                break;
            }
        };
        let chunk = &buf[..n];
        let Some(last_newline) = chunk.iter().rposition(|&b| b == b'\n') else {
            pending.extend_from_slice(chunk);
            while pending.len() >= MAX_LINE {
                let mut piece: Vec<u8> = pending.drain(..MAX_LINE).collect();
                piece.push(b'\n');
                emit(&sink, &piece, timestamps, &mut out).await;
            }
            continue;
        };
        let (complete, rest) = chunk.split_at(last_newline + 1);
        if pending.is_empty() {
            emit(&sink, complete, timestamps, &mut out).await;
        } else {
            pending.extend_from_slice(complete);
            let lines = std::mem::take(&mut pending);
            emit(&sink, &lines, timestamps, &mut out).await;
            pending = lines;
            pending.clear();
        }
        pending.extend_from_slice(rest);
    }
    if !pending.is_empty() {
        pending.push(b'\n');
        emit(&sink, &pending, timestamps, &mut out).await;
    }
}

/// Writes whole lines, with timestamps if asked, retrying until the file takes them.
async fn emit(sink: &LogSink, lines: &[u8], timestamps: bool, out: &mut Vec<u8>) {
    let data = if timestamps {
        out.clear();
        let stamp = format_utc(SystemTime::now());
        for line in lines.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(stamp.as_bytes());
            out.push(b' ');
            out.extend_from_slice(line);
        }
        &out[..]
    } else {
        lines
    };
    write_retrying(sink, data).await;
}

async fn write_retrying(sink: &LogSink, mut data: &[u8]) {
    let mut reported = false;
    loop {
        match sink.write(data) {
            Ok(()) => {
                if reported {
                    crate::log!("writing {} works again", sink.path().display());
                }
                return;
            }
            Err((written, e)) => {
                data = &data[written..];
                if sink.closed.load(Ordering::Relaxed) {
                    return;
                }
                if !reported {
                    crate::log!(
                        "cannot write {}: {e}. The program's output waits (it blocks on its next \
                         write) and nothing is dropped; retrying every {}s. Free disk space or fix \
                         the file's permissions.",
                        sink.path().display(),
                        WRITE_RETRY.as_secs()
                    );
                    reported = true;
                }
                tokio::time::sleep(WRITE_RETRY).await;
            }
        }
    }
}

/// The last `count` lines of the file at `file`'s position 0..`end`, and `end`.
pub fn tail(file: &mut File, end: u64, count: usize) -> io::Result<Vec<String>> {
    if count == 0 || end == 0 {
        return Ok(Vec::new());
    }
    let mut start = end;
    let mut block = Vec::new();
    // Read backwards until the block holds `count` newlines before its last byte.
    loop {
        let step = (64 * 1024).min(start);
        start -= step;
        let mut chunk = vec![0; step as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&block);
        block = chunk;
        let body = block.strip_suffix(b"\n").unwrap_or(&block);
        if start == 0 || newlines(body) >= count {
            break;
        }
    }
    let body = block.strip_suffix(b"\n").unwrap_or(&block);
    let mut lines: Vec<String> = body
        .rsplit(|&b| b == b'\n')
        .take(count)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    if start > 0 && lines.len() < count {
        lines.pop();
    }
    lines.reverse();
    Ok(lines)
}

fn newlines(bytes: &[u8]) -> usize {
    bytes.split(|&b| b == b'\n').count() - 1
}

/// Reads a log file from a position on, following rotations and flushes.
#[derive(Debug)]
pub struct Follower {
    sink: Arc<LogSink>,
    watch: watch::Receiver<Position>,
    file: Option<File>,
    generation: u64,
    partial: Vec<u8>,
    /// Read buffer, made at the first read and kept: a busy log is read in many small steps.
    buf: Vec<u8>,
}

impl Follower {
    /// Opens the sink's file; returns the follower positioned at its end and the last `lines`.
    pub fn start(sink: Arc<LogSink>, lines: usize) -> (Follower, Vec<String>) {
        let mut watch = sink.subscribe();
        let generation = watch.borrow_and_update().generation;
        let mut file = File::open(sink.path()).ok();
        let mut recent = Vec::new();
        if let Some(f) = file.as_mut() {
            let end = f.seek(SeekFrom::End(0)).unwrap_or(0);
            recent = tail(f, end, lines).unwrap_or_default();
            let _ = f.seek(SeekFrom::Start(end));
        }
        let follower = Follower {
            sink,
            watch,
            file,
            generation,
            partial: Vec::new(),
            buf: Vec::new(),
        };
        (follower, recent)
    }

    /// Waits for new lines; `None` when the sink is gone.
    pub async fn next_lines(&mut self) -> Option<Vec<String>> {
        loop {
            let lines = self.read_available();
            if !lines.is_empty() {
                return Some(lines);
            }
            self.watch.changed().await.ok()?;
        }
    }

    fn read_available(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        self.read_to_end(&mut lines);
        let generation = self.watch.borrow_and_update().generation;
        if generation != self.generation {
            // Rotated or flushed: finish the old file (still open), then the files rotated out
            // since (`.2`, `.1`: they exist when several rotations came between two reads, and
            // were removed by a flush), then start the current one.
            self.read_to_end(&mut lines);
            let skipped = generation.saturating_sub(self.generation).saturating_sub(1);
            for n in (1..=skipped).rev() {
                self.partial.clear();
                self.file = File::open(format!("{}.{n}", self.sink.path().display())).ok();
                if self.file.is_some() {
                    self.read_to_end(&mut lines);
                }
            }
            self.generation = generation;
            self.partial.clear();
            self.file = File::open(self.sink.path()).ok();
            self.read_to_end(&mut lines);
        }
        lines
    }

    fn read_to_end(&mut self, lines: &mut Vec<String>) {
        let Some(file) = self.file.as_mut() else {
            self.file = File::open(self.sink.path()).ok();
            return;
        };
        if self.buf.is_empty() {
            self.buf = vec![0; READ_CHUNK];
        }
        let buf = &mut self.buf;
        loop {
            match file.read(buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.partial.extend_from_slice(&buf[..n]);
                    if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
                        let rest = self.partial.split_off(end + 1);
                        let complete = std::mem::replace(&mut self.partial, rest);
                        lines.extend(
                            complete[..complete.len() - 1]
                                .split(|&b| b == b'\n')
                                .map(|l| String::from_utf8_lossy(l).into_owned()),
                        );
                    }
                    if lines.len() > 10_000 {
                        break;
                    }
                }
            }
        }
    }
}

/// `2026-11-24T08:15:02.123Z`.
pub fn format_utc(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink_in(dir: &Path, max: u64, keep: u32) -> Arc<LogSink> {
        LogSink::new(dir.join("app-0-out.log"), max, keep)
    }

    #[test]
    fn formats_utc_times() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_996_800_123);
        assert_eq!(format_utc(t), "2026-11-30T00:00:00.123Z");
        assert_eq!(
            format_utc(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(format_utc(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let sink = sink_in(dir.path(), 10, 2);
        for i in 0..5 {
            sink.write(format!("line-{i}\n").as_bytes()).unwrap();
        }
        let read = |p: &str| fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("app-0-out.log"), "line-4\n");
        assert_eq!(read("app-0-out.log.1"), "line-3\n");
        assert_eq!(read("app-0-out.log.2"), "line-2\n");
        assert!(!dir.path().join("app-0-out.log.3").exists());
    }

    #[test]
    fn splits_a_batch_of_lines_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let sink = sink_in(dir.path(), 20, 3);
        sink.write(b"aaaaaaaa\nbbbbbbbb\ncccccccc\ndddddddd\n")
            .unwrap();
        sink.write(b"a line longer than a whole file\ne\n").unwrap();
        let read = |p: &str| fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("app-0-out.log.3"), "aaaaaaaa\nbbbbbbbb\n");
        assert_eq!(read("app-0-out.log.2"), "cccccccc\ndddddddd\n");
        assert_eq!(read("app-0-out.log.1"), "a line longer than a whole file\n");
        assert_eq!(read("app-0-out.log"), "e\n");
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let text: String = (0..100_000).map(|i| i.to_string() + "\n").collect();
        fs::write(&path, &text).unwrap();
        let mut file = File::open(&path).unwrap();
        let len = text.len() as u64;
        assert_eq!(
            tail(&mut file, len, 3).unwrap(),
            ["99997", "99998", "99999"]
        );
        assert_eq!(tail(&mut file, len, 0).unwrap(), Vec::<String>::new());
        fs::write(&path, "a\nb").unwrap();
        let mut file = File::open(&path).unwrap();
        assert_eq!(tail(&mut file, 3, 10).unwrap(), ["a", "b"]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pump_keeps_lines_whole_and_ends_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let sink = sink_in(dir.path(), 0, 0);
        let (mut tx, rx) = tokio::net::unix::pipe::pipe().unwrap();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(b"first line\nsecond ").await.unwrap();
            tx.write_all(b"line\nno newline at end").await.unwrap();
        });
        pump(rx, sink.clone(), false).await;
        writer.await.unwrap();
        let text = fs::read_to_string(sink.path()).unwrap();
        assert_eq!(text, "first line\nsecond line\nno newline at end\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn follower_sees_lines_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let sink = sink_in(dir.path(), 12, 1);
        sink.write(b"old\n").unwrap();
        let (mut follower, recent) = Follower::start(sink.clone(), 5);
        assert_eq!(recent, ["old"]);
        sink.write(b"a-long-1\n").unwrap();
        sink.write(b"b-long-2\n").unwrap(); // rotates before writing
        let mut seen = Vec::new();
        while seen.len() < 2 {
            seen.extend(follower.next_lines().await.unwrap());
        }
        assert_eq!(seen, ["a-long-1", "b-long-2"]);
    }
}
