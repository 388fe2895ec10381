//! The routes of the REST API and the types they take and give. `/openapi.json` is
//! generated from these definitions.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use herald_schemas::events::{
    AppCreated, DeviceRegistered, Event, Kind, MessageRecalled, PushAccepted, Target, To,
};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use uuid::Uuid;

use crate::Ingest;
use crate::auth::{Admin, ApiJson, ApiPath, AppAuth, sha256};
use crate::error::{ApiError, ErrorBody};
use herald_schemas::seal::constant_time_eq;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ApiError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| {
        tracing::error!(error = %e, "OS random number generator failed");
        ApiError::unavailable("no randomness available")
    })?;
    Ok(b)
}

pub(crate) fn random_token<const N: usize>() -> Result<String, ApiError> {
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<N>()?))
}

pub use herald_schemas::events::NETWORKS;

// ---------------------------------------------------------------------------- apps

/// Body of `POST /v1/apps`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAppRequest {
    /// A human name for the app (up to 200 characters).
    #[serde(default)]
    pub name: String,
}

/// A new app's identifiers and credentials. The client secret is shown only here.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateAppResponse {
    /// The app's id.
    pub app_id: String,
    /// The public key the app's devices register with.
    pub app_key: String,
    /// OAuth2 client id.
    pub client_id: String,
    /// OAuth2 client secret.
    pub client_secret: String,
}

/// Creates an app (admin only).
#[utoipa::path(post, path = "/v1/apps", request_body = CreateAppRequest,
    responses(
        (status = 201, description = "The app was created", body = CreateAppResponse),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 422, description = "Invalid body", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn create_app(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<CreateAppResponse>), ApiError> {
    // The body is optional: an empty one creates an unnamed app.
    let req: CreateAppRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateAppRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            if e.is_data() {
                ApiError::invalid(e.to_string())
            } else {
                ApiError::bad_request("malformed_json", e.to_string())
            }
        })?
    };
    if req.name.chars().count() > 200 {
        return Err(ApiError::invalid("name must be at most 200 characters"));
    }
    let app_id = Uuid::new_v4().to_string();
    let app_key = random_token::<16>()?;
    let client_id = Uuid::new_v4().to_string();
    let client_secret = random_token::<32>()?;
    let event = Event::new(
        now_ms(),
        Kind::AppCreated(AppCreated {
            app_id: app_id.clone(),
            name: req.name,
            app_key: app_key.clone(),
            client_id: client_id.clone(),
            client_secret_sha256: sha256(client_secret.as_bytes()),
        }),
    );
    let at = ingest.append(&app_id, &event).await?;
    ingest.wait_applied(at).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateAppResponse {
            app_id,
            app_key,
            client_id,
            client_secret,
        }),
    ))
}

// ---------------------------------------------------------------------------- oauth

/// Form fields of `POST /oauth/token` (RFC 6749 client credentials grant). The client
/// may instead send its id and secret with HTTP Basic authentication.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// Must be `client_credentials`.
    pub grant_type: Option<String>,
    /// The client id, unless sent by Basic authentication.
    pub client_id: Option<String>,
    /// The client secret, unless sent by Basic authentication.
    pub client_secret: Option<String>,
}

/// An app access token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// The JWT to send as `Authorization: Bearer`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Exchanges client credentials for an app access token.
#[utoipa::path(post, path = "/oauth/token",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "A token", body = TokenResponse),
        (status = 400, description = "Unsupported grant type or malformed form", body = ErrorBody),
        (status = 401, description = "Unknown client or wrong secret", body = ErrorBody)))]
