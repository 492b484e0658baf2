//! The authentication results of one transaction, as a plain value: what the
//! `Authentication-Results:` header says (RFC 8601), what the built-in
//! enforcement reads, and what hooks can be given.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Every result of one transaction. SPF is known from MAIL FROM on; the rest
/// once the message has ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Results {
    /// SPF of the HELO name (RFC 7208 2.3), when it was checked.
    pub spf_helo: Option<Spf>,
    /// SPF of the MAIL FROM domain (of the HELO name for the null sender).
    pub spf_mail_from: Option<Spf>,
    /// One entry per `DKIM-Signature:` header, in message order.
    pub dkim: Vec<Dkim>,
    /// DMARC of the `From:` domain, when evaluated.
    pub dmarc: Option<Dmarc>,
    /// The ARC chain, when validated.
    pub arc: Option<Arc>,
}

/// An SPF verdict (RFC 7208 2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfResult {
    /// The client is authorized.
    Pass,
    /// The client is not authorized.
    Fail,
    /// Probably not authorized (`~all`).
    SoftFail,
    /// No assertion (`?all`, or nothing matched).
    Neutral,
    /// No SPF record.
    None,
    /// A transient DNS error: try again later.
    TempError,
    /// The record is broken or over a limit.
    PermError,
}

impl SpfResult {
    /// The RFC 8601 result keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::Neutral => "neutral",
            SpfResult::None => "none",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }
}

/// One SPF check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spf {
    /// The verdict.
    pub result: SpfResult,
    /// The identity checked: the MAIL FROM address (`postmaster@HELO` for
    /// the null sender), or the HELO name.
    pub identity: String,
    /// The domain whose record was evaluated.
    pub domain: String,
    /// Why, for the header comment.
    pub reason: String,
}

/// A DKIM, DMARC or ARC verdict (RFC 8601 2.7.1, 2.7.2; RFC 8617).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Verified.
    Pass,
    /// Did not verify.
    Fail,
    /// Present but not usable (DKIM).
    Neutral,
    /// Nothing to check.
    None,
    /// A transient DNS error.
    TempError,
    /// Broken beyond checking.
    PermError,
}

impl Verdict {
    /// The RFC 8601 result keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Neutral => "neutral",
            Verdict::None => "none",
            Verdict::TempError => "temperror",
            Verdict::PermError => "permerror",
        }
    }
}

/// One DKIM signature's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dkim {
    /// The verdict.
    pub result: Verdict,
    /// `d=`.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    /// The first eight characters of `b=` (RFC 6008), to tell signatures apart.
    pub b: String,
    /// Why it did not pass.
    pub reason: Option<String>,
}

/// A DMARC policy (`p=` / `sp=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Monitor only.
    None,
    /// Treat failing mail as suspicious.
    Quarantine,
    /// Refuse failing mail.
    Reject,
}

impl Policy {
    /// The record's keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Quarantine => "quarantine",
            Policy::Reject => "reject",
        }
    }
}

/// DMARC of the `From:` domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dmarc {
    /// The verdict.
    pub result: Verdict,
    /// The `From:` domain.
    pub domain: String,
    /// The domain's published policy for this message.
    pub policy: Policy,
    /// What this relay does about it: the policy when the message failed
    /// and `dmarc_enforce` is on (unless a trusted ARC sealer vouches for
    /// it), else `None`.
    pub disposition: Policy,
    /// SPF passed for a domain aligned with `From:`.
    pub spf_aligned: bool,
    /// A DKIM signature passed for a domain aligned with `From:`.
    pub dkim_aligned: bool,
}

/// The ARC chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arc {
    /// The chain's validation (RFC 8617 `cv`).
    pub result: Verdict,
    /// ARC sets in the message.
    pub sets: u32,
    /// The `d=` of the newest seal.
    pub sealer: Option<String>,
    /// That sealer is in `trusted_arc_sealers` and the chain passed.
    pub trusted: bool,
}

