//! Accepting TCP connections through a [`Gate`]: refused ones are closed at once, and an
//! accept that fails for want of a resource (no file descriptor, no buffer memory) backs
//! off, doubling from 5 ms to a second, with one log line when it starts and one when
//! the listener accepts again, never one per try.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::gate::{Gate, Ticket};

/// The first pause after a resource error.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// The longest pause.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Whether an accept error is the process or the kernel running short of something,
/// which passes with time, rather than one connection's trouble.
pub fn is_resource_error(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let Some(code) = e.raw_os_error() else {
        return false;
    };
    let errno = Errno::from_raw_os_error(code);
    errno == Errno::MFILE
        || errno == Errno::NFILE
        || errno == Errno::NOBUFS
        || errno == Errno::NOMEM
}

/// A connection the gate admitted.
#[derive(Debug)]
pub struct Accepted {
    /// The socket.
    pub stream: TcpStream,
    /// Its peer.
    pub peer: SocketAddr,
    /// Its place in the gate; drop it when the connection ends.
    pub ticket: Ticket,
}

/// Accepts the next connection `gate` admits. Connections it refuses are closed here;
/// errors are waited out. Cancel-safe: drop the future to stop accepting.
pub async fn accept(listener: &TcpListener, gate: &Arc<Gate>) -> Accepted {
    let mut backoff: Option<(Duration, u64, tokio::time::Instant)> = None;
    loop {
        // Back from a pause: accepting unless the next try fails again.
        gate.set_accepting(true);
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Some((_, failures, since)) = backoff.take() {
                    tracing::info!(
                        listener = gate.name(),
                        failures,
                        after_ms = since.elapsed().as_millis() as u64,
                        "accepting connections again"
                    );
                }
                match gate.admit(peer) {
                    Ok(ticket) => {
                        return Accepted {
                            stream,
                            peer,
                            ticket,
                        };
                    }
                    // Refused: closed by the drop, counted by the gate.
                    Err(_) => drop(stream),
                }
            }
            Err(e) if is_resource_error(&e) => {
                herald_telemetry::metrics::listener_accept_error(gate.name());
                gate.set_accepting(false);
                let (pause, failures, since) = match backoff {
                    None => {
                        tracing::warn!(
                            listener = gate.name(),
                            error = %e,
                            "cannot accept connections; backing off until the resource is back"
                        );
                        (BACKOFF_MIN, 1, tokio::time::Instant::now())
                    }
                    Some((pause, failures, since)) => {
                        ((pause * 2).min(BACKOFF_MAX), failures + 1, since)
                    }
                };
                backoff = Some((pause, failures, since));
                tokio::time::sleep(pause).await;
            }
            // One connection's trouble (reset before it was accepted, and the like).
            Err(e) => tracing::debug!(listener = gate.name(), error = %e, "accept failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::gate::Caps;

    #[test]
    fn resource_errors_are_told_from_a_connection_s_trouble() {
        for code in [24, 23, 105, 12] {
            assert!(is_resource_error(&io::Error::from_raw_os_error(code)));
        }
        assert!(!is_resource_error(&io::Error::from_raw_os_error(103)));
        assert!(!is_resource_error(&io::Error::other("x")));
    }

    #[tokio::test]
    async fn refused_connections_are_closed_and_admitted_ones_returned() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate::new(
            "test",
            Caps {
                max_connections: 10,
                max_unauthenticated: 10,
                max_unauthenticated_per_source: 1,
            },
            None,
        );
        let first = TcpStream::connect(addr).await.unwrap();
        let a = accept(&listener, &gate).await;
        assert_eq!(a.peer, first.local_addr().unwrap());
        // A second one from the same address is over the per-source cap: the server
        // closes it (the client reads EOF), and the next admitted one comes back.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let third_from_elsewhere = crate::connect_from([127, 0, 0, 2], addr).await;
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { accept(&listener, &gate).await.peer }
        });
        let mut byte = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut second, &mut byte)
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "refused connection closed");
        let third = third_from_elsewhere.unwrap();
        assert_eq!(waiter.await.unwrap(), third.local_addr().unwrap());
        assert!(gate.health().accepting);
    }
}