async fn oauth_token(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<TokenResponse>, ApiError> {
    let form: TokenRequest = serde_urlencoded::from_bytes(&body)
        .map_err(|e| ApiError::bad_request("invalid_request", format!("malformed form: {e}")))?;
    if form.grant_type.as_deref() != Some("client_credentials") {
        return Err(ApiError::bad_request(
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        ));
    }
    let (client_id, secret) = match (
        basic_credentials(&headers),
        form.client_id,
        form.client_secret,
    ) {
        (Some(basic), _, _) => basic,
        (None, Some(id), Some(secret)) => (id, secret),
        _ => {
            return Err(ApiError::unauthorized(
                "invalid_client",
                "client_id and client_secret are required (form fields or HTTP Basic)",
            ));
        }
    };
    let invalid = || ApiError::unauthorized("invalid_client", "unknown client or wrong secret");
    let app_id = ingest
        .store
        .app_id_by_client(&client_id)?
        .ok_or_else(invalid)?;
    let app = ingest.store.app(&app_id)?.ok_or_else(invalid)?;
    if !constant_time_eq(&sha256(secret.as_bytes()), &app.client_secret_sha256) {
        return Err(invalid());
    }
    let token = ingest.tokens.issue(&app_id, now_ms() / 1000)?;
    Ok(Json(TokenResponse {
        access_token: token,
        token_type: "Bearer".into(),
        expires_in: ingest.tokens.ttl_s,
    }))
}

// ---------------------------------------------------------------------------- devices

/// Body of `POST /v1/devices`, sent by a device.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDeviceRequest {
    /// The app key of the app the device belongs to.
    pub app_key: String,
    /// What the device runs on, e.g. `android`, `ios`, `web` (up to 64 characters).
    #[serde(default)]
    pub platform: Option<String>,
    /// The network type: `wifi`, `5g`, `4g`, `3g`, `2g` or `unknown`.
    #[serde(default)]
    pub network: Option<String>,
}

/// Where a device connects.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GatewayAddresses {
    /// MQTT over TCP, e.g. `mqtt://host:9493`.
    pub mqtt: String,
    /// MQTT over WebSocket, e.g. `ws://host:8083/mqtt`.
    pub ws: String,
    /// The keep-alive herald suggests for the device's network, in seconds (where an
    /// adaptive heartbeat starts).
    pub keep_alive_s: u16,
}

/// A registered device's identity and credentials. The token is shown only here.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisterDeviceResponse {
    /// The device id (a UUID): the MQTT client id and username.
    pub device_id: String,
    /// The device token: the MQTT password.
    pub device_token: String,
    /// Where to connect.
    pub gateway: GatewayAddresses,
}

/// Registers a device with an app key.
#[utoipa::path(post, path = "/v1/devices", request_body = RegisterDeviceRequest,
    responses(
        (status = 201, description = "The device was registered", body = RegisterDeviceResponse),
        (status = 401, description = "Unknown app key", body = ErrorBody),
        (status = 403, description = "The app has as many devices as its limit allows (`device_limit_reached`)", body = ErrorBody),
        (status = 422, description = "Invalid body", body = ErrorBody)))]
async fn register_device(
    State(ingest): State<Arc<Ingest>>,
    ApiJson(req): ApiJson<RegisterDeviceRequest>,
) -> Result<(StatusCode, Json<RegisterDeviceResponse>), ApiError> {
    let platform = req.platform.unwrap_or_default();
    if platform.chars().count() > 64 {
        return Err(ApiError::invalid("platform must be at most 64 characters"));
    }
    let network = req.network.unwrap_or_else(|| "unknown".into());
    if !NETWORKS.contains(&network.as_str()) {
        return Err(ApiError::invalid(format!(
            "network must be one of {}",
            NETWORKS.join(", ")
        )));
    }
    let app_id = ingest
        .store
        .app_id_by_key(&req.app_key)?
        .ok_or_else(|| ApiError::unauthorized("invalid_app_key", "unknown app key"))?;
    // Held until this registration is applied (or failed), so that the ones in flight
    // count against the app's limit too.
    let _slot = ingest.device_slot(&app_id)?;
    let device_id = Uuid::new_v4().to_string();
    let device_token = random_token::<32>()?;
    let event = Event::new(
        now_ms(),
        Kind::DeviceRegistered(DeviceRegistered {
            device_id: device_id.clone(),
            app_id,
            token_sha256: sha256(device_token.as_bytes()),
            platform,
            network: network.clone(),
        }),
    );
    let network_of_device = network;
    let at = ingest.append(&device_id, &event).await?;
    ingest.wait_applied(at).await?;
    // The same answer GET /v1/nav gives for this device.
    let placed = ingest.nav.place(&device_id);
    let keep_alive_s = ingest.config.keep_alive_s(&network_of_device);
    Ok((
        StatusCode::CREATED,
        Json(RegisterDeviceResponse {
            device_id,
            device_token,
            gateway: GatewayAddresses {
                mqtt: placed.mqtt,
                ws: placed.ws,
                keep_alive_s,
            },
        }),
    ))
}

