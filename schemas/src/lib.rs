//! herald's wire formats: every byte format that crosses a process boundary.
//!
//! # Layout
//! - [`events`]: the log events (protobuf, generated from `proto/events.proto` at build
//!   time) and their encoding with a schema version.
//! - [`envelope`]: the JSON envelope a device receives on the `inbox` topic.
//! - [`seal`]: AES-256-GCM sealing of push payloads at rest.
//! - [`link`]: what a delivery worker hands to a gateway.
//! - [`partition`]: which partition of the event topic a key lives in.
//!
//! This crate does no I/O and has no runtime: randomness (nonces) and time come in as
//! arguments. It is the only crate that knows prost.

pub mod envelope;
pub mod events;
pub mod link;
pub mod partition;
pub mod seal;
