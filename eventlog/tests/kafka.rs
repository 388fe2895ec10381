//! The Kafka backend against a real broker (scripts/kafka-up; `HERALD_KAFKA=host:port`).
//! Without `HERALD_KAFKA` every test here prints why and passes without running.
#![cfg(feature = "kafka")]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald_eventlog::Record;
use herald_eventlog::kafka::{
    Consumed, GroupConsumer, KafkaConfig, KafkaLog, Polled, Position, Rebalance, partition_for,
};

fn broker() -> Option<String> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    match std::env::var("HERALD_KAFKA") {
        Ok(b) if !b.is_empty() => Some(b),
        _ if std::env::var_os("HERALD_REQUIRE_TOOLS").is_some() => {
            panic!("HERALD_KAFKA is not set, and HERALD_REQUIRE_TOOLS says not to skip")
        }
        _ => {
            eprintln!("skipped: HERALD_KAFKA is not set (scripts/kafka-up starts a broker)");
            None
        }
    }
}

/// A topic of its own for each test, so tests share one broker without seeing each other.
fn config(broker: &str, name: &str, partitions: i32) -> KafkaConfig {
    let mut c = KafkaConfig::new(broker);
    c.topic = unique(name);
    c.partitions = partitions;
    c
}

fn record(key: &str, value: String) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        value: value.into_bytes(),
    }
}

/// A group member that applies what it reads the way a delivery worker does: each
/// partition from the position it has applied, every record exactly once, in order.
struct Member {
    consumer: GroupConsumer,
    next: Arc<Mutex<HashMap<i32, i64>>>,
    held: BTreeSet<i32>,
    applied: Vec<Consumed>,
}

impl Member {
    fn join(log: &KafkaLog, group: &str, next: HashMap<i32, i64>) -> Member {
        let next = Arc::new(Mutex::new(next));
        let positions = next.clone();
        let consumer = log
            .consumer(group, move |p| {
                positions.lock().ok().and_then(|n| n.get(&p).copied())
            })
            .expect("consumer");
        Member {
            consumer,
            next,
            held: BTreeSet::new(),
            applied: Vec::new(),
        }
    }

    async fn step(&mut self) {
        let polled = tokio::time::timeout(
            Duration::from_secs(10),
            self.consumer.poll(256, Duration::from_millis(50)),
        )
        .await
        .expect("a poll returns soon after its wait");
        match polled {
            Ok(Polled::Records(records)) => {
                let mut next = self.next.lock().expect("lock");
                for c in records {
                    let p = c.position.partition;
                    assert!(
                        self.held.contains(&p),
                        "read {:?} of a partition not held",
                        c.position
                    );
                    let want = next.get(&p).copied().unwrap_or(0);
                    assert_eq!(
                        c.position.offset, want,
                        "partition {p} read out of order or twice"
                    );
                    next.insert(p, want + 1);
                    self.applied.push(c);
                }
            }
            Ok(Polled::Rebalance(Rebalance::Assigned(p))) => self.held.extend(p),
            Ok(Polled::Rebalance(Rebalance::Revoked(p))) => {
                for p in p {
                    self.held.remove(&p);
                }
            }
            Err(e) => panic!("poll failed: {e}"),
        }
    }
}

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("herald.test.{name}.{}.{nanos}", std::process::id())
}

