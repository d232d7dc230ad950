//! Watching files, for an app's `watch` (PM2's option of that name): a change reloads the app.
//!
//! # How it works
//! [`Watcher::start`] walks each watched directory itself and puts a non-recursive inotify watch
//! (through `notify`) on every directory that is not ignored, so `node_modules`, `.git` and
//! whatever `ignore_watch` names are never watched at all, however many files they hold. A
//! watched file is watched through its directory, so an editor that saves by renaming a new
//! file over it is still seen.
//!
//! One thread per [`Watcher`] takes notify's events from a bounded queue, keeps those that
//! change content (create, write, remove, rename; not access, chmod or times) under paths
//! that are not ignored, watches directories created later (and reports what they already
//! hold), and calls `on_change` once per quiet period: `delay` after the last change of a
//! burst, or at most 10 × `delay` after its first so a steady stream is still reported.
//!
//! What is bounded: the directories watched ([`MAX_DIRECTORIES`]), the queue of events (when
//! it is full, events are dropped, the period is reported as a change of the watched paths
//! and the trees are walked again), and the paths remembered per period. Backend errors are
//! logged at most once a minute and never retried in a loop.
//!
//! Not handled: a watched directory that is removed and created again is no longer watched
//! (its parent is not under watch); symbolic links inside a tree are not followed.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use notify::event::{CreateKind, ModifyKind, RemoveKind};
use notify::{EventKind, RecursiveMode, Watcher as _};

/// The most directories one [`Watcher`] watches: each costs an inotify watch (about 1 KiB of
/// kernel memory) out of the user's `fs.inotify.max_user_watches`.
pub const MAX_DIRECTORIES: usize = 20_000;

/// Names never watched, wherever they appear under a watched directory.
const ALWAYS_IGNORED: [&str; 2] = ["node_modules", ".git"];

/// Distinct paths remembered per quiet period; past it, each further path is counted as new.
const MAX_REMEMBERED_PATHS: usize = 4096;

/// Paths a [`Change`] carries.
const REPORTED_PATHS: usize = 8;

/// Events queued between notify's thread and ours before they are dropped.
const QUEUE_CAPACITY: usize = 4096;

/// A longer quiet time is taken as this one, so deadlines stay within `Instant`'s range.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// A steady stream of changes is reported at least every this many delays.
const STARVATION_FACTOR: u32 = 10;

/// How often backend trouble may be logged.
const COMPLAINT_INTERVAL: Duration = Duration::from_secs(60);

const MAX_USER_WATCHES: &str = "fs.inotify.max_user_watches";
const MAX_USER_INSTANCES: &str = "fs.inotify.max_user_instances";

/// What to watch for one app.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Absolute paths of files or directories; a directory is watched with everything under it.
    pub paths: Vec<PathBuf>,
    /// Glob patterns of paths to ignore besides `node_modules` and `.git`, matched against the
    /// path relative to its watched directory and against each name in it (`*.log`,
    /// `logs/**`, `tmp`); an ignored directory is not watched.
    pub ignore: Vec<String>,
    /// Quiet time after the last change before it is reported (at most an hour).
    pub delay: Duration,
}

/// What changed during one quiet period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The first few paths changed (at most 8), sorted.
    pub paths: Vec<PathBuf>,
    /// How many distinct paths changed (past 4096 in one period, every further one is counted).
    pub count: usize,
}

/// Why a path cannot be watched. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A watched path does not exist.
    #[error("cannot watch {}: it does not exist; create it, or remove it from watch", .0.display())]
    NotFound(PathBuf),
    /// A watched path is relative.
    #[error("cannot watch {}: the path is relative; give an absolute path", .0.display())]
    NotAbsolute(PathBuf),
    /// An `ignore_watch` pattern is not a glob.
    #[error(
        "ignore_watch pattern '{pattern}' is not a glob ({why}); write patterns such as \
         '*.log', 'logs/**' or 'tmp'"
    )]
    BadGlob {
        /// The pattern as written.
        pattern: String,
        /// What the glob parser found wrong.
        why: String,
    },
    /// A watched directory holds more directories than one watcher takes.
    #[error(
        "cannot watch {}: it holds more than {limit} directories; add the big ones (build \
         output, caches, vendored code) to ignore_watch, or watch narrower paths",
        path.display()
    )]
    TooManyDirectories {
        /// The limit ([`MAX_DIRECTORIES`]).
        limit: usize,
        /// The watched path that holds them.
        path: PathBuf,
    },
    /// The kernel refused another inotify watch or instance for this user.
    #[error(
        "cannot watch {}: the kernel's inotify limit is reached ({setting} is {}); ignore big \
         directories with ignore_watch, or raise the limit as root with `sysctl {setting}=<more>` \
         (and a file in /etc/sysctl.d/ to keep it)",
        path.display(),
        current.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
    )]
    InotifyLimit {
        /// The path being watched.
        path: PathBuf,
        /// The kernel setting: `fs.inotify.max_user_watches` or `fs.inotify.max_user_instances`.
        setting: &'static str,
        /// Its current value, when /proc/sys tells it.
        current: Option<u64>,
    },
    /// Reading a path or setting up a watch failed otherwise.
    #[error("cannot watch {}: {source}; check that the daemon's user can read it", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Checks that every path is absolute and exists and every pattern is a glob, without watching
