//! The projection store on ScyllaDB or Apache Cassandra (the CQL protocol, through the
//! `scylla` driver): what the delivery workers of a partitioned topic share, so a worker
//! that takes a partition over starts from the partition's shared checkpoint.
//!
//! # Schema
//! Created by versioned migrations ([`migrate`], `herald migrate`, and at every start):
//! one table per projection, values as the same private JSON the embedded store writes.
//! Inbox rows are keyed by (device, seq) and carry a TTL of the entry's remaining life
//! plus [`INBOX_TTL_GRACE_MS`] (at least a week, so a replay of old events finds them);
//! message status and Idempotency-Key records are rows per (id, partition), never CQL
//! counters; `app_devices` is the app → devices index a
//! broadcast reads in pages. The CQL is what ScyllaDB and Cassandra both accept.
//!
//! # Commits
//! A batch's [`Writes`] hold each row's final value, so writing them twice gives the same
//! state. A commit of partition `p` is:
//! 1. the batch, serialized, as journal chunks in `p`'s `progress` partition (under the
//!    writer's epoch), then a lightweight transaction (LWT) marking the journal
//!    complete, `IF epoch = <ours>`;
//! 2. every row written, with `USING TIMESTAMP` the batch's next offset, so a late write
//!    of an older batch never overwrites a newer one;
//! 3. an LWT advancing the checkpoint and clearing the journal's marker, `IF epoch =
//!    <ours>`; then its chunks are deleted.
//!
//! A crash between 1 and 3 leaves a complete journal: whoever takes the partition next
//! ([`Store::take_partition`]) writes it again and advances the checkpoint, so the state
//! is never half a batch when a fold reads it. Taking a partition raises its epoch (an
//! LWT): an earlier owner's later journal or checkpoint is refused
//! ([`StoreError::Fenced`]), and the only rows it may still be writing are those of a
//! journal the new owner has rewritten with the same values and timestamps.
//!
//! # Calls
//! The [`Store`] trait is synchronous (folds run on blocking threads); this store runs
//! the driver on a small runtime of its own and blocks the caller until its request is
//! answered. Every request has a timeout; a server that is away or overloaded is
//! [`StoreError::Unavailable`], which workers retry and the API answers with 503.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::digest::INBOX_TTL_GRACE_MS;
use crate::memory::MemState;
use crate::model::{
    App, Device, IdempotencyRecord, InboxEntry, InboxHead, MessageStatus, Payload, Presence,
    decode, encode,
};
pub use crate::settings::{CqlConsistency, valid_keyspace};
use crate::view::{Store, View, Writes};

/// The largest journal chunk, in bytes (well under any server's mutation limit).
const JOURNAL_CHUNK_BYTES: usize = 256 * 1024;

/// Most row writes of one commit in flight at once.
const MAX_WRITES_IN_FLIGHT: usize = 64;

/// The longest TTL herald gives a row, in seconds (two years: Cassandra refuses
/// expiration dates after 2038, and pushes live at most a year, `max_ttl_s`).
const MAX_TTL_S: u64 = 2 * 365 * 24 * 3600;

/// The shortest TTL of an inbox row, in seconds: a replay of old events writes rows
/// long expired by the clock, which its later events (acks, collapse keys) must still
/// find, exactly as the live fold did.
const MIN_INBOX_TTL_S: u64 = 7 * 24 * 3600;

/// An inbox row's TTL written at `now_ms`: until [`INBOX_TTL_GRACE_MS`] after the entry
/// expires (after which no fold looks at it, by the events' time) and a further
/// [`MIN_INBOX_TTL_S`], so a worker up to a week behind the log still finds what its
/// events' time says is there; and at least [`MIN_INBOX_TTL_S`] from now.
fn inbox_ttl_s(e: &InboxEntry, now_ms: u64) -> i32 {
    let ms = e
        .expires_at_ms
        .saturating_add(INBOX_TTL_GRACE_MS)
        .saturating_add(MIN_INBOX_TTL_S * 1000)
        .saturating_sub(now_ms);
    let s = ms.div_ceil(1000).clamp(MIN_INBOX_TTL_S, MAX_TTL_S);
    i32::try_from(s).unwrap_or(i32::MAX)
}

impl CqlConsistency {
    fn driver(self) -> Consistency {
        match self {
            CqlConsistency::One => Consistency::One,
            CqlConsistency::LocalOne => Consistency::LocalOne,
            CqlConsistency::Quorum => Consistency::Quorum,
            CqlConsistency::LocalQuorum => Consistency::LocalQuorum,
            CqlConsistency::All => Consistency::All,
        }
    }

    /// The Paxos consistency of LWTs that goes with it.
    fn serial(self) -> SerialConsistency {
        match self {
            CqlConsistency::LocalOne | CqlConsistency::LocalQuorum => {
                SerialConsistency::LocalSerial
            }
            _ => SerialConsistency::Serial,
        }
    }
}

/// Where the CQL store is and how it is used.
#[derive(Debug, Clone)]
pub struct CqlConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// The keyspace (created if missing, with `replication_factor`).
    pub keyspace: String,
    /// Consistency of reads and writes.
    pub consistency: CqlConsistency,
    /// Replication factor of the keyspace when herald creates it (`SimpleStrategy`;
    /// create it yourself for several datacenters).
    pub replication_factor: u32,
    /// How long one request may take before it counts as unavailable.
    pub request_timeout: Duration,
}

