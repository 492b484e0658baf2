//! Aliases, domain rewrites and catch-alls, with SRS for mail forwarded to
//! domains the relay does not serve. See README.md.

mod srs;

use std::collections::{BTreeMap, BTreeSet};

use postern_sdk::prelude::*;
use srs::Srs;

/// Where an alias goes: one address or several.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Targets {
    One(String),
    Many(Vec<String>),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SrsConfig {
    domain: String,
    secrets: Vec<String>,
    #[serde(default = "default_age")]
    max_age_days: u64,
    #[serde(default = "default_hash")]
    hash_length: usize,
}

fn default_age() -> u64 {
    21
}

fn default_hash() -> usize {
    4
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardConfig {
    #[serde(default)]
    local_domains: Vec<String>,
    #[serde(default)]
    aliases: BTreeMap<String, Targets>,
    #[serde(default)]
    domain_aliases: BTreeMap<String, String>,
    #[serde(default)]
    catch_all: BTreeMap<String, String>,
    #[serde(default)]
    srs: Option<SrsConfig>,
}

struct Forward {
    /// Lowercase domains whose mail is delivered here: forwarding within
    /// them needs no SRS.
    local_domains: BTreeSet<String>,
    /// Lowercase address to targets.
    aliases: BTreeMap<String, Vec<String>>,
    domain_aliases: BTreeMap<String, String>,
    catch_all: BTreeMap<String, String>,
    srs: Option<Srs>,
}

/// Metadata key listing the recipients this plugin forwarded (comma
/// separated), which get an SRS sender at route.
const FORWARDED: &str = "forwarded";
/// Longest alias chain followed.
const MAX_DEPTH: usize = 10;

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// Today, days since the epoch (the SRS timestamp's unit).
fn today() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0)
}

impl Forward {
    fn from_config(c: ForwardConfig) -> Result<Forward, String> {
        let aliases: BTreeMap<String, Vec<String>> = c
            .aliases
            .into_iter()
            .map(|(k, v)| {
                let targets = match v {
                    Targets::One(t) => vec![t],
                    Targets::Many(ts) => ts,
                };
                (lower(&k), targets)
            })
            .collect();
        for (alias, targets) in &aliases {
            if targets.is_empty() {
                return Err(format!("aliases.{alias}: no target"));
            }
            for t in targets {
                if Address::parse(t).is_none_or(|a| a.is_null()) {
                    return Err(format!("aliases.{alias}: {t:?} is not an address"));
                }
            }
        }
        let srs = match c.srs {
            Some(s) if s.secrets.is_empty() || s.secrets.iter().any(String::is_empty) => {
                return Err("srs.secrets: at least one, none empty".into())
            }
            Some(s) if !(1..=27).contains(&s.hash_length) => {
                return Err("srs.hash_length: 1 to 27".into())
            }
            Some(s) => Some(Srs {
                domain: lower(&s.domain),
                secrets: s.secrets,
                max_age_days: s.max_age_days,
                hash_length: s.hash_length,
            }),
            None => None,
        };
        let f = Forward {
            local_domains: c.local_domains.iter().map(|d| lower(d)).collect(),
            aliases,
            domain_aliases: c
                .domain_aliases
                .into_iter()
                .map(|(k, v)| (lower(&k), lower(&v)))
                .collect(),
            catch_all: c
                .catch_all
                .into_iter()
                .map(|(k, v)| (lower(&k), v))
                .collect(),
            srs,
        };
        // A loop would forward a message to itself until its hop count ran out.
        for alias in f.aliases.keys() {
            f.expand(alias).map_err(|e| format!("aliases: {e}"))?;
        }
        for from in f.domain_aliases.keys() {
            f.expand(&format!("x@{from}"))
                .map_err(|e| format!("domain_aliases: {e}"))?;
        }
        Ok(f)
    }