#[tokio::test]
async fn appends_are_acknowledged_and_read_back_in_order_per_key() {
    let Some(b) = broker() else { return };
    let log = Arc::new(
        KafkaLog::connect(config(&b, "order", 4))
            .await
            .expect("connect"),
    );
    assert_eq!(
        log.partitions(),
        4,
        "the topic was created with the configured count"
    );

    // Ten writers, each appending its own key's records in order, concurrently.
    let mut writers = Vec::new();
    for k in 0..10 {
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            let key = format!("device-{k}");
            let mut positions = Vec::new();
            for batch in 0..5 {
                let records = (0..10)
                    .map(|i| record(&key, format!("{k}:{}", batch * 10 + i)))
                    .collect();
                positions.extend(log.append(records).await.expect("append"));
            }
            (key, positions)
        }));
    }
    let mut acknowledged: HashMap<String, Vec<Position>> = HashMap::new();
    for w in writers {
        let (key, positions) = w.await.expect("writer");
        let p = partition_for(key.as_bytes(), 4);
        assert!(
            positions.iter().all(|x| x.partition == p),
            "{key} stays in partition {p}"
        );
        assert!(positions.windows(2).all(|w| w[0].offset < w[1].offset));
        acknowledged.insert(key, positions);
    }

    let mut m = Member::join(&log, &unique("order"), HashMap::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.applied.len() < 500 {
        assert!(Instant::now() < deadline, "read {} of 500", m.applied.len());
        m.step().await;
    }
    assert_eq!(
        m.held,
        (0..4).collect(),
        "the only member holds every partition"
    );
    let mut by_key: BTreeMap<String, Vec<(Position, u32)>> = BTreeMap::new();
    for c in &m.applied {
        let key = String::from_utf8(c.key.clone()).expect("utf8 key");
        let value = String::from_utf8(c.value.clone()).expect("utf8 value");
        let i: u32 = value
            .split(':')
            .nth(1)
            .and_then(|i| i.parse().ok())
            .expect("value k:i");
        by_key.entry(key).or_default().push((c.position, i));
    }
    assert_eq!(by_key.len(), 10);
    for (key, seen) in by_key {
        let order: Vec<u32> = seen.iter().map(|(_, i)| *i).collect();
        assert_eq!(
            order,
            (0..50).collect::<Vec<_>>(),
            "{key} read in append order"
        );
        let positions: Vec<Position> = seen.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            positions, acknowledged[&key],
            "{key} read where it was acknowledged"
        );
    }
}

#[tokio::test]
async fn a_group_shares_the_partitions_and_a_survivor_takes_over_from_its_own_positions() {
    let Some(b) = broker() else { return };
    let log = KafkaLog::connect(config(&b, "group", 6))
        .await
        .expect("connect");
    // Ten records in every partition: find a key that lands in each.
    let mut keys: BTreeMap<i32, String> = BTreeMap::new();
    for i in 0.. {
        let k = format!("key-{i}");
        keys.entry(partition_for(k.as_bytes(), 6)).or_insert(k);
        if keys.len() == 6 {
            break;
        }
    }
    for key in keys.values() {
        log.append((0..10).map(|i| record(key, i.to_string())).collect())
            .await
            .expect("append");
    }

    // Member A's store says it applied offsets 0..5 of every partition; B has nothing.
    let group = unique("group");
    let mut a = Member::join(&log, &group, (0..6).map(|p| (p, 5)).collect());
    let mut bm = Member::join(&log, &group, HashMap::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(a.held.len() + bm.held.len() == 6 && !a.held.is_empty() && !bm.held.is_empty()) {
        assert!(
            Instant::now() < deadline,
            "no split: {:?} {:?}",
            a.held,
            bm.held
        );
        tokio::join!(a.step(), bm.step());
    }
    assert!(
        a.held.is_disjoint(&bm.held),
        "{:?} and {:?} overlap",
        a.held,
        bm.held
    );

    // B leaves; A ends up holding all six, and reads each from its own position: every
    // offset 5..10 of every partition exactly once (Member::step checks once and order).
    drop(bm);
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.held.len() < 6 || a.applied.len() < 30 {
        assert!(
            Instant::now() < deadline,
            "A holds {:?} and applied {} after B left",
            a.held,
            a.applied.len()
        );
        a.step().await;
    }
    let seen: BTreeSet<Position> = a.applied.iter().map(|c| c.position).collect();
    let want: BTreeSet<Position> = (0..6)
        .flat_map(|p| {
            (5..10).map(move |o| Position {
                partition: p,
                offset: o,
            })
        })
        .collect();
    assert_eq!(seen, want);

    // Committing is what the group's lag is measured from.
    let next: HashMap<i32, i64> = (0..6).map(|p| (p, 10)).collect();
    a.consumer.commit(&next).expect("commit");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let committed = a
            .consumer
            .committed(&[0, 1, 2, 3, 4, 5], Duration::from_secs(5))
            .expect("committed");
        if committed.iter().all(|c| *c == Some(10)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets: {committed:?}"
        );
        // An asynchronous commit is sent by the next poll.
        a.step().await;
    }
}