impl CqlConfig {
    /// The defaults for a server at `node`.
    pub fn new(node: &str, keyspace: &str) -> Self {
        CqlConfig {
            nodes: vec![node.to_owned()],
            keyspace: keyspace.to_owned(),
            consistency: CqlConsistency::LocalQuorum,
            replication_factor: 1,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// The migrations, in order: a version, what it does, and its statements (`{ks}` is the
/// keyspace). Only ever append; an applied migration is never changed.
const MIGRATIONS: &[(i32, &str, &[&str])] = &[
    (
        1,
        "projection tables, progress and journal",
        &[
            "CREATE TABLE IF NOT EXISTS {ks}.apps (app_id text PRIMARY KEY, v blob)",
            "CREATE TABLE IF NOT EXISTS {ks}.app_by_client (client_id text PRIMARY KEY, app_id text)",
            "CREATE TABLE IF NOT EXISTS {ks}.app_by_key (app_key text PRIMARY KEY, app_id text)",
            "CREATE TABLE IF NOT EXISTS {ks}.devices (device_id text PRIMARY KEY, v blob)",
            "CREATE TABLE IF NOT EXISTS {ks}.app_devices (app_id text, device_id text, PRIMARY KEY (app_id, device_id))",
            "CREATE TABLE IF NOT EXISTS {ks}.inbox_heads (device_id text PRIMARY KEY, next_seq bigint)",
            "CREATE TABLE IF NOT EXISTS {ks}.inbox (device_id text, seq bigint, v blob, PRIMARY KEY (device_id, seq))",
            "CREATE TABLE IF NOT EXISTS {ks}.messages (message_id text, part int, v blob, PRIMARY KEY (message_id, part))",
            "CREATE TABLE IF NOT EXISTS {ks}.payloads (message_id text PRIMARY KEY, v blob)",
            "CREATE TABLE IF NOT EXISTS {ks}.presence (device_id text PRIMARY KEY, v blob)",
            "CREATE TABLE IF NOT EXISTS {ks}.idempotency (app_id text, key text, part int, v blob, PRIMARY KEY ((app_id, key), part))",
            "CREATE TABLE IF NOT EXISTS {ks}.collapse (device_id text, collapse_key text, seq bigint, PRIMARY KEY (device_id, collapse_key))",
            "CREATE TABLE IF NOT EXISTS {ks}.progress (part int, writer bigint, next bigint, chunk int, data blob, epoch bigint static, checkpoint bigint static, journal_next bigint static, journal_writer bigint static, journal_chunks int static, PRIMARY KEY (part, writer, next, chunk)) WITH gc_grace_seconds = 10800",
        ],
    ),
    (
        2,
        "devices per app and partition (the devices registered before counted once, in part -1)",
        &[
            "CREATE TABLE IF NOT EXISTS {ks}.app_device_counts (app_id text, part int, n bigint, PRIMARY KEY (app_id, part))",
        ],
    ),
];

/// The `part` of the row that counts an app's devices registered before the keyspace
/// kept counts (migration 2): no partition folds it.
const COUNTED_BEFORE: i32 = -1;

/// The projection tables, for `truncate`.
const TABLES: &[&str] = &[
    "apps",
    "app_by_client",
    "app_by_key",
    "devices",
    "app_devices",
    "inbox_heads",
    "inbox",
    "messages",
    "payloads",
    "presence",
    "idempotency",
    "collapse",
    "app_device_counts",
    "progress",
];

fn exec(e: ExecutionError) -> StoreError {
    // What the caller got wrong stays an error; everything else (no connection, a
    // timeout, an overloaded or bootstrapping node) is worth retrying.
    match &e {
        ExecutionError::BadQuery(_) | ExecutionError::PrepareError(_) => {
            StoreError::Storage(e.to_string())
        }
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::SyntaxError
            | DbError::Invalid
            | DbError::ConfigError
            | DbError::Unauthorized
            | DbError::AuthenticationError
            | DbError::AlreadyExists { .. },
            _,
        )) => StoreError::Storage(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn corrupt(table: &'static str) -> impl Fn(String) -> StoreError {
    move |reason| StoreError::Corrupt {
        keyspace: table,
        reason,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn limit(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX).max(1)
}

/// The journal of one commit: the batch (`&Writes` when written, `Writes` when read
/// back), and the checkpoint it leads to.
#[derive(Serialize, Deserialize)]
struct Journal<W> {
    next: u64,
    writes: W,
}

/// Connects, creates the keyspace and applies every migration not applied yet; returns
/// the versions it applied (none when the schema is current).
pub async fn migrate(config: &CqlConfig) -> Result<Vec<i32>, StoreError> {
    let session = connect(config).await?;
    migrate_on(&session, config).await
}

async fn connect(config: &CqlConfig) -> Result<Session, StoreError> {
    if !valid_keyspace(&config.keyspace) {
        return Err(StoreError::Storage(format!(
            "cql_keyspace {:?} is not a valid keyspace name (a letter, then letters, digits or _; at most 48)",
            config.keyspace
        )));
    }
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency.driver())
        .serial_consistency(Some(config.consistency.serial()))
        .request_timeout(Some(config.request_timeout))
        .build()
        .into_handle();
    SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(config.request_timeout)
        .default_execution_profile_handle(profile)
        .build()
        .await
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to the CQL store at {}: {e}",
                config.nodes.join(",")
            ))
        })
}

async fn migrate_on(session: &Session, config: &CqlConfig) -> Result<Vec<i32>, StoreError> {
    let ks = &config.keyspace;
    let ddl = |s: String| async move {
        session.query_unpaged(s, ()).await.map_err(exec)?;
        session
            .await_schema_agreement()
            .await
            .map_err(|e| StoreError::Unavailable(format!("schema agreement: {e}")))?;
        Ok::<_, StoreError>(())
    };
    ddl(format!(
        "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': {}}}",
        config.replication_factor
    ))
    .await?;
    ddl(format!(
        "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (version int PRIMARY KEY, description text, applied_ms bigint)"
    ))
    .await?;
    let rows = session
        .query_unpaged(format!("SELECT version FROM {ks}.schema_migrations"), ())
        .await
        .map_err(exec)?
        .into_rows_result()
        .map_err(|e| corrupt("schema_migrations")(e.to_string()))?;
    let mut done = Vec::new();
    for r in rows
        .rows::<(i32,)>()
        .map_err(|e| corrupt("schema_migrations")(e.to_string()))?
    {
        done.push(
            r.map_err(|e| corrupt("schema_migrations")(e.to_string()))?
                .0,
        );
    }
    if let Some(newer) = done
        .iter()
        .find(|v| !MIGRATIONS.iter().any(|(m, _, _)| m == *v))
    {
        return Err(StoreError::Storage(format!(
            "the CQL keyspace {ks} has schema version {newer}, which this herald does not know: it was migrated by a newer herald"
        )));
    }
    let mut applied = Vec::new();
    for (version, description, statements) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        for s in *statements {
            ddl(s.replace("{ks}", ks)).await?;
        }
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.schema_migrations (version, description, applied_ms) VALUES (?, ?, ?)"
                ),
                (*version, *description, as_i64(now_ms())),
            )
            .await
            .map_err(exec)?;
        if *version == 2 {
            count_devices_held(session, ks).await?;
        }
        tracing::info!(keyspace = %ks, version, description, "applied a CQL migration");
        applied.push(*version);
    }
    Ok(applied)
}

