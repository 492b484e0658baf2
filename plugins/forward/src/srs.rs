//! The Sender Rewriting Scheme as postsrsd and libsrs2 write it, so a
//! forwarded message passes SPF at its next hop and its bounces find their
//! way back:
//!
//! - `SRS0=HHHH=TT=example.org=jo@fwd.example` for the sender
//!   `jo@example.org`: `TT` is the day (mod 1024) in base32, `HHHH` the
//!   first characters of the base64 HMAC-SHA1 over `TT`, the domain and the
//!   local part (lowercased), with the forwarder's secret.
//! - `SRS1=HHHH=srs.other==HHHH=TT=example.org=jo@fwd.example` when the
//!   sender already is another forwarder's SRS0 address: it keeps that
//!   forwarder and its opaque part, so a bounce goes back there.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Timestamps wrap after this many days.
const DAYS: u64 = 1024;

/// Why an SRS address was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not in the SRS0 or SRS1 form.
    Malformed,
    /// The hash does not match: forged, or made with another secret.
    Forged,
    /// Older than the configured age.
    Expired,
}

/// A forwarder's SRS settings.
pub struct Srs {
    /// The domain of the rewritten addresses.
    pub domain: String,
    /// Secrets: the first signs, all verify (so a secret can be replaced).
    pub secrets: Vec<String>,
    /// Days an address stays valid.
    pub max_age_days: u64,
    /// Characters of the hash kept.
    pub hash_length: usize,
}

fn hash(secret: &str, parts: &[&str], len: usize) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    for p in parts {
        mac.update(p.to_ascii_lowercase().as_bytes());
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    b64[..len.min(b64.len())].to_string()
}

fn stamp(day: u64) -> String {
    let t = day % DAYS;
    let hi = BASE32[((t >> 5) & 31) as usize] as char;
    let lo = BASE32[(t & 31) as usize] as char;
    format!("{hi}{lo}")
}

fn stamp_day(tt: &str) -> Option<u64> {
    let mut day = 0;
    for c in tt.bytes() {
        let v = BASE32.iter().position(|&b| b == c.to_ascii_uppercase())? as u64;
        day = day * 32 + v;
    }
    (tt.len() == 2).then_some(day)
}

/// `local@domain` split at the last `@`.
fn split(address: &str) -> Option<(&str, &str)> {
    address.rsplit_once('@')
}

impl Srs {
    fn sign(&self, parts: &[&str]) -> String {
        hash(&self.secrets[0], parts, self.hash_length)
    }

    /// One of the secrets made this hash (compared without case, as
    /// libsrs2 does: some mail systems lowercase addresses).
    fn verify(&self, given: &str, parts: &[&str]) -> bool {
        self.secrets.iter().any(|s| {
            let h = hash(s, parts, self.hash_length);
            given.eq_ignore_ascii_case(&h)
        })
    }

    /// Rewrites `sender` (`local@domain`) for a message forwarded on `day`
    /// (days since the epoch).
    pub fn forward(&self, sender: &str, day: u64) -> Option<String> {
        let (local, domain) = split(sender)?;
        if domain.eq_ignore_ascii_case(&self.domain) {
            // Ours already: nothing to do.
            return Some(sender.to_string());
        }
        let upper = local.to_ascii_uppercase();
        if upper.starts_with("SRS1=") || upper.starts_with("SRS1+") || upper.starts_with("SRS1-") {
            // SRS1=HHH=host==opaque@domain: keep host and opaque, sign again.
            let rest = &local[5..];
            let (_, rest) = rest.split_once('=')?;
            let (host, opaque) = rest.split_once("==")?;
            let h = self.sign(&[host, opaque]);
            return Some(format!("SRS1={h}={host}=={opaque}@{}", self.domain));
        }
        if upper.starts_with("SRS0=") || upper.starts_with("SRS0+") || upper.starts_with("SRS0-") {
            // Another forwarder's SRS0: wrap it as SRS1 naming that forwarder.
            let opaque = &local[5..];
            let h = self.sign(&[domain, opaque]);
            return Some(format!("SRS1={h}={domain}=={opaque}@{}", self.domain));
        }
        let tt = stamp(day);
        let h = self.sign(&[&tt, domain, local]);
        Some(format!("SRS0={h}={tt}={domain}={local}@{}", self.domain))
    }

    /// True for an address in one of the SRS forms (whatever its domain).
    pub fn looks_like(local: &str) -> bool {
        let upper = local.to_ascii_uppercase();
        upper.starts_with("SRS0=") || upper.starts_with("SRS1=")
    }

