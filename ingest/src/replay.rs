//! The event log as JSON lines: the filter and the rendering shared by
//! `GET /v1/admin/events` (see [`crate::admin`]) and `herald replay`, so both print the
//! same bytes for the same records.
//!
//! # Line format
//! One JSON object per event, on one line, keys in this order:
//!
//! ```text
//! {"offset":12,"ts_ms":1714564800000,"type":"DeviceAcked","schema_version":1,
//!  "event":{"device_id":"…","seq":3,"message_id":"…","gateway_id":"gateway-1"}}
//! ```
//!
//! - `type` is [`Event::type_name`]; `event` holds the kind's fields under their names in
//!   `events.proto`. Bytes fields are base64 (standard alphabet, padded).
//! - `PushAccepted`'s target is `{"device_id":"…"}` or `{"broadcast":true}`, and its
//!   payload stays sealed: `{"key_id":1,"nonce":"…","ciphertext":"…"}`. The server never
//!   opens payloads for a replay; `herald replay --decrypt` opens them where the key is
//!   and appends `"data"` (the pushed JSON) or `"data_error"` as the line's last key
//!   ([`append_opened`]).
//! - A record that does not decode (written by a newer herald, or damaged) becomes
//!   `{"offset":N,"type":"Undecodable","error":"…"}` instead of ending the replay.
//! - A kind this build has no arm for yet still renders, as `{"debug":"<its Debug text>"}`.
//!
//! # Adding a kind
//! Add one arm to `visit`: it names each field once, and both the JSON writer and the
//! filter read the fields from there. A field named `app_id` or `device_id` is what the
//! `app` and `device` filters look at.

use std::collections::HashMap;

use base64::Engine;
use herald_eventlog::{Offset, Stored};
use herald_schemas::events::{
    self, Event, Kind, MessageRecalled, PushAccepted, SealedPayload, Target, To, fan_out,
};
use herald_schemas::seal::Keyring;
use serde::Deserialize;

/// How many records one `EventLog::read` of a replay asks for: the bound on what a
/// replay holds in memory at once, whatever the size of the log.
pub const PAGE_RECORDS: usize = 4096;

/// The `type` of a line for a record that could not be decoded.
pub const UNDECODABLE: &str = "Undecodable";

/// The most device → app answers a replay keeps; past this the cache starts over.
pub const MAX_CACHED_DEVICES: usize = 65_536;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a filter could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FilterError {
    /// A `type` list had an empty entry (e.g. `PushAccepted,,`).
    #[error("empty event type name in the list")]
    EmptyType,
    /// A `type` entry is not an event type name (letters and digits only).
    #[error("{0:?} is not an event type name (e.g. PushAccepted, DeviceAcked)")]
    BadType(String),
    /// The time range is empty the wrong way round.
    #[error("to_ts ({to}) is before from_ts ({from})")]
    TimesReversed {
        /// The start, in ms since the Unix epoch.
        from: u64,
        /// The end, in ms since the Unix epoch.
        to: u64,
    },
}

/// Which events a replay keeps. Every condition that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Keep events with `ts_ms >= from_ts_ms`.
    pub from_ts_ms: Option<u64>,
    /// Keep events with `ts_ms < to_ts_ms`.
    pub to_ts_ms: Option<u64>,
    /// Keep events about this app: those with this `app_id`, and device events of its
    /// devices.
    pub app: Option<String>,
    /// Keep events about this device: those with this `device_id`, pushes to it, and
    /// broadcasts of its app.
    pub device: Option<String>,
    /// Keep events about this message: its push, shares, acks, receipts and recall.
    pub message: Option<String>,
    /// Keep events of these types (compared ignoring ASCII case); empty keeps all.
    pub types: Vec<String>,
}

