//! The `herald` binary: command line, configuration and the wiring of roles. It stays
//! thin; every role lives in its own crate.

mod config;
mod gateway;
mod logging;
mod rebuild;
mod replay;
#[cfg(feature = "kafka")]
mod roles;
mod serve;
mod top;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc: herald allocates many small, short-lived buffers per message (requests,
/// envelopes, events); the system allocator spent about a tenth of the CPU on them.
/// Built without transparent huge pages: zeroing fresh 2 MiB pages took a third of the
/// CPU while folding broadcasts.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// herald: durable, real-time push-message delivery over MQTT.
///
/// App servers publish pushes over REST; each push is an event in a durable log; devices
/// receive them over MQTT (topic `inbox`) and acknowledge them; a device that was offline
/// gets what it missed when it reconnects.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about, long_about)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, env = "HERALD_LOG_FORMAT", default_value = "text")]
    log_format: logging::LogFormat,
    /// Export spans over OTLP (HTTP, protobuf) to this OpenTelemetry collector, e.g.
    /// http://127.0.0.1:4318 (HERALD_OTLP_FILTER chooses which spans; by default
    /// herald's per-push, per-entry and per-connection spans) [default: no export].
    #[arg(long, global = true, env = "HERALD_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in one process (the default deployment), the log in the data dir or
    /// on Kafka (--kafka-brokers).
    ///
    /// Listens for the REST API (default 0.0.0.0:8080) and MQTT (default 0.0.0.0:9493).
    /// The admin token comes from HERALD_ADMIN_TOKEN; if unset, one is generated into the
    /// data dir and printed. Stop with Ctrl-C or SIGTERM; a restart resumes where it
    /// stopped.
    Serve(ServeArgs),
    /// Run a gateway in its own process: it holds device MQTT connections and reaches the
    /// rest of herald over the QUIC link.
    ///
    /// Listens for MQTT (default 0.0.0.0:9493) and for delivery workers on the link
    /// (default 0.0.0.0:9494/udp, mutual TLS with the certificates of `herald certs`).
    /// Devices are authenticated, and their backlogs read, through a linked worker (for
    /// example `herald serve --link-gateway ADDR`); until one is linked, devices are
    /// refused with "server unavailable" and retry.
    Gateway(GatewayArgs),
    /// Run the REST API alone, on the shared Kafka log (one role per process).
    ///
    /// Appends to the Kafka topic, and reads the projections from the shared CQL store
    /// (--store cql) or from its own fold of every partition in --data-dir. Every role
    /// process must be given the same HERALD_PAYLOAD_KEY and HERALD_ADMIN_TOKEN.
    Ingest(RoleArgs),
    /// Run a delivery worker on the shared Kafka log (one role per process).
    ///
    /// The `herald deliver` processes share the topic's partitions through the Kafka
    /// consumer group `herald-deliver`. Each folds the partitions it is given (into the
    /// shared CQL store with --store cql, else into --data-dir), links to every gateway
    /// (--link-gateway), and serves those partitions' devices: forwards their new entries
    /// and answers the gateways' requests for them. When one dies, the others take its
    /// partitions over within seconds (from their shared checkpoints with --store cql).
    /// Every role process must be given the same HERALD_PAYLOAD_KEY and
    /// HERALD_ADMIN_TOKEN.
    Deliver(RoleArgs),
    /// Run navigation alone (GET /v1/nav), from the gateways' heartbeats in the Kafka log.
    ///
    /// Every role process must be given the same HERALD_PAYLOAD_KEY and
    /// HERALD_ADMIN_TOKEN.
    Nav(RoleArgs),
    /// Write a link CA and the certificates it signs (for gateways and workers).
    ///
    /// Writes ca.crt, ca.key, gateway.crt, gateway.key, worker.crt and worker.key into
    /// --out. Give the gateway processes and the workers the same directory (or copies
    /// of its files); keep ca.key away from both.
    Certs(CertsArgs),
    /// Create the CQL keyspace and tables, or bring them up to this herald's schema
    /// (store = "cql").
    ///
    /// Applies every versioned migration the keyspace has not had yet and prints what it
    /// did. Every herald process on the CQL store does the same at start-up; run this to
    /// do it ahead of a deployment. Needs a herald built with `--features cql`.
    Migrate(MigrateArgs),
    /// Stream the event log as JSON lines, through a server's API or from a data dir.
    Replay(replay::ReplayArgs),
    /// A live terminal dashboard of a server: pushes accepted, sent and acked per second,
    /// ack latency, connected devices, delivery lag, log sync latency (the admin
    /// console's overview, for a server without a browser). q quits.
    Top(top::TopArgs),
    /// Fold the whole log again into a fresh store and print a digest of each projection
    /// (on a stopped data dir).
    Rebuild(rebuild::RebuildArgs),
    /// Rebuild, then compare with the live projections; exits 1 if they differ (on a
    /// stopped data dir).
    Verify(rebuild::RebuildArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// A TOML config file (see herald.example.toml); flags and HERALD_* variables win.
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Where the event log and projections are kept [default: ./herald-data].
    #[arg(long, env = "HERALD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// REST API listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "HERALD_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    #[command(flatten)]
    devices: DeviceArgs,
    /// Lifetime of app access tokens, in seconds [default: 3600].
    #[arg(long, env = "HERALD_TOKEN_TTL_S")]
    token_ttl_s: Option<u64>,
    /// Largest push `data`, in bytes of compact JSON [default: 4096].
    #[arg(long, env = "HERALD_MAX_DATA_BYTES")]
    max_data_bytes: Option<usize>,
    /// How long an Idempotency-Key holds, in seconds [default: 86400].
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW_S")]
    idempotency_window_s: Option<u32>,
    #[command(flatten)]
    shared: SharedArgs,
}

/// What `herald serve` and the role processes are told alike: the Kafka log, the gateway
/// processes to link to, and the MQTT address given to devices.
#[derive(Debug, clap::Args)]
struct SharedArgs {
    /// The event log on Apache Kafka at these bootstrap servers (host:port,…) instead of
    /// in the data dir (the projections stay in the data dir); required by ingest, deliver
    /// and nav. Needs a herald built with `--features kafka`.
    #[arg(long, env = "HERALD_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// The Kafka topic of the event log, created if missing (with one partition by
    /// `herald serve`, with --kafka-partitions by the roles) [default: herald.events].
    #[arg(long, env = "HERALD_KAFKA_TOPIC")]
    kafka_topic: Option<String>,
    /// Partitions of the Kafka topic when ingest, deliver or nav create it; devices are
    /// spread over them by id, and the delivery workers share them [default: 12].
    /// `herald serve` keeps its log in a topic of one.
    #[arg(long, env = "HERALD_KAFKA_PARTITIONS")]
    kafka_partitions: Option<u32>,
    /// A gateway process to link to as its delivery worker (serve, deliver; repeatable,
    /// comma-separated in the variable).
    #[arg(
        long = "link-gateway",
        env = "HERALD_LINK_GATEWAYS",
        value_delimiter = ','
    )]
    link_gateways: Vec<String>,
    /// The link certificates' directory (from `herald certs`); needed with --link-gateway.
    #[arg(long, env = "HERALD_LINK_CERTS")]
    link_certs: Option<PathBuf>,
    /// The MQTT address devices are told to use for herald's own listener, or when no
    /// gateway is known yet [default: mqtt://<mqtt_addr>, mqtts:// with TLS].
    #[arg(long, env = "HERALD_ADVERTISED_MQTT")]
    advertised_mqtt: Option<String>,
    /// The MQTT over WebSocket address devices are told to use, like --advertised-mqtt
    /// [default: ws://<ws_addr>/mqtt, wss:// with TLS].
    #[arg(long, env = "HERALD_ADVERTISED_WS")]
    advertised_ws: Option<String>,
    /// Where the projections are kept: `embedded` (in the data dir, one process's own)
    /// or `cql` (a ScyllaDB or Cassandra cluster that the role processes share; needs a
    /// herald built with `--features cql`) [default: embedded].
    #[arg(long, env = "HERALD_STORE")]
    store: Option<String>,
    /// CQL contact points, host:port,… (with --store cql) [default: 127.0.0.1:9042].
    #[arg(long, env = "HERALD_CQL_NODES", value_delimiter = ',')]
    cql_nodes: Vec<String>,
    /// The CQL keyspace, created with the tables if missing [default: herald].
    #[arg(long, env = "HERALD_CQL_KEYSPACE")]
    cql_keyspace: Option<String>,
    /// Consistency of CQL reads and writes: one, local_one, quorum, local_quorum, all
    /// [default: local_quorum].
    #[arg(long, env = "HERALD_CQL_CONSISTENCY")]
    cql_consistency: Option<String>,
    /// Record Prometheus metrics (/metrics) and the admin overview; `false` only to
    /// measure what they cost [default: true].
    #[arg(long, env = "HERALD_METRICS", value_name = "BOOL")]
    metrics: Option<bool>,
    /// Serve /metrics and /healthz here (herald deliver, which has no REST API).
    #[arg(long, env = "HERALD_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