// ---------------------------------------------------------------------------- messages

/// Who a push goes to: exactly one of the fields.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushTarget {
    /// One device of the calling app.
    #[serde(default)]
    pub device_id: Option<String>,
    /// `true`: every device of the calling app.
    #[serde(default)]
    pub broadcast: Option<bool>,
    /// Devices with this alias (not available yet: answered 422).
    #[serde(default)]
    pub alias: Option<String>,
    /// Devices matching a tag expression (not available yet: answered 422).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub tags: Option<serde_json::Value>,
}

/// How urgent a push is.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// The default.
    Normal,
    /// Time-sensitive.
    High,
}

/// Body of `POST /v1/messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// Who it goes to.
    pub to: PushTarget,
    /// Any JSON value, delivered as the envelope's `data` (limit: `max_data_bytes`,
    /// 4 KiB by default, measured as compact JSON).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// Seconds it may wait for a device (default 24 h, at most 28 days).
    #[serde(default)]
    pub ttl_s: Option<u32>,
    /// `normal` (default) or `high`.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// Pushes with the same key replace each other (recorded now; replacement arrives
    /// with the delivery-contract work).
    #[serde(default)]
    pub collapse_key: Option<String>,
}

/// A push was accepted: it is durable in the log.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PushResponse {
    /// The message id.
    pub message_id: String,
}

/// The header that makes a push idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// JSON with object keys sorted, so two equal requests hash equally however their keys
/// were ordered.
fn canonical_json(v: &serde_json::Value, out: &mut Vec<u8>) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(
                    serde_json::Value::String((*k).clone())
                        .to_string()
                        .as_bytes(),
                );
                out.push(b':');
                if let Some(x) = map.get(*k) {
                    canonical_json(x, out);
                }
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(x, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or_else(|| {
            ApiError::invalid("Idempotency-Key must be 1 to 255 visible ASCII characters")
        })?;
    Ok(Some(key.to_owned()))
}

/// The answer to a push whose Idempotency-Key was already used.
fn replayed(
    rec: &herald_projections::model::IdempotencyRecord,
    request_sha256: &[u8],
) -> Result<(StatusCode, Json<PushResponse>), ApiError> {
    if rec.request_sha256 == request_sha256 {
        Ok((
            StatusCode::OK,
            Json(PushResponse {
                message_id: rec.message_id.clone(),
            }),
        ))
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request",
        ))
    }
}