/// Counts the devices of each app the keyspace already holds into the app's
/// [`COUNTED_BEFORE`] row (migration 2, once). Rows of one app come together: `app_id` is
/// the partition key of `app_devices`.
async fn count_devices_held(session: &Session, ks: &str) -> Result<(), StoreError> {
    use futures::StreamExt;
    let pager = session
        .query_iter(format!("SELECT app_id FROM {ks}.app_devices"), ())
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let mut rows = pager
        .rows_stream::<(String,)>()
        .map_err(|e| corrupt("app_devices")(e.to_string()))?;
    let mut totals: std::collections::BTreeMap<String, i64> = Default::default();
    while let Some(r) = rows.next().await {
        let (app,) = r.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        *totals.entry(app).or_insert(0) += 1;
    }
    for (app, n) in &totals {
        session
            .query_unpaged(
                format!("INSERT INTO {ks}.app_device_counts (app_id, part, n) VALUES (?, ?, ?)"),
                (app, COUNTED_BEFORE, *n),
            )
            .await
            .map_err(exec)?;
    }
    Ok(())
}

/// The prepared statements.
struct Stmts {
    put_app: PreparedStatement,
    get_app: PreparedStatement,
    put_app_by_client: PreparedStatement,
    get_app_by_client: PreparedStatement,
    put_app_by_key: PreparedStatement,
    get_app_by_key: PreparedStatement,
    put_device: PreparedStatement,
    get_device: PreparedStatement,
    put_app_device: PreparedStatement,
    app_devices: PreparedStatement,
    put_head: PreparedStatement,
    get_head: PreparedStatement,
    put_entry: PreparedStatement,
    del_entry: PreparedStatement,
    get_entry: PreparedStatement,
    inbox_page: PreparedStatement,
    put_message: PreparedStatement,
    get_message: PreparedStatement,
    message_rows: PreparedStatement,
    all_apps: PreparedStatement,
    put_payload: PreparedStatement,
    get_payload: PreparedStatement,
    put_presence: PreparedStatement,
    get_presence: PreparedStatement,
    put_idempotency: PreparedStatement,
    get_idempotency: PreparedStatement,
    idempotency_rows: PreparedStatement,
    put_collapse: PreparedStatement,
    get_collapse: PreparedStatement,
    put_device_count: PreparedStatement,
    get_device_count: PreparedStatement,
    device_count_rows: PreparedStatement,
    progress: PreparedStatement,
    checkpoint: PreparedStatement,
    claim_first: PreparedStatement,
    claim: PreparedStatement,
    put_chunk: PreparedStatement,
    drop_chunks: PreparedStatement,
    drop_own_chunks: PreparedStatement,
    journal_complete: PreparedStatement,
    journal_chunks: PreparedStatement,
    advance: PreparedStatement,
}

impl Stmts {
    async fn prepare(
        session: &Session,
        ks: &str,
        consistency: CqlConsistency,
    ) -> Result<Self, StoreError> {
        let p = |cql: &str| {
            let cql = cql.replace("{ks}", ks);
            async move {
                session
                    .prepare(cql.clone())
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("cannot prepare {cql:?}: {e}")))
            }
        };
        // Reads of `progress` after a claim see every LWT before them (at the serial
        // level that goes with the configured consistency).
        let serial = match consistency.serial() {
            SerialConsistency::LocalSerial => Consistency::LocalSerial,
            _ => Consistency::Serial,
        };
        let mut progress = p("SELECT epoch, checkpoint, journal_next, journal_writer, journal_chunks FROM {ks}.progress WHERE part = ? LIMIT 1").await?;
        progress.set_consistency(serial);
        let mut journal_chunks =
            p("SELECT chunk, data FROM {ks}.progress WHERE part = ? AND writer = ? AND next = ? AND chunk < ?").await?;
        journal_chunks.set_consistency(serial);
        Ok(Stmts {
            put_app: p("INSERT INTO {ks}.apps (app_id, v) VALUES (?, ?) USING TIMESTAMP ?").await?,
            get_app: p("SELECT v FROM {ks}.apps WHERE app_id = ?").await?,
            put_app_by_client: p("INSERT INTO {ks}.app_by_client (client_id, app_id) VALUES (?, ?) USING TIMESTAMP ?").await?,
            get_app_by_client: p("SELECT app_id FROM {ks}.app_by_client WHERE client_id = ?").await?,
            put_app_by_key: p("INSERT INTO {ks}.app_by_key (app_key, app_id) VALUES (?, ?) USING TIMESTAMP ?").await?,
            get_app_by_key: p("SELECT app_id FROM {ks}.app_by_key WHERE app_key = ?").await?,
            put_device: p("INSERT INTO {ks}.devices (device_id, v) VALUES (?, ?) USING TIMESTAMP ?").await?,
            get_device: p("SELECT v FROM {ks}.devices WHERE device_id = ?").await?,
            put_app_device: p("INSERT INTO {ks}.app_devices (app_id, device_id) VALUES (?, ?) USING TIMESTAMP ?").await?,
            app_devices: p("SELECT device_id FROM {ks}.app_devices WHERE app_id = ? AND device_id > ? LIMIT ?").await?,
            put_head: p("INSERT INTO {ks}.inbox_heads (device_id, next_seq) VALUES (?, ?) USING TIMESTAMP ?").await?,
            get_head: p("SELECT next_seq FROM {ks}.inbox_heads WHERE device_id = ?").await?,
            put_entry: p("INSERT INTO {ks}.inbox (device_id, seq, v) VALUES (?, ?, ?) USING TIMESTAMP ? AND TTL ?").await?,
            del_entry: p("DELETE FROM {ks}.inbox USING TIMESTAMP ? WHERE device_id = ? AND seq = ?").await?,
            get_entry: p("SELECT v FROM {ks}.inbox WHERE device_id = ? AND seq = ?").await?,
            inbox_page: p("SELECT v FROM {ks}.inbox WHERE device_id = ? AND seq > ? LIMIT ?").await?,
            put_message: p("INSERT INTO {ks}.messages (message_id, part, v) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
            get_message: p("SELECT v FROM {ks}.messages WHERE message_id = ? AND part = ?").await?,
            message_rows: p("SELECT v FROM {ks}.messages WHERE message_id = ?").await?,
            all_apps: p("SELECT v FROM {ks}.apps LIMIT ?").await?,
            put_payload: p("INSERT INTO {ks}.payloads (message_id, v) VALUES (?, ?) USING TIMESTAMP ?").await?,
            get_payload: p("SELECT v FROM {ks}.payloads WHERE message_id = ?").await?,
            put_presence: p("INSERT INTO {ks}.presence (device_id, v) VALUES (?, ?) USING TIMESTAMP ?").await?,
            get_presence: p("SELECT v FROM {ks}.presence WHERE device_id = ?").await?,
            put_idempotency: p("INSERT INTO {ks}.idempotency (app_id, key, part, v) VALUES (?, ?, ?, ?) USING TIMESTAMP ?").await?,
            get_idempotency: p("SELECT v FROM {ks}.idempotency WHERE app_id = ? AND key = ? AND part = ?").await?,
            idempotency_rows: p("SELECT v FROM {ks}.idempotency WHERE app_id = ? AND key = ?").await?,
            put_collapse: p("INSERT INTO {ks}.collapse (device_id, collapse_key, seq) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
            get_collapse: p("SELECT seq FROM {ks}.collapse WHERE device_id = ? AND collapse_key = ?").await?,
            put_device_count: p("INSERT INTO {ks}.app_device_counts (app_id, part, n) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
            get_device_count: p("SELECT n FROM {ks}.app_device_counts WHERE app_id = ? AND part = ?").await?,
            device_count_rows: p("SELECT n FROM {ks}.app_device_counts WHERE app_id = ?").await?,
            progress,
            checkpoint: p("SELECT checkpoint FROM {ks}.progress WHERE part = ? LIMIT 1").await?,
            claim_first: p("UPDATE {ks}.progress SET epoch = ?, checkpoint = 0 WHERE part = ? IF epoch = null").await?,
            claim: p("UPDATE {ks}.progress SET epoch = ? WHERE part = ? IF epoch = ?").await?,
            put_chunk: p("INSERT INTO {ks}.progress (part, writer, next, chunk, data) VALUES (?, ?, ?, ?, ?)").await?,
            drop_chunks: p("DELETE FROM {ks}.progress WHERE part = ? AND writer < ?").await?,
            drop_own_chunks: p("DELETE FROM {ks}.progress WHERE part = ? AND writer = ? AND next <= ?").await?,
            journal_complete: p("UPDATE {ks}.progress SET journal_next = ?, journal_writer = ?, journal_chunks = ? WHERE part = ? IF epoch = ?").await?,
            journal_chunks,
            advance: p("UPDATE {ks}.progress SET checkpoint = ?, journal_next = null WHERE part = ? IF epoch = ?").await?,
        })
    }
}

/// What a partition's `progress` row says.
struct Progress {
    epoch: Option<i64>,
    checkpoint: u64,
    journal_next: Option<u64>,
    journal_writer: i64,
    journal_chunks: i32,
}

/// A partition this process writes: its epoch and the checkpoint it last committed.
#[derive(Debug, Clone, Copy)]
struct Owned {
    epoch: i64,
    checkpoint: u64,
}

struct Inner {
    session: Session,
    s: Stmts,
    keyspace: String,
    owned: Mutex<HashMap<u32, Owned>>,
    /// Partitions another writer took from this process.
    fenced: Mutex<std::collections::HashSet<u32>>,
}

/// The CQL-backed [`Store`].
pub struct CqlStore {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlStore")
            .field("keyspace", &self.inner.keyspace)
            .finish_non_exhaustive()
    }
}

