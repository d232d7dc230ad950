//! Tests with real directories and real inotify. Nothing sleeps to wait: changes arrive on a
//! channel, and "nothing happened" is shown by a later change that is the only one reported.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

use super::*;

/// Long enough that a burst of a few file operations is one period even on a loaded machine.
const DELAY: Duration = Duration::from_millis(250);
const PATIENCE: Duration = Duration::from_secs(10);

fn spec(paths: &[&Path], ignore: &[&str]) -> WatchSpec {
    WatchSpec {
        paths: paths.iter().map(|path| path.to_path_buf()).collect(),
        ignore: ignore.iter().map(|pattern| (*pattern).to_owned()).collect(),
        delay: DELAY,
    }
}

fn sink() -> (Box<dyn Fn(Change) + Send>, Receiver<Change>) {
    let (sender, changes) = mpsc::channel();
    let on_change = Box::new(move |change| {
        let _ = sender.send(change);
    });
    (on_change, changes)
}

fn watch(spec: WatchSpec) -> (Watcher, Receiver<Change>) {
    let (on_change, changes) = sink();
    let watcher = Watcher::start(spec, on_change).expect("start watching");
    (watcher, changes)
}

fn next(changes: &Receiver<Change>) -> Change {
    changes.recv_timeout(PATIENCE).expect("a change")
}

fn change(paths: &[PathBuf], count: usize) -> Change {
    Change {
        paths: paths.to_vec(),
        count,
    }
}

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    (dir, root)
}

#[test]
fn a_write_is_reported_once_after_the_quiet_period() {
    let (_dir, root) = temp();
    let (_watcher, changes) = watch(spec(&[&root], &[]));
    let written = Instant::now();
    fs::write(root.join("a.js"), "1").unwrap();
    assert_eq!(next(&changes), change(&[root.join("a.js")], 1));
    assert!(written.elapsed() >= DELAY, "{:?}", written.elapsed());
    // Reported twice, the first write would come again here.
    fs::write(root.join("b.js"), "2").unwrap();
    assert_eq!(next(&changes), change(&[root.join("b.js")], 1));
}

#[test]
fn a_burst_is_one_change_that_counts_every_path() {
    let (_dir, root) = temp();
    let (_watcher, changes) = watch(WatchSpec {
        delay: Duration::from_millis(500),
        ..spec(&[&root], &[])
    });
    let files: Vec<PathBuf> = (0..50).map(|i| root.join(format!("f{i:02}"))).collect();
    for file in &files {
        fs::write(file, "x").unwrap();
    }
    assert_eq!(next(&changes), change(&files[..8], 50));
    fs::write(root.join("z"), "x").unwrap();
    assert_eq!(next(&changes), change(&[root.join("z")], 1));
}