impl SharedArgs {
    /// The overrides these flags make.
    fn overrides(self) -> anyhow::Result<config::Overrides> {
        Ok(config::Overrides {
            admin_token: std::env::var("HERALD_ADMIN_TOKEN").ok(),
            payload_key: std::env::var("HERALD_PAYLOAD_KEY").ok(),
            link_gateways: Some(self.link_gateways),
            link_certs: self.link_certs,
            advertised_mqtt: self.advertised_mqtt,
            advertised_ws: self.advertised_ws,
            kafka_brokers: self.kafka_brokers,
            kafka_topic: self.kafka_topic,
            kafka_partitions: self.kafka_partitions,
            store: self.store,
            cql_nodes: Some(self.cql_nodes),
            cql_keyspace: self.cql_keyspace,
            cql_consistency: self.cql_consistency,
            heartbeat_ms: heartbeat_from_env()?,
            metrics: self.metrics,
            metrics_addr: self.metrics_addr,
            ..config::Overrides::default()
        })
    }
}

/// Where devices connect (`herald serve` and `herald gateway`).
#[derive(Debug, clap::Args)]
struct DeviceArgs {
    /// MQTT (3.1.1 and 5) listen address [default: 0.0.0.0:9493].
    #[arg(long, env = "HERALD_MQTT_ADDR")]
    mqtt_addr: Option<SocketAddr>,
    /// MQTT over WebSocket listen address; served at the path /mqtt with subprotocol
    /// `mqtt` [default: 0.0.0.0:8083].
    #[arg(long, env = "HERALD_WS_ADDR")]
    ws_addr: Option<SocketAddr>,
    /// A PEM certificate chain: with --tls-key, both device listeners speak TLS 1.2/1.3
    /// only (mqtts://, wss://). For development, `herald certs` writes a pair
    /// (gateway.crt, gateway.key) that clients trust through its ca.crt.
    #[arg(long, env = "HERALD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "HERALD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl DeviceArgs {
    fn apply(self, o: config::Overrides) -> config::Overrides {
        config::Overrides {
            mqtt_addr: self.mqtt_addr,
            ws_addr: self.ws_addr,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            ..o
        }
    }
}

