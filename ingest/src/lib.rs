//! herald's REST API (an API boundary): apps, OAuth2 tokens, device registration,
//! messages.
//!
//! # Layout
//! - [`routes`]: the handlers and their request and response types.
//! - [`auth`]: the admin token, client credentials and app JWTs.
//! - [`error`]: every error a caller can cause, mapped to one status and code.
//! - [`nav`]: the consistent hash ring with bounded loads that tells a device its gateway.
//!
//! # Invariants
//! - A push is answered `202` only after its `PushAccepted` event is durable in the log.
//! - Payloads enter the log sealed (AES-256-GCM, the message id as associated data).
//! - Ingest writes only to the log; it reads projections, and waits until the delivery
//!   worker has applied its own writes before it answers a registration, so a caller can
//!   use what it just created.
//! - An app sees and targets only its own devices and messages: another app's ids are
//!   answered exactly like ids that do not exist (404).

pub mod admin;
pub mod auth;
pub mod console;
pub mod error;
pub mod health;
pub mod limits;
pub mod nav;
pub mod replay;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use herald_eventlog::{Append, EventLog, Offset, Partitions, Record};
use herald_projections::view::Store;
use herald_schemas::events::{self, Event};
use herald_schemas::seal::Keyring;
use tokio::sync::watch;

use crate::auth::Tokens;
use crate::error::ApiError;

/// The API's settings.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// The admin bearer token.
    pub admin_token: String,
    /// Lifetime of app tokens, in seconds.
    pub token_ttl_s: u64,
    /// Lifetime of an admin console session, in seconds.
    pub admin_session_ttl_s: u64,
    /// Largest `data` of a push, in bytes of JSON.
    pub max_data_bytes: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// TTL of a push that names none, in seconds.
    pub default_ttl_s: u32,
    /// Largest TTL a push may ask for, in seconds.
    pub max_ttl_s: u32,
    /// The MQTT address devices are told to use.
    pub gateway_mqtt: String,
    /// The MQTT-over-WebSocket address devices are told to use.
    pub gateway_ws: String,
    /// How long an Idempotency-Key holds, in seconds.
    pub idempotency_window_s: u32,
    /// The keep-alive suggested per network type, in seconds (the gateways' policy).
    pub keep_alive_by_network: std::collections::BTreeMap<String, u16>,
    /// Every app's limits where the admin set none (every field set).
    pub default_limits: herald_projections::model::AppLimits,
    /// How many ingest processes share each app's rates: each admits `1 / rate_share`
    /// of them (see [`limits`]).
    pub rate_share: u32,
}

impl IngestConfig {
    /// The keep-alive suggested for `network` (`unknown`'s for one not in the table).
    pub fn keep_alive_s(&self, network: &str) -> u16 {
        self.keep_alive_by_network
            .get(network)
            .or_else(|| self.keep_alive_by_network.get("unknown"))
            .copied()
            .unwrap_or(240)
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            admin_token: String::new(),
            token_ttl_s: 3600,
            admin_session_ttl_s: 12 * 3600,
            max_data_bytes: 4096,
            max_body_bytes: 64 * 1024,
            default_ttl_s: 24 * 3600,
            max_ttl_s: 28 * 24 * 3600,
            gateway_mqtt: "mqtt://127.0.0.1:9493".into(),
            gateway_ws: "ws://127.0.0.1:8083/mqtt".into(),
            idempotency_window_s: 24 * 3600,
            keep_alive_by_network: Default::default(),
            default_limits: herald_projections::model::AppLimits {
                pushes_per_s: Some(20_000),
                broadcasts_per_min: Some(60),
                max_devices: Some(10_000_000),
                max_data_bytes: Some(4096),
                max_inbox_entries: Some(100_000),
            },
            rate_share: 1,
        }
    }
}

