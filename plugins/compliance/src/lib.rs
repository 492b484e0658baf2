//! Compliance rules at the data hook: data-loss detectors over the decoded
//! text of every part, an attachment policy (file types, double
//! extensions, content signatures, zip archives and what is in them,
//! encrypted archives, size), disclaimer footers, and internal headers
//! removed. Rules run in order; see README.md.

mod dlp;
mod files;

use postern_sdk::bindings::postern::relay::message::BodyError;
use postern_sdk::prelude::*;
use postern_sdk::Part;

use dlp::Detector;
use files::Kind;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ComplianceConfig {
    #[serde(default)]
    rules: Vec<RuleConfig>,
    #[serde(default)]
    remove_headers: Vec<String>,
}

/// A rule as written.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    name: String,
    action: String,
    #[serde(default)]
    sender_domains: Vec<String>,
    data: Option<String>,
    pattern: Option<String>,
    min_count: Option<u32>,
    extensions: Option<Vec<String>>,
    double_extensions: Option<bool>,
    signatures: Option<Vec<String>>,
    archives: Option<bool>,
    encrypted_archives: Option<bool>,
    max_size: Option<u64>,
    reply: Option<String>,
    header: Option<String>,
    value: Option<String>,
    text: Option<String>,
    html: Option<String>,
}

/// What a rule looks at.
#[derive(Debug)]
enum Condition {
    /// Every message (of the rule's senders).
    Always,
    /// At least `min_count` matches of a detector over the text parts.
    Data { detector: Detector, min_count: u32 },
    /// Attachments that fail the test.
    Attachments(AttachmentTest),
}

/// Attachment checks; an attachment matches when any of them holds.
#[derive(Debug, Default)]
struct AttachmentTest {
    extensions: Vec<String>,
    double_extensions: bool,
    signatures: Vec<Kind>,
    /// Apply the name and signature checks to the entries of zip archives.
    archives: bool,
    /// Zip archives with an encrypted entry, or that cannot be read.
    encrypted_archives: bool,
    max_size: Option<u64>,
}

#[derive(Debug)]
enum Action {
    Reject(String),
    Quarantine,
    Tag { header: String, value: String },
    Strip,
    Footer { text: String, html: String },
}

#[derive(Debug)]
struct Rule {
    name: String,
    senders: Vec<String>,
    condition: Condition,
    action: Action,
}

