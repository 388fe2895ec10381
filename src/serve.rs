//! `herald serve`: every role in one process, on one embedded fjall database.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use herald_delivery::directory::StoreDirectory;
use herald_delivery::link::{Link, Links};
use herald_delivery::quic::{QuicLink, QuicLinkConfig};
use herald_delivery::worker::Worker;
use herald_eventlog::embedded::EmbeddedLog;
use herald_eventlog::{EventLog, Partitions};
use herald_gateway::link::LinkTls;
use herald_gateway::{Gateway, GatewayConfig, Hub, SessionLimits, Tls, transport};
use herald_ingest::health::Health;
use herald_ingest::{Ingest, IngestConfig};
use herald_net::http::HttpTimeouts;
use herald_net::{Caps, FdBudget, Gate};
use herald_projections::embedded::{EmbeddedStore, open_database};
use herald_projections::view::Store;
use herald_schemas::seal::{KEY_BYTES, Keyring};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, StoreKind};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Reads a secret file from the data dir, or generates one with `make` and writes it
/// (mode 0600) on first start.
fn secret_file(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<(String, bool)> {
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Ok((text.trim().to_owned(), false));
    }
    let value = make()?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(value.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok((value, true))
}

fn random_b64(n: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b)
        .map_err(|e| anyhow::anyhow!("OS random number generator failed: {e}"))?;
    Ok(B64.encode(b))
}

fn decode_key(text: &str, what: &str) -> anyhow::Result<[u8; KEY_BYTES]> {
    let bytes = B64
        .decode(text.trim())
        .with_context(|| format!("{what} is not base64"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{what} must be {KEY_BYTES} bytes"))
}

/// The secrets a process needs: the admin token, the payload keyring and the JWT
/// secret. Each is taken from the config, or (only where one process holds them all)
/// generated into the data dir on first start.
pub struct Secrets {
    /// The admin bearer token.
    pub admin_token: String,
    /// Opens and seals payloads.
    pub keyring: Keyring,
    /// Signs app access tokens.
    pub jwt_secret: String,
}

/// Loads the secrets. `shared`: several processes must agree on them (the roles), so
/// the payload key must be configured rather than generated per process.
pub fn load_secrets(config: &Config, shared: bool) -> anyhow::Result<Secrets> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let dir = &config.data_dir;
    let admin_token = match &config.admin_token {
        Some(t) => t.clone(),
        None => {
            let (t, fresh) = secret_file(&dir.join("admin-token"), || random_b64(24))?;
            if fresh {
                println!(
                    "herald: generated admin token (stored in {}): {t}",
                    dir.join("admin-token").display()
                );
            } else {
                println!(
                    "herald: admin token from {}: {t}",
                    dir.join("admin-token").display()
                );
            }
            t
        }
    };
    let payload_key = match &config.payload_key {
        Some(k) => decode_key(k, "payload_key (HERALD_PAYLOAD_KEY)")?,
        None if shared => bail!(
            "payload_key (HERALD_PAYLOAD_KEY) must be set: every role process must seal and open payloads with the same key"
        ),
        None => {
            let (k, _) = secret_file(&dir.join("payload.key"), || random_b64(KEY_BYTES))?;
            decode_key(&k, "payload.key in the data dir")?
        }
    };
    // Role processes must agree on the token key too: there it is derived from the shared
    // payload key (one secret to distribute); one process keeps a generated one.
    let jwt_secret = if shared {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"herald app token key v1");
        h.update(payload_key);
        B64.encode(h.finalize())
    } else {
        secret_file(&dir.join("jwt.key"), || random_b64(32))?.0
    };
    Ok(Secrets {
        admin_token,
        keyring: Keyring::new(1, &payload_key),
        jwt_secret,
    })
}

