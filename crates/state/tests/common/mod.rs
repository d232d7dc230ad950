//! The behaviour every backend must show, written once and run against each (`embedded.rs`,
//! `redis.rs`) through [`behaviour_tests!`]. Nothing here sleeps to synchronise: it waits for a
//! state with a deadline.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use corral_state::{
    MAX_KEY_LEN, MAX_VALUE_LEN, Op, Outcome, Published, StateError, Store, StoreEvent,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

/// Longest wait for anything the tests expect to happen.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A store under test, its events, and whatever must live as long as it (a Redis server, a
/// temporary directory).
pub struct Fixture {
    pub store: Store,
    pub events: mpsc::Receiver<StoreEvent>,
    pub _keep: Box<dyn std::any::Any + Send>,
}

/// Polls `check` until it is true; panics after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The next event, skipping nothing; panics after [`DEADLINE`].
pub async fn next_event(events: &mut mpsc::Receiver<StoreEvent>) -> StoreEvent {
    timeout_at(Instant::now() + DEADLINE, events.recv())
        .await
        .unwrap_or_else(|_| panic!("no store event within {DEADLINE:?}"))
        .expect("the event channel closed")
}

/// The next published message, skipping connection events; panics after [`DEADLINE`].
pub async fn next_published(events: &mut mpsc::Receiver<StoreEvent>) -> Published {
    loop {
        match next_event(events).await {
            StoreEvent::Published(p) => return p,
            StoreEvent::Connected { .. } | StoreEvent::Disconnected { .. } => {}
            other @ StoreEvent::SaveFailed { .. } => panic!("unexpected event {other:?}"),
        }
    }
}

fn published(pattern: &str, channel: &str, message: &str) -> Published {
    Published {
        pattern: pattern.to_owned(),
        channel: channel.to_owned(),
        message: message.to_owned(),
    }
}

pub async fn get_set_del(f: &mut Fixture) {
    let s = &f.store;
    assert_eq!(s.get("missing").await.unwrap(), None);
    s.set("greeting", "hello", None).await.unwrap();
    assert_eq!(s.get("greeting").await.unwrap().as_deref(), Some("hello"));
    s.set("greeting", "héllo wörld ✓", None).await.unwrap();
    assert_eq!(
        s.get("greeting").await.unwrap().as_deref(),
        Some("héllo wörld ✓")
    );
    s.set("empty", "", None).await.unwrap();
    assert_eq!(s.get("empty").await.unwrap().as_deref(), Some(""));
    assert!(s.del("greeting").await.unwrap());
    assert!(!s.del("greeting").await.unwrap());
    assert_eq!(s.get("greeting").await.unwrap(), None);
    // Keys with spaces, colons and glob characters are ordinary keys.
    s.set("a key:with*odd?[chars]", "v", None).await.unwrap();
    assert_eq!(
        s.get("a key:with*odd?[chars]").await.unwrap().as_deref(),
        Some("v")
    );
}

pub async fn ttl_expires(f: &mut Fixture) {
    let s = &f.store;
    s.set("short", "v", Some(Duration::from_millis(50)))
        .await
        .unwrap();
    s.set("long", "v", Some(Duration::from_secs(600)))
        .await
        .unwrap();
    // Set with a TTL, then again without: the second set removes the TTL.
    s.set("kept", "v", Some(Duration::from_millis(50)))
        .await
        .unwrap();
    s.set("kept", "v2", None).await.unwrap();
    assert_eq!(s.get("short").await.unwrap().as_deref(), Some("v"));
    eventually("the 50 ms key to expire", || async {
        s.get("short").await.unwrap().is_none()
    })
    .await;
    assert_eq!(s.get("long").await.unwrap().as_deref(), Some("v"));
    assert_eq!(s.get("kept").await.unwrap().as_deref(), Some("v2"));
    // An expired key is never listed and cannot be deleted again.
    assert_eq!(s.keys("*").await.unwrap(), ["kept", "long"]);
    assert!(!s.del("short").await.unwrap());

    // `keys` alone (no get) must not list a key once it has expired.
    s.set("listed", "v", Some(Duration::from_millis(30)))
        .await
        .unwrap();
    eventually("keys to stop listing the expired key", || async {
        s.keys("list*").await.unwrap().is_empty()
    })
    .await;

    // Bad TTLs.
    assert!(matches!(
        s.set("k", "v", Some(Duration::ZERO)).await,
        Err(StateError::BadTtl { ttl_ms: 0, .. })
    ));
}

