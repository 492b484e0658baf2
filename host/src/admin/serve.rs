//! The admin listeners: each accepted connection is served by hyper's
//! HTTP/1.1 server with the axum router. A slow or silent client is cut off
//! after [`HEADER_TIMEOUT`], and at most [`MAX_CONNECTIONS`] TCP connections
//! are served at once, so the admin port cannot tie the relay up.

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::envelope::TlsInfo;

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of an admin connection; handlers that build a
/// session from a request (injection) read it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client (127.0.0.1 port 0 on the control socket).
    pub peer: SocketAddr,
    /// The listener's address.
    pub local: SocketAddr,
    /// The TLS session, over HTTPS.
    pub tls: Option<TlsInfo>,
}

/// Serves one connection until the client closes it.
async fn connection<I>(io: I, router: Router, info: ConnInfo)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router.layer(Extension(info)));
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
        let local = conn.local_addr().unwrap_or(peer);
        tokio::spawn(async move {
            let _slot = slot;
            let info = ConnInfo {
                peer,
                local,
                tls: None,
            };
            match tls {
                None => connection(conn, router, info).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(stream)) => {
                            let tls = Some(crate::smtp::tls::info(stream.get_ref().1));
                            connection(stream, router, ConnInfo { tls, ..info }).await
                        }
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
                let here = SocketAddr::from(([127, 0, 0, 1], 0));
                let info = ConnInfo {
                    peer: here,
                    local: here,
                    tls: None,
                };
                tokio::spawn(connection(conn, router.clone(), info));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
