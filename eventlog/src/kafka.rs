//! The Kafka backend: herald's log as one Kafka topic, partitioned by key.
//!
//! - [`KafkaLog`] appends with an idempotent producer and `acks=all`: an append resolves
//!   only once every in-sync replica has the records, and a retry inside the producer can
//!   neither duplicate nor reorder them. It picks each record's partition itself, with the
//!   Java client's murmur2 partitioner ([`partition_for`]), so every process (and every
//!   other Kafka client) agrees where a key lives.
//! - [`GroupConsumer`] reads the topic as a member of a consumer group. The group decides
//!   which partitions a member holds; the member decides where in each partition it starts:
//!   at the position its projection store says it has applied (the store is the truth,
//!   checkpointed with the state it covers), never at an offset Kafka was told earlier.
//!   Offsets are committed to Kafka only after the state they cover is stored, so the
//!   group's lag is honest.
//!
//! # Invariants
//! - Everything with one key lands in one partition, in append order.
//! - An append that fails or times out is reported as [`Error::Unavailable`]: the records
//!   may or may not be in the log (the caller retries with its idempotency key).
//! - A member never reads a partition it was not assigned; on a revocation it stops
//!   reading it before the partition is handed on.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset as KafkaOffset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::{Error, Record};

/// Where a record is: its partition and its offset in that partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// How herald reaches Kafka.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: host:port[,host:port…].
    pub brokers: String,
    /// The event topic.
    pub topic: String,
    /// Partitions of the event topic when herald creates it. The count is fixed for the
    /// topic's life: a key's partition depends on it.
    pub partitions: i32,
    /// Replication factor when herald creates the topic (3 in production, 1 in tests).
    pub replication_factor: i32,
    /// `retention.ms` of the topic: -1 (the default) keeps every event, because the log
    /// is the system of record that projections are rebuilt from.
    pub retention_ms: i64,
    /// How long an append may take before it fails (`message.timeout.ms`), and how long
    /// start-up waits for the broker.
    pub timeout: Duration,
    /// Extra librdkafka properties (security, tuning), applied last.
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// Defaults for a broker at `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            topic: "herald.events".into(),
            partitions: 12,
            replication_factor: 1,
            retention_ms: -1,
            timeout: Duration::from_secs(10),
            properties: BTreeMap::new(),
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "herald")
            .set(
                "socket.connection.setup.timeout.ms",
                self.timeout.as_millis().max(1000).to_string(),
            );
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("{what}: {e}"))
}

pub use herald_schemas::partition::murmur2;

/// The partition the Java client's default partitioner gives `key` among `partitions`.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    herald_schemas::partition::for_key(key, u32::try_from(partitions).unwrap_or(1)) as i32
}

/// The log on Kafka: appends (any role) and consumers (delivery workers).
pub struct KafkaLog {
    config: KafkaConfig,
    partitions: i32,
    producer: FutureProducer,
}

