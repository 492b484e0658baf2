//! Write policy plugins for the Postern SMTP relay in Rust.
//!
//! A plugin is one type that implements [`Plugin`]. Every hook has a default
//! that answers [`Verdict::Continue`], so a plugin writes only the hooks it
//! needs; its `[plugin.config]` table arrives once, typed, in [`Plugin::init`].
//! `#[postern_sdk::plugin]` on the impl block records which hooks it writes and
//! [`export!`] hands the plugin to the relay, which then calls only those.
//!
//! ```
//! use postern_sdk::prelude::*;
//!
//! #[derive(serde::Deserialize)]
//! struct Blocklist { domains: Vec<String> }
//!
//! #[postern_sdk::plugin]
//! impl Plugin for Blocklist {
//!     fn init(config: Config) -> Result<Self, ConfigError> { config.parse() }
//!
//!     fn rcpt(&self, _session: &Session, rcpt: &Recipient) -> Verdict {
//!         if self.domains.iter().any(|d| rcpt.domain().eq_ignore_ascii_case(d)) {
//!             return Verdict::reject(550, "5.7.1", "recipient domain is blocked");
//!         }
//!         Verdict::Continue
//!     }
//! }
//!
//! postern_sdk::export!(Blocklist);
//! # fn main() {
//! #     use postern_sdk::__private::Hooks;
//! #     assert_eq!(<Blocklist as Hooks>::HOOKS, &[Hook::Rcpt]);
//! # }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`, copy the
//! `.wasm` into the relay's plugins folder and name it in a `[[plugin]]` table.
//!
//! The relay lends an instance of the plugin for one hook call at a time, so
//! the plugin's own memory is not a place for state between hooks: two hooks
//! of one transaction may run on different instances, and one instance serves
//! other sessions in between. What a plugin learns at one hook and needs at a
//! later one goes into [`metadata`], which the relay keeps per session and per
//! message (with the message in the spool, so a value set at `data` is there
//! at `route`, also after a restart).
//!
//! Host interfaces ([`log`], [`kv`], [`dns`]) work only when the relay's config
//! grants them to the plugin; a plugin that uses one it was not granted is
//! refused at load time, naming the interface. [`metadata`] and the hook's
//! context are always there. Every host call returns a `Result` or a plain
//! value; none of them panics.

#![deny(missing_docs)]

// The generated bindings name their own crate by path, inside and outside it.
extern crate self as postern_sdk;

use std::cell::OnceCell;
use std::fmt;
use std::ops::Deref;

#[doc(hidden)]
// Generated: a record argument (the delivery report) is passed flattened.
#[allow(missing_docs, clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "postern:relay/plugin@0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::postern_sdk::bindings",
        runtime_path: "::postern_sdk::__private::wit_bindgen::rt",
        additional_derives: [PartialEq],
    });
}

use bindings::postern::relay::context;
pub use bindings::postern::relay::context::{
    ArcCheck, AuthResult, Authentication, DkimCheck, DmarcCheck, DmarcPolicy, SpfCheck, SpfResult,
};
pub use bindings::postern::relay::message::{EditError, Message, Part};
pub use bindings::postern::relay::types::{
    Address, BodyType, DeliveryOutcome, DeliveryReport, Envelope as EnvelopeInfo, Header, Hook,
    IpAddress, MailParams, Reply, Route, Routing, Session as SessionInfo, TlsInfo, Verdict,
};
pub use postern_sdk_macros::plugin;

pub mod record;

/// Everything a plugin usually needs: `use postern_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::metadata::{self, Scope};
    pub use crate::{
        authentication, Address, AuthResult, Authentication, Config, ConfigError, DeliveryOutcome,
        DeliveryReport, DmarcPolicy, Envelope, Header, Headers, Hook, Message, Plugin, Recipient,
        Reply, Route, Routing, Session, SpfResult, Verdict,
    };
}

