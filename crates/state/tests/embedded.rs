//! The embedded backend: the shared behaviour tests, plus snapshots and save failures.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{DEADLINE, Fixture, eventually, next_event};
use corral_state::{StateError, Store, StoreEvent};

#[allow(clippy::unused_async)] // `behaviour_tests!` awaits every backend's constructor.
async fn embedded() -> Option<Fixture> {
    let (store, events) = Store::embedded(None).unwrap();
    Some(Fixture {
        store,
        events,
        _keep: Box::new(()),
    })
}

behaviour_tests!(embedded);

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn read_snapshot(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn describe_names_the_backend() {
    let (store, _events) = Store::embedded(None).unwrap();
    assert_eq!(store.describe(), "embedded, in memory");
    assert!(format!("{store:?}").contains("embedded, in memory"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let (store, _events) = Store::embedded(Some(path.clone())).unwrap();
    assert_eq!(
        store.describe(),
        format!("embedded, saved in {}", path.display())
    );
    // Without a snapshot, flush has nothing to do.
    Store::embedded(None).unwrap().0.flush().await.unwrap();
}

#[tokio::test]
async fn snapshot_round_trip_keeps_values_and_absolute_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let before = unix_now_ms();
    {
        let (store, _events) = Store::embedded(Some(path.clone())).unwrap();
        store.set("plain", "value ✓", None).await.unwrap();
        store
            .set("leased", "x", Some(Duration::from_secs(600)))
            .await
            .unwrap();
        store
            .set("brief", "x", Some(Duration::from_millis(100)))
            .await
            .unwrap();
        store.incr("counter", 7).await.unwrap();
        store.set("gone", "x", None).await.unwrap();
        store.del("gone").await.unwrap();
        store.flush().await.unwrap();
    }

    let json = read_snapshot(&path);
    assert_eq!(json["format"], "corral-state");
    assert_eq!(json["version"], 1);
    let entries = json["entries"].as_array().unwrap();
    let expiry_of = |key: &str| {
        entries
            .iter()
            .find(|e| e["key"] == key)
            .unwrap_or_else(|| panic!("{key} not in {json}"))
            .get("expires_at_ms")
            .and_then(serde_json::Value::as_u64)
    };
    assert_eq!(entries.len(), 4, "{json}");
    assert_eq!(expiry_of("plain"), None);
    assert_eq!(expiry_of("counter"), None);
    let leased = expiry_of("leased").unwrap();
    assert!(
        leased >= before + 600_000 && leased <= unix_now_ms() + 600_000,
        "absolute expiry in Unix ms: {leased}"
    );
    let brief = expiry_of("brief").unwrap();

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "values may be secrets");
    }

    // Load after "brief" has expired: it is dropped, the rest is back with TTLs running.
    eventually("the brief key's expiry time to pass", || async {
        unix_now_ms() > brief
    })
    .await;
    let (store, _events) = Store::embedded(Some(path.clone())).unwrap();
    assert_eq!(
        store.get("plain").await.unwrap().as_deref(),
        Some("value ✓")
    );
    assert_eq!(store.get("counter").await.unwrap().as_deref(), Some("7"));
    assert_eq!(store.get("leased").await.unwrap().as_deref(), Some("x"));
    assert_eq!(store.get("brief").await.unwrap(), None);
    assert_eq!(
        store.keys("*").await.unwrap(),
        ["counter", "leased", "plain"]
    );
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["state.json"]);
}

#[tokio::test]
async fn changes_are_saved_without_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let (store, _events) = Store::embedded(Some(path.clone())).unwrap();
    store.set("k", "v1", None).await.unwrap();
    eventually("the periodic save", || async {
        path.exists() && read_snapshot(&path)["entries"][0]["value"] == "v1"
    })
    .await;
    store.set("k", "v2", None).await.unwrap();
    eventually("the periodic save of the change", || async {
        read_snapshot(&path)["entries"][0]["value"] == "v2"
    })
    .await;
}

