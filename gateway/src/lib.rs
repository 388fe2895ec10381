//! herald's device gateway: holds device MQTT connections, sends each device its backlog
//! and live entries, and turns acknowledgements into log events.
//!
//! # Layout
//! - [`codec`]: herald's own sans-IO MQTT packet codec (check, then parse).
//! - [`session`]: one device's session as a state machine without I/O.
//! - [`hub`]: the registry of live sessions; takeover; the entry point for live
//!   deliveries.
//! - [`keepalive`]: the keep-alive policy by network type.
//! - [`transport`]: TCP, TLS and WebSocket streams, as one [`transport::Transport`].
//! - [`server`]: the listeners and the per-connection task that moves bytes.
//! - [`link`]: the QUIC link to delivery workers when the gateway runs in its own
//!   process (mutual TLS, length-prefixed protobuf frames).
//!
//! # Invariants
//! - The gateway never writes to a store. It reads devices and inboxes through
//!   [`server::DeviceDirectory`] and writes only events to the log (directly, or through
//!   the link).
//! - At most one live connection per device: a newer one kicks the older.
//! - A malformed packet closes only its own connection.

pub mod codec;
pub mod hub;
pub mod keepalive;
pub mod link;
pub mod server;
pub mod session;
pub mod transport;

pub use hub::Hub;
pub use keepalive::KeepAlivePolicy;
pub use server::{DeviceDirectory, DeviceInfo, DirectoryError, Gateway, GatewayConfig, Tls};
pub use session::SessionLimits;
