//! One suite for every projection store: each test runs against the embedded (fjall)
//! store and, in a herald built with the `cql` feature and with `HERALD_CASSANDRA=host:port`
//! set (scripts/cassandra-up), against a real Cassandra server, in a keyspace of its own.
//! Without `HERALD_CASSANDRA` the CQL half prints why it is skipped (and fails instead
//! under `HERALD_REQUIRE_TOOLS=1`, as scripts/test runs it).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;

use herald_projections::embedded::{EmbeddedStore, open_database};
use herald_projections::memory::{MemState, MemStore};
use herald_projections::model::{
    App, Device, IdempotencyRecord, InboxEntry, InboxHead, MessageStatus, Payload, Presence,
};
use herald_projections::view::{Store, Writes};
use herald_schemas::events::Event;

/// A store under test, and what reads its whole state.
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    state: Box<dyn Fn() -> MemState>,
    /// Keeps the embedded store's directory.
    _dir: Option<tempfile::TempDir>,
    /// Opens another handle on the same data, as a second process would (CQL only).
    #[cfg(feature = "cql")]
    twin: Option<Box<dyn Fn() -> herald_projections::cql::CqlStore>>,
}

fn embedded() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(open_database(dir.path()).unwrap(), "").unwrap());
    let s = store.clone();
    Backend {
        name: "embedded",
        store,
        state: Box::new(move || s.to_mem_state().unwrap()),
        _dir: Some(dir),
        #[cfg(feature = "cql")]
        twin: None,
    }
}

/// The CQL server to test against, or why there is none.
fn cassandra() -> Option<String> {
    match std::env::var("HERALD_CASSANDRA") {
        Ok(addr) if !addr.is_empty() && cfg!(feature = "cql") => Some(addr),
        _ if std::env::var("HERALD_REQUIRE_TOOLS").is_ok_and(|v| v == "1") => {
            panic!(
                "HERALD_CASSANDRA is not set or the `cql` feature is off, and HERALD_REQUIRE_TOOLS=1 says not to skip"
            )
        }
        _ => {
            eprintln!(
                "skipped the CQL store: set HERALD_CASSANDRA=host:port (scripts/cassandra-up) and build with --features cql"
            );
            None
        }
    }
}

#[cfg(feature = "cql")]
fn cql(test: &str) -> Option<Backend> {
    use herald_projections::cql::{CqlConfig, CqlStore};
    let addr = cassandra()?;
    let keyspace = format!("suite_{test}_{}", std::process::id());
    let config = CqlConfig::new(&addr, &keyspace);
    let store = Arc::new(CqlStore::connect(&config).unwrap());
    // A keyspace left by an earlier run with the same pid starts empty.
    store.truncate().unwrap();
    let s = store.clone();
    Some(Backend {
        name: "cql",
        store,
        state: Box::new(move || s.to_mem_state().unwrap()),
        _dir: None,
        twin: Some(Box::new(move || CqlStore::connect(&config).unwrap())),
    })
}

#[cfg(not(feature = "cql"))]
fn cql(_test: &str) -> Option<Backend> {
    cassandra();
    None
}

/// Every backend, each fresh.
fn backends(test: &str) -> Vec<Backend> {
    let mut all = vec![embedded()];
    all.extend(cql(test));
    all
}

fn entry(seq: u64, message: &str) -> InboxEntry {
    InboxEntry {
        seq,
        message_id: message.into(),
        ts_ms: 1_000,
        // Far ahead: no store may drop it.
        expires_at_ms: u64::MAX / 2,
        received: false,
    }
}

fn status(message: &str, targeted: u64, acked: u64, ts_ms: u64) -> MessageStatus {
    MessageStatus {
        message_id: message.into(),
        app_id: "a1".into(),
        ts_ms,
        expires_at_ms: ts_ms + 60_000,
        broadcast: targeted > 1,
        targeted,
        acked,
        recalled: false,
        recalled_targets: 0,
        replaced: 0,
        dropped: 0,
        unicast_device: None,
    }
}