    /// One step: the targets `address` is forwarded to, if it is.
    fn step(&self, address: &str) -> Option<Vec<String>> {
        let key = lower(address);
        if let Some(t) = self.aliases.get(&key) {
            return Some(t.clone());
        }
        let (local, domain) = address.rsplit_once('@')?;
        if let Some(to) = self.domain_aliases.get(&lower(domain)) {
            return Some(vec![format!("{local}@{to}")]);
        }
        self.catch_all.get(&lower(domain)).map(|t| vec![t.clone()])
    }

    /// Where `address` ends up, following aliases to the end; `None` when
    /// it is not forwarded. Refuses a loop.
    fn expand(&self, address: &str) -> Result<Option<Vec<String>>, String> {
        let Some(first) = self.step(address) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        // A stack, pushed in reverse so targets come out in config order.
        let mut todo: Vec<(String, Vec<String>)> = first
            .into_iter()
            .rev()
            .map(|t| (t, vec![lower(address)]))
            .collect();
        while let Some((t, path)) = todo.pop() {
            if path.contains(&lower(&t)) {
                return Err(format!("{} loops back to {t}", path.join(" -> ")));
            }
            if path.len() > MAX_DEPTH {
                return Err(format!("{} is longer than {MAX_DEPTH}", path.join(" -> ")));
            }
            // A catch-all's target is final: an address of its own domain
            // would otherwise be caught again.
            match self.aliases.get(&lower(&t)).cloned().or_else(|| {
                let (local, domain) = t.rsplit_once('@')?;
                self.domain_aliases
                    .get(&lower(domain))
                    .map(|to| vec![format!("{local}@{to}")])
            }) {
                Some(next) => {
                    let mut path = path;
                    path.push(lower(&t));
                    todo.extend(next.into_iter().rev().map(|n| (n, path.clone())));
                }
                None => {
                    if !out.iter().any(|o: &String| o.eq_ignore_ascii_case(&t)) {
                        out.push(t);
                    }
                }
            }
        }
        Ok(Some(out))
    }

    fn is_local(&self, address: &str) -> bool {
        self.local_domains.contains(&lower(domain_of(address)))
    }

    /// Is `rcpt` one of ours in SRS form; then where it goes back to.
    fn srs_reverse(&self, rcpt: &Address) -> Option<Result<String, srs::Invalid>> {
        let srs = self.srs.as_ref()?;
        if !rcpt.domain().eq_ignore_ascii_case(&srs.domain) || !Srs::looks_like(rcpt.local_part()) {
            return None;
        }
        Some(srs.reverse(rcpt.local_part(), today()))
    }
}

#[postern_sdk::plugin]
impl Plugin for Forward {
    fn init(config: Config) -> Result<Self, ConfigError> {
        Forward::from_config(config.parse()?).map_err(ConfigError)
    }

    /// A forged or expired SRS address of ours is refused at once.
    fn rcpt(&self, _session: &Session, rcpt: &Recipient) -> Verdict {
        match self.srs_reverse(rcpt) {
            Some(Err(srs::Invalid::Expired)) => {
                Verdict::reject(550, "5.1.1", "expired forwarding address")
            }
            Some(Err(_)) => Verdict::reject(550, "5.1.1", "invalid forwarding address"),
            _ => Verdict::Continue,
        }
    }