struct Compliance {
    rules: Vec<Rule>,
    remove_headers: Vec<String>,
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Rule {
    fn from_config(c: RuleConfig) -> Result<Rule, String> {
        let name = c.name.clone();
        if name.is_empty() {
            return Err("a rule needs a name".into());
        }
        let attachment_keys = c.extensions.is_some()
            || c.double_extensions.is_some()
            || c.signatures.is_some()
            || c.encrypted_archives.is_some()
            || c.max_size.is_some()
            || c.archives.is_some();
        let data_keys = c.data.is_some() || c.pattern.is_some() || c.min_count.is_some();
        if attachment_keys && data_keys {
            return Err("mixes data-loss keys (data, pattern, min_count) with attachment keys; make two rules".into());
        }
        let condition = if data_keys {
            let detector = match (c.data.as_deref(), &c.pattern) {
                (Some("cards"), None) => Detector::Cards,
                (Some("ibans"), None) => Detector::Iban,
                (None, Some(p)) => Detector::Pattern(
                    regex::bytes::Regex::new(p).map_err(|e| format!("pattern: {e}"))?,
                ),
                (Some(other), None) => {
                    return Err(format!("data = {other:?}: expected \"cards\" or \"ibans\""))
                }
                (Some(_), Some(_)) => return Err("give data or pattern, not both".into()),
                (None, None) => return Err("min_count needs data or pattern".into()),
            };
            let min_count = c.min_count.unwrap_or(1);
            if min_count == 0 {
                return Err("min_count must be at least 1".into());
            }
            Condition::Data {
                detector,
                min_count,
            }
        } else if attachment_keys {
            let mut signatures = Vec::new();
            for s in c.signatures.unwrap_or_default() {
                signatures.push(Kind::parse(&s).ok_or_else(|| {
                    format!(
                        "signatures: {s:?} is not one of pe, elf, macho, script, office-macro, zip"
                    )
                })?);
            }
            let mut extensions = Vec::new();
            for e in c.extensions.unwrap_or_default() {
                if e == "executables" {
                    extensions.extend(files::EXECUTABLE_EXTENSIONS.iter().map(|x| x.to_string()));
                } else {
                    extensions.push(e.trim_start_matches('.').to_ascii_lowercase());
                }
            }
            Condition::Attachments(AttachmentTest {
                extensions,
                double_extensions: c.double_extensions.unwrap_or(false),
                signatures,
                archives: c.archives.unwrap_or(true),
                encrypted_archives: c.encrypted_archives.unwrap_or(false),
                max_size: c.max_size,
            })
        } else {
            Condition::Always
        };
        let action = match c.action.as_str() {
            "reject" => Action::Reject(
                c.reply
                    .unwrap_or_else(|| format!("message refused by policy ({name})")),
            ),
            "quarantine" => Action::Quarantine,
            "tag" => Action::Tag {
                header: c.header.unwrap_or_else(|| "X-Compliance".into()),
                value: c.value.unwrap_or_else(|| name.clone()),
            },
            "strip" => {
                if matches!(condition, Condition::Always) {
                    return Err("strip needs data-loss or attachment keys to say what".into());
                }
                Action::Strip
            }
            "footer" => {
                let text = c.text.ok_or("footer needs text")?;
                let html = c
                    .html
                    .unwrap_or_else(|| format!("<p>{}</p>", escape_html(&text)));
                Action::Footer { text, html }
            }
            other => {
                return Err(format!(
                    "action {other:?}: expected reject, quarantine, tag, strip or footer"
                ))
            }
        };
        if let Action::Reject(reply) | Action::Tag { value: reply, .. } = &action {
            if reply.contains(['\r', '\n']) {
                return Err("reply and value must be one line".into());
            }
        }
        if let Action::Tag { header, .. } = &action {
            if header.is_empty() || !header.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(format!("header {header:?} is not a header name"));
            }
        }
        Ok(Rule {
            name,
            senders: c
                .sender_domains
                .into_iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            condition,
            action,
        })
    }

    fn applies_to(&self, sender_domain: &str) -> bool {
        let domain = sender_domain.to_ascii_lowercase();
        self.senders.is_empty()
            || self.senders.iter().any(|p| match p.strip_prefix("*.") {
                Some(parent) => domain.ends_with(&format!(".{parent}")),
                None => *p == domain,
            })
    }
}

/// Textual content types whose decoded content the data-loss rules read
/// (besides `text/*`).
const TEXTUAL: &[&str] = &[
    "application/json",
    "application/xml",
    "application/csv",
    "application/x-csv",
];

fn is_text(p: &Part) -> bool {
    let ct = p.content_type.to_ascii_lowercase();
    ct.starts_with("text/") || TEXTUAL.contains(&ct.as_str())
}

/// What is known about one attachment, found out once per message.
struct Facts {
    kind: Kind,
    /// The zip listing, for a zip; `Err` when it cannot be read.
    entries: Option<Result<Vec<files::Entry>, files::ZipError>>,
}

/// One message's findings, each computed when a rule first needs it.
struct Scan<'a> {
    message: &'a Message,
    parts: Vec<Part>,
    /// Per part, per data-loss rule (in rule order), the match count.
    counts: Option<Vec<(u32, Vec<u32>)>>,
    facts: Vec<Option<Facts>>,
}

