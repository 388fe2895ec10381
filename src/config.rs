//! herald's one typed configuration: defaults, then the config file, then `HERALD_*`
//! environment variables and command-line flags (flags win). Validated at start-up with
//! errors that name the key. `herald.example.toml` documents every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use herald_gateway::KeepAlivePolicy;
use herald_projections::settings::{CqlConsistency, valid_keyspace};
use serde::Deserialize;

/// The settings file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Where the log and projections live.
    pub data_dir: Option<PathBuf>,
    /// REST API listen address.
    pub http_addr: Option<SocketAddr>,
    /// MQTT listen address.
    pub mqtt_addr: Option<SocketAddr>,
    /// MQTT over WebSocket listen address.
    pub ws_addr: Option<SocketAddr>,
    /// PEM certificate chain: TLS on the MQTT and WebSocket listeners.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The keep-alive suggested per network type, in seconds.
    pub keep_alive: Option<BTreeMap<String, u16>>,
    /// No keep-alive is shorter, in seconds.
    pub keep_alive_min_s: Option<u16>,
    /// No keep-alive is longer, in seconds.
    pub keep_alive_max_s: Option<u16>,
    /// Most unacknowledged QoS 1/2 PUBLISHes a device may send (MQTT 5 Receive Maximum).
    pub receive_maximum: Option<u16>,
    /// The admin bearer token.
    pub admin_token: Option<String>,
    /// The payload key, 32 bytes in base64.
    pub payload_key: Option<String>,
    /// The MQTT address devices are told to use.
    pub advertised_mqtt: Option<String>,
    /// The WebSocket address devices are told to use.
    pub advertised_ws: Option<String>,
    /// This gateway's id in events.
    pub gateway_id: Option<String>,
    /// Lifetime of app tokens.
    pub token_ttl_s: Option<u64>,
    /// Lifetime of an admin console session.
    pub admin_session_ttl_s: Option<u64>,
    /// Whether this process records metrics (on by default).
    pub metrics: Option<bool>,
    /// Largest push `data`, in bytes.
    pub max_data_bytes: Option<usize>,
    /// Largest request body, in bytes.
    pub max_body_bytes: Option<usize>,
    /// TTL of a push that names none.
    pub default_ttl_s: Option<u32>,
    /// Largest TTL a push may ask for.
    pub max_ttl_s: Option<u32>,
    /// How long an Idempotency-Key holds.
    pub idempotency_window_s: Option<u32>,
    /// Unacknowledged PUBLISHes per device.
    pub max_inflight: Option<usize>,
    /// Entries queued per session beyond the in-flight window.
    pub max_pending: Option<usize>,
    /// Largest MQTT packet a device may send.
    pub max_packet_bytes: Option<usize>,
    /// Seconds a new connection may take to send CONNECT.
    pub connect_timeout_s: Option<u64>,
    /// Most device connections held at once.
    pub max_connections: Option<usize>,
    /// Most device connections not yet past CONNACK, over both device listeners.
    pub max_unauthenticated: Option<usize>,
    /// Most device connections not yet past CONNACK from one source address.
    pub max_unauthenticated_per_source: Option<usize>,
    /// File descriptors kept out of the connections' budget.
    pub reserved_fds: Option<u64>,
    /// Most connections the REST listener holds.
    pub http_max_connections: Option<usize>,
    /// Most REST connections from one source address.
    pub http_max_connections_per_source: Option<usize>,
    /// How long a new connection may take to send its first request's headers, in
    /// milliseconds.
    pub http_header_timeout_ms: Option<u64>,
    /// How long a kept-alive REST connection may wait for its next request, and any may
    /// move no byte, in seconds.
    pub http_idle_timeout_s: Option<u64>,
    /// Most links a gateway process holds.
    pub link_max_connections: Option<usize>,
    /// Most link handshakes in progress.
    pub link_max_handshakes: Option<usize>,
    /// Most link handshakes in progress from one source address.
    pub link_max_handshakes_per_source: Option<usize>,
    /// Segment size of the embedded event log, in bytes.
    pub log_segment_bytes: Option<u64>,
    /// Pushes per second an app may make, unless the admin set its own.
    pub app_pushes_per_s: Option<u32>,
    /// Broadcasts per minute an app may make, unless the admin set its own.
    pub app_broadcasts_per_min: Option<u32>,
    /// How many `herald ingest` processes share the apps' rates.
    pub ingest_processes: Option<u32>,
    /// Devices an app may register, unless the admin set its own limit.
    pub app_max_devices: Option<u64>,
    /// Entries waiting per device of an app, unless the admin set its own limit.
    pub app_max_inbox_entries: Option<u32>,
    /// Where a gateway in its own process listens for delivery workers (QUIC).
    pub link_addr: Option<SocketAddr>,
    /// Where `herald gateway` and `herald deliver` serve /metrics and /healthz (they
    /// have no REST API); none by default.
    pub metrics_addr: Option<SocketAddr>,
    /// Gateways in other processes that `herald serve` links to (`host:port`).
    pub link_gateways: Option<Vec<String>>,
    /// The directory `herald certs` wrote the link's certificates into.
    pub link_certs: Option<PathBuf>,
    /// How often a gateway tells navigation it is alive, in milliseconds.
    pub heartbeat_ms: Option<u64>,
    /// Kafka bootstrap servers: when set, `herald serve` keeps its event log on Kafka.
    pub kafka_brokers: Option<String>,
    /// The Kafka topic of the event log.
    pub kafka_topic: Option<String>,
    /// Replication factor of the topic when herald creates it.
    pub kafka_replication: Option<i32>,
    /// Partitions of the topic when the role processes create it (`herald serve` uses a
    /// topic of one).
    pub kafka_partitions: Option<u32>,
    /// How long an append may wait for Kafka before the API answers 503, in milliseconds.
    pub kafka_timeout_ms: Option<u64>,
    /// `retention.ms` of the topic when herald creates it (-1: keep every event).
    pub kafka_retention_ms: Option<i64>,
    /// Where the projections are kept: `embedded` (the data dir) or `cql`.
    pub store: Option<String>,
    /// CQL contact points (`host:port`) of the ScyllaDB or Cassandra cluster.
    pub cql_nodes: Option<Vec<String>>,
    /// The CQL keyspace.
    pub cql_keyspace: Option<String>,
    /// Consistency of CQL reads and writes.
    pub cql_consistency: Option<String>,
    /// Replication factor of the keyspace when herald creates it.
    pub cql_replication_factor: Option<u32>,
    /// How long one CQL request may take, in milliseconds.
    pub cql_timeout_ms: Option<u64>,
}