/// The Kafka settings of `config`, for a topic of `partitions` when herald creates it.
#[cfg(feature = "kafka")]
pub fn kafka_config(
    config: &Config,
    brokers: &str,
    partitions: i32,
) -> herald_eventlog::kafka::KafkaConfig {
    let mut k = herald_eventlog::kafka::KafkaConfig::new(brokers);
    k.topic.clone_from(&config.kafka_topic);
    k.replication_factor = config.kafka_replication;
    k.partitions = partitions;
    k.retention_ms = config.kafka_retention_ms;
    k.timeout = Duration::from_millis(config.kafka_timeout_ms);
    k
}

/// Opens the projection store: in the data dir (rebuilt if it is ahead of any
/// partition of `topic`), or on the CQL cluster (`store = "cql"`). The database handle
/// is the embedded store's, for the final sync at shutdown.
pub async fn open_store(
    config: &Config,
    topic: &Partitions,
) -> anyhow::Result<(Option<fjall::Database>, Arc<dyn Store>)> {
    if config.store == StoreKind::Cql {
        let store = open_cql(config).await?;
        for (p, log) in topic.all().iter().enumerate() {
            let log_end = *log.durable_end().borrow();
            let checkpoint = store.checkpoint(p as u32)?;
            if checkpoint > log_end {
                bail!(
                    "the CQL keyspace {} has applied partition {p} up to {checkpoint}, beyond the end of the event log ({log_end}): it holds another log's projections (give this log a keyspace of its own, or rebuild it with `herald rebuild`)",
                    config.cql_keyspace
                );
            }
        }
        return Ok((None, store));
    }
    let db = open_database(&config.data_dir.join("store"))?;
    let mut embedded = EmbeddedStore::open(db.clone(), "")?;
    if embedded.has_legacy_layout()? {
        tracing::warn!(
            "the projections were written by an older herald (before partitions); rebuilding them from the log"
        );
        embedded.destroy()?;
        embedded = EmbeddedStore::open(db.clone(), "")?;
    }
    for (p, log) in topic.all().iter().enumerate() {
        let log_end = *log.durable_end().borrow();
        let checkpoint = embedded.checkpoint(p as u32)?;
        if checkpoint > log_end {
            // The projections hold events the log no longer has (it lost a tail that had
            // been synced: a disk fault, or another topic). The log is the record: fold
            // it again from the start.
            tracing::error!(
                partition = p,
                checkpoint,
                log_end,
                "the projections are ahead of the event log; rebuilding them from the log"
            );
            embedded.destroy()?;
            embedded = EmbeddedStore::open(db.clone(), "")?;
            break;
        }
    }
    Ok((Some(db), Arc::new(embedded)))
}

/// The CQL settings of `config`.
#[cfg(feature = "cql")]
pub fn cql_config(config: &Config) -> herald_projections::cql::CqlConfig {
    herald_projections::cql::CqlConfig {
        nodes: config.cql_nodes.clone(),
        keyspace: config.cql_keyspace.clone(),
        consistency: config.cql_consistency,
        replication_factor: config.cql_replication_factor,
        request_timeout: Duration::from_millis(config.cql_timeout_ms),
    }
}

/// Connects to the CQL store (applying its migrations), retrying for a while: the
/// cluster may still be starting.
async fn open_cql(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    #[cfg(feature = "cql")]
    {
        let c = cql_config(config);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = c.clone();
            let r = tokio::task::spawn_blocking(move || {
                herald_projections::cql::CqlStore::connect(&attempt)
            })
            .await?;
            match r {
                Ok(store) => {
                    tracing::info!(nodes = ?c.nodes, keyspace = %c.keyspace, "projections on the CQL store");
                    return Ok(Arc::new(store));
                }
                Err(herald_projections::StoreError::Unavailable(e))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::warn!(error = %e, "the CQL store is not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(e).context(format!(
                        "cannot open the CQL store at {} (cql_nodes)",
                        c.nodes.join(",")
                    )));
                }
            }
        }
    }
    #[cfg(not(feature = "cql"))]
    {
        bail!(
            "store = \"cql\" ({}), but this herald was built without CQL support: build it with `cargo build --release --features cql`",
            config.cql_nodes.join(",")
        )
    }
}