impl<'a> Scan<'a> {
    fn new(message: &'a Message) -> Scan<'a> {
        let parts = message.parts();
        let facts = parts.iter().map(|_| None).collect();
        Scan {
            message,
            parts,
            counts: None,
            facts,
        }
    }

    /// Match counts of every data-loss rule, read in one pass over the
    /// text parts.
    fn counts(&mut self, detectors: &[&Detector]) -> &[(u32, Vec<u32>)] {
        let message = self.message;
        let parts = &self.parts;
        self.counts.get_or_insert_with(|| {
            parts
                .iter()
                .filter(|p| is_text(p))
                .map(|p| {
                    let counts = dlp::count_in_ranges(p.size, detectors, |at, len| {
                        message.read_part(p.index, at, len)
                    });
                    (p.index, counts)
                })
                .collect()
        })
    }

    fn facts(&mut self, at: usize) -> &Facts {
        let message = self.message;
        let p = &self.parts[at];
        self.facts[at].get_or_insert_with(|| {
            let index = p.index;
            let read = |off: u64, len: u32| message.read_part(index, off, len);
            let head = read(0, files::HEAD as u32);
            let mut kind = files::sniff(&head);
            let mut entries = None;
            if kind == Kind::Zip {
                let listed = files::list_zip(files::RangeReader::new(p.size, read));
                if let Ok(e) = &listed {
                    if files::has_vba_project(e) {
                        kind = Kind::OfficeMacro;
                    }
                }
                entries = Some(listed);
            } else if files::is_ole2(&head) && files::ole_has_macros(p.size, read) {
                kind = Kind::OfficeMacro;
            }
            Facts { kind, entries }
        })
    }

    /// Why attachment `at` fails `test`, if it does.
    fn attachment_finding(&mut self, at: usize, test: &AttachmentTest) -> Option<String> {
        let p = self.parts[at].clone();
        let name = p.name.clone().unwrap_or_default();
        let by_name = |name: &str| -> Option<String> {
            let ext = files::extensions(name);
            if let Some(e) = ext.first().filter(|e| test.extensions.contains(e)) {
                return Some(format!("file type .{e}"));
            }
            (test.double_extensions && files::double_extension(name))
                .then(|| "a double file extension".to_string())
        };
        if let Some(why) = by_name(&name) {
            return Some(format!("{name}: {why}"));
        }
        if let Some(max) = test.max_size.filter(|m| p.size > *m) {
            return Some(format!("larger than {max} bytes"));
        }
        let wants_content = !test.signatures.is_empty() || test.archives || test.encrypted_archives;
        if !wants_content {
            return None;
        }
        let facts = self.facts(at);
        if test.signatures.contains(&facts.kind) {
            return Some(format!("content of type {}", facts.kind.name()));
        }
        match &facts.entries {
            Some(Ok(entries)) => {
                for e in entries {
                    if test.archives {
                        if let Some(why) = by_name(&e.name) {
                            return Some(format!("{} in the archive: {why}", e.name));
                        }
                        if test.signatures.contains(&e.kind) {
                            let kind = e.kind.name();
                            return Some(format!(
                                "{} in the archive: content of type {kind}",
                                e.name
                            ));
                        }
                    }
                    if test.encrypted_archives && e.encrypted {
                        return Some(format!("encrypted archive ({} is encrypted)", e.name));
                    }
                }
                None
            }
            Some(Err(e)) if test.encrypted_archives => {
                Some(format!("archive that cannot be read ({})", e.0))
            }
            _ => None,
        }
    }
}

#[postern_sdk::plugin]
impl Plugin for Compliance {
    fn init(config: Config) -> Result<Self, ConfigError> {
        let c: ComplianceConfig = config.parse()?;
        let mut rules = Vec::new();
        for (n, r) in c.rules.into_iter().enumerate() {
            rules.push(
                Rule::from_config(r).map_err(|e| ConfigError::new(format!("rules[{n}]: {e}")))?,
            );
        }
        for h in &c.remove_headers {
            if h.eq_ignore_ascii_case("Received") {
                return Err(ConfigError::new(
                    "remove_headers: Received is the relay's trace and cannot be removed; see [smtp] received_hide_networks",
                ));
            }
        }
        Ok(Compliance {
            rules,
            remove_headers: c.remove_headers,
        })
    }

