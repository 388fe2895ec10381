//! `/healthz` and `/readyz`: what a process can do now, told truthfully.
//!
//! - `/healthz` (liveness) answers 503 only for a state that a restart cures: the event
//!   log poisoned by a failed write or fsync. Anything that passes by itself (brokers
//!   away, the store unreachable, a listener out of descriptors) keeps it 200, since
//!   restarting would not help.
//! - `/readyz` (readiness) answers 503 while the process cannot serve: the log refusing
//!   or failed, the store not answering, or a listener not accepting. Its body names
//!   each part's state either way.
//!
//! Every process serves both: the REST API's processes on their API port, `herald
//! gateway` and `herald deliver` on their metrics address.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_eventlog::Partitions;
use herald_net::{Gate, ListenerHealth};
use herald_projections::view::Store;
use serde::Serialize;
use utoipa::ToSchema;

/// A check of something else the process depends on (a gateway's link to its workers):
/// `Ok(detail)` when it can serve, `Err(why)` when not.
pub type Check = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What a process's health is made of. Share it in an `Arc`.
#[derive(Default)]
pub struct Health {
    log: Option<Partitions>,
    store: Option<Arc<dyn Store>>,
    listeners: Mutex<Vec<Arc<Gate>>>,
    checks: Mutex<Vec<(&'static str, Check)>>,
}

/// One part's state.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct PartHealth {
    /// `ok`, `degraded` (refusing for a reason that passes by itself) or `failed`
    /// (needs a restart).
    #[schema(example = "ok")]
    pub state: String,
    /// What is wrong, when something is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl PartHealth {
    fn ok(detail: Option<String>) -> Self {
        PartHealth {
            state: "ok".into(),
            detail,
        }
    }
    fn degraded(detail: String) -> Self {
        PartHealth {
            state: "degraded".into(),
            detail: Some(detail),
        }
    }
    fn failed(detail: String) -> Self {
        PartHealth {
            state: "failed".into(),
            detail: Some(detail),
        }
    }
    fn is_ok(&self) -> bool {
        self.state == "ok"
    }
}

/// A listener's state in a report.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct ListenerReport {
    /// `http`, `devices`, `link` or `metrics`.
    pub name: String,
    /// Its accept loop runs and is not backing off (out of file descriptors, say).
    pub accepting: bool,
    /// Connections it holds.
    pub connections: usize,
    /// Of those, not yet authenticated.
    pub unauthenticated: usize,
    /// Its cap on connections.
    pub max_connections: usize,
}

impl From<ListenerHealth> for ListenerReport {
    fn from(h: ListenerHealth) -> Self {
        ListenerReport {
            name: h.name.to_owned(),
            accepting: h.accepting,
            connections: h.connections,
            unauthenticated: h.unauthenticated,
            max_connections: h.max_connections,
        }
    }
}

/// The body of `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct HealthReport {
    /// `ok`, or what the route's status says is wrong: `failed` (`/healthz`) or
    /// `unready` (`/readyz`).
    #[schema(example = "ok")]
    pub status: String,
    /// The event log, in processes that append to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PartHealth>,
    /// The projection store, in processes that read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<PartHealth>,
    /// Other dependencies, by name (a gateway's link to its workers).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub checks: std::collections::BTreeMap<String, PartHealth>,
    /// Every listener of the process.
    pub listeners: Vec<ListenerReport>,
}

impl Health {
    /// The health of a process with `log` and `store` (either may be absent).
    pub fn new(log: Option<Partitions>, store: Option<Arc<dyn Store>>) -> Arc<Self> {
        Arc::new(Health {
            log,
            store,
            ..Health::default()
        })
    }

    /// Reports `gate`'s listener from now on.
    pub fn listener(&self, gate: Arc<Gate>) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(gate);
    }

    /// Reports `check` under `name` from now on.
    pub fn check(&self, name: &'static str, check: Check) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, check));
    }

    fn log_health(&self) -> Option<PartHealth> {
        self.log.as_ref().map(|log| match log.health() {
            herald_eventlog::Health::Failed(why) => PartHealth::failed(why),
            herald_eventlog::Health::Degraded(why) => PartHealth::degraded(why),
            _ => PartHealth::ok(None),
        })
    }

    /// The report, and whether it is good enough: for readiness (`ready`), every part;
    /// for liveness, no part that only a restart cures.
    pub fn report(&self, ready: bool) -> (bool, HealthReport) {
        let log = self.log_health();
        let store = if ready {
            self.store.as_ref().map(|s| match s.checkpoint(0) {
                Ok(_) => PartHealth::ok(None),
                Err(e) => PartHealth::degraded(e.to_string()),
            })
        } else {
            None
        };
        let checks: std::collections::BTreeMap<String, PartHealth> = if ready {
            self.checks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(name, check)| {
                    let h = match check() {
                        Ok(detail) => PartHealth::ok(Some(detail)),
                        Err(why) => PartHealth::degraded(why),
                    };
                    ((*name).to_owned(), h)
                })
                .collect()
        } else {
            Default::default()
        };
        let listeners: Vec<ListenerReport> = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|g| g.health().into())
            .collect();
        let good = if ready {
            log.as_ref().is_none_or(PartHealth::is_ok)
                && store.as_ref().is_none_or(PartHealth::is_ok)
                && checks.values().all(PartHealth::is_ok)
                && listeners.iter().all(|l| l.accepting)
        } else {
            log.as_ref().is_none_or(|l| l.state != "failed")
        };
        let status = match (good, ready) {
            (true, _) => "ok",
            (false, true) => "unready",
            (false, false) => "failed",
        };
        (
            good,
            HealthReport {
                status: status.into(),
                log,
                store,
                checks,
                listeners,
            },
        )
    }

    /// The answer of `/healthz` (`ready` false) or `/readyz` (`ready` true).
    pub fn respond(&self, ready: bool) -> Response {
        let (good, report) = self.report(ready);
        let status = if good {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, Json(report)).into_response()
    }

    /// `/healthz` and `/readyz` alone, for the processes without a REST API.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        let (live, ready) = (self.clone(), self.clone());
        axum::Router::new()
            .route(
                "/healthz",
                axum::routing::get(move || async move { live.respond(false) }),
            )
            .route(
                "/readyz",
                axum::routing::get(move || async move { ready.respond(true) }),
            )
    }
}
