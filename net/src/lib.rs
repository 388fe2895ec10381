//! herald's listeners for a hostile internet.
//!
//! Every listener herald opens (REST, MQTT, MQTT over WebSocket, the QUIC link, the
//! metrics address) admits connections through a [`Gate`]: caps on connections held, on
//! those not yet authenticated, and on those from one source, and — for TCP — one file
//! descriptor each from the process's [`FdBudget`], which keeps a reserve for the log,
//! the store and outbound clients. Accept loops back off on resource errors instead of
//! spinning ([`accept()`]), and HTTP is served with a header deadline and an idle
//! timeout ([`http::serve`]).
//!
//! # Layout
//! - [`gate`]: [`Caps`], [`Gate`], [`Ticket`], [`Refused`].
//! - [`fds`]: [`FdBudget`] and raising the open-files limit.
//! - [`accept`](mod@accept): the accept loop.
//! - [`http`]: serving an axum router with the timeouts.
//!
//! # Invariants
//! - A ticket is given back exactly once, when its connection's task ends (it is
//!   dropped with the task), so the counts cannot drift.
//! - Nothing here logs per connection: refusals are counted in metrics and summed up in
//!   at most one line every ten seconds per listener.

pub mod accept;
pub mod fds;
pub mod gate;
pub mod http;

pub use accept::{Accepted, accept};
pub use fds::{FdBudget, FdLimits};
pub use gate::{Caps, Gate, ListenerHealth, Refused, Ticket};

/// Milliseconds on a monotonic clock that starts with the process.
pub(crate) fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Connects to `to` from the loopback address `from` (tests spread clients over
/// 127.0.0.0/8 to be different sources).
#[doc(hidden)]
pub async fn connect_from(
    from: [u8; 4],
    to: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}