    fn data(&self, _session: &Session, envelope: &Envelope, message: &Message) -> Verdict {
        let sender_domain = envelope.sender.domain.clone();
        let detectors: Vec<&Detector> = self
            .rules
            .iter()
            .filter_map(|r| match &r.condition {
                Condition::Data { detector, .. } => Some(detector),
                _ => None,
            })
            .collect();
        let mut scan = Scan::new(message);
        let mut matched: Vec<&str> = Vec::new();
        let mut quarantine: Option<String> = None;
        let mut notes: Vec<String> = Vec::new();
        let mut data_rule = 0usize;
        for rule in &self.rules {
            // Which detector slot this rule has, counted before any skip.
            let slot = data_rule;
            if matches!(rule.condition, Condition::Data { .. }) {
                data_rule += 1;
            }
            if !rule.applies_to(&sender_domain) {
                continue;
            }
            // The finding: a summary, and the attachments it is about.
            let (summary, parts): (String, Vec<(u32, String)>) = match &rule.condition {
                Condition::Always => (String::new(), Vec::new()),
                Condition::Data { min_count, .. } => {
                    let counts = scan.counts(&detectors);
                    let total: u32 = counts.iter().map(|(_, c)| c[slot]).sum();
                    if total < *min_count {
                        continue;
                    }
                    let hit: Vec<u32> = counts
                        .iter()
                        .filter(|(_, c)| c[slot] > 0)
                        .map(|(i, _)| *i)
                        .collect();
                    let parts = scan
                        .parts
                        .iter()
                        .filter(|p| p.is_attachment && hit.contains(&p.index))
                        .map(|p| {
                            (
                                p.index,
                                format!("it contains data that may not leave ({})", rule.name),
                            )
                        })
                        .collect();
                    (format!("{total} matches"), parts)
                }
                Condition::Attachments(test) => {
                    let mut parts = Vec::new();
                    for at in 0..scan.parts.len() {
                        let p = &scan.parts[at];
                        if p.index == 0 || !p.is_attachment {
                            continue;
                        }
                        if let Some(why) = scan.attachment_finding(at, test) {
                            parts.push((scan.parts[at].index, why));
                        }
                    }
                    if parts.is_empty() {
                        continue;
                    }
                    let summary = parts
                        .iter()
                        .map(|(_, w)| w.as_str())
                        .collect::<Vec<_>>()
                        .join("; ");
                    (summary, parts)
                }
            };
            matched.push(&rule.name);
            match &rule.action {
                Action::Reject(reply) => return Verdict::reject(550, "5.7.1", reply),
                Action::Quarantine => {
                    quarantine.get_or_insert_with(|| {
                        if summary.is_empty() {
                            format!("compliance rule {}", rule.name)
                        } else {
                            format!("compliance rule {}: {summary}", rule.name)
                        }
                    });
                }
                Action::Tag { header, value } => {
                    let _ = message.add_header(header, value);
                    let _ = metadata::set(Scope::Transaction, &rule.name, value);
                }
                Action::Strip => {
                    let done = message.body_edits().removed;
                    for (index, why) in parts {
                        if done.contains(&index) {
                            continue;
                        }
                        match message.remove_part(index, &why) {
                            Ok(()) => {}
                            Err(BodyError::Signed) => {
                                notes.push(format!(
                                    "{}: signed message, nothing stripped",
                                    rule.name
                                ));
                                break;
                            }
                            Err(BodyError::NotRemovable) => {}
                        }
                    }
                }
                Action::Footer { text, html } => {
                    if let Err(BodyError::Signed) = message.add_footer(text, html) {
                        notes.push(format!("{}: signed message, no footer", rule.name));
                    }
                }
            }
        }
        if let Some(reason) = quarantine {
            message.quarantine(&reason);
        }
        for h in &self.remove_headers {
            let _ = message.remove_header(h);
        }
        // For the record and for later plugins (an archive rule, a route).
        if !matched.is_empty() {
            let _ = metadata::set(Scope::Transaction, "matched", &matched.join(","));
        }
        if !notes.is_empty() {
            let _ = metadata::set(Scope::Transaction, "notes", &notes.join("; "));
        }
        Verdict::Continue
    }
}

postern_sdk::export!(Compliance);

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Result<Rule, String> {
        Rule::from_config(serde_json::from_str(json).map_err(|e| e.to_string())?)
    }

