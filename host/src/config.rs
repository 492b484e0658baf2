//! The one TOML config. Every key has a default except the listeners; an unknown
//! or malformed key is an error that names it (serde's `deny_unknown_fields` plus
//! the toml crate's line and column), prefixed with the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// Config errors: each names the file and, where it applies, the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The toml crate's message, naming the key, line and column.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("config {path}: `{key}`: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The offending key, dotted.
        key: String,
        /// What was expected.
        message: String,
    },
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The name the relay gives itself in the banner, EHLO and `Received:`.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Where the relay listens; at least one is required.
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// The spool.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Who may relay where.
    #[serde(default)]
    pub relay: RelayConfig,
    /// AUTH users.
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    /// Protocol and resource limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// SMTP behaviour choices.
    #[serde(default)]
    pub smtp: SmtpConfig,
    /// Outbound delivery.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// The plugins folder and runtime settings.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// The hook chain, in order.
    #[serde(default, rename = "plugin")]
    pub plugin_chain: Vec<PluginConfig>,
    /// The key-value store of plugins granted `kv`.
    #[serde(default)]
    pub kv: KvConfig,
    /// Log settings.
    #[serde(default)]
    pub log: LogConfig,
    /// Inbound SPF, DKIM, DMARC and ARC checks.
    #[serde(default)]
    pub authentication: crate::authn::AuthenticationConfig,
    /// Outbound DKIM signing.
    #[serde(default)]
    pub dkim: crate::authn::DkimConfig,
    /// The admin HTTP listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The folder the config file is in: relative paths in the config are
    /// relative to it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself.
    #[serde(skip)]
    pub path: PathBuf,
    /// What is accepted but should change (old names), one line each, for
    /// `postern check` and the log at start.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

fn default_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own and
    // NUL-terminates it when it fits; we read only up to the first NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Port-25 relay rules or submission (AUTH required).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Port-25 rules: AUTH optional.
    Relay,
    /// AUTH required before MAIL.
    Submission,
}

/// How a listener does TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// STARTTLS offered (needs a certificate).
    Starttls,
    /// TLS from the first byte (RFC 8314).
    Implicit,
    /// No TLS.
    None,
}

/// The oldest TLS version a connection may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default).
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsVersion {
    /// The rustls versions allowed from this one up.
    pub fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static BOTH: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            TlsVersion::Tls12 => &BOTH,
            TlsVersion::Tls13 => &ONLY_13,
        }
    }
}

/// One `[[listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `ip:port`; IPv6 as `[::1]:2525`.
    pub address: SocketAddr,
    /// `relay` (default) or `submission`.
    #[serde(default = "default_mode")]
    pub mode: ListenerMode,
    /// Defaults to `starttls` when a certificate is given, else `none`.
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// PEM certificate chain.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// More certificates, each given to clients that ask (SNI) for a name
    /// it is valid for; `tls_cert` is for the others.
    #[serde(default)]
    pub tls_certificates: Vec<CertificateFiles>,
    /// Overrides of `[authentication]` for this listener.
    #[serde(default)]
    pub authentication: crate::authn::ListenerAuthentication,
    /// The oldest TLS version clients may use: `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub tls_min_version: TlsVersion,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from
    /// a load balancer, naming the real client.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The load balancers allowed to send one; a connection from anywhere
    /// else is refused.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Time allowed for the PROXY header to arrive.
    #[serde(default = "default_proxy_timeout")]
    pub proxy_timeout: HumanDuration,
}

/// One entry of `listener.tls_certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

fn default_proxy_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_mode() -> ListenerMode {
    ListenerMode::Relay
}

impl ListenerConfig {
    /// The effective TLS mode.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls.unwrap_or(if self.tls_cert.is_some() {
            TlsMode::Starttls
        } else {
            TlsMode::None
        })
    }
}

/// `[spool]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// The spool folder (created if missing).
    pub path: PathBuf,
    /// On ext2/3/4 and XFS, a message written over a pooled file's allocated
    /// blocks is written back without a disk cache flush of its own, and the
    /// folder fsync after its rename flushes it. `false`: fdatasync every
    /// message, as on other filesystems.
    pub write_back: bool,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: default_spool_path(),
            write_back: true,
        }
    }
}

fn default_spool_path() -> PathBuf {
    PathBuf::from("spool")
}

/// Valid recipients for the relay domains: a list, or a file with one address per line.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RecipientList {
    /// Inline list.
    List(Vec<String>),
    /// A file path.
    File(PathBuf),
}

/// `[relay]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Clients that may relay anywhere.
    #[serde(default)]
    pub networks: Vec<IpNet>,
    /// Domains anyone may send to.
    #[serde(default)]
    pub domains: Vec<String>,
    /// When set, only these addresses in `domains` are accepted (others 550 5.1.1).
    #[serde(default)]
    pub recipients: Option<RecipientList>,
}

/// One `[[user]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Login name.
    pub name: String,
    /// argon2 or bcrypt PHC string (`postern passwd` prints one).
    pub password_hash: String,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message accepted, bytes.
    pub max_message_size: usize,
    /// Recipients per transaction.
    pub max_recipients: usize,
    /// Concurrent connections in all.
    pub max_connections: usize,
    /// Concurrent connections from one client address.
    pub max_connections_per_client: usize,
    /// Time allowed for each command line, the wait before it included.
    pub command_timeout: HumanDuration,
    /// Time allowed between two reads of message data.
    pub data_timeout: HumanDuration,
    /// Errors before the session is closed.
    pub max_errors: usize,
    /// Failed AUTH attempts per client address before AUTH is refused
    /// (454 4.7.0) for `auth_failure_window`; attempts being checked at
    /// once count too.
    pub max_auth_failures: usize,
    /// How long a client address that reached `max_auth_failures` is
    /// refused, from its last failure.
    pub auth_failure_window: HumanDuration,
    /// Longest line accepted in message content before 552 (lines over 998 octets
    /// are folded on the way out).
    pub max_line_length: usize,
    /// More `Received:` headers than this is a mail loop (554 5.4.6).
    pub max_received_headers: usize,
    /// How long in-flight transactions may take to finish on shutdown.
    pub shutdown_grace: HumanDuration,
    /// Memory all sessions together may hold for messages being received, in
    /// bytes. A message that finds none left is read to its end and answered
    /// `452 4.3.1`, so many large messages at once cannot exhaust memory.
    pub max_message_memory: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 1000,
            max_connections: 2000,
            max_connections_per_client: 100,
            command_timeout: HumanDuration(Duration::from_secs(300)),
            data_timeout: HumanDuration(Duration::from_secs(600)),
            max_errors: 20,
            max_auth_failures: 5,
            auth_failure_window: HumanDuration(Duration::from_secs(300)),
            max_line_length: 64 * 1024,
            max_received_headers: 100,
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
            max_message_memory: 1 << 30,
        }
    }
}

/// What to do with a bare CR or LF in message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    /// A bare LF is a line end, a stray CR is removed (like Postfix 3.9).
    #[default]
    Normalize,
    /// The message is refused with a 5xx once it has ended.
    Reject,
}

/// `[smtp]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// `normalize` (default) or `reject`.
    pub bare_newline: BareNewline,
    /// Name the authenticated user in the `Received:` header.
    pub received_auth_user: bool,
    /// Clients in these networks (internal hosts, say) are left out of our
    /// `Received:` header: no `from` clause with their name and address.
    /// That header is written before the data hook, so no plugin could
    /// remove it; this keeps internal addressing from leaving.
    pub received_hide_networks: Vec<IpNet>,
}

