//! A plugin whose behaviour is its config, so the relay's tests can drive every
//! verdict, route and edit, and every way a plugin can fail, with one crate.
//!
//! ```toml
//! [plugin.config]
//! rcpt = { verdict = "reject", code = 550, enhanced = "5.7.1", text = "no" }
//! data = { verdict = "continue", add_header = ["X-Test", "1"], remove_rcpt = "b@x.test" }
//! route = { route = "local-folder", arg = "inbox" }   # or "folder-from-header" with arg = a header name
//! misbehave = { hook = "rcpt", how = "trap" }   # or "loop", "alloc"
//! count = true                                   # kv counter per hook (needs the kv grant)
//! count_ttl_ms = 60000                           # the counters' TTL, set when one is created
//! count_errors = true                            # a failed count answers 451 with the kv error
//! tag_instance = true                            # data adds X-Testkit-Calls (hooks this instance ran since MAIL)
//!                                                # and X-Testkit-Transactions (MAILs this instance has seen)
//! inspect = true                                 # data adds X-Testkit-Inspect: subject, parts, text, attachments
//! ```

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
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Misbehave {
    hook: String,
    how: String,
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
    /// Data hook: adds `X-Testkit-Context` with what the hook read of its
    /// session and envelope, and `rcpt` and `route` check their recipient.
    #[serde(default)]
    show_context: bool,
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
    /// Counts and misbehaves as configured; `Some` is a verdict that ends
    /// the hook (a failed count, with `count_errors`).
    fn enter(&self, hook: &str) -> Option<Verdict> {
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
            Some(m) if m.hook == hook => match m.how.as_str() {
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
            },
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

#[postern_sdk::plugin]
impl Plugin for Testkit {
    fn init(config: Config) -> Result<Self, ConfigError> {
        config.parse()
    }

    fn connect(&self, _session: &Session) -> Verdict {
        if let Some(v) = self.enter("connect") {
            return v;
        }
        self.verdict("connect")
    }

    fn mail_from(&self, _session: &Session, _envelope: &Envelope) -> Verdict {
        if let Some(v) = self.enter("mail_from") {
            return v;
        }
        self.verdict("mail_from")
    }

    fn rcpt(&self, _session: &Session, rcpt: &Recipient) -> Verdict {
        if let Some(v) = self.enter("rcpt") {
            return v;
        }
        if self.show_context && rcpt.domain() != "local.test" {
            return Verdict::reject(550, "5.1.1", &format!("testkit saw recipient {}", **rcpt));
        }
        self.verdict("rcpt")
    }

    fn data(&self, session: &Session, envelope: &Envelope, message: &Message) -> Verdict {
        if let Some(v) = self.enter("data") {
            return v;
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

    fn route(&self, _envelope: &Envelope, _rcpt: &Recipient, headers: &Headers) -> Route {
        let _ = self.enter("route");
        let Some(a) = self.hooks.get("route") else {
            return Route::Default;
        };
        match a.route.as_deref() {
            Some("mx") => Route::mx(a.arg.as_str()),
            Some("smarthost") => Route::smarthost(a.arg.as_str()),
            Some("local-folder") => Route::local_folder(a.arg.as_str()),
            Some("discard") => Route::Discard,
            Some("folder-from-header") => match headers.get(&a.arg) {
                Some(folder) => Route::local_folder(folder.as_str()),
                None => Route::Default,
            },
            Some("reject") => Route::reject(a.code, &a.enhanced, &a.text),
            _ => Route::Default,
        }
    }
}

postern_sdk::export!(Testkit);
