//! A plugin whose behaviour is its config, so the relay's tests can drive every
//! verdict, route and edit, and every way a plugin can fail, with one crate.
//!
//! ```toml
//! [plugin.config]
//! rcpt = { verdict = "reject", code = 550, enhanced = "5.7.1", text = "no" }
//! data = { verdict = "continue", add_header = ["X-Test", "1"], remove_rcpt = "b@x.test" }
//! route = { route = "local-folder", arg = "inbox" }   # or "folder-from-header" with arg = a header name,
//!                                                # "pool", ...; sender = "x@y" sets the delivery's sender
//! misbehave = { hook = "rcpt", how = "trap" }   # or "loop", "alloc"; local = "x" at rcpt:
//!                                                # only for recipients whose local part is x
//! count = true                                   # kv counter per hook (needs the kv grant)
//! count_ttl_ms = 60000                           # the counters' TTL, set when one is created
//! count_errors = true                            # a failed count answers 451 with the kv error
//! tag_instance = true                            # data adds X-Testkit-Calls (hooks this instance ran since MAIL)
//!                                                # and X-Testkit-Transactions (MAILs this instance has seen)
//! inspect = true                                 # data adds X-Testkit-Inspect: subject, parts, text, attachments
//! walk = true                                    # data reads every part and text body and adds X-Testkit-Walk:
//!                                                # parts, containers, texts and bytes read
//! set_metadata = [{ hook = "connect", scope = "session", key = "k", value = "v" }]
//!                                                # set at that hook; data adds X-Testkit-Set-Error for a refused set there
//! show_metadata = ["kit.session.k", "other.transaction.k"]
//!                                                # data adds X-Testkit-Metadata with those values (`plugin.scope.key`)
//! trace_helo = true                              # helo appends NAME/plain or NAME/tls to session metadata "helo_seen"
//! helo_refuse = "bad.example"                    # helo answers 550 5.7.1 to that name only
//! record_delivered = true                        # delivered appends a line per report to /archive/delivered.log
//! show_authentication = true                     # mail_from keeps the SPF result it read in transaction metadata
//!                                                # "spf_at_mail_from"; data adds X-Testkit-Authentication with
//!                                                # that and every result the data hook reads
//! reject_dmarc_fail = true                       # data answers 550 5.7.1 to a message that failed DMARC
//! ```
//!
//! It keeps counters in its memory only to show how the relay lends
//! instances (`tag_instance`); everything else between hooks goes through
//! metadata, as a plugin's state should.

use std::cell::Cell;
use std::collections::HashMap;