/// `[delivery]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// `smtp://host:port` or `smtps://host:port`; absent means MX lookup.
    pub smarthost: Option<String>,
    /// Refuse to send without verified TLS.
    pub require_tls: bool,
    /// PEM CA bundle for verification instead of the system roots.
    pub tls_ca: Option<PathBuf>,
    /// SHA-256 fingerprints of the smart host's certificate
    /// (`"sha256:HEX"`, either case, colons optional): one of them must
    /// match, TLS is then mandatory and a mismatch defers the mail.
    pub tls_fingerprint: Vec<String>,
    /// The oldest TLS version used towards next hops: `"1.2"` (default) or
    /// `"1.3"`.
    pub tls_min_version: TlsVersion,
    /// `ip:port` nameservers; empty means the system's.
    pub nameservers: Vec<String>,
    /// Port for MX delivery.
    pub mx_port: u16,
    /// Apply the MTA-STS policies (RFC 8461) of recipient domains to MX
    /// delivery.
    pub mta_sts: bool,
    /// Port the policies are fetched from (HTTPS).
    pub mta_sts_port: u16,
    /// Retry intervals; the last repeats until `max_age`.
    pub retry: Vec<HumanDuration>,
    /// Give up and bounce after this long.
    pub max_age: HumanDuration,
    /// Per-domain routes: recipient domain (lowercase) to `"mx"`, `"mx:other.domain"`,
    /// `"smtp://host:port"` or `"smtps://host:port"`, or to a table
    /// `{ next_hop = "...", require_tls = true }`. Takes precedence over `smarthost`.
    pub routes: BTreeMap<String, RouteEntry>,
    /// Outbound connections open at once, over all destinations.
    pub max_connections: usize,
    /// Outbound connections open at once to one destination (Postfix's default is 20).
    pub max_per_destination: usize,
    /// Messages held in memory for delivery at once; the rest wait in the spool.
    pub max_active: usize,
    /// Where failed mail from the null sender goes (absent: logged and dropped).
    pub postmaster: Option<String>,
    /// How long to wait on a next hop at each stage of a delivery.
    pub timeouts: DeliveryTimeouts,
    /// The folder that `local-folder` routes are relative to.
    pub local_folder: PathBuf,
    /// A recipient that asked for NOTIFY=DELAY and is still deferred after this
    /// long gets one delay notice (RFC 3464 `Action: delayed`).
    pub delay_warning: HumanDuration,
    /// Smart-host pools by name (`pool:NAME` in a route).
    pub pools: BTreeMap<String, PoolConfig>,
    /// Quarantined mail (held by a plugin at acceptance, never bounced) is
    /// removed this long after it arrived, unless released before.
    pub quarantine_retention: HumanDuration,
}

/// `[delivery.timeouts]`: how long the delivery client waits on a next hop.
/// The defaults are RFC 5321 4.5.3.2's minimums (connect is ours); shorter
/// ones free connections held by stalled servers sooner, at the risk of
/// deferring mail to slow but working ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryTimeouts {
    /// Opening the TCP connection (30 s).
    pub connect: HumanDuration,
    /// The 220 greeting (5 minutes).
    pub greeting: HumanDuration,
    /// The reply to EHLO, STARTTLS and its handshake, AUTH, MAIL, RCPT and
    /// RSET (5 minutes).
    pub command: HumanDuration,
    /// The 354 reply to DATA (2 minutes).
    pub data: HumanDuration,
    /// Writing each block of message data (3 minutes).
    pub data_block: HumanDuration,
    /// The reply to the end of data (10 minutes).
    pub data_end: HumanDuration,
}

impl Default for DeliveryTimeouts {
    fn default() -> Self {
        let secs = |s| HumanDuration(Duration::from_secs(s));
        DeliveryTimeouts {
            connect: secs(30),
            greeting: secs(300),
            command: secs(300),
            data: secs(120),
            data_block: secs(180),
            data_end: secs(600),
        }
    }
}

impl DeliveryTimeouts {
    /// Each key with its value, for validation.
    fn entries(&self) -> [(&'static str, HumanDuration); 6] {
        [
            ("connect", self.connect),
            ("greeting", self.greeting),
            ("command", self.command),
            ("data", self.data),
            ("data_block", self.data_block),
            ("data_end", self.data_end),
        ]
    }
}

/// `[delivery.pools.NAME]`: smart hosts that share the mail routed to the
/// pool by smooth weighted round robin. A host that cannot be reached (or
/// answers 4xx to the greeting) is skipped for a backoff period, and its
/// waiting messages go to the next host at once.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// `smtp://[user:pass@]host:port` or `smtps://...`, as `smarthost`.
    pub hosts: Vec<String>,
    /// One positive weight per host (all 1 when absent).
    #[serde(default)]
    pub weights: Option<Vec<u32>>,
    /// Refuse to send without verified TLS (default: `delivery.require_tls`).
    #[serde(default)]
    pub require_tls: Option<bool>,
    /// The hosts' certificates pinned (`sha256:HEX`, as
    /// `delivery.tls_fingerprint`): TLS is then mandatory for every host.
    #[serde(default)]
    pub tls_fingerprint: Vec<String>,
}

impl PoolConfig {
    /// Each host's weight.
    pub fn weight(&self, i: usize) -> u32 {
        self.weights
            .as_ref()
            .and_then(|w| w.get(i).copied())
            .unwrap_or(1)
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            smarthost: None,
            require_tls: false,
            tls_ca: None,
            tls_fingerprint: Vec::new(),
            tls_min_version: TlsVersion::Tls12,
            nameservers: Vec::new(),
            mx_port: 25,
            mta_sts: true,
            mta_sts_port: 443,
            retry: ["1m", "5m", "15m", "30m", "1h", "2h", "4h"]
                .iter()
                .map(|s| s.parse().expect("valid default"))
                .collect(),
            max_age: HumanDuration(Duration::from_secs(5 * 86400)),
            routes: BTreeMap::new(),
            max_connections: 100,
            max_per_destination: 20,
            max_active: 10_000,
            postmaster: None,
            timeouts: DeliveryTimeouts::default(),
            local_folder: PathBuf::from("local"),
            delay_warning: HumanDuration(Duration::from_secs(4 * 3600)),
            pools: BTreeMap::new(),
            quarantine_retention: HumanDuration(Duration::from_secs(30 * 86400)),
        }
    }
}

/// One `[delivery.routes]` value: a next hop, or a table with its own TLS rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RouteEntry {
    /// `"mx"`, `"mx:domain"`, `"smtp://..."`, `"smtps://..."` or `"pool:NAME"`.
    NextHop(String),
    /// `{ next_hop = "...", require_tls = true }`.
    Table(RouteTable),
}

/// The table form of a route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    /// As the string form.
    pub next_hop: String,
    /// Overrides `delivery.require_tls` for this route.
    #[serde(default)]
    pub require_tls: Option<bool>,
    /// Certificate fingerprints pinned for this route's next hop, as
    /// `delivery.tls_fingerprint`.
    #[serde(default)]
    pub tls_fingerprint: Vec<String>,
}

impl RouteEntry {
    /// The next hop.
    pub fn next_hop(&self) -> &str {
        match self {
            RouteEntry::NextHop(s) => s,
            RouteEntry::Table(t) => &t.next_hop,
        }
    }

    /// The certificate fingerprints pinned for this route.
    pub fn tls_fingerprint(&self) -> &[String] {
        match self {
            RouteEntry::NextHop(_) => &[],
            RouteEntry::Table(t) => &t.tls_fingerprint,
        }
    }

