//! Outbound delivery: takes spooled messages to their next hop.
//!
//! # Layout
//!
//! - [`scheduler`]: the queue manager. A bounded set of active messages, one queue
//!   per destination (an MX domain or a smart host), per-destination and global
//!   connection limits, connection reuse, backoff of a failing destination, retry
//!   timers, expiry.
//! - [`route`]: where one recipient goes (plugin route hook, `[delivery.routes]`,
//!   the smart host, or MX).
//! - [`dns`]: MX and address lookups with hickory-resolver, classified into
//!   permanent and temporary failures.
//! - [`pools`]: which host of a smart-host pool takes the next message.
//! - [`client`]: the SMTP client: pipelining, STARTTLS, AUTH, capability checks,
//!   dot-stuffing and line folding, RFC 5321 timeouts.
//! - [`tls`]: the rustls client configs (verified and opportunistic).
//! - [`state`]: per-recipient outcomes and retry times, kept next to each spooled
//!   message as `queue/<id>.state`.
//! - [`suspend`]: destinations the operator suspended.
//! - [`bounce`]: RFC 3464 delivery status notifications.
//! - [`quarantine`]: removes quarantined mail older than
//!   `quarantine_retention` (it is never bounced).
//! - [`control`]: `postern queue` commands, over the control socket of a running
//!   relay or directly on the spool of a stopped one.

pub mod bounce;
pub mod client;
pub mod control;
pub mod dns;
pub mod pools;
pub mod quarantine;
pub mod route;
pub mod scheduler;
pub mod state;
pub mod suspend;
pub mod tls;

use std::net::SocketAddr;

pub use route::{NextHop, SmartHost};
pub use scheduler::Delivery;

use crate::smtp::reply::Reply;

/// Why an attempt to hand a message to a next hop did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The DNS gave no usable answer.
    #[error("DNS lookup for {name}: {message}")]
    Dns {
        /// The name looked up.
        name: String,
        /// What went wrong.
        message: String,
        /// SERVFAIL, timeouts and the like; NXDOMAIN and null MX are permanent.
        transient: bool,
    },
    /// The domain publishes a null MX (RFC 7505): it accepts no mail.
    #[error("domain {0} accepts no mail (null MX)")]
    NullMx(String),
    /// No TCP connection could be opened.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The next hop did not answer in time.
    #[error("timeout after {stage}")]
    Timeout {
        /// The stage (RFC 5321 4.5.3.2 names).
        stage: &'static str,
    },
    /// The connection broke.
    #[error("connection lost during {stage}: {source}")]
    Io {
        /// The stage.
        stage: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS could not be set up, or is required and not offered.
    #[error("TLS: {0}")]
    Tls(String),
    /// The next hop answered something that is not SMTP.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The next hop refused with a reply.
    #[error("{stage}: {reply}")]
    Rejected {
        /// The stage.
        stage: &'static str,
        /// The reply.
        reply: Reply,
    },
    /// The next hop is this relay itself.
    #[error("mail for {0} loops back to this relay")]
    Loop(String),
    /// The next hop lacks what the message needs (SMTPUTF8, 8BITMIME, SIZE).
    #[error("{0}")]
    Unsupported(Reply),
    /// The spool could not be read or written.
    #[error(transparent)]
    Spool(#[from] crate::queue::Error),
    /// Delivery could not start (resolver, CA file).
    #[error("delivery setup: {0}")]
    Setup(String),
    /// The domain's MTA-STS policy (enforce) allows none of the hosts
    /// that could be tried.
    #[error("MTA-STS: {0}")]
    MtaSts(String),
    /// A local-folder route could not be written.
    #[error("local folder {path}: {source}")]
    LocalFolder {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Error {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Dns { transient, .. } => *transient,
            Error::NullMx(_) | Error::Loop(_) | Error::Unsupported(_) | Error::Setup(_) => false,
            Error::Rejected { reply, .. } => reply.code < 500,
            Error::Connect { .. }
            | Error::Timeout { .. }
            | Error::Io { .. }
            | Error::Tls(_)
            | Error::MtaSts(_)
            | Error::Protocol(_)
            | Error::Spool(_)
            | Error::LocalFolder { .. } => true,
        }
    }

    /// The reply that stands for this failure in the spool, the log and a DSN:
    /// the remote reply when there is one, else one made up with the RFC 3463
    /// code that fits.
    pub fn reply(&self) -> Reply {
        let text = self.to_string();
        match self {
            Error::Rejected { reply, .. } | Error::Unsupported(reply) => reply.clone(),
            Error::Dns {
                transient: true, ..
            } => Reply::new(451, "4.4.3", text),
            Error::Dns { .. } => Reply::new(550, "5.1.2", text),
            Error::NullMx(_) => Reply::new(556, "5.1.10", text),
            Error::Loop(_) => Reply::new(554, "5.4.6", text),
            Error::Connect { .. } => Reply::new(451, "4.4.1", text),
            Error::Timeout { .. } => Reply::new(451, "4.4.2", text),
            Error::Io { .. } => Reply::new(451, "4.4.2", text),
            Error::Tls(_) | Error::MtaSts(_) => Reply::new(451, "4.7.5", text),
            Error::Protocol(_) => Reply::new(451, "4.5.0", text),
            Error::Spool(_) | Error::LocalFolder { .. } | Error::Setup(_) => {
                Reply::new(451, "4.3.0", text)
            }
        }
    }
}
