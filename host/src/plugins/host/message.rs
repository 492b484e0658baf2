//! `postern:relay/message`: the message of the data hook as a host resource.
//!
//! The relay parses the message at most once per data hook, when a plugin first
//! asks for its structure; every plugin in the chain reads that one parse
//! through its own handle, and content is handed out in ranges so a plugin never
//! needs the whole message in its memory. Edits (headers, recipients,
//! quarantine) are recorded here, seen by the plugins after the one that made
//! them, and applied to the spooled message once the chain has run
//! ([`MessageState::finish`]).

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use mail_parser::{MessageParser, MimeHeaders, PartType};
use wasmtime::component::Resource;

use super::body::{self, BodyEdits, Footer, Refusal};
use crate::authn::header::body_start;
use crate::envelope::{Address, Recipient};
use crate::plugins::bindings::message::{
    BodyEdits as WitBodyEdits, BodyError, EditError, Host, HostMessage, Part,
};
use crate::plugins::bindings::types::{Address as WitAddress, Header};
use crate::plugins::check;
use crate::plugins::instance::HostState;
use crate::policy::DataTransaction;

/// The handle a plugin's resource table holds; all handles of one data hook
/// point at the same state.
#[derive(Clone)]
pub struct MessageRef(pub Arc<Mutex<MessageState>>);

impl MessageRef {
    fn lock(&self) -> MutexGuard<'_, MessageState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A separate message with the edits so far, whose own edits change
    /// nothing here: what a shadow plugin reads and edits. It parses again
    /// if it asks for structure (the shadow runs after the reply, so that
    /// costs the client nothing).
    pub fn fork(&self) -> MessageRef {
        let s = self.lock();
        MessageRef(Arc::new(Mutex::new(MessageState {
            raw: s.raw.clone(),
            headers: None,
            mime: None,
            added: s.added.clone(),
            removed: s.removed.clone(),
            recipients: s.recipients.clone(),
            quarantine: s.quarantine.clone(),
            trusted: s.trusted.clone(),
            body: s.body.clone(),
        })))
    }
}

/// Where a part's decoded content is.
enum Content {
    /// A range of the raw message (no transfer encoding to undo).
    Raw(Range<usize>),
    /// Decoded by the parser (base64, quoted-printable, charset conversion).
    Decoded(Vec<u8>),
}

struct PartData {
    info: Part,
    content: Content,
}

/// The MIME structure of a message, as the parser found it.
struct Mime {
    subject: Option<String>,
    parts: Vec<PartData>,
    texts: Vec<String>,
}

impl Mime {
    fn parse(raw: &[u8]) -> Mime {
        let mut parts = Vec::new();
        let mut subject = None;
        let mut texts = Vec::new();
        if let Some(m) = MessageParser::default().parse(raw) {
            subject = m.subject().map(str::to_string);
            for n in 0..m.text_body.len() {
                if let Some(t) = m.body_text(n) {
                    texts.push(t.into_owned());
                }
            }
            let base = raw.as_ptr() as usize;
            for (i, p) in m.parts.iter().enumerate() {
                let bytes = p.contents();
                let start = bytes.as_ptr() as usize;
                // Content the parser did not have to decode is a slice of the
                // raw message: keep the range instead of a copy.
                let content = if start >= base && start + bytes.len() <= base + raw.len() {
                    Content::Raw(start - base..start - base + bytes.len())
                } else {
                    Content::Decoded(bytes.to_vec())
                };
                let content_type = p
                    .content_type()
                    .map(|c| match c.subtype() {
                        Some(sub) => format!("{}/{}", c.ctype(), sub),
                        None => c.ctype().to_string(),
                    })
                    .unwrap_or_else(|| "text/plain".into())
                    .to_ascii_lowercase();
                let is_attachment = m.attachments.contains(&(i as u32));
                parts.push(PartData {
                    info: Part {
                        index: i as u32,
                        content_type,
                        name: p.attachment_name().map(str::to_string),
                        size: bytes.len() as u64,
                        is_attachment,
                    },
                    content,
                });
                if matches!(p.body, PartType::Multipart(_)) {
                    // A container's content is its raw body, for plugins that
                    // want to walk it themselves.
                    let range = p.offset_body as usize..(p.offset_end as usize).min(raw.len());
                    if let Some(last) = parts.last_mut() {
                        last.info.size = range.len() as u64;
                        last.content = Content::Raw(range);
                    }
                }
            }
        }
        Mime {
            subject,
            parts,
            texts,
        }
    }
}

