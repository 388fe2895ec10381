//! Authentication: the admin bearer token, OAuth2 client credentials, and app JWTs.
//!
//! App tokens are HS256 JWTs signed with the server's secret. Verification names its one
//! algorithm explicitly and requires `exp`, `iss` and `sub`: a token with `alg: none`,
//! another algorithm, another key, no expiry or a past expiry is refused with 401.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use herald_schemas::seal::constant_time_eq;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Ingest;
use crate::error::ApiError;

/// The issuer claim of herald's tokens.
pub const ISSUER: &str = "herald";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    iat: u64,
    exp: u64,
}

/// Signs and verifies app tokens.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Lifetime of a new token, in seconds.
    pub ttl_s: u64,
}

impl Tokens {
    /// Tokens signed with `secret`, valid for `ttl_s` seconds.
    pub fn new(secret: &[u8], ttl_s: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.set_issuer(&[ISSUER]);
        validation.validate_exp = true;
        // One process signs and checks; there is no clock skew to allow for.
        validation.leeway = 0;
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_s,
        }
    }

    /// A token for `app_id`, issued at `now_s`.
    pub fn issue(&self, app_id: &str, now_s: u64) -> Result<String, ApiError> {
        let claims = Claims {
            iss: ISSUER.into(),
            sub: app_id.into(),
            iat: now_s,
            exp: now_s + self.ttl_s,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(|e| {
            tracing::error!(error = %e, "cannot sign a token");
            ApiError::unavailable("cannot issue a token now")
        })
    }

    /// The app id a valid token was issued to.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                let msg = match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::InvalidSignature => "the token's signature is not valid",
                    ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted",
                    _ => "the token is not valid",
                };
                ApiError::unauthorized("invalid_token", msg)
            })?;
        Ok(data.claims.sub)
    }
}

/// SHA-256 of a secret, as kept in events.
pub fn sha256(secret: &[u8]) -> Vec<u8> {
    Sha256::digest(secret).to_vec()
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized(
            "missing_token",
            "an Authorization: Bearer token is required",
        )
    })?;
    let value = value.to_str().map_err(|_| {
        ApiError::unauthorized("invalid_token", "the Authorization header is not text")
    })?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        ApiError::unauthorized("invalid_token", "expected Authorization: Bearer <token>")
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::unauthorized(
            "invalid_token",
            "expected Authorization: Bearer <token>",
        ));
    }
    Ok(token.trim())
}

/// The cookie that carries an admin console session.
pub const SESSION_COOKIE: &str = "herald_admin";

/// The subject of an admin session token.
const ADMIN_SUBJECT: &str = "admin";

/// The key admin sessions are signed with: derived from the server's token secret and the
/// admin token, so that changing the admin token ends every session, and an admin session
/// can never pass for an app token (another key) or the other way round.
pub fn session_key(jwt_secret: &[u8], admin_token: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"herald admin session\0");
    h.update(jwt_secret);
    h.update(b"\0");
    h.update(admin_token.as_bytes());
    h.finalize().to_vec()
}

/// Admin console sessions: signed, expiring tokens kept in an HttpOnly, SameSite=Strict
/// cookie. Nothing is stored server-side, so every ingest process of a deployment
/// accepts a session any of them started; log-out clears the cookie.
pub struct AdminSessions {
    tokens: Tokens,
}

impl AdminSessions {
    /// Sessions signed with `key`, valid for `ttl_s` seconds.
    pub fn new(key: &[u8], ttl_s: u64) -> Self {
        AdminSessions {
            tokens: Tokens::new(key, ttl_s),
        }
    }

    /// A new session's cookie value, issued at `now_s`.
    pub fn start(&self, now_s: u64) -> Result<String, ApiError> {
        self.tokens.issue(ADMIN_SUBJECT, now_s)
    }

    /// How long a session lasts, in seconds.
    pub fn ttl_s(&self) -> u64 {
        self.tokens.ttl_s
    }

    fn check(&self, value: &str) -> Result<(), ApiError> {
        match self.tokens.verify(value) {
            Ok(sub) if sub == ADMIN_SUBJECT => Ok(()),
            _ => Err(ApiError::unauthorized(
                "session_expired",
                "the admin session has expired or is not valid; log in again",
            )),
        }
    }
}

/// The value of cookie `name` in the request, if any.
pub fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A request made by the admin: with the admin token as a bearer, or from a console
/// session (the [`SESSION_COOKIE`]).
///
/// Refusals tell what was wrong: no credential, a wrong admin token or an expired session
/// is 401; an app's token or a device's credentials (HTTP Basic, device id and token) are
/// valid credentials of someone else, 403.
#[derive(Debug)]
pub struct Admin;