    /// Each forwarded recipient is replaced by its targets (ORCPT keeps what
    /// the sender wrote); an SRS address goes back to the address it stands
    /// for. A message that already passed here for a recipient is a loop.
    fn data(&self, _session: &Session, _envelope: &Envelope, message: &Message) -> Verdict {
        let delivered_to: Vec<String> = message
            .header("Delivered-To")
            .iter()
            .map(|v| lower(v.trim().trim_matches(['<', '>'])))
            .collect();
        let mut forwarded = Vec::new();
        for rcpt in message.recipients() {
            let address = rcpt.to_string();
            let targets = match self.srs_reverse(&rcpt) {
                Some(Ok(back)) => vec![back],
                // Refused at RCPT already; a plugin before this one may
                // have added it: left as is.
                Some(Err(_)) => continue,
                None => match self.expand(&address) {
                    Ok(Some(t)) => t,
                    Ok(None) | Err(_) => continue,
                },
            };
            if delivered_to.contains(&lower(&address)) {
                return Verdict::reject(
                    554,
                    "5.4.6",
                    &format!("mail forwarding loop for {address}"),
                );
            }
            let by: Vec<Address> = targets.iter().filter_map(|t| Address::parse(t)).collect();
            if message.replace_recipient(&rcpt, &by).is_err()
                || message.add_header("Delivered-To", &address).is_err()
            {
                return Verdict::tempfail(451, "4.3.0", "forwarding failed; try again later");
            }
            if self.srs.is_some() && self.srs_reverse(&rcpt).is_none() {
                forwarded.extend(targets.into_iter().filter(|t| !self.is_local(t)));
            }
        }
        if !forwarded.is_empty() {
            // The route hook rewrites these recipients' sender.
            let _ = metadata::set(Scope::Transaction, FORWARDED, &forwarded.join(","));
        }
        Verdict::Continue
    }

    /// A recipient forwarded outside the local domains leaves with an SRS
    /// sender; where it goes is left to the routes after this plugin.
    fn route(&self, envelope: &Envelope, rcpt: &Recipient, _headers: &Headers) -> Routing {
        let (Some(srs), false) = (&self.srs, envelope.sender.is_null()) else {
            return Route::Default.into();
        };
        let forwarded = metadata::get(Scope::Transaction, FORWARDED).unwrap_or_default();
        let this = rcpt.to_string();
        if !forwarded.split(',').any(|f| f.eq_ignore_ascii_case(&this)) {
            return Route::Default.into();
        }
        match srs
            .forward(&envelope.sender.to_string(), today())
            .as_deref()
            .and_then(Address::parse)
        {
            Some(sender) => Route::Default.with_sender(sender),
            None => Route::Default.into(),
        }
    }
}

postern_sdk::export!(Forward);

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(json: &str) -> Result<Forward, String> {
        Forward::from_config(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn aliases_domains_and_catch_alls_expand() {
        let f = forward(
            r#"{"aliases": {"Info@Example.com": ["ann@example.com", "team@example.com"],
                            "team@example.com": ["bob@partner.test", "ann@example.com"]},
                "domain_aliases": {"old.example": "example.com"},
                "catch_all": {"example.net": "postmaster@example.com"}}"#,
        )
        .unwrap();
        assert_eq!(
            f.expand("info@example.com").unwrap(),
            Some(vec!["ann@example.com".into(), "bob@partner.test".into()])
        );
        assert_eq!(
            f.expand("jo@old.example").unwrap(),
            Some(vec!["jo@example.com".into()])
        );
        assert_eq!(
            f.expand("anyone@example.net").unwrap(),
            Some(vec!["postmaster@example.com".into()])
        );
        assert_eq!(f.expand("ann@example.com").unwrap(), None);
    }

    #[test]
    fn loops_refuse_the_config() {
        for json in [
            r#"{"aliases": {"a@x.test": "b@x.test", "b@x.test": "a@x.test"}}"#,
            r#"{"aliases": {"a@x.test": ["c@x.test", "a@x.test"]}}"#,
            r#"{"domain_aliases": {"one.test": "two.test", "two.test": "one.test"}}"#,
        ] {
            let e = forward(json).err().unwrap();
            assert!(e.contains("loops back"), "{json}: {e}");
        }
        let e = forward(r#"{"aliases": {"a@x.test": []}}"#).err().unwrap();
        assert!(e.contains("no target"), "{e}");
        let e = forward(r#"{"srs": {"domain": "f.test", "secrets": []}}"#)
            .err()
            .unwrap();
        assert!(e.contains("srs.secrets"), "{e}");
    }
}