#[tokio::test]
async fn no_broker_is_a_clear_unavailable_error_not_a_hang() {
    // This one needs no broker: nothing listens on port 1.
    let mut c = KafkaConfig::new("127.0.0.1:1");
    c.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = KafkaLog::connect(c).await.err().expect("no broker, no log");
    assert!(
        matches!(err, herald_eventlog::Error::Unavailable(_)),
        "unexpected error: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn one_partition_is_an_ordered_event_log_that_other_processes_can_tail() {
    use herald_eventlog::kafka::OrderedKafkaLog;
    use herald_eventlog::{Append, EventLog};
    let Some(b) = broker() else { return };
    let cfg = config(&b, "ordered", 1);
    let writer = OrderedKafkaLog::open(cfg.clone()).await.expect("open");
    assert_eq!(*writer.durable_end().borrow(), 0);
    let offsets = writer
        .append(
            (0..100)
                .map(|i| record(&format!("k{}", i % 7), i.to_string()))
                .collect(),
        )
        .await
        .expect("append");
    assert_eq!(
        offsets,
        (0..100).collect::<Vec<u64>>(),
        "dense offsets in append order"
    );
    assert_eq!(
        *writer.durable_end().borrow(),
        100,
        "own appends raise the end at once"
    );

    // Reads from any offset, in order, up to the end.
    let all = writer.read(0, 1000).await.expect("read");
    assert_eq!(all.len(), 100);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, r)| r.offset == i as u64 && r.value == i.to_string().into_bytes())
    );
    let middle = writer.read(42, 5).await.expect("read");
    assert_eq!(
        middle.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![42, 43, 44, 45, 46]
    );
    assert!(writer.read(100, 10).await.expect("read").is_empty());

    // Another process sees the end move when the writer appends more.
    let reader = OrderedKafkaLog::open(cfg).await.expect("open");
    assert_eq!(*reader.durable_end().borrow(), 100);
    let mut end = reader.durable_end();
    writer
        .append(vec![record("k", "late".into())])
        .await
        .expect("append");
    tokio::time::timeout(Duration::from_secs(10), end.wait_for(|e| *e == 101))
        .await
        .expect("the end moves within the watermark poll")
        .expect("watch");
    let late = reader.read(100, 10).await.expect("read");
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].value, b"late");
}

#[tokio::test]
async fn a_partitioned_topic_is_made_from_config_and_records_go_to_their_keys_partition() {
    use herald_eventlog::kafka::OrderedKafkaLog;
    use herald_eventlog::{Append, EventLog, Partitions};
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let Some(b) = broker() else { return };
    let mut cfg = config(&b, "partitioned", 3);
    cfg.retention_ms = 7 * 24 * 3600 * 1000;
    let logs = OrderedKafkaLog::open_topic(cfg.clone())
        .await
        .expect("open");
    assert_eq!(logs.len(), 3, "the topic has the configured partitions");

    // The topic's retention is the configured one.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &b)
        .create()
        .expect("admin client");
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(&cfg.topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("describe configs");
    let resource = described
        .into_iter()
        .next()
        .expect("one resource")
        .expect("the topic's configs");
    let retention = resource
        .get("retention.ms")
        .and_then(|e| e.value.clone())
        .expect("retention.ms is set");
    assert_eq!(retention, "604800000");

    // Every record lands in its key's partition, in order there.
    let topic = Partitions::new(
        logs.iter()
            .map(|l| l.clone() as Arc<dyn EventLog>)
            .collect(),
    );
    let keys: Vec<String> = (0..30).map(|i| format!("device-{i}")).collect();
    let records = keys
        .iter()
        .enumerate()
        .map(|(i, k)| record(k, i.to_string()))
        .collect();
    let offsets = topic.append(records).await.expect("append");
    let mut expected: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    for (i, (k, o)) in keys.iter().zip(&offsets).enumerate() {
        let p = topic.of(k.as_bytes());
        assert_eq!(
            p as i32,
            partition_for(k.as_bytes(), 3),
            "the Java partitioner"
        );
        expected.entry(p).or_default().push((*o, i.to_string()));
    }
    assert_eq!(expected.len(), 3, "30 keys use every partition");
    for (p, want) in expected {
        let got: Vec<(u64, String)> = topic
            .get(p)
            .read(0, 100)
            .await
            .expect("read")
            .into_iter()
            .map(|r| (r.offset, String::from_utf8(r.value).expect("utf-8")))
            .collect();
        assert_eq!(got, want, "partition {p}");
    }
}