    /// This route's TLS rule, if it has its own.
    pub fn require_tls(&self) -> Option<bool> {
        match self {
            RouteEntry::NextHop(_) => None,
            RouteEntry::Table(t) => t.require_tls,
        }
    }
}

/// `[plugins]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// The folder `[[plugin]] path`s are relative to; watched for changes.
    pub dir: PathBuf,
    /// Compiled plugins, keyed by content hash and engine, so a restart does
    /// not recompile. Default: `plugin-cache` in the spool. Created with mode
    /// 0700; a folder others can write to is not used, since loading a
    /// compiled artifact trusts it.
    pub cache_dir: Option<PathBuf>,
    /// Plugins granted `archive` get `<archive_dir>/<plugin name>` as their
    /// `/archive` folder.
    pub archive_dir: PathBuf,
    /// Archived files older than this are removed by the relay (none: kept
    /// for ever). Read at start.
    pub archive_retention: Option<HumanDuration>,
    /// How often the relay looks for archived files past the retention.
    pub archive_sweep: HumanDuration,
    /// The most memory any plugin instance may be given (`memory_mb` is capped
    /// by it); sizes the instance pool's slots at start.
    pub max_memory_mb: u64,
    /// Reload the chain when a `.wasm` in `dir` or the config file changes.
    pub watch: bool,
    /// Bytes the plugins' metadata of one scope (a session, or a message)
    /// may take together; past it `set` answers `too-large`.
    pub max_metadata_size: usize,
    /// Delivery reports waiting for the `delivered` hook; when the queue is
    /// full, new ones are dropped and counted.
    pub delivered_queue: usize,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("plugins"),
            cache_dir: None,
            archive_dir: PathBuf::from("archive"),
            archive_retention: None,
            archive_sweep: HumanDuration(Duration::from_secs(86400)),
            max_memory_mb: 256,
            watch: true,
            max_metadata_size: 64 * 1024,
            delivered_queue: 10_000,
        }
    }
}

/// Where the plugins' key-value store lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvBackend {
    /// In the relay's memory: fast, private to this relay, gone on restart.
    #[default]
    Memory,
    /// In Redis, so several relays share counters.
    Redis,
}

/// `[kv]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    /// `memory` (default) or `redis`.
    pub backend: KvBackend,
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS.
    pub redis_url: String,
    /// Keys are stored in Redis as `<key_prefix>:<plugin name>:<key>`.
    pub key_prefix: String,
    /// Time one Redis call may take, connecting included; past it the plugin
    /// gets `unavailable`.
    pub timeout: HumanDuration,
    /// PEM file of the CA certificates that sign the Redis server's
    /// certificate, for `rediss://` behind a private CA; without it the
    /// system's roots. Relative to the config file.
    pub ca_file: Option<PathBuf>,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            backend: KvBackend::Memory,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "postern".into(),
            timeout: HumanDuration(Duration::from_millis(200)),
            ca_file: None,
        }
    }
}

/// A hook, as named in `hooks` and `timeouts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum HookName {
    /// After connect, before the banner.
    #[serde(rename = "connect")]
    Connect,
    /// MAIL FROM.
    #[serde(rename = "mail_from", alias = "mail-from")]
    MailFrom,
    /// RCPT TO.
    #[serde(rename = "rcpt")]
    Rcpt,
    /// After DATA.
    #[serde(rename = "data")]
    Data,
    /// At delivery.
    #[serde(rename = "route")]
    Route,
    /// After EHLO/HELO.
    #[serde(rename = "helo")]
    Helo,
    /// After each delivery attempt.
    #[serde(rename = "delivered")]
    Delivered,
}

impl HookName {
    /// Every hook (in the order of the WIT `hook` enum, which is also each
    /// one's [`HookName::index`]).
    pub const ALL: [HookName; 7] = [
        HookName::Connect,
        HookName::MailFrom,
        HookName::Rcpt,
        HookName::Data,
        HookName::Route,
        HookName::Helo,
        HookName::Delivered,
    ];

    /// Its position in [`HookName::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name used in the config and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HookName::Connect => "connect",
            HookName::MailFrom => "mail_from",
            HookName::Rcpt => "rcpt",
            HookName::Data => "data",
            HookName::Route => "route",
            HookName::Helo => "helo",
            HookName::Delivered => "delivered",
        }
    }
}

impl fmt::Display for HookName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a plugin's failure (trap, deadline, memory cap, bad answer) turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// 451 4.3.0: the client retries later (the default; nothing fails open).
    #[default]
    Tempfail,
    /// Skip the plugin, as if it answered `continue`.
    Continue,
    /// 550 5.7.1.
    Reject,
}

/// How a plugin's instances live. Whatever the mode, an instance is retired
/// after a trap, a memory high-water mark or many uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Instances {
    /// Warm instances, each lent for one hook call: the few in use stay in
    /// the processor's caches, which under load makes a call markedly
    /// cheaper. A plugin keeps what it needs from one hook to the next in
    /// metadata, never in its memory.
    #[default]
    #[serde(rename = "per-call")]
    PerCall,
    /// Warm instances, each lent to one transaction at a time (from its
    /// first hook to the end of data, RSET or the session's end). `warm` is
    /// the old name.
    #[serde(rename = "transaction", alias = "warm")]
    Transaction,
    /// A new instance per transaction: no state outlives it.
    #[serde(rename = "fresh")]
    Fresh,
}

impl Instances {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Instances::PerCall => "per-call",
            Instances::Transaction => "transaction",
            Instances::Fresh => "fresh",
        }
    }
}

/// A host interface a plugin may be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// `postern:relay/log`.
    Log,
    /// `postern:relay/kv`.
    Kv,
    /// `postern:relay/dns`.
    Dns,
    /// The plugin's archive folder, preopened as `/archive`.
    Archive,
    /// Recipients the plugin adds or replaces at data need not pass the
    /// relay access rules (they are the administrator's own aliases and
    /// journal addresses).
    Recipients,
}

impl Grant {
    /// The name used in `grants` and in WIT.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Log => "log",
            Grant::Kv => "kv",
            Grant::Dns => "dns",
            Grant::Archive => "archive",
            Grant::Recipients => "recipients",
        }
    }
}

/// `timeouts = { data = 2000, route = 200 }`: per-hook deadlines in ms.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookTimeouts {
    /// connect.
    pub connect: Option<u64>,
    /// mail_from.
    #[serde(alias = "mail-from")]
    pub mail_from: Option<u64>,
    /// rcpt.
    pub rcpt: Option<u64>,
    /// data.
    pub data: Option<u64>,
    /// route.
    pub route: Option<u64>,
    /// helo.
    pub helo: Option<u64>,
    /// delivered.
    pub delivered: Option<u64>,
}

impl HookTimeouts {
    fn get(&self, hook: HookName) -> Option<u64> {
        match hook {
            HookName::Connect => self.connect,
            HookName::MailFrom => self.mail_from,
            HookName::Rcpt => self.rcpt,
            HookName::Data => self.data,
            HookName::Route => self.route,
            HookName::Helo => self.helo,
            HookName::Delivered => self.delivered,
        }
    }
}