/// anything.
pub fn validate(spec: &WatchSpec) -> Result<(), WatchError> {
    Filter::new(spec.paths.clone(), &spec.ignore).map(drop)
}

/// Watches a [`WatchSpec`]'s paths; dropping it stops the watching and its threads.
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    wake: SyncSender<Message>,
    directories: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching; `on_change` is called from a watcher thread once per quiet period
    /// (`delay` after the last event of a burst) with what changed. It should return quickly
    /// (send the change to the supervisor): dropping the watcher waits for it.
    ///
    /// It walks every watched tree before returning, which takes a while for a big one: call
    /// it off the async thread.
    pub fn start(
        spec: WatchSpec,
        on_change: Box<dyn Fn(Change) + Send + 'static>,
    ) -> Result<Watcher, WatchError> {
        start_with_limit(spec, on_change, MAX_DIRECTORIES)
    }

    /// Directories under watch now.
    pub fn directories(&self) -> usize {
        self.directories.load(Ordering::SeqCst)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A full queue wakes the thread as well.
        let _ = self.wake.try_send(Message::Wake);
        if let Some(thread) = self.thread.take() {
            // Dropped from `on_change`, the thread would wait for itself.
            if thread.thread().id() != thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// What reaches the watcher thread.
enum Message {
    Event(notify::Result<notify::Event>),
    Wake,
}

fn start_with_limit(
    spec: WatchSpec,
    on_change: Box<dyn Fn(Change) + Send + 'static>,
    limit: usize,
) -> Result<Watcher, WatchError> {
    let WatchSpec {
        paths,
        ignore,
        delay,
    } = spec;
    let first_path = paths.first().cloned().unwrap_or_default();
    let filter = Filter::new(paths, &ignore)?;
    let (sender, inbox) = mpsc::sync_channel(QUEUE_CAPACITY);
    let overflow = Arc::new(AtomicBool::new(false));
    let handler = {
        let sender = sender.clone();
        let overflow = overflow.clone();
        // notify's thread must never wait for ours: ours may be waiting for it to add a watch.
        move |event| {
            if let Err(TrySendError::Full(_)) = sender.try_send(Message::Event(event)) {
                overflow.store(true, Ordering::SeqCst);
            }
        }
    };
    let notifier = notify::recommended_watcher(handler).map_err(|e| watch_error(e, &first_path))?;
    let stop = Arc::new(AtomicBool::new(false));
    let directories = Arc::new(AtomicUsize::new(0));
    let mut watches = Watches {
        notifier,
        dirs: BTreeSet::new(),
        limit,
        count: directories.clone(),
        stop: stop.clone(),
        last_complaint: None,
    };
    for root in &filter.trees {
        watches.watch_tree(root, root, &filter, None)?;
    }
    for file in &filter.files {
        if let Some(parent) = file.parent() {
            watches.add(parent, file)?;
        }
    }
    let worker = Worker {
        filter,
        watches,
        inbox,
        overflow,
        on_change,
        delay: delay.min(MAX_DELAY),
        pending: Pending::default(),
    };
    let thread = thread::Builder::new()
        .name("corral-watch".to_owned())
        .spawn(move || worker.run())
        .map_err(|source| WatchError::Io {
            path: first_path,
            source,
        })?;
    Ok(Watcher {
        stop,
        wake: sender,
        directories,
        thread: Some(thread),
    })
}

/// Turns notify's error about `path` into advice.
fn watch_error(error: notify::Error, path: &Path) -> WatchError {
    let path = path.to_owned();
    match error.kind {
        notify::ErrorKind::MaxFilesWatch => WatchError::InotifyLimit {
            path,
            setting: MAX_USER_WATCHES,
            current: read_setting(MAX_USER_WATCHES),
        },
        notify::ErrorKind::PathNotFound => WatchError::NotFound(path),
        // inotify_init1 says EMFILE when the user has all the inotify instances allowed.
        notify::ErrorKind::Io(source)
            if source.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) =>
        {
            WatchError::InotifyLimit {
                path,
                setting: MAX_USER_INSTANCES,
                current: read_setting(MAX_USER_INSTANCES),
            }
        }
        notify::ErrorKind::Io(source) => WatchError::Io { path, source },
        notify::ErrorKind::Generic(message) => WatchError::Io {
            path,
            source: io::Error::other(message),
        },
        other => WatchError::Io {
            path,
            source: io::Error::other(format!("{other:?}")),
        },
    }
}

/// A kernel setting from /proc/sys, named as sysctl names it.
fn read_setting(name: &str) -> Option<u64> {
    let file = Path::new("/proc/sys").join(name.replace('.', "/"));
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Which paths count: those under a watched tree or equal to a watched file, and not ignored.
struct Filter {
    /// Watched directories, longest first so a nested one owns its paths.
    trees: Vec<PathBuf>,
    /// Watched files.
    files: Vec<PathBuf>,
    /// Patterns matched against names and paths relative to a watched directory.
    relative: GlobSet,
    /// Patterns written as absolute paths, matched against absolute paths only: `**/tmp/**`
    /// must not ignore a whole tree because it lies under /tmp.
    absolute: GlobSet,
}

impl Filter {
    fn new(paths: Vec<PathBuf>, ignore: &[String]) -> Result<Filter, WatchError> {
        let mut trees = Vec::new();
        let mut files = Vec::new();
        for path in paths {
            if !path.is_absolute() {
                return Err(WatchError::NotAbsolute(path));
            }
            match fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => trees.push(path),
                Ok(_) => files.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(WatchError::NotFound(path));
                }
                Err(source) => return Err(WatchError::Io { path, source }),
            }
        }
        trees.sort_by(|a, b| {
            (b.as_os_str().len(), b.as_path()).cmp(&(a.as_os_str().len(), a.as_path()))
        });
        trees.dedup();
        files.sort();
        files.dedup();
        let mut relative = GlobSetBuilder::new();
        let mut absolute = GlobSetBuilder::new();
        for pattern in ignore {
            let glob = glob(pattern)?;
            if glob.glob().starts_with('/') {
                absolute.add(glob);
            } else {
                relative.add(glob);
            }
        }
        let build = |set: GlobSetBuilder| {
            set.build().map_err(|e| WatchError::BadGlob {
                pattern: ignore.join(" "),
                why: e.to_string(),
            })
        };
        Ok(Filter {
            trees,
            files,
            relative: build(relative)?,
            absolute: build(absolute)?,
        })
    }

    /// The directory `path`'s ignore patterns are relative to, if it is watched at all: its
    /// tree, or a watched file's directory.
    fn owner(&self, path: &Path) -> Option<&Path> {
        if let Some(file) = self.files.iter().find(|file| *file == path) {
            return file.parent();
        }
        self.trees
            .iter()
            .find(|tree| path.starts_with(tree))
            .map(PathBuf::as_path)
    }

    /// Whether `path` under `root` is ignored: some name in it is always ignored, or a pattern
    /// matches a name, the path or a directory above it (relative, or absolute).
    fn is_ignored(&self, root: &Path, path: &Path, is_dir: bool) -> bool {
        let Ok(relative) = path.strip_prefix(root) else {
            return false;
        };
        let names: Vec<_> = relative.iter().collect();
        let mut prefix = PathBuf::new();
        for (i, name) in names.iter().enumerate() {
            if ALWAYS_IGNORED.iter().any(|ignored| name == ignored) {
                return true;
            }
            prefix.push(name);
            if self.relative.is_match(name) || self.relative.is_match(&prefix) {
                return true;
            }
            let absolute = root.join(&prefix);
            if self.absolute.is_match(&absolute) {
                return true;
            }
            // With a slash, `logs/**` ignores the directory `logs` itself, not only its content.
            let directory = i + 1 < names.len() || is_dir;
            if directory
                && (self.relative.is_match(slashed(&prefix))
                    || self.absolute.is_match(slashed(&absolute)))
            {
                return true;
            }
        }
        false
    }
}