/// The file descriptors this process's connections may hold: its open-files limit
/// (raised to the hard limit) less `reserved_fds`. Warns when the listeners' caps add up
/// to more, since connections beyond it are refused.
pub fn fd_budget(config: &Config, device_listeners: bool) -> anyhow::Result<FdBudget> {
    let (fds, limits) = FdBudget::for_process(config.reserved_fds).map_err(anyhow::Error::msg)?;
    let caps = config.http_max_connections
        + if device_listeners {
            config.max_connections
        } else {
            0
        };
    if caps > fds.capacity() {
        tracing::warn!(
            open_files_limit = limits.limit,
            reserved_fds = limits.reserved,
            for_connections = fds.capacity(),
            listeners_caps = caps,
            "the listeners' caps exceed the file descriptors left for connections: connections beyond them are refused (raise the open-files limit to hold more)"
        );
    }
    Ok(fds)
}

/// The REST listener's caps: every HTTP connection counts as unauthenticated (requests
/// authenticate, not connections), so the per-source cap covers all of a source's.
fn http_caps(config: &Config) -> Caps {
    Caps {
        max_connections: config.http_max_connections,
        max_unauthenticated: config.http_max_connections,
        max_unauthenticated_per_source: config.http_max_connections_per_source,
    }
}

/// Serves `router` on `listener` with the HTTP limits of `config`, as listener `name`
/// (reported by `health`), until `shutdown`.
pub fn serve_http(
    name: &'static str,
    listener: TcpListener,
    router: axum::Router,
    config: &Config,
    fds: &FdBudget,
    health: &Health,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let gate = Gate::new(name, http_caps(config), Some(fds.clone()));
    health.listener(gate.clone());
    let timeouts = HttpTimeouts {
        header: Duration::from_millis(config.http_header_timeout_ms),
        idle: Duration::from_secs(config.http_idle_timeout_s),
    };
    tokio::spawn(herald_net::http::serve(
        listener, gate, router, timeouts, shutdown,
    ))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `config.metrics_addr`, if set, for the
/// processes without a REST API (`herald gateway`, `herald deliver`), until `shutdown`.
pub async fn serve_metrics(
    config: &Config,
    fds: &FdBudget,
    health: &Arc<Health>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(addr) = config.metrics_addr else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics_addr)"))?;
    let app = health.router().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    herald_telemetry::metrics::CONTENT_TYPE,
                )],
                herald_telemetry::metrics::render(),
            )
        }),
    );
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    serve_http("metrics", listener, app, config, fds, health, shutdown);
    Ok(())
}

/// The API settings of `config`.
pub fn ingest_config(config: &Config, admin_token: String) -> IngestConfig {
    IngestConfig {
        admin_token,
        token_ttl_s: config.token_ttl_s,
        admin_session_ttl_s: config.admin_session_ttl_s,
        max_data_bytes: config.max_data_bytes,
        max_body_bytes: config.max_body_bytes,
        default_ttl_s: config.default_ttl_s,
        max_ttl_s: config.max_ttl_s,
        gateway_mqtt: config.advertised_mqtt.clone(),
        gateway_ws: config.advertised_ws.clone(),
        idempotency_window_s: config.idempotency_window_s,
        default_limits: herald_projections::model::AppLimits {
            pushes_per_s: Some(config.app_pushes_per_s),
            broadcasts_per_min: Some(config.app_broadcasts_per_min),
            max_devices: Some(config.app_max_devices),
            max_data_bytes: u32::try_from(config.max_data_bytes).ok(),
            max_inbox_entries: Some(config.app_max_inbox_entries),
        },
        rate_share: config.ingest_processes,
        keep_alive_by_network: herald_schemas::events::NETWORKS
            .iter()
            .map(|n| (n.to_string(), config.keep_alive.suggest(n)))
            .collect(),
    }
}