/// One `[[plugin]]` in the hook chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Name used in logs, metrics and the kv key space.
    pub name: String,
    /// `.wasm` file relative to `[plugins] dir`.
    pub path: PathBuf,
    /// The hooks to call: a subset of what the plugin's `init` returns
    /// (default: all of them).
    #[serde(default)]
    pub hooks: Option<Vec<HookName>>,
    /// What a failure turns into.
    #[serde(default)]
    pub on_error: OnError,
    /// Guest time allowed per hook call, in ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Per-hook deadlines overriding `timeout_ms`.
    #[serde(default)]
    pub timeouts: HookTimeouts,
    /// Memory cap per instance, in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// `per-call` (default), `transaction` or `fresh`.
    #[serde(default)]
    pub instances: Instances,
    /// A warm instance is retired after this many calls, so a slow leak in
    /// the guest cannot grow without end; 0 never retires one for its uses.
    #[serde(default = "default_retire_after_uses")]
    pub retire_after_uses: u32,
    /// A warm instance whose memory grew past this percentage of
    /// `memory_mb` is retired after its call: guest memory never shrinks,
    /// and one that grows with use (a JavaScript engine's heap) would next
    /// hit the cap and fail a call. 100 retires only at the cap.
    #[serde(default = "default_retire_at_memory_percent")]
    pub retire_at_memory_percent: u8,
    /// Host interfaces the plugin may use.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Plugin configuration handed to `init` as JSON.
    #[serde(default)]
    pub config: Option<toml::Table>,
    /// A new version that runs beside this one on the same calls, its
    /// verdicts counted against this one's and never enforced (`.wasm`
    /// relative to `[plugins] dir`).
    #[serde(default)]
    pub shadow: Option<PathBuf>,
    /// The shadow's `[plugin.config]`; the live one's when absent.
    #[serde(default)]
    pub shadow_config: Option<toml::Table>,
}

fn default_timeout_ms() -> u64 {
    50
}

fn default_memory_mb() -> u64 {
    64
}

fn default_retire_after_uses() -> u32 {
    10_000
}

fn default_retire_at_memory_percent() -> u8 {
    75
}

impl PluginConfig {
    /// The deadline of one call of `hook`.
    pub fn timeout(&self, hook: HookName) -> Duration {
        Duration::from_millis(self.timeouts.get(hook).unwrap_or(self.timeout_ms))
    }

    /// The `[plugin.config]` table as the JSON `init` gets.
    pub fn config_json(&self) -> String {
        match &self.config {
            Some(t) => serde_json::to_string(t).unwrap_or_else(|_| "{}".into()),
            None => "{}".into(),
        }
    }

    /// The entry its shadow runs as: the shadow's file and config, named
    /// `<name>@shadow` (its log tag and kv space), otherwise the same limits
    /// and grants. Its instances are lent per call (fresh ones stay fresh).
    pub fn shadow_entry(&self) -> Option<PluginConfig> {
        let path = self.shadow.clone()?;
        Some(PluginConfig {
            name: format!("{}@shadow", self.name),
            path,
            config: self.shadow_config.clone().or_else(|| self.config.clone()),
            shadow: None,
            shadow_config: None,
            instances: match self.instances {
                Instances::Fresh => Instances::Fresh,
                _ => Instances::PerCall,
            },
            ..self.clone()
        })
    }

    /// The plugin name its metadata is kept under: a shadow's is the live
    /// plugin's (it reads what the live one wrote; its own writes go to a
    /// copy).
    pub fn metadata_name(&self) -> &str {
        self.name.strip_suffix("@shadow").unwrap_or(&self.name)
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. `info` or `postern=debug`; `RUST_LOG` wins.
    pub level: String,
    /// `text` (default) or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log records are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line a record for a person, coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object a line, its fields at the top level.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not a log format (text or json)")),
        }
    }
}

/// `[admin]`: the HTTP listener for metrics, the JSON API, injection and the
/// status page. Off unless `address` is set; the same API is always served on
/// the control socket in the spool folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `ip:port`. A non-loopback address needs `token`, `tls_cert` and `tls_key`.
    pub address: Option<SocketAddr>,
    /// Bearer token required by every request but `/health` (a browser logs
    /// in with it once and gets a session cookie). Without it the listener
    /// answers only reads, and injection only with a `[[user]]` login.
    pub token: Option<String>,
    /// PEM certificate chain: the listener speaks HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
    /// How long an injection's `Idempotency-Key` is remembered.
    pub idempotency_window: HumanDuration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: None,
            token: None,
            tls_cert: None,
            tls_key: None,
            idempotency_window: HumanDuration(Duration::from_secs(24 * 3600)),
        }
    }
}

/// A duration written like `"30s"`, `"5m"`, `"4h"`, `"5d"` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("expected a duration like \"30s\", \"5m\", \"4h\", got {s:?}"))?;
        let secs = match unit.trim() {
            "ms" => return Ok(HumanDuration(Duration::from_millis(n))),
            "" | "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86400,
            _ => {
                return Err(format!(
                    "unknown duration unit in {s:?} (use ms, s, m, h or d)"
                ))
            }
        };
        Ok(HumanDuration(Duration::from_secs(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        match s {
            0 => write!(f, "{}ms", self.0.as_millis()),
            s if s % 86400 == 0 => write!(f, "{}d", s / 86400),
            s if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            s if s % 60 == 0 => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(HumanDuration(Duration::from_secs(n))),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Written as whole seconds (what the admin API sends).
impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.as_secs())
    }
}

impl Config {
    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses config text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let mut config: Config = toml::from_str(text).map_err(|e| Error::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        config.path = path.into();
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        // The Redis client gets the [kv] table alone, so its path is made
        // absolute here.
        config.kv.ca_file = config.kv.ca_file.as_deref().map(|p| config.resolve(p));
        config.check()?;
        config.warnings = old_names(text, path);
        Ok(config)
    }
}

/// Old names the config still accepts, each with what to write instead.
fn old_names(text: &str, path: &Path) -> Vec<String> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Vec::new();
    };
    let plugins = table.get("plugin").and_then(|p| p.as_array());
    plugins
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, p)| p.get("instances").and_then(|v| v.as_str()) == Some("warm"))
        .map(|(i, _)| {
            format!(
                "{}: plugin[{i}].instances = \"warm\" is the old name of \"transaction\"; the default, \"per-call\", suits a plugin that keeps its state in metadata",
                path.display()
            )
        })
        .collect()
}