/// A policy plugin. Implement the hooks you need; the others answer
/// [`Verdict::Continue`] (or [`Route::Default`]) and are never called, since
/// `#[postern_sdk::plugin]` tells the relay which ones you wrote.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from its `[plugin.config]` table. An error refuses the
    /// load; the relay logs its text and keeps the chain it had.
    fn init(config: Config) -> Result<Self, ConfigError>;

    /// After the client connected, before the banner.
    fn connect(&self, _session: &Session) -> Verdict {
        Verdict::Continue
    }

    /// After EHLO or HELO, with the name in `session.helo` (and again after
    /// the EHLO that follows STARTTLS). A refusal answers that EHLO; the
    /// client may try again.
    fn helo(&self, _session: &Session) -> Verdict {
        Verdict::Continue
    }

    /// At MAIL FROM; the envelope has the sender and no recipients yet.
    fn mail_from(&self, _session: &Session, _envelope: &Envelope) -> Verdict {
        Verdict::Continue
    }

    /// At each RCPT TO, after the relay's access rules accepted it. The
    /// envelope so far is [`envelope()`].
    fn rcpt(&self, _session: &Session, _rcpt: &Recipient) -> Verdict {
        Verdict::Continue
    }

    /// After the message, before the relay answers: read and edit `message`.
    fn data(&self, _session: &Session, _envelope: &Envelope, _message: &Message) -> Verdict {
        Verdict::Continue
    }

    /// At delivery, per recipient: where it goes, and the envelope sender
    /// for it when the plugin changes it (a [`Route`] converts with `.into()`,
    /// a sender is added with [`Route::with_sender`]). `headers` reads the
    /// message's header fields; [`metadata`] has what the transaction's
    /// hooks left (read only here).
    fn route(&self, _envelope: &Envelope, _rcpt: &Recipient, _headers: &Headers) -> Routing {
        Route::Default.into()
    }

    /// After each delivery attempt of each recipient, for audit trails,
    /// feedback loops and counters: nothing it does changes the delivery. It
    /// runs off the delivery path, at most once per attempt.
    fn delivered(&self, _envelope: &Envelope, _report: &DeliveryReport) {}
}

/// The envelope of the transaction whose hook is running (during `rcpt`: the
/// sender and the recipients accepted before this one), read from the relay
/// when first used. `connect` has none: reading it there traps.
pub fn envelope() -> Envelope {
    Envelope::of_hook()
}

/// Something the running hook is about (its session, envelope or
/// recipient): the relay sends it the first time the hook reads it, and it
/// derefs to the value, so a hook that does not look pays nothing for it.
/// Valid for the hook it was given to.
///
/// ```
/// # use postern_sdk::{Address, Recipient};
/// let rcpt = Recipient::new(Address::new("user", "example.org"));
/// assert_eq!(rcpt.domain(), "example.org");
/// ```
#[derive(Debug, Clone)]
pub struct FromHook<T> {
    value: OnceCell<T>,
    fetch: fn() -> T,
}

impl<T> FromHook<T> {
    /// A value known already (for tests and tools; hooks get theirs from
    /// the relay).
    pub fn new(value: T) -> FromHook<T> {
        FromHook {
            value: OnceCell::from(value),
            fetch: || unreachable!("a value made with `new` is set"),
        }
    }

    fn fetched_by(fetch: fn() -> T) -> FromHook<T> {
        FromHook {
            value: OnceCell::new(),
            fetch,
        }
    }
}

impl<T> Deref for FromHook<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.value.get_or_init(self.fetch)
    }
}

/// The client session of the running hook; derefs to [`SessionInfo`].
pub type Session = FromHook<SessionInfo>;

/// The envelope of the running hook's transaction; derefs to [`EnvelopeInfo`].
pub type Envelope = FromHook<EnvelopeInfo>;

/// The recipient the running `rcpt` or `route` hook is about; derefs to
/// [`Address`].
pub type Recipient = FromHook<Address>;

impl Session {
    /// The running hook's session, not read yet.
    #[doc(hidden)]
    pub fn of_hook() -> Session {
        FromHook::fetched_by(context::get_session)
    }
}

/// The running hook's session, read from the relay when first used; at
/// `route` and `delivered` the session that handed the message over. The
/// relay's own bounces have none: use [`find_session`] where that matters.
pub fn session() -> Session {
    Session::of_hook()
}