#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// A TOML config file (see herald.example.toml); flags and HERALD_* variables win.
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    devices: DeviceArgs,
    /// Where delivery workers link to this gateway (UDP) [default: 0.0.0.0:9494].
    #[arg(long, env = "HERALD_LINK_ADDR")]
    link_addr: Option<SocketAddr>,
    /// The link certificates' directory (from `herald certs`).
    #[arg(long, env = "HERALD_LINK_CERTS")]
    link_certs: Option<PathBuf>,
    /// This gateway's id, in its devices' events [default: gateway-1].
    #[arg(long, env = "HERALD_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// The MQTT address devices are told to use for this gateway (navigation)
    /// [default: mqtt://<mqtt_addr>, mqtts:// with TLS].
    #[arg(long, env = "HERALD_ADVERTISED_MQTT")]
    advertised_mqtt: Option<String>,
    /// The MQTT over WebSocket address devices are told to use for this gateway
    /// [default: ws://<ws_addr>/mqtt, wss:// with TLS].
    #[arg(long, env = "HERALD_ADVERTISED_WS")]
    advertised_ws: Option<String>,
    /// Serve Prometheus /metrics and /healthz here (a gateway has no REST API of its
    /// own), e.g. 127.0.0.1:9495 [default: none].
    #[arg(long, env = "HERALD_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct RoleArgs {
    /// A TOML config file (see herald.example.toml); flags and HERALD_* variables win.
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Where this process keeps its own projections (with the embedded store) and its
    /// generated files [default: ./herald-data].
    #[arg(long, env = "HERALD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address (ingest, nav) [default: 0.0.0.0:8080].
    #[arg(long, env = "HERALD_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    #[command(flatten)]
    shared: SharedArgs,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// A TOML config file (see herald.example.toml); flags and HERALD_* variables win.
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// CQL contact points, host:port,… [default: 127.0.0.1:9042].
    #[arg(long, env = "HERALD_CQL_NODES", value_delimiter = ',')]
    cql_nodes: Vec<String>,
    /// The CQL keyspace [default: herald].
    #[arg(long, env = "HERALD_CQL_KEYSPACE")]
    cql_keyspace: Option<String>,
}

#[derive(Debug, clap::Args)]
struct CertsArgs {
    /// Where to write the files.
    #[arg(long, default_value = "herald-certs")]
    out: PathBuf,
    /// Another name (DNS name or IP address) the gateways are reached by (repeatable);
    /// herald-gateway, localhost and 127.0.0.1 are always included.
    #[arg(long = "name")]
    names: Vec<String>,
}

