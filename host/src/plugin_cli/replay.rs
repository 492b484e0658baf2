//! `postern plugin test`: transactions replayed through a plugin's hooks
//! without a relay, in the order a relay calls them (connect, helo,
//! mail-from, rcpt per recipient, data, route per recipient), with the
//! session and transaction metadata carried from hook to hook as the relay
//! carries it. `--against` replays the same transactions through an older
//! version and shows where the two answer differently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};

use postern::authn::header::{body_start, header_end};
use postern::authn::Results;
use postern::config::{Config, Grant, HookName};
use postern::envelope::{Address, Envelope, MailParams, Recipient, SessionInfo};
use postern::metadata::SharedMetadata;
use postern::plugins::{ChainHandle, Lease, Runtime, Scopes};
use postern::policy::{DataTransaction, Queued, RouteQuery};
use postern::queue::QueueId;
use postern::record::{Record, RECORD_VERSION};

use super::{scratch_config, RelayEntry};

/// One transaction to replay: the message and its record.
#[derive(Debug)]
pub struct Transaction {
    /// What the table calls it (the file name).
    pub name: String,
    /// The message, CRLF line ends.
    pub message: Vec<u8>,
    /// Session facts, envelope, metadata.
    pub record: Record,
}

/// The session a replay uses when the record has none.
fn default_client() -> SessionInfo {
    SessionInfo {
        peer: ([127, 0, 0, 1], 50000).into(),
        local: ([127, 0, 0, 1], 25).into(),
        helo: Some("client.test".into()),
        tls: None,
        auth_user: None,
        may_relay: true,
    }
}

fn read_message(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&raw)
        .replace("\r\n", "\n")
        .replace('\n', "\r\n")
        .into_bytes())
}

/// A record of `envelope` from the default session, without metadata.
fn record_of(envelope: Envelope) -> Record {
    Record {
        version: RECORD_VERSION,
        id: None,
        received: None,
        client: Some(default_client()),
        envelope,
        metadata: Default::default(),
    }
}

impl Transaction {
    /// One message with the envelope given on the command line.
    pub fn given(message: &Path, from: &str, to: &[String]) -> anyhow::Result<Transaction> {
        let mut envelope = Envelope::new(Address(from.to_string()), MailParams::default());
        envelope.recipients = to.iter().map(|t| Recipient::new(t.clone())).collect();
        Ok(Transaction {
            name: message.display().to_string(),
            message: read_message(message)?,
            record: record_of(envelope),
        })
    }

    /// Every `.eml` in `folder`, by name, each with the record in the
    /// `.json` of the same name, or an envelope from its From, To and Cc.
    pub fn folder(folder: &Path) -> anyhow::Result<Vec<Transaction>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .with_context(|| format!("reading {}", folder.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no .eml files in {}", folder.display());
        }
        files
            .iter()
            .map(|path| {
                let message = read_message(path)?;
                let json = path.with_extension("json");
                let record = if json.exists() {
                    let text = std::fs::read_to_string(&json)?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: not a transaction record", json.display()))?
                } else {
                    record_from_headers(&message).with_context(|| {
                        format!(
                            "{}: no record beside it, and no From/To to make an envelope of",
                            path.display()
                        )
                    })?
                };
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok(Transaction {
                    name,
                    message,
                    record,
                })
            })
            .collect()
    }
}