impl FileConfig {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// The resolved settings of `herald serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the log and projections live.
    pub data_dir: PathBuf,
    /// REST API listen address.
    pub http_addr: SocketAddr,
    /// MQTT listen address.
    pub mqtt_addr: SocketAddr,
    /// MQTT over WebSocket listen address.
    pub ws_addr: SocketAddr,
    /// TLS certificate and key for the device listeners.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The keep-alive policy.
    pub keep_alive: KeepAlivePolicy,
    /// herald's MQTT 5 Receive Maximum.
    pub receive_maximum: u16,
    /// The admin token, if configured (else generated into the data dir).
    pub admin_token: Option<String>,
    /// The payload key, if configured (else generated into the data dir).
    pub payload_key: Option<String>,
    /// The MQTT address devices are told to use.
    pub advertised_mqtt: String,
    /// The WebSocket address devices are told to use.
    pub advertised_ws: String,
    /// This gateway's id.
    pub gateway_id: String,
    /// Lifetime of app tokens.
    pub token_ttl_s: u64,
    /// Lifetime of an admin console session.
    pub admin_session_ttl_s: u64,
    /// Whether this process records metrics.
    pub metrics: bool,
    /// Largest push `data`.
    pub max_data_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Default push TTL.
    pub default_ttl_s: u32,
    /// Largest push TTL.
    pub max_ttl_s: u32,
    /// How long an Idempotency-Key holds.
    pub idempotency_window_s: u32,
    /// In-flight window per device.
    pub max_inflight: usize,
    /// Session queue per device.
    pub max_pending: usize,
    /// Largest inbound MQTT packet.
    pub max_packet_bytes: usize,
    /// CONNECT timeout.
    pub connect_timeout_s: u64,
    /// Connection limit.
    pub max_connections: usize,
    /// Device connections not yet past CONNACK, in all.
    pub max_unauthenticated: usize,
    /// Device connections not yet past CONNACK, per source.
    pub max_unauthenticated_per_source: usize,
    /// Descriptors kept out of the connections' budget.
    pub reserved_fds: u64,
    /// REST connections.
    pub http_max_connections: usize,
    /// REST connections per source.
    pub http_max_connections_per_source: usize,
    /// Request header deadline, ms.
    pub http_header_timeout_ms: u64,
    /// REST idle timeout, s.
    pub http_idle_timeout_s: u64,
    /// Links a gateway process holds.
    pub link_max_connections: usize,
    /// Link handshakes in progress.
    pub link_max_handshakes: usize,
    /// Link handshakes in progress per source.
    pub link_max_handshakes_per_source: usize,
    /// Embedded log segment size, bytes.
    pub log_segment_bytes: u64,
    /// Default pushes per second per app.
    pub app_pushes_per_s: u32,
    /// Default broadcasts per minute per app.
    pub app_broadcasts_per_min: u32,
    /// Ingest processes sharing each app's rates.
    pub ingest_processes: u32,
    /// Default devices per app.
    pub app_max_devices: u64,
    /// Default entries waiting per device.
    pub app_max_inbox_entries: u32,
    /// Where a gateway process listens for workers.
    pub link_addr: SocketAddr,
    /// Where a gateway or delivery process serves /metrics, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Gateway processes to link to (`host:port`).
    pub link_gateways: Vec<String>,
    /// The link's certificates.
    pub link_certs: Option<PathBuf>,
    /// Gateway heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Kafka bootstrap servers, if the log is on Kafka.
    pub kafka_brokers: Option<String>,
    /// The event log's topic.
    pub kafka_topic: String,
    /// Its replication factor when created.
    pub kafka_replication: i32,
    /// Its partitions when the roles create it.
    pub kafka_partitions: u32,
    /// Append timeout, ms.
    pub kafka_timeout_ms: u64,
    /// `retention.ms` of the topic when created (-1: forever).
    pub kafka_retention_ms: i64,
    /// Where the projections are kept.
    pub store: StoreKind,
    /// CQL contact points.
    pub cql_nodes: Vec<String>,
    /// The CQL keyspace.
    pub cql_keyspace: String,
    /// CQL consistency (read by the CQL store, in builds with the `cql` feature).
    #[cfg_attr(not(feature = "cql"), allow(dead_code))]
    pub cql_consistency: CqlConsistency,
    /// Replication factor of the keyspace when created.
    pub cql_replication_factor: u32,
    /// CQL request timeout, ms.
    pub cql_timeout_ms: u64,
}