fn load_config(
    path: Option<&std::path::Path>,
    overrides: config::Overrides,
) -> anyhow::Result<config::Config> {
    let file = match path {
        Some(path) => config::FileConfig::load(path)?,
        None => config::FileConfig::default(),
    };
    let config = config::Config::resolve(file, overrides)?;
    herald_telemetry::metrics::set_enabled(config.metrics);
    Ok(config)
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Ingest,
    Deliver,
    Nav,
}

fn run_role(args: RoleArgs, role: Role) -> anyhow::Result<()> {
    let overrides = config::Overrides {
        data_dir: args.data_dir,
        http_addr: args.http_addr,
        ..args.shared.overrides()?
    };
    let config = load_config(args.config.as_deref(), overrides)?;
    #[cfg(feature = "kafka")]
    {
        runtime()?.block_on(async move {
            match role {
                Role::Ingest => roles::ingest(config).await,
                Role::Deliver => roles::deliver(config).await,
                Role::Nav => roles::nav(config).await,
            }
        })
    }
    #[cfg(not(feature = "kafka"))]
    {
        let _ = config;
        anyhow::bail!(
            "herald {role:?} runs on Kafka, and this herald was built without Kafka support: build it with `cargo build --release --features kafka`"
        )
    }
}

/// `herald migrate`.
fn migrate(config: &config::Config) -> anyhow::Result<()> {
    #[cfg(feature = "cql")]
    {
        let c = serve::cql_config(config);
        let applied = runtime()?.block_on(herald_projections::cql::migrate(&c))?;
        if applied.is_empty() {
            println!(
                "herald: the CQL keyspace {} is up to date",
                config.cql_keyspace
            );
        } else {
            println!(
                "herald: applied migrations {applied:?} to the CQL keyspace {}",
                config.cql_keyspace
            );
        }
        Ok(())
    }
    #[cfg(not(feature = "cql"))]
    {
        anyhow::bail!(
            "herald migrate is for the CQL store ({}), and this herald was built without CQL support: build it with `cargo build --release --features cql`",
            config.cql_keyspace
        )
    }
}

/// `HERALD_HEARTBEAT_MS`, if set.
fn heartbeat_from_env() -> anyhow::Result<Option<u64>> {
    match std::env::var("HERALD_HEARTBEAT_MS") {
        Ok(v) => v
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("HERALD_HEARTBEAT_MS must be a number of milliseconds")),
        Err(_) => Ok(None),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Kept to the end: dropping it sends the traces still buffered.
    let _tracing = logging::init(cli.log_format, cli.otlp_endpoint.as_deref())?;
    run(cli.command)
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let overrides = args.devices.apply(config::Overrides {
                data_dir: args.data_dir,
                http_addr: args.http_addr,
                token_ttl_s: args.token_ttl_s,
                max_data_bytes: args.max_data_bytes,
                idempotency_window_s: args.idempotency_window_s,
                ..args.shared.overrides()?
            });
            let config = load_config(args.config.as_deref(), overrides)?;
            runtime()?.block_on(serve::run(config))
        }
        Command::Gateway(args) => {
            let overrides = args.devices.apply(config::Overrides {
                link_addr: args.link_addr,
                link_certs: args.link_certs,
                gateway_id: args.gateway_id,
                advertised_mqtt: args.advertised_mqtt,
                advertised_ws: args.advertised_ws,
                heartbeat_ms: heartbeat_from_env()?,
                metrics_addr: args.metrics_addr,
                ..config::Overrides::default()
            });
            let config = load_config(args.config.as_deref(), overrides)?;
            runtime()?.block_on(gateway::run(config))
        }
        Command::Ingest(args) => run_role(args, Role::Ingest),
        Command::Deliver(args) => run_role(args, Role::Deliver),
        Command::Nav(args) => run_role(args, Role::Nav),
        Command::Certs(args) => {
            herald_gateway::link::generate_certs(&args.out, &args.names)?;
            println!(
                "herald: wrote the link CA and certificates into {} (ca.crt, ca.key, gateway.crt, gateway.key, worker.crt, worker.key)",
                args.out.display()
            );
            Ok(())
        }
        Command::Migrate(args) => {
            let overrides = config::Overrides {
                cql_nodes: Some(args.cql_nodes),
                cql_keyspace: args.cql_keyspace,
                ..config::Overrides::default()
            };
            let config = load_config(args.config.as_deref(), overrides)?;
            migrate(&config)
        }
        Command::Replay(args) => replay::run(args),
        Command::Top(args) => runtime()?.block_on(top::run(args)),
        Command::Rebuild(args) => rebuild::run(args, false),
        Command::Verify(args) => rebuild::run(args, true),
    }
}
