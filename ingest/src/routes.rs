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
use crate::auth::{Admin, ApiBytes, ApiJson, ApiPath, AppAuth, sha256};
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
    #[schema(max_length = 200)]
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

/// Creates an app (admin only). The body is optional: without one the app has no name.
#[utoipa::path(post, path = "/v1/apps", request_body = Option<CreateAppRequest>,
    responses(
        (status = 201, description = "The app was created", body = CreateAppResponse,
            links(
                ("IssueToken" = (operation_id = "oauth_token",
                    request_body = json!({"grant_type": "client_credentials",
                        "client_id": "$response.body#/client_id",
                        "client_secret": "$response.body#/client_secret"}),
                    description = "An access token with the new app's credentials")),
                ("AppLimits" = (operation_id = "app_limits",
                    parameters(("path.id" = "$response.body#/app_id")),
                    description = "The new app's limits")),
                ("RotateSecret" = (operation_id = "rotate_secret",
                    parameters(("path.id" = "$response.body#/app_id")),
                    description = "A new client secret for the app")))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A body that is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid body", body = ErrorBody),
        (status = 503, description = "Not made durable; retry", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn create_app(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<(StatusCode, Json<CreateAppResponse>), ApiError> {
    // The body is optional: an empty one creates an unnamed app.
    let req: CreateAppRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateAppRequest::default()
    } else {
        let json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            });
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("malformed_json", e.to_string()))?;
        // `null` is no body, as the document's optional body allows.
        if v.is_null() {
            CreateAppRequest::default()
        } else {
            crate::auth::json_object(v)?
        }
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
    #[schema(value_type = GrantType, required = true)]
    pub grant_type: Option<String>,
    /// The client id, unless sent by Basic authentication.
    #[schema(nullable = false)]
    pub client_id: Option<String>,
    /// The client secret, unless sent by Basic authentication.
    #[schema(nullable = false)]
    pub client_secret: Option<String>,
}

/// The one grant herald offers.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
pub enum GrantType {
    /// OAuth2 client credentials (RFC 6749, section 4.4).
    ClientCredentials,
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
        (status = 401, description = "Unknown client or wrong secret", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody)))]
async fn oauth_token(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
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
    #[schema(max_length = 64)]
    pub platform: Option<String>,
    /// The network type (`unknown` when absent).
    #[serde(default)]
    #[schema(value_type = Option<Network>)]
    pub network: Option<String>,
}

/// A network type (the keep-alive policy's keys).
#[derive(Debug, ToSchema)]
pub enum Network {
    /// Wi-Fi.
    #[schema(rename = "wifi")]
    Wifi,
    /// 5G.
    #[schema(rename = "5g")]
    G5,
    /// 4G / LTE.
    #[schema(rename = "4g")]
    G4,
    /// 3G.
    #[schema(rename = "3g")]
    G3,
    /// 2G.
    #[schema(rename = "2g")]
    G2,
    /// Not known.
    #[schema(rename = "unknown")]
    Unknown,
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
        (status = 201, description = "The device was registered", body = RegisterDeviceResponse,
            links(
                ("PushToDevice" = (operation_id = "push",
                    request_body = json!({"to": {"device_id": "$response.body#/device_id"}}),
                    description = "A push to the new device")),
                ("Navigate" = (operation_id = "navigate",
                    parameters(("query.device_id" = "$response.body#/device_id")),
                    description = "The gateway the device should use")),
                ("AdminDevice" = (operation_id = "device",
                    parameters(("path.id" = "$response.body#/device_id")),
                    description = "The device as the console shows it")))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Unknown app key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "A body that is not JSON", body = ErrorBody),
        (status = 503, description = "Not made durable, or not applied in time; retry", body = ErrorBody),
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

/// Who a push goes to: exactly one of `device_id` or `broadcast` (documentation of the
/// `to` object, which the handler reads itself so that each mistake gets its own
/// message).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PushTarget {
    /// One device of the calling app.
    Device(DeviceTarget),
    /// Every device of the calling app.
    Broadcast(BroadcastTarget),
}

/// A push to one device.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceTarget {
    /// The device (of the calling app; another's is 404).
    pub device_id: String,
}

/// A push to every device of the app.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BroadcastTarget {
    /// `true`.
    #[schema(schema_with = always_true)]
    pub broadcast: bool,
}

fn always_true() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Boolean)
        .enum_values(Some([true]))
        .build()
}

