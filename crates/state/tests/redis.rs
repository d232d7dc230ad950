//! The Redis backend against a real `redis-server`: the shared behaviour tests, two stores on one
//! server, and Redis dying and coming back.
//!
//! Each test starts its own server on a free port in a temporary directory and kills it when
//! done (also on panic). Without `redis-server` on the PATH the tests print a note and pass,
//! except under CI (`CI` set), where they fail and say to install it.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{DEADLINE, Fixture, next_event, next_published};
use corral_state::{Op, Outcome, StateError, Store, StoreEvent};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

/// A `redis-server` of our own; killed (by pid) when dropped.
struct RedisServer {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server, or returns `None` (after a note) when `redis-server` is not installed.
    async fn start() -> Option<RedisServer> {
        Self::start_with(&[]).await
    }

    async fn start_with(extra: &[&str]) -> Option<RedisServer> {
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

    fn password(&self) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == "--requirepass")?;
        self.extra.get(at + 1).map(String::as_str)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server abruptly (SIGKILL), as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + DEADLINE;
        // The port was just freed; binding it again can fail for a moment.
        while !self.launch().await {
            assert!(Instant::now() < deadline, "could not restart redis-server");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

fn free_port() -> u16 {
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

/// A store on a fresh server, with the initial `Connected` event already taken.
async fn redis() -> Option<Fixture> {
    let server = RedisServer::start().await?;
    let (store, mut events) = Store::redis(&server.url()).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        StoreEvent::Connected { url: server.url() }
    );
    Some(Fixture {
        store,
        events,
        _keep: Box::new(server),
    })
}

behaviour_tests!(redis);

/// Waits for the next connection event, skipping messages.
async fn next_connection_event(events: &mut tokio::sync::mpsc::Receiver<StoreEvent>) -> StoreEvent {
    loop {
        match next_event(events).await {
            StoreEvent::Published(_) => {}
            other => return other,
        }
    }
}

#[tokio::test]
async fn two_stores_share_keys_and_messages() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let (a, mut a_events) = Store::redis(&server.url()).await.unwrap();
    let (b, mut b_events) = Store::redis(&server.url()).await.unwrap();
    assert!(matches!(
        next_event(&mut a_events).await,
        StoreEvent::Connected { .. }
    ));
    assert!(matches!(
        next_event(&mut b_events).await,
        StoreEvent::Connected { .. }
    ));

    a.set("shared", "from a", None).await.unwrap();
    assert_eq!(b.get("shared").await.unwrap().as_deref(), Some("from a"));
    assert_eq!(b.incr("count", 2).await.unwrap(), 2);
    assert_eq!(a.incr("count", 3).await.unwrap(), 5);
    assert!(
        b.cas("shared", Some("from a"), Some("from b"), None)
            .await
            .unwrap()
    );
    assert_eq!(a.get("shared").await.unwrap().as_deref(), Some("from b"));
    assert_eq!(a.keys("*").await.unwrap(), ["count", "shared"]);

    a.subscribe("jobs.*").await.unwrap();
    // PUBLISH counts every subscription on the server: here, A's one pattern.
    assert_eq!(b.publish("jobs.new", "42").await.unwrap(), 1);
    let got = next_published(&mut a_events).await;
    assert_eq!(
        (
            got.pattern.as_str(),
            got.channel.as_str(),
            got.message.as_str()
        ),
        ("jobs.*", "jobs.new", "42")
    );
    b.subscribe("jobs.new").await.unwrap();
    assert_eq!(a.publish("jobs.new", "43").await.unwrap(), 2);
    assert_eq!(next_published(&mut a_events).await.message, "43");
    assert_eq!(next_published(&mut b_events).await.message, "43");
}

#[tokio::test]
async fn survives_redis_dying_and_coming_back() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let url = server.url();
    let (store, mut events) = Store::redis(&url).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        StoreEvent::Connected { url: url.clone() }
    );
    store.subscribe("alerts.*").await.unwrap();
    store.set("before", "1", None).await.unwrap();
    assert!(store.cas("lock", None, Some("x"), None).await.unwrap());

    server.kill();

    // The pub/sub task notices at once.
    match next_connection_event(&mut events).await {
        StoreEvent::Disconnected { url: u, reason } => {
            assert_eq!(u, url);
            assert!(!reason.is_empty());
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    // Every call fails promptly with Unavailable, naming the URL.
    for _ in 0..3 {
        let started = Instant::now();
        let err = store.get("before").await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            matches!(&err, StateError::Unavailable { url: u, .. } if *u == url),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("Redis at {url} is unreachable")),
            "{msg}"
        );
        assert!(
            msg.contains("corral reconnects by itself, try again"),
            "{msg}"
        );
    }
    let started = Instant::now();
    for result in [
        store.set("k", "v", None).await.map(|()| 0),
        store.incr("k", 1).await.map(|_| 0),
        store.publish("alerts.x", "m").await.map(|_| 0),
        store.keys("*").await.map(|_| 0),
        store.cas("k", None, Some("v"), None).await.map(|_| 0),
        store.subscribe("more.*").await.map(|()| 0),
    ] {
        assert!(
            matches!(result, Err(StateError::Unavailable { .. })),
            "{result:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(12));
    // A pipeline fails op by op, each with the outage, and a refused op with its own error.
    let piped = store
        .pipeline(vec![
            Op::Get {
                key: "before".into(),
            },
            Op::Del { key: String::new() },
            Op::Incr {
                key: "k".into(),
                by: 1,
            },
        ])
        .await;
    assert!(
        matches!(piped[0], Err(StateError::Unavailable { .. })),
        "{piped:?}"
    );
    assert!(matches!(piped[1], Err(StateError::EmptyKey)), "{piped:?}");
    assert!(
        matches!(piped[2], Err(StateError::Unavailable { .. })),
        "{piped:?}"
    );
    // Unsubscribing while down succeeds: that pattern is simply not subscribed again.
    store.subscribe("temporary.*").await.unwrap_err();
    store.unsubscribe("temporary.*").await.unwrap();

    server.restart().await;

    // The next call works, without any action by the caller.
    store.set("after", "2", None).await.unwrap();
    assert_eq!(store.get("after").await.unwrap().as_deref(), Some("2"));
    // The server came back empty; the CAS script is loaded again by itself.
    assert!(store.cas("lock", None, Some("y"), None).await.unwrap());
    // And in a pipeline, where it is loaded by the pipeline itself: restarted again to empty
    // the script cache.
    server.kill();
    server.restart().await;
    // The first call after a restart meets the dropped connection: a read is tried again.
    assert_eq!(store.get("lock").await.unwrap(), None);
    let piped = store
        .pipeline(vec![Op::Cas {
            key: "lock".into(),
            expected: None,
            new: Some("z".into()),
            ttl: None,
        }])
        .await;
    assert!(matches!(piped[..], [Ok(Outcome::Yes(true))]), "{piped:?}");

    // The subscription resumes, announced by Connected.
    assert_eq!(
        next_connection_event(&mut events).await,
        StoreEvent::Connected { url: url.clone() }
    );
    assert_eq!(store.publish("alerts.fire", "back").await.unwrap(), 1);
    let got = next_published(&mut events).await;
    assert_eq!(
        (got.pattern.as_str(), got.message.as_str()),
        ("alerts.*", "back")
    );
    store.subscribe("more.*").await.unwrap();
    assert_eq!(store.publish("more.x", "m").await.unwrap(), 1);
    assert_eq!(next_published(&mut events).await.pattern, "more.*");
}

#[tokio::test]
async fn subscriptions_reach_redis_again_after_several_failed_reconnects() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let (store, mut events) = Store::redis(&server.url()).await.unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        StoreEvent::Connected { .. }
    ));
    store.subscribe("a.*").await.unwrap();
    server.kill();
    assert!(matches!(
        next_connection_event(&mut events).await,
        StoreEvent::Disconnected { .. }
    ));
    // Not synchronisation but the scenario: an outage long enough for several reconnection
    // attempts (100 + 200 + 400 + 800 ms of backoff), each refused at once.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(store.subscribe("b.*").await.is_err());
    server.restart().await;
    assert!(matches!(
        next_connection_event(&mut events).await,
        StoreEvent::Connected { .. }
    ));
    assert_eq!(store.publish("a.1", "m").await.unwrap(), 1);
    assert_eq!(next_published(&mut events).await.pattern, "a.*");
}

