//! A `redis-server` of a test's own, on a free loopback port in a temporary directory, killed
//! (by pid) when dropped, also on panic. Shared by the Redis tests (`tests/redis.rs`) and the
//! unit tests of the pass-through connection (`src/link.rs`). Without `redis-server` on the
//! PATH, [`RedisServer::start`] gives `None` after a note, except under CI (`CI` set), where it
//! fails and says to install it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

/// Longest wait for a server to answer.
const DEADLINE: Duration = Duration::from_secs(10);

/// A `redis-server` of our own; killed (by pid) when dropped.
pub struct RedisServer {
    binary: PathBuf,
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server, or returns `None` (after a note) when `redis-server` is not installed.
    pub async fn start() -> Option<RedisServer> {
        Self::start_with(&[]).await
    }

    /// [`RedisServer::start`] with `extra` arguments (`--requirepass pw`, say).
    pub async fn start_with(extra: &[&str]) -> Option<RedisServer> {
        let binary = find_redis_server()?;
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        // Another process may take the port between our probe and redis binding it: try again.
        for _ in 0..5 {
            let mut server = RedisServer {
                binary: binary.clone(),
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                extra: extra.clone(),
            };
            if server.launch().await {
                return Some(server);
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts the process on `self.port` and waits until it answers PING; false when it exited.
    async fn launch(&mut self) -> bool {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if ping(self.port, self.password()).await {
                return true;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                eprintln!(
                    "redis-server on port {} exited with {status}: {}",
                    self.port,
                    self.log()
                );
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within {DEADLINE:?}: {}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The password it was started with, if any.
    pub fn password(&self) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == "--requirepass")?;
        self.extra.get(at + 1).map(String::as_str)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Its URL, database 0, without password.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server abruptly (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + DEADLINE;
        // The port was just freed; binding it again can fail for a moment.
        while !self.launch().await {
            assert!(Instant::now() < deadline, "could not restart redis-server");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl RedisServer {
    /// Sends it `signal` (`-STOP`, `-CONT`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("it runs").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_redis_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|p| is_executable(p));
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is not installed, and CI must run the Redis tests: install it (apt-get install redis-server)"
        );
        eprintln!("note: redis-server is not installed; skipping this Redis test");
    }
    found
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// True when a server on `port` answers PING (with AUTH first when it has a password).
async fn ping(port: u16, password: Option<&str>) -> bool {
    let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = match password {
        Some(pw) => format!("AUTH {pw}\r\nPING\r\n"),
        None => "PING\r\n".to_owned(),
    };
    if conn.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(1), async {
        let mut buf = [0u8; 64];
        while !answer.windows(5).any(|w| w == b"+PONG") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.is_ok() && answer.windows(5).any(|w| w == b"+PONG")
}
