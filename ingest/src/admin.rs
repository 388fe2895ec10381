//! Admin routes beyond app creation: reading the log. `herald replay --api` uses
//! `GET /v1/admin/events`.
//!
//! The log is streamed as JSON lines ([`crate::replay`] has the format) in pages of
//! [`PAGE_RECORDS`] records, so a replay of any length holds one page in memory. The
//! range is fixed when the request arrives (`to` defaults to the durable end then) and
//! sent in the `x-herald-from` / `x-herald-to` headers, so a client can show progress.
//! Payloads stay sealed: the server never opens them for a replay.
//!
//! [`AdminApiDoc`] describes the route for OpenAPI; `routes::openapi` merges it into
//! `/openapi.json`.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use herald_eventlog::Offset;
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use crate::Ingest;
use crate::auth::Admin;
use crate::error::{ApiError, ErrorBody};
use crate::replay::{Filter, PAGE_RECORDS, Replay};

/// The media type of the event stream.
pub const NDJSON: &str = "application/x-ndjson";
/// The header with the first offset of the replayed range.
pub const FROM_HEADER: &str = "x-herald-from";
/// The header with the end (exclusive) of the replayed range.
pub const TO_HEADER: &str = "x-herald-to";

/// Output is sent once this many bytes are ready (or the range is done), so a selective
/// filter does not send one tiny chunk per page.
const FLUSH_BYTES: usize = 256 * 1024;

/// The admin routes, merged into the API router.
pub fn routes() -> Router<Arc<Ingest>> {
    Router::new().route("/v1/admin/events", get(events))
}

/// The query of `GET /v1/admin/events`. Every condition given must hold.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// The partition to read, on a topic of several (default 0); offsets are the
    /// partition's.
    pub partition: Option<u32>,
    /// First offset to read (default 0).
    #[param(value_type = Option<u64>)]
    pub from: Option<Offset>,
    /// Offset to stop before (default: the durable end when the request arrives; larger
    /// values are cut to it, and one before `from` reads nothing).
    #[param(value_type = Option<u64>)]
    pub to: Option<Offset>,
    /// Only events with `ts_ms` at or after this (ms since the Unix epoch).
    pub from_ts: Option<u64>,
    /// Only events with `ts_ms` before this (ms since the Unix epoch; one before
    /// `from_ts` keeps nothing).
    pub to_ts: Option<u64>,
    /// Only events about this app (its own events and its devices').
    pub app: Option<String>,
    /// Only events about this device (its events, pushes to it, its app's broadcasts).
    pub device: Option<String>,
    /// Only events about this message (its push, acks, receipts, recall).
    pub message: Option<String>,
    /// Only these event types, comma-separated (e.g. `PushAccepted,DeviceAcked`;
    /// ASCII case is ignored).
    #[serde(rename = "type")]
    #[param(rename = "type", pattern = r"^[A-Za-z0-9]+(,[A-Za-z0-9]+)*$")]
    pub types: Option<String>,
}

impl EventsQuery {
    /// The filter this query asks for.
    pub fn filter(&self) -> Result<Filter, ApiError> {
        let types = match &self.types {
            Some(list) if list.contains(char::is_whitespace) => {
                return Err(invalid_query(
                    "type: names separated by commas, without spaces",
                ));
            }
            Some(list) => {
                Filter::parse_types(list).map_err(|e| invalid_query(format!("type: {e}")))?
            }
            None => Vec::new(),
        };
        // A time range the wrong way round keeps nothing (an empty window at from_ts).
        let to_ts = match (self.from_ts, self.to_ts) {
            (Some(from), Some(to)) if to < from => Some(from),
            (_, to) => to,
        };
        let filter = Filter {
            from_ts_ms: self.from_ts,
            to_ts_ms: to_ts,
            app: self.app.clone(),
            device: self.device.clone(),
            message: self.message.clone(),
            types,
        };
        filter.validate().map_err(invalid_query)?;
        Ok(filter)
    }
}

pub(crate) fn invalid_query(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_query", e.to_string())
}

/// The OpenAPI description of the admin log routes, to be merged into the API's.
#[derive(OpenApi)]
#[openapi(paths(events))]
pub struct AdminApiDoc;