/// Where the projections are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// fjall in the data dir: one process's own.
    Embedded,
    /// A ScyllaDB or Cassandra cluster, shared by the role processes.
    Cql,
}

/// Values from flags and environment variables (clap reads both).
#[derive(Debug, Default)]
pub struct Overrides {
    /// `--metrics` / `HERALD_METRICS`.
    pub metrics: Option<bool>,
    /// `--data-dir` / `HERALD_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--http-addr` / `HERALD_HTTP_ADDR`.
    pub http_addr: Option<SocketAddr>,
    /// `--mqtt-addr` / `HERALD_MQTT_ADDR`.
    pub mqtt_addr: Option<SocketAddr>,
    /// `--ws-addr` / `HERALD_WS_ADDR`.
    pub ws_addr: Option<SocketAddr>,
    /// `--tls-cert` / `HERALD_TLS_CERT`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key` / `HERALD_TLS_KEY`.
    pub tls_key: Option<PathBuf>,
    /// `HERALD_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    /// `HERALD_PAYLOAD_KEY`.
    pub payload_key: Option<String>,
    /// `HERALD_TOKEN_TTL_S`.
    pub token_ttl_s: Option<u64>,
    /// `HERALD_MAX_DATA_BYTES`.
    pub max_data_bytes: Option<usize>,
    /// `HERALD_IDEMPOTENCY_WINDOW_S`.
    pub idempotency_window_s: Option<u32>,
    /// `--gateway-id` / `HERALD_GATEWAY_ID`.
    pub gateway_id: Option<String>,
    /// `--link-addr` / `HERALD_LINK_ADDR`.
    pub link_addr: Option<SocketAddr>,
    /// `--metrics-addr` / `HERALD_METRICS_ADDR`.
    pub metrics_addr: Option<SocketAddr>,
    /// `--link-gateway` / `HERALD_LINK_GATEWAYS`.
    pub link_gateways: Option<Vec<String>>,
    /// `--advertised-mqtt` / `HERALD_ADVERTISED_MQTT`.
    pub advertised_mqtt: Option<String>,
    /// `--advertised-ws` / `HERALD_ADVERTISED_WS`.
    pub advertised_ws: Option<String>,
    /// `--link-certs` / `HERALD_LINK_CERTS`.
    pub link_certs: Option<PathBuf>,
    /// `HERALD_HEARTBEAT_MS`.
    pub heartbeat_ms: Option<u64>,
    /// `--kafka-brokers` / `HERALD_KAFKA_BROKERS`.
    pub kafka_brokers: Option<String>,
    /// `--kafka-topic` / `HERALD_KAFKA_TOPIC`.
    pub kafka_topic: Option<String>,
    /// `--kafka-partitions` / `HERALD_KAFKA_PARTITIONS`.
    pub kafka_partitions: Option<u32>,
    /// `--store` / `HERALD_STORE`.
    pub store: Option<String>,
    /// `--cql-nodes` / `HERALD_CQL_NODES`.
    pub cql_nodes: Option<Vec<String>>,
    /// `--cql-keyspace` / `HERALD_CQL_KEYSPACE`.
    pub cql_keyspace: Option<String>,
    /// `--cql-consistency` / `HERALD_CQL_CONSISTENCY`.
    pub cql_consistency: Option<String>,
}