/// The API's shared state.
pub struct Ingest {
    /// Settings.
    pub config: IngestConfig,
    log: Partitions,
    store: Arc<dyn Store>,
    /// Per partition: how far the projections have applied it.
    applied: Vec<watch::Receiver<Offset>>,
    keyring: Keyring,
    tokens: Tokens,
    admin_sessions: auth::AdminSessions,
    overview: std::sync::OnceLock<Arc<herald_telemetry::overview::Overview>>,
    idempotency_locks: Vec<tokio::sync::Mutex<()>>,
    nav: Arc<nav::Navigator>,
    health: Arc<health::Health>,
    limiter: limits::Limiter,
    /// Registrations in flight in this process, per app.
    registering: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

/// How many locks serialize requests with an Idempotency-Key (by hash of app and key).
const IDEMPOTENCY_LOCKS: usize = 64;

/// How long a registration waits for the projections to catch up before answering 503.
const APPLY_WAIT: Duration = Duration::from_secs(10);

impl Ingest {
    /// The API over the one-partition `log` and `store`; `applied` is the delivery
    /// worker's progress.
    pub fn new(
        config: IngestConfig,
        log: Arc<dyn EventLog>,
        store: Arc<dyn Store>,
        applied: watch::Receiver<Offset>,
        keyring: Keyring,
        jwt_secret: &[u8],
    ) -> Arc<Self> {
        Self::partitioned(
            config,
            Partitions::single(log),
            store,
            vec![applied],
            keyring,
            jwt_secret,
        )
    }

    /// The API over a topic of partitions and `store`, which folds every partition;
    /// `applied[p]` is how far it has applied partition `p`.
    ///
    /// # Panics
    /// If `applied` does not have one watch per partition.
    pub fn partitioned(
        config: IngestConfig,
        log: Partitions,
        store: Arc<dyn Store>,
        applied: Vec<watch::Receiver<Offset>>,
        keyring: Keyring,
        jwt_secret: &[u8],
    ) -> Arc<Self> {
        assert_eq!(
            applied.len(),
            log.count() as usize,
            "one applied watch per partition"
        );
        let tokens = Tokens::new(jwt_secret, config.token_ttl_s);
        let admin_sessions = auth::AdminSessions::new(
            &auth::session_key(jwt_secret, &config.admin_token),
            config.admin_session_ttl_s,
        );
        let nav = Arc::new(nav::Navigator::new(nav::Placement {
            gateway_id: "default".into(),
            mqtt: config.gateway_mqtt.clone(),
            ws: config.gateway_ws.clone(),
        }));
        let health = health::Health::new(Some(log.clone()), Some(store.clone()));
        Arc::new(Ingest {
            health,
            limiter: limits::Limiter::default(),
            registering: Default::default(),
            config,
            log,
            store,
            applied,
            keyring,
            tokens,
            admin_sessions,
            overview: std::sync::OnceLock::new(),
            idempotency_locks: (0..IDEMPOTENCY_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            nav,
        })
    }

    /// The live overview of this process, sampled once a second from its metrics
    /// (started by the first call; call it at start-up to have history from then on).
    pub fn overview(&self) -> Arc<herald_telemetry::overview::Overview> {
        self.overview
            .get_or_init(|| {
                herald_telemetry::overview::Overview::start(std::time::Duration::from_secs(1))
            })
            .clone()
    }

    /// What `/healthz` and `/readyz` report; add the process's listeners to it.
    pub fn health(&self) -> &Arc<health::Health> {
        &self.health
    }

    /// Navigation: feed it with [`nav::Navigator::follow`] over the log, or devices are
    /// sent to the configured gateway addresses.
    pub fn navigator(&self) -> Arc<nav::Navigator> {
        self.nav.clone()
    }

    /// Appends one event keyed `key` and waits until it is durable; returns where it is.
    async fn append(&self, key: &str, event: &Event) -> Result<Appended, ApiError> {
        let record = Record {
            key: key.as_bytes().to_vec(),
            value: events::encode(event),
        };
        let offsets = self.log.append(vec![record]).await?;
        Ok(Appended {
            partition: self.log.of(key.as_bytes()),
            offset: offsets.last().copied().unwrap_or_default(),
        })
    }

    /// Waits until the projections have applied everything of a partition up to the
    /// record `at` (inclusive).
    async fn wait_applied(&self, at: Appended) -> Result<(), ApiError> {
        let Some(rx) = self.applied.get(at.partition as usize) else {
            return Err(ApiError::unavailable("no such partition"));
        };
        let mut rx = rx.clone();
        match tokio::time::timeout(APPLY_WAIT, rx.wait_for(|a| *a > at.offset)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ApiError::unavailable(
                "accepted, but the projections are behind; retry the read shortly",
            )),
        }
    }