impl Drop for CqlStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks; this may be dropped inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl CqlStore {
    /// Connects to the CQL servers of `config`, applies the migrations and prepares the
    /// statements. Blocks the caller (call it from a blocking thread or outside a
    /// runtime).
    pub fn connect(config: &CqlConfig) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("herald-cql")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Storage(format!("cannot start the CQL runtime: {e}")))?;
        let config = config.clone();
        let inner = block(&runtime, async move {
            let session = connect(&config).await?;
            migrate_on(&session, &config).await?;
            let s = Stmts::prepare(&session, &config.keyspace, config.consistency).await?;
            Ok(Arc::new(Inner {
                session,
                s,
                keyspace: config.keyspace.clone(),
                owned: Mutex::new(HashMap::new()),
                fenced: Mutex::new(Default::default()),
            }))
        });
        let inner = match inner {
            Ok(inner) => inner,
            Err(e) => {
                // Dropping a runtime blocks, which a caller inside another may not do.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        Ok(CqlStore {
            inner,
            runtime: Some(runtime),
        })
    }

    /// Runs `f` on the store's runtime and waits for it.
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let Some(rt) = &self.runtime else {
            return Err(StoreError::Storage("the CQL store is closed".into()));
        };
        let fut = f(self.inner.clone());
        // Called from a task of a multi-thread runtime (an API handler), the wait moves
        // that runtime's other tasks to another thread instead of stalling them.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| block(rt, fut))
            }
            _ => block(rt, fut),
        }
    }

    /// The keyspace.
    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    /// Empties every table of the keyspace (for a rebuild into it). Every node must be
    /// up.
    pub fn truncate(&self) -> Result<(), StoreError> {
        self.run(|i| async move {
            for t in TABLES {
                i.session
                    .query_unpaged(format!("TRUNCATE {}.{t}", i.keyspace), ())
                    .await
                    .map_err(exec)?;
            }
            lock(&i.owned).clear();
            Ok(())
        })
    }

    /// What a worker killed in the middle of a commit leaves: the journal of `writes`
    /// written and marked complete, not one row of them, the checkpoint not advanced.
    /// For tests of the recovery in [`Store::take_partition`].
    #[doc(hidden)]
    pub fn write_journal_only(
        &self,
        writes: &Writes,
        partition: u32,
        next: u64,
    ) -> Result<(), StoreError> {
        let w = writes.clone();
        self.run(move |i| async move {
            let owned = i.owned(partition).await?;
            i.write_journal(&w, partition, next, owned.epoch).await
        })
    }

    /// Reads the whole state into memory (for digests and tests), in pages.
    pub fn to_mem_state(&self) -> Result<MemState, StoreError> {
        self.run(|i| async move { i.to_mem_state().await })
    }

    /// The digest of each projection at `now_ms` ([`crate::digest::digests`]), the same
    /// as the embedded store's for the same state.
    pub fn digests(&self, now_ms: u64) -> Result<Vec<crate::digest::Digest>, StoreError> {
        Ok(crate::digest::digests(&self.to_mem_state()?, now_ms))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn block<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let task = rt.spawn(fut);
    futures::executor::block_on(task)
        .map_err(|e| StoreError::Storage(format!("a CQL request task failed: {e}")))?
}

