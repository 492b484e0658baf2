//! The envelope of one transaction: who sent it, to whom, with which ESMTP
//! parameters, and what the session knew about the client. The session builds it,
//! the spool stores it next to the message, delivery and plugins read it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// An envelope address (`local@domain`). The null reverse-path is the empty string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Address(pub String);

impl Address {
    /// The null reverse-path `<>`.
    pub fn null() -> Address {
        Address(String::new())
    }

    /// True for the null reverse-path.
    pub fn is_null(&self) -> bool {
        self.0.is_empty()
    }

    /// The part after the last `@`, or "" when there is none.
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
    }

    /// The part before the last `@` (the whole address when there is none).
    pub fn local_part(&self) -> &str {
        self.0.rsplit_once('@').map(|(l, _)| l).unwrap_or(&self.0)
    }

    /// True when the address needs SMTPUTF8 to be sent on.
    pub fn is_utf8(&self) -> bool {
        !self.0.is_ascii()
    }

    /// The address as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `BODY=` from MAIL FROM (RFC 6152).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Body {
    /// No BODY parameter, or BODY=7BIT.
    #[default]
    SevenBit,
    /// BODY=8BITMIME.
    EightBitMime,
}

/// `RET=` from MAIL FROM (RFC 3461).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    /// Return the whole message in a bounce.
    Full,
    /// Return only the headers.
    Hdrs,
}

/// DSN `NOTIFY=` conditions for a recipient (RFC 3461).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// NOTIFY=NEVER.
    pub never: bool,
    /// SUCCESS.
    pub success: bool,
    /// FAILURE (also the default when NOTIFY is absent).
    pub failure: bool,
    /// DELAY.
    pub delay: bool,
}

/// One recipient with its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The forward-path.
    pub address: Address,
    /// ORCPT (RFC 3461), as given, `addr-type;xtext`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// NOTIFY; `None` when the client gave none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
}

impl Recipient {
    /// A recipient with no DSN parameters.
    pub fn new(address: impl Into<String>) -> Recipient {
        Recipient {
            address: Address(address.into()),
            orcpt: None,
            notify: None,
        }
    }
}

/// ESMTP parameters of MAIL FROM that the relay keeps and honours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailParams {
    /// SIZE= as declared by the client (0 when absent).
    #[serde(default)]
    pub size: usize,
    /// BODY=.
    #[serde(default)]
    pub body: Body,
    /// SMTPUTF8.
    #[serde(default)]
    pub smtputf8: bool,
    /// RET=.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// ENVID=.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
}

/// TLS facts of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// e.g. "TLSv1.3".
    pub version: String,
    /// e.g. "TLS13_AES_256_GCM_SHA384".
    pub cipher: String,
}

/// What the session knows about the client; handed to every hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The listener's address and port.
    pub local: SocketAddr,
    /// The name given in HELO/EHLO, once given.
    pub helo: Option<String>,
    /// Set once the session is in TLS.
    pub tls: Option<TlsInfo>,
    /// The authenticated user, once AUTH succeeded.
    pub auth_user: Option<String>,
    /// True when the built-in access rules let this client relay anywhere
    /// (`relay.networks` or AUTH).
    pub may_relay: bool,
}

/// Sender, recipients and parameters of one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The reverse-path; null for bounces.
    pub sender: Address,
    /// MAIL FROM parameters.
    #[serde(default)]
    pub params: MailParams,
    /// Accepted recipients, in RCPT order.
    pub recipients: Vec<Recipient>,
}

impl Envelope {
    /// An envelope with a sender and no recipients yet.
    pub fn new(sender: Address, params: MailParams) -> Envelope {
        Envelope {
            sender,
            params,
            recipients: Vec::new(),
        }
    }
}