fn advertised(scheme: &str, addr: SocketAddr, path: &str) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    format!("{scheme}://{host}:{}{path}", addr.port())
}

impl Config {
    /// Merges defaults, the file and the overrides, and validates the result.
    pub fn resolve(file: FileConfig, o: Overrides) -> anyhow::Result<Self> {
        let mqtt_addr = o
            .mqtt_addr
            .or(file.mqtt_addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9493)));
        let ws_addr = o
            .ws_addr
            .or(file.ws_addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8083)));
        let tls = match (o.tls_cert.or(file.tls_cert), o.tls_key.or(file.tls_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => bail!("tls_cert and tls_key go together: set both (or neither)"),
        };
        let (mqtt_scheme, ws_scheme) = if tls.is_some() {
            ("mqtts", "wss")
        } else {
            ("mqtt", "ws")
        };
        let mut keep_alive = KeepAlivePolicy::default();
        if let Some(table) = file.keep_alive {
            keep_alive.by_network.extend(table);
        }
        keep_alive.min_s = file.keep_alive_min_s.unwrap_or(keep_alive.min_s);
        keep_alive.max_s = file.keep_alive_max_s.unwrap_or(keep_alive.max_s);
        let c = Config {
            data_dir: o
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("herald-data")),
            http_addr: o
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            mqtt_addr,
            ws_addr,
            tls,
            keep_alive,
            receive_maximum: file.receive_maximum.unwrap_or(32),
            admin_token: o.admin_token.or(file.admin_token).filter(|t| !t.is_empty()),
            payload_key: o.payload_key.or(file.payload_key).filter(|k| !k.is_empty()),
            advertised_mqtt: o
                .advertised_mqtt
                .or(file.advertised_mqtt)
                .unwrap_or_else(|| advertised(mqtt_scheme, mqtt_addr, "")),
            advertised_ws: o
                .advertised_ws
                .or(file.advertised_ws)
                .unwrap_or_else(|| advertised(ws_scheme, ws_addr, "/mqtt")),
            gateway_id: o
                .gateway_id
                .or(file.gateway_id)
                .unwrap_or_else(|| "gateway-1".into()),
            token_ttl_s: o.token_ttl_s.or(file.token_ttl_s).unwrap_or(3600),
            admin_session_ttl_s: file.admin_session_ttl_s.unwrap_or(12 * 3600),
            metrics: o.metrics.or(file.metrics).unwrap_or(true),
            max_data_bytes: o.max_data_bytes.or(file.max_data_bytes).unwrap_or(4096),
            max_body_bytes: file.max_body_bytes.unwrap_or(64 * 1024),
            default_ttl_s: file.default_ttl_s.unwrap_or(24 * 3600),
            max_ttl_s: file.max_ttl_s.unwrap_or(28 * 24 * 3600),
            idempotency_window_s: o
                .idempotency_window_s
                .or(file.idempotency_window_s)
                .unwrap_or(24 * 3600),
            max_inflight: file.max_inflight.unwrap_or(32),
            max_pending: file.max_pending.unwrap_or(256),
            max_packet_bytes: file.max_packet_bytes.unwrap_or(64 * 1024),
            connect_timeout_s: file.connect_timeout_s.unwrap_or(10),
            max_connections: file.max_connections.unwrap_or(100_000),
            max_unauthenticated: file.max_unauthenticated.unwrap_or(4096),
            max_unauthenticated_per_source: file.max_unauthenticated_per_source.unwrap_or(64),
            reserved_fds: file.reserved_fds.unwrap_or(1024),
            http_max_connections: file.http_max_connections.unwrap_or(8192),
            http_max_connections_per_source: file.http_max_connections_per_source.unwrap_or(1024),
            http_header_timeout_ms: file.http_header_timeout_ms.unwrap_or(10_000),
            http_idle_timeout_s: file.http_idle_timeout_s.unwrap_or(120),
            link_max_connections: file.link_max_connections.unwrap_or(256),
            link_max_handshakes: file.link_max_handshakes.unwrap_or(64),
            link_max_handshakes_per_source: file.link_max_handshakes_per_source.unwrap_or(8),
            log_segment_bytes: file.log_segment_bytes.unwrap_or(64 << 20),
            app_pushes_per_s: file.app_pushes_per_s.unwrap_or(20_000),
            app_broadcasts_per_min: file.app_broadcasts_per_min.unwrap_or(60),
            ingest_processes: file.ingest_processes.unwrap_or(1),
            app_max_devices: file.app_max_devices.unwrap_or(10_000_000),
            app_max_inbox_entries: file.app_max_inbox_entries.unwrap_or(100_000),
            metrics_addr: o.metrics_addr.or(file.metrics_addr),
            link_addr: o
                .link_addr
                .or(file.link_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9494))),
            link_gateways: o
                .link_gateways
                .filter(|g| !g.is_empty())
                .or(file.link_gateways)
                .unwrap_or_default(),
            link_certs: o.link_certs.or(file.link_certs),
            heartbeat_ms: o.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(5000),
            kafka_brokers: o
                .kafka_brokers
                .or(file.kafka_brokers)
                .filter(|b| !b.is_empty()),
            kafka_topic: o
                .kafka_topic
                .or(file.kafka_topic)
                .unwrap_or_else(|| "herald.events".into()),
            kafka_replication: file.kafka_replication.unwrap_or(1),
            kafka_partitions: o.kafka_partitions.or(file.kafka_partitions).unwrap_or(12),
            kafka_timeout_ms: file.kafka_timeout_ms.unwrap_or(10_000),
            kafka_retention_ms: file.kafka_retention_ms.unwrap_or(-1),
            store: match o
                .store
                .or(file.store)
                .unwrap_or_else(|| "embedded".into())
                .as_str()
            {
                "embedded" => StoreKind::Embedded,
                "cql" => StoreKind::Cql,
                other => bail!("store must be \"embedded\" or \"cql\", not {other:?}"),
            },
            cql_nodes: o
                .cql_nodes
                .filter(|n| !n.is_empty())
                .or(file.cql_nodes)
                .unwrap_or_else(|| vec!["127.0.0.1:9042".into()]),
            cql_keyspace: o
                .cql_keyspace
                .or(file.cql_keyspace)
                .unwrap_or_else(|| "herald".into()),
            cql_consistency: o
                .cql_consistency
                .or(file.cql_consistency)
                .map_or(Ok(CqlConsistency::LocalQuorum), |c| c.parse())
                .map_err(|e| anyhow::anyhow!("cql_consistency: {e}"))?,
            cql_replication_factor: file.cql_replication_factor.unwrap_or(1),
            cql_timeout_ms: file.cql_timeout_ms.unwrap_or(5_000),
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.admin_session_ttl_s == 0 {
            bail!("admin_session_ttl_s must be at least 1");
        }
        if self.token_ttl_s == 0 {
            bail!("token_ttl_s must be at least 1");
        }
        if self.max_data_bytes == 0 || self.max_data_bytes > 256 * 1024 {
            bail!("max_data_bytes must be between 1 and 262144");
        }
        if self.max_body_bytes < self.max_data_bytes + 1024 {
            bail!("max_body_bytes must be at least max_data_bytes + 1024");
        }
        if self.max_ttl_s > 365 * 24 * 3600 {
            bail!("max_ttl_s must be at most 31536000 (a year)");
        }
        if self.default_ttl_s == 0 || self.default_ttl_s > self.max_ttl_s {
            bail!("default_ttl_s must be between 1 and max_ttl_s");
        }
        if self.idempotency_window_s == 0 || self.idempotency_window_s > 7 * 24 * 3600 {
            bail!("idempotency_window_s must be between 1 and 604800 (7 days)");
        }
        if !(1..=65_535).contains(&self.max_inflight) {
            bail!("max_inflight must be between 1 and 65535");
        }
        if self.max_pending < 2 {
            bail!("max_pending must be at least 2");
        }
        if self.max_packet_bytes < 128 {
            bail!("max_packet_bytes must be at least 128");
        }
        if self.connect_timeout_s == 0 {
            bail!("connect_timeout_s must be at least 1");
        }
        if self.max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        for (key, value, total_key, total) in [
            (
                "max_unauthenticated_per_source",
                self.max_unauthenticated_per_source,
                "max_unauthenticated",
                self.max_unauthenticated,
            ),
            (
                "max_unauthenticated",
                self.max_unauthenticated,
                "max_connections",
                self.max_connections,
            ),
            (
                "http_max_connections_per_source",
                self.http_max_connections_per_source,
                "http_max_connections",
                self.http_max_connections,
            ),
            (
                "link_max_handshakes_per_source",
                self.link_max_handshakes_per_source,
                "link_max_handshakes",
                self.link_max_handshakes,
            ),
            (
                "link_max_handshakes",
                self.link_max_handshakes,
                "link_max_connections",
                self.link_max_connections,
            ),
        ] {
            if value == 0 || value > total {
                bail!("{key} must be between 1 and {total_key} ({total})");
            }
        }
        if !(100..=600_000).contains(&self.http_header_timeout_ms) {
            bail!("http_header_timeout_ms must be between 100 and 600000");
        }
        if !(1..=86_400).contains(&self.http_idle_timeout_s) {
            bail!("http_idle_timeout_s must be between 1 and 86400");
        }
        if self.reserved_fds < 64 {
            bail!(
                "reserved_fds must be at least 64: the log, the store and outbound clients need descriptors"
            );
        }
        if self.app_pushes_per_s == 0 {
            bail!("app_pushes_per_s must be at least 1");
        }
        if self.app_broadcasts_per_min == 0 {
            bail!("app_broadcasts_per_min must be at least 1");
        }
        if !(1..=1_000_000_000).contains(&self.app_max_devices) {
            bail!("app_max_devices must be between 1 and 1000000000");
        }
        if !(1..=1_000_000).contains(&self.app_max_inbox_entries) {
            bail!("app_max_inbox_entries must be between 1 and 1000000");
        }
        if !(1..=1024).contains(&self.ingest_processes) {
            bail!("ingest_processes must be between 1 and 1024");
        }
        if !(4096..=(1 << 30)).contains(&self.log_segment_bytes) {
            bail!("log_segment_bytes must be between 4096 and 1073741824");
        }
        if !(1..=1024).contains(&self.kafka_partitions) {
            bail!("kafka_partitions must be between 1 and 1024");
        }
        if !(1..=16).contains(&self.kafka_replication) {
            bail!("kafka_replication must be between 1 and 16");
        }
        if self.kafka_retention_ms != -1 && self.kafka_retention_ms < 3_600_000 {
            bail!(
                "kafka_retention_ms must be -1 (keep every event: the log is what the projections are rebuilt from) or at least 3600000 (an hour)"
            );
        }
        if !(500..=300_000).contains(&self.kafka_timeout_ms) {
            bail!("kafka_timeout_ms must be between 500 and 300000");
        }
        if self.kafka_topic.is_empty() || self.kafka_topic.len() > 249 {
            bail!("kafka_topic must be 1 to 249 characters");
        }
        if !(100..=60_000).contains(&self.heartbeat_ms) {
            bail!("heartbeat_ms must be between 100 and 60000");
        }
        if self.gateway_id.is_empty() || self.gateway_id.len() > 128 {
            bail!("gateway_id must be 1 to 128 characters");
        }
        check_host_ports("link_gateways", &self.link_gateways)?;
        if !self.advertised_mqtt.starts_with("mqtt://")
            && !self.advertised_mqtt.starts_with("mqtts://")
        {
            bail!("advertised_mqtt must be mqtt://host:port or mqtts://host:port");
        }
        if !self.advertised_ws.starts_with("ws://") && !self.advertised_ws.starts_with("wss://") {
            bail!("advertised_ws must be ws://host:port/mqtt or wss://host:port/mqtt");
        }
        self.keep_alive.validate().map_err(anyhow::Error::msg)?;
        if self.receive_maximum == 0 {
            bail!("receive_maximum must be at least 1");
        }
        if !self.link_gateways.is_empty() && self.link_certs.is_none() {
            bail!(
                "link_gateways needs link_certs (HERALD_LINK_CERTS): the directory `herald certs` wrote"
            );
        }
        if self.cql_nodes.is_empty() {
            bail!("cql_nodes must name at least one host:port");
        }
        check_host_ports("cql_nodes", &self.cql_nodes)?;
        if !valid_keyspace(&self.cql_keyspace) {
            bail!(
                "cql_keyspace must be a letter, then letters, digits or _ (at most 48): {:?}",
                self.cql_keyspace
            );
        }
        if !(1..=16).contains(&self.cql_replication_factor) {
            bail!("cql_replication_factor must be between 1 and 16");
        }
        if !(100..=120_000).contains(&self.cql_timeout_ms) {
            bail!("cql_timeout_ms must be between 100 and 120000");
        }
        if let Some(t) = &self.admin_token
            && t.len() < 16
        {
            bail!("admin_token (HERALD_ADMIN_TOKEN) must be at least 16 characters");
        }
        Ok(())
    }
}

