//! The Redis backend against a real `redis-server`: the shared behaviour tests, two stores on one
//! server, and Redis dying and coming back.
//!
//! Each test starts its own server on a free port in a temporary directory and kills it when
//! done (also on panic). Without `redis-server` on the PATH the tests print a note and pass,
//! except under CI (`CI` set), where they fail and say to install it.

mod common;
// Shared with the unit tests of the pass-through connection, which use all of it.
#[allow(dead_code)]
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use common::{Fixture, next_event, next_published};
use corral_state::{Op, Outcome, StateError, Store, StoreEvent};
use redis_server::{RedisServer, free_port};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

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
