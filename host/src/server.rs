//! Listeners, connection limits and shutdown: accepts connections and hands each
//! to a [`Session`], through TLS where the listener asks for it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::admin::metrics::{metrics, ConnOutcome, Direction};
use crate::auth::Authenticator;
use crate::authn::seal::Sealer;
use crate::authn::{Signer, Verifier};
use crate::config::{Config, ListenerConfig, TlsMode};
use crate::delivery::dns::Dns;
use crate::envelope::SessionInfo;
use crate::plugins::{Chain, ChainHandle};
use crate::proxy;
use crate::queue::{Spool, Spooled};
use crate::relay::AccessRules;
use crate::smtp::certs::{self, CertWatcher, Certificates};
use crate::smtp::reply::Reply;
use crate::smtp::session::{Flow, Session};
use crate::smtp::tls;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spool could not be opened or locked.
    #[error(transparent)]
    Spool(#[from] crate::queue::Error),
    /// A listener's certificate or key.
    #[error("listener {address}: {source}")]
    Tls {
        /// The listener.
        address: SocketAddr,
        /// What is wrong.
        source: Box<tls::Error>,
    },
    /// A listener could not bind.
    #[error("listener {address}: cannot listen: {source}")]
    Bind {
        /// The listener.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The relay access rules (the recipients file).
    #[error(transparent)]
    Access(#[from] crate::relay::Error),
    /// The resolver could not be set up from `[delivery] nameservers`.
    #[error("delivery.nameservers: {0}")]
    Resolver(String),
    /// A DKIM key of `[dkim]`.
    #[error("dkim: {0}")]
    Dkim(#[from] crate::authn::Error),
}

/// What every session shares.
pub struct Context {
    /// The config the relay started with.
    pub config: Arc<Config>,
    /// The spool.
    pub spool: Spool,
    /// Relay access rules.
    pub access: AccessRules,
    /// AUTH users.
    pub auth: Authenticator,
    /// The plugin chain; sessions take the current one when they start.
    pub chain: Arc<ChainHandle>,
    /// Becomes true when the relay is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Told about each newly queued message (the delivery scheduler listens).
    pub on_queued: OnceLock<mpsc::UnboundedSender<Spooled>>,
    /// Memory for messages being received, in KiB permits (`limits.max_message_memory`).
    pub message_memory: Arc<Semaphore>,
    /// The relay's one resolver (`[delivery] nameservers`): delivery and
    /// message authentication share it and its cache.
    pub dns: Dns,
    /// SPF, DKIM, DMARC and ARC checks of inbound mail.
    pub verifier: Verifier,
    /// DKIM signing of outbound mail (sessions and delivery's DSNs).
    pub signer: Arc<Signer>,
    /// ARC sealing, when `[authentication.arc_sealer]` is set.
    pub sealer: Option<Arc<Sealer>>,
}

impl Context {
    /// Opens the spool and builds the access rules and users from the config.
    pub fn new(
        config: Config,
        chain: Arc<ChainHandle>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Context, Error> {
        let config = Arc::new(config);
        let spool = Spool::open_with(&config.resolve(&config.spool.path), config.spool.write_back)?;
        let access = AccessRules::from_config(&config)?;
        let auth = Authenticator::new(
            &config.users,
            config.limits.max_auth_failures,
            config.limits.auth_failure_window.0,
        );
        let message_memory = Arc::new(Semaphore::new(config.limits.max_message_memory / 1024));
        let dns = Dns::new(&config.delivery.nameservers).map_err(Error::Resolver)?;
        let verifier = Verifier::new(
            dns.resolver().clone(),
            &config.hostname,
            &config.authentication,
        );
        let signer = Arc::new(Signer::new(&config.dkim, |p| config.resolve(p))?);
        let sealer = match &config.authentication.arc_sealer {
            Some(a) => Some(Arc::new(Sealer::new(
                a,
                |p| config.resolve(p),
                mail_auth::MessageAuthenticator(dns.resolver().clone()),
                &config.hostname,
            )?)),
            None => None,
        };
        Ok(Context {
            config,
            spool,
            access,
            auth,
            chain,
            shutdown,
            on_queued: OnceLock::new(),
            message_memory,
            dns,
            verifier,
            signer,
            sealer,
        })
    }

    /// Tells delivery about a newly spooled message.
    pub fn queued(&self, spooled: Spooled) {
        if let Some(tx) = self.on_queued.get() {
            let _ = tx.send(spooled);
        }
    }
}

/// One listening socket's settings.
pub struct Listener {
    /// The `[[listener]]` table.
    pub config: ListenerConfig,
    /// Present when the listener does TLS (STARTTLS or implicit).
    pub tls: Option<TlsAcceptor>,
}

impl Listener {
    /// STARTTLS is offered on this listener (before TLS is active).
    pub fn offers_starttls(&self) -> bool {
        self.tls.is_some() && self.config.tls_mode() == TlsMode::Starttls
    }
}

/// Counts connections in all and per client address.
struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    max_per_client: usize,
    /// Clients the per-client limit does not hold back: `relay.networks`,
    /// the relay's own (as Postfix exempts `mynetworks`), so one busy
    /// application server may open as many sessions as `max_connections`.
    exempt: Vec<IpNet>,
}

/// Held for the life of a connection; releases its slots on drop.
struct ConnectionSlot {
    _total: OwnedSemaphorePermit,
    ip: IpAddr,
    limits: Arc<ConnectionLimits>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self
            .limits
            .per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl ConnectionLimits {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let permit = self.total.clone().try_acquire_owned().ok()?;
        self.admit_client(permit, ip)
    }

    /// A place in the total, for a connection whose client is not known
    /// yet (behind a PROXY header).
    fn admit_total(&self) -> Option<OwnedSemaphorePermit> {
        self.total.clone().try_acquire_owned().ok()
    }

    /// The per-client check, for a connection that holds its place in the total.
    fn admit_client(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        ip: IpAddr,
    ) -> Option<ConnectionSlot> {
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_client && !self.exempt.iter().any(|net| net.contains(&ip)) {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            _total: permit,
            ip,
            limits: self.clone(),
        })
    }
}

/// A relay with its spool open and its addresses bound, not yet listening:
/// what must be ready before a client can connect (delivery, its control
/// socket) starts in between, then [`Server::listen`].
pub struct Server {
    ctx: Arc<Context>,
    sockets: Vec<(TcpSocket, Arc<Listener>)>,
    shutdown_tx: watch::Sender<bool>,
    limits: Arc<ConnectionLimits>,
    /// The certificates of the listeners that do TLS.
    certificates: Vec<certs::Listening>,
}

/// A relay whose listeners accept connections; [`Listening::run`] serves them.
pub struct Listening {
    ctx: Arc<Context>,
    listeners: Vec<(TcpListener, Arc<Listener>)>,
    shutdown_tx: watch::Sender<bool>,
    limits: Arc<ConnectionLimits>,
    certificates: Vec<certs::Listening>,
}

impl Server {
    /// Opens the spool and binds every listener's address. Fails before
    /// accepting anything if a certificate, the spool lock or an address is
    /// unusable.
    pub async fn bind(config: Config, chain: Arc<ChainHandle>) -> Result<Server, Error> {
        let (shutdown_tx, shutdown) = watch::channel(false);
        let ctx = Arc::new(Context::new(config, chain, shutdown)?);
        let config = &ctx.config;
        let mut sockets = Vec::new();
        let mut certificates = Vec::new();
        for l in &config.listeners {
            let tls_error = |source| Error::Tls {
                address: l.address,
                source: Box::new(source),
            };
            // The config check requires both files when TLS is on.
            let pairs = certs::pairs(config, l);
            let acceptor = if l.tls_mode() == TlsMode::None || pairs.is_empty() {
                None
            } else {
                let store = Certificates::load(pairs).map_err(tls_error)?;
                certificates.push((l.address, store.clone()));
                let acceptor = tls::acceptor_with(store, l.tls_min_version).map_err(|e| {
                    tls_error(tls::Error::Pem {
                        path: l.tls_cert.clone().unwrap_or_default(),
                        message: e.to_string(),
                    })
                })?;
                Some(acceptor)
            };
            let socket = bind(l.address).map_err(|source| Error::Bind {
                address: l.address,
                source,
            })?;
            sockets.push((
                socket,
                Arc::new(Listener {
                    config: l.clone(),
                    tls: acceptor,
                }),
            ));
        }
        let limits = Arc::new(ConnectionLimits {
            total: Arc::new(Semaphore::new(config.limits.max_connections)),
            per_client: Mutex::default(),
            max_per_client: config.limits.max_connections_per_client,
            exempt: config.relay.networks.clone(),
        });
        Ok(Server {
            ctx,
            sockets,
            shutdown_tx,
            limits,
            certificates,
        })
    }

    /// A server with an empty plugin chain.
    pub async fn bind_without_plugins(config: Config) -> Result<Server, Error> {
        Server::bind(config, Arc::new(ChainHandle::new(Chain::empty()))).await
    }

    /// The shared context (for wiring delivery and plugins to it).
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The addresses actually bound (port 0 in the config picks a free port).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// Starts listening on every bound address: from here on clients connect.
    pub fn listen(self) -> Result<Listening, Error> {
        let mut listeners = Vec::new();
        for (socket, listener) in self.sockets {
            let socket = socket.listen(1024).map_err(|source| Error::Bind {
                address: listener.config.address,
                source,
            })?;
            listeners.push((socket, listener));
        }
        Ok(Listening {
            ctx: self.ctx,
            listeners,
            shutdown_tx: self.shutdown_tx,
            limits: self.limits,
            certificates: self.certificates,
        })
    }
}

impl Listening {
    /// Accepts connections until `stop` resolves, then stops accepting, lets
    /// transactions in flight finish for up to `limits.shutdown_grace`, and returns.
    /// Certificates are reloaded when their files change, and on SIGHUP.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let _certificates = (!self.certificates.is_empty())
            .then(|| CertWatcher::start(self.certificates, self.ctx.config.path.clone()));
        let tracker = TaskTracker::new();
        for (socket, listener) in self.listeners {
            tracing::info!(address = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                mode = ?listener.config.mode, tls = ?listener.config.tls_mode(), "listening");
            let ctx = self.ctx.clone();
            let limits = self.limits.clone();
            let sessions = tracker.clone();
            tracker.spawn(accept_loop(socket, listener, ctx, limits, sessions));
        }
        stop.await;
        tracing::info!("shutting down: no new connections, finishing transactions in flight");
        let _ = self.shutdown_tx.send(true);
        tracker.close();
        let grace = self.ctx.config.limits.shutdown_grace.0;
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                sessions = tracker.len(),
                "shutdown grace period over; closing remaining sessions"
            );
        }
    }
}