impl Filter {
    /// Parses a comma-separated list of event type names, e.g. `PushAccepted,DeviceAcked`.
    pub fn parse_types(list: &str) -> Result<Vec<String>, FilterError> {
        list.split(',')
            .map(|name| {
                let name = name.trim();
                if name.is_empty() {
                    Err(FilterError::EmptyType)
                } else if !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                    Err(FilterError::BadType(name.to_owned()))
                } else {
                    Ok(name.to_owned())
                }
            })
            .collect()
    }

    /// Checks that the conditions can hold together.
    pub fn validate(&self) -> Result<(), FilterError> {
        if let (Some(from), Some(to)) = (self.from_ts_ms, self.to_ts_ms)
            && to < from
        {
            return Err(FilterError::TimesReversed { from, to });
        }
        for t in &self.types {
            Filter::parse_types(t)?;
        }
        Ok(())
    }

    /// Whether only types and times are asked about (no device → app look-ups needed).
    fn needs_subjects(&self) -> bool {
        self.app.is_some() || self.device.is_some() || self.message.is_some()
    }

    fn wants_type(&self, name: &str) -> bool {
        self.types.is_empty() || self.types.iter().any(|t| t.eq_ignore_ascii_case(name))
    }

    fn matches<L: FnMut(&str) -> Option<String>>(
        &self,
        event: &Event,
        apps: &mut DeviceApps<L>,
    ) -> bool {
        if !self.wants_type(event.type_name()) {
            return false;
        }
        if self.from_ts_ms.is_some_and(|from| event.ts_ms < from)
            || self.to_ts_ms.is_some_and(|to| event.ts_ms >= to)
        {
            return false;
        }
        if !self.needs_subjects() {
            return true;
        }
        let Some(kind) = &event.kind else {
            return false;
        };
        let mut s = Subjects::default();
        visit(kind, &mut s);
        if let Some(app) = &self.app {
            let ok = match (s.app_id, s.device_id) {
                (Some(a), _) => a == app,
                (None, Some(d)) => apps.app_of(d) == Some(app.as_str()),
                (None, None) => false,
            };
            if !ok {
                return false;
            }
        }
        if let Some(message) = &self.message
            && s.message_id != Some(message.as_str())
        {
            return false;
        }
        if let Some(device) = &self.device {
            let ok = s.device_id == Some(device.as_str())
                || s.target_device == Some(device.as_str())
                || (s.broadcast && s.app_id.is_some_and(|a| apps.app_of(device) == Some(a)));
            if !ok {
                return false;
            }
        }
        true
    }

    /// Whether a record that does not decode passes: only when nothing but its type
    /// ([`UNDECODABLE`]) could be asked about.
    fn matches_undecodable(&self) -> bool {
        self.wants_type(UNDECODABLE)
            && self.from_ts_ms.is_none()
            && self.to_ts_ms.is_none()
            && !self.needs_subjects()
    }
}

/// Which app a device belongs to, for the `app` and `device` filters on events that
/// name only one of the two. Learned from the `DeviceRegistered` events the replay
/// passes, else asked of `lookup` (the projection store), and cached (bounded by
/// [`MAX_CACHED_DEVICES`]).
pub struct DeviceApps<L> {
    lookup: L,
    cache: HashMap<String, Option<String>>,
}

impl<L: FnMut(&str) -> Option<String>> DeviceApps<L> {
    /// Answers from `lookup` for devices registered before the replayed range.
    pub fn new(lookup: L) -> Self {
        DeviceApps {
            lookup,
            cache: HashMap::new(),
        }
    }

    fn room(&mut self) {
        if self.cache.len() >= MAX_CACHED_DEVICES {
            self.cache.clear();
        }
    }

    fn observe(&mut self, event: &Event) {
        if let Some(Kind::DeviceRegistered(e)) = &event.kind {
            self.room();
            self.cache
                .insert(e.device_id.clone(), Some(e.app_id.clone()));
        }
    }

    /// The app of `device_id`, if known.
    pub fn app_of(&mut self, device_id: &str) -> Option<&str> {
        if !self.cache.contains_key(device_id) {
            let app = (self.lookup)(device_id);
            self.room();
            self.cache.insert(device_id.to_owned(), app);
        }
        self.cache.get(device_id).and_then(|a| a.as_deref())
    }
}

/// A filter and what it needs to apply itself: decodes records, keeps those that pass,
/// and writes their lines.
pub struct Replay<L> {
    filter: Filter,
    apps: DeviceApps<L>,
}

impl<L: FnMut(&str) -> Option<String>> Replay<L> {
    /// A replay keeping what `filter` keeps; `lookup` answers which app a device
    /// belongs to when the replayed range does not say (see [`DeviceApps`]).
    pub fn new(filter: Filter, lookup: L) -> Self {
        Replay {
            filter,
            apps: DeviceApps::new(lookup),
        }
    }