/// A batch with a row of every kind.
fn every_kind() -> Writes {
    let mut w = Writes::default();
    w.apps.insert(
        "a1".into(),
        App {
            app_id: "a1".into(),
            name: "demo".into(),
            app_key: "k1".into(),
            client_id: "c1".into(),
            client_secret_sha256: vec![1, 2, 3],
            created_ms: 7,
            limits: herald_projections::model::AppLimits {
                pushes_per_s: Some(10),
                max_devices: Some(3),
                ..Default::default()
            },
        },
    );
    w.app_by_client.insert("c1".into(), "a1".into());
    w.app_by_key.insert("k1".into(), "a1".into());
    w.devices.insert(
        "d1".into(),
        Device {
            device_id: "d1".into(),
            app_id: "a1".into(),
            token_sha256: vec![9; 32],
            platform: "linux".into(),
            network: "wifi".into(),
            registered_ms: 8,
        },
    );
    w.app_devices.insert(("a1".into(), "d1".into()));
    w.heads.insert("d1".into(), InboxHead { next_seq: 3 });
    w.entries.insert(("d1".into(), 1), Some(entry(1, "m1")));
    w.entries.insert(("d1".into(), 2), Some(entry(2, "m2")));
    w.messages.insert("m1".into(), status("m1", 1, 0, 1_000));
    w.payloads.insert(
        "m1".into(),
        Payload {
            key_id: 1,
            nonce: vec![0; 12],
            ciphertext: b"sealed".to_vec(),
        },
    );
    w.presence.insert(
        "d1".into(),
        Presence {
            connected: true,
            gateway_id: "g1".into(),
            since_ms: 9,
            keep_alive_s: 30,
        },
    );
    w.idempotency.insert(
        ("a1".into(), "key".into()),
        IdempotencyRecord {
            message_id: "m1".into(),
            request_sha256: vec![5; 32],
            ts_ms: 1_000,
            window_s: 60,
        },
    );
    w.collapse.insert(("d1".into(), "news".into()), 2);
    w.app_device_counts.insert("a1".into(), 1);
    w
}

#[test]
fn an_empty_store_answers_nothing() {
    for b in backends("empty") {
        let s = &*b.store;
        assert_eq!(s.checkpoint(0).unwrap(), 0, "{}", b.name);
        assert_eq!(s.checkpoints(3).unwrap(), vec![0, 0, 0], "{}", b.name);
        assert_eq!(s.app("a").unwrap(), None);
        assert!(s.apps(10).unwrap().is_empty());
        assert_eq!(s.app_id_by_client("c").unwrap(), None);
        assert_eq!(s.app_id_by_key("k").unwrap(), None);
        assert_eq!(s.device("d").unwrap(), None);
        assert!(s.app_devices("a", None, 10).unwrap().is_empty());
        assert_eq!(s.inbox_head("d").unwrap(), InboxHead::default());
        assert_eq!(s.inbox_entry("d", 1).unwrap(), None);
        assert!(s.inbox_page("d", 0, 10).unwrap().is_empty());
        assert_eq!(s.message("m", 0).unwrap(), None);
        assert_eq!(s.message_status("m").unwrap(), None);
        assert_eq!(s.payload("m").unwrap(), None);
        assert_eq!(s.presence("d").unwrap(), None);
        assert_eq!(s.idempotency("a", "k", 0).unwrap(), None);
        assert_eq!(s.idempotency_record("a", "k", 0).unwrap(), None);
        assert_eq!(s.collapse("d", "k").unwrap(), None);
        assert_eq!(s.app_device_count("a", 0).unwrap(), 0);
        assert_eq!(s.app_device_total("a").unwrap(), 0);
        assert_eq!((b.state)(), MemState::default(), "{}", b.name);
    }
}