    /// The lock that serializes requests with this app's Idempotency-Key.
    fn idempotency_lock(&self, app_id: &str, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (app_id, key).hash(&mut h);
        &self.idempotency_locks[(h.finish() as usize) % self.idempotency_locks.len()]
    }

    /// `app_id`'s limits: what the admin set, the deployment's defaults for the rest.
    pub(crate) fn limits_of(
        &self,
        app_id: &str,
    ) -> Result<herald_projections::model::AppLimits, ApiError> {
        let set = self
            .store
            .app(app_id)?
            .map(|a| a.limits)
            .unwrap_or_default();
        Ok(set.or(self.config.default_limits))
    }

    /// Takes a token of `app_id`'s `rate` bucket (`per_window` per window; none: not
    /// limited), or answers 429 with when to try again.
    pub(crate) fn take(
        &self,
        app_id: &str,
        rate: limits::Rate,
        per_window: Option<u32>,
    ) -> Result<(), ApiError> {
        let Some(per_window) = per_window else {
            return Ok(());
        };
        let share = self.config.rate_share;
        match self
            .limiter
            .take(app_id, rate, per_window, share, std::time::Instant::now())
        {
            Ok(()) => Ok(()),
            Err(wait) => {
                herald_telemetry::metrics::app_limited(app_id, rate.as_str());
                let what = match rate {
                    limits::Rate::Pushes => "pushes a second",
                    limits::Rate::Broadcasts => "broadcasts a minute",
                };
                let shared = if share > 1 {
                    format!(
                        " ({} of them through this ingest process)",
                        per_window / share
                    )
                } else {
                    String::new()
                };
                Err(ApiError::rate_limited(
                    format!(
                        "this app may make {per_window} {what}{shared}; retry in {} ms",
                        wait.as_millis().max(1)
                    ),
                    wait,
                ))
            }
        }
    }

    /// A place for one more device of `app_id`, or 403 when its devices (registered,
    /// and being registered in this process) reach its limit. Exact within one process;
    /// with several ingest processes registering devices of one app at once, each
    /// counts only its own registrations in flight, so together they may pass the limit
    /// by those.
    pub(crate) fn device_slot(&self, app_id: &str) -> Result<DeviceSlot, ApiError> {
        let max = self.limits_of(app_id)?.max_devices;
        let registered = match max {
            Some(_) => self.store.app_device_total(app_id)?,
            None => 0,
        };
        let mut in_flight = self.registering.lock().unwrap_or_else(|e| e.into_inner());
        let n = in_flight.entry(app_id.to_owned()).or_insert(0);
        if let Some(max) = max
            && registered + *n >= max
        {
            herald_telemetry::metrics::app_limited(app_id, "max_devices");
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "device_limit_reached",
                format!("this app may have at most {max} devices, and has {registered}"),
            ));
        }
        *n += 1;
        Ok(DeviceSlot {
            app_id: app_id.to_owned(),
            registering: self.registering.clone(),
        })
    }

    /// Waits until the projections have applied everything durable now, briefly.
    async fn catch_up(&self) {
        // Every partition at once, within one APPLY_WAIT.
        let waits = self.log.all().iter().enumerate().filter_map(|(p, log)| {
            let end = *log.durable_end().borrow();
            (end > 0).then(|| {
                self.wait_applied(Appended {
                    partition: p as u32,
                    offset: end - 1,
                })
            })
        });
        let _ = futures::future::join_all(waits).await;
    }
}

/// A registration in flight, counted against its app's device limit until dropped.
pub(crate) struct DeviceSlot {
    app_id: String,
    registering: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        let mut in_flight = self.registering.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = in_flight.get_mut(&self.app_id) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.app_id);
            }
        }
    }
}

/// Where an appended record is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Appended {
    partition: u32,
    offset: Offset,
}

/// The API's router.
pub fn router(ingest: Arc<Ingest>) -> Router {
    routes::router(ingest)
}

/// Navigation's router alone (`GET /v1/nav`, `/healthz`), for a `herald nav` process.
pub fn nav_router(ingest: Arc<Ingest>) -> Router {
    routes::nav_router(ingest)
}