    /// Decodes `record` and, if it passes the filter, appends its line to `out` and
    /// returns the event (a caller that opens payloads needs it). A record that does not
    /// decode is written as an [`UNDECODABLE`] line when the filter lets it through, and
    /// returns `None`.
    pub fn render(&mut self, record: &Stored, out: &mut Vec<u8>) -> Option<Event> {
        match events::decode(&record.value) {
            Ok(event) => {
                if self.filter.needs_subjects() {
                    self.apps.observe(&event);
                }
                if self.filter.matches(&event, &mut self.apps) {
                    write_event_line(out, record.offset, &event);
                    Some(event)
                } else {
                    None
                }
            }
            Err(e) => {
                if self.filter.matches_undecodable() {
                    write_undecodable_line(out, record.offset, &e.to_string());
                }
                None
            }
        }
    }
}

// ------------------------------------------------------------------------ fields

/// What an event's fields are handed to by `visit`: the JSON writer and the filter's
/// subject finder.
trait Fields<'e> {
    fn str(&mut self, name: &'static str, value: &'e str);
    fn u64(&mut self, name: &'static str, value: u64);
    fn bytes(&mut self, name: &'static str, value: &'e [u8]);
    fn target(&mut self, name: &'static str, value: &'e Option<Target>);
    fn sealed(&mut self, name: &'static str, value: &'e Option<SealedPayload>);
    /// A kind without an arm yet: its Debug text.
    fn debug(&mut self, kind: &'e Kind);
}

/// Every kind's fields, in `events.proto` order: the one place that knows them.
fn visit<'e>(kind: &'e Kind, f: &mut impl Fields<'e>) {
    match kind {
        Kind::AppCreated(e) => {
            f.str("app_id", &e.app_id);
            f.str("name", &e.name);
            f.str("app_key", &e.app_key);
            f.str("client_id", &e.client_id);
            f.bytes("client_secret_sha256", &e.client_secret_sha256);
        }
        Kind::DeviceRegistered(e) => {
            f.str("device_id", &e.device_id);
            f.str("app_id", &e.app_id);
            f.bytes("token_sha256", &e.token_sha256);
            f.str("platform", &e.platform);
            f.str("network", &e.network);
        }
        Kind::PushAccepted(e) => push_fields(e, f),
        Kind::MessageRecalled(e) => recall_fields(e, f),
        // A share: the partition it is for, the kind it shares, and that kind's fields.
        Kind::FanOut(e) => {
            f.u64("partition", e.partition.into());
            match &e.event {
                Some(fan_out::Event::Push(p)) => {
                    f.str("share_of", "PushAccepted");
                    push_fields(p, f);
                }
                Some(fan_out::Event::Recall(r)) => {
                    f.str("share_of", "MessageRecalled");
                    recall_fields(r, f);
                }
                None => {}
            }
        }
        Kind::DeviceReceived(e) => {
            f.str("device_id", &e.device_id);
            f.u64("seq", e.seq);
            f.str("message_id", &e.message_id);
            f.str("gateway_id", &e.gateway_id);
        }
        Kind::AppSecretRotated(e) => {
            f.str("app_id", &e.app_id);
            f.bytes("client_secret_sha256", &e.client_secret_sha256);
        }
        Kind::AppLimitsSet(e) => {
            f.str("app_id", &e.app_id);
            let l = e.limits.unwrap_or_default();
            f.u64("pushes_per_s", l.pushes_per_s.into());
            f.u64("broadcasts_per_min", l.broadcasts_per_min.into());
            f.u64("max_devices", l.max_devices);
            f.u64("max_data_bytes", l.max_data_bytes.into());
            f.u64("max_inbox_entries", l.max_inbox_entries.into());
        }
        Kind::GatewayHeartbeat(e) => {
            f.str("gateway_id", &e.gateway_id);
            f.str("mqtt_url", &e.mqtt_url);
            f.str("ws_url", &e.ws_url);
            f.u64("connected", e.connected);
            f.u64("interval_ms", e.interval_ms.into());
        }
        Kind::DeviceConnected(e) => {
            f.str("device_id", &e.device_id);
            f.str("gateway_id", &e.gateway_id);
            f.u64("keep_alive_s", e.keep_alive_s.into());
        }
        Kind::DeviceDisconnected(e) => {
            f.str("device_id", &e.device_id);
            f.str("gateway_id", &e.gateway_id);
            f.str("reason", &e.reason);
        }
        Kind::DeviceAcked(e) => {
            f.str("device_id", &e.device_id);
            f.u64("seq", e.seq);
            f.str("message_id", &e.message_id);
            f.str("gateway_id", &e.gateway_id);
        }
        // Kinds added to events.proto render through this arm until they get their own.
        #[allow(unreachable_patterns)]
        other => f.debug(other),
    }
}