/// Runs until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let Secrets {
        admin_token,
        keyring,
        jwt_secret,
    } = load_secrets(&config, false)?;
    let dir = &config.data_dir;
    let fds = fd_budget(&config, true)?;
    let log = open_log(&config).await?;
    let (db, store) = open_store(&config, &Partitions::single(log.clone())).await?;

    let hub = Arc::new(Hub::default());
    let (shutdown_tx, shutdown) = watch::channel(false);
    // Gateways in other processes, if any: this process is their delivery worker, and
    // they read devices and backlogs through it.
    let quic = match config.link_certs.as_deref() {
        Some(certs) if !config.link_gateways.is_empty() => Some(
            QuicLink::new(QuicLinkConfig {
                gateways: config.link_gateways.clone(),
                tls: LinkTls::in_dir(certs, "worker"),
                worker_id: format!("serve:{}", config.gateway_id),
            })
            .context("cannot set up the link to the gateways")?,
        ),
        _ => None,
    };
    let link: Arc<dyn Link> = match &quic {
        Some(q) => Arc::new(Links(vec![hub.clone(), q.clone()])),
        None => hub.clone(),
    };
    let worker = Worker::new(log.clone(), store.clone(), link, keyring.clone())?;
    let applied = worker.applied();
    let worker_applied = worker.applied();
    if let Some(q) = &quic {
        let directory = Arc::new(
            StoreDirectory::new(store.clone(), keyring.clone())
                .with_freshness(log.durable_end(), worker.applied())
                .waiting_for_catch_up(),
        );
        q.run(directory, log.clone(), shutdown.clone());
        tracing::info!(gateways = ?config.link_gateways, "linking to gateway processes");
    }

    let ingest = Ingest::new(
        ingest_config(&config, admin_token),
        log.clone(),
        store.clone(),
        applied,
        keyring.clone(),
        jwt_secret.as_bytes(),
    );
    // The overview's history starts now, not when the console is first opened.
    ingest.overview();
    let gateway = Gateway::new(
        gateway_config(&config, &fds)?,
        hub,
        Arc::new(
            StoreDirectory::new(store.clone(), keyring)
                .with_freshness(log.durable_end(), worker_applied)
                .waiting_for_catch_up(),
        ),
        log.clone(),
    );

    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (http_addr)", config.http_addr))?;
    let devices = DeviceListeners::bind(&config).await?;
    tracing::info!(
        http = %http.local_addr()?, devices = %devices.describe(&config),
        data_dir = %dir.display(), checkpoint = store.checkpoint(0)?,
        durable_end = *log.durable_end().borrow(),
        "herald serving"
    );

    let worker_task = tokio::spawn(worker.run(shutdown.clone()));
    // Navigation learns the live gateways (this one included) from their heartbeats.
    {
        let nav = ingest.navigator();
        let (log, shutdown) = (log.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = nav.follow(log, shutdown).await {
                tracing::error!(error = %e, "navigation stopped following the log");
            }
        });
    }
    let health = ingest.health().clone();
    health.listener(gateway.gate().clone());
    let gateway_task = devices.serve(gateway, shutdown.clone());
    let http_task = serve_http(
        "http",
        http,
        herald_ingest::router(ingest),
        &config,
        &fds,
        &health,
        shutdown.clone(),
    );

    let mut worker_task = worker_task;
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        r = &mut worker_task => {
            match r {
                Ok(Ok(())) => bail!("delivery worker stopped unexpectedly"),
                Ok(Err(e)) => bail!("delivery worker failed: {e}"),
                Err(e) => bail!("delivery worker panicked: {e}"),
            }
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = http_task.await;
        let _ = gateway_task.await;
        let _ = worker_task.await;
    })
    .await;
    // Give connections a moment to write their last events.
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Some(db) = db {
        db.persist(fjall::PersistMode::SyncAll)
            .context("final sync of the embedded database failed")?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The event log: on Kafka when `kafka_brokers` is set, else in the data dir.
pub async fn open_log(config: &Config) -> anyhow::Result<Arc<dyn EventLog>> {
    let Some(brokers) = &config.kafka_brokers else {
        let options = herald_eventlog::embedded::Options {
            segment_bytes: config.log_segment_bytes,
        };
        return Ok(Arc::new(
            EmbeddedLog::open_with(&config.data_dir.join("log"), options)
                .context("cannot open the event log")?,
        ));
    };
    #[cfg(feature = "kafka")]
    {
        use herald_eventlog::kafka::OrderedKafkaLog;
        let log = OrderedKafkaLog::open(kafka_config(config, brokers, 1))
            .await
            .with_context(|| format!("cannot open the event log on Kafka at {brokers}"))?;
        tracing::info!(%brokers, topic = %config.kafka_topic, "event log on Kafka");
        Ok(log)
    }
    #[cfg(not(feature = "kafka"))]
    {
        bail!(
            "kafka_brokers is set ({brokers}), but this herald was built without Kafka support: build it with `cargo build --release --features kafka`"
        )
    }
}

/// The gateway settings of `config` (shared by `herald serve` and `herald gateway`); its
/// connections draw on `fds`.
pub fn gateway_config(config: &Config, fds: &FdBudget) -> anyhow::Result<GatewayConfig> {
    let tls = match &config.tls {
        Some((cert, key)) => Some(Tls(transport::tls_acceptor(cert, key)?)),
        None => None,
    };
    Ok(GatewayConfig {
        gateway_id: config.gateway_id.clone(),
        max_packet_bytes: config.max_packet_bytes,
        connect_timeout: Duration::from_secs(config.connect_timeout_s),
        caps: Caps {
            max_connections: config.max_connections,
            max_unauthenticated: config.max_unauthenticated,
            max_unauthenticated_per_source: config.max_unauthenticated_per_source,
        },
        fds: Some(fds.clone()),
        limits: SessionLimits {
            max_inflight: config.max_inflight,
            max_pending: config.max_pending,
            receive_maximum: config.receive_maximum,
        },
        write_timeout: Duration::from_secs(30),
        advertised_mqtt: config.advertised_mqtt.clone(),
        advertised_ws: config.advertised_ws.clone(),
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        keep_alive: config.keep_alive.clone(),
        tls,
    })
}

/// The device listeners of `config` (MQTT, and MQTT over WebSocket), bound.
pub struct DeviceListeners {
    mqtt: TcpListener,
    ws: TcpListener,
}

impl DeviceListeners {
    /// Binds `mqtt_addr` and `ws_addr`.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let mqtt = TcpListener::bind(config.mqtt_addr)
            .await
            .with_context(|| format!("cannot listen on {} (mqtt_addr)", config.mqtt_addr))?;
        let ws = TcpListener::bind(config.ws_addr)
            .await
            .with_context(|| format!("cannot listen on {} (ws_addr)", config.ws_addr))?;
        Ok(DeviceListeners { mqtt, ws })
    }

    /// What to log: `mqtt=… ws=…` (with `tls` when on).
    pub fn describe(&self, config: &Config) -> String {
        let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        format!(
            "mqtt={} ws={}{}",
            addr(&self.mqtt),
            addr(&self.ws),
            if config.tls.is_some() { " (TLS)" } else { "" }
        )
    }

    /// Serves devices on both until `shutdown`; resolves when both listeners stopped.
    pub fn serve(
        self,
        gateway: Arc<Gateway>,
        shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let ws = tokio::spawn(gateway.clone().serve_ws(self.ws, shutdown.clone()));
            gateway.serve(self.mqtt, shutdown).await;
            let _ = ws.await;
        })
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