#[test]
fn committed_rows_read_back_through_every_method() {
    for b in backends("rows") {
        let (s, name) = (&*b.store, b.name);
        let reference = MemStore::default();
        let w = every_kind();
        s.take_partition(1).unwrap();
        s.commit(&w, 1, 5).unwrap();
        reference.commit(&w, 1, 5).unwrap();
        assert_eq!(s.checkpoints(3).unwrap(), vec![0, 5, 0], "{name}");
        assert_eq!(s.app("a1").unwrap(), w.apps.get("a1").cloned(), "{name}");
        let apps = s.apps(10).unwrap();
        assert_eq!(apps, w.apps.values().cloned().collect::<Vec<_>>(), "{name}");
        assert_eq!(s.app_id_by_client("c1").unwrap().as_deref(), Some("a1"));
        assert_eq!(s.app_id_by_key("k1").unwrap().as_deref(), Some("a1"));
        assert_eq!(s.device("d1").unwrap(), w.devices.get("d1").cloned());
        assert_eq!(s.app_devices("a1", None, 10).unwrap(), vec!["d1"]);
        assert_eq!(s.inbox_head("d1").unwrap().next_seq, 3);
        assert_eq!(s.inbox_entry("d1", 2).unwrap(), Some(entry(2, "m2")));
        assert_eq!(
            s.inbox_page("d1", 0, 10).unwrap(),
            vec![entry(1, "m1"), entry(2, "m2")]
        );
        assert_eq!(s.message("m1", 1).unwrap(), w.messages.get("m1").cloned());
        assert_eq!(
            s.message("m1", 0).unwrap(),
            None,
            "{name}: another partition"
        );
        assert_eq!(
            s.message_status("m1").unwrap(),
            w.messages.get("m1").cloned()
        );
        assert_eq!(s.payload("m1").unwrap(), w.payloads.get("m1").cloned());
        assert_eq!(s.presence("d1").unwrap(), w.presence.get("d1").cloned());
        let rec = w.idempotency.values().next().cloned();
        assert_eq!(s.idempotency("a1", "key", 1).unwrap(), rec);
        assert_eq!(s.idempotency_record("a1", "key", 2_000).unwrap(), rec);
        assert_eq!(s.idempotency_record("a1", "key", 61_000).unwrap(), None);
        assert_eq!(s.collapse("d1", "news").unwrap(), Some(2));
        assert_eq!(s.app_device_count("a1", 1).unwrap(), 1, "{name}");
        assert_eq!(s.app_device_count("a1", 0).unwrap(), 0, "{name}");

        // An acknowledged entry goes; a value written again is replaced.
        let mut w2 = Writes::default();
        w2.entries.insert(("d1".into(), 1), None);
        w2.messages.insert("m1".into(), status("m1", 1, 1, 1_000));
        s.commit(&w2, 1, 9).unwrap();
        reference.commit(&w2, 1, 9).unwrap();
        assert_eq!(s.inbox_entry("d1", 1).unwrap(), None, "{name}");
        assert_eq!(s.inbox_page("d1", 0, 10).unwrap(), vec![entry(2, "m2")]);
        assert_eq!(s.message_status("m1").unwrap().unwrap().acked, 1);
        // A commit with nothing in it still moves the checkpoint.
        s.commit(&Writes::default(), 1, 12).unwrap();
        reference.commit(&Writes::default(), 1, 12).unwrap();
        assert_eq!(s.checkpoint(1).unwrap(), 12);
        assert_eq!((b.state)(), reference.snapshot(), "{name}");
    }
}