/// For fault tests (feature `crash-point`): with `HERALD_CQL_CRASH_FILE` naming a file, a
/// commit that finds the file there aborts the process right after its journal is
/// complete, before any row is written: what a kill -9 in the middle of a commit leaves
/// for the next writer.
#[cfg(feature = "crash-point")]
fn crash_point(partition: u32) {
    static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let file = FILE.get_or_init(|| std::env::var_os("HERALD_CQL_CRASH_FILE").map(Into::into));
    if let Some(f) = file
        && f.exists()
    {
        eprintln!(
            "herald: crash point: aborting after partition {partition}'s journal ({} exists)",
            f.display()
        );
        std::process::abort();
    }
}

#[cfg(not(feature = "crash-point"))]
fn crash_point(_partition: u32) {}

type Op<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// Runs writes, at most [`MAX_WRITES_IN_FLIGHT`] at once; the first error stops them.
async fn run_all(ops: Vec<Op<'_>>) -> Result<(), StoreError> {
    futures::stream::iter(ops)
        .buffer_unordered(MAX_WRITES_IN_FLIGHT)
        .try_for_each(|()| async { Ok(()) })
        .await
}

impl Inner {
    async fn rows<T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>>(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        table: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let result = self
            .session
            .execute_unpaged(stmt, values)
            .await
            .map_err(exec)?
            .into_rows_result()
            .map_err(|e| corrupt(table)(e.to_string()))?;
        let mut out = Vec::new();
        for r in result
            .rows::<T>()
            .map_err(|e| corrupt(table)(e.to_string()))?
        {
            out.push(r.map_err(|e| corrupt(table)(e.to_string()))?);
        }
        Ok(out)
    }

    async fn one<T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>>(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        table: &'static str,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.rows(stmt, values, table).await?.into_iter().next())
    }

    async fn blob<T: DeserializeOwned>(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        table: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.one::<(Vec<u8>,)>(stmt, values, table).await? {
            Some((v,)) => Ok(Some(decode(table, &v)?)),
            None => Ok(None),
        }
    }

    async fn blobs<T: DeserializeOwned>(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        table: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        self.rows::<(Vec<u8>,)>(stmt, values, table)
            .await?
            .iter()
            .map(|(v,)| decode(table, v))
            .collect()
    }

