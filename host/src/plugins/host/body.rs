//! Body edits the data hook's plugins ask for (a footer on every text body,
//! a part replaced by a note saying why), applied once after the whole chain
//! and before the message is signed and spooled. Plugins cannot do this
//! safely themselves: a footer has to follow each part's transfer encoding
//! and charset, and the multipart structure has to stay whole.
//!
//! Part indexes are those of the message as received (`message.parts`). A
//! message with an S/MIME or PGP signature (or encryption) is never changed:
//! the edit would break the signature.

use std::ops::Range;

use base64::Engine as _;
use mail_parser::{Encoding, Message, MessageParser, MimeHeaders, PartType};

use super::message::fields;

/// A footer: `text` for text/plain bodies, `html` for text/html ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Appended to plain text bodies.
    pub text: String,
    /// Inserted before `</body>` of HTML bodies (appended without one).
    pub html: String,
}

/// The body edits of one data hook.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyEdits {
    /// In the order asked; all are applied to every text body.
    pub footers: Vec<Footer>,
    /// Part index (as received) and why it was removed.
    pub removed: Vec<(u32, String)>,
}

impl BodyEdits {
    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.footers.is_empty() && self.removed.is_empty()
    }
}

/// Why a body edit cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The message is signed or encrypted (S/MIME or PGP).
    Signed,
    /// No such part, or the whole message (part 0) or a container.
    NotRemovable,
}

fn type_of(part: &mail_parser::MessagePart<'_>) -> (String, String) {
    match part.content_type() {
        Some(ct) => (
            ct.ctype().to_ascii_lowercase(),
            ct.subtype().unwrap_or("").to_ascii_lowercase(),
        ),
        None => ("text".into(), "plain".into()),
    }
}

/// True for a message with an S/MIME or PGP signature or encryption, or a
/// part that is one: changing any byte of it would break what it protects.
pub fn is_signed(m: &Message<'_>) -> bool {
    m.parts.iter().any(|p| {
        let (t, s) = type_of(p);
        (t == "multipart" && (s == "signed" || s == "encrypted"))
            || (t == "application"
                && matches!(
                    s.as_str(),
                    "pkcs7-mime"
                        | "x-pkcs7-mime"
                        | "pkcs7-signature"
                        | "pgp-encrypted"
                        | "pgp-signature"
                ))
    })
}

/// Whether part `index` of `raw` may be removed: a part that is neither the
/// whole message nor a multipart container.
pub fn check_removal(raw: &[u8], index: u32) -> Result<(), Refusal> {
    let m = MessageParser::default()
        .parse(raw)
        .ok_or(Refusal::NotRemovable)?;
    if is_signed(&m) {
        return Err(Refusal::Signed);
    }
    match m.parts.get(index as usize) {
        Some(p) if index > 0 && !matches!(p.body, PartType::Multipart(_)) => Ok(()),
        _ => Err(Refusal::NotRemovable),
    }
}

/// Whether a footer may be added to `raw`.
pub fn check_footer(raw: &[u8]) -> Result<(), Refusal> {
    match MessageParser::default().parse(raw) {
        Some(m) if is_signed(&m) => Err(Refusal::Signed),
        _ => Ok(()),
    }
}