#[test]
fn indexes_and_backlogs_read_in_pages() {
    for b in backends("pages") {
        let (s, name) = (&*b.store, b.name);
        let mut w = Writes::default();
        for d in 0..2_500 {
            w.app_devices.insert(("a1".into(), format!("d{d:05}")));
        }
        // Another app's devices sort before and after: never in a1's pages.
        w.app_devices.insert(("a0".into(), "d99999".into()));
        w.app_devices.insert(("a2".into(), "d00000".into()));
        for seq in 1..=600 {
            w.entries
                .insert(("d1".into(), seq), Some(entry(seq, &format!("m{seq}"))));
        }
        // Removed entries are skipped, not returned empty.
        for seq in (10..=600).step_by(10) {
            w.entries.insert(("d1".into(), seq), None);
        }
        s.commit(&w, 0, 1).unwrap();

        let mut after: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let page = s.app_devices("a1", after.as_deref(), 1_000).unwrap();
            assert!(page.len() <= 1_000, "{name}");
            let Some(last) = page.last().cloned() else {
                break;
            };
            seen.extend(page);
            after = Some(last);
        }
        let expected: Vec<String> = (0..2_500).map(|d| format!("d{d:05}")).collect();
        assert_eq!(seen, expected, "{name}: every device once, in id order");

        let mut at = 0;
        let mut seqs = Vec::new();
        loop {
            let page = s.inbox_page("d1", at, 256).unwrap();
            assert!(page.len() <= 256);
            let Some(last) = page.last() else { break };
            at = last.seq;
            seqs.extend(page.iter().map(|e| e.seq));
        }
        let expected: Vec<u64> = (1..=600).filter(|s| s % 10 != 0).collect();
        assert_eq!(seqs, expected, "{name}: the backlog in seq order");
        assert!(s.inbox_page("d1", u64::MAX, 10).unwrap().is_empty());
    }
}

#[test]
fn a_message_sums_its_partitions_and_a_key_takes_its_earliest_record() {
    for b in backends("partitions") {
        let (s, name) = (&*b.store, b.name);
        let record = |id: &str, ts_ms| IdempotencyRecord {
            message_id: id.into(),
            request_sha256: Vec::new(),
            ts_ms,
            window_s: 10,
        };
        for (p, targeted, acked, ts, rec_ts) in [(0, 3, 1, 5_000, 50_000), (2, 4, 4, 0, 1_000)] {
            let mut w = Writes::default();
            w.messages
                .insert("m".into(), status("m", targeted, acked, ts));
            w.idempotency
                .insert(("a1".into(), "k".into()), record(&format!("m{p}"), rec_ts));
            w.app_device_counts.insert("a1".into(), targeted);
            s.commit(&w, p, 1).unwrap();
        }
        assert_eq!(
            s.app_device_total("a1").unwrap(),
            7,
            "{name}: devices per app"
        );
        let m = s.message_status("m").unwrap().unwrap();
        assert_eq!((m.targeted, m.acked, m.ts_ms), (7, 5, 5_000), "{name}");
        let at = |now| {
            s.idempotency_record("a1", "k", now)
                .unwrap()
                .map(|r| r.message_id)
        };
        assert_eq!(at(5_000), Some("m2".into()), "{name}: the earliest holds");
        assert_eq!(
            at(55_000),
            Some("m0".into()),
            "{name}: the expired one hides nothing"
        );
        assert_eq!(at(70_000), None);
        assert_eq!(s.checkpoints(3).unwrap(), vec![1, 0, 1]);
    }
}

/// Folds a fixed history of every kind of event on a topic of three partitions (with
/// their shares) into `store`, as the workers would.
fn fold_history(store: &dyn Store) -> Vec<Vec<Event>> {
    let events: Vec<Event> = common::mixed_ops(0x5eed, 400)
        .iter()
        .enumerate()
        .map(|(i, o)| common::event(i, o))
        .collect();
    common::run_partitioned(store, &events, 3, &[], false, false)
}

#[test]
fn a_folded_history_gives_the_reference_state_and_digests() {
    let reference = MemStore::default();
    fold_history(&reference);
    let expected = reference.snapshot();
    assert!(
        !expected.entries.is_empty() && !expected.messages.is_empty(),
        "the history fills the inboxes"
    );
    let now = 0;
    for b in backends("fold") {
        fold_history(&*b.store);
        let state = (b.state)();
        assert_eq!(state, expected, "{}", b.name);
        assert_eq!(
            herald_projections::digest::digests(&state, now),
            herald_projections::digest::digests(&expected, now),
            "{}",
            b.name
        );
    }
}