impl Config {
    fn invalid(&self, key: &str, message: impl Into<String>) -> Error {
        Error::Invalid {
            path: self.path.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn check(&self) -> Result<(), Error> {
        if self.listeners.is_empty() {
            return Err(self.invalid("listener", "at least one [[listener]] is required"));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            match (l.tls_mode(), &l.tls_cert, &l.tls_key) {
                (TlsMode::None, _, _) => {}
                (_, Some(_), Some(_)) => {}
                (_, None, _) => {
                    return Err(self.invalid(&key("tls_cert"), "a certificate is required for TLS"))
                }
                (_, _, None) => {
                    return Err(self.invalid(&key("tls_key"), "a private key is required for TLS"))
                }
            }
            if !l.tls_certificates.is_empty() && l.tls_cert.is_none() {
                return Err(self.invalid(
                    &key("tls_certificates"),
                    "needs tls_cert and tls_key too: the certificate for clients that ask for no name, or for one no certificate has",
                ));
            }
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                return Err(self.invalid(
                    &key("trusted_proxies"),
                    "proxy_protocol needs the load balancers' CIDRs: anyone else could claim any address",
                ));
            }
            if !l.proxy_protocol && !l.trusted_proxies.is_empty() {
                return Err(self.invalid(
                    &key("proxy_protocol"),
                    "trusted_proxies is set but proxy_protocol is not true",
                ));
            }
            if l.proxy_timeout.0.is_zero() {
                return Err(self.invalid(&key("proxy_timeout"), "must be more than 0"));
            }
            if l.mode == ListenerMode::Submission && l.tls_mode() == TlsMode::None {
                return Err(self.invalid(
                    &key("tls"),
                    "a submission listener needs TLS, since AUTH is only offered over TLS",
                ));
            }
        }
        for (i, u) in self.users.iter().enumerate() {
            if crate::auth::parse_hash(&u.password_hash).is_err() {
                return Err(self.invalid(
                    &format!("user[{i}].password_hash"),
                    "expected an argon2 or bcrypt PHC string (make one with `postern passwd`)",
                ));
            }
        }
        if self.limits.max_message_size == 0 {
            return Err(self.invalid("limits.max_message_size", "must be more than 0"));
        }
        if self.limits.max_message_memory < self.limits.max_message_size {
            return Err(self.invalid(
                "limits.max_message_memory",
                "must be at least limits.max_message_size, or the largest messages could never be taken",
            ));
        }
        if self.limits.max_line_length < 1000 {
            return Err(self.invalid(
                "limits.max_line_length",
                "must be at least 1000 (RFC 5321 allows 998 octets)",
            ));
        }
        for d in &self.relay.domains {
            if d.is_empty() || d.contains('@') {
                return Err(self.invalid("relay.domains", format!("{d:?} is not a domain")));
            }
        }
        if self.delivery.retry.is_empty() {
            return Err(self.invalid("delivery.retry", "needs at least one interval"));
        }
        for ns in &self.delivery.nameservers {
            if ns.parse::<SocketAddr>().is_err() {
                return Err(
                    self.invalid("delivery.nameservers", format!("{ns:?} is not \"ip:port\""))
                );
            }
        }
        for (name, pool) in &self.delivery.pools {
            let key = |k: &str| format!("delivery.pools.{name}.{k}");
            if pool.hosts.is_empty() {
                return Err(self.invalid(&key("hosts"), "needs at least one host"));
            }
            for h in &pool.hosts {
                crate::delivery::SmartHost::parse(h).map_err(|e| self.invalid(&key("hosts"), e))?;
            }
            if let Some(w) = &pool.weights {
                if w.len() != pool.hosts.len() || w.contains(&0) {
                    return Err(self.invalid(&key("weights"), "one weight above 0 per host"));
                }
            }
        }
        let hops = self
            .delivery
            .smarthost
            .iter()
            .map(|s| ("delivery.smarthost".to_string(), s.as_str()))
            .chain(
                self.delivery
                    .routes
                    .iter()
                    .map(|(d, r)| (format!("delivery.routes.{d}"), r.next_hop())),
            );
        for (key, hop) in hops {
            let hop = crate::delivery::NextHop::parse(hop).map_err(|e| self.invalid(&key, e))?;
            if let crate::delivery::NextHop::Pool(name) = hop {
                if !self.delivery.pools.contains_key(&name) {
                    return Err(self.invalid(&key, format!("no [delivery.pools.{name}]")));
                }
            }
        }
        for (domain, route) in &self.delivery.routes {
            for fp in route.tls_fingerprint() {
                crate::delivery::tls::parse_fingerprint(fp).map_err(|e| {
                    self.invalid(&format!("delivery.routes.{domain}.tls_fingerprint"), e)
                })?;
            }
        }
        for fp in &self.delivery.tls_fingerprint {
            crate::delivery::tls::parse_fingerprint(fp)
                .map_err(|e| self.invalid("delivery.tls_fingerprint", e))?;
        }
        for (name, pool) in &self.delivery.pools {
            for fp in &pool.tls_fingerprint {
                crate::delivery::tls::parse_fingerprint(fp).map_err(|e| {
                    self.invalid(&format!("delivery.pools.{name}.tls_fingerprint"), e)
                })?;
            }
        }
        for (key, n) in [
            ("delivery.max_connections", self.delivery.max_connections),
            (
                "delivery.max_per_destination",
                self.delivery.max_per_destination,
            ),
            ("delivery.max_active", self.delivery.max_active),
        ] {
            if n == 0 {
                return Err(self.invalid(key, "must be more than 0"));
            }
        }
        for (key, value) in self.delivery.timeouts.entries() {
            // Under 100 ms a busy but healthy next hop fails every delivery;
            // over a day a stalled one holds its connection past any retry.
            if value.0 < Duration::from_millis(100) || value.0 > Duration::from_secs(86400) {
                return Err(self.invalid(
                    &format!("delivery.timeouts.{key}"),
                    format!("{value} is not between 100ms and 1d"),
                ));
            }
        }
        if let Some(pm) = &self.delivery.postmaster {
            if !pm.contains('@') {
                return Err(
                    self.invalid("delivery.postmaster", format!("{pm:?} is not an address"))
                );
            }
        }
        self.check_plugins()?;
        self.check_kv()?;
        self.check_authentication()?;
        self.check_admin()
    }

    fn check_authentication(&self) -> Result<(), Error> {
        let a = &self.authentication;
        let global = a.checks(&Default::default());
        a.validate("authentication", &global)
            .map_err(|(key, message)| self.invalid(&key, message))?;
        for (i, l) in self.listeners.iter().enumerate() {
            a.validate(
                &format!("listener[{i}].authentication"),
                &a.checks(&l.authentication),
            )
            .map_err(|(key, message)| self.invalid(&key, message))?;
        }
        crate::authn::sign::parse_canonicalization(&self.dkim.canonicalization)
            .map_err(|e| self.invalid("dkim.canonicalization", e))?;
        for (i, k) in self.dkim.keys.iter().enumerate() {
            if !crate::authn::spf::valid_domain(&k.domain) {
                return Err(self.invalid(
                    &format!("dkim.key[{i}].domain"),
                    format!("{:?} is not a domain", k.domain),
                ));
            }
            if k.selector.is_empty()
                || !k.selector.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
            {
                return Err(self.invalid(
                    &format!("dkim.key[{i}].selector"),
                    format!(
                        "{:?} is not a selector (letters, digits, - and _, dot-separated)",
                        k.selector
                    ),
                ));
            }
            crate::authn::sign::load_key(&self.resolve(&k.key))
                .map_err(|e| self.invalid(&format!("dkim.key[{i}].key"), e.to_string()))?;
        }
        if self
            .dkim
            .headers
            .iter()
            .all(|h| !h.eq_ignore_ascii_case("from"))
        {
            return Err(self.invalid("dkim.headers", "must include From (RFC 6376 5.4)"));
        }
        Ok(())
    }

    fn check_admin(&self) -> Result<(), Error> {
        let a = &self.admin;
        if a.idempotency_window.0.is_zero() {
            return Err(self.invalid("admin.idempotency_window", "must be more than 0"));
        }
        if a.token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(self.invalid("admin.token", "must be at least 16 characters"));
        }
        match (&a.tls_cert, &a.tls_key) {
            (Some(_), None) => {
                return Err(self.invalid("admin.tls_key", "needed with admin.tls_cert"))
            }
            (None, Some(_)) => {
                return Err(self.invalid("admin.tls_cert", "needed with admin.tls_key"))
            }
            _ => {}
        }
        if let Some(addr) = a.address {
            let protected = a.token.is_some() && a.tls_cert.is_some();
            if !addr.ip().is_loopback() && !protected {
                return Err(self.invalid(
                    "admin.address",
                    format!("{addr} is not a loopback address: set admin.token, admin.tls_cert and admin.tls_key to serve it"),
                ));
            }
        }
        Ok(())
    }