fn slashed(path: &Path) -> PathBuf {
    let mut text = OsString::from(path.as_os_str());
    text.push("/");
    PathBuf::from(text)
}

fn glob(pattern: &str) -> Result<globset::Glob, WatchError> {
    // `logs/` and `./logs` mean what `logs` means.
    let trimmed = pattern.trim();
    let trimmed = trimmed.strip_prefix("./").unwrap_or(trimmed);
    let trimmed = match trimmed.strip_suffix('/') {
        Some(rest) if !rest.is_empty() => rest,
        _ => trimmed,
    };
    if trimmed.is_empty() {
        return Err(WatchError::BadGlob {
            pattern: pattern.to_owned(),
            why: "it is empty".to_owned(),
        });
    }
    GlobBuilder::new(trimmed)
        .literal_separator(true)
        .build()
        .map_err(|e| WatchError::BadGlob {
            pattern: pattern.to_owned(),
            why: e.kind().to_string(),
        })
}

/// The directories under watch.
struct Watches {
    notifier: notify::RecommendedWatcher,
    /// Ordered, so the directories under one are a range.
    dirs: BTreeSet<PathBuf>,
    limit: usize,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    last_complaint: Option<Instant>,
}

impl Watches {
    /// Watches one directory for `root`'s sake; false if it vanished first.
    fn add(&mut self, dir: &Path, root: &Path) -> Result<bool, WatchError> {
        if self.dirs.contains(dir) {
            return Ok(true);
        }
        if self.dirs.len() >= self.limit {
            return Err(WatchError::TooManyDirectories {
                limit: self.limit,
                path: root.to_owned(),
            });
        }
        match self.notifier.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.dirs.insert(dir.to_owned());
                self.count.store(self.dirs.len(), Ordering::SeqCst);
                Ok(true)
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => Ok(false),
            Err(e) => Err(watch_error(e, dir)),
        }
    }

    /// Watches `top` and every directory under it that is not ignored; with `found`, what is
    /// already in them is noted as changed (they are new, so it is). Each directory is watched
    /// before it is read, so nothing created meanwhile is missed.
    fn watch_tree(
        &mut self,
        top: &Path,
        root: &Path,
        filter: &Filter,
        mut found: Option<&mut Pending>,
    ) -> Result<(), WatchError> {
        let mut stack = vec![top.to_owned()];
        while let Some(dir) = stack.pop() {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if !self.add(&dir, root)? {
                continue;
            }
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(source) if dir == root => return Err(WatchError::Io { path: dir, source }),
                // An unreadable subdirectory is left out, as it would be by any other watcher.
                Err(_) => continue,
            };
            for entry in entries.flatten() {
                let path = entry.path();
                // Not following links: a link to a parent would loop.
                let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
                if filter.is_ignored(root, &path, is_dir) {
                    continue;
                }
                if let Some(found) = found.as_deref_mut() {
                    found.note(path.clone(), Instant::now());
                }
                if is_dir {
                    stack.push(path);
                }
            }
        }
        Ok(())
    }

    /// Forgets `gone` and the directories under it.
    fn forget(&mut self, gone: &Path) {
        // Paths order by component, so those under `gone` follow it.
        let stale: Vec<PathBuf> = self
            .dirs
            .range::<Path, _>((Bound::Included(gone), Bound::Unbounded))
            .take_while(|dir| dir.starts_with(gone))
            .cloned()
            .collect();
        for dir in stale {
            // notify drops the watch of a removed or renamed directory itself on Linux.
            let _ = self.notifier.unwatch(&dir);
            self.dirs.remove(&dir);
        }
        self.count.store(self.dirs.len(), Ordering::SeqCst);
    }

    /// After lost events: watch what appeared, forget what went.
    fn rescan(&mut self, filter: &Filter) {
        let gone: Vec<PathBuf> = self
            .dirs
            .iter()
            .filter(|dir| !dir.is_dir())
            .cloned()
            .collect();
        for dir in gone {
            self.forget(&dir);
        }
        for root in &filter.trees {
            if let Err(e) = self.watch_tree(root, root, filter, None) {
                self.complain(&e);
            }
        }
    }

    /// Logs trouble, at most once a minute: the daemon's log must not fill with it.
    fn complain(&mut self, what: &dyn fmt::Display) {
        let now = Instant::now();
        if self
            .last_complaint
            .is_some_and(|last| now.duration_since(last) < COMPLAINT_INTERVAL)
        {
            return;
        }
        self.last_complaint = Some(now);
        crate::log!("watch: {what} (changes there are not seen)");
    }
}