/// Checks that every address of the list `key` is `host:port`.
fn check_host_ports(key: &str, addrs: &[String]) -> anyhow::Result<()> {
    for a in addrs {
        match a.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => bail!("{key}: {a:?} is not host:port"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_win_over_file_and_errors_name_the_key() {
        let file: FileConfig =
            toml::from_str("http_addr = \"127.0.0.1:1\"\nmax_inflight = 8").unwrap();
        let c = Config::resolve(
            file,
            Overrides {
                http_addr: Some("127.0.0.1:2".parse().unwrap()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.http_addr.port(), 2);
        assert_eq!(c.max_inflight, 8);
        assert_eq!(c.advertised_mqtt, "mqtt://127.0.0.1:9493");

        let bad: FileConfig = toml::from_str("max_inflight = 0").unwrap();
        let e = Config::resolve(bad, Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("max_inflight"));
        assert!(toml::from_str::<FileConfig>("no_such_key = 1").is_err());
    }

    #[test]
    fn kafka_topic_settings_come_from_the_file_and_flags() {
        let file: FileConfig = toml::from_str(
            "kafka_partitions = 6\nkafka_retention_ms = 604800000\nkafka_topic = \"t\"",
        )
        .unwrap();
        let c = Config::resolve(file, Overrides::default()).unwrap();
        assert_eq!(
            (
                c.kafka_partitions,
                c.kafka_retention_ms,
                c.kafka_topic.as_str()
            ),
            (6, 604_800_000, "t")
        );
        let file: FileConfig = toml::from_str("kafka_partitions = 6").unwrap();
        let c = Config::resolve(
            file,
            Overrides {
                kafka_partitions: Some(4),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!((c.kafka_partitions, c.kafka_retention_ms), (4, -1));
        for bad in ["kafka_partitions = 0", "kafka_retention_ms = 1000"] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let e = Config::resolve(file, Overrides::default()).unwrap_err();
            assert!(
                e.to_string().contains(bad.split(' ').next().unwrap()),
                "{e}"
            );
        }
    }

    #[test]
    fn the_store_and_its_cql_settings_are_checked() {
        let file: FileConfig = toml::from_str(
            "store = \"cql\"\ncql_nodes = [\"10.0.0.1:9042\"]\ncql_consistency = \"QUORUM\"",
        )
        .unwrap();
        let c = Config::resolve(file, Overrides::default()).unwrap();
        assert_eq!(
            (c.store, c.cql_keyspace.as_str()),
            (StoreKind::Cql, "herald")
        );
        for (bad, key) in [
            ("store = \"postgres\"", "store"),
            ("cql_keyspace = \"a-b\"", "cql_keyspace"),
            ("cql_nodes = [\"nowhere\"]", "cql_nodes"),
            ("cql_consistency = \"twice\"", "cql_consistency"),
            ("max_ttl_s = 99999999", "max_ttl_s"),
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let e = Config::resolve(file, Overrides::default()).unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/herald.example.toml"));
        let file = FileConfig::load(path).unwrap();
        Config::resolve(file, Overrides::default()).unwrap();
    }
}