/// Publishes a push. Answered only once the push is durable.
///
/// With an `Idempotency-Key` header, the same key and the same request within the
/// idempotency window (24 h by default) answer `200` with the first push's
/// `message_id` and make no second message, also across restarts; the same key with a
/// different request is `409`.
#[utoipa::path(post, path = "/v1/messages", request_body = PushRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Makes retries safe: the same key and request give the same message")),
    responses(
        (status = 202, description = "Accepted and durable", body = PushResponse),
        (status = 200, description = "A retry of an accepted push (same Idempotency-Key)", body = PushResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing, expired or forged token", body = ErrorBody),
        (status = 404, description = "No such device for this app", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another request", body = ErrorBody),
        (status = 413, description = "Data or body too large", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
        (status = 503, description = "Not confirmed durable; retry, with the same Idempotency-Key so that a push which did reach the log is not made twice", body = ErrorBody)),
    security(("app_token" = [])))]
async fn push(
    State(ingest): State<Arc<Ingest>>,
    AppAuth(app_id): AppAuth,
    headers: HeaderMap,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<(StatusCode, Json<PushResponse>), ApiError> {
    let key = idempotency_key(&headers)?;
    let req = PushRequest::deserialize(&body).map_err(|e| ApiError::invalid(e.to_string()))?;
    let Some(key) = key else {
        let (message_id, _) = accept(&ingest, &app_id, req, None).await?;
        return Ok((StatusCode::ACCEPTED, Json(PushResponse { message_id })));
    };
    let mut canonical = Vec::new();
    canonical_json(&body, &mut canonical);
    let hash = sha256(&canonical);
    // One request per key at a time in this process; the fold settles races between
    // processes (the first push with a key in the log wins).
    let _guard = ingest.idempotency_lock(&app_id, &key).lock().await;
    // A push accepted before a crash may not be applied yet: catch up first.
    ingest.catch_up().await;
    if let Some(rec) = ingest.store.idempotency_record(&app_id, &key, now_ms())? {
        return replayed(&rec, &hash);
    }
    let (message_id, offset) =
        accept(&ingest, &app_id, req, Some((key.clone(), hash.clone()))).await?;
    ingest.wait_applied(offset).await?;
    match ingest.store.idempotency_record(&app_id, &key, now_ms())? {
        Some(rec) if rec.message_id != message_id => replayed(&rec, &hash),
        _ => Ok((StatusCode::ACCEPTED, Json(PushResponse { message_id }))),
    }
}

/// Validates, seals and appends a push; returns its message id and log offset once
/// it is durable.
async fn accept(
    ingest: &Ingest,
    app_id: &str,
    req: PushRequest,
    idempotency: Option<(String, Vec<u8>)>,
) -> Result<(String, crate::Appended), ApiError> {
    let cfg = &ingest.config;
    let to = match (
        &req.to.device_id,
        req.to.broadcast,
        &req.to.alias,
        &req.to.tags,
    ) {
        (Some(d), None, None, None) => To::DeviceId(d.clone()),
        (None, Some(true), None, None) => To::Broadcast(true),
        (None, Some(false), None, None) => {
            return Err(ApiError::invalid("to.broadcast must be true when given"));
        }
        (None, None, Some(_), None) | (None, None, None, Some(_)) => {
            return Err(ApiError::invalid(
                "targeting by alias or tags is not available yet; use device_id or broadcast",
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "to must have exactly one of device_id, broadcast",
            ));
        }
    };
    let ttl_s = req.ttl_s.unwrap_or(cfg.default_ttl_s);
    if ttl_s == 0 || ttl_s > cfg.max_ttl_s {
        return Err(ApiError::invalid(format!(
            "ttl_s must be between 1 and {}",
            cfg.max_ttl_s
        )));
    }
    let collapse_key = req.collapse_key.unwrap_or_default();
    if collapse_key.len() > 128 {
        return Err(ApiError::invalid("collapse_key must be at most 128 bytes"));
    }
    let data = serde_json::to_vec(&req.data)
        .map_err(|e| ApiError::invalid(format!("data is not serializable: {e}")))?;
    let limits = ingest.limits_of(app_id)?;
    let max_data_bytes = limits
        .max_data_bytes
        .map_or(cfg.max_data_bytes, |m| (m as usize).min(cfg.max_data_bytes));
    if data.len() > max_data_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "data_too_large",
            format!(
                "data is {} bytes; the limit is {max_data_bytes} bytes",
                data.len()
            ),
        ));
    }
    ingest.take(app_id, crate::limits::Rate::Pushes, limits.pushes_per_s)?;
    if matches!(to, To::Broadcast(_)) {
        ingest.take(
            app_id,
            crate::limits::Rate::Broadcasts,
            limits.broadcasts_per_min,
        )?;
    }
    let message_id = Uuid::now_v7().to_string();
    let key = match &to {
        To::DeviceId(device_id) => {
            // Another app's device is answered exactly like a device that does not exist.
            match ingest.store.device(device_id)? {
                Some(d) if d.app_id == app_id => device_id.clone(),
                _ => return Err(ApiError::not_found("device")),
            }
        }
        // A multi-target push is keyed by its message id, or by its Idempotency-Key so
        // that every retry lands in one partition, whose fold lets only the first count.
        To::Broadcast(_) => match &idempotency {
            Some((key, _)) => format!("{app_id}:{key}"),
            None => message_id.clone(),
        },
    };
    let sealed = ingest
        .keyring
        .seal(random_bytes::<12>()?, &message_id, &data)
        .map_err(|e| {
            tracing::error!(error = %e, "cannot seal a payload");
            ApiError::unavailable("cannot seal the payload")
        })?;
    let (idempotency_key, request_sha256) = idempotency.unwrap_or_default();
    let event = Event::new(
        now_ms(),
        Kind::PushAccepted(PushAccepted {
            message_id: message_id.clone(),
            app_id: app_id.to_owned(),
            target: Some(Target { to: Some(to) }),
            payload: Some(sealed),
            ttl_s,
            priority: matches!(req.priority, Some(Priority::High)) as u32,
            collapse_key,
            idempotency_window_s: if idempotency_key.is_empty() {
                0
            } else {
                cfg.idempotency_window_s
            },
            idempotency_key,
            request_sha256,
            max_inbox_entries: limits.max_inbox_entries.unwrap_or(0),
        }),
    );
    let span = tracing::debug_span!("push", app_id, message_id = %message_id);
    let at = tracing::Instrument::instrument(ingest.append(&key, &event), span.clone()).await?;
    span.in_scope(|| tracing::debug!(partition = at.partition, offset = at.offset, "accepted"));
    herald_telemetry::metrics::push_accepted(app_id);
    Ok((message_id, at))
}