/// What changed in the period under way.
#[derive(Debug, Default)]
struct Pending {
    paths: BTreeSet<PathBuf>,
    count: usize,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Events were dropped: what changed is unknown.
    lost: bool,
}

impl Pending {
    fn note(&mut self, path: PathBuf, now: Instant) {
        if !self.paths.contains(&path) {
            self.count += 1;
            if self.paths.len() < MAX_REMEMBERED_PATHS {
                self.paths.insert(path);
            }
        }
        self.touch(now);
    }

    fn lose(&mut self, now: Instant) {
        self.lost = true;
        self.touch(now);
    }

    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the period ends: `delay` after its last change, or `STARVATION_FACTOR` delays after
    /// its first, whichever comes first; `None` while nothing changed.
    fn deadline(&self, delay: Duration) -> Option<Instant> {
        let quiet = self.last? + delay;
        let longest = self.first? + delay * STARVATION_FACTOR;
        Some(quiet.min(longest))
    }

    fn take(&mut self) -> Change {
        let taken = std::mem::take(self);
        Change {
            paths: taken.paths.into_iter().take(REPORTED_PATHS).collect(),
            count: taken.count,
        }
    }
}

/// The watcher thread's state.
struct Worker {
    filter: Filter,
    watches: Watches,
    inbox: Receiver<Message>,
    overflow: Arc<AtomicBool>,
    on_change: Box<dyn Fn(Change) + Send + 'static>,
    delay: Duration,
    pending: Pending,
}

