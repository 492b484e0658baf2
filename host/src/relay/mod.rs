//! Who may relay where: the built-in access rules, deny by default. They run
//! before any plugin; a plugin may refuse what they allow, never the reverse.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{Config, RecipientList};
use crate::envelope::Address;
use crate::smtp::reply::Reply;

/// Relay access rules compiled from `[relay]`.
#[derive(Debug, Clone)]
pub struct AccessRules {
    networks: Vec<IpNet>,
    /// Lowercased relay domains.
    domains: HashSet<String>,
    /// Lowercased valid recipients, when the config lists them.
    recipients: Option<HashSet<String>>,
    /// Where mail to the bare `postmaster` goes.
    postmaster: String,
}

/// Errors building the rules (the recipients file).
#[derive(Debug, thiserror::Error)]
#[error("relay.recipients file {path}: {source}")]
pub struct Error {
    path: std::path::PathBuf,
    source: std::io::Error,
}

impl AccessRules {
    /// Builds the rules, reading `relay.recipients` if it names a file.
    pub fn from_config(config: &Config) -> Result<AccessRules, Error> {
        let recipients = match &config.relay.recipients {
            None => None,
            Some(RecipientList::List(list)) => {
                Some(list.iter().map(|a| a.trim().to_ascii_lowercase()).collect())
            }
            Some(RecipientList::File(path)) => {
                let path = config.resolve(path);
                let text = std::fs::read_to_string(&path).map_err(|source| Error {
                    path: path.clone(),
                    source,
                })?;
                Some(
                    text.lines()
                        .map(|l| l.split('#').next().unwrap_or("").trim())
                        .filter(|l| !l.is_empty())
                        .map(str::to_ascii_lowercase)
                        .collect(),
                )
            }
        };
        let domains: HashSet<String> = config
            .relay
            .domains
            .iter()
            .map(|d| d.to_ascii_lowercase())
            .collect();
        let postmaster_domain = config
            .relay
            .domains
            .first()
            .cloned()
            .unwrap_or_else(|| config.hostname.clone());
        Ok(AccessRules {
            networks: config.relay.networks.clone(),
            domains,
            recipients,
            postmaster: format!("postmaster@{postmaster_domain}"),
        })
    }

    /// True when the client's address is in `relay.networks`.
    pub fn trusted_network(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.networks.iter().any(|n| n.contains(&ip))
    }

    /// True when `domain` is one of `relay.domains`.
    pub fn is_relay_domain(&self, domain: &str) -> bool {
        self.domains
            .contains(&domain.trim_end_matches('.').to_ascii_lowercase())
    }

    /// Checks one recipient. `may_relay` is true for trusted networks and
    /// authenticated clients. Returns the address to queue (the bare
    /// `postmaster` becomes a full address) or the refusal.
    pub fn check_recipient(&self, may_relay: bool, rcpt: &Address) -> Result<Address, Reply> {
        // RFC 5321 4.5.1: the bare "postmaster" is always accepted.
        if rcpt.is_null() || rcpt.as_str().eq_ignore_ascii_case("postmaster") {
            return Ok(Address(self.postmaster.clone()));
        }
        let domain = rcpt.domain();
        if domain.is_empty() {
            return Err(Reply::BAD_RECIPIENT);
        }
        if may_relay {
            return Ok(rcpt.clone());
        }
        if !self.is_relay_domain(domain) || has_source_route(rcpt.local_part()) {
            return Err(Reply::RELAY_DENIED);
        }
        if rcpt.local_part().eq_ignore_ascii_case("postmaster") {
            return Ok(rcpt.clone());
        }
        let key =
            format!("{}@{}", rcpt.local_part(), domain.trim_end_matches('.')).to_ascii_lowercase();
        match &self.recipients {
            Some(valid) if !valid.contains(&key) => Err(Reply::UNKNOWN_USER),
            _ => Ok(rcpt.clone()),
        }
    }
}

/// Sender-specified routing hidden in a local part (`user%other`, `other!user`,
/// a quoted `user@other`): a relay that forwarded these would relay for anyone.
fn has_source_route(local: &str) -> bool {
    local.contains(['%', '!', '@'])
}

/// IPv4-mapped IPv6 addresses (from a dual-stack listener) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn rules() -> AccessRules {
        let config = Config::parse(
            "hostname = \"mx.ours.test\"\n[[listener]]\naddress = \"127.0.0.1:25\"\n[relay]\nnetworks = [\"192.0.2.0/24\", \"2001:db8::/32\"]\ndomains = [\"Ours.Test\"]\nrecipients = [\"alice@ours.test\"]\n",
            Path::new("t.toml"),
        )
        .unwrap();
        AccessRules::from_config(&config).unwrap()
    }

    #[test]
    fn recipients() {
        let r = rules();
        let ok = |s: &str| Ok(Address(s.into()));
        for (may_relay, rcpt, expected) in [
            (false, "alice@ours.test", ok("alice@ours.test")),
            (false, "ALICE@OURS.TEST", ok("ALICE@OURS.TEST")),
            (false, "alice@ours.test.", ok("alice@ours.test.")),
            (false, "bob@ours.test", Err(Reply::UNKNOWN_USER)),
            (false, "postmaster@ours.test", ok("postmaster@ours.test")),
            (false, "postmaster", ok("postmaster@Ours.Test")),
            (false, "", ok("postmaster@Ours.Test")),
            (false, "someone@other.test", Err(Reply::RELAY_DENIED)),
            (false, "user%other.test@ours.test", Err(Reply::RELAY_DENIED)),
            (false, "other.test!user@ours.test", Err(Reply::RELAY_DENIED)),
            (false, "user@other.test@ours.test", Err(Reply::RELAY_DENIED)),
            (true, "someone@other.test", ok("someone@other.test")),
            (
                true,
                "user%other.test@ours.test",
                ok("user%other.test@ours.test"),
            ),
        ] {
            assert_eq!(
                r.check_recipient(may_relay, &Address(rcpt.into())),
                expected,
                "{may_relay} {rcpt}"
            );
        }
    }

    #[test]
    fn networks() {
        let r = rules();
        for (ip, trusted) in [
            ("192.0.2.7", true),
            ("::ffff:192.0.2.7", true),
            ("2001:db8::1", true),
            ("198.51.100.1", false),
            ("127.0.0.1", false),
        ] {
            assert_eq!(r.trusted_network(ip.parse().unwrap()), trusted, "{ip}");
        }
    }
}