/// The running hook's session, or none where it has none (at `route` and
/// `delivered`, a bounce the relay made itself).
pub fn find_session() -> Option<SessionInfo> {
    context::find_session()
}

/// The running hook's queue id: during `data` (the id the message will
/// have), `route` and `delivered`; none before.
pub fn queue_id() -> Option<String> {
    context::get_queue_id()
}

/// The transaction's authentication results, as the relay found them:
/// during `mail_from` and `rcpt` SPF only, during `data` SPF, DKIM, DMARC
/// and ARC. Other hooks have none: calling it there traps. Checks the
/// relay's `[authentication]` switched off, or skipped for a client that
/// may relay, are `None` (DKIM: an empty list).
///
/// ```no_run
/// use postern_sdk::prelude::*;
///
/// struct StrictDmarc;
///
/// impl Plugin for StrictDmarc {
///     fn init(_config: Config) -> Result<Self, ConfigError> {
///         Ok(StrictDmarc)
///     }
///
///     fn data(&self, _session: &Session, _envelope: &Envelope, _message: &Message) -> Verdict {
///         match authentication().dmarc {
///             Some(d) if d.result == AuthResult::Fail && d.policy != DmarcPolicy::None => {
///                 Verdict::reject(550, "5.7.1", &format!("DMARC failed for {}", d.domain))
///             }
///             _ => Verdict::Continue,
///         }
///     }
/// }
/// ```
pub fn authentication() -> Authentication {
    context::get_authentication()
}

impl SpfResult {
    /// The result's keyword in an `Authentication-Results:` header (RFC 8601),
    /// e.g. "softfail".
    ///
    /// ```
    /// assert_eq!(postern_sdk::SpfResult::TempError.as_str(), "temperror");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::Neutral => "neutral",
            SpfResult::None => "none",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }
}

impl AuthResult {
    /// The result's keyword in an `Authentication-Results:` header (RFC 8601),
    /// e.g. "pass".
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Pass => "pass",
            AuthResult::Fail => "fail",
            AuthResult::Neutral => "neutral",
            AuthResult::None => "none",
            AuthResult::TempError => "temperror",
            AuthResult::PermError => "permerror",
        }
    }
}

impl DmarcPolicy {
    /// The policy's keyword in a DMARC record (`p=`), e.g. "quarantine".
    pub fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }
}

impl Authentication {
    /// The SPF result of the MAIL FROM domain, when it was checked.
    ///
    /// ```
    /// # use postern_sdk::{Authentication, SpfCheck, SpfResult};
    /// let mut a = Authentication { spf_helo: None, spf_mail_from: None, dkim: vec![], dmarc: None, arc: None };
    /// assert_eq!(a.spf(), None);
    /// a.spf_mail_from = Some(SpfCheck {
    ///     result: SpfResult::SoftFail,
    ///     identity: "a@example.org".into(),
    ///     domain: "example.org".into(),
    ///     reason: "matched ~all".into(),
    /// });
    /// assert_eq!(a.spf(), Some(SpfResult::SoftFail));
    /// ```
    pub fn spf(&self) -> Option<SpfResult> {
        self.spf_mail_from.as_ref().map(|s| s.result)
    }

    /// True when DMARC was evaluated and failed, whatever the domain's
    /// policy.
    ///
    /// ```
    /// # use postern_sdk::{Authentication, AuthResult, DmarcCheck, DmarcPolicy};
    /// let mut a = Authentication { spf_helo: None, spf_mail_from: None, dkim: vec![], dmarc: None, arc: None };
    /// assert!(!a.dmarc_failed());
    /// a.dmarc = Some(DmarcCheck {
    ///     result: AuthResult::Fail,
    ///     domain: "example.org".into(),
    ///     policy: DmarcPolicy::Reject,
    ///     disposition: DmarcPolicy::None,
    ///     spf_aligned: false,
    ///     dkim_aligned: false,
    /// });
    /// assert!(a.dmarc_failed());
    /// ```
    pub fn dmarc_failed(&self) -> bool {
        self.dmarc
            .as_ref()
            .is_some_and(|d| d.result == AuthResult::Fail)
    }

