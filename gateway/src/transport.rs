//! The byte streams a device connects over: MQTT on plain TCP or TLS, and MQTT over
//! WebSocket (`/mqtt`, subprotocol `mqtt`) on plain TCP or TLS. The connection task sees
//! one [`Transport`]: bytes in, bytes out, close.
//!
//! Plain TCP reads only when the socket is readable, into a buffer that exists only
//! while bytes are in hand, so an idle plain connection holds no read buffer. TLS and
//! WebSocket connections keep their library's buffers (rustls records, WebSocket frames)
//! for the life of the connection.

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The path MQTT over WebSocket is served at.
pub const WS_PATH: &str = "/mqtt";
/// The WebSocket subprotocol of MQTT.
pub const WS_SUBPROTOCOL: &str = "mqtt";

/// How much a read takes from the socket at a time.
pub(crate) const READ_CHUNK: usize = 4096;

/// A device's connection, whichever way it arrived.
pub enum Transport {
    /// MQTT over TCP.
    Tcp(TcpStream),
    /// MQTT over TLS.
    Tls(Box<TlsStream<TcpStream>>),
    /// MQTT over WebSocket.
    Ws(Box<WebSocketStream<TcpStream>>),
    /// MQTT over WebSocket over TLS.
    Wss(Box<WebSocketStream<TlsStream<TcpStream>>>),
}

impl Transport {
    /// Waits for bytes from the device and appends them to `buf`; `Ok(0)` when the
    /// device closed the connection. Cancel-safe: dropped before it completes, it has
    /// taken nothing.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => loop {
                s.readable().await?;
                buf.reserve(READ_CHUNK);
                match s.try_read_buf(buf) {
                    // A spurious wake-up: keep no chunk while waiting again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    r => return r,
                }
            },
            Transport::Tls(s) => {
                buf.reserve(READ_CHUNK);
                s.read_buf(buf).await
            }
            Transport::Ws(ws) => ws_read(ws, buf).await,
            Transport::Wss(ws) => ws_read(ws, buf).await,
        }
    }

    /// Writes `bytes` (one WebSocket binary message on WebSocket).
    pub async fn write_all(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.write_all(&bytes).await,
            Transport::Tls(s) => {
                s.write_all(&bytes).await?;
                s.flush().await
            }
            Transport::Ws(ws) => ws
                .send(Message::Binary(bytes.into()))
                .await
                .map_err(io::Error::other),
            Transport::Wss(ws) => ws
                .send(Message::Binary(bytes.into()))
                .await
                .map_err(io::Error::other),
        }
    }

    /// Ends the connection (TLS close_notify, WebSocket close frame, TCP FIN).
    pub async fn close(&mut self) {
        match self {
            Transport::Tcp(s) => {
                let _ = s.shutdown().await;
            }
            Transport::Tls(s) => {
                let _ = s.shutdown().await;
            }
            Transport::Ws(ws) => {
                let _ = SinkExt::close(&mut **ws).await;
            }
            Transport::Wss(ws) => {
                let _ = SinkExt::close(&mut **ws).await;
            }
        }
    }
}

/// The next binary message's bytes; MQTT packets may span messages and a message may
/// hold several packets, so they only feed the codec's buffer.
async fn ws_read<S>(ws: &mut WebSocketStream<S>, buf: &mut BytesMut) -> io::Result<usize>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.is_empty() => continue,
            Some(Ok(Message::Binary(b))) => {
                buf.extend_from_slice(&b);
                return Ok(b.len());
            }
            // tungstenite answers pings itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "MQTT over WebSocket takes binary messages only",
                ));
            }
            Some(Ok(Message::Close(_))) | None => return Ok(0),
            Some(Err(e)) => return Err(io::Error::other(e)),
        }
    }
}

/// Completes the WebSocket handshake of a new connection: the path must be
/// [`WS_PATH`], and the `mqtt` subprotocol is chosen when the client offers it (a browser
/// refuses a connection whose answer names no subprotocol it asked for).
// The handshake callback's error type is tungstenite's (an HTTP response), not ours.
#[allow(clippy::result_large_err)]
pub async fn accept_ws<S>(stream: S, max_message: usize) -> io::Result<WebSocketStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != WS_PATH {
            let mut refuse =
                ErrorResponse::new(Some(format!("MQTT over WebSocket is served at {WS_PATH}")));
            *refuse.status_mut() = StatusCode::NOT_FOUND;
            return Err(refuse);
        }
        let offered = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case(WS_SUBPROTOCOL));
        if offered {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(WS_SUBPROTOCOL),
            );
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(io::Error::other)
}

/// Why the TLS certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {reason}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    reason: String,
}

/// The TLS acceptor of the device listeners, from a PEM certificate chain and a PEM
/// private key. TLS 1.2 and 1.3 only: rustls implements nothing older, so a client that
/// offers only TLS 1.0 or 1.1 fails the handshake.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let err = |what, path: &Path, reason: String| TlsError {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err("cannot read the TLS certificate", cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("cannot read the TLS certificate", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(
            "no certificate in",
            cert,
            "expected PEM CERTIFICATE blocks".into(),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| err("cannot read the TLS private key", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err("TLS setup failed for", cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            err(
                "the TLS certificate does not match its key",
                key,
                e.to_string(),
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
