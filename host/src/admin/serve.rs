//! The admin listeners: each accepted connection is served by hyper's
//! HTTP/1.1 server with the axum router. A slow or silent client is cut off
//! after [`HEADER_TIMEOUT`], and at most [`MAX_CONNECTIONS`] TCP connections
//! are served at once, so the admin port cannot tie the relay up.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one connection until the client closes it.
async fn connection<I>(io: I, router: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}

/// Accepts on the HTTP listener, through TLS when there is an acceptor.
pub async fn tcp(listener: TcpListener, tls: Option<TlsAcceptor>, router: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::info!(%peer, "admin connection limit reached");
            continue;
        };
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(conn, router).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(stream)) => connection(stream, router).await,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "admin TLS handshake failed")
                        }
                        Err(_) => tracing::info!(%peer, "admin TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Accepts on the control socket.
pub async fn unix(listener: UnixListener, router: Router) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(connection(conn, router.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