/// The `to` of a push, read from its JSON.
fn target(to: &serde_json::Value) -> Result<To, ApiError> {
    use serde_json::Value;
    let Some(obj) = to.as_object() else {
        return Err(ApiError::invalid("to must be an object"));
    };
    if obj.contains_key("alias") || obj.contains_key("tags") {
        return Err(ApiError::invalid(
            "targeting by alias or tags is not available yet; use device_id or broadcast",
        ));
    }
    match (obj.len(), obj.get("device_id"), obj.get("broadcast")) {
        (1, Some(Value::String(d)), None) => Ok(To::DeviceId(d.clone())),
        (1, None, Some(Value::Bool(true))) => Ok(To::Broadcast(true)),
        (1, None, Some(Value::Bool(false))) => {
            Err(ApiError::invalid("to.broadcast must be true when given"))
        }
        (1, Some(_), None) => Err(ApiError::invalid("to.device_id must be a string")),
        (1, None, Some(_)) => Err(ApiError::invalid("to.broadcast must be true")),
        _ => Err(ApiError::invalid(
            "to must have exactly one of device_id (a string) or broadcast (true), and nothing else",
        )),
    }
}

/// An optional whole number, also written as a float with no fraction (JSON Schema's
/// integers include `60.0`), that fits `T`.
pub(crate) fn whole_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f))
            .map(|f| f as u64)
    });
    match whole {
        Some(v) => T::try_from(v)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{n} is too large"))),
        None => Err(D::Error::custom(format!("{n} is not a whole number"))),
    }
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
    #[schema(value_type = PushTarget)]
    pub to: serde_json::Value,
    /// Any JSON value, delivered as the envelope's `data` (limit: `max_data_bytes`,
    /// 4 KiB by default, measured as compact JSON).
    pub data: serde_json::Value,
    /// Seconds it may wait for a device (default 24 h, at most `max_ttl_s`: 28 days
    /// unless configured otherwise).
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 2_419_200)]
    pub ttl_s: Option<u32>,
    /// `normal` (default) or `high`.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// A newer push with the same key to the same device takes this one's place in its
    /// inbox if it was not received yet (up to 128 characters).
    #[serde(default)]
    #[schema(max_length = 128)]
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
    params(("Idempotency-Key" = Option<String>, Header, nullable = false,
        min_length = 1, max_length = 255, pattern = r"^[!-~]+$",
        description = "Makes retries safe: the same key and request give the same message (1 to 255 visible ASCII characters)")),
    responses(
        (status = 202, description = "Accepted and durable", body = PushResponse,
            links(
                ("Status" = (operation_id = "message_status",
                    parameters(("path.id" = "$response.body#/message_id")),
                    description = "The push's delivery status")),
                ("Recall" = (operation_id = "recall",
                    parameters(("path.id" = "$response.body#/message_id")),
                    description = "Recall the push")),
                ("AdminMessage" = (operation_id = "message",
                    parameters(("path.id" = "$response.body#/message_id")),
                    description = "The push's timeline in the console")))),
        (status = 200, description = "A retry of an accepted push (same Idempotency-Key)", body = PushResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing, expired or forged token", body = ErrorBody),
        (status = 404, description = "No such device for this app", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another request", body = ErrorBody),
        (status = 413, description = "Data or body too large", body = ErrorBody),
        (status = 415, description = "A body that is not JSON", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
        (status = 429, description = "Over the app's pushes per second or broadcasts per minute; `Retry-After` says when to try again", body = ErrorBody),
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
    let to = target(&req.to)?;
    let ttl_s = req.ttl_s.unwrap_or(cfg.default_ttl_s);
    if ttl_s == 0 || ttl_s > cfg.max_ttl_s {
        return Err(ApiError::invalid(format!(
            "ttl_s must be between 1 and {}",
            cfg.max_ttl_s
        )));
    }
    let collapse_key = req.collapse_key.unwrap_or_default();
    if collapse_key.chars().count() > 128 {
        return Err(ApiError::invalid(
            "collapse_key must be at most 128 characters",
        ));
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
        (status = 400, description = "An id that is not UTF-8", body = ErrorBody),
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
/// a device's connection cannot be taken back). Recalling twice is harmless. The message
/// stays readable with state `recalled`: a recall is not a deletion, which is why it is
/// not `DELETE /v1/messages/{id}`.
#[utoipa::path(post, path = "/v1/messages/{id}/recall",
    params(("id" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "Recalled; the status after the recall", body = MessageStatusResponse,
            links(("StatusAfterRecall" = (operation_id = "message_status",
                parameters(("path.id" = "$request.path.id")),
                description = "The message's status, recalled")))),
        (status = 400, description = "An id that is not UTF-8", body = ErrorBody),
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
#[into_params(parameter_in = Query)]
pub struct NavQuery {
    /// The device id (a UUID, hyphenated).
    #[param(required = true, value_type = String, format = Uuid)]
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
    // Only the hyphenated form, the one the document's `format: uuid` means.
    let id = Uuid::try_parse(&id)
        .ok()
        .filter(|_| id.len() == 36)
        .ok_or_else(|| {
            ApiError::bad_request("invalid_query", "device_id must be a UUID (hyphenated)")
        })?
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

/// The document `/openapi.json` serves: [`openapi`] with what its annotations cannot say
/// (see [`finish_document`]) for a server configured with `config`.
pub fn openapi_document(config: &crate::IngestConfig) -> serde_json::Value {
    let mut doc = serde_json::to_value(openapi()).unwrap_or_default();
    finish_document(&mut doc, config);
    doc
}

/// Says in the document what the annotations cannot:
/// - unsigned integers are `uint32`/`uint64` with their maximum (utoipa writes `int32`
///   and `int64` with a minimum of 0, and a client would take `u64` values above
///   `i64::MAX` for invalid when herald takes them);
/// - a push's `ttl_s` is at most this server's `max_ttl_s`, and an app's
///   `max_data_bytes` at most its `max_data_bytes`;
/// - each event of the overview's SSE stream is an `event` name and JSON `data`;
/// - links name their fields as OpenAPI does (`operationId`, `requestBody`; utoipa 5.5
///   writes them in snake case).
pub fn finish_document(doc: &mut serde_json::Value, config: &crate::IngestConfig) {
    use serde_json::{Value, json};
    fn unsigned(v: &mut Value) {
        match v {
            Value::Object(map) => {
                let is_int = match map.get("type") {
                    Some(Value::String(t)) => t == "integer",
                    Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                    _ => false,
                };
                let non_negative = map.get("minimum").and_then(Value::as_f64) == Some(0.0);
                if is_int && non_negative {
                    match map.get("format").and_then(Value::as_str) {
                        Some("int64") => {
                            map.insert("format".into(), json!("uint64"));
                            map.entry("maximum").or_insert(json!(u64::MAX));
                        }
                        Some("int32") => {
                            map.insert("format".into(), json!("uint32"));
                            map.entry("maximum").or_insert(json!(u32::MAX));
                        }
                        _ => {}
                    }
                }
                map.values_mut().for_each(unsigned);
            }
            Value::Array(items) => items.iter_mut().for_each(unsigned),
            _ => {}
        }
    }
    fn links(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Object(all)) = map.get_mut("links") {
                    for link in all.values_mut() {
                        if let Value::Object(link) = link {
                            for (from, to) in [
                                ("operation_id", "operationId"),
                                ("operation_ref", "operationRef"),
                                ("request_body", "requestBody"),
                            ] {
                                if let Some(x) = link.remove(from) {
                                    link.insert(to.into(), x);
                                }
                            }
                        }
                    }
                }
                map.values_mut().for_each(links);
            }
            Value::Array(items) => items.iter_mut().for_each(links),
            _ => {}
        }
    }
    unsigned(doc);
    links(doc);
    if let Some(ttl) = doc.pointer_mut("/components/schemas/PushRequest/properties/ttl_s") {
        ttl["maximum"] = json!(config.max_ttl_s);
    }
    if let Some(max) = doc.pointer_mut("/components/schemas/Limits/properties/max_data_bytes") {
        max["maximum"] = json!(config.max_data_bytes);
    }
    let event = |name: &str| {
        json!({
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "enum": [name]},
                "data": {"type": "string", "contentMediaType": "application/json"}
            }
        })
    };
    if let Some(sse) = doc.pointer_mut(
        "/paths/~1v1~1admin~1overview~1stream/get/responses/200/content/text~1event-stream",
    ) {
        sse["schema"] = json!({"oneOf": [event("history"), event("sample")]});
    }
}

async fn openapi_json(State(ingest): State<Arc<Ingest>>) -> impl IntoResponse {
    Json(openapi_document(&ingest.config))
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
        .route("/v1/messages/{id}", get(message_status))
        .route("/v1/messages/{id}/recall", post(recall))
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