/// What only a store shared by processes has to do: finish a commit its last writer
/// left half done, and refuse the commits of a writer whose partition was taken over.
#[cfg(feature = "cql")]
#[test]
fn a_shared_store_recovers_a_half_done_commit_and_fences_the_old_writer() {
    for b in backends("shared") {
        let Some(twin) = &b.twin else { continue };
        let first = twin();
        first.take_partition(0).unwrap();
        first.commit(&Writes::default(), 0, 3).unwrap();
        // Killed after its journal was complete, before any row or the checkpoint.
        first.write_journal_only(&every_kind(), 0, 8).unwrap();
        assert_eq!(b.store.checkpoint(0).unwrap(), 3);
        assert_eq!(b.store.device("d1").unwrap(), None);

        // The next writer finishes it before it folds anything.
        let second = twin();
        second.take_partition(0).unwrap();
        assert_eq!(second.checkpoint(0).unwrap(), 8);
        let reference = MemStore::default();
        reference.commit(&every_kind(), 0, 8).unwrap();
        assert_eq!(
            (b.state)(),
            reference.snapshot(),
            "the state is the whole batch"
        );

        // The first writer, still running somewhere, is refused from now on.
        let mut late = Writes::default();
        late.heads.insert("d1".into(), InboxHead { next_seq: 99 });
        for _ in 0..2 {
            // Refused again when retried: a fence sticks until the partition is taken.
            match first.commit(&late, 0, 20) {
                Err(herald_projections::StoreError::Fenced { partition: 0 }) => {}
                other => panic!("a fenced writer's commit gave {other:?}"),
            }
        }
        assert_eq!(b.store.inbox_head("d1").unwrap().next_seq, 3);
        assert_eq!(b.store.checkpoint(0).unwrap(), 8);
        // The new writer carries on.
        second.commit(&late, 0, 20).unwrap();
        assert_eq!(b.store.inbox_head("d1").unwrap().next_seq, 99);
        // Other partitions are not affected.
        first.commit(&Writes::default(), 1, 4).unwrap();
        assert_eq!(b.store.checkpoints(2).unwrap(), vec![20, 4]);
    }
}

/// A keyspace migrated before device counts (schema version 1, devices registered)
/// counts its devices once when migration 2 is applied, and folds count on from there.
#[cfg(feature = "cql")]
#[test]
fn a_keyspace_from_before_device_counts_counts_its_devices_once() {
    use herald_projections::cql::{CqlConfig, CqlStore};
    use scylla::client::session_builder::SessionBuilder;
    let Some(addr) = cassandra() else {
        return;
    };
    let keyspace = format!("suite_counts_{}", std::process::id());
    let config = CqlConfig::new(&addr, &keyspace);
    let store = CqlStore::connect(&config).unwrap();
    store.truncate().unwrap();
    let mut w = Writes::default();
    for (a, d) in [("a1", "d1"), ("a1", "d2"), ("a2", "d3")] {
        w.app_devices.insert((a.into(), d.into()));
    }
    store.take_partition(0).unwrap();
    store.commit(&w, 0, 3).unwrap();
    drop(store);
    // Back to schema version 1, as an older herald left it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let session = SessionBuilder::new()
            .known_node(&addr)
            .build()
            .await
            .unwrap();
        for cql in [
            format!("DROP TABLE {keyspace}.app_device_counts"),
            format!("DELETE FROM {keyspace}.schema_migrations WHERE version = 2"),
        ] {
            session.query_unpaged(cql, ()).await.unwrap();
        }
        session.await_schema_agreement().await.unwrap();
    });
    let store = CqlStore::connect(&config).unwrap();
    assert_eq!(store.app_device_total("a1").unwrap(), 2);
    assert_eq!(store.app_device_total("a2").unwrap(), 1);
    let mut w = Writes::default();
    w.app_device_counts.insert("a1".into(), 1);
    store.take_partition(0).unwrap();
    store.commit(&w, 0, 4).unwrap();
    assert_eq!(store.app_device_total("a1").unwrap(), 3);
    drop(store);
    // Connecting again applies nothing and counts nothing twice.
    let store = CqlStore::connect(&config).unwrap();
    assert_eq!(store.app_device_total("a1").unwrap(), 3);
}