impl KafkaLog {
    /// Connects, creates the topic if it is missing, and learns its partition count.
    /// Fails with [`Error::Unavailable`] when no broker answers within the timeout.
    pub async fn connect(config: KafkaConfig) -> Result<Self, Error> {
        ensure_topic(&config).await?;
        let partitions = partition_count(&config).await?;
        if partitions != config.partitions {
            tracing::warn!(
                topic = %config.topic, partitions, configured = config.partitions,
                "the topic exists with another partition count; using the topic's"
            );
        }
        let mut c = config.client();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", config.timeout.as_millis().to_string());
        for (k, v) in &config.properties {
            c.set(k, v);
        }
        let producer: FutureProducer = c
            .create()
            .map_err(|e| unavailable("cannot create the Kafka producer", e))?;
        Ok(KafkaLog {
            config,
            partitions,
            producer,
        })
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The settings this log was opened with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The partition `key` lives in.
    pub fn partition_of(&self, key: &[u8]) -> i32 {
        partition_for(key, self.partitions)
    }

    /// Appends `records` and resolves with their positions once every in-sync replica has
    /// them. Records with one key keep their order.
    pub async fn append(&self, records: Vec<Record>) -> Result<Vec<Position>, Error> {
        let partitions = self.partitions;
        produce(
            &self.producer,
            &self.config.topic,
            self.config.timeout,
            records,
            |key| partition_for(key, partitions),
        )
        .await
    }

    /// Joins consumer group `group`. `start` tells where to begin reading a partition
    /// when it is assigned: the first offset the caller has not applied, or `None` for the
    /// beginning of the partition.
    pub fn consumer(
        &self,
        group: &str,
        start: impl Fn(i32) -> Option<i64> + Send + Sync + 'static,
    ) -> Result<GroupConsumer, Error> {
        self.group_member(group, Box::new(start), false)
    }

    /// The offsets group `group` has committed for `partitions` (`None` where none), read
    /// without joining the group.
    pub async fn committed_offsets(
        &self,
        group: &str,
        partitions: &[i32],
    ) -> Result<Vec<Option<i64>>, Error> {
        let mut c = self.config.client();
        c.set("group.id", group).set("enable.auto.commit", "false");
        let consumer: BaseConsumer = c
            .create()
            .map_err(|e| unavailable("cannot create a Kafka client", e))?;
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.config.topic, p);
        }
        let (topic, timeout, partitions) = (
            self.config.topic.clone(),
            self.config.timeout,
            partitions.to_vec(),
        );
        tokio::task::spawn_blocking(move || {
            let got = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| unavailable("cannot read committed offsets", e))?;
            Ok(partitions
                .iter()
                .map(
                    |&p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                        Some(KafkaOffset::Offset(o)) => Some(o),
                        _ => None,
                    },
                )
                .collect())
        })
        .await
        .map_err(|e| Error::Storage(e.to_string()))?
    }

    /// Joins consumer group `group` only to learn which partitions the group gives this
    /// member (it reads nothing: assigned partitions are paused). With a one-partition
    /// topic, the member that holds partition 0 is the group's one active member, and
    /// another takes over when it dies: leader election by the broker.
    pub fn membership(&self, group: &str) -> Result<GroupConsumer, Error> {
        self.group_member(group, Box::new(|_| None), true)
    }

    fn group_member(
        &self,
        group: &str,
        start: StartFn,
        pause: bool,
    ) -> Result<GroupConsumer, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let context = GroupContext {
            topic: self.config.topic.clone(),
            start,
            events: tx,
            pause,
        };
        let mut c = self.config.client();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "100");
        for (k, v) in &self.config.properties {
            c.set(k, v);
        }
        let consumer: StreamConsumer<GroupContext> = c
            .create_with_context(context)
            .map_err(|e| unavailable("cannot create the Kafka consumer", e))?;
        consumer
            .subscribe(&[&self.config.topic])
            .map_err(|e| unavailable("cannot subscribe to the event topic", e))?;
        Ok(GroupConsumer {
            consumer,
            topic: self.config.topic.clone(),
            events: Mutex::new(Events {
                rx,
                seen: VecDeque::new(),
                carried: Vec::new(),
            }),
        })
    }
}

/// Produces `records` (to the partition `partition_of` picks for each key) and resolves
/// once every in-sync replica has them.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    timeout: Duration,
    records: Vec<Record>,
    partition_of: impl Fn(&[u8]) -> i32,
) -> Result<Vec<Position>, Error> {
    let began = std::time::Instant::now();
    let sends = records.iter().map(|r| {
        let record = FutureRecord::to(topic)
            .key(&r.key)
            .payload(&r.value)
            .partition(partition_of(&r.key));
        // The producer's own queue is the bound; a full queue waits as long as a send.
        let sent = producer.send(record, timeout);
        async move {
            match sent.await {
                Ok(d) => Ok(Position {
                    partition: d.partition,
                    offset: d.offset,
                }),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    Err(Error::RecordTooLarge {
                        size: r.key.len() + r.value.len(),
                        max: 1_000_000,
                    })
                }
                Err((e, _)) => Err(unavailable("Kafka did not acknowledge the append", e)),
            }
        }
    });
    let positions = try_join_all(sends).await?;
    herald_telemetry::metrics::log_synced(positions.len(), began.elapsed());
    Ok(positions)
}

