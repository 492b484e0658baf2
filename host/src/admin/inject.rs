//! `POST /api/v1/messages`: a message handed over as JSON instead of SMTP.
//! It gets what an SMTP client's message gets: a session built from the
//! request (client address, `helo` "api", the authenticated user), every
//! hook, the relay access rules, the limits, our `Received:` header, and
//! the spool; the answer names the queue id only once the spool has
//! fsynced it. Credentials are always needed: the admin token, or HTTP
//! Basic with a `[[user]]`, as SMTP AUTH takes them.
//!
//! The body is either `raw` (an RFC 5322 message) or fields the message is
//! built from with mail-builder:
//!
//! ```json
//! {"sender": "app@example.com", "recipients": ["a@example.org"],
//!  "from": "App <app@example.com>", "to": ["a@example.org"], "cc": [], "bcc": [],
//!  "subject": "Hi", "text": "plain", "html": "<p>html</p>",
//!  "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "content": "BASE64"}],
//!  "headers": {"X-Campaign": "7"}}
//! ```
//!
//! `sender` and `recipients` are the envelope; with fields they default to
//! `from`'s address and to `to`, `cc` and `bcc`. An `Idempotency-Key`
//! header makes a retried request answer the first queue id instead of
//! queueing again, for `[admin] idempotency_window` (kept in the spool's
//! `idempotency/` folder, so a restart keeps it).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::metrics::{metrics, Result_, Source};
use super::serve::ConnInfo;
use super::State;
use crate::auth::Checked;
use crate::authn::Results;
use crate::delivery::state::unix_now;
use crate::envelope::{Address, Body, Envelope, MailParams, Recipient, SessionInfo};
use crate::metadata::SharedMetadata;
use crate::plugins::Scopes;
use crate::policy::{DataTransaction, Verdict};
use crate::queue::QueueId;
use crate::smtp::reply::Reply;

/// The request body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injection {
    #[serde(default)]
    sender: Option<String>,
    #[serde(default)]
    recipients: Option<Vec<String>>,
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    cc: Vec<String>,
    #[serde(default)]
    bcc: Vec<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    attachments: Vec<Attachment>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// One attachment, its content in base64.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attachment {
    filename: String,
    content_type: String,
    content: String,
}

/// Why a request was not queued: an HTTP status, the field at fault if one
/// is, and the SMTP reply when the relay's rules or a plugin refused.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    field: Option<String>,
    message: String,
    smtp: Option<String>,
}

impl Refusal {
    fn field(field: impl Into<String>, message: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.into()),
            message: message.into(),
            smtp: None,
        }
    }

    fn status(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            field: None,
            message: message.into(),
            smtp: None,
        }
    }

    /// A refusal by the access rules or a plugin, at `field`: a 5xx is final
    /// (422), a 4xx may be retried (503).
    fn reply(field: impl Into<String>, reply: Reply) -> Refusal {
        let status = if reply.code >= 500 {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Refusal {
            status,
            field: Some(field.into()),
            message: reply.text().to_string(),
            smtp: Some(reply.to_string().trim_end().to_string()),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": match &self.field {
            Some(f) => format!("{f}: {}", self.message),
            None => self.message.clone(),
        }});
        if let Some(f) = &self.field {
            body["field"] = f.clone().into();
        }
        if let Some(s) = &self.smtp {
            body["smtp"] = s.clone().into();
        }
        (self.status, Json(body)).into_response()
    }
}

/// The answer: the queue id, once the message is on disk.
#[derive(Debug, Serialize)]
struct Queued {
    id: String,
    /// The recipients it was queued for (after the data hook's edits).
    recipients: usize,
    /// True when an earlier request with the same `Idempotency-Key` queued it.
    replayed: bool,
}

/// Idempotency keys, one small file each in the spool's `idempotency/`
/// folder, named by the key's SHA-256 and holding the queue id.
pub struct Keys {
    dir: PathBuf,
    window: Duration,
    /// Keys whose request is being handled: a second request with one of
    /// them waits for nothing and is told to retry.
    in_flight: Mutex<HashSet<String>>,
}

#[derive(Serialize, Deserialize)]
struct KeyRecord {
    key: String,
    id: String,
    recipients: usize,
    at: u64,
}