    #[test]
    fn rules_from_config() {
        for (json, ok) in [
            (r#"{"name":"cards","data":"cards","action":"reject"}"#, true),
            (
                r#"{"name":"ibans","data":"ibans","min_count":3,"action":"quarantine"}"#,
                true,
            ),
            (
                r#"{"name":"ids","pattern":"(?i)project\\s+falcon","action":"tag"}"#,
                true,
            ),
            (
                r#"{"name":"exe","extensions":["exe",".JS"],"action":"strip"}"#,
                true,
            ),
            (
                r#"{"name":"d","sender_domains":["corp.example"],"action":"footer","text":"t"}"#,
                true,
            ),
            (
                r#"{"name":"x","data":"cards","extensions":["exe"],"action":"strip"}"#,
                false,
            ),
            (r#"{"name":"x","data":"phones","action":"reject"}"#, false),
            (r#"{"name":"x","pattern":"(","action":"reject"}"#, false),
            (r#"{"name":"x","action":"strip"}"#, false),
            (r#"{"name":"x","action":"footer"}"#, false),
            (r#"{"name":"x","action":"delete"}"#, false),
            (
                r#"{"name":"x","signatures":["exe"],"action":"strip"}"#,
                false,
            ),
            (
                r#"{"name":"x","data":"cards","min_count":0,"action":"reject"}"#,
                false,
            ),
            (r#"{"name":"x","action":"tag","header":"X Bad"}"#, false),
            (r#"{"name":"x","action":"reject","colour":"red"}"#, false),
            (r#"{"name":"","action":"reject"}"#, false),
        ] {
            assert_eq!(rule(json).is_ok(), ok, "{json}: {:?}", rule(json).err());
        }
        let r = rule(r#"{"name":"exe","extensions":["exe",".JS"],"action":"strip"}"#).unwrap();
        let Condition::Attachments(t) = r.condition else {
            panic!("attachment rule expected")
        };
        assert_eq!(t.extensions, vec!["exe", "js"]);
        assert!(t.archives, "zip entries are looked at by default");
        let r =
            rule(r#"{"name":"x","extensions":["executables","pdf"],"action":"strip"}"#).unwrap();
        let Condition::Attachments(t) = r.condition else {
            panic!("attachment rule expected")
        };
        assert!(t.extensions.iter().any(|e| e == "scr") && t.extensions.iter().any(|e| e == "pdf"));
        let r = rule(r#"{"name":"d","action":"footer","text":"a <b> & c"}"#).unwrap();
        let Action::Footer { html, .. } = r.action else {
            panic!("footer expected")
        };
        assert_eq!(html, "<p>a &lt;b&gt; &amp; c</p>");
    }

    #[test]
    fn sender_domains() {
        let r = rule(r#"{"name":"d","sender_domains":["Corp.Example","*.corp.example"],"action":"footer","text":"t"}"#).unwrap();
        for (domain, applies) in [
            ("corp.example", true),
            ("CORP.EXAMPLE", true),
            ("eu.corp.example", true),
            ("notcorp.example", false),
            ("example", false),
            ("", false),
        ] {
            assert_eq!(r.applies_to(domain), applies, "{domain}");
        }
        assert!(rule(r#"{"name":"a","action":"quarantine"}"#)
            .unwrap()
            .applies_to("anything.example"));
    }
}