    /// One write, to run with others in [`run_all`].
    fn op<'a>(
        &'a self,
        stmt: &'a PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow + Send + 'a,
    ) -> Op<'a> {
        Box::pin(async move {
            self.session
                .execute_unpaged(stmt, values)
                .await
                .map_err(exec)?;
            Ok(())
        })
    }

    /// Runs an LWT; whether it applied.
    async fn lwt(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<bool, StoreError> {
        let row = self.one::<Row>(stmt, values, "progress").await?;
        match row.and_then(|r| r.columns.into_iter().next().flatten()) {
            Some(CqlValue::Boolean(applied)) => Ok(applied),
            other => Err(corrupt("progress")(format!(
                "an LWT answered {other:?}, not [applied]"
            ))),
        }
    }

    async fn progress(&self, partition: u32) -> Result<Progress, StoreError> {
        type R = (
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i32>,
        );
        let row = self
            .one::<R>(&self.s.progress, (partition as i32,), "progress")
            .await?;
        let (epoch, checkpoint, journal_next, journal_writer, journal_chunks) =
            row.unwrap_or_default();
        Ok(Progress {
            epoch,
            checkpoint: checkpoint.map(as_u64).unwrap_or(0),
            journal_next: journal_next.map(as_u64),
            journal_writer: journal_writer.unwrap_or(0),
            journal_chunks: journal_chunks.unwrap_or(0),
        })
    }

    async fn checkpoint(&self, partition: u32) -> Result<u64, StoreError> {
        let row = self
            .one::<(Option<i64>,)>(&self.s.checkpoint, (partition as i32,), "progress")
            .await?;
        Ok(row.and_then(|(c,)| c).map(as_u64).unwrap_or(0))
    }

    /// Raises the partition's epoch (this process writes it from now on), then finishes
    /// a commit an earlier writer left with a complete journal.
    async fn take_partition(&self, partition: u32) -> Result<u64, StoreError> {
        let part = partition as i32;
        // Claim first, then read: once the epoch is ours no earlier writer can complete a
        // journal (its LWT names its own epoch), and the claim's Paxos round finishes any
        // of its proposals still in flight, so the read sees every journal there will be.
        let epoch = loop {
            let seen = self.progress(partition).await?.epoch;
            let next = seen.unwrap_or(0) + 1;
            let applied = match seen {
                None => self.lwt(&self.s.claim_first, (next, part)).await?,
                Some(e) => self.lwt(&self.s.claim, (next, part, e)).await?,
            };
            if applied {
                break next;
            }
            // Another worker claimed it at the same moment: read again and outbid it
            // (the group decides who keeps it; the loser is fenced at its next commit).
        };
        let progress = self.progress(partition).await?;
        if progress.epoch != Some(epoch) {
            // Outbid between the claim and the read: the newer writer recovers.
            lock(&self.fenced).insert(partition);
            return Err(StoreError::Fenced { partition });
        }
        let mut checkpoint = progress.checkpoint;
        if let Some(next) = progress.journal_next.filter(|n| *n > checkpoint) {
            let chunks = self
                .rows::<(i32, Vec<u8>)>(
                    &self.s.journal_chunks,
                    (
                        part,
                        progress.journal_writer,
                        as_i64(next),
                        progress.journal_chunks,
                    ),
                    "progress",
                )
                .await?;
            if chunks.len() != usize::try_from(progress.journal_chunks).unwrap_or(0) {
                // A replica that has not seen every chunk yet: ask again later.
                return Err(StoreError::Unavailable(format!(
                    "partition {partition}'s journal has {} of its {} chunks",
                    chunks.len(),
                    progress.journal_chunks
                )));
            }
            let bytes: Vec<u8> = chunks.into_iter().flat_map(|(_, d)| d).collect();
            let journal: Journal<Writes> = decode("progress", &bytes)?;
            if journal.next != next {
                return Err(corrupt("progress")(format!(
                    "partition {partition}'s journal leads to {}, its marker to {next}",
                    journal.next
                )));
            }
            tracing::info!(
                partition,
                from = checkpoint,
                next,
                "finishing a commit the partition's last writer left half done"
            );
            self.write_rows(&journal.writes, partition, next).await?;
            self.fenced_lwt(&self.s.advance, (as_i64(next), part, epoch), partition)
                .await?;
            checkpoint = next;
        }
        // Journals of earlier writers are done with (this one's, each as it finishes).
        self.session
            .execute_unpaged(&self.s.drop_chunks, (part, epoch))
            .await
            .map_err(exec)?;
        lock(&self.owned).insert(partition, Owned { epoch, checkpoint });
        lock(&self.fenced).remove(&partition);
        tracing::debug!(
            partition,
            epoch,
            checkpoint,
            "took a partition of the CQL store"
        );
        Ok(checkpoint)
    }

    /// This process's hold on `partition`, taking it first if it has none. A partition
    /// this process was fenced from stays refused until it is taken again explicitly
    /// ([`Store::take_partition`]): a retried commit must not fence the rightful owner.
    async fn owned(&self, partition: u32) -> Result<Owned, StoreError> {
        if lock(&self.fenced).contains(&partition) {
            return Err(StoreError::Fenced { partition });
        }
        let held = lock(&self.owned).get(&partition).copied();
        match held {
            Some(o) => Ok(o),
            None => {
                self.take_partition(partition).await?;
                let held = lock(&self.owned).get(&partition).copied();
                held.ok_or(StoreError::Fenced { partition })
            }
        }
    }

    /// Runs an LWT of `partition` that must apply while this process holds `epoch`; if
    /// it does not, the partition was taken over.
    async fn fenced_lwt(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        partition: u32,
    ) -> Result<(), StoreError> {
        if self.lwt(stmt, values).await? {
            return Ok(());
        }
        lock(&self.owned).remove(&partition);
        lock(&self.fenced).insert(partition);
        Err(StoreError::Fenced { partition })
    }

    /// Step 1 of a commit: the batch as journal chunks, then the LWT that marks them a
    /// complete journal leading to `next`.
    async fn write_journal(
        &self,
        w: &Writes,
        partition: u32,
        next: u64,
        epoch: i64,
    ) -> Result<(), StoreError> {
        let part = partition as i32;
        let journal = encode(&Journal { next, writes: w });
        let chunks: Vec<&[u8]> = journal.chunks(JOURNAL_CHUNK_BYTES).collect();
        // Under the writer's epoch and the journal's end: a writer fenced a moment ago,
        // writing its next journal, cannot overwrite the chunks of the one its successor
        // may be reading (a retry of the same batch writes the same bytes).
        let ops = chunks
            .iter()
            .enumerate()
            .map(|(n, chunk)| {
                self.op(
                    &self.s.put_chunk,
                    (part, epoch, as_i64(next), n as i32, *chunk),
                )
            })
            .collect();
        run_all(ops).await?;
        let n = i32::try_from(chunks.len()).unwrap_or(i32::MAX);
        self.fenced_lwt(
            &self.s.journal_complete,
            (as_i64(next), epoch, n, part, epoch),
            partition,
        )
        .await
    }

    async fn commit(&self, w: Writes, partition: u32, next: u64) -> Result<(), StoreError> {
        let owned = self.owned(partition).await?;
        assert!(
            next >= owned.checkpoint,
            "checkpoint must not go back ({next} < {})",
            owned.checkpoint
        );
        let empty = w == Writes::default();
        if !empty {
            self.write_journal(&w, partition, next, owned.epoch).await?;
            crash_point(partition);
            self.write_rows(&w, partition, next).await?;
        }
        if next > owned.checkpoint || !empty {
            self.fenced_lwt(
                &self.s.advance,
                (as_i64(next), partition as i32, owned.epoch),
                partition,
            )
            .await?;
            if let Some(o) = lock(&self.owned).get_mut(&partition) {
                o.checkpoint = next;
            }
            if !empty {
                // The journal is done with; a failed delete leaves rows that the next
                // take of the partition deletes.
                if let Err(e) = self
                    .session
                    .execute_unpaged(
                        &self.s.drop_own_chunks,
                        (partition as i32, owned.epoch, as_i64(next)),
                    )
                    .await
                {
                    tracing::debug!(partition, error = %e, "cannot delete a finished journal");
                }
            }
        }
        Ok(())
    }

    /// Writes every row of a batch of `partition` that leads to checkpoint `next`, with
    /// `next` as the write timestamp.
    ///
    /// In three waves, each after the one before has landed, because readers take a
    /// batch's rows as they come (only folds wait for the checkpoint): payloads, then
    /// inbox entries, then everything else. A gateway that reads a device's head and then
    /// its inbox finds every entry below the head, and a visible entry's payload.
    async fn write_rows(&self, w: &Writes, partition: u32, next: u64) -> Result<(), StoreError> {
        let ts = as_i64(next);
        let part = partition as i32;
        let now = now_ms();
        let s = &self.s;
        let (mut payloads, mut entries, mut rest): (Vec<Op<'_>>, Vec<Op<'_>>, Vec<Op<'_>>) =
            Default::default();
        macro_rules! op {
            ($wave:ident, $stmt:expr, $values:expr) => {
                $wave.push(self.op($stmt, $values))
            };
        }
        for (k, v) in &w.payloads {
            op!(payloads, &s.put_payload, (k, encode(v), ts));
        }
        for ((d, seq), e) in &w.entries {
            let seq = as_i64(*seq);
            match e {
                Some(e) => op!(
                    entries,
                    &s.put_entry,
                    (d, seq, encode(e), ts, inbox_ttl_s(e, now))
                ),
                None => op!(entries, &s.del_entry, (ts, d, seq)),
            }
        }
        for (k, v) in &w.apps {
            op!(rest, &s.put_app, (k, encode(v), ts));
        }
        for (k, v) in &w.app_by_client {
            op!(rest, &s.put_app_by_client, (k, v, ts));
        }
        for (k, v) in &w.app_by_key {
            op!(rest, &s.put_app_by_key, (k, v, ts));
        }
        for (k, v) in &w.devices {
            op!(rest, &s.put_device, (k, encode(v), ts));
        }
        for (a, d) in &w.app_devices {
            op!(rest, &s.put_app_device, (a, d, ts));
        }
        for (k, v) in &w.heads {
            op!(rest, &s.put_head, (k, as_i64(v.next_seq), ts));
        }
        for (k, v) in &w.messages {
            op!(rest, &s.put_message, (k, part, encode(v), ts));
        }
        for (k, v) in &w.presence {
            op!(rest, &s.put_presence, (k, encode(v), ts));
        }
        for ((a, k), v) in &w.idempotency {
            op!(rest, &s.put_idempotency, (a, k, part, encode(v), ts));
        }
        for ((d, k), v) in &w.collapse {
            op!(rest, &s.put_collapse, (d, k, as_i64(*v), ts));
        }
        for (a, n) in &w.app_device_counts {
            op!(rest, &s.put_device_count, (a, part, as_i64(*n), ts));
        }
        run_all(payloads).await?;
        run_all(entries).await?;
        run_all(rest).await
    }

    async fn to_mem_state(&self) -> Result<MemState, StoreError> {
        let ks = &self.keyspace;
        let mut s = MemState::default();
        macro_rules! scan {
            ($cql:expr, $t:ty, $table:expr, |$row:ident| $body:block) => {{
                let pager = self
                    .session
                    .query_iter(format!($cql, ks = ks), ())
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                let mut rows = pager
                    .rows_stream::<$t>()
                    .map_err(|e| corrupt($table)(e.to_string()))?;
                while let Some(r) = rows.next().await {
                    let $row = r.map_err(|e| StoreError::Unavailable(e.to_string()))?;
                    $body
                }
            }};
        }
        scan!(
            "SELECT app_id, v FROM {ks}.apps",
            (String, Vec<u8>),
            "apps",
            |r| {
                s.apps.insert(r.0, decode::<App>("apps", &r.1)?);
            }
        );
        scan!(
            "SELECT client_id, app_id FROM {ks}.app_by_client",
            (String, String),
            "app_by_client",
            |r| {
                s.app_by_client.insert(r.0, r.1);
            }
        );
        scan!(
            "SELECT app_key, app_id FROM {ks}.app_by_key",
            (String, String),
            "app_by_key",
            |r| {
                s.app_by_key.insert(r.0, r.1);
            }
        );
        scan!(
            "SELECT device_id, v FROM {ks}.devices",
            (String, Vec<u8>),
            "devices",
            |r| {
                s.devices.insert(r.0, decode::<Device>("devices", &r.1)?);
            }
        );
        scan!(
            "SELECT app_id, device_id FROM {ks}.app_devices",
            (String, String),
            "app_devices",
            |r| {
                s.app_devices.insert(r);
            }
        );
        scan!(
            "SELECT device_id, next_seq FROM {ks}.inbox_heads",
            (String, i64),
            "inbox_heads",
            |r| {
                s.heads.insert(
                    r.0,
                    InboxHead {
                        next_seq: as_u64(r.1),
                    },
                );
            }
        );
        scan!(
            "SELECT device_id, seq, v FROM {ks}.inbox",
            (String, i64, Vec<u8>),
            "inbox",
            |r| {
                s.entries
                    .insert((r.0, as_u64(r.1)), decode::<InboxEntry>("inbox", &r.2)?);
            }
        );
        scan!(
            "SELECT message_id, part, v FROM {ks}.messages",
            (String, i32, Vec<u8>),
            "messages",
            |r| {
                s.messages.insert(
                    (r.0, r.1 as u32),
                    decode::<MessageStatus>("messages", &r.2)?,
                );
            }
        );
        scan!(
            "SELECT message_id, v FROM {ks}.payloads",
            (String, Vec<u8>),
            "payloads",
            |r| {
                s.payloads.insert(r.0, decode::<Payload>("payloads", &r.1)?);
            }
        );
        scan!(
            "SELECT device_id, v FROM {ks}.presence",
            (String, Vec<u8>),
            "presence",
            |r| {
                s.presence
                    .insert(r.0, decode::<Presence>("presence", &r.1)?);
            }
        );
        scan!(
            "SELECT app_id, key, part, v FROM {ks}.idempotency",
            (String, String, i32, Vec<u8>),
            "idempotency",
            |r| {
                s.idempotency.insert(
                    (r.0, r.1, r.2 as u32),
                    decode::<IdempotencyRecord>("idempotency", &r.3)?,
                );
            }
        );
        scan!(
            "SELECT device_id, collapse_key, seq FROM {ks}.collapse",
            (String, String, i64),
            "collapse",
            |r| {
                s.collapse.insert((r.0, r.1), as_u64(r.2));
            }
        );
        scan!(
            "SELECT app_id, part, n FROM {ks}.app_device_counts",
            (String, i32, i64),
            "app_device_counts",
            |r| {
                // part -1 (the devices counted at migration 2) is u32::MAX, as in the
                // embedded store.
                s.app_device_counts.insert((r.0, r.1 as u32), as_u64(r.2));
            }
        );
        scan!(
            "SELECT DISTINCT part, checkpoint FROM {ks}.progress",
            (i32, Option<i64>),
            "progress",
            |r| {
                if let Some(c) = r.1 {
                    s.checkpoints.insert(r.0 as u32, as_u64(c));
                }
            }
        );
        Ok(s)
    }
}

impl View for CqlStore {
    fn app(&self, app_id: &str) -> Result<Option<App>, StoreError> {
        let k = app_id.to_owned();
        self.run(|i| async move { i.blob(&i.s.get_app, (k,), "apps").await })
    }
    fn app_id_by_client(&self, client_id: &str) -> Result<Option<String>, StoreError> {
        let k = client_id.to_owned();
        self.run(|i| async move {
            let r = i
                .one::<(String,)>(&i.s.get_app_by_client, (k,), "app_by_client")
                .await?;
            Ok(r.map(|(a,)| a))
        })
    }
    fn app_id_by_key(&self, app_key: &str) -> Result<Option<String>, StoreError> {
        let k = app_key.to_owned();
        self.run(|i| async move {
            let r = i
                .one::<(String,)>(&i.s.get_app_by_key, (k,), "app_by_key")
                .await?;
            Ok(r.map(|(a,)| a))
        })
    }
    fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        let k = device_id.to_owned();
        self.run(|i| async move { i.blob(&i.s.get_device, (k,), "devices").await })
    }
    fn app_devices(
        &self,
        app_id: &str,
        after: Option<&str>,
        limit_n: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (a, after) = (app_id.to_owned(), after.unwrap_or("").to_owned());
        self.run(|i| async move {
            let rows = i
                .rows::<(String,)>(&i.s.app_devices, (a, after, limit(limit_n)), "app_devices")
                .await?;
            Ok(rows.into_iter().map(|(d,)| d).collect())
        })
    }
    fn inbox_head(&self, device_id: &str) -> Result<InboxHead, StoreError> {
        let k = device_id.to_owned();
        self.run(|i| async move {
            let r = i
                .one::<(Option<i64>,)>(&i.s.get_head, (k,), "inbox_heads")
                .await?;
            Ok(match r.and_then(|(n,)| n) {
                Some(n) => InboxHead {
                    next_seq: as_u64(n),
                },
                None => InboxHead::default(),
            })
        })
    }
    fn inbox_entry(&self, device_id: &str, seq: u64) -> Result<Option<InboxEntry>, StoreError> {
        let k = device_id.to_owned();
        self.run(move |i| async move { i.blob(&i.s.get_entry, (k, as_i64(seq)), "inbox").await })
    }
    fn message(
        &self,
        message_id: &str,
        partition: u32,
    ) -> Result<Option<MessageStatus>, StoreError> {
        let k = message_id.to_owned();
        self.run(move |i| async move {
            i.blob(&i.s.get_message, (k, partition as i32), "messages")
                .await
        })
    }
    fn presence(&self, device_id: &str) -> Result<Option<Presence>, StoreError> {
        let k = device_id.to_owned();
        self.run(|i| async move { i.blob(&i.s.get_presence, (k,), "presence").await })
    }
    fn idempotency(
        &self,
        app_id: &str,
        key: &str,
        partition: u32,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let (a, k) = (app_id.to_owned(), key.to_owned());
        self.run(move |i| async move {
            i.blob(
                &i.s.get_idempotency,
                (a, k, partition as i32),
                "idempotency",
            )
            .await
        })
    }
    fn collapse(&self, device_id: &str, collapse_key: &str) -> Result<Option<u64>, StoreError> {
        let (d, k) = (device_id.to_owned(), collapse_key.to_owned());
        self.run(|i| async move {
            let r = i
                .one::<(Option<i64>,)>(&i.s.get_collapse, (d, k), "collapse")
                .await?;
            Ok(r.and_then(|(s,)| s).map(as_u64))
        })
    }
    fn app_device_count(&self, app_id: &str, partition: u32) -> Result<u64, StoreError> {
        let a = app_id.to_owned();
        self.run(move |i| async move {
            let r = i
                .one::<(Option<i64>,)>(
                    &i.s.get_device_count,
                    (a, partition as i32),
                    "app_device_counts",
                )
                .await?;
            Ok(r.and_then(|(n,)| n).map_or(0, as_u64))
        })
    }
}