impl Keys {
    /// Keys in `dir` (created if missing), valid for `window`.
    pub fn open(dir: PathBuf, window: Duration) -> std::io::Result<Keys> {
        std::fs::create_dir_all(&dir)?;
        Ok(Keys {
            dir,
            window,
            in_flight: Mutex::default(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir
            .join(hex::encode(sha2::Sha256::digest(key.as_bytes())))
    }

    /// The queue id and recipient count recorded for `key` within the window.
    fn lookup(&self, key: &str) -> Option<(String, usize)> {
        let text = std::fs::read(self.path(key)).ok()?;
        let record: KeyRecord = serde_json::from_slice(&text).ok()?;
        let fresh = unix_now().saturating_sub(record.at) < self.window.as_secs();
        (record.key == key && fresh).then_some((record.id, record.recipients))
    }

    /// Records `key` for `id`, durably (file and folder fsynced).
    fn record(&self, key: &str, id: &QueueId, recipients: usize) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.path(key);
        let tmp = path.with_extension("tmp");
        let record = KeyRecord {
            key: key.to_string(),
            id: id.to_string(),
            recipients,
            at: unix_now(),
        };
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&record).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Removes the keys older than the window; returns how many.
    pub fn prune(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= self.window);
            if old && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Takes a key out of the in-flight set when the request is done.
struct InFlight<'a>(&'a Keys, String);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// The largest body taken: a message of `limits.max_message_size` in base64
/// inside JSON, with room for the rest.
pub fn body_limit(max_message_size: usize) -> usize {
    max_message_size / 3 * 4 + 64 * 1024
}

/// `POST /api/v1/messages`.
pub async fn inject(
    AxState(state): AxState<Arc<State>>,
    Extension(conn): Extension<ConnInfo>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = async {
        let auth_user = credentials(&state, &conn, &headers).await?;
        let body = body.map_err(|e| Refusal::status(e.status(), e.body_text()))?;
        let key = idempotency_key(&headers)?;
        // Claimed before it is looked up: a request with the same key either
        // finds this one in flight, or finds its record once it is done.
        let _in_flight = match &key {
            Some(k) => {
                let keys = &state.keys;
                if !keys
                    .in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(k.clone())
                {
                    return Err(Refusal::status(
                        StatusCode::CONFLICT,
                        "a request with this Idempotency-Key is being handled; retry it",
                    ));
                }
                let claim = InFlight(keys, k.clone());
                let (s, k) = (state.clone(), k.clone());
                let found = crate::queue::off_runtime(move || Ok(s.keys.lookup(&k)))
                    .await
                    .map_err(|e| Refusal::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
                if let Some((id, recipients)) = found {
                    return Ok(Queued {
                        id,
                        recipients,
                        replayed: true,
                    });
                }
                Some(claim)
            }
            None => None,
        };
        let request = parse(&body)?;
        let (id, recipients) = submit(&state, &conn, auth_user, request).await?;
        if let Some(k) = key {
            let (s, qid) = (state.clone(), id.clone());
            let recorded = crate::queue::off_runtime(move || {
                s.keys
                    .record(&k, &qid, recipients)
                    .map_err(|source| crate::queue::Error::Io {
                        path: s.keys.dir.clone(),
                        source,
                    })
            })
            .await;
            if let Err(e) = recorded {
                // Queued all the same: a retry may queue it twice, never lose it.
                tracing::warn!(queue_id = %id, error = %e, "cannot record the idempotency key");
            }
        }
        Ok(Queued {
            id: id.to_string(),
            recipients,
            replayed: false,
        })
    }
    .await;
    match result {
        Ok(q) => {
            metrics().injections.inc(Result_::Ok);
            Json(q).into_response()
        }
        Err(r) => {
            metrics().injections.inc(Result_::Failed);
            let basic = r.status == StatusCode::UNAUTHORIZED;
            let mut resp = r.into_response();
            if basic {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Basic realm=\"postern\", charset=\"UTF-8\""),
                );
            }
            resp
        }
    }
}

/// The admin token (no user), or a `[[user]]` by HTTP Basic (that user);
/// failures count toward the same lockout as SMTP AUTH.
async fn credentials(
    state: &State,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> Result<Option<String>, Refusal> {
    if let Some(token) = state.ctx.config.admin.token.as_deref() {
        if super::guard::bearer_ok(headers, token) {
            return Ok(None);
        }
    }
    let unauthorized = || {
        Refusal::status(
            StatusCode::UNAUTHORIZED,
            "injection needs credentials: the admin token (Bearer) or a [[user]] (Basic)",
        )
    };
    let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return Err(unauthorized());
    };
    let ip = conn.peer.ip();
    let throttled = || {
        Refusal::status(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed logins from this address; try again later",
        )
    };
    if state.ctx.auth.is_throttled(ip) {
        return Err(throttled());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(unauthorized)?;
    let (user, password) = decoded.split_once(':').ok_or_else(unauthorized)?;
    match state.ctx.auth.check(ip, user, password).await {
        Checked::Ok => Ok(Some(user.to_string())),
        Checked::Failed => {
            tracing::info!(peer = %conn.peer, user, "injection: authentication failed");
            Err(unauthorized())
        }
        Checked::Throttled => Err(throttled()),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Refusal> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| Refusal::field("Idempotency-Key", "1 to 255 printable ASCII characters"))?;
    Ok(Some(key.to_string()))
}

/// What to queue: envelope sender, recipients, message bytes.
struct Parsed {
    sender: String,
    recipients: Vec<String>,
    message: Vec<u8>,
}

fn parse(body: &[u8]) -> Result<Parsed, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let req: Injection = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        Refusal::field(field, e.inner().to_string())
    })?;
    let fields = req.from.is_some()
        || !req.to.is_empty()
        || !req.cc.is_empty()
        || !req.bcc.is_empty()
        || req.subject.is_some()
        || req.text.is_some()
        || req.html.is_some()
        || !req.attachments.is_empty()
        || !req.headers.is_empty();
    match (&req.raw, fields) {
        (Some(_), true) => Err(Refusal::field(
            "raw",
            "give either raw or the fields (from, to, subject, ...), not both",
        )),
        (None, false) => Err(Refusal::field(
            "raw",
            "give raw, or the fields to build the message from",
        )),
        (Some(raw), false) => {
            let sender = req
                .sender
                .clone()
                .ok_or_else(|| Refusal::field("sender", "required with raw"))?;
            let recipients = req
                .recipients
                .clone()
                .ok_or_else(|| Refusal::field("recipients", "required with raw"))?;
            Ok(Parsed {
                sender,
                recipients,
                message: crlf(raw.as_bytes()),
            })
        }
        (None, true) => build(req),
    }
}

