//! Allow and deny lists by client network, HELO name and sender domain, DNS
//! blocklists for the client address (IPv4 and IPv6) and for the sender
//! domain, answers cached in kv for their TTL. See README.md.

use std::net::IpAddr;

use ipnet::IpNet;
use postern_sdk::prelude::*;
use postern_sdk::{dns, kv};

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListConfig {
    #[serde(default)]
    networks: Vec<String>,
    #[serde(default)]
    helo: Vec<String>,
    #[serde(default)]
    sender_domains: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneConfig {
    zone: String,
    /// Answers that mean "listed": addresses or `from-to` ranges.
    #[serde(default)]
    codes: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessConfig {
    #[serde(default)]
    allow: ListConfig,
    #[serde(default)]
    deny: ListConfig,
    #[serde(default)]
    dnsbl: Vec<ZoneConfig>,
    #[serde(default)]
    dbl: Vec<ZoneConfig>,
    #[serde(default = "yes")]
    cache: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default)]
struct Lists {
    networks: Vec<IpNet>,
    helo: Vec<String>,
    sender_domains: Vec<String>,
}

#[derive(Debug)]
struct Zone {
    zone: String,
    /// Inclusive ranges of listing answers.
    codes: Vec<(u32, u32)>,
}

struct Access {
    allow: Lists,
    deny: Lists,
    dnsbl: Vec<Zone>,
    dbl: Vec<Zone>,
    cache: bool,
}

/// Session metadata set when an allow entry matched: the plugin's other
/// checks are skipped for the rest of the session.
const ALLOWED: &str = "allowed";

/// `*.example.com` (subdomains), `example.com`, `*` (any); no case.
fn name_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(parent) => name
            .to_ascii_lowercase()
            .ends_with(&format!(".{}", parent.to_ascii_lowercase())),
        None => name.eq_ignore_ascii_case(pattern),
    }
}

fn ipv4(text: &str) -> Result<u32, String> {
    text.parse::<std::net::Ipv4Addr>()
        .map(u32::from)
        .map_err(|_| format!("{text:?} is not an IPv4 address"))
}

impl Lists {
    fn from_config(c: ListConfig, key: &str) -> Result<Lists, String> {
        let networks = c
            .networks
            .iter()
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{key}.networks: {n:?} is not an address or CIDR"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Lists {
            networks,
            helo: c.helo,
            sender_domains: c.sender_domains,
        })
    }

    fn has_client(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(&ip))
    }

    fn has_helo(&self, helo: &str) -> bool {
        self.helo.iter().any(|p| name_matches(p, helo))
    }

    fn has_sender_domain(&self, domain: &str) -> bool {
        self.sender_domains.iter().any(|p| name_matches(p, domain))
    }
}

impl Zone {
    fn from_config(c: ZoneConfig, key: &str) -> Result<Zone, String> {
        let mut codes = Vec::new();
        for code in &c.codes {
            let range = match code.split_once('-') {
                Some((a, b)) => (ipv4(a)?, ipv4(b)?),
                None => (ipv4(code)?, ipv4(code)?),
            };
            if range.0 > range.1 {
                return Err(format!("{key}.codes: {code:?} runs backwards"));
            }
            codes.push(range);
        }
        if codes.is_empty() {
            // Any answer in 127.0.0.0/8 but the lists' own errors.
            codes.push((
                ipv4("127.0.0.2").unwrap_or(0),
                ipv4("127.255.255.254").unwrap_or(0),
            ));
        }
        if c.zone.is_empty() || c.zone.starts_with('.') {
            return Err(format!("{key}.zone: {:?} is not a DNS zone", c.zone));
        }
        Ok(Zone {
            zone: c.zone.trim_end_matches('.').to_string(),
            codes,
        })
    }

    /// Whether answer `code` means listed. `127.255.255.x` is the list
    /// telling the querier something went wrong (Spamhaus: a public
    /// resolver, over quota), never a listing.
    fn lists(&self, code: &str) -> Answer {
        let Ok(n) = ipv4(code) else {
            return Answer::NotListed;
        };
        if n >> 8 == ipv4("127.255.255.0").unwrap_or(0) >> 8 {
            return Answer::ListError;
        }
        if self.codes.iter().any(|(a, b)| (*a..=*b).contains(&n)) {
            Answer::Listed
        } else {
            Answer::NotListed
        }
    }
}

