//! Refuses mail from and to listed domains.
//!
//! ```toml
//! [[plugin]]
//! name = "blocklist"
//! path = "blocklist.wasm"
//! [plugin.config]
//! domains = ["spam.example"]          # recipients refused at RCPT
//! sender_domains = ["junk.example"]   # senders refused at MAIL FROM
//! ```

use postern_sdk::prelude::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Blocklist {
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    sender_domains: Vec<String>,
}

fn listed(list: &[String], domain: &str) -> bool {
    list.iter().any(|d| domain.eq_ignore_ascii_case(d))
}

#[postern_sdk::plugin]
impl Plugin for Blocklist {
    fn init(config: Config) -> Result<Self, ConfigError> {
        config.parse()
    }

    fn mail_from(&self, _session: &Session, envelope: &Envelope) -> Verdict {
        if listed(&self.sender_domains, envelope.sender.domain()) {
            return Verdict::reject(550, "5.7.1", "sender domain is blocked");
        }
        Verdict::Continue
    }

    fn rcpt(&self, _session: &Session, rcpt: &Recipient) -> Verdict {
        if listed(&self.domains, rcpt.domain()) {
            return Verdict::reject(550, "5.7.1", "recipient domain is blocked");
        }
        Verdict::Continue
    }
}

postern_sdk::export!(Blocklist);
