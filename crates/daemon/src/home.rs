//! The files of one daemon under `CORRAL_HOME`.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `CORRAL_HOME` and the paths inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

/// Why the home directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// It could not be created or made private.
    #[error(
        "cannot use {path} as CORRAL_HOME: {source}. Set CORRAL_HOME to a directory you can write"
    )]
    Unusable {
        /// The path that failed.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another daemon holds the lock.
    #[error("another corral daemon{} already runs with CORRAL_HOME={home}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The home.
        home: PathBuf,
        /// Its pid, when the pid file says.
        pid: Option<u32>,
    },
}

impl Home {
    /// The home at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// `$CORRAL_HOME`, or `~/.corral`.
    pub fn from_env() -> Home {
        if let Some(dir) =
            std::env::var_os(corral_proto::env::CORRAL_HOME).filter(|d| !d.is_empty())
        {
            return Home::new(dir);
        }
        let base = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        Home::new(base.join(".corral"))
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("corral.sock")
    }
    /// The daemon's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("daemon.pid")
    }
    /// The lock that keeps a second daemon out.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }
    /// The daemon's own log when it runs in the background.
    pub fn daemon_log(&self) -> PathBuf {
        self.root.join("daemon.log")
    }
    /// The apps' log files.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// The saved list of apps.
    pub fn dump(&self) -> PathBuf {
        self.root.join("dump.json")
    }
    /// Log file of one stream of one instance.
    pub fn log_file(&self, app: &str, instance: u32, stream: corral_proto::Stream) -> PathBuf {
        self.logs_dir()
            .join(format!("{app}-{instance}-{}.log", stream.as_str()))
    }

    /// The log file of an app's agent.
    pub fn agent_log_file(&self, app: &str, stream: corral_proto::Stream) -> PathBuf {
        self.logs_dir()
            .join(format!("{app}-agent-{}.log", stream.as_str()))
    }

    /// The drain preload for Node cluster workers (`crates/daemon/js/drain.js`), written by
    /// [`Home::prepare`].
    pub fn node_drain(&self) -> PathBuf {
        self.root.join("node-drain.js")
    }

    /// Creates the directory (mode 0700) and `logs/` when missing, and makes an existing one private.
    pub fn prepare(&self) -> Result<(), HomeError> {
        let unusable = |path: &Path, source| HomeError::Unusable {
            path: path.to_path_buf(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| unusable(&self.root, e))?;
        let meta = fs::metadata(&self.root).map_err(|e| unusable(&self.root, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .map_err(|e| unusable(&self.root, e))?;
        }
        let logs = self.logs_dir();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&logs)
            .map_err(|e| unusable(&logs, e))?;
        // Prove we can write here now rather than failing on the first log line.
        let probe = self.root.join(".write-test");
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| unusable(&self.root, e))?;
        let drain = self.node_drain();
        if fs::read(&drain).ok().as_deref() != Some(NODE_DRAIN.as_bytes()) {
            write_atomically(&drain, NODE_DRAIN.as_bytes()).map_err(|e| unusable(&drain, e))?;
        }
        Ok(())
    }

    /// Takes the daemon lock and writes the pid file. The lock lasts while the returned file is open.
    pub fn lock(&self) -> Result<File, HomeError> {
        let path = self.lock_file();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| HomeError::Unusable {
                path: path.clone(),
                source,
            })?;
        match corral_sys::try_lock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) => {
                return Err(HomeError::Locked {
                    home: self.root.clone(),
                    pid: self.read_pid(),
                });
            }
            Err(source) => return Err(HomeError::Unusable { path, source }),
        }
        let pid_file = self.pid_file();
        write_atomically(&pid_file, format!("{}\n", std::process::id()).as_bytes()).map_err(
            |source| HomeError::Unusable {
                path: pid_file,
                source,
            },
        )?;
        Ok(file)
    }

    /// The pid in the pid file, if any.
    pub fn read_pid(&self) -> Option<u32> {
        let mut text = String::new();
        File::open(self.pid_file())
            .ok()?
            .read_to_string(&mut text)
            .ok()?;
        text.trim().parse().ok()
    }
}

/// The drain preload's source, kept in the binary.
const NODE_DRAIN: &str = include_str!("../js/drain.js");

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content: a
/// temporary file beside it, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_makes_a_private_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().join("a/b"));
        home.prepare().unwrap();
        let mode = fs::metadata(home.root()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(home.logs_dir().is_dir());
    }

    #[test]
    fn prepare_explains_an_unusable_path() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let err = Home::new(file.join("home"))
            .prepare()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot use") && err.contains("Set CORRAL_HOME"),
            "{err}"
        );
    }

    #[test]
    fn a_second_lock_names_the_first_daemon() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        home.prepare().unwrap();
        let _held = home.lock().unwrap();
        let err = home.lock().unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
    }

    #[test]
    fn atomic_write_replaces_content() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("dump.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
