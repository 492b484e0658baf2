//! The Redis store, for relays that share counters: a plugin's key `k` is the
//! Redis key `<key_prefix>:<plugin>:k`. Every call is bounded by `[kv]
//! timeout`; past it, or when Redis cannot be reached, the plugin gets
//! `unavailable` and the relay goes on. The connection is made lazily and
//! remade after a failure, so the relay starts while Redis is down and the
//! store comes back when Redis does.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, ErrorKind, RedisError, RedisResult, Script, TlsCertificates};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::KvConfig;
use crate::plugins::bindings::kv::Error;

/// Calls in a row that time out before the connection is replaced: a slow
/// Redis gets over it by itself, but a peer that vanished without closing the
/// connection (a failover, a reboot) would hold it until TCP gives up.
const REPLACE_AFTER: u32 = 3;
/// A connection younger than this is not replaced, so a burst of calls timing
/// out together does not churn connections.
const REPLACE_EVERY: Duration = Duration::from_secs(1);
/// Longest pause between reconnection attempts, so the store is back soon
/// after Redis is.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long the check at start waits for Redis before it warns.
const FIRST_CHECK: Duration = Duration::from_secs(2);

/// Adds to a counter and sets its TTL only if this call created it.
///
/// A script rather than MULTI with INCRBY and PEXPIRE NX: NX would also put a
/// TTL on an existing counter that has none, and EXEC would still run PEXPIRE
/// after INCRBY failed on a value that is not a number. A script stops at the
/// first error and runs atomically. The value is returned as Redis stores it
/// (a string), since Lua numbers are doubles and lose precision past 2^53.
const INCR: &str = r"
local created = redis.call('EXISTS', KEYS[1]) == 0
redis.call('INCRBY', KEYS[1], ARGV[1])
local n = redis.call('GET', KEYS[1])
if created and ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return n
";

/// A client for a `redis://` or `rediss://` URL, checked without connecting.
pub fn client(url: &str) -> Result<Client, String> {
    // The URL may hold a password: messages never repeat it.
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("redis" | "rediss") => {}
        _ => return Err("expected redis://host:port/db or rediss://host:port/db".into()),
    }
    Client::open(url).map_err(|e| format!("not a usable Redis URL: {e}"))
}

/// The PEM certificates of a `ca_file`, checked to hold at least one.
pub fn ca_certificates(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        Ok(_) => Err(format!("{}: no PEM certificate in it", path.display())),
        Err(e) => Err(format!(
            "{}: not a PEM certificate file: {e}",
            path.display()
        )),
    }
}

/// The store. Cheap to share: the connection is multiplexed.
pub struct RedisStore {
    inner: Arc<Inner>,
    incr: Script,
}

struct Inner {
    client: Client,
    manager: ConnectionManagerConfig,
    conn: Mutex<Conn>,
    /// `host:port`, for the log (the URL may carry a password).
    addr: String,
    prefix: String,
    timeout: Duration,
    /// Calls in a row that timed out.
    timeouts: AtomicU32,
    /// Whether the last call reached Redis, so that going down and coming
    /// back are each logged once rather than at every call.
    up: AtomicBool,
}

/// The shared connection and when it was made.
struct Conn {
    manager: ConnectionManager,
    made: Instant,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("addr", &self.inner.addr)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Opens the store without waiting for Redis, and checks in the
    /// background that it answers, warning once if it does not.
    pub fn new(config: &KvConfig) -> Result<RedisStore, String> {
        let mut client = client(&config.redis_url)?;
        if let Some(ca) = &config.ca_file {
            let certificates = TlsCertificates {
                client_tls: None,
                root_cert: Some(ca_certificates(ca)?),
            };
            client = Client::build_with_tls(config.redis_url.as_str(), certificates)
                .map_err(|e| format!("kv ca_file {}: {e}", ca.display()))?;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err("the Redis store needs to be opened on the tokio runtime".into());
        }
        if matches!(
            client.get_connection_info().addr(),
            ConnectionAddr::TcpTls { .. }
        ) {
            // The redis crate builds its TLS config with rustls' process-wide
            // provider; without one installed it would panic. An error means
            // one already is.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let timeout = config.timeout.0;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_max_delay(MAX_BACKOFF);
        let conn = Conn {
            manager: connect(&client, &manager)?,
            made: Instant::now(),
        };
        let inner = Arc::new(Inner {
            addr: client.get_connection_info().addr().to_string(),
            client,
            manager,
            conn: Mutex::new(conn),
            prefix: config.key_prefix.clone(),
            timeout,
            timeouts: AtomicU32::new(0),
            up: AtomicBool::new(true),
        });
        tokio::spawn(first_check(inner.clone()));
        Ok(RedisStore {
            inner,
            incr: Script::new(INCR),
        })
    }

    fn key(&self, ns: &str, key: &str) -> String {
        format!("{}:{ns}:{key}", self.inner.prefix)
    }

    /// The live value of a key.
    pub async fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let cmd = redis::cmd("GET").arg(self.key(ns, key)).clone();
        self.run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
            .map_err(unavailable)
    }