#[derive(Debug, PartialEq)]
enum Answer {
    Listed,
    NotListed,
    ListError,
}

/// The name a blocklist lists an address under: reversed octets, or for
/// IPv6 reversed nibbles.
fn reversed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}")
        }
        IpAddr::V6(v6) => v6
            .octets()
            .iter()
            .rev()
            .flat_map(|b| [b & 0xf, b >> 4])
            .map(|n| format!("{n:x}"))
            .collect::<Vec<_>>()
            .join("."),
    }
}

impl Access {
    fn from_config(c: AccessConfig) -> Result<Access, String> {
        let zones = |list: Vec<ZoneConfig>, key: &str| -> Result<Vec<Zone>, String> {
            list.into_iter()
                .enumerate()
                .map(|(i, z)| Zone::from_config(z, &format!("{key}[{i}]")))
                .collect()
        };
        Ok(Access {
            allow: Lists::from_config(c.allow, "allow")?,
            deny: Lists::from_config(c.deny, "deny")?,
            dnsbl: zones(c.dnsbl, "dnsbl")?,
            dbl: zones(c.dbl, "dbl")?,
            cache: c.cache,
        })
    }

    /// The A records `name` has, from the cache when it holds them (an
    /// empty answer is cached too, for its negative TTL).
    fn lookup(&self, name: &str) -> Result<Vec<String>, dns::Error> {
        let key = format!("dns:{name}");
        if self.cache {
            if let Ok(Some(v)) = kv::get(&key) {
                let text = String::from_utf8_lossy(&v).into_owned();
                return Ok(text
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect());
            }
        }
        let answer = dns::query(name, dns::RecordType::A)?;
        if self.cache && answer.ttl > 0 {
            let ttl = std::time::Duration::from_secs(u64::from(answer.ttl));
            let _ = kv::set(&key, answer.records.join(",").as_bytes(), Some(ttl));
        }
        Ok(answer.records)
    }

    /// The first zone that lists `name` (under each zone).
    fn listed_in<'z>(&self, zones: &'z [Zone], name: &str) -> Option<&'z Zone> {
        zones.iter().find(|z| {
            let query = format!("{name}.{}", z.zone);
            match self.lookup(&query) {
                Ok(codes) => {
                    let answers: Vec<Answer> = codes.iter().map(|c| z.lists(c)).collect();
                    if answers.contains(&Answer::ListError) {
                        postern_sdk::log::warn(&format!(
                            "{} answered {query} with an error code ({}); not counted as a listing",
                            z.zone,
                            codes.join(", ")
                        ));
                    }
                    answers.contains(&Answer::Listed)
                }
                // A list that cannot be asked lists nobody: mail goes on.
                Err(e) => {
                    postern_sdk::log::warn(&format!("{query}: lookup failed ({e:?})"));
                    false
                }
            }
        })
    }

    fn allowed(&self) -> bool {
        metadata::get(Scope::Session, ALLOWED).is_some()
    }

    fn allow(&self, why: &str) {
        let _ = metadata::set(Scope::Session, ALLOWED, why);
    }
}

#[postern_sdk::plugin]
impl Plugin for Access {
    fn init(config: Config) -> Result<Self, ConfigError> {
        Access::from_config(config.parse()?).map_err(ConfigError)
    }

    fn connect(&self, session: &Session) -> Verdict {
        let ip: IpAddr = session.peer_ip.into();
        if self.allow.has_client(ip) {
            self.allow("network");
            return Verdict::Continue;
        }
        if self.deny.has_client(ip) {
            return Verdict::reject(554, "5.7.1", &format!("Client host [{ip}] refused"));
        }
        if let Some(zone) = self.listed_in(&self.dnsbl, &reversed(ip)) {
            return Verdict::reject(
                554,
                "5.7.1",
                &format!(
                    "Service unavailable; Client host [{ip}] blocked using {}",
                    zone.zone
                ),
            );
        }
        Verdict::Continue
    }