/// A message's delivery status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageStatusResponse {
    /// The message id.
    pub message_id: String,
    /// `pending` (some targets have not confirmed), `delivered` (every target confirmed,
    /// or lost it to a replacement or a drop), `replaced` (every target lost it to a
    /// newer push with the same collapse key), `dropped` (every target's inbox dropped
    /// it for newer entries, over the app's `max_inbox_entries`), `expired` (its TTL
    /// passed first), `recalled`, or `no_targets`.
    pub state: String,
    /// Devices it was put in the inbox of.
    pub targeted: u64,
    /// Devices that confirmed receipt (MQTT PUBACK, or PUBCOMP at QoS 2).
    pub delivered: u64,
    /// Devices that acknowledged it. A stock MQTT client acknowledges with its PUBACK,
    /// and the herald SDK sends the PUBACK only after the app's handler returns, so
    /// this equals `delivered` today.
    pub acked: u64,
    /// Targets that had not confirmed when it expired.
    pub expired: u64,
    /// Targets that had not confirmed when it was recalled.
    pub recalled: u64,
    /// Targets where a newer push with the same collapse key replaced it first.
    pub replaced: u64,
    /// Targets whose inbox dropped it for newer entries before receipt (the app's limit
    /// of entries waiting per device).
    pub dropped: u64,
    /// When it was accepted (ms since the Unix epoch).
    pub accepted_at_ms: u64,
    /// When it expires (ms since the Unix epoch).
    pub expires_at_ms: u64,
}