    /// True when a DKIM signature of `domain` (compared case-insensitively)
    /// verified.
    ///
    /// ```
    /// # use postern_sdk::{Authentication, AuthResult, DkimCheck};
    /// let a = Authentication {
    ///     spf_helo: None,
    ///     spf_mail_from: None,
    ///     dkim: vec![DkimCheck {
    ///         result: AuthResult::Pass,
    ///         domain: "Example.org".into(),
    ///         selector: "s1".into(),
    ///         reason: None,
    ///     }],
    ///     dmarc: None,
    ///     arc: None,
    /// };
    /// assert!(a.dkim_passed_for("example.org"));
    /// assert!(!a.dkim_passed_for("example.net"));
    /// ```
    pub fn dkim_passed_for(&self, domain: &str) -> bool {
        self.dkim
            .iter()
            .any(|d| d.result == AuthResult::Pass && d.domain.eq_ignore_ascii_case(domain))
    }
}

impl Envelope {
    /// The running hook's envelope, not read yet.
    #[doc(hidden)]
    pub fn of_hook() -> Envelope {
        FromHook::fetched_by(context::get_envelope)
    }
}

impl Recipient {
    /// The running hook's recipient, not read yet.
    #[doc(hidden)]
    pub fn of_hook() -> Recipient {
        FromHook::fetched_by(context::get_recipient)
    }
}

impl From<IpAddress> for std::net::IpAddr {
    fn from(ip: IpAddress) -> Self {
        match ip {
            IpAddress::Ipv4((a, b, c, d)) => std::net::Ipv4Addr::new(a, b, c, d).into(),
            IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
                std::net::Ipv6Addr::new(a, b, c, d, e, f, g, h).into()
            }
        }
    }
}

impl SessionInfo {
    /// The client's address and port.
    ///
    /// ```
    /// # use postern_sdk::{IpAddress, Session, SessionInfo};
    /// let session = Session::new(SessionInfo {
    ///     peer_ip: IpAddress::Ipv4((192, 0, 2, 1)),
    ///     peer_port: 40000,
    ///     local_ip: IpAddress::Ipv4((192, 0, 2, 10)),
    ///     local_port: 25,
    ///     helo: None,
    ///     tls: None,
    ///     auth_user: None,
    ///     may_relay: false,
    /// });
    /// assert_eq!(session.peer().to_string(), "192.0.2.1:40000");
    /// assert!(session.peer().ip().is_ipv4());
    /// assert_eq!(session.local().port(), 25);
    /// ```
    pub fn peer(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.peer_ip.into(), self.peer_port)
    }

    /// The address and port of the listener the client connected to.
    pub fn local(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.local_ip.into(), self.local_port)
    }
}

/// A message's header section, as the route hook gets it: fields are read
/// on request, so a hook that does not look at them pays nothing.
///
/// ```
/// # use postern_sdk::Headers;
/// let h = Headers::new("Received: from a\r\n\tby b\r\nSubject: hi\r\nX-Tag: 1\r\nx-tag: 2\r\n".into());
/// assert_eq!(h.get("subject").as_deref(), Some("hi"));
/// assert_eq!(h.get("Received").as_deref(), Some("from a\tby b"));
/// assert_eq!(h.get_all("X-Tag"), vec!["1", "2"]);
/// assert_eq!(h.iter().count(), 4);
/// assert!(h.get("Date").is_none());
/// ```
#[derive(Debug, Clone)]
pub struct Headers {
    raw: FromHook<String>,
}

impl Headers {
    /// Wraps a header section (CRLF or LF line ends).
    pub fn new(raw: String) -> Headers {
        Headers {
            raw: FromHook::new(raw),
        }
    }

    /// The route hook's headers, not read yet.
    #[doc(hidden)]
    pub fn of_hook() -> Headers {
        Headers {
            raw: FromHook::fetched_by(context::get_headers),
        }
    }