impl Store for CqlStore {
    fn commit(&self, writes: &Writes, partition: u32, next_offset: u64) -> Result<(), StoreError> {
        let w = writes.clone();
        self.run(move |i| async move { i.commit(w, partition, next_offset).await })
    }

    fn checkpoint(&self, partition: u32) -> Result<u64, StoreError> {
        self.run(move |i| async move { i.checkpoint(partition).await })
    }

    fn checkpoints(&self, count: u32) -> Result<Vec<u64>, StoreError> {
        self.run(move |i| async move {
            futures::future::try_join_all((0..count).map(|p| i.checkpoint(p))).await
        })
    }

    fn take_partition(&self, partition: u32) -> Result<u64, StoreError> {
        self.run(move |i| async move { i.take_partition(partition).await })
    }

    fn idempotency_record(
        &self,
        app_id: &str,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let (a, k) = (app_id.to_owned(), key.to_owned());
        self.run(move |i| async move {
            let rows = i
                .blobs(&i.s.idempotency_rows, (a, k), "idempotency")
                .await?;
            Ok(crate::model::earliest(rows, now_ms))
        })
    }

    fn apps(&self, limit_n: usize) -> Result<Vec<App>, StoreError> {
        self.run(|i| async move { i.blobs(&i.s.all_apps, (limit(limit_n),), "apps").await })
    }

