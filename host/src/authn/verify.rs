//! Inbound verification: SPF at MAIL FROM and of the HELO name, then DKIM,
//! ARC and DMARC once the message has ended, each into [`Results`].

use std::net::IpAddr;

use base64::Engine as _;
use hickory_resolver::TokioResolver;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::{AuthenticatedMessage, DkimResult, DmarcResult, MessageAuthenticator, SpfOutput};

use super::config::{AuthenticationConfig, Checks};
use super::results::{self, Policy, Results, SpfResult, Verdict};
use super::spf::{self, Checker};
use crate::envelope::Address;

/// The checks of inbound mail, shared by every session.
pub struct Verifier {
    auth: MessageAuthenticator,
    spf: Checker,
    trusted_sealers: Vec<String>,
}

/// The organizational domain (RFC 7489 3.2) from the Public Suffix List:
/// the public suffix and one label more. A name under no known suffix is
/// its own.
pub fn organizational_domain(domain: &str) -> &str {
    psl::domain_str(domain).unwrap_or(domain)
}

impl Verifier {
    /// A verifier on the relay's resolver; `hostname` is this relay's name.
    pub fn new(resolver: TokioResolver, hostname: &str, config: &AuthenticationConfig) -> Verifier {
        Verifier {
            spf: Checker::new(resolver.clone(), hostname),
            auth: MessageAuthenticator(resolver),
            trusted_sealers: config
                .trusted_arc_sealers
                .iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// SPF of the HELO name (RFC 7208 2.3); `None` when the name is not a
    /// domain (an address literal, a bare word), which has no SPF identity.
    pub async fn spf_helo(&self, ip: IpAddr, helo: &str) -> Option<results::Spf> {
        let domain = helo.trim_end_matches('.').to_ascii_lowercase();
        if !spf::valid_domain(&domain) {
            return None;
        }
        let sender = format!("postmaster@{domain}");
        let o = self.spf.check_host(ip, &domain, &sender, helo).await;
        Some(results::Spf {
            result: o.result,
            identity: domain.clone(),
            domain,
            reason: o.reason,
        })
    }

    /// SPF of the MAIL FROM identity; for the null sender, of
    /// `postmaster@` the HELO name (RFC 7208 2.4).
    pub async fn spf_mail_from(&self, ip: IpAddr, helo: &str, sender: &Address) -> results::Spf {
        let (identity, domain) = if sender.is_null() {
            let d = helo.trim_end_matches('.').to_ascii_lowercase();
            (format!("postmaster@{d}"), d)
        } else {
            (
                sender.as_str().to_string(),
                sender.domain().trim_end_matches('.').to_ascii_lowercase(),
            )
        };
        let o = self.spf.check_host(ip, &domain, &identity, helo).await;
        results::Spf {
            result: o.result,
            identity,
            domain,
            reason: o.reason,
        }
    }

    /// DKIM, ARC and DMARC of a whole message (as the client sent it), added
    /// to `results`, which holds the SPF results already.
    pub async fn message(&self, checks: &Checks, message: &[u8], results: &mut Results) {
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            // No header section at all: nothing is signed, no From: to align.
            if checks.arc {
                results.arc = Some(results::Arc {
                    result: Verdict::None,
                    sets: 0,
                    sealer: None,
                    trusted: false,
                });
            }
            return;
        };
        let dkim = if checks.dkim || checks.dmarc {
            self.auth.verify_dkim(&parsed).await
        } else {
            Vec::new()
        };
        if checks.dkim {
            results.dkim = dkim.iter().map(dkim_result).collect();
        }
        if checks.arc {
            let arc = self.auth.verify_arc(&parsed).await;
            let sealer = arc
                .sets()
                .last()
                .map(|s| s.seal.header.d.to_ascii_lowercase());
            let result = verdict(arc.result()).0;
            let trusted = result == Verdict::Pass
                && sealer
                    .as_ref()
                    .is_some_and(|s| self.trusted_sealers.iter().any(|t| t == s));
            results.arc = Some(results::Arc {
                result,
                sets: arc.sets().len() as u32,
                sealer,
                trusted,
            });
        }
        if checks.dmarc {
            results.dmarc = Some(
                self.dmarc(&parsed, &dkim, results, checks.dmarc_enforce)
                    .await,
            );
        }
    }

    async fn dmarc(
        &self,
        parsed: &AuthenticatedMessage<'_>,
        dkim: &[mail_auth::DkimOutput<'_>],
        results: &Results,
        enforce: bool,
    ) -> results::Dmarc {
        let spf_domain = results
            .spf_mail_from
            .as_ref()
            .map_or("", |s| s.domain.as_str());
        let spf_output = spf_output(results.spf_mail_from.as_ref());
        let out = self
            .auth
            .verify_dmarc(
                DmarcParameters::new(parsed, dkim, spf_domain, &spf_output)
                    .with_domain_suffix_fn(organizational_domain),
            )
            .await;
        let spf_aligned = *out.spf_result() == DmarcResult::Pass;
        let dkim_aligned = *out.dkim_result() == DmarcResult::Pass;
        let either = |f: fn(&DmarcResult) -> bool| f(out.spf_result()) || f(out.dkim_result());
        let result = if spf_aligned || dkim_aligned {
            Verdict::Pass
        } else if either(|r| matches!(r, DmarcResult::TempError(_))) {
            Verdict::TempError
        } else if either(|r| matches!(r, DmarcResult::PermError(_))) {
            Verdict::PermError
        } else if out.dmarc_record().is_some() {
            Verdict::Fail
        } else {
            Verdict::None
        };
        let policy = if out.dmarc_record().is_some() {
            match out.policy() {
                mail_auth::dmarc::Policy::Reject => Policy::Reject,
                mail_auth::dmarc::Policy::Quarantine => Policy::Quarantine,
                mail_auth::dmarc::Policy::None | mail_auth::dmarc::Policy::Unspecified => {
                    Policy::None
                }
            }
        } else {
            Policy::None
        };
        // RFC 7489 6.7 leaves local policy room: a chain sealed by a trusted
        // forwarder vouches for mail whose signatures it broke.
        let vouched = results.arc.as_ref().is_some_and(|a| a.trusted);
        let disposition = if enforce && result == Verdict::Fail && !vouched {
            policy
        } else {
            Policy::None
        };
        results::Dmarc {
            result,
            domain: out.domain().to_string(),
            policy,
            disposition,
            spf_aligned,
            dkim_aligned,
        }
    }
}

/// An SPF result of ours as mail-auth's, for DMARC alignment and ARC
/// sealing; `None` (not checked) counts as SPF `none`.
pub fn spf_output(spf: Option<&results::Spf>) -> SpfOutput {
    let (domain, result) = match spf {
        Some(s) => (s.domain.as_str(), s.result),
        None => ("", SpfResult::None),
    };
    SpfOutput::new(domain.to_string()).with_result(match result {
        SpfResult::Pass => mail_auth::SpfResult::Pass,
        SpfResult::Fail => mail_auth::SpfResult::Fail,
        SpfResult::SoftFail => mail_auth::SpfResult::SoftFail,
        SpfResult::Neutral => mail_auth::SpfResult::Neutral,
        SpfResult::None => mail_auth::SpfResult::None,
        SpfResult::TempError => mail_auth::SpfResult::TempError,
        SpfResult::PermError => mail_auth::SpfResult::PermError,
    })
}

fn verdict(r: &DkimResult) -> (Verdict, Option<String>) {
    match r {
        DkimResult::Pass => (Verdict::Pass, None),
        DkimResult::Neutral(e) => (Verdict::Neutral, Some(e.to_string())),
        DkimResult::Fail(e) => (Verdict::Fail, Some(e.to_string())),
        DkimResult::PermError(e) => (Verdict::PermError, Some(e.to_string())),
        DkimResult::TempError(e) => (Verdict::TempError, Some(e.to_string())),
        DkimResult::None => (Verdict::None, None),
    }
}

fn dkim_result(o: &mail_auth::DkimOutput<'_>) -> results::Dkim {
    let (result, reason) = verdict(o.result());
    let (domain, selector, b) = match o.signature() {
        Some(s) => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&s.b);
            (
                s.d.to_ascii_lowercase(),
                s.s.clone(),
                b64.chars().take(8).collect(),
            )
        }
        None => (String::new(), String::new(), String::new()),
    };
    results::Dkim {
        result,
        domain,
        selector,
        b,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organizational_domains_come_from_the_suffix_list() {
        for (domain, org) in [
            ("mail.example.com", "example.com"),
            ("example.com", "example.com"),
            ("a.b.example.co.uk", "example.co.uk"),
            ("news.bbc.co.uk", "bbc.co.uk"),
            ("x.y.city.kawasaki.jp", "city.kawasaki.jp"),
            ("host.sub.example.test", "example.test"),
        ] {
            assert_eq!(organizational_domain(domain), org, "{domain}");
        }
    }
}