    /// The section as the relay sent it; asked of the relay at the first read.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Every field in order, with its value unfolded and trimmed.
    pub fn iter(&self) -> impl Iterator<Item = Header> + '_ {
        let mut lines = self
            .raw()
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .peekable();
        std::iter::from_fn(move || loop {
            let line = lines.next()?;
            let Some((name, first)) = line.split_once(':') else {
                continue;
            };
            let mut value = first.to_string();
            while let Some(next) = lines.next_if(|l| l.starts_with([' ', '\t'])) {
                value.push_str(next);
            }
            return Some(Header {
                name: name.trim().to_string(),
                value: value.trim().to_string(),
            });
        })
    }

    /// The first field called `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Every field called `name` (case-insensitive), in order.
    pub fn get_all(&self, name: &str) -> Vec<String> {
        self.iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    }
}

/// The plugin's `[plugin.config]` table, as the relay hands it to `init`.
#[derive(Debug, Clone)]
pub struct Config {
    json: String,
}

impl Config {
    /// Config from its JSON text (the relay converts the TOML table to JSON).
    pub fn from_json(json: impl Into<String>) -> Config {
        Config { json: json.into() }
    }

    /// Deserializes the table into your type; unknown or missing keys are
    /// errors only if your type says so (e.g. `#[serde(deny_unknown_fields)]`).
    ///
    /// ```
    /// # use postern_sdk::Config;
    /// #[derive(serde::Deserialize)]
    /// struct Limits { per_hour: u32 }
    /// let limits: Limits = Config::from_json(r#"{"per_hour": 100}"#).parse().unwrap();
    /// assert_eq!(limits.per_hour, 100);
    /// assert!(Config::from_json("{}").parse::<Limits>().is_err());
    /// ```
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_json::from_str(&self.json).map_err(|e| ConfigError(e.to_string()))
    }

    /// The raw JSON text.
    pub fn json(&self) -> &str {
        &self.json
    }
}

/// Why a plugin refused its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl ConfigError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> ConfigError {
        ConfigError(message.into())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Address {
    /// An address from its parts.
    pub fn new(local_part: impl Into<String>, domain: impl Into<String>) -> Address {
        Address {
            local_part: local_part.into(),
            domain: domain.into(),
        }
    }

    /// Splits `local@domain` at the last `@`; `None` without one. The empty
    /// string is the null reverse-path.
    ///
    /// ```
    /// # use postern_sdk::Address;
    /// let a = Address::parse("Jo@Example.ORG").unwrap();
    /// assert_eq!((a.local_part(), a.domain()), ("Jo", "Example.ORG"));
    /// assert!(Address::parse("").unwrap().is_null());
    /// assert!(Address::parse("nobody").is_none());
    /// ```
    pub fn parse(text: &str) -> Option<Address> {
        if text.is_empty() {
            return Some(Address::new("", ""));
        }
        let (local, domain) = text.rsplit_once('@')?;
        Some(Address::new(local, domain))
    }

    /// The part before the `@`.
    pub fn local_part(&self) -> &str {
        &self.local_part
    }

    /// The part after the `@`; compare with `eq_ignore_ascii_case`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// True for the null reverse-path `<>` (bounces).
    pub fn is_null(&self) -> bool {
        self.local_part.is_empty() && self.domain.is_empty()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_null() {
            Ok(())
        } else {
            write!(f, "{}@{}", self.local_part, self.domain)
        }
    }
}

impl Reply {
    /// A reply; the relay checks that the code's class fits the verdict and
    /// that no CR or LF is in it.
    pub fn new(code: u16, enhanced: impl Into<String>, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: enhanced.into(),
            text: text.into(),
        }
    }
}

impl Verdict {
    /// Refuse permanently (5xx).
    ///
    /// ```
    /// # use postern_sdk::Verdict;
    /// let v = Verdict::reject(550, "5.7.1", "no thanks");
    /// assert!(matches!(v, Verdict::Reject(r) if r.code == 550));
    /// ```
    pub fn reject(code: u16, enhanced: &str, text: &str) -> Verdict {
        Verdict::Reject(Reply::new(code, enhanced, text))
    }

    /// Refuse temporarily (4xx): the client retries later.
    pub fn tempfail(code: u16, enhanced: &str, text: &str) -> Verdict {
        Verdict::Tempfail(Reply::new(code, enhanced, text))
    }