pub async fn incr_counts(f: &mut Fixture) {
    let s = &f.store;
    assert_eq!(s.incr("n", 1).await.unwrap(), 1);
    assert_eq!(s.incr("n", 41).await.unwrap(), 42);
    assert_eq!(s.incr("n", -50).await.unwrap(), -8);
    assert_eq!(s.get("n").await.unwrap().as_deref(), Some("-8"));
    assert_eq!(s.incr("fresh", -3).await.unwrap(), -3);
    s.set("n", "100", None).await.unwrap();
    assert_eq!(s.incr("n", 0).await.unwrap(), 100);

    for bad in ["abc", "1.5", " 1", "+1", "01", ""] {
        s.set("word", bad, None).await.unwrap();
        let err = s.incr("word", 1).await.unwrap_err();
        assert!(
            matches!(&err, StateError::NotInteger { key } if key == "word"),
            "{bad:?}: {err}"
        );
        assert_eq!(s.get("word").await.unwrap().as_deref(), Some(bad));
    }

    s.set("big", &i64::MAX.to_string(), None).await.unwrap();
    let err = s.incr("big", 1).await.unwrap_err();
    assert!(
        matches!(&err, StateError::Overflow { key } if key == "big"),
        "{err}"
    );
    assert_eq!(
        s.get("big").await.unwrap(),
        Some(i64::MAX.to_string()),
        "unchanged after an overflow"
    );
    s.set("small", &i64::MIN.to_string(), None).await.unwrap();
    assert!(matches!(
        s.incr("small", -1).await,
        Err(StateError::Overflow { .. })
    ));
    assert_eq!(s.incr("small", 1).await.unwrap(), i64::MIN + 1);

    // incr keeps the TTL, like Redis's INCRBY.
    s.set("ttl-counter", "5", Some(Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(s.incr("ttl-counter", 1).await.unwrap(), 6);
    eventually("the counter with a TTL to expire", || async {
        s.get("ttl-counter").await.unwrap().is_none()
    })
    .await;
}

pub async fn cas_swaps(f: &mut Fixture) {
    let s = &f.store;
    // Absent: only when the key does not exist.
    assert!(s.cas("lock", None, Some("me"), None).await.unwrap());
    assert!(!s.cas("lock", None, Some("you"), None).await.unwrap());
    assert_eq!(s.get("lock").await.unwrap().as_deref(), Some("me"));
    // Present: mismatch changes nothing, match swaps.
    assert!(!s.cas("lock", Some("you"), Some("x"), None).await.unwrap());
    assert!(s.cas("lock", Some("me"), Some("you"), None).await.unwrap());
    assert_eq!(s.get("lock").await.unwrap().as_deref(), Some("you"));
    // Expecting a value on a missing key fails.
    assert!(!s.cas("nothing", Some("x"), Some("y"), None).await.unwrap());
    assert_eq!(s.get("nothing").await.unwrap(), None);
    // Delete.
    assert!(!s.cas("lock", Some("me"), None, None).await.unwrap());
    assert!(s.cas("lock", Some("you"), None, None).await.unwrap());
    assert_eq!(s.get("lock").await.unwrap(), None);
    // With a TTL: the lease expires, then it can be taken again.
    assert!(
        s.cas("lease", None, Some("a"), Some(Duration::from_millis(50)))
            .await
            .unwrap()
    );
    eventually("the lease to expire", || async {
        s.get("lease").await.unwrap().is_none()
    })
    .await;
    assert!(s.cas("lease", None, Some("b"), None).await.unwrap());
    // The empty string is a value, not absence.
    s.set("blank", "", None).await.unwrap();
    assert!(!s.cas("blank", None, Some("x"), None).await.unwrap());
    assert!(s.cas("blank", Some(""), Some("x"), None).await.unwrap());
}

pub async fn keys_match_and_sort(f: &mut Fixture) {
    let s = &f.store;
    for k in [
        "user:2", "user:10", "user:1", "users", "job:a", "job:b", "x*y", "xay",
    ] {
        s.set(k, "v", None).await.unwrap();
    }
    assert_eq!(
        s.keys("user:*").await.unwrap(),
        ["user:1", "user:10", "user:2"]
    );
    assert_eq!(s.keys("user?").await.unwrap(), ["users"]);
    assert_eq!(s.keys("user:[12]").await.unwrap(), ["user:1", "user:2"]);
    assert_eq!(s.keys("user:[^1]").await.unwrap(), ["user:2"]);
    assert_eq!(s.keys("job:[a-z]").await.unwrap(), ["job:a", "job:b"]);
    assert_eq!(s.keys("x\\*y").await.unwrap(), ["x*y"]);
    assert_eq!(s.keys("x*y").await.unwrap(), ["x*y", "xay"]);
    assert!(s.keys("nope*").await.unwrap().is_empty());
    assert_eq!(s.keys("*").await.unwrap().len(), 8);
    let err = s.keys("user:[12").await.unwrap_err();
    assert!(
        matches!(&err, StateError::BadPattern { pattern, .. } if pattern == "user:[12"),
        "{err}"
    );
}

pub async fn limits_are_enforced(f: &mut Fixture) {
    let s = &f.store;
    let long_key = "k".repeat(MAX_KEY_LEN + 1);
    let big = "v".repeat(MAX_VALUE_LEN + 1);
    let too_long = |r: Result<_, StateError>| matches!(r, Err(StateError::KeyTooLong { len, max }) if len == MAX_KEY_LEN + 1 && max == MAX_KEY_LEN);
    assert!(too_long(s.get(&long_key).await.map(|_| ())));
    assert!(too_long(s.set(&long_key, "v", None).await));
    assert!(too_long(s.del(&long_key).await.map(|_| ())));
    assert!(too_long(s.incr(&long_key, 1).await.map(|_| ())));
    assert!(too_long(
        s.cas(&long_key, None, None, None).await.map(|_| ())
    ));
    assert!(too_long(s.keys(&long_key).await.map(|_| ())));
    assert!(too_long(s.publish(&long_key, "m").await.map(|_| ())));
    assert!(too_long(s.subscribe(&long_key).await));
    assert!(too_long(s.unsubscribe(&long_key).await));

    let too_big = |r: Result<_, StateError>| matches!(r, Err(StateError::ValueTooLarge { len, max }) if len == MAX_VALUE_LEN + 1 && max == MAX_VALUE_LEN);
    assert!(too_big(s.set("k", &big, None).await));
    assert!(too_big(
        s.cas("k", None, Some(&big), None).await.map(|_| ())
    ));
    assert!(too_big(s.publish("c", &big).await.map(|_| ())));

    assert!(matches!(s.get("").await, Err(StateError::EmptyKey)));
    assert!(matches!(
        s.set("", "v", None).await,
        Err(StateError::EmptyKey)
    ));
    assert!(matches!(
        s.publish("", "m").await,
        Err(StateError::EmptyKey)
    ));
    assert!(matches!(s.subscribe("").await, Err(StateError::EmptyKey)));
    assert!(matches!(
        s.subscribe("news.[").await,
        Err(StateError::BadPattern { .. })
    ));

    // The limits themselves are allowed.
    let max_key = "k".repeat(MAX_KEY_LEN);
    let max_value = "v".repeat(MAX_VALUE_LEN);
    s.set(&max_key, &max_value, None).await.unwrap();
    assert_eq!(
        s.get(&max_key).await.unwrap().map(|v| v.len()),
        Some(MAX_VALUE_LEN)
    );
    // Nothing was written by the refused calls.
    assert_eq!(s.keys("*").await.unwrap(), [max_key]);
}

pub async fn pubsub_with_patterns(f: &mut Fixture) {
    let s = &f.store;
    assert_eq!(s.publish("news.sports", "nobody").await.unwrap(), 0);

    s.subscribe("news.*").await.unwrap();
    s.subscribe("news.sport?").await.unwrap();
    s.subscribe("news.*").await.unwrap(); // idempotent
    s.subscribe("marker").await.unwrap();

    // Matching two patterns: counted twice, delivered twice, once per pattern.
    assert_eq!(s.publish("news.sports", "goal").await.unwrap(), 2);
    let got: BTreeSet<(String, String, String)> = [
        next_published(&mut f.events).await,
        next_published(&mut f.events).await,
    ]
    .into_iter()
    .map(|p| (p.pattern, p.channel, p.message))
    .collect();
    let want: BTreeSet<_> = [
        ("news.*", "news.sports", "goal"),
        ("news.sport?", "news.sports", "goal"),
    ]
    .into_iter()
    .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
    .collect();
    assert_eq!(got, want);

    assert_eq!(s.publish("news.weather", "rain").await.unwrap(), 1);
    assert_eq!(
        next_published(&mut f.events).await,
        published("news.*", "news.weather", "rain")
    );
    assert_eq!(s.publish("weather", "sun").await.unwrap(), 0);

    // After unsubscribe, only the other pattern gets it. The marker message, published after,
    // proves nothing else was queued in between (delivery keeps publish order).
    s.unsubscribe("news.*").await.unwrap();
    s.unsubscribe("never-subscribed").await.unwrap();
    assert_eq!(s.publish("news.sports", "second").await.unwrap(), 1);
    assert_eq!(s.publish("marker", "end").await.unwrap(), 1);
    assert_eq!(
        next_published(&mut f.events).await,
        published("news.sport?", "news.sports", "second")
    );
    assert_eq!(
        next_published(&mut f.events).await,
        published("marker", "marker", "end")
    );

    s.unsubscribe("news.sport?").await.unwrap();
    assert_eq!(s.publish("news.sports", "third").await.unwrap(), 0);
    assert_eq!(s.publish("marker", "end2").await.unwrap(), 1);
    assert_eq!(
        next_published(&mut f.events).await,
        published("marker", "marker", "end2")
    );

    // Messages are text of any size up to the limit.
    let big = "m".repeat(MAX_VALUE_LEN);
    assert_eq!(s.publish("marker", &big).await.unwrap(), 1);
    assert_eq!(
        next_published(&mut f.events).await.message.len(),
        MAX_VALUE_LEN
    );
}

/// 8 tasks × 1000 increments must count exactly 8000.
pub async fn concurrent_incr(f: &mut Fixture) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = f.store.clone();
            tokio::spawn(async move {
                for _ in 0..1000 {
                    s.incr("hits", 1).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(f.store.get("hits").await.unwrap().as_deref(), Some("8000"));
}

/// Compare-and-set used as an optimistic increment from 4 tasks: no update may be lost.
pub async fn concurrent_cas(f: &mut Fixture) {
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = f.store.clone();
            tokio::spawn(async move {
                let mut done = 0;
                while done < 200 {
                    let current = s.get("cas-counter").await.unwrap();
                    let next = current
                        .as_deref()
                        .map_or(1, |v| v.parse::<u64>().unwrap() + 1)
                        .to_string();
                    if s.cas("cas-counter", current.as_deref(), Some(&next), None)
                        .await
                        .unwrap()
                    {
                        done += 1;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        f.store.get("cas-counter").await.unwrap().as_deref(),
        Some("800")
    );
}

/// A pipeline does its ops in order, each with its own result: a refused op (over the limits,
/// or not an integer) fails alone and the ops after it still run.
pub async fn pipeline_in_order(f: &mut Fixture) {
    f.store.subscribe("piped.*").await.unwrap();
    let s = |text: &str| text.to_owned();
    let ops = vec![
        Op::Set {
            key: s("p:a"),
            value: s("1"),
            ttl: None,
        },
        Op::Incr {
            key: s("p:a"),
            by: 41,
        },
        Op::Get { key: s("p:a") },
        Op::Set {
            key: s("p:text"),
            value: s("words"),
            ttl: Some(Duration::from_secs(60)),
        },
        Op::Incr {
            key: s("p:text"),
            by: 1,
        },
        Op::Get {
            key: "k".repeat(MAX_KEY_LEN + 1),
        },
        Op::Cas {
            key: s("p:a"),
            expected: Some(s("42")),
            new: Some(s("43")),
            ttl: None,
        },
        Op::Cas {
            key: s("p:a"),
            expected: Some(s("42")),
            new: Some(s("44")),
            ttl: None,
        },
        Op::Del { key: s("p:text") },
        Op::Del { key: s("p:text") },
        Op::Get {
            key: s("p:missing"),
        },
        Op::Set {
            key: s("p:ttl"),
            value: s("v"),
            ttl: Some(Duration::ZERO),
        },
        Op::Publish {
            channel: s("piped.x"),
            message: s("hello"),
        },
        Op::Get { key: s("p:a") },
    ];
    let results = f.store.pipeline(ops).await;
    assert_eq!(results.len(), 14);
    let ok: Vec<Option<Outcome>> = results.iter().map(|r| r.as_ref().ok().cloned()).collect();
    assert_eq!(ok[0], Some(Outcome::Done));
    assert_eq!(ok[1], Some(Outcome::Number(42)));
    assert_eq!(ok[2], Some(Outcome::Value(Some(s("42")))));
    assert_eq!(ok[3], Some(Outcome::Done));
    assert!(matches!(results[4], Err(StateError::NotInteger { ref key }) if key == "p:text"));
    assert!(matches!(results[5], Err(StateError::KeyTooLong { .. })));
    assert_eq!(ok[6], Some(Outcome::Yes(true)));
    assert_eq!(ok[7], Some(Outcome::Yes(false)));
    assert_eq!(ok[8], Some(Outcome::Yes(true)));
    assert_eq!(ok[9], Some(Outcome::Yes(false)));
    assert_eq!(ok[10], Some(Outcome::Value(None)));
    assert!(matches!(results[11], Err(StateError::BadTtl { .. })));
    assert_eq!(ok[12], Some(Outcome::Count(1)));
    assert_eq!(ok[13], Some(Outcome::Value(Some(s("43")))));
    assert_eq!(
        next_published(&mut f.events).await,
        published("piped.*", "piped.x", "hello")
    );
    assert_eq!(f.store.pipeline(Vec::new()).await.len(), 0);
    // Only refused ops: nothing is sent, every op has its error.
    let refused = f.store.pipeline(vec![Op::Del { key: String::new() }]).await;
    assert!(matches!(refused[..], [Err(StateError::EmptyKey)]));
}

/// Instantiates every behaviour test for a backend; `$make` is an `async fn() ->
/// Option<Fixture>` (`None` skips the test).
#[macro_export]
macro_rules! behaviour_tests {
    ($make:path) => {
        #[tokio::test]
        async fn get_set_del() {
            let Some(mut f) = $make().await else { return };
            common::get_set_del(&mut f).await;
        }

        #[tokio::test]
        async fn ttl_expires() {
            let Some(mut f) = $make().await else { return };
            common::ttl_expires(&mut f).await;
        }

        #[tokio::test]
        async fn incr_counts() {
            let Some(mut f) = $make().await else { return };
            common::incr_counts(&mut f).await;
        }

        #[tokio::test]
        async fn cas_swaps() {
            let Some(mut f) = $make().await else { return };
            common::cas_swaps(&mut f).await;
        }

        #[tokio::test]
        async fn keys_match_and_sort() {
            let Some(mut f) = $make().await else { return };
            common::keys_match_and_sort(&mut f).await;
        }

        #[tokio::test]
        async fn limits_are_enforced() {
            let Some(mut f) = $make().await else { return };
            common::limits_are_enforced(&mut f).await;
        }

        #[tokio::test]
        async fn pipeline_in_order() {
            let Some(mut f) = $make().await else { return };
            common::pipeline_in_order(&mut f).await;
        }

        #[tokio::test]
        async fn pubsub_with_patterns() {
            let Some(mut f) = $make().await else { return };
            common::pubsub_with_patterns(&mut f).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_incr() {
            let Some(mut f) = $make().await else { return };
            common::concurrent_incr(&mut f).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn concurrent_cas() {
            let Some(mut f) = $make().await else { return };
            common::concurrent_cas(&mut f).await;
        }
    };
}
