//! The admin side of the relay: an HTTP listener for monitoring and
//! operators, and the same API on the control socket in the spool folder.
//!
//! # Layout
//!
//! - [`metrics`]: the counters kept where things happen, and the Prometheus
//!   text format.
//! - [`scrape`]: the `/metrics` page: those counters, and the gauges read at
//!   scrape time (queue, connections, plugin chain).
//! - [`api`]: the routes: `/health`, `/ready`, `/metrics`, the JSON API for
//!   the queue and the plugin chain, the mapping between that API and
//!   [`crate::delivery::control`]'s commands.
//! - [`guard`]: who may do what: the control socket is trusted (its folder
//!   is the relay user's), TCP needs the token for anything but reads.
//! - [`serve`]: the listeners: TCP (plain or TLS) and the Unix socket, each
//!   connection served by hyper with the axum router.
//! - [`status`]: the live status page at `/` and the JSON it polls.
//! - [`inject`]: `POST /api/v1/messages`, a message handed over as JSON,
//!   through the same hooks, rules and spool as SMTP.
//! - [`client`]: the command line's side of the control socket.

pub mod api;
pub mod client;
pub mod guard;
pub mod inject;
pub mod metrics;
pub mod scrape;
pub mod serve;
pub mod status;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;

use crate::delivery::control;
use crate::delivery::Delivery;
use crate::server::Context;

/// Errors starting the admin side; each names the address or file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP listener could not bind.
    #[error("admin.address {address}: cannot listen: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The control socket could not be made.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The listener's certificate or key.
    #[error("admin.tls_cert/tls_key: {0}")]
    Tls(#[from] crate::smtp::tls::Error),
    /// The idempotency keys' folder in the spool.
    #[error("{path}: {source}")]
    Keys {
        /// The folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The admin listeners, bound but not yet answering: bound before delivery
/// starts, so a command sent meanwhile waits in the socket's backlog
/// instead of finding nobody there.
pub struct Admin {
    ctx: Arc<Context>,
    control: UnixListener,
    http: Option<(TcpListener, Option<TlsAcceptor>)>,
    keys: inject::Keys,
}

/// What every request handler shares.
pub struct State {
    /// The relay's shared context.
    pub ctx: Arc<Context>,
    /// The scheduler the queue commands go through.
    pub delivery: Delivery,
    /// The HTTP listener's address, when there is one.
    pub http_address: Option<SocketAddr>,
    /// Set once the SMTP listeners accept connections.
    listening: AtomicBool,
    /// Browser sessions opened with the token: id to expiry.
    sessions: Mutex<std::collections::HashMap<String, Instant>>,
    /// Injection's idempotency keys.
    keys: inject::Keys,
    /// Messages per second for the status page's chart.
    rates: status::Rates,
    /// When the admin side started (the relay's uptime).
    started: Instant,
}

/// How often idempotency keys past their window are removed.
const KEY_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// A handle on the running admin side.
#[derive(Clone)]
pub struct Handle(Arc<State>);

impl Handle {
    /// The SMTP listeners accept connections: `/ready` says so from now on.
    pub fn set_listening(&self) {
        self.0.listening.store(true, Ordering::Release);
    }

    /// The HTTP listener's bound address (port 0 in the config picks one).
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.0.http_address
    }
}

impl Admin {
    /// Binds the control socket (`control.sock` in the spool, mode 0600) and,
    /// when `[admin] address` is set, the HTTP listener.
    pub async fn bind(ctx: &Arc<Context>) -> Result<Admin, Error> {
        let path = ctx.spool.root().join(control::SOCKET);
        // We hold the spool lock, so a socket file left here is from a dead relay.
        let _ = std::fs::remove_file(&path);
        let socket_err = |source| Error::Socket {
            path: path.clone(),
            source,
        };
        let control = UnixListener::bind(&path).map_err(socket_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err)?;
        let config = &ctx.config.admin;
        let http = match config.address {
            None => None,
            Some(address) => {
                let tls = match (&config.tls_cert, &config.tls_key) {
                    (Some(cert), Some(key)) => Some(crate::smtp::tls::acceptor(
                        &ctx.config.resolve(cert),
                        &ctx.config.resolve(key),
                    )?),
                    _ => None,
                };
                let listener = TcpListener::bind(address)
                    .await
                    .map_err(|source| Error::Bind { address, source })?;
                Some((listener, tls))
            }
        };
        let dir = ctx.spool.root().join("idempotency");
        let window = config.idempotency_window.0;
        let keys = inject::Keys::open(dir.clone(), window)
            .map_err(|source| Error::Keys { path: dir, source })?;
        Ok(Admin {
            ctx: ctx.clone(),
            control,
            http,
            keys,
        })
    }

    /// Starts answering, with the queue commands going through `delivery`.
    pub fn serve(self, delivery: Delivery) -> Handle {
        let http_address = self.http.as_ref().and_then(|(l, _)| l.local_addr().ok());
        let state = Arc::new(State {
            ctx: self.ctx,
            delivery,
            http_address,
            listening: AtomicBool::new(false),
            sessions: Mutex::default(),
            keys: self.keys,
            rates: status::Rates::default(),
            started: Instant::now(),
        });
        tokio::spawn(status::sample(state.clone()));
        let pruner = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(KEY_PRUNE_INTERVAL);
            loop {
                every.tick().await;
                let s = pruner.clone();
                let _ = tokio::task::spawn_blocking(move || s.keys.prune()).await;
            }
        });
        tokio::spawn(serve::unix(
            self.control,
            api::router(state.clone(), guard::Transport::ControlSocket),
        ));
        if let Some((listener, tls)) = self.http {
            let transport = guard::Transport::Tcp { tls: tls.is_some() };
            tracing::info!(address = %http_address.map(|a| a.to_string()).unwrap_or_default(),
                tls = tls.is_some(), token = state.ctx.config.admin.token.is_some(), "admin listening");
            tokio::spawn(serve::tcp(
                listener,
                tls,
                api::router(state.clone(), transport),
            ));
        }
        Handle(state)
    }
}

impl State {
    /// The SMTP listeners accept connections.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }
}