fn push_fields<'e>(e: &'e PushAccepted, f: &mut impl Fields<'e>) {
    f.str("message_id", &e.message_id);
    f.str("app_id", &e.app_id);
    f.target("target", &e.target);
    f.sealed("payload", &e.payload);
    f.u64("ttl_s", e.ttl_s.into());
    f.u64("priority", e.priority.into());
    f.str("collapse_key", &e.collapse_key);
    f.str("idempotency_key", &e.idempotency_key);
    f.bytes("request_sha256", &e.request_sha256);
    f.u64("idempotency_window_s", e.idempotency_window_s.into());
}

fn recall_fields<'e>(e: &'e MessageRecalled, f: &mut impl Fields<'e>) {
    f.str("message_id", &e.message_id);
    f.str("app_id", &e.app_id);
}

/// The fields the `app` and `device` filters look at.
#[derive(Default)]
struct Subjects<'e> {
    app_id: Option<&'e str>,
    device_id: Option<&'e str>,
    target_device: Option<&'e str>,
    message_id: Option<&'e str>,
    broadcast: bool,
}

impl<'e> Fields<'e> for Subjects<'e> {
    fn str(&mut self, name: &'static str, value: &'e str) {
        match name {
            "app_id" => self.app_id = Some(value),
            "device_id" => self.device_id = Some(value),
            "message_id" => self.message_id = Some(value),
            _ => {}
        }
    }
    fn u64(&mut self, _: &'static str, _: u64) {}
    fn bytes(&mut self, _: &'static str, _: &'e [u8]) {}
    fn target(&mut self, _: &'static str, value: &'e Option<Target>) {
        match value.as_ref().and_then(|t| t.to.as_ref()) {
            Some(To::DeviceId(d)) => self.target_device = Some(d),
            Some(To::Broadcast(b)) => self.broadcast = *b,
            None => {}
        }
    }
    fn sealed(&mut self, _: &'static str, _: &'e Option<SealedPayload>) {}
    fn debug(&mut self, _: &'e Kind) {}
}

/// Writes fields as the members of a JSON object (the caller writes the braces).
struct Json<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl Json<'_> {
    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        write_str(self.out, name);
        self.out.push(b':');
    }
}