/// What changed in a member's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    /// These partitions are now this member's, read from the offsets `start` gave.
    Assigned(Vec<i32>),
    /// These partitions are no longer this member's: stop applying anything read from
    /// them that is not yet committed.
    Revoked(Vec<i32>),
}

/// One record read from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Where it is.
    pub position: Position,
    /// Its key.
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
}

/// What a poll of the group returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// Records, in partition order.
    Records(Vec<Consumed>),
    /// The assignment changed; records of revoked partitions polled before this must
    /// not be applied.
    Rebalance(Rebalance),
}

/// Where a member starts reading an assigned partition.
type StartFn = Box<dyn Fn(i32) -> Option<i64> + Send + Sync>;

struct GroupContext {
    topic: String,
    start: StartFn,
    events: mpsc::UnboundedSender<Rebalance>,
    /// Membership only: assigned partitions are paused, nothing is fetched.
    pause: bool,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    // The eager protocol: a rebalance revokes everything, then assigns. The member
    // assigns the offsets its store gives, not the group's committed ones.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assign = TopicPartitionList::new();
                for &p in &partitions {
                    let offset = match (self.start)(p) {
                        Some(o) => KafkaOffset::Offset(o),
                        None => KafkaOffset::Beginning,
                    };
                    if let Err(e) = assign.add_partition_offset(&self.topic, p, offset) {
                        tracing::error!(partition = p, error = %e, "cannot set a start offset");
                    }
                }
                if let Err(e) = consumer.assign(&assign) {
                    tracing::error!(error = %e, "cannot take the assigned partitions");
                    return;
                }
                if self.pause
                    && let Err(e) = consumer.pause(&assign)
                {
                    tracing::error!(error = %e, "cannot pause the assigned partitions");
                }
                tracing::info!(?partitions, "partitions assigned");
                let _ = self.events.send(Rebalance::Assigned(partitions));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Tell the member first: it drops what it has not committed.
                tracing::info!(?partitions, "partitions revoked");
                let _ = self.events.send(Rebalance::Revoked(partitions));
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "cannot release the revoked partitions");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed; releasing every partition");
                let _ = self.events.send(Rebalance::Revoked(partitions));
                let _ = consumer.unassign();
            }
        }
    }
}

/// A member of a consumer group reading the event topic.
pub struct GroupConsumer {
    consumer: StreamConsumer<GroupContext>,
    topic: String,
    events: Mutex<Events>,
}

/// Changes of assignment the context sent, those seen but not yet reported, and records
/// read after a change that must wait until the change is reported.
struct Events {
    rx: mpsc::UnboundedReceiver<Rebalance>,
    seen: VecDeque<Rebalance>,
    carried: Vec<Consumed>,
}

impl Events {
    /// Moves every change the context sent into `seen`; returns whether there is any.
    fn gather(&mut self) -> bool {
        while let Ok(e) = self.rx.try_recv() {
            self.seen.push_back(e);
        }
        !self.seen.is_empty()
    }

    /// Partitions revoked by changes not yet reported.
    fn revoked(&self) -> Vec<i32> {
        self.seen
            .iter()
            .flat_map(|e| match e {
                Rebalance::Revoked(p) => p.clone(),
                Rebalance::Assigned(_) => Vec::new(),
            })
            .collect()
    }
}