impl FromRequestParts<Arc<Ingest>> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<Ingest>) -> Result<Self, ApiError> {
        if parts.headers.get(AUTHORIZATION).is_none()
            && let Some(session) = cookie(parts, SESSION_COOKIE)
        {
            state.admin_sessions.check(session)?;
            return Ok(Admin);
        }
        if let Some(device_id) = device_basic(parts, state)? {
            return Err(forbidden(&format!("device {device_id}'s credentials")));
        }
        let token = bearer(parts)?;
        if constant_time_eq(token.as_bytes(), state.config.admin_token.as_bytes()) {
            return Ok(Admin);
        }
        if state.tokens.verify(token).is_ok() {
            return Err(forbidden("an app's token"));
        }
        Err(ApiError::unauthorized(
            "invalid_token",
            "the admin token is not valid",
        ))
    }
}

fn forbidden(whose: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::FORBIDDEN,
        "forbidden",
        format!("{whose} cannot be used for the admin API; use the admin token"),
    )
}

/// The device whose id and token are the request's HTTP Basic credentials, if they are a
/// device's.
fn device_basic(parts: &Parts, state: &Ingest) -> Result<Option<String>, ApiError> {
    use base64::Engine;
    let Some(value) = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(None);
    };
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let Some((id, token)) = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(a, b)| (a.to_owned(), b.to_owned())))
    else {
        return Ok(None);
    };
    match state.store.device(&id)? {
        Some(d) if constant_time_eq(&sha256(token.as_bytes()), &d.token_sha256) => Ok(Some(id)),
        _ => Ok(None),
    }
}

/// A request made with a valid app token: the app's id.
#[derive(Debug)]
pub struct AppAuth(pub String);

impl FromRequestParts<Arc<Ingest>> for AppAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<Ingest>) -> Result<Self, ApiError> {
        let app_id = state.tokens.verify(bearer(parts)?)?;
        if state.store.app(&app_id)?.is_none() {
            return Err(ApiError::unauthorized(
                "invalid_token",
                "the token's app does not exist",
            ));
        }
        Ok(AppAuth(app_id))
    }
}

/// A path parameter whose rejections (e.g. bytes that are not UTF-8) are herald's JSON
/// errors.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(v) = axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
        Ok(ApiPath(v))
    }
}

/// JSON body whose rejections are herald's JSON errors.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(v) = axum::Json::<serde_json::Value>::from_request(req, state).await?;
        Ok(ApiJson(json_object(v)?))
    }
}

/// `T` from a JSON body that must be an object (serde would take an array for a struct,
/// which no document of herald's allows).
pub fn json_object<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    if !v.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
    serde_json::from_value(v).map_err(|e| ApiError::invalid(e.to_string()))
}

/// The raw body, whose rejections (a body over the limit) are herald's JSON errors.
#[derive(Debug)]
pub struct ApiBytes(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(ApiBytes(b)),
            Err(e) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body exceeds the configured limit",
                ))
            }
            Err(e) => Err(ApiError::bad_request("bad_body", e.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_refuse_none_other_keys_and_expiry() {
        let t = Tokens::new(b"0123456789abcdef0123456789abcdef", 60);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let good = t.issue("app", now).unwrap();
        assert_eq!(t.verify(&good).unwrap(), "app");

        let other = Tokens::new(b"another key another key another k", 60);
        assert!(other.verify(&good).is_err(), "another key");

        let expired = t.issue("app", now - 120).unwrap();
        assert!(t.verify(&expired).is_err(), "expired");

        // alg: none, hand-made.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64.encode(format!(
            r#"{{"iss":"herald","sub":"app","iat":{now},"exp":{}}}"#,
            now + 60
        ));
        assert!(
            t.verify(&format!("{header}.{claims}.")).is_err(),
            "alg none"
        );

        // HS512 with the same key: the algorithm is not on the list.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims {
                iss: ISSUER.into(),
                sub: "app".into(),
                iat: now,
                exp: now + 60,
            },
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert!(t.verify(&hs512).is_err(), "other algorithm");

        // No exp claim.
        #[derive(Serialize)]
        struct NoExp {
            iss: String,
            sub: String,
        }
        let noexp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NoExp {
                iss: ISSUER.into(),
                sub: "app".into(),
            },
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert!(t.verify(&noexp).is_err(), "no exp");
    }
}