    fn check_kv(&self) -> Result<(), Error> {
        let kv = &self.kv;
        crate::plugins::host::kv::redis::client(&kv.redis_url)
            .map_err(|e| self.invalid("kv.redis_url", e))?;
        if kv.key_prefix.is_empty() {
            return Err(self.invalid("kv.key_prefix", "must not be empty"));
        }
        if kv.timeout.0.is_zero() {
            return Err(self.invalid("kv.timeout", "must be more than 0"));
        }
        if let Some(ca) = &kv.ca_file {
            if !kv.redis_url.starts_with("rediss://") {
                return Err(self.invalid("kv.ca_file", "needs a rediss:// redis_url"));
            }
            crate::plugins::host::kv::redis::ca_certificates(ca)
                .map_err(|e| self.invalid("kv.ca_file", e))?;
        }
        if kv.backend == KvBackend::Redis {
            // With a `:` in a name, plugin `a:b` key `c` and plugin `a` key
            // `b:c` would be the same Redis key.
            for (i, p) in self.plugin_chain.iter().enumerate() {
                if p.grants.contains(&Grant::Kv) && p.name.contains(':') {
                    return Err(self.invalid(
                        &format!("plugin[{i}].name"),
                        "must not contain `:` with [kv] backend = \"redis\" (keys are <key_prefix>:<plugin name>:<key>)",
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_plugins(&self) -> Result<(), Error> {
        if self.plugins.max_memory_mb == 0 {
            return Err(self.invalid("plugins.max_memory_mb", "must be more than 0"));
        }
        if self.plugins.max_metadata_size == 0 {
            return Err(self.invalid("plugins.max_metadata_size", "must be more than 0"));
        }
        if self.plugins.delivered_queue == 0 {
            return Err(self.invalid("plugins.delivered_queue", "must be more than 0"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.plugin_chain.iter().enumerate() {
            let key = |k: &str| format!("plugin[{i}].{k}");
            // `@` is kept for shadows (`<name>@shadow`).
            if p.name.is_empty() || p.name.contains(['/', '\\', '@']) || p.name.starts_with('.') {
                return Err(
                    self.invalid(&key("name"), "expected a non-empty name without `/` or `@`")
                );
            }
            if p.shadow_config.is_some() && p.shadow.is_none() {
                return Err(
                    self.invalid(&key("shadow_config"), "needs `shadow`, the shadow's .wasm")
                );
            }
            if !names.insert(p.name.as_str()) {
                return Err(self.invalid(&key("name"), format!("{:?} is used twice", p.name)));
            }
            if p.timeout_ms == 0 {
                return Err(self.invalid(&key("timeout_ms"), "must be more than 0"));
            }
            for hook in HookName::ALL {
                if p.timeouts.get(hook) == Some(0) {
                    return Err(
                        self.invalid(&key(&format!("timeouts.{hook}")), "must be more than 0")
                    );
                }
            }
            if p.memory_mb == 0 || p.memory_mb > self.plugins.max_memory_mb {
                return Err(self.invalid(
                    &key("memory_mb"),
                    format!(
                        "must be between 1 and plugins.max_memory_mb ({})",
                        self.plugins.max_memory_mb
                    ),
                ));
            }
            if !(1..=100).contains(&p.retire_at_memory_percent) {
                return Err(self.invalid(
                    &key("retire_at_memory_percent"),
                    "must be between 1 and 100",
                ));
            }
        }
        Ok(())
    }

    /// The keys whose value in `new` a running relay started with `self`
    /// does not take up until it restarts: everything but the plugin chain
    /// (`[[plugin]]` tables), which a reload swaps in. A listener's address
    /// is named as such, other changes by their table.
    pub fn restart_needed(&self, new: &Config) -> Vec<String> {
        fn differ<T: fmt::Debug>(a: &T, b: &T) -> bool {
            format!("{a:?}") != format!("{b:?}")
        }
        let mut keys = Vec::new();
        if self.hostname != new.hostname {
            keys.push("hostname".to_string());
        }
        if self.listeners.len() != new.listeners.len() {
            keys.push("listener".to_string());
        } else {
            // Certificate files are taken up by the reload itself.
            let files = |l: &ListenerConfig| ListenerConfig {
                tls: Some(l.tls_mode()),
                tls_cert: None,
                tls_key: None,
                tls_certificates: Vec::new(),
                ..l.clone()
            };
            for (i, (a, b)) in self.listeners.iter().zip(&new.listeners).enumerate() {
                if a.address != b.address {
                    keys.push(format!("listener[{i}].address"));
                } else if differ(&files(a), &files(b)) {
                    keys.push(format!("listener[{i}]"));
                }
            }
        }
        let tables: [(&str, bool); 10] = [
            ("spool", differ(&self.spool, &new.spool)),
            ("relay", differ(&self.relay, &new.relay)),
            ("user", differ(&self.users, &new.users)),
            ("limits", differ(&self.limits, &new.limits)),
            ("smtp", differ(&self.smtp, &new.smtp)),
            ("delivery", differ(&self.delivery, &new.delivery)),
            ("kv", differ(&self.kv, &new.kv)),
            ("log", differ(&self.log, &new.log)),
            ("admin", differ(&self.admin, &new.admin)),
            ("plugins", differ(&self.plugins, &new.plugins)),
        ];
        keys.extend(
            tables
                .iter()
                .filter(|(_, d)| *d)
                .map(|(k, _)| k.to_string()),
        );
        keys
    }

    /// The plugins folder, absolute.
    pub fn plugins_dir(&self) -> PathBuf {
        self.resolve(&self.plugins.dir)
    }

    /// The compiled-plugin cache folder, absolute.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        match &self.plugins.cache_dir {
            Some(d) => self.resolve(d),
            None => self.resolve(&self.spool.path).join("plugin-cache"),
        }
    }

    /// A path from the config, made absolute against the config's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[[listener]]\naddress = \"127.0.0.1:2525\"\n";

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::parse(MINIMAL, Path::new("/etc/postern/postern.toml")).unwrap();
        assert_eq!(c.limits.max_message_size, 25 * 1024 * 1024);
        assert_eq!(c.listeners[0].tls_mode(), TlsMode::None);
        assert_eq!(
            c.resolve(&c.spool.path),
            PathBuf::from("/etc/postern/spool")
        );
        assert_eq!(c.delivery.mx_port, 25);
        assert!(c.spool.write_back);
        let strict = format!("{MINIMAL}[spool]\nwrite_back = false\n");
        let c = Config::parse(&strict, Path::new("/etc/postern/postern.toml")).unwrap();
        assert!(!c.spool.write_back);
        assert_eq!(c.spool.path, PathBuf::from("spool"));
    }

    #[test]
    fn errors_name_the_key() {
        for (text, needle) in [
            ("", "listener"),
            ("bogus = 1\n[[listener]]\naddress = \"127.0.0.1:25\"\n", "bogus"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[limits]\nmax_mesage_size = 5\n", "max_mesage_size"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[limits]\nmax_message_size = \"big\"\n", "max_message_size"),
            ("[[listener]]\naddress = \"nowhere\"\n", "address"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\ntls = \"starttls\"\n", "tls_cert"),
            (
                "[[listener]]\naddress = \"127.0.0.1:25\"\n[authentication]\narc_seal = true\n",
                "authentication.arc_seal",
            ),
            (
                "[[listener]]\naddress = \"127.0.0.1:25\"\ntls_certificates = [{ cert = \"a.pem\", key = \"a.key\" }]\n",
                "listener[0].tls_certificates",
            ),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[relay]\nnetworks = [\"10.0.0.0/33\"]\n", "networks"),
            (
                "[[listener]]\naddress = \"127.0.0.1:25\"\n[[user]]\nname = \"a\"\npassword_hash = \"secret\"\n",
                "password_hash",
            ),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery]\nretry = [\"5 minutes\"]\n", "retry"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery]\nsmarthost = \"ftp://x\"\n", "delivery.smarthost"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery.routes]\n\"a.test\" = \"smtp://\"\n", "delivery.routes.a.test"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery]\nmax_per_destination = 0\n", "max_per_destination"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery.timeouts]\ndata_end = \"0s\"\n", "delivery.timeouts.data_end"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery.timeouts]\ncommand = \"2d\"\n", "delivery.timeouts.command"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery.timeouts]\nrcpt = \"1s\"\n", "rcpt"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\nproxy_protocol = true\n", "listener[0].trusted_proxies"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n", "listener[0].proxy_protocol"),
            ("[[listener]]\naddress = \"127.0.0.1:25\"\nproxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\nproxy_timeout = \"0s\"\n", "listener[0].proxy_timeout"),
        ] {
            let err = Config::parse(text, Path::new("t.toml")).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.starts_with("config t.toml"), "{err}");
        }
    }

    #[test]
    fn plugin_tables_are_typed() {
        let text = format!(
            "{MINIMAL}[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\nhooks = [\"rcpt\", \"mail-from\"]\n\
             on_error = \"continue\"\ntimeouts = {{ data = 2000 }}\nmemory_mb = 32\ninstances = \"fresh\"\n\
             grants = [\"kv\", \"archive\"]\n[plugin.config]\nlist = [1, 2]\n"
        );
        let c = Config::parse(&text, Path::new("/etc/postern/postern.toml")).unwrap();
        let p = &c.plugin_chain[0];
        assert_eq!(
            p.hooks.as_deref(),
            Some(&[HookName::Rcpt, HookName::MailFrom][..])
        );
        assert_eq!(p.on_error, OnError::Continue);
        assert_eq!(p.timeout(HookName::Data), Duration::from_millis(2000));
        assert_eq!(p.timeout(HookName::Rcpt), Duration::from_millis(50));
        assert_eq!(p.instances, Instances::Fresh);
        assert_eq!(p.grants, vec![Grant::Kv, Grant::Archive]);
        assert_eq!(
            (p.retire_after_uses, p.retire_at_memory_percent),
            (10_000, 75)
        );
        let tuned = Config::parse(
            &format!("{MINIMAL}[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\nretire_after_uses = 0\nretire_at_memory_percent = 60\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let t = &tuned.plugin_chain[0];
        assert_eq!((t.retire_after_uses, t.retire_at_memory_percent), (0, 60));
        let per_call = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\n[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\ninstances = \"per-call\"\n",
            Path::new("/etc/postern/postern.toml"),
        )
        .unwrap();
        assert_eq!(per_call.plugin_chain[0].instances, Instances::PerCall);
        assert_eq!(p.config_json(), r#"{"list":[1,2]}"#);
        assert_eq!(
            c.plugin_cache_dir(),
            PathBuf::from("/etc/postern/spool/plugin-cache")
        );
    }

    /// Instances are lent per call unless the config says otherwise; `warm`
    /// is still read, as `transaction`, with a warning saying so.
    #[test]
    fn instances_default_per_call_and_warm_is_an_old_name() {
        let entry = |extra: &str| {
            format!("{MINIMAL}[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\n{extra}\n")
        };
        let c = Config::parse(&entry(""), Path::new("t.toml")).unwrap();
        assert_eq!(c.plugin_chain[0].instances, Instances::PerCall);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = Config::parse(&entry("instances = \"transaction\""), Path::new("t.toml")).unwrap();
        assert_eq!(c.plugin_chain[0].instances, Instances::Transaction);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = Config::parse(&entry("instances = \"warm\""), Path::new("t.toml")).unwrap();
        assert_eq!(c.plugin_chain[0].instances, Instances::Transaction);
        assert_eq!(c.warnings.len(), 1);
        assert!(
            c.warnings[0].contains("plugin[0].instances = \"warm\"")
                && c.warnings[0].contains("\"transaction\""),
            "{:?}",
            c.warnings
        );
    }

    /// A shadow runs as `<name>@shadow` with its own file and config (the
    /// live one's when it has none), per call, under the live one's
    /// metadata name.
    #[test]
    fn a_shadow_runs_as_its_own_entry() {
        let text = format!(
            "{MINIMAL}[[plugin]]\nname = \"router\"\npath = \"router.wasm\"\nshadow = \"router-v2.wasm\"\n\
             instances = \"transaction\"\ngrants = [\"kv\"]\n[plugin.config]\nx = 1\n"
        );
        let c = Config::parse(&text, Path::new("t.toml")).unwrap();
        let live = &c.plugin_chain[0];
        let shadow = live.shadow_entry().unwrap();
        assert_eq!(shadow.name, "router@shadow");
        assert_eq!(shadow.path, PathBuf::from("router-v2.wasm"));
        assert_eq!(shadow.config_json(), live.config_json());
        assert_eq!(shadow.instances, Instances::PerCall);
        assert_eq!(shadow.grants, live.grants);
        assert_eq!(shadow.metadata_name(), "router");
        assert!(shadow.shadow_entry().is_none());
        let own = text.replace(
            "[plugin.config]",
            "[plugin.shadow_config]\ny = 2\n[plugin.config]",
        );
        let c = Config::parse(&own, Path::new("t.toml")).unwrap();
        assert_eq!(
            c.plugin_chain[0].shadow_entry().unwrap().config_json(),
            r#"{"y":2}"#
        );
    }

    /// The config the README runs the relay with parses, chain and all.
    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/postern.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse(&text, &path).unwrap();
        let names: Vec<&str> = c.plugin_chain.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["blocklist", "router"]);
        assert_eq!(c.plugin_chain[0].instances, Instances::PerCall);
    }

    /// The config of the plugins in three languages parses, chain and all.
    #[test]
    fn the_example_plugins_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plugins/postern.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse(&text, &path).unwrap();
        let names: Vec<&str> = c.plugin_chain.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["blocklist", "tagger-py", "tagger-js", "router"]);
        assert_eq!(c.plugin_chain[2].retire_at_memory_percent, 75);
    }

    #[test]
    fn plugin_errors_name_the_key() {
        let plugin =
            |body: &str| format!("{MINIMAL}[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\n{body}\n");
        for (body, needle) in [
            ("colour = 1", "colour"),
            ("on_error = \"explode\"", "on_error"),
            ("hooks = [\"greet\"]", "greet"),
            ("shadow_config = { x = 1 }", "plugin[0].shadow_config"),
            ("grants = [\"network\"]", "network"),
            ("timeouts = { dta = 5 }", "dta"),
            ("timeout_ms = 0", "plugin[0].timeout_ms"),
            ("memory_mb = 100000", "plugin[0].memory_mb"),
            (
                "retire_at_memory_percent = 0",
                "plugin[0].retire_at_memory_percent",
            ),
            (
                "retire_at_memory_percent = 101",
                "plugin[0].retire_at_memory_percent",
            ),
            ("retire_after_uses = -1", "retire_after_uses"),
            ("instances = \"hot\"", "instances"),
            (
                "[[plugin]]\nname = \"a\"\npath = \"b.wasm\"",
                "plugin[1].name",
            ),
            (
                "[[plugin]]\nname = \"b@shadow\"\npath = \"b.wasm\"",
                "plugin[1].name",
            ),
        ] {
            let err = Config::parse(&plugin(body), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{body:?}: {err}");
        }
    }

    #[test]
    fn kv_has_defaults_and_takes_redis() {
        let c = Config::parse(MINIMAL, Path::new("t.toml")).unwrap();
        assert_eq!(c.kv.backend, KvBackend::Memory);
        assert_eq!(c.kv.redis_url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.kv.key_prefix, "postern");
        assert_eq!(c.kv.timeout.0, Duration::from_millis(200));

        let text = format!(
            "{MINIMAL}[kv]\nbackend = \"redis\"\nredis_url = \"rediss://:secret@127.0.0.1:6380/2\"\n\
             key_prefix = \"mx-eu\"\ntimeout = \"1s\"\n"
        );
        let c = Config::parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(c.kv.backend, KvBackend::Redis);
        assert_eq!(c.kv.redis_url, "rediss://:secret@127.0.0.1:6380/2");
        assert_eq!(c.kv.key_prefix, "mx-eu");
        assert_eq!(c.kv.timeout.0, Duration::from_secs(1));
    }

    /// `ca_file` is taken relative to the config file, must hold PEM
    /// certificates, and goes with `rediss://` only.
    #[test]
    fn kv_ca_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["redis.test".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
        let config = dir.path().join("postern.toml");
        let parse = |kv: &str| {
            Config::parse(
                &format!("{MINIMAL}[kv]\nbackend = \"redis\"\n{kv}\n"),
                &config,
            )
        };
        let c = parse("redis_url = \"rediss://127.0.0.1:6380/0\"\nca_file = \"ca.pem\"").unwrap();
        assert_eq!(c.kv.ca_file, Some(dir.path().join("ca.pem")));
        for (kv, needle) in [
            (
                "redis_url = \"redis://127.0.0.1:6379/0\"\nca_file = \"ca.pem\"",
                "needs a rediss://",
            ),
            (
                "redis_url = \"rediss://127.0.0.1:6380/0\"\nca_file = \"missing.pem\"",
                "missing.pem",
            ),
            (
                "redis_url = \"rediss://127.0.0.1:6380/0\"\nca_file = \"junk.pem\"",
                "no PEM certificate",
            ),
        ] {
            let err = parse(kv).unwrap_err().to_string();
            assert!(
                err.contains("kv.ca_file") && err.contains(needle),
                "{kv}: {err}"
            );
        }
    }

    #[test]
    fn kv_errors_name_the_key() {
        for (body, needle) in [
            ("[kv]\nbackend = \"mongodb\"", "backend"),
            ("[kv]\nredis_host = \"127.0.0.1\"", "redis_host"),
            ("[kv]\nredis_url = \"http://127.0.0.1:6379\"", "kv.redis_url"),
            ("[kv]\nredis_url = \"redis+unix:///run/redis.sock\"", "kv.redis_url"),
            ("[kv]\nredis_url = \"redis://127.0.0.1:port\"", "kv.redis_url"),
            ("[kv]\nkey_prefix = \"\"", "kv.key_prefix"),
            ("[kv]\ntimeout = \"0ms\"", "kv.timeout"),
            ("[kv]\ntimeout = \"soon\"", "timeout"),
            (
                "[kv]\nbackend = \"redis\"\n[[plugin]]\nname = \"a:b\"\npath = \"a.wasm\"\ngrants = [\"kv\"]",
                "plugin[0].name",
            ),
        ] {
            let err = Config::parse(&format!("{MINIMAL}{body}\n"), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{body:?}: {err}");
            assert!(err.starts_with("config t.toml"), "{err}");
        }
        // The URL may hold a password; the message does not repeat it.
        for url in [
            "http://:hunter2@127.0.0.1",
            "redis://:hunter2@127.0.0.1:port",
        ] {
            let text = format!("{MINIMAL}[kv]\nredis_url = {url:?}\n");
            let err = Config::parse(&text, Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("kv.redis_url") && !err.contains("hunter2"),
                "{err}"
            );
        }
        // Without a store shared by name, a `:` in a plugin name is harmless.
        let text =
            format!("{MINIMAL}[[plugin]]\nname = \"a:b\"\npath = \"a.wasm\"\ngrants = [\"kv\"]\n");
        assert!(Config::parse(&text, Path::new("t.toml")).is_ok());
    }

    #[test]
    fn admin_errors_name_the_key() {
        for (body, needle) in [
            ("[admin]\nadress = \"127.0.0.1:8025\"", "adress"),
            ("[admin]\naddress = \"localhost\"", "address"),
            ("[admin]\ntoken = \"short\"", "admin.token"),
            ("[admin]\ntls_cert = \"c.pem\"", "admin.tls_key"),
            ("[admin]\naddress = \"0.0.0.0:8025\"", "admin.address"),
            (
                "[admin]\naddress = \"[::]:8025\"\ntoken = \"0123456789abcdef\"",
                "admin.address",
            ),
        ] {
            let err = Config::parse(&format!("{MINIMAL}{body}\n"), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{body:?}: {err}");
        }
        let c = Config::parse(MINIMAL, Path::new("t.toml")).unwrap();
        assert_eq!(c.admin.address, None, "no HTTP listener unless asked for");
        let text = format!("{MINIMAL}[admin]\naddress = \"[::1]:8025\"\n");
        assert!(Config::parse(&text, Path::new("t.toml")).is_ok());
    }

    #[test]
    fn a_reload_names_what_needs_a_restart() {
        let parse = |t: &str| Config::parse(t, Path::new("t.toml")).unwrap();
        let old = parse(&format!(
            "{MINIMAL}[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\n"
        ));
        let same_but_plugins = parse(&format!(
            "{MINIMAL}[[plugin]]\nname = \"b\"\npath = \"b.wasm\"\n"
        ));
        assert!(old.restart_needed(&same_but_plugins).is_empty());
        let moved = parse(
            "[[listener]]\naddress = \"127.0.0.1:2626\"\n[limits]\nmax_errors = 3\n[relay]\ndomains = [\"x.test\"]\n",
        );
        assert_eq!(
            old.restart_needed(&moved),
            ["listener[0].address", "relay", "limits"]
        );
        // Certificate files are reloaded; turning TLS on is not.
        let tls = |files: &str| {
            parse(&format!(
                "[[listener]]\naddress = \"127.0.0.1:2525\"\ntls = \"starttls\"\n{files}"
            ))
        };
        let one = tls("tls_cert = \"a.pem\"\ntls_key = \"a.key\"\n");
        let two = tls("tls_cert = \"b.pem\"\ntls_key = \"b.key\"\n\
                       tls_certificates = [{ cert = \"c.pem\", key = \"c.key\" }]\n");
        assert!(one.restart_needed(&two).is_empty());
        let plain = parse("[[listener]]\naddress = \"127.0.0.1:2525\"\n");
        assert_eq!(plain.restart_needed(&one), ["listener[0]"]);
    }

    #[test]
    fn durations() {
        for (s, secs) in [
            ("30s", 30),
            ("5m", 300),
            ("4h", 14400),
            ("5d", 432000),
            ("90", 90),
        ] {
            assert_eq!(
                s.parse::<HumanDuration>().unwrap().0,
                Duration::from_secs(secs)
            );
        }
        assert!("5 parsecs".parse::<HumanDuration>().is_err());
        assert!("".parse::<HumanDuration>().is_err());
    }
}