/// An envelope from the message's From (sender) and To and Cc (recipients).
fn record_from_headers(message: &[u8]) -> Option<Record> {
    let parsed = mail_parser::MessageParser::default().parse_headers(message)?;
    let addresses = |a: Option<&mail_parser::Address>| -> Vec<String> {
        a.map(|a| {
            a.iter()
                .filter_map(|a| a.address.as_deref().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
    };
    let sender = addresses(parsed.from()).into_iter().next()?;
    let mut envelope = Envelope::new(Address(sender), MailParams::default());
    for to in addresses(parsed.to())
        .into_iter()
        .chain(addresses(parsed.cc()))
    {
        envelope.recipients.push(Recipient::new(to));
    }
    if envelope.recipients.is_empty() {
        return None;
    }
    Some(record_of(envelope))
}

/// What one version answered to one transaction, per hook, and the
/// transaction as the data hook left it.
struct Answers {
    /// By hook, one entry per call (per recipient at rcpt and route).
    calls: BTreeMap<HookName, Vec<String>>,
    data: Option<DataTransaction>,
    metadata: postern::metadata::Metadata,
}

impl Answers {
    /// The table cell for a hook: its answer, or each recipient's when they
    /// differ.
    fn cell(&self, hook: HookName) -> String {
        let Some(calls) = self.calls.get(&hook) else {
            return "-".into();
        };
        match calls.as_slice() {
            [] => "-".into(),
            [one] => strip_recipient(one).to_string(),
            [first, rest @ ..]
                if rest
                    .iter()
                    .all(|c| strip_recipient(c) == strip_recipient(first)) =>
            {
                strip_recipient(first).to_string()
            }
            all => all.join("; "),
        }
    }
}

/// `<rcpt> answer` to `answer`.
fn strip_recipient(call: &str) -> &str {
    match call.strip_prefix('<') {
        Some(rest) => rest.split_once("> ").map(|(_, a)| a).unwrap_or(call),
        None => call,
    }
}

/// Runs one transaction through a chain, hook by hook, as a relay would:
/// a refusal ends the transaction where a relay would end it.
async fn replay(lease: &mut Lease, t: &Transaction, limit: usize) -> Answers {
    let mut calls: BTreeMap<HookName, Vec<String>> = BTreeMap::new();
    let mut note = |hook: HookName, answer: String| calls.entry(hook).or_default().push(answer);
    let record = &t.record;
    let mut session = record.client.clone().unwrap_or_else(default_client);
    let scopes = Scopes {
        session: Some(SharedMetadata::new(limit)),
        transaction: None,
    };
    let done = |calls, metadata| Answers {
        calls,
        data: None,
        metadata,
    };
    let v = lease.connect(&session, &scopes).await;
    note(HookName::Connect, v.to_string());
    if !v.lets_through() {
        return done(calls, Default::default());
    }
    if session.helo.is_none() {
        session.helo = default_client().helo;
    }
    let v = lease.helo(&session, &scopes).await;
    note(HookName::Helo, v.to_string());
    if !v.lets_through() {
        return done(calls, Default::default());
    }
    // The record's metadata stands for what the other plugins of the chain
    // left: this plugin reads it with `get-from`.
    let scopes = Scopes {
        transaction: Some(SharedMetadata::from_values(
            (*record.metadata).clone(),
            limit,
        )),
        ..scopes
    };
    let mut envelope = Envelope::new(
        record.envelope.sender.clone(),
        record.envelope.params.clone(),
    );
    let v = lease
        .mail_from(&session, &envelope, &Results::default(), &scopes)
        .await;
    note(HookName::MailFrom, v.to_string());
    if !v.lets_through() {
        lease.end();
        return done(calls, Default::default());
    }
    for rcpt in &record.envelope.recipients {
        let v = lease
            .rcpt(&session, &envelope, rcpt, &Results::default(), &scopes)
            .await;
        note(HookName::Rcpt, format!("<{}> {v}", rcpt.address));
        if v.lets_through() {
            envelope.recipients.push(rcpt.clone());
        }
    }
    if envelope.recipients.is_empty() {
        lease.end();
        return done(calls, Default::default());
    }
    let mut tx = DataTransaction::new(envelope, t.message.clone());
    let id = QueueId::generate();
    let v = lease.data(&session, &mut tx, &scopes, &id).await;
    lease.end();
    note(HookName::Data, v.to_string());
    let metadata = scopes
        .transaction
        .as_ref()
        .map(SharedMetadata::snapshot)
        .unwrap_or_default();
    if !v.lets_through() {
        return done(calls, metadata);
    }
    let stored = Arc::new(metadata.clone());
    let end = body_start(&tx.message);
    for rcpt in &tx.envelope.recipients {
        let r = lease
            .route(RouteQuery {
                queued: Queued {
                    id: &id,
                    envelope: &tx.envelope,
                    client: Some(&session),
                    metadata: &stored,
                },
                recipient: rcpt,
                headers: &tx.message[..end],
            })
            .await;
        note(HookName::Route, format!("<{}> {r}", rcpt.address));
    }
    lease.end();
    Answers {
        calls,
        data: Some(tx),
        metadata,
    }
}

/// A chain of one plugin, `file`, as the relay config's entry for it says
/// (`entry`) or with every grant and an empty config.
async fn load(
    dir: &Path,
    file: &Path,
    entry: Option<&RelayEntry>,
) -> anyhow::Result<(Arc<ChainHandle>, Config)> {
    let grants = [Grant::Log, Grant::Kv, Grant::Dns, Grant::Archive];
    let config = scratch_config(dir, file, entry, &grants)?;
    let runtime = Runtime::new(&config)?;
    let chain = runtime
        .load_chain(&config)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok((Arc::new(ChainHandle::new(chain)), config))
}

/// Replays `transactions` through `file` (and `against`, when given) and
/// prints the answers. Returns whether the two versions differed.
pub async fn run(
    file: &Path,
    against: Option<&Path>,
    config: Option<&Path>,
    transactions: &[Transaction],
    detailed: bool,
) -> anyhow::Result<bool> {
    let dir = tempfile::tempdir()?;
    let entry = config.map(|c| RelayEntry::load(c, file)).transpose()?;
    let (new, scratch) = load(&dir.path().join("new"), file, entry.as_ref()).await?;
    let limit = scratch.plugins.max_metadata_size;
    let old = match against {
        Some(old) => {
            // The old file's own entry when the config has one, else the new one's.
            let entry = match (config, &entry) {
                (Some(c), Some(e)) => Some(RelayEntry::load(c, old).or_else(|_| e.with_file(old))?),
                _ => None,
            };
            Some(load(&dir.path().join("old"), old, entry.as_ref()).await?.0)
        }
        None => None,
    };
    let hooks = handled(&new, old.as_deref());
    let mut rows = Vec::new();
    let mut differ = 0;
    for t in transactions {
        let answers = replay(&mut new.current().lease(), t, limit).await;
        if detailed {
            print_detailed(&answers);
        }
        match &old {
            None => rows.push((t.name.clone(), answers, None)),
            Some(old) => {
                let before = replay(&mut old.current().lease(), t, limit).await;
                if hooks
                    .iter()
                    .any(|h| answers.calls.get(h) != before.calls.get(h))
                {
                    differ += 1;
                    rows.push((t.name.clone(), answers, Some(before)));
                }
            }
        }
    }
    if !detailed || old.is_some() {
        print_table(&hooks, &rows, old.is_some());
    }
    if old.is_some() {
        println!(
            "{differ} of {} transaction(s) answered differently",
            transactions.len()
        );
    }
    for p in new.current().plugins() {
        for h in p.stats.snapshot() {
            if !h.errors.is_empty() {
                println!("errors at {}: {:?}", h.hook, h.errors);
            }
        }
    }
    Ok(differ > 0)
}

/// The hooks either version handles, in the order a relay calls them.
fn handled(new: &ChainHandle, old: Option<&ChainHandle>) -> Vec<HookName> {
    const ORDER: [HookName; 6] = [
        HookName::Connect,
        HookName::Helo,
        HookName::MailFrom,
        HookName::Rcpt,
        HookName::Data,
        HookName::Route,
    ];
    ORDER
        .into_iter()
        .filter(|h| new.current().handles(*h) || old.is_some_and(|o| o.current().handles(*h)))
        .collect()
}

/// The answers of one transaction, a line per call, as the single-message
/// form prints them.
fn print_detailed(a: &Answers) {
    let label = |hook: HookName| format!("{}:", hook.as_str());
    for hook in [HookName::Connect, HookName::Helo, HookName::MailFrom] {
        for c in a.calls.get(&hook).into_iter().flatten() {
            println!("{:<10} {c}", label(hook));
        }
    }
    for c in a.calls.get(&HookName::Rcpt).into_iter().flatten() {
        let (rcpt, answer) = split_recipient(c);
        println!("rcpt {rcpt}: {answer}");
    }
    for c in a.calls.get(&HookName::Data).into_iter().flatten() {
        println!("{:<10} {c}", label(HookName::Data));
    }
    if let Some(tx) = &a.data {
        let recipients: Vec<&str> = tx
            .envelope
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        println!("  recipients: {}", recipients.join(", "));
        if let Some(q) = &tx.quarantine {
            println!("  quarantined: {q}");
        }
        let section = &tx.message[..header_end(&tx.message)];
        let section = section.strip_suffix(b"\r\n").unwrap_or(section);
        println!(
            "  headers:\n    {}",
            String::from_utf8_lossy(section).replace("\r\n", "\n    ")
        );
    }
    for (plugin, key, value) in a.metadata.iter() {
        println!("  metadata {plugin}.{key} = {}", value.escape_debug());
    }
    for c in a.calls.get(&HookName::Route).into_iter().flatten() {
        let (rcpt, answer) = split_recipient(c);
        println!("route {rcpt}: {answer}");
    }
}

fn split_recipient(call: &str) -> (&str, &str) {
    call.strip_prefix('<')
        .and_then(|rest| rest.split_once("> "))
        .unwrap_or(("", call))
}

/// One row per transaction (two with `--against`: the new answers, then the
/// old ones), a column per hook.
fn print_table(hooks: &[HookName], rows: &[(String, Answers, Option<Answers>)], against: bool) {
    let mut table: Vec<Vec<String>> = vec![std::iter::once("message".to_string())
        .chain(hooks.iter().map(|h| h.as_str().to_string()))
        .collect()];
    for (name, new, old) in rows {
        let label = if against {
            format!("{name} (new)")
        } else {
            name.clone()
        };
        table.push(
            std::iter::once(label)
                .chain(hooks.iter().map(|h| new.cell(*h)))
                .collect(),
        );
        if let Some(old) = old {
            table.push(
                std::iter::once(format!("{name} (old)"))
                    .chain(hooks.iter().map(|h| old.cell(*h)))
                    .collect(),
            );
        }
    }
    let columns = hooks.len() + 1;
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