#[tokio::test]
async fn missing_snapshot_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.json");
    let (store, _events) = Store::embedded(Some(path.clone())).unwrap();
    assert!(store.keys("*").await.unwrap().is_empty());
    // Nothing changed, so nothing is written.
    store.flush().await.unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn corrupt_snapshot_names_the_file_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    for content in [
        &b"{ not json"[..],
        br#"{"format":"something-else","version":1,"saved_at_ms":0,"entries":[]}"#,
        br#"{"format":"corral-state","version":99,"saved_at_ms":0,"entries":[]}"#,
        b"",
    ] {
        std::fs::write(&path, content).unwrap();
        let err = Store::embedded(Some(path.clone())).unwrap_err();
        assert!(
            matches!(&err, StateError::Snapshot { path: p, .. } if *p == path),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("move the file aside"), "{msg}");
    }
}

#[tokio::test]
async fn save_failure_is_reported_once_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    // The directory does not exist yet, so every write fails (as on a full disk).
    let sub = dir.path().join("sub");
    let path = sub.join("state.json");
    let (store, mut events) = Store::embedded(Some(path.clone())).unwrap();
    store.set("a", "1", None).await.unwrap();

    match next_event(&mut events).await {
        StoreEvent::SaveFailed { path: p, reason } => {
            assert_eq!(p, path);
            assert!(!reason.is_empty());
        }
        other => panic!("expected SaveFailed, got {other:?}"),
    }
    let err = store.flush().await.unwrap_err();
    assert!(
        matches!(&err, StateError::Io { path: p, .. } if *p == path),
        "{err}"
    );
    assert!(err.to_string().contains("kept in memory"), "{err}");

    // More changes while failing: still in memory, no second report of the same failure.
    store.set("b", "2", None).await.unwrap();
    assert_eq!(store.get("a").await.unwrap().as_deref(), Some("1"));

    // The disk recovers: the retry writes everything.
    std::fs::create_dir(&sub).unwrap();
    eventually("the retried save", || async { path.exists() }).await;
    let (reloaded, _events) = Store::embedded(Some(path.clone())).unwrap();
    assert_eq!(reloaded.keys("*").await.unwrap(), ["a", "b"]);
    assert!(
        events.try_recv().is_err(),
        "the same failure must be reported only once"
    );
}

#[test]
fn outside_a_runtime_is_a_clear_error() {
    let err = Store::embedded(None).unwrap_err();
    assert!(matches!(err, StateError::NoRuntime), "{err}");
}

#[tokio::test]
async fn events_end_when_the_store_is_dropped() {
    let (store, mut events) = Store::embedded(None).unwrap();
    let clone = store.clone();
    drop(store);
    clone.set("k", "v", None).await.unwrap();
    drop(clone);
    let end = tokio::time::timeout(DEADLINE, events.recv()).await.unwrap();
    assert!(end.is_none());
}

#[tokio::test]
async fn a_full_event_channel_holds_publish_back_without_dropping() {
    let (store, mut events) = Store::embedded(None).unwrap();
    store.subscribe("c").await.unwrap();
    let total = corral_state::EVENT_CAPACITY + 100;
    let publisher = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..total {
                store.publish("c", &i.to_string()).await.unwrap();
            }
        })
    };
    for i in 0..total {
        match next_event(&mut events).await {
            StoreEvent::Published(p) => assert_eq!(p.message, i.to_string()),
            other => panic!("{other:?}"),
        }
    }
    publisher.await.unwrap();
}

/// In-process speed of get and set; run with
/// `cargo test --release -p corral-state --test embedded -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn throughput() {
    let (store, _events) = Store::embedded(None).unwrap();
    let keys: Vec<String> = (0..10_000).map(|i| format!("key:{i}")).collect();
    let n = 2_000_000;
    let start = std::time::Instant::now();
    for i in 0..n {
        store
            .set(&keys[i % keys.len()], "some value", None)
            .await
            .unwrap();
    }
    let set_rate = n as f64 / start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    for i in 0..n {
        store.get(&keys[i % keys.len()]).await.unwrap();
    }
    let get_rate = n as f64 / start.elapsed().as_secs_f64();
    println!("set: {set_rate:.0} ops/s, get: {get_rate:.0} ops/s");
}