fn consumed(m: &rdkafka::message::BorrowedMessage<'_>) -> Consumed {
    Consumed {
        position: Position {
            partition: m.partition(),
            offset: m.offset(),
        },
        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

impl GroupConsumer {
    fn events(&self) -> Result<std::sync::MutexGuard<'_, Events>, Error> {
        self.events.lock().map_err(|_| Error::Closed)
    }

    /// Returns the records that arrive within `wait` (at most `max`, sooner when `max`
    /// arrived), or a change of assignment. Changes and records are reported in the order
    /// they happened; records read from a partition before it was revoked are dropped,
    /// because its next owner reads them. Idle, it returns no records after `wait`.
    pub async fn poll(&self, max: usize, wait: Duration) -> Result<Polled, Error> {
        let mut out = {
            let mut ev = self.events()?;
            if ev.gather()
                && let Some(r) = ev.seen.pop_front()
            {
                return Ok(Polled::Rebalance(r));
            }
            std::mem::take(&mut ev.carried)
        };
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < max {
            // A change's callback runs inside `recv`; it is noticed when `recv` returns.
            let record = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => None,
                Ok(Ok(m)) => Some(consumed(&m)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Kafka consumer error");
                    if out.is_empty() {
                        return Err(unavailable("cannot read the event topic", e));
                    }
                    break;
                }
            };
            let mut ev = self.events()?;
            if ev.gather() {
                // The change's callback ran inside this `recv`, before the record it
                // returned: that record comes after the change (a partition revoked and
                // assigned again keeps it) and waits until the change is reported. Only
                // the records read before the change are dropped for revoked partitions.
                let revoked = ev.revoked();
                ev.carried.extend(record);
                out.retain(|r| !revoked.contains(&r.position.partition));
                if out.is_empty()
                    && let Some(r) = ev.seen.pop_front()
                {
                    return Ok(Polled::Rebalance(r));
                }
                break;
            }
            match record {
                Some(r) => out.push(r),
                None => break,
            }
        }
        Ok(Polled::Records(out))
    }

    /// Commits, for each partition, the first offset not yet applied. Call only after the
    /// state that covers everything before it is stored.
    pub fn commit(&self, next: &HashMap<i32, i64>) -> Result<(), Error> {
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &o) in next {
            tpl.add_partition_offset(&self.topic, p, KafkaOffset::Offset(o))
                .map_err(|e| unavailable("cannot build the offset list", e))?;
        }
        self.consumer
            .commit(&tpl, rdkafka::consumer::CommitMode::Async)
            .map_err(|e| unavailable("cannot commit offsets", e))
    }

    /// The offsets the group has committed for `partitions` (`None` where nothing was).
    pub fn committed(
        &self,
        partitions: &[i32],
        timeout: Duration,
    ) -> Result<Vec<Option<i64>>, Error> {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        let got = self
            .consumer
            .committed_offsets(tpl, timeout)
            .map_err(|e| unavailable("cannot read committed offsets", e))?;
        Ok(partitions
            .iter()
            .map(
                |&p| match got.find_partition(&self.topic, p).map(|e| e.offset()) {
                    Some(KafkaOffset::Offset(o)) => Some(o),
                    _ => None,
                },
            )
            .collect())
    }
}

/// One partition of the Kafka topic as an [`EventLog`]: a single total order with dense
/// offsets, like the embedded log. `herald serve` on Kafka uses a one-partition topic
/// ([`OrderedKafkaLog::open`]); the role processes open every partition of a partitioned
/// one ([`OrderedKafkaLog::open_topic`]) and fold each on its own.
///
/// The durable end is the partition's high watermark: raised by this process's own
/// acknowledged appends at once, and by other writers' within [`WATERMARK_POLL`].
pub struct OrderedKafkaLog {
    topic: std::sync::Arc<TopicShared>,
    partition: i32,
    reader: tokio::sync::Mutex<OrderedReader>,
}

/// What the partitions of one topic share.
struct TopicShared {
    log: KafkaLog,
    /// Asks the broker for high watermarks (a blocking call, on its own client),
    /// replaced by a new client when it keeps failing.
    watermarks: std::sync::Mutex<std::sync::Arc<BaseConsumer>>,
    /// How its clients are made.
    reader_config: ClientConfig,
    /// Each partition's durable end.
    ends: Vec<tokio::sync::watch::Sender<crate::Offset>>,
    /// Why the last append failed, until one succeeds (for health checks).
    append_failure: std::sync::Mutex<Option<String>>,
}