impl<'e> Fields<'e> for Json<'_> {
    fn str(&mut self, name: &'static str, value: &'e str) {
        self.key(name);
        write_str(self.out, value);
    }
    fn u64(&mut self, name: &'static str, value: u64) {
        self.key(name);
        write_u64(self.out, value);
    }
    fn bytes(&mut self, name: &'static str, value: &'e [u8]) {
        self.key(name);
        write_b64(self.out, value);
    }
    fn target(&mut self, name: &'static str, value: &'e Option<Target>) {
        self.key(name);
        match value {
            None => self.out.extend_from_slice(b"null"),
            Some(t) => match &t.to {
                Some(To::DeviceId(d)) => {
                    self.out.extend_from_slice(b"{\"device_id\":");
                    write_str(self.out, d);
                    self.out.push(b'}');
                }
                Some(To::Broadcast(b)) => {
                    self.out.extend_from_slice(b"{\"broadcast\":");
                    self.out
                        .extend_from_slice(if *b { b"true" } else { b"false" });
                    self.out.push(b'}');
                }
                None => self.out.extend_from_slice(b"{}"),
            },
        }
    }
    fn sealed(&mut self, name: &'static str, value: &'e Option<SealedPayload>) {
        self.key(name);
        match value {
            None => self.out.extend_from_slice(b"null"),
            Some(p) => {
                self.out.extend_from_slice(b"{\"key_id\":");
                write_u64(self.out, p.key_id.into());
                self.out.extend_from_slice(b",\"nonce\":");
                write_b64(self.out, &p.nonce);
                self.out.extend_from_slice(b",\"ciphertext\":");
                write_b64(self.out, &p.ciphertext);
                self.out.push(b'}');
            }
        }
    }
    fn debug(&mut self, kind: &'e Kind) {
        self.key("debug");
        write_str(self.out, &format!("{kind:?}"));
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly as JSON requires; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write_u64(out: &mut Vec<u8>, n: u64) {
    let _ = serde_json::to_writer(&mut *out, &n);
}

fn write_b64(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let start = out.len();
    // Padded base64 of n bytes is 4 * ceil(n / 3) characters; it cannot overflow for a
    // record the log accepted.
    let len = bytes.len().div_ceil(3) * 4;
    out.resize(start + len, 0);
    let written = B64.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
    out.truncate(start + written);
    out.push(b'"');
}

// ------------------------------------------------------------------------ lines

/// Appends the line of one event, newline included.
pub fn write_event_line(out: &mut Vec<u8>, offset: Offset, event: &Event) {
    out.extend_from_slice(b"{\"offset\":");
    write_u64(out, offset);
    out.extend_from_slice(b",\"ts_ms\":");
    write_u64(out, event.ts_ms);
    out.extend_from_slice(b",\"type\":");
    write_str(out, event.type_name());
    out.extend_from_slice(b",\"schema_version\":");
    write_u64(out, event.schema_version.into());
    out.extend_from_slice(b",\"event\":{");
    if let Some(kind) = &event.kind {
        visit(kind, &mut Json { out, first: true });
    }
    out.extend_from_slice(b"}}\n");
}

/// Appends the line of a record that did not decode, newline included.
pub fn write_undecodable_line(out: &mut Vec<u8>, offset: Offset, error: &str) {
    out.extend_from_slice(b"{\"offset\":");
    write_u64(out, offset);
    out.extend_from_slice(b",\"type\":");
    write_str(out, UNDECODABLE);
    out.extend_from_slice(b",\"error\":");
    write_str(out, error);
    out.extend_from_slice(b"}\n");
}

/// The offset of a line written by [`write_event_line`] or [`write_undecodable_line`],
/// read from its first key without parsing the rest (for progress reports).
pub fn line_offset(line: &[u8]) -> Option<Offset> {
    let rest = line.strip_prefix(b"{\"offset\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(rest.get(..digits)?).ok()?.parse().ok()
}

// ------------------------------------------------------------------------ payloads

/// Opens a push's sealed payload: the pushed JSON as ingest stored it (compact, on one
/// line), or why it could not be opened.
pub fn open_payload(
    keyring: &Keyring,
    message_id: &str,
    sealed: Option<&SealedPayload>,
) -> Result<Vec<u8>, String> {
    let sealed = sealed.ok_or_else(|| "the push has no payload".to_owned())?;
    let plain = keyring
        .open(sealed, message_id)
        .map_err(|e| format!("{e} (wrong payload key?)"))?;
    // Kept byte for byte (key order included) when it is JSON on one line, as ingest
    // writes it; anything else is re-encoded so the line stays one line of JSON.
    let not_json = |e: serde_json::Error| format!("the opened payload is not JSON: {e}");
    if plain.contains(&b'\n') || plain.contains(&b'\r') {
        let value: serde_json::Value = serde_json::from_slice(&plain).map_err(not_json)?;
        return serde_json::to_vec(&value).map_err(not_json);
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&plain).map_err(not_json)?;
    Ok(plain)
}

/// Adds an opened payload to the line just written (which must end in `}\n`) as its
/// last key: `"data"`, or `"data_error"` with the reason.
pub fn append_opened(line: &mut Vec<u8>, opened: &Result<Vec<u8>, String>) {
    debug_assert!(line.ends_with(b"}\n"), "a line ends with }}\\n");
    line.truncate(line.len().saturating_sub(2));
    match opened {
        Ok(data) => {
            line.extend_from_slice(b",\"data\":");
            line.extend_from_slice(data);
        }
        Err(reason) => {
            line.extend_from_slice(b",\"data_error\":");
            write_str(line, reason);
        }
    }
    line.extend_from_slice(b"}\n");
}

/// If `event` is a push, opens its payload and adds it to its line (see
/// [`append_opened`]). Returns whether the payload could not be opened.
pub fn decrypt_event(line: &mut Vec<u8>, event: &Event, keyring: &Keyring) -> bool {
    let Some(Kind::PushAccepted(p)) = &event.kind else {
        return false;
    };
    let opened = open_payload(keyring, &p.message_id, p.payload.as_ref());
    append_opened(line, &opened);
    opened.is_err()
}

#[derive(Deserialize)]
struct LineType<'a> {
    #[serde(rename = "type", borrow)]
    type_name: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct PushLine {
    event: PushLineEvent,
}

#[derive(Deserialize)]
struct PushLineEvent {
    message_id: String,
    payload: Option<PushLinePayload>,
}

#[derive(Deserialize)]
struct PushLinePayload {
    key_id: u32,
    nonce: String,
    ciphertext: String,
}

/// Appends `line` (one line as the server sent it, newline included) to `out`, with its
/// payload opened if it is a push: the same bytes [`decrypt_event`] gives for the
/// record. Returns whether the payload could not be opened; a line that is not JSON is
/// an error.
pub fn decrypt_line(
    line: &[u8],
    keyring: &Keyring,
    out: &mut Vec<u8>,
) -> Result<bool, serde_json::Error> {
    let head: LineType<'_> = serde_json::from_slice(line)?;
    out.extend_from_slice(line);
    if head.type_name != "PushAccepted" {
        return Ok(false);
    }
    let push: PushLine = serde_json::from_slice(line)?;
    let sealed = match push.event.payload {
        None => None,
        Some(p) => match (B64.decode(&p.nonce), B64.decode(&p.ciphertext)) {
            (Ok(nonce), Ok(ciphertext)) => Some(SealedPayload {
                key_id: p.key_id,
                nonce,
                ciphertext,
            }),
            _ => {
                let opened = Err("the payload's nonce or ciphertext is not base64".to_owned());
                append_opened(out, &opened);
                return Ok(true);
            }
        },
    };
    let opened = open_payload(keyring, &push.event.message_id, sealed.as_ref());
    append_opened(out, &opened);
    Ok(opened.is_err())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use herald_schemas::events::{
        AppCreated, DeviceAcked, DeviceConnected, DeviceRegistered, PushAccepted,
    };
    use serde_json::{Value, json};

    fn stored(offset: Offset, event: &Event) -> Stored {
        Stored {
            offset,
            key: Vec::new(),
            value: events::encode(event),
        }
    }

    fn ring() -> Keyring {
        Keyring::new(1, &[9u8; 32])
    }

    fn push(ts_ms: u64, message_id: &str, app: &str, to: To, data: &[u8]) -> Event {
        let payload = ring().seal([3u8; 12], message_id, data).unwrap();
        Event::new(
            ts_ms,
            Kind::PushAccepted(PushAccepted {
                message_id: message_id.into(),
                app_id: app.into(),
                target: Some(Target { to: Some(to) }),
                payload: Some(payload),
                ttl_s: 60,
                ..PushAccepted::default()
            }),
        )
    }

    fn log() -> Vec<Stored> {
        let events = [
            Event::new(
                100,
                Kind::AppCreated(AppCreated {
                    app_id: "a1".into(),
                    name: "one \"quoted\"".into(),
                    app_key: "k1".into(),
                    client_id: "c1".into(),
                    client_secret_sha256: vec![0xff, 0x00, 0x10],
                }),
            ),
            Event::new(
                110,
                Kind::DeviceRegistered(DeviceRegistered {
                    device_id: "d1".into(),
                    app_id: "a1".into(),
                    token_sha256: vec![1, 2, 3],
                    platform: "android".into(),
                    network: "wifi".into(),
                }),
            ),
            push(120, "m1", "a1", To::DeviceId("d1".into()), b"{\"n\":1}"),
            push(130, "m2", "a1", To::Broadcast(true), b"{\"n\":2}"),
            push(140, "m3", "a2", To::DeviceId("d9".into()), b"{\"n\":3}"),
            Event::new(
                150,
                Kind::DeviceConnected(DeviceConnected {
                    device_id: "d1".into(),
                    gateway_id: "g".into(),
                    keep_alive_s: 30,
                }),
            ),
            Event::new(
                160,
                Kind::DeviceAcked(DeviceAcked {
                    device_id: "d1".into(),
                    seq: 1,
                    message_id: "m1".into(),
                    gateway_id: "g".into(),
                }),
            ),
            // Registered before the replayed range in the second test: the store knows.
            Event::new(
                170,
                Kind::DeviceAcked(DeviceAcked {
                    device_id: "d9".into(),
                    seq: 1,
                    message_id: "m3".into(),
                    gateway_id: "g".into(),
                }),
            ),
        ];
        events
            .iter()
            .enumerate()
            .map(|(i, e)| stored(i as u64, e))
            .collect()
    }

    fn run(filter: Filter, records: &[Stored]) -> Vec<Value> {
        let mut replay = Replay::new(filter, |d: &str| (d == "d9").then(|| "a2".to_owned()));
        let mut out = Vec::new();
        for r in records {
            replay.render(r, &mut out);
        }
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn offsets(lines: &[Value]) -> Vec<u64> {
        lines
            .iter()
            .map(|l| l["offset"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn renders_every_kind_as_one_json_line() {
        let lines = run(Filter::default(), &log());
        assert_eq!(offsets(&lines), (0..8).collect::<Vec<_>>());
        assert_eq!(
            lines[0],
            json!({"offset":0,"ts_ms":100,"type":"AppCreated",
                "schema_version":events::CURRENT_SCHEMA_VERSION,
                "event":{"app_id":"a1","name":"one \"quoted\"","app_key":"k1",
                    "client_id":"c1","client_secret_sha256":"/wAQ"}})
        );
        assert_eq!(lines[1]["event"]["token_sha256"], "AQID");
        assert_eq!(lines[2]["type"], "PushAccepted");
        assert_eq!(lines[2]["event"]["target"], json!({"device_id": "d1"}));
        assert_eq!(lines[3]["event"]["target"], json!({"broadcast": true}));
        let payload = &lines[2]["event"]["payload"];
        assert_eq!(payload["key_id"], 1);
        assert_eq!(payload["nonce"], B64.encode([3u8; 12]));
        assert!(payload["ciphertext"].as_str().unwrap().len() > 10);
        assert_eq!(lines[5]["event"]["keep_alive_s"], 30);
        assert_eq!(lines[6]["event"]["seq"], 1);

        // Key order is part of the format: offset first (line_offset reads it there).
        let mut out = Vec::new();
        write_event_line(&mut out, 42, &events::decode(&log()[6].value).unwrap());
        assert!(out.starts_with(b"{\"offset\":42,\"ts_ms\":160,\"type\":\"DeviceAcked\","));
        assert_eq!(line_offset(&out), Some(42));
        assert_eq!(line_offset(b"{\"type\":1}"), None);
    }

    #[test]
    fn undecodable_records_render_and_an_empty_event_renders() {
        let bad = Stored {
            offset: 7,
            key: Vec::new(),
            value: vec![0xff, 0xff],
        };
        let lines = run(Filter::default(), std::slice::from_ref(&bad));
        assert_eq!(lines[0]["type"], UNDECODABLE);
        assert_eq!(lines[0]["offset"], 7);
        assert!(lines[0]["error"].as_str().unwrap().contains("malformed"));
        // Filters that ask what an undecodable record cannot tell drop it.
        let by_type = Filter {
            types: vec!["PushAccepted".into()],
            ..Filter::default()
        };
        assert!(run(by_type, std::slice::from_ref(&bad)).is_empty());
        let by_undecodable = Filter {
            types: vec!["undecodable".into()],
            ..Filter::default()
        };
        assert_eq!(run(by_undecodable, &[bad]).len(), 1);

        let mut out = Vec::new();
        let empty = Event {
            schema_version: 1,
            ts_ms: 5,
            kind: None,
        };
        write_event_line(&mut out, 1, &empty);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["event"], json!({}));
    }

    #[test]
    fn filters_by_type_time_app_and_device() {
        let records = log();
        let types = Filter {
            types: Filter::parse_types("pushaccepted, DeviceAcked").unwrap(),
            ..Filter::default()
        };
        assert_eq!(offsets(&run(types, &records)), vec![2, 3, 4, 6, 7]);

        let times = Filter {
            from_ts_ms: Some(120),
            to_ts_ms: Some(150),
            ..Filter::default()
        };
        assert_eq!(offsets(&run(times, &records)), vec![2, 3, 4]);

        // a1's device events are matched through DeviceRegistered seen in the range.
        let app = Filter {
            app: Some("a1".into()),
            ..Filter::default()
        };
        assert_eq!(offsets(&run(app, &records)), vec![0, 1, 2, 3, 5, 6]);
        // a2's device was registered before the range: the look-up answers.
        let app2 = Filter {
            app: Some("a2".into()),
            ..Filter::default()
        };
        assert_eq!(offsets(&run(app2, &records[2..])), vec![4, 7]);

        // A device: its own events, pushes to it, and its app's broadcasts.
        let device = Filter {
            device: Some("d1".into()),
            ..Filter::default()
        };
        assert_eq!(offsets(&run(device, &records)), vec![1, 2, 3, 5, 6]);

        let both = Filter {
            device: Some("d1".into()),
            types: vec!["DeviceAcked".into()],
            ..Filter::default()
        };
        assert_eq!(offsets(&run(both, &records)), vec![6]);
    }

    #[test]
    fn filter_errors_name_the_problem() {
        assert_eq!(Filter::parse_types("A,,B"), Err(FilterError::EmptyType));
        assert_eq!(
            Filter::parse_types("Push Accepted"),
            Err(FilterError::BadType("Push Accepted".into()))
        );
        let reversed = Filter {
            from_ts_ms: Some(10),
            to_ts_ms: Some(5),
            ..Filter::default()
        };
        assert!(
            reversed
                .validate()
                .unwrap_err()
                .to_string()
                .contains("to_ts")
        );
    }

    #[test]
    fn device_app_cache_is_bounded() {
        let mut calls = 0;
        let mut apps = DeviceApps::new(|_: &str| {
            calls += 1;
            Some("a".to_owned())
        });
        for i in 0..MAX_CACHED_DEVICES + 10 {
            assert_eq!(apps.app_of(&format!("d{i}")), Some("a"));
        }
        assert!(apps.cache.len() <= MAX_CACHED_DEVICES);
        assert_eq!(apps.app_of("d0"), Some("a"));
        drop(apps);
        assert_eq!(calls, MAX_CACHED_DEVICES + 11);
    }

    #[test]
    fn decrypting_a_record_and_a_server_line_gives_the_same_bytes() {
        let records = log();
        let ring = ring();
        let mut offline = Vec::new();
        let mut online = Vec::new();
        let mut replay = Replay::new(Filter::default(), |_: &str| None);
        for r in &records {
            let mut line = Vec::new();
            if let Some(event) = replay.render(r, &mut line) {
                assert!(!decrypt_event(&mut line, &event, &ring));
                assert!(
                    !decrypt_line(&line_without_data(&event, r.offset), &ring, &mut online)
                        .unwrap()
                );
            }
            offline.extend_from_slice(&line);
        }
        assert_eq!(
            String::from_utf8_lossy(&offline),
            String::from_utf8_lossy(&online)
        );
        let lines: Vec<Value> = String::from_utf8(offline)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[2]["data"], json!({"n": 1}));
        assert_eq!(lines[3]["data"], json!({"n": 2}));
        assert!(lines[0].get("data").is_none());

        // Another key: the line says why instead of ending the replay.
        let other = Keyring::new(1, &[1u8; 32]);
        let mut out = Vec::new();
        let event = events::decode(&records[2].value).unwrap();
        assert!(decrypt_line(&line_without_data(&event, 2), &other, &mut out).unwrap());
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v["data_error"].as_str().unwrap().contains("authentication"));
        assert!(decrypt_line(b"not json\n", &ring, &mut Vec::new()).is_err());
    }

    fn line_without_data(event: &Event, offset: Offset) -> Vec<u8> {
        let mut out = Vec::new();
        write_event_line(&mut out, offset, event);
        out
    }
}