    /// Reply (4xx or 5xx) and close the connection.
    pub fn disconnect(code: u16, enhanced: &str, text: &str) -> Verdict {
        Verdict::Disconnect(Reply::new(code, enhanced, text))
    }
}

impl Route {
    /// Deliver to the mail hosts of `domain`.
    pub fn mx(domain: impl Into<String>) -> Route {
        Route::Mx(domain.into())
    }

    /// Deliver through a smart host, `smtp://host:port` or `smtps://host:port`.
    pub fn smarthost(url: impl Into<String>) -> Route {
        Route::Smarthost(url.into())
    }

    /// File the message as `.eml` in this folder below the relay's local
    /// delivery folder.
    pub fn local_folder(folder: impl Into<String>) -> Route {
        Route::LocalFolder(folder.into())
    }

    /// Fail the recipient permanently (5xx): the sender gets a bounce.
    pub fn reject(code: u16, enhanced: &str, text: &str) -> Route {
        Route::Reject(Reply::new(code, enhanced, text))
    }

    /// Deliver through the relay's smart-host pool `name`
    /// (`[delivery.pools.NAME]`; [`pools`] lists them).
    pub fn pool(name: impl Into<String>) -> Route {
        Route::Pool(name.into())
    }

    /// This route with `sender` as the envelope sender of the delivery (an
    /// SRS address for a forward, say).
    ///
    /// ```
    /// # use postern_sdk::{Address, Route};
    /// let r = Route::smarthost("smtp://out.example:25")
    ///     .with_sender(Address::new("SRS0=x=YY=example.org=jo", "fwd.example"));
    /// assert_eq!(r.sender.unwrap().domain(), "fwd.example");
    /// ```
    pub fn with_sender(self, sender: Address) -> Routing {
        Routing {
            route: self,
            sender: Some(sender),
        }
    }
}

impl From<Route> for Routing {
    fn from(route: Route) -> Routing {
        Routing {
            route,
            sender: None,
        }
    }
}

/// The names of the relay's smart-host pools, so [`Plugin::init`] can
/// refuse a config that names one the relay does not have.
pub fn pools() -> Vec<String> {
    context::get_pools()
}

impl Message {
    /// The first value of a header field, if present.
    pub fn first_header(&self, name: &str) -> Option<String> {
        self.header(name).into_iter().next()
    }

    /// The parts that are attachments.
    pub fn attachments(&self) -> Vec<Part> {
        self.parts()
            .into_iter()
            .filter(|p| p.is_attachment)
            .collect()
    }

    /// Reads a part's decoded content as a stream, a chunk at a time, so a
    /// large attachment never has to be in memory at once.
    pub fn part_reader(&self, index: u32) -> PartReader<'_> {
        PartReader {
            message: self,
            source: Source::Part(index),
            offset: 0,
        }
    }

    /// Reads the whole message as received (headers and body, CRLF line
    /// ends), a chunk at a time; header edits are not in it.
    pub fn raw_reader(&self) -> PartReader<'_> {
        PartReader {
            message: self,
            source: Source::Raw,
            offset: 0,
        }
    }
}

enum Source {
    Raw,
    Part(u32),
}

/// A [`std::io::Read`] over message content, from [`Message::part_reader`]
/// or [`Message::raw_reader`].
pub struct PartReader<'a> {
    message: &'a Message,
    source: Source,
    offset: u64,
}

impl std::io::Read for PartReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX).min(64 * 1024);
        let chunk = match self.source {
            Source::Raw => self.message.read_raw(self.offset, len),
            Source::Part(i) => self.message.read_part(i, self.offset, len),
        };
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        self.offset += n as u64;
        Ok(n)
    }
}

/// Writes to the relay's log, tagged with the plugin's name (grant `log`).
pub mod log {
    use crate::bindings::postern::relay::log::{log, Level};

    /// Logs at error level.
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    /// Logs at info level.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
}

/// The plugin's key-value store (grant `kv`): shared by all its instances
/// (and by every relay on the same Redis, with the Redis backend), values
/// expire after their TTL, `incr` is atomic.
///
/// ```no_run
/// use std::time::Duration;
/// // A counter per sender that resets an hour after its first message.
/// let sent = postern_sdk::kv::incr("sent:jo@example.org", 1, Some(Duration::from_secs(3600)));
/// if matches!(sent, Ok(n) if n > 100) {
///     // over the limit
/// }
/// ```
pub mod kv {
    use std::time::Duration;