#[test]
fn ignored_paths_are_not_watched_and_give_nothing() {
    let (_dir, root) = temp();
    for dir in [
        "src",
        "node_modules/a/b",
        ".git/objects",
        "logs/old",
        "src/tmp",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let (watcher, changes) = watch(spec(&[&root], &["*.log", "logs/**", "tmp"]));
    // The root and src: neither node_modules, .git, logs nor tmp is watched.
    assert_eq!(watcher.directories(), 2);
    fs::write(root.join("x.log"), "x").unwrap();
    fs::write(root.join("src/deep.log"), "x").unwrap();
    fs::write(root.join("logs/a.txt"), "x").unwrap();
    fs::write(root.join("src/tmp/b.txt"), "x").unwrap();
    fs::create_dir(root.join("tmp")).unwrap();
    fs::write(root.join("tmp/c.txt"), "x").unwrap();
    fs::write(root.join("node_modules/a/b/index.js"), "x").unwrap();
    fs::create_dir_all(root.join("src/node_modules/c")).unwrap();
    fs::write(root.join(".git/HEAD"), "x").unwrap();
    fs::write(root.join("app.js"), "x").unwrap();
    assert_eq!(next(&changes), change(&[root.join("app.js")], 1));
    assert_eq!(watcher.directories(), 2);
}

#[test]
fn a_new_directory_is_reported_with_what_it_holds_and_then_watched() {
    let (_dir, root) = temp();
    let (watcher, changes) = watch(spec(&[&root], &[]));
    assert_eq!(watcher.directories(), 1);
    fs::create_dir_all(root.join("a/b")).unwrap();
    fs::write(root.join("a/b/c"), "x").unwrap();
    let expected = [root.join("a"), root.join("a/b"), root.join("a/b/c")];
    assert_eq!(next(&changes), change(&expected, 3));
    assert_eq!(watcher.directories(), 3);
    fs::write(root.join("a/b/d"), "x").unwrap();
    assert_eq!(next(&changes), change(&[root.join("a/b/d")], 1));
}

#[test]
fn a_removed_directory_is_no_longer_counted() {
    let (_dir, root) = temp();
    fs::create_dir_all(root.join("a/b")).unwrap();
    let (watcher, changes) = watch(spec(&[&root], &[]));
    assert_eq!(watcher.directories(), 3);
    fs::remove_dir_all(root.join("a")).unwrap();
    let removed = next(&changes);
    assert!(removed.paths.contains(&root.join("a")), "{removed:?}");
    assert_eq!(watcher.directories(), 1);
}

#[test]
fn removals_and_renames_count() {
    let (_dir, root) = temp();
    fs::write(root.join("gone"), "x").unwrap();
    fs::write(root.join("old"), "x").unwrap();
    let (_watcher, changes) = watch(spec(&[&root], &[]));
    fs::remove_file(root.join("gone")).unwrap();
    assert_eq!(next(&changes), change(&[root.join("gone")], 1));
    fs::rename(root.join("old"), root.join("new")).unwrap();
    assert_eq!(
        next(&changes),
        change(&[root.join("new"), root.join("old")], 2)
    );
}

#[test]
fn permission_changes_give_nothing() {
    let (_dir, root) = temp();
    let file = root.join("a.js");
    fs::write(&file, "x").unwrap();
    let (_watcher, changes) = watch(spec(&[&root], &[]));
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(root.join("b.js"), "x").unwrap();
    assert_eq!(next(&changes), change(&[root.join("b.js")], 1));
}

#[test]
fn a_watched_file_is_seen_even_when_replaced_but_not_its_neighbours() {
    let (_dir, root) = temp();
    let file = root.join("config.json");
    fs::write(&file, "1").unwrap();
    let (watcher, changes) = watch(spec(&[&file], &[]));
    assert_eq!(watcher.directories(), 1);
    fs::write(root.join("neighbour"), "x").unwrap();
    fs::write(&file, "2").unwrap();
    assert_eq!(next(&changes), change(std::slice::from_ref(&file), 1));
    // As editors save: a new file renamed over the old one.
    fs::write(root.join("config.json.new"), "3").unwrap();
    fs::rename(root.join("config.json.new"), &file).unwrap();
    assert_eq!(next(&changes), change(std::slice::from_ref(&file), 1));
}

#[test]
fn missing_and_relative_paths_are_refused() {
    let (_dir, root) = temp();
    let missing = root.join("missing");
    let error = validate(&spec(&[&root, &missing], &[])).unwrap_err();
    assert!(matches!(&error, WatchError::NotFound(path) if *path == missing));
    let message = error.to_string();
    assert!(message.contains(&*missing.to_string_lossy()), "{message}");
    assert!(message.contains("does not exist"), "{message}");
    let (on_change, _changes) = sink();
    let started = Watcher::start(spec(&[&missing], &[]), on_change);
    assert!(matches!(started, Err(WatchError::NotFound(_))));

    let error = validate(&spec(&[Path::new("src")], &[])).unwrap_err();
    assert!(matches!(error, WatchError::NotAbsolute(_)));
    assert!(
        error.to_string().contains("give an absolute path"),
        "{error}"
    );
    validate(&spec(&[&root], &["*.log"])).unwrap();
}

#[test]
fn bad_globs_are_refused() {
    let (_dir, root) = temp();
    let error = validate(&spec(&[&root], &["*.log", "a[b"])).unwrap_err();
    assert!(matches!(&error, WatchError::BadGlob { pattern, .. } if pattern == "a[b"));
    let message = error.to_string();
    assert!(
        message.starts_with("ignore_watch pattern 'a[b' is not a glob ("),
        "{message}"
    );
    assert!(message.contains("'logs/**'"), "{message}");
    let error = validate(&spec(&[&root], &[" "])).unwrap_err();
    assert!(error.to_string().contains("(it is empty)"), "{error}");
}

#[test]
fn too_many_directories_are_refused() {
    let (_dir, root) = temp();
    for i in 0..5 {
        fs::create_dir(root.join(format!("d{i}"))).unwrap();
    }
    let (on_change, _changes) = sink();
    let error = start_with_limit(spec(&[&root], &[]), on_change, 3).unwrap_err();
    assert!(
        matches!(&error, WatchError::TooManyDirectories { limit: 3, path } if *path == root),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("more than 3 directories"), "{message}");
    assert!(message.contains("ignore_watch"), "{message}");
    // Ignored, they do not count.
    let (on_change, _changes) = sink();
    let watcher = start_with_limit(spec(&[&root], &["d[0-3]"]), on_change, 3).unwrap();
    assert_eq!(watcher.directories(), 2);
}

#[test]
fn past_the_limit_a_new_directory_counts_but_is_not_watched() {
    let (_dir, root) = temp();
    fs::create_dir(root.join("d")).unwrap();
    let (on_change, changes) = sink();
    let watcher = start_with_limit(spec(&[&root], &[]), on_change, 2).unwrap();
    assert_eq!(watcher.directories(), 2);
    fs::create_dir(root.join("new")).unwrap();
    assert_eq!(next(&changes), change(&[root.join("new")], 1));
    fs::write(root.join("new/unseen"), "x").unwrap();
    fs::write(root.join("seen"), "x").unwrap();
    assert_eq!(next(&changes), change(&[root.join("seen")], 1));
    assert_eq!(watcher.directories(), 2);
}

#[test]
fn dropping_the_watcher_ends_its_thread() {
    let (_dir, root) = temp();
    let (watcher, changes) = watch(spec(&[&root], &[]));
    drop(watcher);
    // The thread owned `on_change`, and the drop waited for it to end.
    assert_eq!(changes.try_recv(), Err(TryRecvError::Disconnected));
}

#[test]
fn the_inotify_limit_is_named_with_its_value() {
    let error = WatchError::InotifyLimit {
        path: PathBuf::from("/srv/app"),
        setting: MAX_USER_WATCHES,
        current: Some(8192),
    };
    let message = error.to_string();
    assert!(
        message.starts_with(
            "cannot watch /srv/app: the kernel's inotify limit is reached \
             (fs.inotify.max_user_watches is 8192)"
        ),
        "{message}"
    );
    assert!(
        message.contains("sysctl fs.inotify.max_user_watches="),
        "{message}"
    );
    assert!(read_setting(MAX_USER_WATCHES).is_some_and(|n| n > 0));
}

#[test]
fn ignore_patterns_match_names_relative_paths_and_directories() {
    let (_dir, temp) = temp();
    // Under a directory named tmp: `**/tmp/**` must not ignore the whole tree.
    let root = temp.join("tmp/app");
    fs::create_dir_all(&root).unwrap();
    let absolute = format!("{}/dist/**", root.display());
    let patterns = [
        "*.log",
        "logs/**",
        "tmp",
        "./build/",
        absolute.as_str(),
        "**/tmp/**",
    ];
    let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
    let filter = Filter::new(vec![root.clone()], &patterns).unwrap();
    let ignored = |path: &str, is_dir: bool| filter.is_ignored(&root, &root.join(path), is_dir);
    for (path, is_dir) in [
        ("a.log", false),
        ("src/a.log", false),
        ("logs", true),
        ("logs/a/b.txt", false),
        ("tmp", false),
        ("src/tmp/x.js", false),
        ("build/x.js", false),
        ("dist/app.js", false),
        ("node_modules", true),
        ("src/node_modules/x/index.js", false),
        ("a/.git/HEAD", false),
    ] {
        assert!(ignored(path, is_dir), "{path} should be ignored");
    }
    for (path, is_dir) in [
        ("app.js", false),
        ("src/app.js", false),
        ("logs", false),
        ("src/logs", true),
        ("log", false),
        (".github/ci.yml", false),
        ("tmpfile", false),
        ("node_modules_old/x", false),
    ] {
        assert!(!ignored(path, is_dir), "{path} should not be ignored");
    }
    assert!(!filter.is_ignored(&root, &root, true));
}

#[test]
fn a_steady_stream_is_reported_every_ten_delays() {
    let delay = Duration::from_millis(100);
    let start = Instant::now();
    let mut pending = Pending::default();
    assert_eq!(pending.deadline(delay), None);
    pending.note(PathBuf::from("/a"), start);
    assert_eq!(pending.deadline(delay), Some(start + delay));
    // A change every half delay: the quiet time never comes.
    for i in 1..=30 {
        let now = start + delay / 2 * i;
        pending.note(PathBuf::from("/a"), now);
        assert_eq!(
            pending.deadline(delay),
            Some((now + delay).min(start + delay * 10))
        );
    }
    assert_eq!(pending.deadline(delay), Some(start + delay * 10));
    assert_eq!(pending.take(), change(&[PathBuf::from("/a")], 1));
    assert_eq!(pending.deadline(delay), None);
}

#[test]
fn paths_remembered_per_period_are_bounded_but_all_counted() {
    let now = Instant::now();
    let mut pending = Pending::default();
    for i in 0..MAX_REMEMBERED_PATHS + 100 {
        pending.note(PathBuf::from(format!("/p{i:05}")), now);
    }
    pending.note(PathBuf::from("/p00000"), now);
    assert_eq!(pending.paths.len(), MAX_REMEMBERED_PATHS);
    let taken = pending.take();
    assert_eq!(taken.count, MAX_REMEMBERED_PATHS + 100);
    let first: Vec<PathBuf> = (0..8).map(|i| PathBuf::from(format!("/p{i:05}"))).collect();
    assert_eq!(taken.paths, first);
}

#[test]
fn removing_or_renaming_a_directory_leaves_its_neighbours_watched() {
    let (_dir, root) = temp();
    for dir in ["a/sub", "a b", "a-b"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let (watcher, changes) = watch(spec(&[&root], &[]));
    assert_eq!(watcher.directories(), 5);
    fs::remove_dir_all(root.join("a")).unwrap();
    let removed = next(&changes);
    assert!(removed.paths.contains(&root.join("a")), "{removed:?}");
    assert_eq!(watcher.directories(), 3);
    fs::rename(root.join("a b"), root.join("c")).unwrap();
    assert_eq!(
        next(&changes),
        change(&[root.join("a b"), root.join("c")], 2)
    );
    assert_eq!(watcher.directories(), 3);
    fs::write(root.join("c/x"), "x").unwrap();
    fs::write(root.join("a-b/y"), "x").unwrap();
    assert_eq!(
        next(&changes),
        change(&[root.join("a-b/y"), root.join("c/x")], 2)
    );
}

#[test]
fn lost_events_are_reported_as_a_change_of_the_watched_paths() {
    let (_dir, root) = temp();
    fs::create_dir(root.join("a")).unwrap();
    let (watcher, changes) = watch(spec(&[&root], &[]));
    // What notify sends when the kernel's queue overflowed.
    let overflowed = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
    watcher.wake.send(Message::Event(Ok(overflowed))).unwrap();
    assert_eq!(next(&changes), change(std::slice::from_ref(&root), 1));
    assert_eq!(watcher.directories(), 2);
    fs::write(root.join("a/x"), "x").unwrap();
    assert_eq!(next(&changes), change(&[root.join("a/x")], 1));
}