fn bind(address: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    Ok(socket)
}

async fn accept_loop(
    socket: TcpListener,
    listener: Arc<Listener>,
    ctx: Arc<Context>,
    limits: Arc<ConnectionLimits>,
    sessions: TaskTracker,
) {
    let mut shutdown = ctx.shutdown.clone();
    let counters = metrics().listener(listener.config.address);
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        if listener.config.proxy_protocol {
            let Some(place) = limits.admit_total() else {
                tracing::info!(%peer, "connection limit reached");
                counters.connections.inc(ConnOutcome::Limit);
                continue;
            };
            let (ctx, listener, limits) = (ctx.clone(), listener.clone(), limits.clone());
            let counters = counters.clone();
            sessions.spawn(async move {
                let mut conn = conn;
                let Some((client, local)) = proxied(&mut conn, peer, &listener.config).await else {
                    counters.connections.inc(ConnOutcome::Proxy);
                    return;
                };
                let Some(slot) = limits.admit_client(place, client.ip()) else {
                    tracing::info!(peer = %client, "connection limit reached");
                    counters.connections.inc(ConnOutcome::Limit);
                    refuse(conn).await;
                    return;
                };
                let _open = counters.session();
                connection(conn, client, local, listener, ctx).await;
                drop(slot);
            });
            continue;
        }
        let Some(slot) = limits.admit(peer.ip()) else {
            tracing::info!(%peer, "connection limit reached");
            counters.connections.inc(ConnOutcome::Limit);
            sessions.spawn(refuse(conn));
            continue;
        };
        let ctx = ctx.clone();
        let listener = listener.clone();
        let open = counters.session();
        sessions.spawn(async move {
            let _open = open;
            let local = conn.local_addr().unwrap_or(peer);
            connection(conn, peer, local, listener, ctx).await;
            drop(slot);
        });
    }
}