    use crate::bindings::postern::relay::kv as host;
    pub use host::Error;

    fn ms(ttl: Option<Duration>) -> Option<u64> {
        ttl.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// The value of `key`, unless absent or expired.
    pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
        host::get(key)
    }

    /// Sets `key`, expiring after `ttl` if given.
    pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), Error> {
        host::set(key, value, ms(ttl))
    }

    /// Removes `key`; returns whether it existed.
    pub fn delete(key: &str) -> Result<bool, Error> {
        host::delete(key)
    }

    /// Atomically adds `delta` and returns the new value; `ttl` applies when
    /// the key is created.
    pub fn incr(key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, Error> {
        host::incr(key, delta, ms(ttl))
    }
}

/// What the plugin remembers about the session and the message, kept by the
/// relay (always available; no grant). Each plugin writes only its own keys;
/// [`get_from`](metadata::get_from) reads another plugin's.
///
/// A classifier that decides at `data` and a route that follows at
/// delivery, in two plugins or one:
///
/// ```no_run
/// use postern_sdk::prelude::*;
///
/// struct Classify;
///
/// #[postern_sdk::plugin]
/// impl Plugin for Classify {
///     fn init(_config: Config) -> Result<Self, ConfigError> { Ok(Classify) }
///
///     fn data(&self, _s: &Session, _e: &Envelope, message: &Message) -> Verdict {
///         let bulk = message.first_header("Precedence").is_some_and(|p| p == "bulk");
///         let class = if bulk { "bulk" } else { "normal" };
///         // Fails only past the relay's size limit; the message goes on anyway.
///         let _ = metadata::set(Scope::Transaction, "class", class);
///         Verdict::Continue
///     }
///
///     fn route(&self, _e: &Envelope, _r: &Recipient, _h: &Headers) -> Routing {
///         match metadata::get(Scope::Transaction, "class").as_deref() {
///             Some("bulk") => Route::smarthost("smtp://bulk.example.net:25").into(),
///             _ => Route::Default.into(),
///         }
///     }
/// }
///
/// postern_sdk::export!(Classify);
/// # fn main() {}
/// ```
pub mod metadata {
    use crate::bindings::postern::relay::metadata as host;
    pub use host::{MetadataError as Error, Scope};

    /// This plugin's value for `key`.
    pub fn get(scope: Scope, key: &str) -> Option<String> {
        host::get(scope, key)
    }

    /// Sets this plugin's value for `key`: refused past the relay's size
    /// limit, in a hook without that scope, or where it is read only
    /// (`route`, `delivered`).
    pub fn set(scope: Scope, key: &str, value: &str) -> Result<(), Error> {
        host::set(scope, key, value)
    }

    /// Removes this plugin's value for `key`; returns whether there was one.
    pub fn remove(scope: Scope, key: &str) -> Result<bool, Error> {
        host::remove(scope, key)
    }

    /// This plugin's keys.
    pub fn keys(scope: Scope) -> Vec<String> {
        host::keys(scope)
    }

    /// Another plugin's value, by its `[[plugin]] name` (read only).
    pub fn get_from(plugin: &str, scope: Scope, key: &str) -> Option<String> {
        host::get_from(plugin, scope, key)
    }
}

/// DNS lookups through the relay's resolver (grant `dns`).
pub mod dns {
    use crate::bindings::postern::relay::dns as host;
    pub use host::{Answer, Error, MxRecord, RecordType};

    /// IPv4 addresses of `name`.
    pub fn a(name: &str) -> Result<Vec<String>, Error> {
        host::a(name)
    }
    /// IPv6 addresses of `name`.
    pub fn aaaa(name: &str) -> Result<Vec<String>, Error> {
        host::aaaa(name)
    }
    /// MX records of `domain`.
    pub fn mx(domain: &str) -> Result<Vec<MxRecord>, Error> {
        host::mx(domain)
    }
    /// TXT records of `name`.
    pub fn txt(name: &str) -> Result<Vec<String>, Error> {
        host::txt(name)
    }