/// `raw` with the edits applied (unchanged when there are none, or when it
/// is signed).
pub fn apply(raw: &[u8], edits: &BodyEdits) -> Vec<u8> {
    if edits.is_empty() {
        return raw.to_vec();
    }
    let Some(m) = MessageParser::default().parse(raw) else {
        return raw.to_vec();
    };
    if is_signed(&m) {
        return raw.to_vec();
    }
    let mut changes: Vec<(Range<usize>, Vec<u8>)> = Vec::new();
    for (index, reason) in &edits.removed {
        let Some(p) = m.parts.get(*index as usize) else {
            continue;
        };
        if *index == 0 || matches!(p.body, PartType::Multipart(_)) {
            continue;
        }
        let name = p.attachment_name().unwrap_or("a part");
        changes.push((span(p), removal_note(name, reason)));
    }
    if !edits.footers.is_empty() {
        let mut bodies: Vec<u32> = m.text_body.iter().chain(&m.html_body).copied().collect();
        bodies.sort_unstable();
        bodies.dedup();
        for index in bodies {
            if m.attachments.contains(&index) {
                continue;
            }
            let Some(p) = m.parts.get(index as usize) else {
                continue;
            };
            let range = span(p);
            // A body inside a removed part goes with it.
            if changes
                .iter()
                .any(|(r, _)| r.start <= range.start && range.end <= r.end)
            {
                continue;
            }
            if let Some(new) = with_footers(raw, p, &edits.footers) {
                changes.push((range, new));
            }
        }
    }
    changes.sort_by_key(|(r, _)| r.start);
    let mut out = Vec::with_capacity(raw.len() + 1024);
    let mut at = 0;
    for (range, bytes) in changes {
        if range.start < at {
            // Overlaps one already applied (a part inside another): skipped.
            continue;
        }
        out.extend_from_slice(&raw[at..range.start]);
        out.extend_from_slice(&bytes);
        at = range.end;
    }
    out.extend_from_slice(&raw[at..]);
    out
}

/// A part's bytes: its header fields and its body.
fn span(p: &mail_parser::MessagePart<'_>) -> Range<usize> {
    p.offset_header as usize..p.offset_end as usize
}

/// The text part that stands where a part was removed.
fn removal_note(name: &str, reason: &str) -> Vec<u8> {
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    let text = format!(
        "{} was removed from this message: {}\r\n",
        clean(name),
        clean(reason)
    );
    let mut out = b"Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\nContent-Disposition: inline\r\n\r\n"
        .to_vec();
    out.extend_from_slice(&quoted_printable(text.as_bytes()));
    out
}