/// One data hook's message: the parse, and the edits so far.
pub struct MessageState {
    raw: Arc<Vec<u8>>,
    /// The top-level header fields, split out on first use.
    headers: Option<Vec<(String, String)>>,
    /// The MIME parse, made on first use: a chain whose plugins only look at
    /// the envelope or the headers never pays for it.
    mime: Option<Mime>,
    added: Vec<(String, String)>,
    removed: Vec<String>,
    recipients: Vec<Recipient>,
    quarantine: Option<String>,
    /// Recipients that plugins granted `recipients` added or put in place.
    trusted: Vec<Address>,
    /// Footers and removed parts, applied in [`MessageState::finish`].
    body: BodyEdits,
}

impl MessageState {
    /// The transaction's message, for the plugins of one data hook to share.
    pub fn new(raw: Arc<Vec<u8>>, recipients: Vec<Recipient>) -> MessageState {
        MessageState {
            raw,
            headers: None,
            mime: None,
            added: Vec::new(),
            removed: Vec::new(),
            recipients,
            quarantine: None,
            trusted: Vec::new(),
            body: BodyEdits::default(),
        }
    }

    /// The raw message and its MIME parse (the relay's one parse for the hook).
    fn parsed(&mut self) -> (&[u8], &Mime) {
        let raw = &self.raw;
        let mime = self.mime.get_or_insert_with(|| Mime::parse(raw));
        (raw, mime)
    }

