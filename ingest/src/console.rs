//! The admin console: the page at `/admin` (its assets are in the binary), its log-in,
//! and the admin API it reads: apps with their use, a device's presence and inbox, a
//! message's timeline from the log, and the live overview (JSON, and SSE once a second).
//!
//! Every route here but the page, its assets and the log-in needs [`Admin`]: the admin
//! token as a bearer, or the session cookie the log-in sets (HttpOnly, SameSite=Strict,
//! so no token is ever in a URL or readable by the page's scripts).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, extract::Query};
use herald_eventlog::Offset;
use herald_projections::model::{InboxEntry, Presence};
use herald_telemetry::overview::Sample;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::Ingest;
use crate::auth::{Admin, ApiJson, ApiPath, SESSION_COOKIE};
use crate::error::{ApiError, ErrorBody};
use crate::replay::{Filter, Replay};
use crate::routes::now_ms;

/// The admin console's routes, merged into the API router.
pub fn routes() -> Router<Arc<Ingest>> {
    Router::new()
        .route("/admin", get(page))
        .route("/admin/", get(page))
        .route("/admin/assets/{file}", get(asset))
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/v1/admin/session", get(session))
        .route("/v1/admin/apps", get(list_apps))
        .route("/v1/admin/apps/{id}/secret", post(rotate_secret))
        .route(
            "/v1/admin/apps/{id}/limits",
            get(app_limits).put(set_app_limits),
        )
        .route("/v1/admin/devices/{id}", get(device))
        .route("/v1/admin/messages/{id}", get(message))
        .route("/v1/admin/overview", get(overview))
        .route("/v1/admin/overview/stream", get(overview_stream))
}

/// The OpenAPI description of the console's admin API.
#[derive(OpenApi)]
#[openapi(paths(
    login,
    logout,
    session,
    list_apps,
    rotate_secret,
    app_limits,
    set_app_limits,
    device,
    message,
    overview,
    overview_stream
))]
pub struct ConsoleApiDoc;

// ------------------------------------------------------------------------- page

/// The page, its script, its style and the chart library (uPlot, MIT, vendored as
/// published on npm; see `assets/admin/vendor/README.md`).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "admin.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/admin/admin.js"),
    ),
    (
        "admin.css",
        "text/css; charset=utf-8",
        include_str!("../assets/admin/admin.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/admin/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../assets/admin/vendor/uPlot.min.css"),
    ),
];

const PAGE: &str = include_str!("../assets/admin/index.html");

/// Headers of everything the console serves: its own scripts only, no framing, no
/// sniffing, no referrer.
fn page_headers(content_type: &'static str) -> [(HeaderName, HeaderValue); 5] {
    [
        (CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            HeaderName::from_static("content-security-policy"),
            HeaderValue::from_static(
                "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                 img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
                 base-uri 'none'; form-action 'self'",
            ),
        ),
        (
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        ),
        (
            HeaderName::from_static("referrer-policy"),
            HeaderValue::from_static("no-referrer"),
        ),
        (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ]
}

async fn page() -> impl IntoResponse {
    (page_headers("text/html; charset=utf-8"), PAGE)
}

async fn asset(ApiPath(file): ApiPath<String>) -> Result<Response, ApiError> {
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| ApiError::not_found("asset"))?;
    Ok((page_headers(content_type), *body).into_response())
}

// ------------------------------------------------------------------------ log-in

/// Body of `POST /admin/login`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The admin token.
    pub token: String,
}

/// Starts an admin console session: sets the session cookie (HttpOnly, SameSite=Strict).
#[utoipa::path(post, path = "/admin/login", request_body = LoginRequest,
    responses(
        (status = 204, description = "Logged in; the cookie is set"),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Wrong admin token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A body that is not JSON", body = ErrorBody),
        (status = 422, description = "Not a log-in body", body = ErrorBody)))]
async fn login(
    State(ingest): State<Arc<Ingest>>,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    if !herald_schemas::seal::constant_time_eq(
        body.token.as_bytes(),
        ingest.config.admin_token.as_bytes(),
    ) {
        tracing::warn!("admin console: a log-in with a wrong token");
        return Err(ApiError::unauthorized(
            "invalid_token",
            "the admin token is not valid",
        ));
    }
    let value = ingest.admin_sessions.start(now_ms() / 1000)?;
    let cookie = format!(
        "{SESSION_COOKIE}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict",
        ingest.admin_sessions.ttl_s()
    );
    session_cookie_response(&cookie)
}