impl Worker {
    fn run(mut self) {
        loop {
            let message = match self.pending.deadline(self.delay) {
                None => self
                    .inbox
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
                Some(deadline) => self
                    .inbox
                    .recv_timeout(deadline.saturating_duration_since(Instant::now())),
            };
            if self.watches.stop.load(Ordering::SeqCst) {
                return;
            }
            match message {
                Ok(Message::Event(Ok(event))) => self.record(&event),
                Ok(Message::Event(Err(error))) => {
                    let path = error.paths.first().cloned().unwrap_or_default();
                    self.watches.complain(&watch_error(error, &path));
                }
                Ok(Message::Wake) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.overflow.swap(false, Ordering::SeqCst) {
                self.pending.lose(Instant::now());
            }
            let now = Instant::now();
            if self
                .pending
                .deadline(self.delay)
                .is_some_and(|end| end <= now)
            {
                self.report();
            }
        }
    }

    fn report(&mut self) {
        if self.pending.lost {
            // Once per period however many events were lost, so a flood cannot make it spin.
            self.watches.rescan(&self.filter);
            let now = Instant::now();
            for path in self.filter.trees.iter().chain(&self.filter.files) {
                self.pending.note(path.clone(), now);
            }
        }
        (self.on_change)(self.pending.take());
    }

    fn record(&mut self, event: &notify::Event) {
        let now = Instant::now();
        if event.need_rescan() {
            self.pending.lose(now);
        }
        // Creations, removals and renames may add or drop directories; writes cannot.
        let structural = match event.kind {
            EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Any => true,
            EventKind::Modify(ModifyKind::Data(_)) => false,
            _ => return,
        };
        for path in &event.paths {
            let Some(root) = self.filter.owner(path) else {
                continue;
            };
            let on_disk_dir = structural && is_directory(path);
            let is_dir = on_disk_dir
                || matches!(
                    event.kind,
                    EventKind::Create(CreateKind::Folder) | EventKind::Remove(RemoveKind::Folder)
                )
                || (structural && self.watches.dirs.contains(path));
            if self.filter.is_ignored(root, path, is_dir) {
                continue;
            }
            self.pending.note(path.clone(), now);
            if !structural {
                continue;
            }
            let in_tree = self.filter.trees.iter().any(|tree| tree == root);
            if on_disk_dir {
                if in_tree && !self.watches.dirs.contains(path) {
                    let watched =
                        self.watches
                            .watch_tree(path, root, &self.filter, Some(&mut self.pending));
                    if let Err(e) = watched {
                        self.watches.complain(&e);
                    }
                }
            } else if self.watches.dirs.contains(path) {
                self.watches.forget(path);
            }
        }
    }
}

fn is_directory(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir())
}

// In a file of their own: with them, this one would pass a thousand lines.
#[cfg(test)]
mod tests;