/// Answers a connection over the limits and closes it.
async fn refuse(mut conn: TcpStream) {
    let mut out = Vec::new();
    Reply::TOO_MANY_CONNECTIONS.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.write_all(&out)).await;
}

/// On a `proxy_protocol` listener: the client and local addresses a
/// trusted load balancer's header gives (its own for a v2 `LOCAL` health
/// check); `None`, and the connection is to be closed, for anyone else.
async fn proxied(
    conn: &mut TcpStream,
    peer: SocketAddr,
    config: &ListenerConfig,
) -> Option<(SocketAddr, SocketAddr)> {
    if !config
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&peer.ip()))
    {
        tracing::info!(%peer, "connection refused: not from a trusted proxy (listener.trusted_proxies)");
        return None;
    }
    let local = conn.local_addr().unwrap_or(peer);
    match proxy::read_header(conn, config.proxy_timeout.0).await {
        Ok(proxy::Header::Proxied {
            source,
            destination,
        }) => Some((source, destination)),
        Ok(proxy::Header::Local) => Some((peer, local)),
        Err(e) => {
            tracing::info!(%peer, error = %e, "connection refused: no valid PROXY header");
            None
        }
    }
}

/// How long a client may take for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

async fn connection(
    conn: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    listener: Arc<Listener>,
    ctx: Arc<Context>,
) {
    let info = SessionInfo {
        peer,
        local,
        helo: None,
        tls: None,
        auth_user: None,
        may_relay: ctx.access.trusted_network(peer.ip()),
    };
    match (listener.config.tls_mode(), listener.tls.clone()) {
        (TlsMode::Implicit, Some(acceptor)) => {
            let Some(stream) = handshake(&acceptor, conn, peer).await else {
                return;
            };
            let mut session = Session::new(stream, ctx, listener, info);
            let tls_info = tls::info(session_tls(&session));
            metrics().tls_session(Direction::Inbound, &tls_info.version);
            session.info_mut().tls = Some(tls_info);
            if session.greet().await {
                session.run().await;
            }
        }
        (_, acceptor) => {
            let mut session = Session::new(conn, ctx, listener, info);
            if !session.greet().await {
                return;
            }
            if session.run().await != Flow::StartTls {
                return;
            }
            let Some(acceptor) = acceptor else { return };
            let (conn, carry) = session.into_parts();
            let Some(stream) = handshake(&acceptor, conn, peer).await else {
                return;
            };
            let tls_info = tls::info(stream.get_ref().1);
            metrics().tls_session(Direction::Inbound, &tls_info.version);
            let mut session = Session::resume(stream, carry);
            session.info_mut().tls = Some(tls_info);
            // A second STARTTLS is refused inside the session, so this ends it.
            session.run().await;
        }
    }
}

fn session_tls<S>(
    session: &Session<tokio_rustls::server::TlsStream<S>>,
) -> &rustls::ServerConnection
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    session.stream().get_ref().1
}

async fn handshake(
    acceptor: &TlsAcceptor,
    conn: TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}