impl MessageStatusResponse {
    /// The status of `m` at `now_ms`.
    pub(crate) fn new(m: herald_projections::model::MessageStatus, now_ms: u64) -> Self {
        let outstanding = m.outstanding();
        let expired_now = now_ms >= m.expires_at_ms;
        let state = if m.recalled {
            "recalled"
        } else if m.targeted == 0 {
            "no_targets"
        } else if outstanding == 0 {
            match (m.acked, m.replaced) {
                (0, 0) => "dropped",
                (0, _) => "replaced",
                _ => "delivered",
            }
        } else if expired_now {
            "expired"
        } else {
            "pending"
        };
        MessageStatusResponse {
            message_id: m.message_id,
            state: state.into(),
            targeted: m.targeted,
            delivered: m.acked,
            acked: m.acked,
            expired: if expired_now && !m.recalled {
                outstanding
            } else {
                0
            },
            recalled: m.recalled_targets,
            replaced: m.replaced,
            dropped: m.dropped,
            accepted_at_ms: m.ts_ms,
            expires_at_ms: m.expires_at_ms,
        }
    }
}

/// Reads a message of the calling app, catching up with the log first if it is not
/// there yet (it may have been accepted a moment ago).
async fn own_message(
    ingest: &Ingest,
    app_id: &str,
    id: &str,
) -> Result<herald_projections::model::MessageStatus, ApiError> {
    let mut status = ingest.store.message_status(id)?;
    if status.is_none() {
        ingest.catch_up().await;
        status = ingest.store.message_status(id)?;
    }
    match status {
        Some(m) if m.app_id == app_id => Ok(m),
        // Another app's message is answered exactly like one that does not exist.
        _ => Err(ApiError::not_found("message")),
    }
}

/// A message's status.
#[utoipa::path(get, path = "/v1/messages/{id}",
    params(("id" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "The status", body = MessageStatusResponse),
        (status = 401, description = "Missing, expired or forged token", body = ErrorBody),
        (status = 404, description = "No such message for this app", body = ErrorBody)),
    security(("app_token" = [])))]
async fn message_status(
    State(ingest): State<Arc<Ingest>>,
    AppAuth(app_id): AppAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MessageStatusResponse>, ApiError> {
    let m = own_message(&ingest, &app_id, &id).await?;
    Ok(Json(MessageStatusResponse::new(m, now_ms())))
}

/// Recalls a message: none of its entries is sent afterwards (entries already written to
/// a device's connection cannot be taken back). Recalling twice is harmless.
#[utoipa::path(delete, path = "/v1/messages/{id}",
    params(("id" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "Recalled; the status after the recall", body = MessageStatusResponse),
        (status = 401, description = "Missing, expired or forged token", body = ErrorBody),
        (status = 404, description = "No such message for this app", body = ErrorBody),
        (status = 503, description = "Not recalled; retry", body = ErrorBody)),
    security(("app_token" = [])))]
async fn recall(
    State(ingest): State<Arc<Ingest>>,
    AppAuth(app_id): AppAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MessageStatusResponse>, ApiError> {
    let m = own_message(&ingest, &app_id, &id).await?;
    if !m.recalled {
        let event = Event::new(
            now_ms(),
            Kind::MessageRecalled(MessageRecalled {
                message_id: id.clone(),
                app_id: app_id.clone(),
            }),
        );
        let key = m.unicast_device.clone().unwrap_or_else(|| id.clone());
        let at = ingest.append(&key, &event).await?;
        ingest.wait_applied(at).await?;
    }
    let m = own_message(&ingest, &app_id, &id).await?;
    Ok(Json(MessageStatusResponse::new(m, now_ms())))
}

// ---------------------------------------------------------------------------- misc

/// Liveness: 503 only when a restart is what the process needs (its event log was
/// poisoned by a failed write or fsync).
#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, description = "Alive", body = crate::health::HealthReport),
    (status = 503, description = "Needs a restart: the event log is poisoned", body = crate::health::HealthReport)))]
async fn healthz(State(ingest): State<Arc<Ingest>>) -> Response {
    ingest.health.respond(false)
}

/// Readiness: 503 while the process cannot serve (the event log refusing or failed, the
/// store not answering, a listener not accepting); the body names each part's state.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Ready", body = crate::health::HealthReport),
    (status = 503, description = "Not ready: the body says what is not", body = crate::health::HealthReport)))]
