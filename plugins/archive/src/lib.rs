//! Journals messages at the data hook: every message, or those its rules
//! match, either into the plugin's archive folder (grant `archive`) as the
//! `.eml` with its replay record and authentication results as JSON, in
//! dated folders, fsynced before the hook answers; or by adding a journal
//! recipient (grant `recipients`). See README.md.

mod auth;
mod date;

use std::io::Write;

use postern_sdk::prelude::*;
use postern_sdk::record::{self, Record};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchiveConfig {
    #[serde(default)]
    rules: Vec<Rule>,
    journal: Option<String>,
    #[serde(default)]
    record_metadata: Vec<MetadataKey>,
}

/// A rule: every condition given must hold; a rule without any matches
/// every message.
#[derive(serde::Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct Rule {
    sender: Option<String>,
    recipient: Option<String>,
    domain: Option<String>,
    metadata: Option<MetadataMatch>,
}

#[derive(serde::Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct MetadataMatch {
    plugin: String,
    key: String,
    value: Option<String>,
}

#[derive(serde::Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct MetadataKey {
    plugin: String,
    key: String,
}

/// Where copies go.
enum Target {
    /// `/archive/YYYY/MM/DD/<id>.{eml,json,auth.json}`.
    Folder,
    /// An added envelope recipient.
    Journal(Address),
}

struct Archive {
    rules: Vec<Rule>,
    target: Target,
    record_metadata: Vec<MetadataKey>,
}

/// The facts rules look at.
struct Facts<'a> {
    sender: String,
    recipients: Vec<String>,
    metadata: &'a dyn Fn(&str, &str) -> Option<String>,
}

fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

impl Rule {
    fn matches(&self, f: &Facts<'_>) -> bool {
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        self.sender.as_deref().is_none_or(|s| eq(s, &f.sender))
            && self
                .recipient
                .as_deref()
                .is_none_or(|r| f.recipients.iter().any(|x| eq(r, x)))
            && self.domain.as_deref().is_none_or(|d| {
                eq(d, domain_of(&f.sender)) || f.recipients.iter().any(|x| eq(d, domain_of(x)))
            })
            && self.metadata.as_ref().is_none_or(|m| {
                let got = (f.metadata)(&m.plugin, &m.key);
                match &m.value {
                    Some(v) => got.as_deref() == Some(v.as_str()),
                    None => got.is_some(),
                }
            })
    }
}

impl Archive {
    fn wants(&self, f: &Facts<'_>) -> bool {
        self.rules.is_empty() || self.rules.iter().any(|r| r.matches(f))
    }
}

/// The replay record of the transaction, as `postern plugin test` reads it.
fn record_of(
    session: &Session,
    envelope: &Envelope,
    keys: &[MetadataKey],
    received: u64,
) -> Record {
    let s: &postern_sdk::SessionInfo = session;
    let params = &envelope.params;
    let mut metadata = std::collections::BTreeMap::new();
    for k in keys {
        if let Some(v) = metadata::get_from(&k.plugin, Scope::Transaction, &k.key) {
            metadata
                .entry(k.plugin.clone())
                .or_insert_with(std::collections::BTreeMap::new)
                .insert(k.key.clone(), v);
        }
    }
    Record {
        version: 1,
        id: postern_sdk::queue_id(),
        received: Some(received),
        client: Some(record::Client {
            peer: s.peer().to_string(),
            local: s.local().to_string(),
            helo: s.helo.clone(),
            tls: s.tls.as_ref().map(|t| record::Tls {
                version: t.version.clone(),
                cipher: t.cipher.clone(),
            }),
            auth_user: s.auth_user.clone(),
            may_relay: s.may_relay,
        }),
        envelope: record::Envelope {
            sender: envelope.sender.to_string(),
            params: record::Params {
                size: params.size,
                body: match params.body {
                    postern_sdk::BodyType::SevenBit => "sevenbit".into(),
                    postern_sdk::BodyType::EightBitMime => "eightbitmime".into(),
                },
                smtputf8: params.smtputf8,
                ret: None,
                envid: params.envid.clone(),
            },
            recipients: envelope
                .recipients
                .iter()
                .map(|r| record::RecipientRecord {
                    address: r.to_string(),
                    orcpt: None,
                    notify: None,
                })
                .collect(),
        },
        metadata,
    }
}

/// Writes `bytes` to `path` and waits until they are on disk.
fn write_synced(
    path: &str,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    fill(&mut f)?;
    f.flush()?;
    f.sync_all()
}

/// Makes the folder's new entries durable; where the file system cannot
/// sync a folder opened this way, the files' own syncs are what there is.
fn sync_dir(path: &str) {
    if let Ok(d) = std::fs::File::open(path) {
        let _ = d.sync_all();
    }
}

/// A file name from the queue id, or the time and size when there is none
/// (`postern plugin test`).
fn base_name(message: &Message, now_nanos: u128) -> String {
    match postern_sdk::queue_id() {
        Some(id) if id.chars().all(|c| c.is_ascii_alphanumeric()) => id,
        _ => format!("{now_nanos}-{}", message.size()),
    }
}

