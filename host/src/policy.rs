//! What a hook answers. The session asks at connect, MAIL, RCPT and after DATA;
//! the built-in relay access rules answer first, then the plugin chain.

use std::sync::Arc;

use crate::envelope::{Address, Envelope, Recipient, SessionInfo};
use crate::metadata::Metadata;
use crate::queue::{QueueId, QueuedMeta};
use crate::smtp::reply::Reply;

/// The answer of one hook (built-in rules or a plugin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No opinion: ask the next in the chain, or apply the host default.
    Continue,
    /// Accept now; later plugins in this hook are not asked.
    Accept,
    /// Permanent rejection (5xx).
    Reject(Reply),
    /// Temporary rejection (4xx).
    Tempfail(Reply),
    /// Reply, then close the connection.
    Disconnect(Reply),
}

impl Verdict {
    /// True for `Continue` and `Accept`.
    pub fn lets_through(&self) -> bool {
        matches!(self, Verdict::Continue | Verdict::Accept)
    }
}

/// A message after DATA, as the data hook sees and may change it.
#[derive(Debug, Clone)]
pub struct DataTransaction {
    /// The envelope; the data hook may add or remove recipients.
    pub envelope: Envelope,
    /// The whole message as it will be spooled (CRLF line ends, our `Received:` first).
    pub message: Vec<u8>,
    /// Set by a plugin that quarantines the message: it is spooled on hold
    /// with this reason instead of being delivered.
    pub quarantine: Option<String>,
    /// SPF, DKIM, DMARC and ARC results of the transaction (empty when the
    /// client was not checked).
    pub authentication: crate::authn::Results,
    /// Recipients added or replaced by plugins granted `recipients`: they
    /// need not pass the relay access rules.
    pub trusted: Vec<Address>,
}

impl DataTransaction {
    /// A transaction's message and envelope before the data hook.
    pub fn new(envelope: Envelope, message: Vec<u8>) -> DataTransaction {
        DataTransaction {
            envelope,
            message,
            quarantine: None,
            trusted: Vec::new(),
            authentication: Default::default(),
        }
    }
}

/// Where one recipient goes, as the route hook decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The host default (the configured smart host or MX lookup).
    Default,
    /// MX lookup for this domain instead of the recipient's.
    Mx(String),
    /// A smart host URL (`smtp://host:port` or `smtps://host:port`).
    Smarthost(String),
    /// Write the message as `.eml` into this folder (relative to
    /// `delivery.local_folder`; `..` is refused).
    LocalFolder(String),
    /// Drop the recipient silently (counts as delivered).
    Discard,
    /// Fail the recipient permanently: it bounces with this reply.
    Reject(Reply),
    /// A smart-host pool (`[delivery.pools.NAME]`).
    Pool(String),
}

/// The route hook's whole answer for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Where it goes.
    pub route: Route,
    /// The envelope sender for its delivery; the message's own when none.
    pub sender: Option<Address>,
}

impl From<Route> for Routing {
    fn from(route: Route) -> Routing {
        Routing {
            route,
            sender: None,
        }
    }
}

/// A queued message, as the delivery hooks (route, delivered) see it.
#[derive(Debug, Clone, Copy)]
pub struct Queued<'a> {
    /// Its queue id.
    pub id: &'a QueueId,
    /// Its envelope as spooled.
    pub envelope: &'a Envelope,
    /// The session that handed it over (none for the relay's own bounces).
    pub client: Option<&'a SessionInfo>,
    /// Its transaction metadata, as stored with it.
    pub metadata: &'a Arc<Metadata>,
}

impl<'a> Queued<'a> {
    /// The parts of a spooled record.
    pub fn of(meta: &'a QueuedMeta, id: &'a QueueId) -> Queued<'a> {
        Queued {
            id,
            envelope: &meta.envelope,
            client: meta.client.as_ref(),
            metadata: &meta.metadata,
        }
    }
}

/// The recipient the route hook is asked about, with its message.
#[derive(Debug, Clone)]
pub struct RouteQuery<'a> {
    /// The queued message.
    pub queued: Queued<'a>,
    /// The recipient being routed.
    pub recipient: &'a Recipient,
    /// The message's header section (up to the empty line).
    pub headers: &'a [u8],
}

impl std::fmt::Display for Verdict {
    /// As logs and tools show it: `continue`, `reject 550 5.7.1 text`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Continue => f.write_str("continue"),
            Verdict::Accept => f.write_str("accept"),
            Verdict::Reject(r) => write!(f, "reject {r}"),
            Verdict::Tempfail(r) => write!(f, "tempfail {r}"),
            Verdict::Disconnect(r) => write!(f, "disconnect {r}"),
        }
    }
}

impl std::fmt::Display for Route {
    /// As logs and tools show it: `mx example.org`, `pool outbound`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Default => f.write_str("default"),
            Route::Mx(d) => write!(f, "mx {d}"),
            Route::Smarthost(u) => write!(f, "smarthost {u}"),
            Route::LocalFolder(d) => write!(f, "local-folder {d}"),
            Route::Discard => f.write_str("discard"),
            Route::Reject(r) => write!(f, "reject {r}"),
            Route::Pool(p) => write!(f, "pool {p}"),
        }
    }
}

impl std::fmt::Display for Routing {
    /// The route, and the sender when it has its own.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sender {
            Some(s) => write!(f, "{} (sender <{s}>)", self.route),
            None => write!(f, "{}", self.route),
        }
    }
}