/// Streams the event log as JSON lines (admin only).
///
/// One JSON object per line: `{"offset","ts_ms","type","schema_version","event"}`, with
/// bytes as base64 and push payloads sealed. The range read is in the `x-herald-from`
/// and `x-herald-to` headers. A storage failure mid-stream aborts the response.
#[utoipa::path(get, path = "/v1/admin/events", params(EventsQuery),
    responses(
        (status = 200, description = "The events, one JSON object per line",
            content_type = "application/x-ndjson", body = String,
            headers(
                ("x-herald-from" = u64, description = "First offset of the range read"),
                ("x-herald-to" = u64, description = "End of the range read (exclusive)"))),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "An app's or a device's credentials", body = ErrorBody),
        (status = 404, description = "No such partition", body = ErrorBody)),
    security(("admin_token" = [])))]
async fn events(
    State(ingest): State<Arc<Ingest>>,
    _admin: Admin,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| invalid_query(e.body_text()))?;
    let filter = q.filter()?;
    let partition = q.partition.unwrap_or(0);
    if partition >= ingest.log.count() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "partition {partition} does not exist: the topic has {}",
                ingest.log.count()
            ),
        ));
    }
    let log = ingest.log.get(partition).clone();
    let end = *log.durable_end().borrow();
    let from = q.from.unwrap_or(0);
    // Nothing past the durable end exists yet; an empty range (or one the wrong way
    // round) reads nothing.
    let to = q.to.unwrap_or(end).min(end).max(from);

    let store = ingest.store.clone();
    let replay = Replay::new(filter, move |device: &str| match store.device(device) {
        Ok(d) => d.map(|d| d.app_id),
        Err(e) => {
            tracing::warn!(error = %e, "replay: cannot look up a device's app");
            None
        }
    });
    let state = Page {
        log,
        replay,
        next: from,
        to,
    };
    let stream = futures::stream::unfold(state, |mut page| async move {
        match page.next_chunk().await {
            Ok(Some(bytes)) => Some((Ok(bytes), page)),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, offset = page.next, "replay: reading the log failed");
                // Ending the stream here would look like a complete replay; the error
                // aborts the response instead, and the next call ends the stream.
                page.next = page.to;
                Some((Err(e), page))
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    headers.insert(FROM_HEADER, HeaderValue::from(from));
    headers.insert(TO_HEADER, HeaderValue::from(to));
    Ok(response)
}

/// The state of one streamed replay.
struct Page<L> {
    log: Arc<dyn herald_eventlog::EventLog>,
    replay: Replay<L>,
    next: Offset,
    to: Offset,
}

impl<L: FnMut(&str) -> Option<String>> Page<L> {
    /// Reads pages until [`FLUSH_BYTES`] of lines are ready or the range is done;
    /// `None` once it is done and everything was sent.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, herald_eventlog::Error> {
        let mut out = Vec::new();
        while self.next < self.to && out.len() < FLUSH_BYTES {
            let max = PAGE_RECORDS.min((self.to - self.next) as usize);
            let records = self.log.read(self.next, max).await?;
            let Some(last) = records.last() else {
                // The range ends at or before the durable end, so a page is never empty.
                return Err(herald_eventlog::Error::Corrupt {
                    offset: self.next,
                    reason: "no record below the durable end".into(),
                });
            };
            self.next = last.offset + 1;
            for record in &records {
                self.replay.render(record, &mut out);
            }
        }
        if out.is_empty() {
            Ok(None)
        } else {
            Ok(Some(Bytes::from(out)))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::IngestConfig;
    use axum::extract::FromRequestParts;
    use axum::http::Request;
    use herald_eventlog::embedded::EmbeddedLog;
    use herald_eventlog::{Append, EventLog, Record};
    use herald_projections::memory::MemStore;
    use herald_schemas::events::{self, DeviceAcked, Event, Kind};
    use herald_schemas::seal::Keyring;

    const TOKEN: &str = "admin-token-for-tests-0123";

    async fn ingest(dir: &std::path::Path, n: u64) -> Arc<Ingest> {
        let log = Arc::new(EmbeddedLog::open(dir).unwrap());
        let records = (0..n)
            .map(|i| {
                let kind = Kind::DeviceAcked(DeviceAcked {
                    device_id: format!("d{}", i % 3),
                    seq: i,
                    message_id: format!("m{i}"),
                    gateway_id: "g".into(),
                });
                Record {
                    key: b"k".to_vec(),
                    value: events::encode(&Event::new(1000 + i, kind)),
                }
            })
            .collect();
        log.append(records).await.unwrap();
        // An append resolves just before the durable end moves past it.
        log.durable_end().wait_for(|end| *end >= n).await.unwrap();
        let (_tx, applied) = tokio::sync::watch::channel(0);
        Ingest::new(
            IngestConfig {
                admin_token: TOKEN.into(),
                ..IngestConfig::default()
            },
            log,
            Arc::new(MemStore::default()),
            applied,
            Keyring::new(1, &[0u8; 32]),
            b"jwt-secret-for-tests-0123456789ab",
        )
    }

    async fn call(ingest: &Arc<Ingest>, uri: &str) -> Result<Response, ApiError> {
        let (mut parts, ()) = Request::get(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(())
            .unwrap()
            .into_parts();
        let admin = Admin::from_request_parts(&mut parts, ingest).await?;
        let query = Query::<EventsQuery>::from_request_parts(&mut parts, &()).await;
        events(State(ingest.clone()), admin, query).await
    }

    async fn body(r: Response) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn streams_the_range_in_pages_with_its_bounds_in_headers() {
        let dir = tempfile::tempdir().unwrap();
        let n = PAGE_RECORDS as u64 * 2 + 5;
        let ingest = ingest(dir.path(), n).await;

        let r = call(&ingest, "/v1/admin/events").await.unwrap();
        assert_eq!(r.headers()[CONTENT_TYPE], NDJSON);
        assert_eq!(r.headers()[FROM_HEADER], "0");
        assert_eq!(r.headers()[TO_HEADER], n.to_string().as_str());
        let text = body(r).await;
        let offsets: Vec<u64> = text
            .lines()
            .map(|l| crate::replay::line_offset(l.as_bytes()).unwrap())
            .collect();
        assert_eq!(offsets, (0..n).collect::<Vec<_>>());

        // A window, a time range and a device; `to` past the end is cut to it.
        let r = call(
            &ingest,
            "/v1/admin/events?from=10&to=999999&from_ts=1012&to_ts=1020&device=d1&type=deviceacked",
        )
        .await
        .unwrap();
        assert_eq!(r.headers()[TO_HEADER], n.to_string().as_str());
        let text = body(r).await;
        let offsets: Vec<u64> = text
            .lines()
            .map(|l| crate::replay::line_offset(l.as_bytes()).unwrap())
            .collect();
        assert_eq!(offsets, vec![13, 16, 19]);

        // The one partition, named.
        let r = call(&ingest, "/v1/admin/events?partition=0&from=3&to=5")
            .await
            .unwrap();
        assert_eq!(body(r).await.lines().count(), 2);

        // Past the end: empty, not an error.
        let r = call(&ingest, &format!("/v1/admin/events?from={}", n + 10))
            .await
            .unwrap();
        assert_eq!(body(r).await, "");
    }

    #[tokio::test]
    async fn bad_queries_and_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ingest = ingest(dir.path(), 3).await;
        for (uri, status, needle) in [
            ("/v1/admin/events?from=abc", 400, "from"),
            ("/v1/admin/events?type=A,,B", 400, "type"),
            ("/v1/admin/events?type=A,%20B", 400, "without spaces"),
            ("/v1/admin/events?nope=1", 400, "nope"),
            ("/v1/admin/events?partition=-1", 400, "partition"),
            // The topic has one partition: another is a resource that is not there.
            (
                "/v1/admin/events?partition=1",
                404,
                "partition 1 does not exist",
            ),
        ] {
            let e = call(&ingest, uri).await.unwrap_err();
            assert_eq!(e.status.as_u16(), status, "{uri}");
            assert!(e.message.contains(needle), "{uri}: {}", e.message);
        }
        // Ranges the wrong way round read nothing (a query the document allows is
        // answered, not refused).
        for uri in [
            "/v1/admin/events?to=1&from=2",
            "/v1/admin/events?from_ts=5&to_ts=1",
        ] {
            let r = call(&ingest, uri).await.unwrap();
            assert_eq!(body(r).await, "", "{uri}");
        }

        let (mut parts, ()) = Request::get("/v1/admin/events")
            .header("authorization", "Bearer wrong")
            .body(())
            .unwrap()
            .into_parts();
        let e = Admin::from_request_parts(&mut parts, &ingest)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn the_route_is_described_for_openapi() {
        let doc = AdminApiDoc::openapi();
        let json = serde_json::to_string(&doc).unwrap();
        assert!(json.contains("/v1/admin/events"));
        assert!(json.contains("x-herald-to"));
        assert!(json.contains("application/x-ndjson"));
    }
}