async fn readyz(State(ingest): State<Arc<Ingest>>) -> Response {
    ingest.health.respond(true)
}

async fn not_found(method: axum::http::Method) -> ApiError {
    herald_telemetry::metrics::http_request(
        "unmatched",
        method.as_str(),
        StatusCode::NOT_FOUND.as_str(),
        std::time::Duration::ZERO,
    );
    ApiError::not_found("route")
}

/// Counts every routed request by its route pattern, method and status, and times it.
async fn track(
    path: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let began = std::time::Instant::now();
    let method = req.method().clone();
    let span = tracing::debug_span!("request", method = %method, route = path.as_str());
    let response = tracing::Instrument::instrument(next.run(req), span).await;
    herald_telemetry::metrics::http_request(
        path.as_str(),
        method.as_str(),
        response.status().as_str(),
        began.elapsed(),
    );
    response
}

/// Prometheus metrics of this process, in the text exposition format.
#[utoipa::path(get, path = "/metrics",
    responses((status = 200, description = "Prometheus text format (0.0.4)",
        content_type = "text/plain", body = String)))]
async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            herald_telemetry::metrics::CONTENT_TYPE,
        )],
        herald_telemetry::metrics::render(),
    )
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "app_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// `GET /v1/nav` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct NavQuery {
    /// The device id (a UUID).
    pub device_id: Option<String>,
}

/// The gateway a device should connect to: chosen by a consistent hash ring with bounded
/// loads over the gateways alive now, and stable while that gateway stays alive. The same
/// answer as in the device's registration response. Needs no token: it reveals nothing
/// about whether the device exists.
#[utoipa::path(get, path = "/v1/nav", params(NavQuery),
    responses(
        (status = 200, description = "Where to connect", body = crate::nav::Placement),
        (status = 400, description = "device_id missing or not a UUID", body = ErrorBody)))]
async fn navigate(
    State(ingest): State<Arc<Ingest>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<crate::nav::Placement>, ApiError> {
    let q: NavQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_query", format!("invalid query: {e}")))?;
    let id = q
        .device_id
        .ok_or_else(|| ApiError::bad_request("invalid_query", "device_id is required"))?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request("invalid_query", "device_id must be a UUID"))?
        .to_string();
    // Only a registered device's placement is remembered (the answer looks the same
    // either way, so it tells nothing about which ids exist).
    if ingest.store.device(&id)?.is_some() {
        Ok(Json(ingest.nav.place(&id)))
    } else {
        Ok(Json(ingest.nav.peek(&id)))
    }
}

/// The OpenAPI description of the API, generated from the handlers above.
#[derive(OpenApi)]
#[openapi(
    info(title = "herald", description = "Durable, real-time push-message delivery."),
    paths(create_app, oauth_token, register_device, push, message_status, recall, navigate, healthz, readyz, metrics),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

/// The whole API's description: the routes here and the admin routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::admin::AdminApiDoc::openapi());
    doc.merge(crate::console::ConsoleApiDoc::openapi());
    doc
}

async fn openapi_json() -> impl IntoResponse {
    Json(openapi())
}

/// Navigation alone (`herald nav`): `GET /v1/nav` and `/healthz`.
pub(crate) fn nav_router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/nav", get(navigate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn(track))
        .fallback(not_found)
        .with_state(ingest)
}

pub(crate) fn router(ingest: Arc<Ingest>) -> Router {
    let limit = ingest.config.max_body_bytes;
    Router::new()
        .route("/v1/apps", post(create_app))
        .route("/oauth/token", post(oauth_token))
        .route("/v1/devices", post(register_device))
        .route("/v1/messages", post(push))
        .route("/v1/messages/{id}", get(message_status).delete(recall))
        .route("/v1/nav", get(navigate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics))
        .merge(crate::admin::routes())
        .merge(crate::console::routes())
        .route_layer(axum::middleware::from_fn(track))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(ingest)
}