#[tokio::test]
async fn bad_url_is_refused_with_the_expected_form() {
    for url in [
        "localhost:6379",
        "http://localhost:6379/0",
        "redis://localhost:6379/zero",
        "rediss://localhost:6379/0",
    ] {
        let err = Store::redis(url).await.unwrap_err();
        assert!(matches!(err, StateError::BadUrl { .. }), "{url}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(url), "{msg}");
        assert!(
            msg.contains("expected redis://host:port/db or redis://:password@host:port/db"),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn unreachable_at_start_is_an_error_naming_the_url() {
    let url = format!("redis://127.0.0.1:{}/0", free_port());
    let started = Instant::now();
    let err = Store::redis(&url).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        matches!(&err, StateError::Unavailable { url: u, .. } if *u == url),
        "{err}"
    );
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn password_is_used_and_never_shown() {
    let Some(server) = RedisServer::start_with(&["--requirepass", "s3cret-pw"]).await else {
        return;
    };
    let url = format!("redis://:s3cret-pw@127.0.0.1:{}/0", server.port);
    let (store, mut events) = Store::redis(&url).await.unwrap();
    assert_eq!(store.describe(), server.url());
    assert!(!format!("{store:?}").contains("s3cret"));
    match next_event(&mut events).await {
        StoreEvent::Connected { url } => assert!(!url.contains("s3cret"), "{url}"),
        other => panic!("{other:?}"),
    }
    store.set("k", "v", None).await.unwrap();
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some("v"));

    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}/0", server.port);
    let err = Store::redis(&wrong).await.unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains("wrong-pw"), "{msg}");
    assert!(msg.contains(&server.url()), "{msg}");
}

#[tokio::test]
async fn the_db_number_is_the_namespace() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let (db0, _e0) = Store::redis(&format!("redis://127.0.0.1:{}/0", server.port))
        .await
        .unwrap();
    let (db1, _e1) = Store::redis(&format!("redis://127.0.0.1:{}/1", server.port))
        .await
        .unwrap();
    assert_eq!(
        db1.describe(),
        format!("redis://127.0.0.1:{}/1", server.port)
    );
    db0.set("k", "zero", None).await.unwrap();
    db1.set("k", "one", None).await.unwrap();
    assert_eq!(db0.get("k").await.unwrap().as_deref(), Some("zero"));
    assert_eq!(db1.get("k").await.unwrap().as_deref(), Some("one"));
    assert_eq!(db1.keys("*").await.unwrap(), ["k"]);
}

#[tokio::test]
async fn values_written_by_other_clients_are_reported_clearly() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let (store, _events) = Store::redis(&server.url()).await.unwrap();
    // Another client puts a list and a non-UTF-8 string in the same db.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    conn.write_all(b"RPUSH list a\r\nSET bin \xff\xfe\r\nPING\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"+PONG\r\n") {
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0);
        answer.extend_from_slice(&buf[..n]);
    }
    let err = store.get("bin").await.unwrap_err();
    assert!(
        matches!(&err, StateError::NotUtf8 { key } if key == "bin"),
        "{err}"
    );
    let err = store.get("list").await.unwrap_err();
    assert!(matches!(err, StateError::Redis { .. }), "{err}");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert!(matches!(
        store.cas("list", None, Some("x"), None).await,
        Err(StateError::Redis { .. })
    ));
    // `keys` still lists it; the non-UTF-8 key name is fine as it is ASCII here.
    assert_eq!(store.keys("*").await.unwrap(), ["bin", "list"]);
}