/// Line ends made CRLF, and a final one added if missing.
fn crlf(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 40 + 2);
    let mut prev = 0u8;
    for &b in raw {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        if prev == b'\r' && b != b'\n' {
            out.push(b'\n');
        }
        out.push(b);
        prev = b;
    }
    if prev == b'\r' {
        out.push(b'\n');
    } else if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `Name <a@b>` or `a@b`.
fn mailbox(s: &str) -> (Option<String>, String) {
    match (s.rfind('<'), s.trim_end().strip_suffix('>')) {
        (Some(i), Some(_)) => {
            let name = s[..i].trim().trim_matches('"').to_string();
            let addr = s[i + 1..]
                .trim_end()
                .trim_end_matches('>')
                .trim()
                .to_string();
            ((!name.is_empty()).then_some(name), addr)
        }
        _ => (None, s.trim().to_string()),
    }
}

fn one_line(field: &str, value: &str) -> Result<(), Refusal> {
    if value.contains(['\r', '\n']) {
        return Err(Refusal::field(field, "must be one line"));
    }
    Ok(())
}

fn build(req: Injection) -> Result<Parsed, Refusal> {
    use mail_builder::headers::address::Address as MbAddress;
    use mail_builder::MessageBuilder;
    let from = req
        .from
        .as_deref()
        .ok_or_else(|| Refusal::field("from", "required when the message is built from fields"))?;
    one_line("from", from)?;
    let (from_name, from_addr) = mailbox(from);
    check_address("from", &from_addr)?;
    if req.to.is_empty() && req.cc.is_empty() && req.bcc.is_empty() && req.recipients.is_none() {
        return Err(Refusal::field(
            "to",
            "no recipient in to, cc, bcc or recipients",
        ));
    }
    let list = |name: &str, v: &[String]| -> Result<Vec<(Option<String>, String)>, Refusal> {
        v.iter()
            .enumerate()
            .map(|(i, s)| {
                let field = format!("{name}[{i}]");
                one_line(&field, s)?;
                let (n, a) = mailbox(s);
                check_address(&field, &a)?;
                Ok((n, a))
            })
            .collect()
    };
    let (to, cc, bcc) = (
        list("to", &req.to)?,
        list("cc", &req.cc)?,
        list("bcc", &req.bcc)?,
    );
    let addr = |(n, a): &(Option<String>, String)| -> MbAddress<'static> {
        MbAddress::new_address(n.clone(), a.clone())
    };
    let mut b = MessageBuilder::new()
        .from(addr(&(from_name, from_addr.clone())))
        .message_id(format!("{}@postern.api", QueueId::generate()));
    if !to.is_empty() {
        b = b.to(MbAddress::new_list(to.iter().map(addr).collect()));
    }
    if !cc.is_empty() {
        b = b.cc(MbAddress::new_list(cc.iter().map(addr).collect()));
    }
    if let Some(s) = &req.subject {
        one_line("subject", s)?;
        b = b.subject(s.clone());
    }
    match (&req.text, &req.html) {
        (None, None) => b = b.text_body(String::new()),
        (t, h) => {
            if let Some(t) = t {
                b = b.text_body(t.clone());
            }
            if let Some(h) = h {
                b = b.html_body(h.clone());
            }
        }
    }
    for (i, a) in req.attachments.iter().enumerate() {
        let field = |f: &str| format!("attachments[{i}].{f}");
        one_line(&field("filename"), &a.filename)?;
        if a.content_type.split('/').count() != 2 || a.content_type.contains(['\r', '\n', ' ']) {
            return Err(Refusal::field(
                field("content_type"),
                "expected type/subtype",
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a.content.trim())
            .map_err(|e| Refusal::field(field("content"), format!("not base64: {e}")))?;
        b = b.attachment(a.content_type.clone(), a.filename.clone(), bytes);
    }
    for (name, value) in &req.headers {
        let field = format!("headers.{name}");
        let token = !name.is_empty() && name.bytes().all(|c| c.is_ascii_graphic() && c != b':');
        if !token {
            return Err(Refusal::field(field, "not a header name"));
        }
        one_line(&field, value)?;
        b = b.header(
            name.clone(),
            mail_builder::headers::raw::Raw::new(value.clone()),
        );
    }
    let message = b
        .write_to_vec()
        .map_err(|e| Refusal::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let recipients = match req.recipients {
        Some(r) => r,
        None => to
            .iter()
            .chain(&cc)
            .chain(&bcc)
            .map(|(_, a)| a.clone())
            .collect(),
    };
    Ok(Parsed {
        sender: req.sender.unwrap_or(from_addr),
        recipients,
        message,
    })
}

/// An envelope address: `local@domain`, no spaces or controls, at most 254
/// octets (RFC 5321's path limit less the brackets).
fn check_address(field: &str, a: &str) -> Result<(), Refusal> {
    let ok = a.len() <= 254
        && a.rsplit_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !a
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>');
    if ok {
        Ok(())
    } else {
        Err(Refusal::field(field, format!("{a:?} is not an address")))
    }
}

fn refused(field: &str, verdict: Verdict) -> Result<(), Refusal> {
    match verdict {
        Verdict::Continue | Verdict::Accept => Ok(()),
        Verdict::Reject(r) | Verdict::Tempfail(r) | Verdict::Disconnect(r) => {
            Err(Refusal::reply(field, r))
        }
    }
}

/// Through the hooks, the access rules and the limits into the spool.
async fn submit(
    state: &State,
    conn: &ConnInfo,
    auth_user: Option<String>,
    req: Parsed,
) -> Result<(QueueId, usize), Refusal> {
    let ctx = &state.ctx;
    let limits = &ctx.config.limits;
    if req.sender != "<>" && !req.sender.is_empty() {
        check_address("sender", &req.sender)?;
    }
    if req.recipients.is_empty() {
        return Err(Refusal::field("recipients", "no recipient"));
    }
    if req.recipients.len() > limits.max_recipients {
        return Err(Refusal::field(
            "recipients",
            format!(
                "more than limits.max_recipients ({})",
                limits.max_recipients
            ),
        ));
    }
    for (i, r) in req.recipients.iter().enumerate() {
        check_address(&format!("recipients[{i}]"), r)?;
    }
    if req.message.len() > limits.max_message_size {
        return Err(Refusal::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the message is larger than limits.max_message_size ({})",
                limits.max_message_size
            ),
        ));
    }
    if req
        .message
        .split(|&b| b == b'\n')
        .any(|l| l.len() > limits.max_line_length)
    {
        return Err(Refusal::field(
            "raw",
            format!(
                "a line is longer than limits.max_line_length ({})",
                limits.max_line_length
            ),
        ));
    }
    if crate::smtp::codec::count_received_headers(&req.message) > limits.max_received_headers {
        return Err(Refusal::reply("raw", Reply::MAIL_LOOP));
    }
    let sender = if req.sender == "<>" {
        String::new()
    } else {
        req.sender
    };
    let utf8 = !sender.is_ascii() || req.recipients.iter().any(|r| !r.is_ascii());
    let params = MailParams {
        smtputf8: utf8,
        body: if req.message.is_ascii() {
            Body::SevenBit
        } else {
            Body::EightBitMime
        },
        ..MailParams::default()
    };
    let info = SessionInfo {
        peer: conn.peer,
        local: conn.local,
        helo: Some("api".into()),
        tls: conn.tls.clone(),
        auth_user,
        // Credentials were given: the admin token or a user's password.
        may_relay: true,
    };
    let mut hooks = ctx.chain.current().lease();
    let limit = ctx.config.plugins.max_metadata_size;
    let scopes = Scopes {
        session: Some(SharedMetadata::new(limit)),
        transaction: Some(SharedMetadata::new(limit)),
    };
    refused("connect", hooks.connect(&info, &scopes).await)?;
    refused("helo", hooks.helo(&info, &scopes).await)?;
    let mut envelope = Envelope::new(Address(sender), params);
    refused(
        "sender",
        hooks
            .mail_from(&info, &envelope, &Results::default(), &scopes)
            .await,
    )?;
    for (i, r) in req.recipients.iter().enumerate() {
        let field = format!("recipients[{i}]");
        let address = ctx
            .access
            .check_recipient(info.may_relay, &Address(r.clone()))
            .map_err(|reply| Refusal::reply(&field, reply))?;
        let rcpt = Recipient::new(address.0);
        refused(
            &field,
            hooks
                .rcpt(&info, &envelope, &rcpt, &Results::default(), &scopes)
                .await,
        )?;
        if !envelope
            .recipients
            .iter()
            .any(|x| x.address == rcpt.address)
        {
            envelope.recipients.push(rcpt);
        }
    }
    let id = QueueId::generate();
    let received = crate::smtp::session::received_header(
        &info,
        &ctx.config.hostname,
        true,
        &id,
        &envelope,
        &ctx.config.smtp,
    );
    let mut message = received.into_bytes();
    message.extend_from_slice(&req.message);
    let given: Vec<Address> = envelope
        .recipients
        .iter()
        .map(|r| r.address.clone())
        .collect();
    let mut tx = DataTransaction::new(envelope, message);
    let verdict = hooks.data(&info, &mut tx, &scopes, &id).await;
    hooks.end();
    let metadata = scopes.transaction.map(|m| m.snapshot()).unwrap_or_default();
    let trusted = std::mem::take(&mut tx.trusted);
    crate::smtp::session::check_added_recipients(
        ctx,
        &info,
        &id,
        &given,
        &trusted,
        &mut tx.envelope,
    );
    let verdicts = hooks.take_verdicts();
    let logged = |outcome: &str, reply: &str| {
        tracing::info!(
            queue_id = %id,
            peer = %info.peer,
            helo = "api",
            auth = info.auth_user.as_deref().unwrap_or(""),
            sender = tx.envelope.sender.as_str(),
            recipients = req.recipients.join(",").as_str(),
            size = req.message.len(),
            verdicts = verdicts.as_str(),
            reply,
            outcome,
            source = "api",
            "transaction"
        );
    };
    if let Err(r) = refused("message", verdict) {
        logged("refused", r.smtp.as_deref().unwrap_or(""));
        return Err(r);
    }
    if tx.envelope.recipients.is_empty() {
        logged("dropped", "");
        return Err(Refusal::status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "policy removed every recipient; nothing was queued",
        ));
    }
    let n = tx.envelope.recipients.len();
    let stored = ctx
        .spool
        .store(
            &id,
            &tx.envelope,
            Some(&info),
            tx.quarantine.clone(),
            metadata,
            Arc::new(tx.message),
        )
        .await;
    match stored {
        Ok(spooled) => {
            ctx.queued(spooled);
            metrics().received.inc(Source::Api);
            logged("queued", "");
            Ok((id, n))
        }
        Err(e) => {
            tracing::error!(queue_id = %id, error = %e, "could not spool an injected message");
            logged("failed", "");
            Err(Refusal::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "the spool could not take the message; try again later",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_become_crlf() {
        for (raw, want) in [
            (&b"a\nb"[..], &b"a\r\nb\r\n"[..]),
            (b"a\r\nb\r\n", b"a\r\nb\r\n"),
            (b"a\rb", b"a\r\nb\r\n"),
            (b"", b"\r\n"),
        ] {
            assert_eq!(crlf(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn bad_bodies_name_the_field() {
        for (body, field) in [
            (
                r#"{"sender": "a@b.test", "recipients": ["x"], "raw": "hi"}"#,
                None,
            ),
            (r#"{"raw": "hi", "subject": "s"}"#, Some("raw")),
            (
                r#"{"raw": "hi", "recipients": ["x@y.test"]}"#,
                Some("sender"),
            ),
            (r#"{"sender": "a@b.test", "raw": 5}"#, Some("raw")),
            (r#"{"sendr": "a@b.test"}"#, Some("sendr")),
            (r#"not json"#, Some("body")),
            (
                r#"{"from": "a@b.test", "to": ["c@d.test"], "subject": "x\ny"}"#,
                Some("subject"),
            ),
            (
                r#"{"from": "a@b.test", "to": ["no address"]}"#,
                Some("to[0]"),
            ),
            (
                r#"{"from": "a@b.test", "to": ["c@d.test"], "attachments": [{"filename": "f", "content_type": "text/plain", "content": "@@"}]}"#,
                Some("attachments[0].content"),
            ),
            (
                r#"{"from": "a@b.test", "to": ["c@d.test"], "attachments": [{"filename": "f", "content_type": "text/plain", "content": 1}]}"#,
                Some("attachments[0].content"),
            ),
            (
                r#"{"from": "a@b.test", "to": ["c@d.test"], "headers": {"X: y": "1"}}"#,
                Some("headers.X: y"),
            ),
        ] {
            let got = parse(body.as_bytes()).err().and_then(|r| r.field);
            assert_eq!(got.as_deref(), field, "{body}");
        }
    }

    #[test]
    fn fields_build_a_message_with_its_envelope() {
        let body = r#"{"from": "App <app@x.test>", "to": ["A <a@y.test>"], "cc": ["c@y.test"],
            "bcc": ["b@z.test"], "subject": "Hi", "text": "plain", "html": "<p>html</p>",
            "attachments": [{"filename": "n.txt", "content_type": "text/plain", "content": "bm90ZQ=="}],
            "headers": {"X-Campaign": "7"}}"#;
        let p = parse(body.as_bytes()).unwrap();
        assert_eq!(p.sender, "app@x.test");
        assert_eq!(p.recipients, ["a@y.test", "c@y.test", "b@z.test"]);
        let m = mail_parser::MessageParser::default()
            .parse(&p.message)
            .unwrap();
        assert_eq!(m.subject(), Some("Hi"));
        assert_eq!(m.body_text(0).as_deref(), Some("plain"));
        assert_eq!(m.attachment(0).map(|a| a.contents()), Some(&b"note"[..]));
        assert_eq!(m.header_raw("X-Campaign").map(str::trim), Some("7"));
        assert!(m.header_raw("Bcc").is_none(), "bcc stays off the message");
    }
}