    fn current_headers(&mut self) -> Vec<Header> {
        let raw = &self.raw;
        let headers = self.headers.get_or_insert_with(|| top_headers(raw));
        self.added
            .iter()
            .chain(
                headers
                    .iter()
                    .filter(|(n, _)| !self.removed.iter().any(|r| r.eq_ignore_ascii_case(n))),
            )
            .map(|(name, value)| Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    }

    fn read(raw: &[u8], content: &Content, offset: u64, len: u32) -> Vec<u8> {
        let bytes: &[u8] = match content {
            // A range the parser's offsets gave; never trusted to be in bounds.
            Content::Raw(r) => raw.get(r.clone()).unwrap_or_default(),
            Content::Decoded(v) => v,
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(len as usize).min(bytes.len());
        bytes[start..end].to_vec()
    }

    /// Reads everything the message resource hands a plugin (the header
    /// fields, the subject, the text bodies, every part in ranges of `chunk`
    /// bytes) and returns how many bytes that came to. The fuzz targets in
    /// `host/fuzz` drive it with arbitrary messages.
    pub fn read_everything(&mut self, chunk: u32) -> u64 {
        let mut total: u64 = self
            .current_headers()
            .iter()
            .map(|h| (h.name.len() + h.value.len()) as u64)
            .sum();
        let chunk = chunk.max(1);
        let (raw, mime) = self.parsed();
        total += mime.subject.as_ref().map_or(0, |s| s.len() as u64);
        total += mime.texts.iter().map(|t| t.len() as u64).sum::<u64>();
        for part in &mime.parts {
            let mut offset = 0u64;
            loop {
                let got = MessageState::read(raw, &part.content, offset, chunk);
                if got.is_empty() {
                    break;
                }
                offset += got.len() as u64;
            }
            total += offset;
        }
        total
    }

    /// Applies the edits to the transaction: recipients, quarantine, and the
    /// message rebuilt with header fields removed and added (added ones go
    /// right after the leading trace fields, which stay first).
    pub fn finish(self, tx: &mut DataTransaction) {
        tx.envelope.recipients = self.recipients;
        tx.trusted = self.trusted;
        if self.quarantine.is_some() {
            tx.quarantine = self.quarantine;
        }
        let raw = if self.body.is_empty() {
            Arc::try_unwrap(self.raw).unwrap_or_else(|arc| (*arc).clone())
        } else {
            body::apply(&self.raw, &self.body)
        };
        if self.added.is_empty() && self.removed.is_empty() {
            tx.message = raw;
            return;
        }
        tx.message = rewrite(&raw, &self.added, &self.removed);
    }
}

/// The header section as logical fields: (name, raw lines including CRLF).
/// Lines without a colon keep their bytes with no name, so the pieces add up to
/// the section and nothing is lost in a rewrite.
pub(super) fn fields(raw: &[u8]) -> Vec<(Option<&str>, &[u8])> {
    let section = &raw[..body_start(raw)];
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < section.len() {
        let Some(nl) = section[i..].iter().position(|&b| b == b'\n') else {
            break;
        };
        let line_end = i + nl + 1;
        if section[start..line_end] == *b"\r\n" {
            // The empty line ending the section.
            break;
        }
        if !matches!(section.get(line_end), Some(b' ' | b'\t')) {
            let field = &section[start..line_end];
            let name = field
                .iter()
                .position(|&b| b == b':')
                .and_then(|colon| std::str::from_utf8(&field[..colon]).ok())
                .map(str::trim);
            out.push((name, field));
            start = line_end;
        }
        i = line_end;
    }
    out
}

fn top_headers(raw: &[u8]) -> Vec<(String, String)> {
    fields(raw)
        .into_iter()
        .filter_map(|(name, field)| {
            let name = name?;
            let colon = field.iter().position(|&b| b == b':')?;
            let value = String::from_utf8_lossy(&field[colon + 1..]);
            let unfolded = value.replace("\r\n", "").replace('\n', "");
            Some((name.to_string(), unfolded.trim().to_string()))
        })
        .collect()
}

fn rewrite(raw: &[u8], added: &[(String, String)], removed: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + added.len() * 64);
    let mut inserted = false;
    let insert = |out: &mut Vec<u8>| {
        for (name, value) in added {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    };
    let mut consumed = 0;
    for (name, field) in fields(raw) {
        consumed += field.len();
        let trace = name.is_some_and(|n| {
            n.eq_ignore_ascii_case("Received") || n.eq_ignore_ascii_case("Return-Path")
        });
        if !trace && !inserted {
            insert(&mut out);
            inserted = true;
        }
        let drop = name.is_some_and(|n| removed.iter().any(|r| r.eq_ignore_ascii_case(n)));
        if !drop {
            out.extend_from_slice(field);
        }
    }
    if !inserted {
        insert(&mut out);
    }
    // The empty line and the body, untouched.
    out.extend_from_slice(&raw[consumed..]);
    out
}

fn refusal(r: Refusal) -> BodyError {
    match r {
        Refusal::Signed => BodyError::Signed,
        Refusal::NotRemovable => BodyError::NotRemovable,
    }
}

/// RFC 3461 xtext: `+`, `=` and characters outside `!`..`~` as `+HH`.
fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

fn to_address(a: &WitAddress) -> Result<Address, EditError> {
    let text = format!("{}@{}", a.local_part, a.domain);
    if check::address(&a.local_part, &a.domain) {
        Ok(Address(text))
    } else {
        Err(EditError::InvalidAddress)
    }
}

impl Host for HostState {}

impl HostState {
    /// A host call that reads the message's MIME parse (made on first use).
    fn with_mime<R>(
        &mut self,
        m: &Resource<MessageRef>,
        read: impl FnOnce(&Mime) -> R,
    ) -> wasmtime::Result<R> {
        self.host_call_done();
        Ok(read(self.table.get(m)?.lock().parsed().1))
    }
}

impl HostMessage for HostState {
    async fn headers(&mut self, m: Resource<MessageRef>) -> wasmtime::Result<Vec<Header>> {
        self.host_call_done();
        Ok(self.table.get(&m)?.lock().current_headers())
    }

    async fn header(
        &mut self,
        m: Resource<MessageRef>,
        name: String,
    ) -> wasmtime::Result<Vec<String>> {
        self.host_call_done();
        Ok(self
            .table
            .get(&m)?
            .lock()
            .current_headers()
            .into_iter()
            .filter(|h| h.name.eq_ignore_ascii_case(&name))
            .map(|h| h.value)
            .collect())
    }

    async fn subject(&mut self, m: Resource<MessageRef>) -> wasmtime::Result<Option<String>> {
        self.with_mime(&m, |mime| mime.subject.clone())
    }

    async fn size(&mut self, m: Resource<MessageRef>) -> wasmtime::Result<u64> {
        self.host_call_done();
        Ok(self.table.get(&m)?.lock().raw.len() as u64)
    }

    async fn parts(&mut self, m: Resource<MessageRef>) -> wasmtime::Result<Vec<Part>> {
        self.with_mime(&m, |mime| {
            mime.parts.iter().map(|p| p.info.clone()).collect()
        })
    }

    async fn text_body(
        &mut self,
        m: Resource<MessageRef>,
        n: u32,
    ) -> wasmtime::Result<Option<String>> {
        self.with_mime(&m, |mime| mime.texts.get(n as usize).cloned())
    }

    async fn read_part(
        &mut self,
        m: Resource<MessageRef>,
        index: u32,
        offset: u64,
        len: u32,
    ) -> wasmtime::Result<Vec<u8>> {
        self.host_call_done();
        let mut state = self.table.get(&m)?.lock();
        let (raw, mime) = state.parsed();
        Ok(match mime.parts.get(index as usize) {
            Some(p) => MessageState::read(raw, &p.content, offset, len),
            None => Vec::new(),
        })
    }

    async fn read_raw(
        &mut self,
        m: Resource<MessageRef>,
        offset: u64,
        len: u32,
    ) -> wasmtime::Result<Vec<u8>> {
        self.host_call_done();
        let state = self.table.get(&m)?.lock();
        let all = Content::Raw(0..state.raw.len());
        Ok(MessageState::read(&state.raw, &all, offset, len))
    }

    async fn add_header(
        &mut self,
        m: Resource<MessageRef>,
        name: String,
        value: String,
    ) -> wasmtime::Result<Result<(), EditError>> {
        self.host_call_done();
        if !check::header_name(&name) {
            return Ok(Err(EditError::InvalidName));
        }
        if !check::header_value(&name, &value) {
            return Ok(Err(EditError::InvalidValue));
        }
        self.table.get(&m)?.lock().added.push((name, value));
        Ok(Ok(()))
    }

    async fn remove_header(
        &mut self,
        m: Resource<MessageRef>,
        name: String,
    ) -> wasmtime::Result<Result<u32, EditError>> {
        self.host_call_done();
        if !check::header_name(&name) {
            return Ok(Err(EditError::InvalidName));
        }
        if name.eq_ignore_ascii_case("Received") {
            return Ok(Err(EditError::Protected));
        }
        let mut state = self.table.get(&m)?.lock();
        let before = state.current_headers().len();
        state.added.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        state.removed.push(name);
        let after = state.current_headers().len();
        Ok(Ok((before - after) as u32))
    }

    async fn recipients(&mut self, m: Resource<MessageRef>) -> wasmtime::Result<Vec<WitAddress>> {
        self.host_call_done();
        Ok(self
            .table
            .get(&m)?
            .lock()
            .recipients
            .iter()
            .map(|r| crate::plugins::convert::address(&r.address))
            .collect())
    }

    async fn add_recipient(
        &mut self,
        m: Resource<MessageRef>,
        recipient: WitAddress,
    ) -> wasmtime::Result<Result<(), EditError>> {
        self.host_call_done();
        let address = match to_address(&recipient) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let trusted = self.may_add_recipients;
        let mut state = self.table.get(&m)?.lock();
        if !state.recipients.iter().any(|r| r.address == address) {
            if trusted {
                state.trusted.push(address.clone());
            }
            state.recipients.push(Recipient::new(address.0));
        }
        Ok(Ok(()))
    }

    async fn replace_recipient(
        &mut self,
        m: Resource<MessageRef>,
        recipient: WitAddress,
        by: Vec<WitAddress>,
    ) -> wasmtime::Result<Result<bool, EditError>> {
        self.host_call_done();
        let by = match by.iter().map(to_address).collect::<Result<Vec<_>, _>>() {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let old = format!("{}@{}", recipient.local_part, recipient.domain);
        let trusted = self.may_add_recipients;
        let mut state = self.table.get(&m)?.lock();
        let Some(i) = state
            .recipients
            .iter()
            .position(|r| r.address.as_str().eq_ignore_ascii_case(&old))
        else {
            return Ok(Ok(false));
        };
        let mut original = state.recipients.remove(i);
        // The address the sender wrote, for bounces (RFC 3461 4.2), unless
        // the client gave one.
        if original.orcpt.is_none() {
            original.orcpt = Some(format!("rfc822;{}", xtext(original.address.as_str())));
        }
        let mut at = i;
        for address in by {
            // Already a recipient (two aliases to one target): one copy.
            if state.recipients.iter().any(|r| r.address == address) {
                continue;
            }
            if trusted {
                state.trusted.push(address.clone());
            }
            let r = Recipient {
                address,
                ..original.clone()
            };
            state.recipients.insert(at, r);
            at += 1;
        }
        Ok(Ok(true))
    }

    async fn remove_recipient(
        &mut self,
        m: Resource<MessageRef>,
        recipient: WitAddress,
    ) -> wasmtime::Result<bool> {
        self.host_call_done();
        let text = format!("{}@{}", recipient.local_part, recipient.domain);
        let mut state = self.table.get(&m)?.lock();
        let before = state.recipients.len();
        state
            .recipients
            .retain(|r| !r.address.as_str().eq_ignore_ascii_case(&text));
        Ok(state.recipients.len() != before)
    }

    async fn quarantine(
        &mut self,
        m: Resource<MessageRef>,
        reason: String,
    ) -> wasmtime::Result<()> {
        self.host_call_done();
        let reason = reason.replace(['\r', '\n', '\0'], " ");
        self.table.get(&m)?.lock().quarantine = Some(reason);
        Ok(())
    }

    async fn add_footer(
        &mut self,
        m: Resource<MessageRef>,
        text: String,
        html: String,
    ) -> wasmtime::Result<Result<(), BodyError>> {
        self.host_call_done();
        let mut state = self.table.get(&m)?.lock();
        if let Err(r) = body::check_footer(&state.raw) {
            return Ok(Err(refusal(r)));
        }
        // A footer's text goes into the message as is: no NULs, and line
        // ends the relay makes CRLF.
        let clean = |s: String| s.replace('\0', "");
        state.body.footers.push(Footer {
            text: clean(text),
            html: clean(html),
        });
        Ok(Ok(()))
    }

    async fn remove_part(
        &mut self,
        m: Resource<MessageRef>,
        index: u32,
        reason: String,
    ) -> wasmtime::Result<Result<(), BodyError>> {
        self.host_call_done();
        let mut state = self.table.get(&m)?.lock();
        if let Err(r) = body::check_removal(&state.raw, index) {
            return Ok(Err(refusal(r)));
        }
        if !state.body.removed.iter().any(|(i, _)| *i == index) {
            state.body.removed.push((index, reason));
        }
        Ok(Ok(()))
    }

    async fn body_edits(&mut self, m: Resource<MessageRef>) -> wasmtime::Result<WitBodyEdits> {
        self.host_call_done();
        let state = self.table.get(&m)?.lock();
        Ok(WitBodyEdits {
            removed: state.body.removed.iter().map(|(i, _)| *i).collect(),
            footers: u32::try_from(state.body.footers.len()).unwrap_or(u32::MAX),
        })
    }

    async fn drop(&mut self, m: Resource<MessageRef>) -> wasmtime::Result<()> {
        self.table.delete(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"Received: from a\r\n\tby b\r\nSubject: hi\r\nX-Spam: yes\r\n\r\nbody\r\n";

    #[test]
    fn header_edits_keep_trace_fields_first() {
        let out = rewrite(MSG, &[("X-Checked".into(), "1".into())], &["x-spam".into()]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: from a\r\n\tby b\r\nX-Checked: 1\r\nSubject: hi\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn parse_reads_parts_in_ranges() {
        let raw = b"Subject: t\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhello\r\n--x\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=a.bin\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--x--\r\n";
        let mut s = MessageState::new(Arc::new(raw.to_vec()), vec![]);
        assert!(s.mime.is_none(), "parsed only on first use");
        let (raw, m) = s.parsed();
        assert_eq!(m.subject.as_deref(), Some("t"));
        assert_eq!(m.texts, vec!["hello".to_string()]);
        let att = m.parts.iter().find(|p| p.info.is_attachment).unwrap();
        assert_eq!(att.info.name.as_deref(), Some("a.bin"));
        assert_eq!(att.info.size, 4);
        assert_eq!(MessageState::read(raw, &att.content, 1, 2), vec![1, 2]);
        assert_eq!(MessageState::read(raw, &att.content, 3, 100), vec![3]);
        assert!(MessageState::read(raw, &att.content, 99, 100).is_empty());
        let h = s.current_headers();
        assert_eq!((h[0].name.as_str(), h[0].value.as_str()), ("Subject", "t"));
    }
}