    /// Sets a key, with its TTL in the same command.
    pub async fn set(
        &self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let k = self.key(ns, key);
        let cmd = match ttl {
            // Redis refuses `PX 0`; a value that expires at once is no value.
            Some(t) if t.is_zero() => redis::cmd("DEL").arg(k).clone(),
            Some(t) => redis::cmd("SET")
                .arg(k)
                .arg(value)
                .arg("PX")
                .arg(millis(t))
                .clone(),
            None => redis::cmd("SET").arg(k).arg(value).clone(),
        };
        self.run(|mut c| async move { cmd.query_async::<redis::Value>(&mut c).await })
            .await
            .map(drop)
            .map_err(unavailable)
    }

    /// Removes a key; true when it existed.
    pub async fn delete(&self, ns: &str, key: &str) -> Result<bool, Error> {
        let cmd = redis::cmd("DEL").arg(self.key(ns, key)).clone();
        self.run(|mut c| async move { cmd.query_async::<i64>(&mut c).await })
            .await
            .map(|n| n > 0)
            .map_err(unavailable)
    }

    /// Adds `delta` atomically; the TTL applies only when the key is created.
    pub async fn incr(
        &self,
        ns: &str,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, Error> {
        let mut call = self.incr.prepare_invoke();
        call.key(self.key(ns, key))
            .arg(delta)
            .arg(ttl.map(|t| millis(t).to_string()).unwrap_or_default());
        let value: String = self
            .run(|mut c| async move { call.invoke_async(&mut c).await })
            .await
            .map_err(|e| match e {
                Failure::Redis(e) if not_a_number(&e) => Error::NotANumber,
                other => unavailable(other),
            })?;
        value
            .parse()
            .map_err(|_| Error::Unavailable(format!("Redis answered {value:?} to an increment")))
    }

    /// Runs one exchange on the shared connection within the timeout, and
    /// keeps track of whether Redis is reachable.
    async fn run<T, F, Fut>(&self, exchange: F) -> Result<T, Failure>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let inner = &self.inner;
        match tokio::time::timeout(inner.timeout, exchange(inner.connection())).await {
            Ok(Ok(v)) => {
                inner.reached();
                Ok(v)
            }
            // An error reply: Redis is there, it refused this command.
            Ok(Err(e)) if matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension) => {
                inner.reached();
                Err(Failure::Redis(e))
            }
            Ok(Err(e)) => {
                let why = e.to_string();
                inner.unreachable(&why);
                Err(Failure::Unreachable(why))
            }
            Err(_) => {
                let why = format!("no answer within {:?}", inner.timeout);
                inner.unreachable(&why);
                if inner.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= REPLACE_AFTER {
                    inner.replace_connection();
                }
                Err(Failure::Unreachable(why))
            }
        }
    }
}

/// Why an exchange failed.
enum Failure {
    /// Redis answered with an error.
    Redis(RedisError),
    /// No answer: not connected, connection lost, or too slow.
    Unreachable(String),
}

fn unavailable(f: Failure) -> Error {
    match f {
        Failure::Redis(e) => Error::Unavailable(format!("Redis: {e}")),
        Failure::Unreachable(why) => Error::Unavailable(format!("Redis unreachable: {why}")),
    }
}

/// INCRBY's refusals: the value is not a decimal integer (or not a string at
/// all), or the sum would overflow.
fn not_a_number(e: &RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
        || e.detail()
            .is_some_and(|d| d.contains("not an integer") || d.contains("overflow"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn connect(client: &Client, config: &ConnectionManagerConfig) -> Result<ConnectionManager, String> {
    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
        .map_err(|e| format!("Redis connection: {e}"))
}

impl Inner {
    fn connection(&self) -> ConnectionManager {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.manager.clone()
    }

    fn reached(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(redis = %self.addr, "kv store: Redis is reachable again");
        }
    }

    fn unreachable(&self, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                redis = %self.addr,
                error = why,
                "kv store: cannot reach Redis; plugins' kv calls answer `unavailable` until it is back"
            );
        }
    }

    fn replace_connection(&self) {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn.made.elapsed() < REPLACE_EVERY {
            return;
        }
        self.timeouts.store(0, Ordering::Relaxed);
        conn.made = Instant::now();
        match connect(&self.client, &self.manager) {
            Ok(c) => conn.manager = c,
            Err(e) => {
                tracing::warn!(redis = %self.addr, error = %e, "kv store: cannot replace the connection")
            }
        }
    }
}

/// Says at start whether Redis answers. The relay runs either way. A
/// connection of its own, tried once, so the warning names the cause (the
/// shared one retries quietly).
async fn first_check(inner: Arc<Inner>) {
    let ping = async {
        let mut conn = inner.client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(FIRST_CHECK.max(inner.timeout), ping).await {
        Ok(Ok(_)) => {
            inner.reached();
            tracing::info!(redis = %inner.addr, prefix = %inner.prefix, "kv store: Redis");
            // Connect the shared connection now rather than in the first
            // plugin call, whose timeout a TLS handshake could use up.
            let mut conn = inner.connection();
            let cmd = redis::cmd("PING");
            let warm = cmd.query_async::<String>(&mut conn);
            let _ = tokio::time::timeout(FIRST_CHECK, warm).await;
        }
        Ok(Err(e)) => inner.unreachable(&e.to_string()),
        Err(_) => inner.unreachable("no answer to PING"),
    }
}