    fn app_device_total(&self, app_id: &str) -> Result<u64, StoreError> {
        let a = app_id.to_owned();
        self.run(|i| async move {
            let rows = i
                .rows::<(Option<i64>,)>(&i.s.device_count_rows, (a,), "app_device_counts")
                .await?;
            Ok(rows.into_iter().filter_map(|(n,)| n).map(as_u64).sum())
        })
    }

    fn message_status(&self, message_id: &str) -> Result<Option<MessageStatus>, StoreError> {
        let k = message_id.to_owned();
        self.run(|i| async move {
            let rows = i.blobs(&i.s.message_rows, (k,), "messages").await?;
            Ok(crate::model::merge_rows(rows))
        })
    }

    fn inbox_page(
        &self,
        device_id: &str,
        after_seq: u64,
        limit_n: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        if after_seq >= i64::MAX as u64 {
            return Ok(Vec::new());
        }
        let k = device_id.to_owned();
        self.run(move |i| async move {
            i.blobs(
                &i.s.inbox_page,
                (k, as_i64(after_seq), limit(limit_n)),
                "inbox",
            )
            .await
        })
    }

    fn payload(&self, message_id: &str) -> Result<Option<Payload>, StoreError> {
        let k = message_id.to_owned();
        self.run(|i| async move { i.blob(&i.s.get_payload, (k,), "payloads").await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_levels_and_keyspace_names_are_checked() {
        assert_eq!(
            "LOCAL_QUORUM".parse::<CqlConsistency>(),
            Ok(CqlConsistency::LocalQuorum)
        );
        assert!("twice".parse::<CqlConsistency>().is_err());
        assert!(valid_keyspace("herald_1"));
        for bad in ["", "1herald", "her-ald", "h;drop", &"k".repeat(49)] {
            assert!(!valid_keyspace(bad), "{bad}");
        }
    }

    #[test]
    fn a_journal_round_trips_with_tuple_keys() {
        let mut w = Writes::default();
        w.entries.insert(("d".into(), 3), None);
        w.collapse.insert(("d".into(), "k".into()), 3);
        w.app_devices.insert(("a".into(), "d".into()));
        let j: Journal<Writes> = serde_json::from_slice(&encode(&Journal {
            next: 9,
            writes: &w,
        }))
        .expect("decodes");
        assert_eq!((j.next, j.writes), (9, w));
    }
}
