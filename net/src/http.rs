//! Serving an axum router on a listener through a [`Gate`], with a deadline for every
//! request's headers and an idle timeout: what `axum::serve` leaves out, and what a
//! server on the open internet needs (a client that sends half a request, or nothing,
//! must not hold a connection for ever).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::accept::accept;
use crate::gate::Gate;

/// An HTTP listener's timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// How long a new connection may take to send its first request's headers: a
    /// connection that says nothing, or half a request, is closed then.
    pub header: Duration,
    /// How long a kept-alive connection may wait for its next request (its headers
    /// included), and how long any connection may move no byte either way (a stalled
    /// body, a client that stopped reading a response). Longer than clients keep idle
    /// connections in their pools (reqwest: 90 s) by default, so that a client never
    /// sends a request on a connection the server is closing. A stream that sends
    /// something more often (the console's overview, every second) is not idle.
    pub idle: Duration,
}

/// Serves `router` over HTTP/1.1 on `listener` until `shutdown` turns true, then lets
/// open requests finish (connections close after their current response). HTTP/2
/// without TLS (h2c) is not offered: detecting it means reading before hyper's header
/// deadline starts, which a silent client could hold open.
pub async fn serve(
    listener: TcpListener,
    gate: Arc<Gate>,
    router: Router,
    timeouts: HttpTimeouts,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = Builder::new();
    // hyper's deadline runs from when it waits for a head, so on a kept-alive connection
    // it is the idle wait; the first request's shorter one is below.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.idle.max(timeouts.header));
    loop {
        let accepted = tokio::select! {
            a = accept(&listener, &gate) => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Tracked {
            inner: accepted.stream,
            activity: activity.clone(),
        });
        let router = router.clone();
        let spoke = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heard = spoke.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            heard.store(true, Ordering::Relaxed);
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let builder = builder.clone();
        let mut stop = shutdown.clone();
        let ticket = accepted.ticket;
        tokio::spawn(async move {
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            let idle = activity.idle(timeouts.idle);
            tokio::pin!(idle);
            let first_head = tokio::time::sleep(timeouts.header);
            tokio::pin!(first_head);
            let mut first_head_passed = false;
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut idle => {
                        tracing::debug!("HTTP connection idle; closing");
                        break;
                    }
                    _ = &mut first_head, if !first_head_passed => {
                        // (The flag may have been set since this wait began.)
                        if !spoke.load(Ordering::Relaxed) {
                            tracing::debug!("no request head in time; closing");
                            break;
                        }
                        first_head_passed = true;
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(ticket);
        });
    }
    gate.set_accepting(false);
}

/// When a connection last moved a byte, in milliseconds since the process's clock
/// started.
#[derive(Debug, Default)]
struct Activity {
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(crate::now_ms(), Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `limit`.
    async fn idle(&self, limit: Duration) {
        self.touch();
        let limit_ms = limit.as_millis() as u64;
        loop {
            let since = crate::now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed));
            if since >= limit_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(limit_ms - since)).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// A stream that notes when it last read or wrote a byte.
    struct Tracked<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S: AsyncRead> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::gate::Caps;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server(
        timeouts: HttpTimeouts,
        per_source: usize,
    ) -> (std::net::SocketAddr, Arc<Gate>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate::new(
            "http-test",
            Caps {
                max_connections: 100,
                max_unauthenticated: 100,
                max_unauthenticated_per_source: per_source,
            },
            None,
        );
        let router = Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, gate.clone(), router, timeouts, rx));
        // The sender lives as long as the test's runtime.
        std::mem::forget(tx);
        (addr, gate)
    }

    /// Reads until EOF or `limit`; true when the server closed the connection.
    async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 256];
        tokio::time::timeout(limit, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn half_a_request_is_closed_after_the_header_timeout() {
        let t = HttpTimeouts {
            header: Duration::from_millis(300),
            idle: Duration::from_millis(1500),
        };
        let (addr, gate) = server(t, 100).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let began = std::time::Instant::now();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
        let took = began.elapsed();
        assert!(
            (Duration::from_millis(250)..Duration::from_millis(1400)).contains(&took),
            "{took:?}"
        );
        // A silent connection too.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let began = std::time::Instant::now();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
        assert!(began.elapsed() < Duration::from_millis(1400));
        // A whole request is answered; the kept-alive connection then waits for its next
        // request as long as the idle timeout, not the first request's deadline.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let began = std::time::Instant::now();
        assert!(!closed_within(&mut s, Duration::from_millis(700)).await);
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
        assert!(began.elapsed() >= Duration::from_millis(1400));
        // Every ticket is back.
        tokio::time::timeout(Duration::from_secs(5), async {
            while gate.health().connections > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_stalled_body_is_closed_after_the_idle_timeout() {
        let t = HttpTimeouts {
            header: Duration::from_secs(30),
            idle: Duration::from_millis(300),
        };
        let (addr, _gate) = server(t, 100).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            .await
            .unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn one_source_holds_at_most_its_cap() {
        let t = HttpTimeouts {
            header: Duration::from_secs(30),
            idle: Duration::from_secs(30),
        };
        let (addr, gate) = server(t, 3).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while gate.health().connections < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        // The fourth from 127.0.0.1 is closed at once; 127.0.0.2 is served.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut extra, Duration::from_secs(5)).await);
        let client = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
            .build()
            .unwrap();
        let body = client
            .get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "hi");
    }
}