impl Results {
    /// The `Authentication-Results:` header (RFC 8601) with `authserv_id`,
    /// CRLF-terminated and folded one result per line.
    pub fn header(&self, authserv_id: &str, client_ip: std::net::IpAddr) -> String {
        let mut h = format!("Authentication-Results: {authserv_id}");
        let mut any = false;
        let mut push = |h: &mut String, item: String| {
            h.push_str(";\r\n\t");
            h.push_str(&item);
            any = true;
        };
        for (spf, property) in [
            (&self.spf_mail_from, "smtp.mailfrom"),
            (&self.spf_helo, "smtp.helo"),
        ] {
            if let Some(spf) = spf {
                push(
                    &mut h,
                    format!(
                        "spf={} ({authserv_id}: {}) {property}={}",
                        spf.result.as_str(),
                        comment(&spf.reason),
                        pvalue(&spf.identity)
                    ),
                );
            }
        }
        for d in &self.dkim {
            let mut item = format!("dkim={}", d.result.as_str());
            if let Some(reason) = &d.reason {
                let _ = write!(item, " ({})", comment(reason));
            }
            if !d.domain.is_empty() {
                let _ = write!(item, " header.d={}", pvalue(&d.domain));
            }
            if !d.selector.is_empty() {
                let _ = write!(item, " header.s={}", pvalue(&d.selector));
            }
            if !d.b.is_empty() {
                let _ = write!(item, " header.b={}", pvalue(&d.b));
            }
            push(&mut h, item);
        }
        if let Some(d) = &self.dmarc {
            push(
                &mut h,
                format!(
                    "dmarc={} header.from={} policy.dmarc={}",
                    d.result.as_str(),
                    pvalue(&d.domain),
                    d.policy.as_str()
                ),
            );
        }
        if let Some(a) = &self.arc {
            let mut item = format!("arc={}", a.result.as_str());
            if let Some(s) = &a.sealer {
                let _ = write!(item, " (sealed by {})", comment(s));
            }
            let _ = write!(item, " smtp.remote-ip={client_ip}");
            push(&mut h, item);
        }
        if !any {
            h.push_str("; none");
        }
        h.push_str("\r\n");
        h
    }
}

/// Text safe inside a header comment: printable ASCII, no parentheses or
/// backslashes, bounded.
fn comment(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| match c {
            '(' | ')' | '\\' => ' ',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect()
}

/// A property value (RFC 8601 2.2): a token as it is, anything else quoted.
fn pvalue(s: &str) -> String {
    let token = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_graphic() && !"()<>,;:\\\"/[]?=".contains(c));
    if token {
        return s.to_string();
    }
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars().take(255) {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            c if c.is_control() => q.push('?'),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lists_each_result() {
        let r = Results {
            spf_mail_from: Some(Spf {
                result: SpfResult::SoftFail,
                identity: "a@b.test".into(),
                domain: "b.test".into(),
                reason: "matched ~all".into(),
            }),
            spf_helo: Some(Spf {
                result: SpfResult::None,
                identity: "client.test".into(),
                domain: "client.test".into(),
                reason: "no SPF record".into(),
            }),
            dkim: vec![Dkim {
                result: Verdict::Fail,
                domain: "b.test".into(),
                selector: "s1".into(),
                b: "abcd1234".into(),
                reason: Some("body hash (mismatch)".into()),
            }],
            dmarc: Some(Dmarc {
                result: Verdict::Fail,
                domain: "b.test".into(),
                policy: Policy::Reject,
                disposition: Policy::None,
                spf_aligned: false,
                dkim_aligned: false,
            }),
            arc: None,
        };
        let h = r.header("relay.test", "192.0.2.1".parse().unwrap());
        assert_eq!(
            h,
            "Authentication-Results: relay.test;\r\n\
             \tspf=softfail (relay.test: matched ~all) smtp.mailfrom=a@b.test;\r\n\
             \tspf=none (relay.test: no SPF record) smtp.helo=client.test;\r\n\
             \tdkim=fail (body hash  mismatch ) header.d=b.test header.s=s1 header.b=abcd1234;\r\n\
             \tdmarc=fail header.from=b.test policy.dmarc=reject\r\n"
        );
        assert_eq!(
            Results::default().header("relay.test", "192.0.2.1".parse().unwrap()),
            "Authentication-Results: relay.test; none\r\n"
        );
    }

    #[test]
    fn property_values_are_quoted_when_needed() {
        for (input, expected) in [
            ("a@b.test", "a@b.test"),
            ("with space@b.test", "\"with space@b.test\""),
            ("a\"b@c", "\"a\\\"b@c\""),
            ("", "\"\""),
        ] {
            assert_eq!(pvalue(input), expected, "{input}");
        }
    }
}