impl TopicShared {
    fn raise_end(&self, partition: i32, to: crate::Offset) {
        if let Some(end) = usize::try_from(partition)
            .ok()
            .and_then(|p| self.ends.get(p))
        {
            end.send_if_modified(|e| {
                if to > *e {
                    *e = to;
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// How often the high watermark is asked for, to see other processes' appends.
pub const WATERMARK_POLL: Duration = Duration::from_millis(200);

struct OrderedReader {
    consumer: StreamConsumer,
    /// The offset the consumer delivers next, if it is positioned.
    next: Option<i64>,
}

impl OrderedKafkaLog {
    /// The topic's producer and group membership.
    pub fn kafka(&self) -> &KafkaLog {
        &self.topic.log
    }

    /// This log's partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Asks the broker for the partition's high watermark now (rather than within
    /// [`WATERMARK_POLL`]), raises the durable end to it, and returns the end.
    pub async fn refresh_end(&self) -> Result<crate::Offset, Error> {
        let high = watermark(
            self.topic.watermark_client(),
            self.topic.log.config().topic.clone(),
            self.partition,
            self.topic.log.config().timeout,
        )
        .await?;
        self.topic.raise_end(self.partition, high);
        Ok(*self.topic.ends[self.partition as usize].borrow())
    }

    /// Connects to the topic of `config` as one ordered log (the topic is created with
    /// one partition if missing; a topic with more partitions is refused).
    pub async fn open(mut config: KafkaConfig) -> Result<std::sync::Arc<Self>, Error> {
        config.partitions = 1;
        let mut all = Self::open_topic(config).await?;
        if all.len() != 1 {
            return Err(Error::Storage(format!(
                "topic {} has {} partitions; one ordered log needs exactly one",
                all[0].kafka().config().topic,
                all.len()
            )));
        }
        Ok(all.remove(0))
    }

    /// Connects to the topic of `config` (created with `config.partitions` if missing)
    /// and opens each of its partitions, in order.
    pub async fn open_topic(config: KafkaConfig) -> Result<Vec<std::sync::Arc<Self>>, Error> {
        let log = KafkaLog::connect(config).await?;
        let mut reader = log.config().client();
        reader
            .set("group.id", "herald-ordered-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "100");
        let reader_config = || reader.clone();
        let watermarks: std::sync::Arc<BaseConsumer> = std::sync::Arc::new(
            reader_config()
                .create()
                .map_err(|e| unavailable("cannot create the Kafka reader", e))?,
        );
        let mut ends = Vec::new();
        // A topic created a moment ago (by this process or another role) may not have
        // its partitions' leaders yet ("not leader for partition"): ask again, within
        // the configured timeout.
        let deadline = tokio::time::Instant::now() + log.config().timeout;
        for p in 0..log.partitions() {
            let high = loop {
                match watermark(
                    watermarks.clone(),
                    log.config().topic.clone(),
                    p,
                    log.config().timeout,
                )
                .await
                {
                    Ok(high) => break high,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(partition = p, error = %e, "no high watermark yet; asking again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            ends.push(tokio::sync::watch::channel(high).0);
        }
        let topic = std::sync::Arc::new(TopicShared {
            log,
            watermarks: std::sync::Mutex::new(watermarks),
            reader_config: reader.clone(),
            ends,
            append_failure: std::sync::Mutex::new(None),
        });
        let mut out = Vec::new();
        for p in 0..topic.log.partitions() {
            let consumer: StreamConsumer = reader_config()
                .create()
                .map_err(|e| unavailable("cannot create the Kafka reader", e))?;
            out.push(std::sync::Arc::new(OrderedKafkaLog {
                topic: topic.clone(),
                partition: p,
                reader: tokio::sync::Mutex::new(OrderedReader {
                    consumer,
                    next: None,
                }),
            }));
        }
        tokio::spawn(poll_watermarks(std::sync::Arc::downgrade(&topic)));
        Ok(out)
    }
}

async fn watermark(
    consumer: std::sync::Arc<BaseConsumer>,
    topic: String,
    partition: i32,
    timeout: Duration,
) -> Result<u64, Error> {
    let (_, high) =
        tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, partition, timeout))
            .await
            .map_err(|e| Error::Storage(e.to_string()))?
            .map_err(|e| unavailable("cannot read the partition's high watermark", e))?;
    Ok(u64::try_from(high).unwrap_or(0))
}

/// Rounds of failed watermark polls after which the client is replaced: after the
/// broker was away, librdkafka's client can keep answering "unknown partition" from
/// metadata it no longer refreshes.
const WATERMARK_FAILURES: u32 = 5;

impl TopicShared {
    fn watermark_client(&self) -> std::sync::Arc<BaseConsumer> {
        self.watermarks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn renew_watermark_client(&self) {
        match self.reader_config.create::<BaseConsumer>() {
            Ok(c) => {
                tracing::info!("renewed the Kafka client that polls the high watermarks");
                *self.watermarks.lock().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(c);
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew the watermark client"),
        }
    }
}

async fn poll_watermarks(weak: std::sync::Weak<TopicShared>) {
    let mut failed_rounds = 0;
    loop {
        tokio::time::sleep(WATERMARK_POLL).await;
        let Some(topic) = weak.upgrade() else { return };
        let (consumer, name, partitions) = (
            topic.watermark_client(),
            topic.log.config().topic.clone(),
            topic.log.partitions(),
        );
        // Release the topic while waiting, so that dropping its logs ends this task.
        drop(topic);
        let mut failed = false;
        for p in 0..partitions {
            let high = watermark(consumer.clone(), name.clone(), p, Duration::from_secs(1)).await;
            match (high, weak.upgrade()) {
                (Ok(high), Some(topic)) => topic.raise_end(p, high),
                (_, None) => return,
                (Err(e), Some(_)) => {
                    failed = true;
                    tracing::debug!(partition = p, error = %e, "cannot poll the high watermark");
                }
            }
        }
        failed_rounds = if failed { failed_rounds + 1 } else { 0 };
        if failed_rounds >= WATERMARK_FAILURES {
            failed_rounds = 0;
            if let Some(topic) = weak.upgrade() {
                topic.renew_watermark_client();
            }
        }
    }
}

impl crate::Append for OrderedKafkaLog {
    fn append(
        &self,
        records: Vec<Record>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<crate::Offset>, Error>> {
        // The future must be 'static: the producer and the watch are cheap to clone.
        let producer = self.topic.log.producer.clone();
        let name = self.topic.log.config.topic.clone();
        let timeout = self.topic.log.config.timeout;
        let partition = self.partition;
        let topic = self.topic.clone();
        Box::pin(async move {
            let produced = produce(&producer, &name, timeout, records, |_| partition).await;
            *topic
                .append_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner()) =
                produced.as_ref().err().map(ToString::to_string);
            let positions = produced?;
            let offsets: Vec<crate::Offset> = positions
                .iter()
                .map(|p| u64::try_from(p.offset).unwrap_or(0))
                .collect();
            if let Some(&last) = offsets.iter().max() {
                topic.raise_end(partition, last + 1);
            }
            Ok(offsets)
        })
    }
}

impl crate::EventLog for OrderedKafkaLog {
    fn health(&self) -> crate::Health {
        match &*self
            .topic
            .append_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some(why) => crate::Health::Degraded(why.clone()),
            None => crate::Health::Ok,
        }
    }

    fn read(
        &self,
        from: crate::Offset,
        max: usize,
    ) -> futures::future::BoxFuture<'_, Result<Vec<crate::Stored>, Error>> {
        Box::pin(async move {
            let end = *self.topic.ends[self.partition as usize].borrow();
            if from >= end || max == 0 {
                return Ok(Vec::new());
            }
            let want = usize::try_from(end - from).unwrap_or(usize::MAX).min(max);
            let from =
                i64::try_from(from).map_err(|_| Error::Storage("offset too large".into()))?;
            let mut reader = self.reader.lock().await;
            if reader.next != Some(from) {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(
                    &self.topic.log.config.topic,
                    self.partition,
                    KafkaOffset::Offset(from),
                )
                .map_err(|e| unavailable("cannot position the reader", e))?;
                reader
                    .consumer
                    .assign(&tpl)
                    .map_err(|e| unavailable("cannot position the reader", e))?;
                reader.next = Some(from);
            }
            let OrderedReader { consumer, next } = &mut *reader;
            let mut out = Vec::with_capacity(want.min(4096));
            while out.len() < want {
                // The records are below the high watermark: they come, unless the broker
                // is away, and then the caller retries when the end moves.
                let wait = if out.is_empty() {
                    Duration::from_secs(2)
                } else {
                    Duration::from_millis(20)
                };
                let m = match tokio::time::timeout(wait, consumer.recv()).await {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "Kafka read failed");
                        // Position the reader afresh on the next read: after the broker
                        // was away, the consumer's fetch of the partition may not resume
                        // by itself.
                        *next = None;
                        break;
                    }
                    Err(_) => {
                        if out.is_empty() {
                            // Records below the watermark did not come: the same.
                            *next = None;
                        }
                        break;
                    }
                };
                let expected = next.unwrap_or(from);
                if m.offset() < expected {
                    // Already handed over (a fetch delivered it again): skip it.
                    continue;
                }
                if m.offset() != expected {
                    let found = m.offset();
                    *next = None;
                    return Err(Error::Corrupt {
                        offset: u64::try_from(expected).unwrap_or(0),
                        reason: format!(
                            "the Kafka partition skips from offset {expected} to {found}: compaction or transactions on the topic?"
                        ),
                    });
                }
                out.push(crate::Stored {
                    offset: u64::try_from(m.offset()).unwrap_or(0),
                    key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
                    value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                });
                *next = Some(m.offset() + 1);
            }
            Ok(out)
        })
    }

    fn durable_end(&self) -> tokio::sync::watch::Receiver<crate::Offset> {
        self.topic.ends[self.partition as usize].subscribe()
    }
}

async fn admin(config: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, Error> {
    config
        .client()
        .create()
        .map_err(|e| unavailable("cannot create the Kafka admin client", e))
}

/// Creates the event topic when it does not exist yet.
async fn ensure_topic(config: &KafkaConfig) -> Result<(), Error> {
    let admin = admin(config).await?;
    let retention = config.retention_ms.to_string();
    let topic = NewTopic::new(
        &config.topic,
        config.partitions,
        TopicReplication::Fixed(config.replication_factor),
    )
    .set("retention.ms", &retention)
    // A record is whole or absent on every replica the producer waited for.
    .set(
        "min.insync.replicas",
        if config.replication_factor >= 3 {
            "2"
        } else {
            "1"
        },
    );
    let opts = AdminOptions::new()
        .operation_timeout(Some(config.timeout))
        .request_timeout(Some(config.timeout));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .map_err(|e| unavailable("cannot reach Kafka to create the event topic", e))?;
    for r in results {
        match r {
            Ok(name) => {
                tracing::info!(topic = %name, partitions = config.partitions, "created the event topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(unavailable(&format!("cannot create topic {name}"), code));
            }
        }
    }
    Ok(())
}

/// The partition count of the event topic, from the broker's metadata.
async fn partition_count(config: &KafkaConfig) -> Result<i32, Error> {
    let admin = Arc::new(admin(config).await?);
    let topic = config.topic.clone();
    let timeout = config.timeout;
    tokio::task::spawn_blocking(move || {
        let md = admin
            .inner()
            .fetch_metadata(Some(&topic), timeout)
            .map_err(|e| unavailable("cannot read the event topic's metadata", e))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| Error::Unavailable(format!("topic {topic} is not in the metadata")))?;
        match t.partitions().len() {
            0 => Err(Error::Unavailable(format!(
                "topic {topic} has no partitions yet"
            ))),
            n => Ok(n as i32),
        }
    })
    .await
    .map_err(|e| Error::Storage(e.to_string()))?
}