/// Ends the session in this browser (clears the cookie).
#[utoipa::path(post, path = "/admin/logout",
    responses((status = 204, description = "The cookie is cleared")))]
async fn logout() -> Result<Response, ApiError> {
    session_cookie_response(&format!(
        "{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
    ))
}

fn session_cookie_response(cookie: &str) -> Result<Response, ApiError> {
    let value = HeaderValue::from_str(cookie)
        .map_err(|_| ApiError::unavailable("cannot set the session cookie"))?;
    Ok((
        StatusCode::NO_CONTENT,
        [
            (SET_COOKIE, value),
            (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}

/// Whether the caller is the admin (the page asks this before it shows anything).
#[utoipa::path(get, path = "/v1/admin/session",
    responses(
        (status = 200, description = "The caller is the admin", body = SessionView),
        (status = 401, description = "No session, or it expired", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn session(_admin: Admin) -> Json<SessionView> {
    Json(SessionView { admin: true })
}

/// Who the session is.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    /// Always `true`: only the admin has a session.
    pub admin: bool,
}

// -------------------------------------------------------------------------- apps

/// One app in the console's list.
#[derive(Debug, Serialize, ToSchema)]
pub struct AppSummary {
    /// Its id.
    pub app_id: String,
    /// Its name.
    pub name: String,
    /// The key its devices register with.
    pub app_key: String,
    /// Its OAuth2 client id.
    pub client_id: String,
    /// When it was created (ms since the Unix epoch).
    pub created_ms: u64,
    /// Pushes accepted by this process since it started.
    pub accepted: u64,
    /// Inbox entries this process stored since it started.
    pub stored: u64,
    /// Entries devices confirmed, folded by this process since it started.
    pub delivered: u64,
}

/// The apps (up to 1,000), with what each used since this process started.
#[utoipa::path(get, path = "/v1/admin/apps",
    responses(
        (status = 200, description = "The apps", body = [AppSummary]),
        (status = 401, description = "Not the admin", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn list_apps(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
) -> Result<Json<Vec<AppSummary>>, ApiError> {
    let apps = ingest.store.apps(1000)?;
    let usage = herald_telemetry::metrics::per_app();
    let mut out: Vec<AppSummary> = apps
        .into_iter()
        .map(|a| {
            let u = usage.get(&a.app_id).copied().unwrap_or_default();
            AppSummary {
                accepted: u.accepted,
                stored: u.stored,
                delivered: u.delivered,
                app_id: a.app_id,
                name: a.name,
                app_key: a.app_key,
                client_id: a.client_id,
                created_ms: a.created_ms,
            }
        })
        .collect();
    out.sort_by_key(|a| std::cmp::Reverse(a.created_ms));
    Ok(Json(out))
}

/// An app's new client credentials.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedSecret {
    /// The app.
    pub app_id: String,
    /// Its OAuth2 client id (unchanged).
    pub client_id: String,
    /// The new client secret, shown this once.
    pub client_secret: String,
}

/// Gives an app a new OAuth2 client secret. The old secret stops working at once;
/// tokens already issued with it last until they expire (`token_ttl_s`).
#[utoipa::path(post, path = "/v1/admin/apps/{id}/secret",
    params(("id" = String, Path, description = "The app id")),
    responses(
        (status = 200, description = "The new secret", body = RotatedSecret),
        (status = 400, description = "An id that is not UTF-8", body = ErrorBody),
        (status = 401, description = "Not the admin", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody),
        (status = 404, description = "No such app", body = ErrorBody),
        (status = 503, description = "Not made durable; retry", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn rotate_secret(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RotatedSecret>, ApiError> {
    use herald_schemas::events::{AppSecretRotated, Event, Kind};
    let app = ingest
        .store
        .app(&id)?
        .ok_or_else(|| ApiError::not_found("app"))?;
    let client_secret = crate::routes::random_token::<32>()?;
    let event = Event::new(
        now_ms(),
        Kind::AppSecretRotated(AppSecretRotated {
            app_id: app.app_id.clone(),
            client_secret_sha256: crate::auth::sha256(client_secret.as_bytes()),
        }),
    );
    let at = ingest.append(&app.app_id, &event).await?;
    ingest.wait_applied(at).await?;
    tracing::info!(app_id = %app.app_id, "admin: rotated an app's client secret");
    Ok(Json(RotatedSecret {
        app_id: app.app_id,
        client_id: app.client_id,
        client_secret,
    }))
}

/// An app's limits. In a request, an absent or `null` field follows the deployment's
/// default (the config's `app_*` keys); in an answer, `null` means unlimited.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Pushes accepted per second (a burst may use one second's worth at once; the
    /// excess is answered 429 with `Retry-After`).
    #[schema(minimum = 1, maximum = 1_000_000)]
    #[serde(default, deserialize_with = "crate::routes::whole_number")]
    pub pushes_per_s: Option<u32>,
    /// Broadcasts accepted per minute (a burst may use one minute's worth).
    #[schema(minimum = 1, maximum = 100_000)]
    #[serde(default, deserialize_with = "crate::routes::whole_number")]
    pub broadcasts_per_min: Option<u32>,
    /// Largest push `data`, bytes of compact JSON (at most the deployment's
    /// `max_data_bytes`; 413 beyond).
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "crate::routes::whole_number")]
    pub max_data_bytes: Option<u32>,
    /// Devices the app may register (403 `device_limit_reached` beyond). Lowering it
    /// below what the app has removes no device; it only stops new ones.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    #[serde(default, deserialize_with = "crate::routes::whole_number")]
    pub max_devices: Option<u64>,
    /// Entries waiting in one device's inbox: storing a new entry drops the device's
    /// entry this many seqs older if it is still waiting (the device sees the gap in its
    /// seqs; the dropped message's status counts it as `dropped`). Applies to pushes
    /// accepted from then on.
    #[schema(minimum = 1, maximum = 1_000_000)]
    #[serde(default, deserialize_with = "crate::routes::whole_number")]
    pub max_inbox_entries: Option<u32>,
}

impl Limits {
    fn of(l: herald_projections::model::AppLimits) -> Self {
        Limits {
            pushes_per_s: l.pushes_per_s,
            broadcasts_per_min: l.broadcasts_per_min,
            max_data_bytes: l.max_data_bytes,
            max_devices: l.max_devices,
            max_inbox_entries: l.max_inbox_entries,
        }
    }
}

/// What limits an app: those the admin set, and those in force (the set ones, the
/// deployment's defaults for the rest).
#[derive(Debug, Serialize, ToSchema)]
pub struct AppLimitsView {
    /// The app.
    pub app_id: String,
    /// Set by the admin for this app (`null`: the default).
    pub set: Limits,
    /// In force now.
    pub effective: Limits,
    /// How many ingest processes share the rates (each admits its share).
    pub rate_share: u32,
}

fn limits_view(ingest: &Ingest, app: &herald_projections::model::App) -> AppLimitsView {
    AppLimitsView {
        app_id: app.app_id.clone(),
        set: Limits::of(app.limits),
        effective: Limits::of(app.limits.or(ingest.config.default_limits)),
        rate_share: ingest.config.rate_share,
    }
}

/// An app's limits, set and in force.
#[utoipa::path(get, path = "/v1/admin/apps/{id}/limits",
    params(("id" = String, Path, description = "The app id")),
    responses(
        (status = 200, description = "The app's limits", body = AppLimitsView),
        (status = 400, description = "An id that is not UTF-8", body = ErrorBody),
        (status = 401, description = "Not the admin", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody),
        (status = 404, description = "No such app", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn app_limits(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AppLimitsView>, ApiError> {
    let app = ingest
        .store
        .app(&id)?
        .ok_or_else(|| ApiError::not_found("app"))?;
    Ok(Json(limits_view(&ingest, &app)))
}

/// Sets an app's limits, replacing those set before (an `AppLimitsSet` event): every
/// field absent or `null` follows the deployment's default. In force for the app's next
/// request once answered.
#[utoipa::path(put, path = "/v1/admin/apps/{id}/limits",
    params(("id" = String, Path, description = "The app id")),
    request_body = Limits,
    responses(
        (status = 200, description = "The app's limits now", body = AppLimitsView),
        (status = 400, description = "Malformed JSON, or an id that is not UTF-8", body = ErrorBody),
        (status = 401, description = "Not the admin", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody),
        (status = 404, description = "No such app", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A limit out of range, or an unknown field", body = ErrorBody),
        (status = 503, description = "Not made durable; retry", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn set_app_limits(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
    ApiJson(limits): ApiJson<Limits>,
) -> Result<Json<AppLimitsView>, ApiError> {
    use herald_schemas::events::{AppLimits, AppLimitsSet, Event, Kind};
    let max_data = ingest.config.max_data_bytes;
    for (key, value, max) in [
        ("pushes_per_s", limits.pushes_per_s, 1_000_000),
        ("broadcasts_per_min", limits.broadcasts_per_min, 100_000),
        (
            "max_data_bytes",
            limits.max_data_bytes,
            u32::try_from(max_data).unwrap_or(u32::MAX),
        ),
        ("max_inbox_entries", limits.max_inbox_entries, 1_000_000),
    ] {
        if let Some(v) = value
            && !(1..=max).contains(&v)
        {
            return Err(ApiError::invalid(format!(
                "{key} must be between 1 and {max}, or null for the default"
            )));
        }
    }
    if let Some(v) = limits.max_devices
        && !(1..=1_000_000_000).contains(&v)
    {
        return Err(ApiError::invalid(
            "max_devices must be between 1 and 1000000000, or null for the default",
        ));
    }
    let app = ingest
        .store
        .app(&id)?
        .ok_or_else(|| ApiError::not_found("app"))?;
    let event = Event::new(
        now_ms(),
        Kind::AppLimitsSet(AppLimitsSet {
            app_id: app.app_id.clone(),
            limits: Some(AppLimits {
                pushes_per_s: limits.pushes_per_s.unwrap_or(0),
                broadcasts_per_min: limits.broadcasts_per_min.unwrap_or(0),
                max_data_bytes: limits.max_data_bytes.unwrap_or(0),
                max_devices: limits.max_devices.unwrap_or(0),
                max_inbox_entries: limits.max_inbox_entries.unwrap_or(0),
            }),
        }),
    );
    let at = ingest.append(&app.app_id, &event).await?;
    ingest.wait_applied(at).await?;
    let app = ingest
        .store
        .app(&id)?
        .ok_or_else(|| ApiError::not_found("app"))?;
    tracing::info!(app_id = %app.app_id, ?limits, "admin: set an app's limits");
    Ok(Json(limits_view(&ingest, &app)))
}

// ----------------------------------------------------------------------- devices

/// Entries of an inbox shown at most.
const INBOX_SHOWN: usize = 100;

/// A device as the console shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceView {
    /// Its id.
    pub device_id: String,
    /// Its app.
    pub app_id: String,
    /// What it runs on.
    pub platform: String,
    /// The network it reported at registration.
    pub network: String,
    /// When it registered.
    pub registered_ms: u64,
    /// Where it is connected, or was last (none if it never connected).
    #[schema(value_type = Option<Object>)]
    pub presence: Option<Presence>,
    /// The seq its next entry gets.
    pub next_seq: u64,
    /// Its unacknowledged entries, oldest first (at most 100).
    pub inbox: Vec<InboxRow>,
    /// Whether it has more than those.
    pub more: bool,
}

/// An unacknowledged inbox entry and its state.
#[derive(Debug, Serialize, ToSchema)]
pub struct InboxRow {
    /// Its seq.
    pub seq: u64,
    /// Its message.
    pub message_id: String,
    /// When the push was accepted.
    pub ts_ms: u64,
    /// When it expires.
    pub expires_at_ms: u64,
    /// `waiting` (not acknowledged yet: sent, or to be sent when the device is
    /// connected), `received` (QoS 2: the device has it, the release is pending) or
    /// `expired` (never sent again).
    pub state: &'static str,
}

impl InboxRow {
    fn of(e: InboxEntry, now: u64) -> Self {
        let state = if e.received {
            "received"
        } else if e.expires_at_ms <= now {
            "expired"
        } else {
            "waiting"
        };
        InboxRow {
            seq: e.seq,
            message_id: e.message_id,
            ts_ms: e.ts_ms,
            expires_at_ms: e.expires_at_ms,
            state,
        }
    }
}

/// A device: its registration, presence and unacknowledged inbox.
#[utoipa::path(get, path = "/v1/admin/devices/{id}",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The device", body = DeviceView),
        (status = 400, description = "An id that is not UTF-8", body = ErrorBody),
        (status = 401, description = "Not the admin", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn device(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeviceView>, ApiError> {
    // The stores may be called from a handler (a CQL store moves its wait off the
    // runtime's workers), as the other routes do.
    let store = &ingest.store;
    let d = store
        .device(&id)?
        .ok_or_else(|| ApiError::not_found("device"))?;
    let presence = store.presence(&id)?;
    let head = store.inbox_head(&id)?;
    let mut entries = store.inbox_page(&id, 0, INBOX_SHOWN + 1)?;
    let more = entries.len() > INBOX_SHOWN;
    entries.truncate(INBOX_SHOWN);
    let now = now_ms();
    Ok(Json(DeviceView {
        device_id: d.device_id,
        app_id: d.app_id,
        platform: d.platform,
        network: d.network,
        registered_ms: d.registered_ms,
        presence,
        next_seq: head.next_seq,
        inbox: entries.into_iter().map(|e| InboxRow::of(e, now)).collect(),
        more,
    }))
}

// ---------------------------------------------------------------------- messages

/// Records read per partition at most for one timeline.
const TIMELINE_SCAN: u64 = 500_000;
/// Events are looked for from this long before the push (producers' clocks differ a
/// little) to this long after its expiry (an ack of an entry sent just before it).
const TIMELINE_SLACK_MS: u64 = 5 * 60 * 1000;

/// A message and everything the log says happened to it.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    /// Its status, as `GET /v1/messages/{id}` shows it to its app.
    pub status: crate::routes::MessageStatusResponse,
    /// The app that pushed it.
    pub app_id: String,
    /// Whether it went to every device of the app.
    pub broadcast: bool,
    /// The device of a unicast message.
    pub unicast_device: Option<String>,
    /// The events about it by time: `PushAccepted`, `FanOut` shares, `DeviceReceived`,
    /// `DeviceAcked` (with the device and gateway), `MessageRecalled`; and two rows that
    /// are not events of their own: `Stored` (the entries the push's fold put in inboxes:
    /// the device of a unicast, or how many) and `Expired` (its expiry passed with
    /// entries unacknowledged). herald logs no per-device "sent": delivery is counted
    /// at the device's ack.
    #[schema(value_type = Vec<Object>)]
    pub timeline: Vec<Value>,
    /// False if the scan stopped at its limit before the message's expiry.
    pub complete: bool,
}

/// A message's status and timeline, read from the log.
#[utoipa::path(get, path = "/v1/admin/messages/{id}",
    params(("id" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "The message", body = MessageView),
        (status = 400, description = "An id that is not UTF-8", body = ErrorBody),
        (status = 401, description = "Not the admin", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody),
        (status = 404, description = "No such message", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn message(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MessageView>, ApiError> {
    let status = ingest
        .store
        .message_status(&id)?
        .ok_or_else(|| ApiError::not_found("message"))?;
    let from_ts = status.ts_ms.saturating_sub(TIMELINE_SLACK_MS);
    let until_ts = status.expires_at_ms.saturating_add(TIMELINE_SLACK_MS);
    let mut timeline = Vec::new();
    let mut complete = true;
    for p in 0..ingest.log.count() {
        let log = ingest.log.get(p).clone();
        let (events, whole) = scan_partition(&*log, &id, from_ts, until_ts).await?;
        complete &= whole;
        timeline.extend(events.into_iter().map(|mut e| {
            e["partition"] = p.into();
            e
        }));
    }
    timeline.sort_by_key(|e| e["ts_ms"].as_u64().unwrap_or(0));
    // The fold stores the entries when it applies the push: not an event of its own.
    if status.targeted > 0 {
        let after_push = timeline
            .iter()
            .position(|e| e["type"] == "PushAccepted")
            .map_or(0, |i| i + 1);
        timeline.insert(
            after_push,
            serde_json::json!({
                "type": "Stored",
                "ts_ms": status.ts_ms,
                "devices": status.targeted,
                "device_id": status.unicast_device,
            }),
        );
    }
    let (app_id, broadcast, unicast_device) = (
        status.app_id.clone(),
        status.broadcast,
        status.unicast_device.clone(),
    );
    let status = crate::routes::MessageStatusResponse::new(status, now_ms());
    if status.expired > 0 {
        timeline.push(serde_json::json!({
            "type": "Expired",
            "ts_ms": status.expires_at_ms,
            "outstanding": status.expired,
        }));
    }
    Ok(Json(MessageView {
        status,
        app_id,
        broadcast,
        unicast_device,
        timeline,
        complete,
    }))
}

/// The events about `message_id` in one partition with times in [`from_ts`, `until_ts`],
/// and whether the scan covered that whole range.
async fn scan_partition(
    log: &dyn herald_eventlog::EventLog,
    message_id: &str,
    from_ts: u64,
    until_ts: u64,
) -> Result<(Vec<Value>, bool), ApiError> {
    let end = *log.durable_end().borrow();
    let mut next = first_at_or_after(log, from_ts, end).await?;
    let stop = next.saturating_add(TIMELINE_SCAN).min(end);
    let mut replay = Replay::new(
        Filter {
            message: Some(message_id.to_owned()),
            ..Filter::default()
        },
        |_: &str| None,
    );
    let mut out = Vec::new();
    let mut line = Vec::new();
    while next < stop {
        let records = log.read(next, 1000).await.map_err(read_failed)?;
        let Some(last) = records.last() else {
            break;
        };
        next = last.offset + 1;
        for r in &records {
            line.clear();
            if let Some(event) = replay.render(r, &mut line)
                && let Ok(v) = serde_json::from_slice::<Value>(&line)
            {
                if event.ts_ms > until_ts {
                    return Ok((out, true));
                }
                out.push(v);
            }
        }
    }
    Ok((out, next >= end))
}

/// The first offset below `end` whose event is at `ts` or later, by bisection (the log
/// is in time order up to the small differences of its producers' clocks, which the
/// caller's slack covers).
async fn first_at_or_after(
    log: &dyn herald_eventlog::EventLog,
    ts: u64,
    end: Offset,
) -> Result<Offset, ApiError> {
    let (mut lo, mut hi) = (0, end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let records = log.read(mid, 1).await.map_err(read_failed)?;
        let at = records
            .first()
            .and_then(|r| herald_schemas::events::decode(&r.value).ok())
            .map_or(0, |e| e.ts_ms);
        if at < ts {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

fn read_failed(e: herald_eventlog::Error) -> ApiError {
    tracing::warn!(error = %e, "admin: reading the log failed");
    ApiError::unavailable("the log could not be read just now")
}

// ---------------------------------------------------------------------- overview

/// The query of `GET /v1/admin/overview`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OverviewQuery {
    /// Only samples after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
}

/// The last five minutes of this process's overview, a sample a second (accepted/s,
/// sent/s, acked/s, ack latency p50/p99, connected devices, delivery lag, log sync
/// latency p50/p99).
#[utoipa::path(get, path = "/v1/admin/overview", params(OverviewQuery),
    responses(
        (status = 200, description = "The samples, oldest first", body = [Sample]),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "Not the admin", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn overview(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    query: Result<Query<OverviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Sample>>, ApiError> {
    let Query(q) = query.map_err(|e| crate::admin::invalid_query(e.body_text()))?;
    let since = q.since_ms.unwrap_or(0);
    Ok(Json(
        ingest
            .overview()
            .history()
            .into_iter()
            .filter(|s| s.ts_ms > since)
            .collect(),
    ))
}

/// The overview as Server-Sent Events: one `history` event with the samples kept, then
/// a `sample` event a second.
#[utoipa::path(get, path = "/v1/admin/overview/stream",
    responses(
        (status = 200, description = "text/event-stream: a `history` event (the samples kept, a JSON array), then a `sample` event (one sample, JSON) a second", content_type = "text/event-stream", body = String),
        (status = 401, description = "Not the admin", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn overview_stream(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let overview = ingest.overview();
    let history = overview.history();
    let mut rx = overview.subscribe();
    rx.mark_unchanged();
    let first = SseEvent::default()
        .event("history")
        .json_data(&history)
        .unwrap_or_default();
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let sample = rx.borrow_and_update().clone();
        let event = SseEvent::default()
            .event("sample")
            .json_data(&sample)
            .unwrap_or_default();
        Some((Ok(event), rx))
    });
    let stream = futures::StreamExt::chain(futures::stream::once(async { Ok(first) }), rest);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