use postern_sdk::kv;
use postern_sdk::prelude::*;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Answer {
    #[serde(default)]
    verdict: Option<String>,
    #[serde(default)]
    code: u16,
    #[serde(default)]
    enhanced: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    add_header: Option<(String, String)>,
    #[serde(default)]
    remove_header: Option<String>,
    #[serde(default)]
    add_rcpt: Option<String>,
    #[serde(default)]
    remove_rcpt: Option<String>,
    #[serde(default)]
    quarantine: Option<String>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    arg: String,
    /// With `route`: the envelope sender for the delivery.
    #[serde(default)]
    sender: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Misbehave {
    hook: String,
    how: String,
    /// Only for a recipient with this local part (rcpt hook only).
    #[serde(default)]
    local: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMetadata {
    hook: String,
    scope: String,
    key: String,
    value: String,
}

fn scope(name: &str) -> Scope {
    if name == "session" {
        Scope::Session
    } else {
        Scope::Transaction
    }
}

// No deny_unknown_fields: serde does not support it next to `flatten`.
#[derive(serde::Deserialize)]
struct Testkit {
    #[serde(flatten)]
    hooks: HashMap<String, Answer>,
    #[serde(default)]
    misbehave: Option<Misbehave>,
    #[serde(default)]
    count: bool,
    #[serde(default)]
    count_ttl_ms: Option<u64>,
    #[serde(default)]
    count_errors: bool,
    #[serde(default)]
    tag_instance: bool,
    #[serde(default)]
    inspect: bool,
    #[serde(default)]
    walk: bool,
    /// Data hook: adds `X-Testkit-Context` with what the hook read of its
    /// session and envelope, and `rcpt` and `route` check their recipient.
    #[serde(default)]
    show_context: bool,
    #[serde(default)]
    set_metadata: Vec<SetMetadata>,
    #[serde(default)]
    show_metadata: Vec<String>,
    #[serde(default)]
    trace_helo: bool,
    #[serde(default)]
    helo_refuse: Option<String>,
    #[serde(default)]
    record_delivered: bool,
    #[serde(default)]
    show_authentication: bool,
    #[serde(default)]
    reject_dmarc_fail: bool,
    /// Hooks this instance has run since its last mail-from; shows whether
    /// one instance served a whole transaction and nothing else meanwhile.
    #[serde(skip)]
    calls: Cell<u32>,
    /// Transactions (mail-from calls) this instance has served: more than
    /// one shows a warm instance was reused.
    #[serde(skip)]
    transactions: Cell<u32>,
}

impl Testkit {
    /// Sets the metadata configured for `hook`; returns the refusals.
    fn set_metadata(&self, hook: &str) -> Vec<String> {
        self.set_metadata
            .iter()
            .filter(|s| s.hook == hook)
            .filter_map(|s| {
                let refused = match metadata::set(scope(&s.scope), &s.key, &s.value) {
                    Ok(()) => return None,
                    Err(metadata::Error::TooLarge) => "too-large",
                    Err(metadata::Error::NoScope) => "no-scope",
                    Err(metadata::Error::ReadOnly) => "read-only",
                    Err(metadata::Error::InvalidKey) => "invalid-key",
                };
                Some(format!("{}: {refused}", s.key))
            })
            .collect()
    }

    /// `plugin.scope.key=value` for each `show_metadata` entry.
    fn show_metadata(&self) -> String {
        self.show_metadata
            .iter()
            .map(|entry| {
                let mut parts = entry.splitn(3, '.');
                let (plugin, sc, key) = (
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                );
                let value = metadata::get_from(plugin, scope(sc), key);
                format!("{entry}={}", value.as_deref().unwrap_or("-"))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Counts and misbehaves as configured (`rcpt`: the local part of the
    /// hook's recipient); `Some` is a verdict that ends the hook (a failed
    /// count, with `count_errors`).
    fn enter(&self, hook: &str, rcpt: Option<&str>) -> Option<Verdict> {
        if hook == "mail_from" {
            self.calls.set(0);
            self.transactions.set(self.transactions.get() + 1);
        }
        self.calls.set(self.calls.get() + 1);
        if self.count {
            // A counter in the host store, so tests see how often a hook ran.
            let ttl = self.count_ttl_ms.map(std::time::Duration::from_millis);
            if let Err(e) = postern_sdk::kv::incr(hook, 1, ttl) {
                if self.count_errors {
                    let text = match e {
                        kv::Error::NotANumber => "kv not-a-number".to_string(),
                        kv::Error::TooLarge => "kv too-large".to_string(),
                        kv::Error::Unavailable(m) => format!("kv unavailable: {m}"),
                    };
                    // One short line, as a reply must be.
                    let text: String = text
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(200)
                        .collect();
                    return Some(Verdict::Tempfail(Reply::new(451, "4.3.0", text)));
                }
            }
        }
        match &self.misbehave {
            Some(m) if m.hook == hook && m.local.as_deref().is_none_or(|l| Some(l) == rcpt) => {
                match m.how.as_str() {
                    "trap" => panic!("testkit: trap in {hook}"),
                    // Asks for the envelope, which `connect` does not have.
                    "envelope" => {
                        let _ = postern_sdk::envelope().sender.domain().len();
                    }
                    "loop" => {
                        let mut n: u64 = 0;
                        loop {
                            n = std::hint::black_box(n.wrapping_add(1));
                        }
                    }
                    "alloc" => {
                        let mut hoard: Vec<Vec<u8>> = Vec::new();
                        loop {
                            hoard.push(vec![1u8; 1 << 20]);
                            std::hint::black_box(&hoard);
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        None
    }

    fn verdict(&self, hook: &str) -> Verdict {
        let Some(a) = self.hooks.get(hook) else {
            return Verdict::Continue;
        };
        let reply = Reply::new(a.code, a.enhanced.as_str(), a.text.as_str());
        match a.verdict.as_deref() {
            Some("accept") => Verdict::Accept,
            Some("reject") => Verdict::Reject(reply),
            Some("tempfail") => Verdict::Tempfail(reply),
            Some("disconnect") => Verdict::Disconnect(reply),
            _ => Verdict::Continue,
        }
    }
}

/// Every authentication result the data hook reads, and the SPF result the
/// mail-from hook read, on one line.
fn show_authentication() -> String {
    let a = authentication();
    let mut out = format!(
        "mail-from-spf={}",
        metadata::get(Scope::Transaction, "spf_at_mail_from").unwrap_or_default()
    );
    for (name, spf) in [("spf", &a.spf_mail_from), ("helo", &a.spf_helo)] {
        if let Some(s) = spf {
            out.push_str(&format!("; {name}={}:{}", s.result.as_str(), s.domain));
        }
    }
    for d in &a.dkim {
        out.push_str(&format!(
            "; dkim={}:{}:{}",
            d.result.as_str(),
            d.domain,
            d.selector
        ));
    }
    if let Some(d) = &a.dmarc {
        out.push_str(&format!(
            "; dmarc={}:{}:p={}:disposition={}",
            d.result.as_str(),
            d.domain,
            d.policy.as_str(),
            d.disposition.as_str()
        ));
    }
    if let Some(c) = &a.arc {
        out.push_str(&format!(
            "; arc={}:sets={}:trusted={}",
            c.result.as_str(),
            c.sets,
            c.trusted
        ));
    }
    out
}

/// What the message API shows of the message: subject, part count, first
/// text body, and each attachment's name, type, size and content (read three
/// bytes at a time, as a plugin streams a large attachment).
fn inspect(message: &Message) -> String {
    use std::io::Read;
    let mut out = format!(
        "subject={}; parts={}; text={}",
        message.subject().unwrap_or_default(),
        message.parts().len(),
        message.text_body(0).unwrap_or_default().trim()
    );
    for a in message.attachments() {
        let mut reader = message.part_reader(a.index);
        let mut content = Vec::new();
        let mut chunk = [0u8; 3];
        while let Ok(n @ 1..) = reader.read(&mut chunk) {
            content.extend_from_slice(&chunk[..n]);
        }
        let hex: String = content.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!(
            "; attachment={}:{}:{}:{hex}",
            a.name.unwrap_or_default(),
            a.content_type,
            a.size
        ));
    }
    out
}

/// Reads the whole MIME tree through the message API, as a scanner would:
/// every part's content (containers hold their raw body) and every text
/// body; the counts on one line.
fn walk(message: &Message) -> String {
    use std::io::Read;
    let parts = message.parts();
    let mut containers = 0;
    let mut bytes = 0u64;
    let mut chunk = vec![0u8; 16 * 1024];
    for p in &parts {
        if p.content_type.starts_with("multipart/") {
            containers += 1;
        }
        let mut reader = message.part_reader(p.index);
        while let Ok(n @ 1..) = reader.read(&mut chunk) {
            bytes += n as u64;
        }
    }
    let mut texts = 0;
    while message.text_body(texts).is_some() {
        texts += 1;
    }
    format!(
        "parts={}; containers={containers}; texts={texts}; bytes={bytes}",
        parts.len()
    )
}

#[postern_sdk::plugin]
impl Plugin for Testkit {
    fn init(config: Config) -> Result<Self, ConfigError> {
        config.parse()
    }

    fn connect(&self, _session: &Session) -> Verdict {
        if let Some(v) = self.enter("connect", None) {
            return v;
        }
        self.set_metadata("connect");
        self.verdict("connect")
    }

    fn helo(&self, session: &Session) -> Verdict {
        if let Some(v) = self.enter("helo", None) {
            return v;
        }
        self.set_metadata("helo");
        if self.trace_helo {
            let mut seen = metadata::get(Scope::Session, "helo_seen").unwrap_or_default();
            if !seen.is_empty() {
                seen.push(',');
            }
            let tls = if session.tls.is_some() {
                "tls"
            } else {
                "plain"
            };
            seen.push_str(&format!("{}/{tls}", session.helo.as_deref().unwrap_or("")));
            let _ = metadata::set(Scope::Session, "helo_seen", &seen);
        }
        if self.helo_refuse.is_some() && session.helo == self.helo_refuse {
            return Verdict::reject(550, "5.7.1", "testkit refuses this name");
        }
        self.verdict("helo")
    }

    fn mail_from(&self, _session: &Session, _envelope: &Envelope) -> Verdict {
        if let Some(v) = self.enter("mail_from", None) {
            return v;
        }
        self.set_metadata("mail_from");
        if self.show_authentication {
            let spf = authentication()
                .spf()
                .map(SpfResult::as_str)
                .unwrap_or("unchecked");
            let _ = metadata::set(Scope::Transaction, "spf_at_mail_from", spf);
        }
        self.verdict("mail_from")
    }

    fn rcpt(&self, _session: &Session, rcpt: &Recipient) -> Verdict {
        if let Some(v) = self.enter("rcpt", Some(rcpt.local_part())) {
            return v;
        }
        if self.show_context && rcpt.domain() != "local.test" {
            return Verdict::reject(550, "5.1.1", &format!("testkit saw recipient {}", **rcpt));
        }
        self.set_metadata("rcpt");
        self.verdict("rcpt")
    }

    fn data(&self, session: &Session, envelope: &Envelope, message: &Message) -> Verdict {
        if let Some(v) = self.enter("data", None) {
            return v;
        }
        if self.show_authentication
            && message
                .add_header("X-Testkit-Authentication", &show_authentication())
                .is_err()
        {
            return Verdict::reject(554, "5.6.0", "header edit refused");
        }
        if self.reject_dmarc_fail {
            if let Some(d) = authentication()
                .dmarc
                .filter(|d| d.result == AuthResult::Fail)
            {
                let text = format!(
                    "testkit refuses a DMARC failure of {} (p={})",
                    d.domain,
                    d.policy.as_str()
                );
                return Verdict::reject(550, "5.7.1", &text);
            }
        }
        let refused = self.set_metadata("data");
        if !refused.is_empty()
            && message
                .add_header("X-Testkit-Set-Error", &refused.join("; "))
                .is_err()
        {
            return Verdict::reject(554, "5.6.0", "header edit refused");
        }
        if !self.show_metadata.is_empty()
            && message
                .add_header("X-Testkit-Metadata", &self.show_metadata())
                .is_err()
        {
            return Verdict::reject(554, "5.6.0", "header edit refused");
        }
        if self.tag_instance {
            let calls = self.calls.get().to_string();
            let transactions = self.transactions.get().to_string();
            if message.add_header("X-Testkit-Calls", &calls).is_err()
                || message
                    .add_header("X-Testkit-Transactions", &transactions)
                    .is_err()
            {
                return Verdict::reject(554, "5.6.0", "header edit refused");
            }
        }
        if self.show_context {
            let text = format!(
                "helo={}; peer={}; local-port={}; sender={}; rcpts={}",
                session.helo.as_deref().unwrap_or(""),
                session.peer().ip(),
                session.local().port(),
                envelope.sender,
                envelope.recipients.len(),
            );
            if message.add_header("X-Testkit-Context", &text).is_err() {
                return Verdict::reject(554, "5.6.0", "header edit refused");
            }
        }
        if self.inspect
            && message
                .add_header("X-Testkit-Inspect", &inspect(message))
                .is_err()
        {
            return Verdict::reject(554, "5.6.0", "header edit refused");
        }
        if self.walk
            && message
                .add_header("X-Testkit-Walk", &walk(message))
                .is_err()
        {
            return Verdict::reject(554, "5.6.0", "header edit refused");
        }
        if let Some(a) = self.hooks.get("data") {
            if let Some((name, value)) = &a.add_header {
                if message.add_header(name, value).is_err() {
                    return Verdict::reject(554, "5.6.0", "header edit refused");
                }
            }
            if let Some(name) = &a.remove_header {
                let _ = message.remove_header(name);
            }
            if let Some(r) = a.add_rcpt.as_deref().and_then(Address::parse) {
                let _ = message.add_recipient(&r);
            }
            if let Some(r) = a.remove_rcpt.as_deref().and_then(Address::parse) {
                message.remove_recipient(&r);
            }
            if let Some(reason) = &a.quarantine {
                message.quarantine(reason);
            }
        }
        self.verdict("data")
    }

    fn delivered(&self, _envelope: &Envelope, report: &DeliveryReport) {
        let _ = self.enter("delivered", None);
        // A report that cannot be written shows as a missing line.
        if self.record_delivered {
            let _ = self.record(report);
        }
    }

    fn route(&self, _envelope: &Envelope, _rcpt: &Recipient, headers: &Headers) -> Routing {
        let _ = self.enter("route", None);
        let Some(a) = self.hooks.get("route") else {
            return Route::Default.into();
        };
        let route = match a.route.as_deref() {
            Some("mx") => Route::mx(a.arg.as_str()),
            Some("smarthost") => Route::smarthost(a.arg.as_str()),
            Some("local-folder") => Route::local_folder(a.arg.as_str()),
            Some("discard") => Route::Discard,
            Some("folder-from-header") => match headers.get(&a.arg) {
                Some(folder) => Route::local_folder(folder.as_str()),
                None => Route::Default,
            },
            // Filed in the folder the transaction's metadata names.
            Some("folder-from-metadata") => match metadata::get(Scope::Transaction, &a.arg) {
                Some(folder) => Route::local_folder(folder.as_str()),
                None => Route::Default,
            },
            Some("reject") => Route::reject(a.code, &a.enhanced, &a.text),
            Some("pool") => Route::pool(a.arg.as_str()),
            _ => Route::Default,
        };
        match a.sender.as_deref().and_then(Address::parse) {
            Some(sender) => route.with_sender(sender),
            None => route.into(),
        }
    }
}

impl Testkit {
    /// One line per report: recipient, outcome, attempt, queue id, the
    /// transaction metadata the message was queued with, the reply.
    fn record(&self, report: &DeliveryReport) -> std::io::Result<()> {
        use std::io::Write;
        let class: Vec<String> = metadata::keys(Scope::Transaction)
            .iter()
            .map(|k| {
                let v = metadata::get(Scope::Transaction, k).unwrap_or_default();
                format!("{k}={v}")
            })
            .collect();
        let outcome = match report.outcome {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Deferred => "deferred",
            DeliveryOutcome::Failed => "failed",
        };
        let line = format!(
            "{} {outcome} attempt={} id={} meta={} reply={}\n",
            report.recipient,
            report.attempt,
            postern_sdk::queue_id().unwrap_or_default(),
            class.join(","),
            report.reply
        );
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/archive/delivered.log")?
            .write_all(line.as_bytes())
    }
}

postern_sdk::export!(Testkit);