#[postern_sdk::plugin]
impl Plugin for Archive {
    fn init(config: Config) -> Result<Self, ConfigError> {
        let c: ArchiveConfig = config.parse()?;
        let target = match c.journal {
            Some(j) => Target::Journal(
                Address::parse(&j)
                    .filter(|a| !a.is_null())
                    .ok_or_else(|| ConfigError::new(format!("journal: {j:?} is not an address")))?,
            ),
            None => {
                if !std::path::Path::new("/archive").is_dir() {
                    return Err(ConfigError::new(
                        "no /archive folder: grant \"archive\" to this plugin (or give a journal address)",
                    ));
                }
                Target::Folder
            }
        };
        Ok(Archive {
            rules: c.rules,
            target,
            record_metadata: c.record_metadata,
        })
    }

    fn data(&self, session: &Session, envelope: &Envelope, message: &Message) -> Verdict {
        let lookup = |plugin: &str, key: &str| metadata::get_from(plugin, Scope::Transaction, key);
        let facts = Facts {
            sender: envelope.sender.to_string(),
            recipients: envelope.recipients.iter().map(|r| r.to_string()).collect(),
            metadata: &lookup,
        };
        if !self.wants(&facts) {
            return Verdict::Continue;
        }
        match &self.target {
            Target::Journal(to) => {
                // The original envelope (Bcc recipients included) goes into
                // the message's record, not into a header every recipient
                // would see.
                let env = serde_json::json!({
                    "sender": facts.sender,
                    "recipients": facts.recipients,
                });
                let _ = metadata::set(Scope::Transaction, "envelope", &env.to_string());
                match message.add_recipient(to) {
                    Ok(()) => Verdict::Continue,
                    Err(_) => Verdict::tempfail(451, "4.3.0", "journal recipient refused"),
                }
            }
            Target::Folder => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let (y, m, d) = date::civil(now.as_secs());
                let dir = format!("/archive/{y:04}/{m:02}/{d:02}");
                let base = format!("{dir}/{}", base_name(message, now.as_nanos()));
                let record = record_of(session, envelope, &self.record_metadata, now.as_secs());
                let results = auth::parse_all(&message.header("Authentication-Results"));
                let written = std::fs::create_dir_all(&dir)
                    .and_then(|()| {
                        write_synced(&format!("{base}.json"), |f| {
                            f.write_all(record.to_json().as_bytes())
                        })
                    })
                    .and_then(|()| {
                        write_synced(&format!("{base}.auth.json"), |f| {
                            f.write_all(results.to_string().as_bytes())
                        })
                    })
                    .and_then(|()| {
                        write_synced(&format!("{base}.eml"), |f| {
                            std::io::copy(&mut message.raw_reader(), f).map(|_| ())
                        })
                    });
                match written {
                    Ok(()) => {
                        sync_dir(&dir);
                        Verdict::Continue
                    }
                    // Not archived means not accepted: the client will retry.
                    Err(_) => Verdict::tempfail(451, "4.3.0", "archive unavailable"),
                }
            }
        }
    }
}

postern_sdk::export!(Archive);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_sender_recipient_domain_and_metadata() {
        let meta =
            |p: &str, k: &str| (p == "compliance" && k == "matched").then(|| "cards".to_string());
        let facts = Facts {
            sender: "jo@corp.example".into(),
            recipients: vec!["ann@partner.example".into(), "bo@corp.example".into()],
            metadata: &meta,
        };
        let rule = |json: &str| -> Rule { serde_json::from_str(json).unwrap() };
        for (json, matches) in [
            (r#"{}"#, true),
            (r#"{"sender":"JO@corp.example"}"#, true),
            (r#"{"sender":"ann@partner.example"}"#, false),
            (r#"{"recipient":"ann@partner.example"}"#, true),
            (r#"{"domain":"partner.example"}"#, true),
            (r#"{"domain":"corp.example"}"#, true),
            (r#"{"domain":"other.example"}"#, false),
            (
                r#"{"metadata":{"plugin":"compliance","key":"matched","value":"cards"}}"#,
                true,
            ),
            (
                r#"{"metadata":{"plugin":"compliance","key":"matched"}}"#,
                true,
            ),
            (
                r#"{"metadata":{"plugin":"compliance","key":"matched","value":"ibans"}}"#,
                false,
            ),
            (
                r#"{"sender":"jo@corp.example","domain":"other.example"}"#,
                false,
            ),
        ] {
            assert_eq!(rule(json).matches(&facts), matches, "{json}");
        }
        let archive = Archive {
            rules: vec![],
            target: Target::Folder,
            record_metadata: vec![],
        };
        assert!(archive.wants(&facts), "no rules: every message");
        assert!(serde_json::from_str::<Rule>(r#"{"colour":"red"}"#).is_err());
    }
}