    fn helo(&self, session: &Session) -> Verdict {
        if self.allowed() {
            return Verdict::Continue;
        }
        let helo = session.helo.as_deref().unwrap_or("");
        if self.allow.has_helo(helo) {
            self.allow("helo");
            return Verdict::Continue;
        }
        if self.deny.has_helo(helo) {
            return Verdict::reject(
                550,
                "5.7.1",
                &format!("Helo command rejected: {helo} refused"),
            );
        }
        Verdict::Continue
    }

    fn mail_from(&self, _session: &Session, envelope: &Envelope) -> Verdict {
        if self.allowed() || envelope.sender.is_null() {
            return Verdict::Continue;
        }
        let domain = envelope.sender.domain();
        if self.allow.has_sender_domain(domain) {
            return Verdict::Continue;
        }
        if self.deny.has_sender_domain(domain) {
            return Verdict::reject(
                550,
                "5.7.1",
                &format!("Sender address rejected: {domain} refused"),
            );
        }
        if let Some(zone) = self.listed_in(&self.dbl, domain) {
            return Verdict::reject(
                550,
                "5.7.1",
                &format!(
                    "Sender address rejected: {domain} blocked using {}",
                    zone.zone
                ),
            );
        }
        Verdict::Continue
    }
}

postern_sdk::export!(Access);

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(codes: &[&str]) -> Zone {
        Zone::from_config(
            ZoneConfig {
                zone: "bl.example".into(),
                codes: codes.iter().map(|c| c.to_string()).collect(),
            },
            "dnsbl[0]",
        )
        .unwrap()
    }

    #[test]
    fn blocklist_answers_map_to_listings() {
        let z = zone(&["127.0.0.2", "127.0.0.4-127.0.0.11"]);
        for (code, expected) in [
            ("127.0.0.2", Answer::Listed),
            ("127.0.0.3", Answer::NotListed),
            ("127.0.0.4", Answer::Listed),
            ("127.0.0.11", Answer::Listed),
            ("127.0.0.12", Answer::NotListed),
            ("127.255.255.254", Answer::ListError),
            ("127.255.255.252", Answer::ListError),
            ("not an address", Answer::NotListed),
        ] {
            assert_eq!(z.lists(code), expected, "{code}");
        }
        // Without codes: anything in 127/8 but the error answers.
        let any = zone(&[]);
        assert_eq!(any.lists("127.0.1.9"), Answer::Listed);
        assert_eq!(any.lists("127.255.255.255"), Answer::ListError);
        assert_eq!(any.lists("10.0.0.2"), Answer::NotListed);
        let bad = Zone::from_config(
            ZoneConfig {
                zone: "x.test".into(),
                codes: vec!["127.0.0.9-127.0.0.2".into()],
            },
            "dnsbl[1]",
        );
        assert!(bad.unwrap_err().contains("dnsbl[1].codes"));
    }

    #[test]
    fn addresses_reverse_as_lists_expect() {
        assert_eq!(reversed("192.0.2.99".parse().unwrap()), "99.2.0.192");
        assert_eq!(
            reversed("2001:db8::567:89ab".parse().unwrap()),
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
        );
    }

    #[test]
    fn lists_match_networks_names_and_domains() {
        let l = Lists::from_config(
            ListConfig {
                networks: vec!["192.0.2.0/24".into(), "2001:db8::1".into()],
                helo: vec!["*.dynamic.example".into(), "localhost".into()],
                sender_domains: vec!["spam.example".into()],
            },
            "deny",
        )
        .unwrap();
        assert!(l.has_client("192.0.2.200".parse().unwrap()));
        assert!(!l.has_client("192.0.3.1".parse().unwrap()));
        assert!(l.has_client("2001:db8::1".parse().unwrap()));
        assert!(l.has_helo("host-1.Dynamic.example"));
        assert!(!l.has_helo("dynamic.example"));
        assert!(l.has_helo("LOCALHOST"));
        assert!(l.has_sender_domain("spam.example."));
        assert!(!l.has_sender_domain("notspam.example"));
        let e = Lists::from_config(
            ListConfig {
                networks: vec!["nope".into()],
                ..Default::default()
            },
            "allow",
        );
        assert!(e.unwrap_err().contains("allow.networks"));
    }
}