    /// Records of `kind` with the seconds they may be kept; none for a name
    /// without them or that does not exist.
    pub fn query(name: &str, kind: RecordType) -> Result<Answer, Error> {
        host::query(name, kind)
    }
}

/// Used by [`export!`] and `#[plugin]`; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    use super::*;

    /// The hooks an `impl Plugin` block writes (from `#[plugin]`).
    #[diagnostic::on_unimplemented(
        message = "`{Self}` does not say which hooks it handles",
        label = "add `#[postern_sdk::plugin]` to `impl Plugin for {Self}`"
    )]
    pub trait Hooks {
        /// The hooks.
        const HOOKS: &'static [Hook];
    }

    /// The error an uninitialized instance answers with: the relay always
    /// calls `init` first, so this only shows up as a plugin error.
    pub fn not_initialized() -> ! {
        panic!("postern plugin hook called before init")
    }
}

/// Exports a [`Plugin`] type as the component's `plugin` world. Use once per
/// crate, at the top level, after `#[postern_sdk::plugin] impl Plugin for T`.
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        const _: () = {
            use $crate::Plugin as _;

            ::std::thread_local! {
                static PLUGIN: ::std::cell::OnceCell<$plugin> =
                    const { ::std::cell::OnceCell::new() };
            }

            fn with<R>(f: impl FnOnce(&$plugin) -> R) -> R {
                PLUGIN.with(|p| match p.get() {
                    Some(p) => f(p),
                    None => $crate::__private::not_initialized(),
                })
            }

            struct Adapter;

            impl $crate::bindings::Guest for Adapter {
                fn init(config: String) -> Result<Vec<$crate::Hook>, String> {
                    let plugin =
                        <$plugin as $crate::Plugin>::init($crate::Config::from_json(config))
                            .map_err(|e| e.to_string())?;
                    // A bool, not the `Err(plugin)` of `set`: a large plugin
                    // value would make every `Result` around it large.
                    if !PLUGIN.with(|p| p.set(plugin).is_ok()) {
                        return Err("init called twice".to_string());
                    }
                    Ok(<$plugin as $crate::__private::Hooks>::HOOKS.to_vec())
                }

                // Session, envelope and headers are fetched from the
                // relay only if the hook reads them.
                fn connect() -> $crate::Verdict {
                    with(|p| <$plugin as $crate::Plugin>::connect(p, &$crate::Session::of_hook()))
                }

                fn helo() -> $crate::Verdict {
                    with(|p| <$plugin as $crate::Plugin>::helo(p, &$crate::Session::of_hook()))
                }

                fn mail_from() -> $crate::Verdict {
                    with(|p| {
                        <$plugin as $crate::Plugin>::mail_from(
                            p,
                            &$crate::Session::of_hook(),
                            &$crate::Envelope::of_hook(),
                        )
                    })
                }

                fn rcpt() -> $crate::Verdict {
                    with(|p| {
                        <$plugin as $crate::Plugin>::rcpt(
                            p,
                            &$crate::Session::of_hook(),
                            &$crate::Recipient::of_hook(),
                        )
                    })
                }

                fn data(message: &$crate::Message) -> $crate::Verdict {
                    with(|p| {
                        <$plugin as $crate::Plugin>::data(
                            p,
                            &$crate::Session::of_hook(),
                            &$crate::Envelope::of_hook(),
                            message,
                        )
                    })
                }

                fn route() -> $crate::Routing {
                    with(|p| {
                        <$plugin as $crate::Plugin>::route(
                            p,
                            &$crate::Envelope::of_hook(),
                            &$crate::Recipient::of_hook(),
                            &$crate::Headers::of_hook(),
                        )
                    })
                }

                fn delivered(report: $crate::DeliveryReport) {
                    with(|p| {
                        <$plugin as $crate::Plugin>::delivered(
                            p,
                            &$crate::Envelope::of_hook(),
                            &report,
                        )
                    })
                }
            }

    $crate::bindings::__export_world!(Adapter with_types_in $crate::bindings);
        };
    };
}
