//! One transaction as a JSON record: the session facts (client address,
//! listener, HELO, TLS, AUTH user), the envelope with its MAIL and RCPT
//! parameters, and the plugins' transaction metadata. `postern queue show
//! --json` gives a queued message's as its `record`; `postern plugin test`
//! replays `.eml` files with a record beside them; the SDK reads and writes
//! the same JSON (`postern_sdk::Record`).
//!
//! ```json
//! {
//!   "client": {"peer": "192.0.2.7:41234", "local": "192.0.2.1:25",
//!              "helo": "mail.example.org", "tls": {"version": "TLSv1.3",
//!              "cipher": "TLS13_AES_256_GCM_SHA384"}, "auth_user": null,
//!              "may_relay": false},
//!   "envelope": {"sender": "jo@example.org",
//!                "params": {"size": 0, "body": "sevenbit", "smtputf8": false},
//!                "recipients": [{"address": "ann@example.com"}]},
//!   "metadata": {"classify": {"class": "bulk"}}
//! }
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, SessionInfo};
use crate::metadata::Metadata;
use crate::queue::QueuedMeta;

/// The record format's version.
pub const RECORD_VERSION: u32 = 1;

/// One transaction: who handed it over, the envelope, the metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The format's version ([`RECORD_VERSION`]).
    #[serde(default = "record_version")]
    pub version: u32,
    /// The queue id, for a queued message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When it was accepted, seconds since the epoch, for a queued message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
    /// The session facts; none for a message the relay made (a bounce).
    #[serde(default)]
    pub client: Option<SessionInfo>,
    /// Sender, recipients and their parameters.
    pub envelope: Envelope,
    /// The plugins' transaction metadata.
    #[serde(default)]
    pub metadata: Arc<Metadata>,
}

fn record_version() -> u32 {
    RECORD_VERSION
}

impl Record {
    /// The record of a queued message.
    pub fn of(meta: &QueuedMeta) -> Record {
        Record {
            version: RECORD_VERSION,
            id: Some(meta.id.clone()),
            received: Some(meta.received),
            client: meta.client.clone(),
            envelope: meta.envelope.clone(),
            metadata: meta.metadata.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module's example parses, and a record keeps what it was given.
    #[test]
    fn the_documented_record_parses() {
        let doc = include_str!("record.rs");
        let start = doc.find("//! ```json").unwrap();
        let end = doc[start + 11..].find("//! ```").unwrap() + start + 11;
        let json: String = doc[start + 11..end]
            .lines()
            .map(|l| l.trim_start_matches("//!"))
            .collect();
        let r: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(r.version, RECORD_VERSION);
        let client = r.client.as_ref().unwrap();
        assert_eq!(client.peer.to_string(), "192.0.2.7:41234");
        assert_eq!(client.helo.as_deref(), Some("mail.example.org"));
        assert_eq!(r.envelope.recipients[0].address.as_str(), "ann@example.com");
        assert_eq!(r.metadata.get("classify", "class"), Some("bulk"));
        let again: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }
}