/// Part `p` rebuilt with the footers in its body, in its own transfer
/// encoding, labelled UTF-8; none for a part that is not a text body.
fn with_footers(
    raw: &[u8],
    p: &mail_parser::MessagePart<'_>,
    footers: &[Footer],
) -> Option<Vec<u8>> {
    let (kind, sub) = type_of(p);
    let html = kind == "text" && sub == "html";
    if kind != "text" || !(sub == "plain" || html) {
        return None;
    }
    let mut text = match &p.body {
        PartType::Text(t) | PartType::Html(t) => t.to_string(),
        _ => return None,
    };
    for f in footers {
        text = if html {
            add_html(&text, &f.html)
        } else {
            add_text(&text, &f.text)
        };
    }
    let body_start = p.offset_body as usize;
    let header = &raw[p.offset_header as usize..body_start];
    let declared =
        header_value(header, "Content-Transfer-Encoding").map(|v| v.trim().to_ascii_lowercase());
    let ascii = text.is_ascii() && text.lines().all(|l| l.len() <= 998);
    let (cte, body) = match p.encoding {
        Encoding::Base64 => (None, base64_lines(text.as_bytes())),
        Encoding::QuotedPrintable => (None, quoted_printable(text.as_bytes())),
        Encoding::None if ascii => (None, crlf(&text).into_bytes()),
        // 8bit stays 8bit when its lines fit; 7bit text that is no longer
        // ASCII becomes quoted-printable.
        Encoding::None
            if declared.as_deref() == Some("8bit") && text.lines().all(|l| l.len() <= 998) =>
        {
            (None, crlf(&text).into_bytes())
        }
        Encoding::None => (Some("quoted-printable"), quoted_printable(text.as_bytes())),
    };
    let content_type = content_type_utf8(p);
    let mut out = Vec::with_capacity(header.len() + body.len() + 64);
    let mut saw_cte = false;
    for (name, field) in fields(header) {
        match name {
            Some(n) if n.eq_ignore_ascii_case("Content-Type") => {
                out.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
            }
            Some(n) if n.eq_ignore_ascii_case("Content-Transfer-Encoding") => {
                saw_cte = true;
                match cte {
                    Some(c) => out.extend_from_slice(
                        format!("Content-Transfer-Encoding: {c}\r\n").as_bytes(),
                    ),
                    None => out.extend_from_slice(field),
                }
            }
            _ => out.extend_from_slice(field),
        }
    }
    if header_value(header, "Content-Type").is_none() {
        out.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
    }
    if let (Some(c), false) = (cte, saw_cte) {
        out.extend_from_slice(format!("Content-Transfer-Encoding: {c}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    // The part's body ended with whatever line end the original had before
    // the next boundary; that stays outside the span.
    Some(out)
}

/// The unfolded value of the first field called `name` in a header section.
fn header_value(section: &[u8], name: &str) -> Option<String> {
    fields(section).into_iter().find_map(|(n, field)| {
        let n = n?;
        if !n.eq_ignore_ascii_case(name) {
            return None;
        }
        let colon = field.iter().position(|&b| b == b':')?;
        Some(
            String::from_utf8_lossy(&field[colon + 1..])
                .replace("\r\n", "")
                .replace('\n', "")
                .trim()
                .to_string(),
        )
    })
}

/// The part's Content-Type with `charset=utf-8` and its other parameters.
fn content_type_utf8(p: &mail_parser::MessagePart<'_>) -> String {
    let (kind, sub) = type_of(p);
    let mut out = format!("{kind}/{sub}; charset=utf-8");
    if let Some(ct) = p.content_type() {
        for a in ct.attributes().into_iter().flatten() {
            let (name, value) = (&a.name, &a.value);
            if name.eq_ignore_ascii_case("charset") {
                continue;
            }
            let plain = !value.is_empty()
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
            if plain {
                out.push_str(&format!("; {name}={value}"));
            } else {
                let quoted = value.replace('\\', "\\\\").replace('"', "\\\"");
                out.push_str(&format!("; {name}=\"{quoted}\""));
            }
        }
    }
    out
}

/// Text with every line ending in CRLF.
fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

fn add_text(body: &str, footer: &str) -> String {
    let mut out = body.to_string();
    if !out.ends_with('\n') && !out.is_empty() {
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&crlf(footer));
    if !out.ends_with('\n') {
        out.push_str("\r\n");
    }
    out
}

fn add_html(body: &str, footer: &str) -> String {
    let lower = body.to_ascii_lowercase();
    match lower.rfind("</body>") {
        Some(at) => format!("{}{footer}\r\n{}", &body[..at], &body[at..]),
        None => {
            let mut out = body.to_string();
            if !out.ends_with('\n') {
                out.push_str("\r\n");
            }
            out.push_str(footer);
            out.push_str("\r\n");
            out
        }
    }
}

/// Base64 in lines of 76 characters.
fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = Vec::with_capacity(encoded.len() + encoded.len() / 76 * 2 + 2);
    for line in encoded.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Quoted-printable (RFC 2045 6.7): line ends kept as hard breaks, soft
/// breaks before 76 characters, trailing white space encoded.
fn quoted_printable(bytes: &[u8]) -> Vec<u8> {
    let text = bytes.to_vec();
    let mut out = Vec::with_capacity(text.len() * 3 / 2);
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    for (n, line) in lines.iter().enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut width = 0;
        for (i, &b) in line.iter().enumerate() {
            let last = i + 1 == line.len();
            let literal =
                (b == b' ' || b == b'\t') && !last || (33..=126).contains(&b) && b != b'=';
            let piece = if literal {
                vec![b]
            } else {
                format!("={b:02X}").into_bytes()
            };
            if width + piece.len() > 75 {
                out.extend_from_slice(b"=\r\n");
                width = 0;
            }
            width += piece.len();
            out.extend_from_slice(&piece);
        }
        if n + 1 < lines.len() {
            out.extend_from_slice(b"\r\n");
        }
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer() -> BodyEdits {
        BodyEdits {
            footers: vec![Footer {
                text: "Confidential: for the addressee only.".into(),
                html: "<p>Confidential: for the addressee only.</p>".into(),
            }],
            removed: vec![],
        }
    }

    fn parse(raw: &[u8]) -> Message<'_> {
        MessageParser::default().parse(raw).unwrap()
    }

    #[test]
    fn quoted_printable_round_trips() {
        let text = "Grüße aus Köln = fine\r\nA line with trailing space \r\n".to_string()
            + &"x".repeat(200);
        let qp = quoted_printable(text.as_bytes());
        for line in qp.split(|&b| b == b'\n') {
            assert!(line.len() <= 77, "{}", String::from_utf8_lossy(line));
        }
        let mut raw = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n".to_vec();
        raw.extend_from_slice(&qp);
        let m = parse(&raw);
        assert_eq!(m.body_text(0).unwrap().trim_end(), text.trim_end());
    }

    #[test]
    fn footers_follow_each_parts_encoding_and_charset() {
        for (name, raw) in [
            ("plain 7bit", "Subject: a\r\n\r\nhello\r\n".to_string()),
            (
                "latin-1 qp",
                "Subject: a\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe\r\n".into(),
            ),
            (
                "base64",
                format!(
                    "Subject: a\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
                    base64::engine::general_purpose::STANDARD.encode("héllo")
                ),
            ),
            (
                "alternative",
                "Subject: a\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nplain\r\n--b\r\nContent-Type: text/html\r\n\r\n<html><body><p>html</p></body></html>\r\n--b--\r\n".into(),
            ),
        ] {
            let out = apply(raw.as_bytes(), &footer());
            let m = parse(&out);
            let text = m.body_text(0).unwrap();
            assert!(text.contains("Confidential: for the addressee only."), "{name}: {text}");
            assert!(text.contains(if name == "latin-1 qp" { "Grüße" } else { "" }), "{name}");
            if name == "alternative" {
                let html = m.body_html(0).unwrap();
                assert!(
                    html.contains("<p>html</p><p>Confidential: for the addressee only.</p>\r\n</body>"),
                    "{html}"
                );
                assert_eq!(m.parts.len(), 3, "structure kept");
            }
            assert_eq!(m.subject(), Some("a"), "{name}: headers kept");
        }
    }

    #[test]
    fn a_removed_part_leaves_a_note_and_the_rest_whole() {
        let raw = b"Subject: a\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--m\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=evil.exe\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--m\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=ok.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--m--\r\n";
        assert_eq!(check_removal(raw, 2), Ok(()));
        assert_eq!(check_removal(raw, 0), Err(Refusal::NotRemovable));
        assert_eq!(check_removal(raw, 9), Err(Refusal::NotRemovable));
        let edits = BodyEdits {
            footers: footer().footers,
            removed: vec![(2, "executable attachments are not allowed".into())],
        };
        let out = apply(raw, &edits);
        let m = parse(&out);
        assert_eq!(m.parts.len(), 4);
        assert_eq!(m.attachments.len(), 1, "{}", String::from_utf8_lossy(&out));
        let note = m.body_text(1).unwrap();
        assert!(
            note.contains(
                "evil.exe was removed from this message: executable attachments are not allowed"
            ),
            "{note}"
        );
        assert_eq!(m.attachment(0).unwrap().contents(), b"%PDF-1.4\n");
        assert!(m.body_text(0).unwrap().contains("Confidential"));
    }

    #[test]
    fn signed_messages_are_left_alone() {
        let raw = b"Subject: a\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=s\r\n\r\n--s\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nMIIB\r\n--s--\r\n";
        assert_eq!(check_footer(raw), Err(Refusal::Signed));
        assert_eq!(check_removal(raw, 2), Err(Refusal::Signed));
        assert_eq!(apply(raw, &footer()), raw.to_vec());
    }
}