    /// The address an SRS address of ours stands for: the original sender
    /// for SRS0, the other forwarder's SRS0 address for SRS1. `day` is
    /// today (days since the epoch).
    pub fn reverse(&self, local: &str, day: u64) -> Result<String, Invalid> {
        let upper = local.to_ascii_uppercase();
        if upper.starts_with("SRS0=") {
            let mut fields = local[5..].splitn(4, '=');
            let (Some(h), Some(tt), Some(domain), Some(orig)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(Invalid::Malformed);
            };
            if domain.is_empty() || orig.is_empty() {
                return Err(Invalid::Malformed);
            }
            if !self.verify(h, &[tt, domain, orig]) {
                return Err(Invalid::Forged);
            }
            let then = stamp_day(tt).ok_or(Invalid::Malformed)?;
            let age = (day % DAYS + DAYS - then) % DAYS;
            if age > self.max_age_days {
                return Err(Invalid::Expired);
            }
            return Ok(format!("{orig}@{domain}"));
        }
        if upper.starts_with("SRS1=") {
            let rest = &local[5..];
            let (h, rest) = rest.split_once('=').ok_or(Invalid::Malformed)?;
            let (host, opaque) = rest.split_once("==").ok_or(Invalid::Malformed)?;
            if host.is_empty() || opaque.is_empty() {
                return Err(Invalid::Malformed);
            }
            if !self.verify(h, &[host, opaque]) {
                return Err(Invalid::Forged);
            }
            return Ok(format!("SRS0={opaque}@{host}"));
        }
        Err(Invalid::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srs(secret: &str) -> Srs {
        Srs {
            domain: "fwd.example".into(),
            secrets: vec![secret.into()],
            max_age_days: 21,
            hash_length: 4,
        }
    }

    const DAY: u64 = 20_424; // 2025-12-01

    #[test]
    fn stamps_are_base32_days_mod_1024() {
        for (day, tt) in [
            (0, "AA"),
            (1, "AB"),
            (31, "A7"),
            (32, "BA"),
            (1023, "77"),
            (1024, "AA"),
        ] {
            assert_eq!(stamp(day), tt);
            assert_eq!(stamp_day(tt), Some(day % 1024));
        }
        assert_eq!(stamp_day("a1"), None);
        assert_eq!(stamp_day("ABC"), None);
    }

    #[test]
    fn srs0_round_trip_forgery_and_expiry() {
        let s = srs("s3cret");
        let fwd = s.forward("Jo.Smith@Example.org", DAY).unwrap();
        let tt = stamp(DAY);
        assert!(fwd.starts_with("SRS0="), "{fwd}");
        assert!(
            fwd.ends_with(&format!("={tt}=Example.org=Jo.Smith@fwd.example")),
            "{fwd}"
        );
        let local = fwd.rsplit_once('@').unwrap().0;
        assert_eq!(s.reverse(local, DAY), Ok("Jo.Smith@Example.org".into()));
        // Mail systems that lowercase addresses still come back.
        assert_eq!(
            s.reverse(&local.to_lowercase(), DAY),
            Ok("jo.smith@example.org".into())
        );
        // Within the age, then past it, also across the 1024-day wrap.
        assert!(s.reverse(local, DAY + 21).is_ok());
        assert_eq!(s.reverse(local, DAY + 22), Err(Invalid::Expired));
        // Another secret, or a changed field, is a forgery.
        assert_eq!(srs("other").reverse(local, DAY), Err(Invalid::Forged));
        let tampered = local.replace("Jo.Smith", "root");
        assert_eq!(s.reverse(&tampered, DAY), Err(Invalid::Forged));
        assert_eq!(s.reverse("SRS0=abcd=AA", DAY), Err(Invalid::Malformed));
        assert_eq!(s.reverse("jo", DAY), Err(Invalid::Malformed));
        // An old secret still verifies while listed after the new one.
        let rotated = Srs {
            secrets: vec!["new".into(), "s3cret".into()],
            ..srs("")
        };
        assert!(rotated.reverse(local, DAY).is_ok());
    }

    #[test]
    fn srs1_keeps_the_first_forwarder() {
        let first = Srs {
            domain: "first.example".into(),
            ..srs("one")
        };
        let second = srs("two");
        let a = first.forward("jo@example.org", DAY).unwrap();
        let b = second.forward(&a, DAY).unwrap();
        assert!(b.starts_with("SRS1="), "{b}");
        assert!(b.contains("=first.example=="), "{b}");
        // Forwarded again by the same forwarder: still names the first.
        let c = second.forward(&b, DAY).unwrap();
        assert!(c.contains("=first.example=="), "{c}");
        // A bounce to b goes back to the first forwarder's SRS0 address, and
        // that one back to the sender.
        let back = second.reverse(b.rsplit_once('@').unwrap().0, DAY).unwrap();
        assert_eq!(back, a);
        let orig = first.reverse(a.rsplit_once('@').unwrap().0, DAY).unwrap();
        assert_eq!(orig, "jo@example.org");
        let forged = b.replacen("first.example", "evil.example", 1);
        assert_eq!(
            second.reverse(forged.rsplit_once('@').unwrap().0, DAY),
            Err(Invalid::Forged)
        );
    }
}
