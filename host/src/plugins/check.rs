//! What the relay checks in a plugin's answer before using it: a reply's code
//! class must match its verdict and no text may carry CR, LF or other control
//! characters, so a plugin can neither inject SMTP protocol nor bare line ends
//! into the message.

use std::borrow::Cow;

use crate::plugins::bindings::types::Reply as WitReply;
use crate::smtp::reply::Reply;

/// Longest reply text accepted (RFC 5321 4.5.3.1.5 allows 512 octets per line).
const MAX_TEXT: usize = 480;

fn clean_text(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

/// Checks a plugin reply whose code must be in one of `classes` (2, 4 or 5)
/// and converts it.
pub fn reply(r: &WitReply, classes: &[u16]) -> Result<Reply, String> {
    let class = r.code / 100;
    if !(200..600).contains(&r.code) || !classes.contains(&class) {
        return Err(format!(
            "reply code {} does not fit the verdict (expected {})",
            r.code,
            classes
                .iter()
                .map(|c| format!("{c}xx"))
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    if !r.enhanced.is_empty() && !enhanced(&r.enhanced, class) {
        return Err(format!(
            "enhanced code {:?} is not \"{class}.x.y\"",
            r.enhanced
        ));
    }
    if !clean_text(&r.text) || r.text.len() > MAX_TEXT {
        return Err("reply text has CR, LF or other control characters, or is too long".into());
    }
    Ok(Reply::new(
        r.code,
        Cow::Owned(r.enhanced.clone()),
        Cow::Owned(r.text.clone()),
    ))
}

/// `class.subject.detail` per RFC 3463, the class matching the reply code.
fn enhanced(e: &str, class: u16) -> bool {
    let parts: Vec<&str> = e.split('.').collect();
    parts.len() == 3
        && parts[0] == class.to_string()
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A header field name: printable ASCII without colon (RFC 5322 2.2).
pub fn header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 76
        && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// A header value that fits on one line with its name and has no CR, LF or
/// other control characters (tab is allowed).
pub fn header_value(name: &str, value: &str) -> bool {
    name.len() + 2 + value.len() <= 998 && !value.chars().any(|c| c.is_control() && c != '\t')
}

/// A usable envelope address for a recipient edit.
pub fn address(local: &str, domain: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 255
            && !s
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '@' | ','))
    };
    ok(local) && ok(domain) && !domain.starts_with('.') && !domain.ends_with('.')
}

/// A local-folder route: relative, no `..`, no empty or hidden components.
pub fn folder(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path.len() <= 255
        && path
            .split('/')
            .all(|c| !c.is_empty() && !c.starts_with('.') && clean_text(c) && !c.contains('\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, enhanced: &str, text: &str) -> WitReply {
        WitReply {
            code,
            enhanced: enhanced.into(),
            text: text.into(),
        }
    }

    #[test]
    fn replies() {
        for (answer, classes, ok) in [
            (r(550, "5.7.1", "no"), &[5][..], true),
            (r(550, "", "no"), &[5], true),
            (r(450, "4.7.1", "later"), &[4], true),
            (r(421, "4.7.0", "bye"), &[4, 5], true),
            (r(250, "2.0.0", "ok"), &[5], false),
            (r(450, "4.7.1", "x"), &[5], false),
            (r(550, "4.7.1", "x"), &[5], false),
            (r(550, "5.7", "x"), &[5], false),
            (r(550, "5.7.1", "x\r\n250 ok"), &[5], false),
            (r(550, "5.7.1", "x\nRCPT"), &[5], false),
            (r(550, "5.7.1", "nul\0"), &[5], false),
            (r(999, "", "x"), &[5], false),
        ] {
            assert_eq!(reply(&answer, classes).is_ok(), ok, "{answer:?}");
        }
    }

    #[test]
    fn headers_and_folders() {
        assert!(header_name("X-Score"));
        assert!(!header_name("X Score"));
        assert!(!header_name("X:Score"));
        assert!(!header_name(""));
        assert!(header_value("X", "a\tb"));
        assert!(!header_value("X", "a\r\nBcc: x"));
        assert!(!header_value("X", "a\nb"));
        assert!(folder("archive/2024"));
        assert!(!folder("../etc"));
        assert!(!folder("/etc"));
        assert!(!folder("a//b"));
        assert!(address("jo", "example.org"));
        assert!(!address("jo", "exa mple.org"));
        assert!(!address("", "example.org"));
    }
}
