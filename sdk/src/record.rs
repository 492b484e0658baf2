//! One transaction as the relay records it in JSON: the session facts, the
//! envelope with its MAIL and RCPT parameters, and the plugins' metadata.
//! `postern queue show --json` prints a queued message's as its `record`;
//! `postern plugin test` replays `.eml` files with a record beside them; an
//! archive plugin can write one next to each message it keeps.
//!
//! ```
//! use postern_sdk::record::Record;
//!
//! let json = r#"{
//!   "version": 1,
//!   "id": "6618FEBC34B480017",
//!   "client": {"peer": "192.0.2.7:41234", "local": "192.0.2.1:25",
//!              "helo": "mail.example.org", "tls": null, "auth_user": null,
//!              "may_relay": false},
//!   "envelope": {"sender": "jo@example.org",
//!                "params": {"size": 2048, "body": "eightbitmime", "smtputf8": false},
//!                "recipients": [{"address": "ann@example.com",
//!                                "orcpt": "rfc822;ann@example.com",
//!                                "notify": {"never": false, "success": true,
//!                                           "failure": true, "delay": false}}]},
//!   "metadata": {"classify": {"class": "bulk"}}
//! }"#;
//! let record: Record = serde_json::from_str(json).unwrap();
//! assert_eq!(record.client.as_ref().unwrap().helo.as_deref(), Some("mail.example.org"));
//! assert_eq!(record.envelope.recipients[0].address, "ann@example.com");
//! assert!(record.envelope.recipients[0].notify.unwrap().success);
//! assert_eq!(record.metadata("classify", "class"), Some("bulk"));
//!
//! // Written back, it reads the same.
//! let again: Record = serde_json::from_str(&record.to_json()).unwrap();
//! assert_eq!(again, record);
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The format's version (1).
    #[serde(default = "one")]
    pub version: u32,
    /// The queue id, for a queued message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When it was accepted, seconds since the epoch, for a queued message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
    /// The client session; none for a message the relay made (a bounce).
    #[serde(default)]
    pub client: Option<Client>,
    /// Sender, recipients and parameters.
    pub envelope: Envelope,
    /// Metadata by plugin name, then key.
    #[serde(default)]
    pub metadata: BTreeMap<String, BTreeMap<String, String>>,
}

fn one() -> u32 {
    1
}

impl Record {
    /// `plugin`'s value for `key`.
    pub fn metadata(&self, plugin: &str, key: &str) -> Option<&str> {
        self.metadata.get(plugin)?.get(key).map(String::as_str)
    }

    /// The record as JSON, as the relay writes it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What the relay knew about the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// The client's address and port, e.g. `192.0.2.7:41234` (`[2001:db8::7]:41234`).
    pub peer: String,
    /// The listener's address and port.
    pub local: String,
    /// The name given in HELO or EHLO.
    #[serde(default)]
    pub helo: Option<String>,
    /// TLS facts, when the session was in TLS.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// The authenticated user.
    #[serde(default)]
    pub auth_user: Option<String>,
    /// The built-in access rules let the client relay to any domain.
    #[serde(default)]
    pub may_relay: bool,
}

/// TLS facts of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tls {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// Sender, parameters and recipients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The reverse-path; empty for the null sender.
    pub sender: String,
    /// MAIL FROM parameters.
    #[serde(default)]
    pub params: Params,
    /// The recipients, in RCPT order.
    pub recipients: Vec<RecipientRecord>,
}

/// MAIL FROM parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// SIZE=, 0 when absent.
    #[serde(default)]
    pub size: u64,
    /// BODY=: `sevenbit` or `eightbitmime`.
    #[serde(default = "seven_bit")]
    pub body: String,
    /// SMTPUTF8 was given.
    #[serde(default)]
    pub smtputf8: bool,
    /// RET= (RFC 3461): `full` or `hdrs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<String>,
    /// ENVID= (RFC 3461).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
}

fn seven_bit() -> String {
    "sevenbit".into()
}

/// One recipient with its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientRecord {
    /// The forward-path.
    pub address: String,
    /// ORCPT= as given, `addr-type;xtext`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// NOTIFY=; none when the client gave none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
}

/// NOTIFY= conditions (RFC 3461).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// NEVER.
    #[serde(default)]
    pub never: bool,
    /// SUCCESS.
    #[serde(default)]
    pub success: bool,
    /// FAILURE.
    #[serde(default)]
    pub failure: bool,
    /// DELAY.
    #[serde(default)]
    pub delay: bool,
}
