//! SPF `check_host()` (RFC 7208 4) over the relay's resolver. mail-auth
//! parses the record and expands macros; the evaluation is here because the
//! limits of RFC 7208 4.6.4 are part of the verdict and mail-auth has no
//! void-lookup limit: at most 10 terms that query DNS, at most 2 of whose
//! lookups come back empty (NXDOMAIN or no records), at most 10 MX names.
//! A DNS timeout or SERVFAIL is `temperror`, never `fail`.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::spf::{Mechanism, Qualifier, Spf as Record, Variables};

use super::results::SpfResult;

/// Terms that query DNS, per evaluation (RFC 7208 4.6.4).
const MAX_LOOKUPS: u32 = 10;
/// Lookups that come back empty, per evaluation (RFC 7208 4.6.4).
const MAX_VOID_LOOKUPS: u32 = 2;
/// MX names looked at by one `mx` term, and names by one `ptr` term.
const MAX_NAMES: usize = 10;
/// The whole evaluation (RFC 7208 4.6.4 suggests at least 20 seconds).
const TIME_LIMIT: Duration = Duration::from_secs(20);

/// A verdict and why, for the header comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The verdict.
    pub result: SpfResult,
    /// Why.
    pub reason: String,
}

fn outcome(result: SpfResult, reason: impl Into<String>) -> Outcome {
    Outcome {
        result,
        reason: reason.into(),
    }
}

/// Runs `check_host()` for the relay.
#[derive(Clone)]
pub struct Checker {
    resolver: TokioResolver,
    /// The `r` macro: the name of the host doing the check.
    hostname: String,
}

/// Counters that span one evaluation, includes and redirects included.
#[derive(Default)]
struct Walk {
    lookups: u32,
    voids: u32,
}

enum Answer {
    Records(Vec<RData>),
    Void,
    Error(String),
}

type Boxed<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

impl Checker {
    /// A checker on `resolver`; `hostname` is this relay's name.
    pub fn new(resolver: TokioResolver, hostname: &str) -> Checker {
        Checker {
            resolver,
            hostname: hostname.to_string(),
        }
    }

    /// `check_host(ip, domain, sender)`, with `helo` for the `h` macro.
    pub async fn check_host(&self, ip: IpAddr, domain: &str, sender: &str, helo: &str) -> Outcome {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !valid_domain(&domain) {
            return outcome(SpfResult::None, format!("{domain:?} is not a domain name"));
        }
        let mut walk = Walk::default();
        let check = self.check(&mut walk, ip.to_canonical(), domain, sender, helo);
        match tokio::time::timeout(TIME_LIMIT, check).await {
            Ok(o) => o,
            Err(_) => outcome(SpfResult::TempError, "SPF evaluation timed out"),
        }
    }

    fn check<'a>(
        &'a self,
        walk: &'a mut Walk,
        ip: IpAddr,
        domain: String,
        sender: &'a str,
        helo: &'a str,
    ) -> Boxed<'a> {
        Box::pin(async move {
            let record = match self.record(&domain).await {
                Ok(r) => r,
                Err(o) => return o,
            };
            let mut vars = Variables::new();
            vars.set_ip(&ip);
            vars.set_sender(sender.as_bytes().to_vec());
            vars.set_domain(domain.as_bytes().to_vec());
            vars.set_helo_domain(helo.as_bytes().to_vec());
            vars.set_host_domain(self.hostname.as_bytes().to_vec());
            vars.set_validated_domain(b"unknown".to_vec());
            for directive in record.directives.iter() {
                let term = &directive.mechanism;
                let matched = match term {
                    Mechanism::All => true,
                    Mechanism::Ip4 { addr, mask } => match ip {
                        IpAddr::V4(v4) => u32::from(v4) & mask == u32::from(*addr) & mask,
                        IpAddr::V6(_) => false,
                    },
                    Mechanism::Ip6 { addr, mask } => match ip {
                        IpAddr::V6(v6) => u128::from(v6) & mask == u128::from(*addr) & mask,
                        IpAddr::V4(_) => false,
                    },
                    Mechanism::A {
                        macro_string,
                        ip4_mask,
                        ip6_mask,
                    } => {
                        let target = target_name(macro_string.eval(&vars, &domain, true).as_ref());
                        if let Some(o) = count(walk, "a", &target) {
                            return o;
                        }
                        match self.addresses(&target, ip).await {
                            Answer::Records(addrs) => addrs
                                .iter()
                                .any(|a| same_network(ip, a, *ip4_mask, *ip6_mask)),
                            Answer::Void => {
                                if let Some(o) = void(walk, &target) {
                                    return o;
                                }
                                false
                            }
                            Answer::Error(e) => return outcome(SpfResult::TempError, e),
                        }
                    }
                    Mechanism::Mx {
                        macro_string,
                        ip4_mask,
                        ip6_mask,
                    } => {
                        let target = target_name(macro_string.eval(&vars, &domain, true).as_ref());
                        if let Some(o) = count(walk, "mx", &target) {
                            return o;
                        }
                        let names = match self.lookup(&target, RecordType::MX).await {
                            Answer::Records(r) => r
                                .into_iter()
                                .filter_map(|d| match d {
                                    RData::MX(mx) => Some(target_name(&mx.exchange.to_ascii())),
                                    _ => None,
                                })
                                .collect::<Vec<_>>(),
                            Answer::Void => {
                                if let Some(o) = void(walk, &target) {
                                    return o;
                                }
                                Vec::new()
                            }
                            Answer::Error(e) => return outcome(SpfResult::TempError, e),
                        };
                        if names.len() > MAX_NAMES {
                            return outcome(
                                SpfResult::PermError,
                                format!("{target} has more than {MAX_NAMES} MX records"),
                            );
                        }
                        let mut found = false;
                        for name in names {
                            match self.addresses(&name, ip).await {
                                Answer::Records(addrs) => {
                                    if addrs
                                        .iter()
                                        .any(|a| same_network(ip, a, *ip4_mask, *ip6_mask))
                                    {
                                        found = true;
                                        break;
                                    }
                                }
                                Answer::Void => {
                                    if let Some(o) = void(walk, &name) {
                                        return o;
                                    }
                                }
                                Answer::Error(e) => return outcome(SpfResult::TempError, e),
                            }
                        }
                        found
                    }
                    Mechanism::Ptr { macro_string } => {
                        let target = target_name(macro_string.eval(&vars, &domain, true).as_ref());
                        if let Some(o) = count(walk, "ptr", &target) {
                            return o;
                        }
                        match self.ptr_matches(walk, ip, &target).await {
                            Ok(m) => m,
                            Err(o) => return o,
                        }
                    }
                    Mechanism::Exists { macro_string } => {
                        let target = target_name(macro_string.eval(&vars, &domain, true).as_ref());
                        if let Some(o) = count(walk, "exists", &target) {
                            return o;
                        }
                        // RFC 7208 5.7: always an A query, whatever the client's family.
                        match self.lookup(&target, RecordType::A).await {
                            Answer::Records(_) => true,
                            Answer::Void => {
                                if let Some(o) = void(walk, &target) {
                                    return o;
                                }
                                false
                            }
                            Answer::Error(e) => return outcome(SpfResult::TempError, e),
                        }
                    }
                    Mechanism::Include { macro_string } => {
                        let target = target_name(macro_string.eval(&vars, &domain, true).as_ref());
                        if let Some(o) = count(walk, "include", &target) {
                            return o;
                        }
                        if !valid_domain(&target) {
                            return outcome(
                                SpfResult::PermError,
                                format!("include:{target} is not a domain name"),
                            );
                        }
                        let inner = self
                            .check(&mut *walk, ip, target.clone(), sender, helo)
                            .await;
                        match inner.result {
                            SpfResult::Pass => true,
                            SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => false,
                            SpfResult::TempError => return inner,
                            // RFC 7208 5.2: an include without a record is an error.
                            SpfResult::PermError | SpfResult::None => {
                                return outcome(
                                    SpfResult::PermError,
                                    format!("include:{target}: {}", inner.reason),
                                )
                            }
                        }
                    }
                };
                if matched {
                    let result = match directive.qualifier {
                        Qualifier::Pass => SpfResult::Pass,
                        Qualifier::Fail => SpfResult::Fail,
                        Qualifier::SoftFail => SpfResult::SoftFail,
                        Qualifier::Neutral => SpfResult::Neutral,
                    };
                    return outcome(
                        result,
                        format!("{domain}: {} matched {}", ip, describe(term)),
                    );
                }
            }
            if let Some(redirect) = &record.redirect {
                let target = target_name(redirect.eval(&vars, &domain, true).as_ref());
                if let Some(o) = count(walk, "redirect", &target) {
                    return o;
                }
                if !valid_domain(&target) {
                    return outcome(
                        SpfResult::PermError,
                        format!("redirect={target} is not a domain name"),
                    );
                }
                let inner = self
                    .check(&mut *walk, ip, target.clone(), sender, helo)
                    .await;
                // RFC 7208 6.1: a redirect to a domain without a record is an error.
                if inner.result == SpfResult::None {
                    return outcome(
                        SpfResult::PermError,
                        format!("redirect={target}: {}", inner.reason),
                    );
                }
                return inner;
            }
            outcome(
                SpfResult::Neutral,
                format!("{domain}: no mechanism matched {ip}"),
            )
        })
    }

    /// The one SPF record of `domain` (RFC 7208 4.5).
    async fn record(&self, domain: &str) -> Result<Record, Outcome> {
        let texts = match self.lookup(domain, RecordType::TXT).await {
            Answer::Records(r) => r,
            Answer::Void => {
                return Err(outcome(
                    SpfResult::None,
                    format!("{domain} has no SPF record"),
                ))
            }
            Answer::Error(e) => return Err(outcome(SpfResult::TempError, e)),
        };
        let mut spf = texts.into_iter().filter_map(|r| match r {
            // A record in several strings is their concatenation (RFC 7208 3.3).
            RData::TXT(txt) => {
                let joined: Vec<u8> = txt
                    .txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect();
                is_spf(&joined).then_some(joined)
            }
            _ => None,
        });
        let Some(first) = spf.next() else {
            return Err(outcome(
                SpfResult::None,
                format!("{domain} has no SPF record"),
            ));
        };
        if spf.next().is_some() {
            return Err(outcome(
                SpfResult::PermError,
                format!("{domain} has more than one SPF record"),
            ));
        }
        if let Err(term) = check_addresses(&first) {
            return Err(outcome(
                SpfResult::PermError,
                format!("the SPF record of {domain} has a bad term {term:?}"),
            ));
        }
        Record::parse(&first).map_err(|_| {
            outcome(
                SpfResult::PermError,
                format!("the SPF record of {domain} has a syntax error"),
            )
        })
    }

    /// `ptr` (RFC 7208 5.5): a name of the client's address, confirmed by a
    /// forward lookup, in `target`. DNS errors make it not match; empty
    /// answers count as void lookups.
    async fn ptr_matches(
        &self,
        walk: &mut Walk,
        ip: IpAddr,
        target: &str,
    ) -> Result<bool, Outcome> {
        let reverse = match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
            }
            IpAddr::V6(v6) => {
                let mut s = String::with_capacity(72);
                for b in v6.octets().iter().rev() {
                    s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
                }
                s.push_str("ip6.arpa");
                s
            }
        };
        let names = match self.lookup(&reverse, RecordType::PTR).await {
            Answer::Records(names) => names,
            Answer::Void => return void(walk, &reverse).map_or(Ok(false), Err),
            Answer::Error(_) => return Ok(false),
        };
        let suffix = format!(".{target}");
        for name in names.into_iter().take(MAX_NAMES) {
            let RData::PTR(ptr) = name else { continue };
            let name = target_name(&ptr.0.to_ascii());
            if name != target && !name.ends_with(&suffix) {
                continue;
            }
            match self.addresses(&name, ip).await {
                Answer::Records(addrs) => {
                    if addrs
                        .iter()
                        .any(|a| same_network(ip, a, u32::MAX, u128::MAX))
                    {
                        return Ok(true);
                    }
                }
                Answer::Void => {
                    if let Some(o) = void(walk, &name) {
                        return Err(o);
                    }
                }
                Answer::Error(_) => {}
            }
        }
        Ok(false)
    }

    /// A or AAAA records of `name`, the family of `ip`.
    async fn addresses(&self, name: &str, ip: IpAddr) -> Answer {
        let rtype = match ip {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::AAAA,
        };
        self.lookup(name, rtype).await
    }

    async fn lookup(&self, name: &str, rtype: RecordType) -> Answer {
        if !valid_domain(name) {
            return Answer::Void;
        }
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.lookup(fqdn.as_str(), rtype).await {
            Ok(lookup) => {
                let records: Vec<RData> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .map(|r| r.data.clone())
                    .collect();
                if records.is_empty() {
                    Answer::Void
                } else {
                    Answer::Records(records)
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(nr)))
                if matches!(
                    nr.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ) =>
            {
                Answer::Void
            }
            Err(NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain))) => Answer::Void,
            Err(e) => Answer::Error(format!("DNS {rtype} lookup of {name}: {e}")),
        }
    }
}

/// Counts a term that queries DNS; past the limit the evaluation ends.
fn count(walk: &mut Walk, term: &str, target: &str) -> Option<Outcome> {
    walk.lookups += 1;
    (walk.lookups > MAX_LOOKUPS).then(|| {
        outcome(
            SpfResult::PermError,
            format!("more than {MAX_LOOKUPS} DNS lookups (at {term}:{target})"),
        )
    })
}

/// Counts a lookup that came back empty; past the limit the evaluation ends.
fn void(walk: &mut Walk, target: &str) -> Option<Outcome> {
    walk.voids += 1;
    (walk.voids > MAX_VOID_LOOKUPS).then(|| {
        outcome(
            SpfResult::PermError,
            format!("more than {MAX_VOID_LOOKUPS} void DNS lookups (at {target})"),
        )
    })
}

fn same_network(ip: IpAddr, record: &RData, mask4: u32, mask6: u128) -> bool {
    match (ip, record) {
        (IpAddr::V4(ip), RData::A(a)) => u32::from(ip) & mask4 == u32::from(a.0) & mask4,
        (IpAddr::V6(ip), RData::AAAA(a)) => u128::from(ip) & mask6 == u128::from(a.0) & mask6,
        _ => false,
    }
}

/// A (macro-expanded) domain as looked up: no trailing dot, lowercase.
fn target_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The address terms (`ip4:`, `ip6:`, with their prefix lengths) as
/// RFC 7208 5.6 writes them; mail-auth's parser takes some that are not
/// addresses (`ip4:300.1.1.1`), which must be a permerror. The offending
/// term on error.
fn check_addresses(record: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(record);
    for term in text.split_ascii_whitespace().skip(1) {
        let t = term.trim_start_matches(['+', '-', '~', '?']);
        let Some((name, value)) = t.split_once(':') else {
            continue;
        };
        let (addr, prefix) = match value.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (value, None),
        };
        let prefix_ok = |max: u8| prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|n| n <= max));
        let ok = if name.eq_ignore_ascii_case("ip4") {
            addr.parse::<std::net::Ipv4Addr>().is_ok() && prefix_ok(32)
        } else if name.eq_ignore_ascii_case("ip6") {
            addr.parse::<std::net::Ipv6Addr>().is_ok() && prefix_ok(128)
        } else {
            true
        };
        if !ok {
            return Err(term.to_string());
        }
    }
    Ok(())
}

/// `v=spf1` alone or followed by a space (RFC 7208 4.5).
fn is_spf(txt: &[u8]) -> bool {
    txt.len() >= 6 && txt[..6].eq_ignore_ascii_case(b"v=spf1") && (txt.len() == 6 || txt[6] == b' ')
}

/// A name that can be queried: at least two labels, each 1 to 63 octets,
/// 253 in all (RFC 7208 4.3).
pub fn valid_domain(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    !name.is_empty()
        && name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn describe(term: &Mechanism) -> &'static str {
    match term {
        Mechanism::All => "all",
        Mechanism::Include { .. } => "include",
        Mechanism::A { .. } => "a",
        Mechanism::Mx { .. } => "mx",
        Mechanism::Ptr { .. } => "ptr",
        Mechanism::Ip4 { .. } => "ip4",
        Mechanism::Ip6 { .. } => "ip6",
        Mechanism::Exists { .. } => "exists",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_selection_and_names() {
        for (txt, spf) in [
            (&b"v=spf1 -all"[..], true),
            (b"V=SPF1", true),
            (b"v=spf10 -all", false),
            (b"spf1", false),
            (b"google-site-verification=x", false),
        ] {
            assert_eq!(is_spf(txt), spf, "{:?}", String::from_utf8_lossy(txt));
        }
        for (record, ok) in [
            (
                "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -ip4:10.0.0.1 -all",
                true,
            ),
            ("v=spf1 ip4:300.1.1.1 -all", false),
            ("v=spf1 ip4:192.0.2.0/33", false),
            ("v=spf1 ip6:2001:db8::/129", false),
            ("v=spf1 ~ip6:not-an-address", false),
            ("v=spf1 a:mail.example.test/24 include:x.test", true),
        ] {
            assert_eq!(check_addresses(record.as_bytes()).is_ok(), ok, "{record}");
        }
        for (name, ok) in [
            ("example.test", true),
            ("_spf.example.test.", true),
            ("localhost", false),
            ("a..b", false),
            ("", false),
            ("[192.0.2.1]", false),
        ] {
            assert_eq!(valid_domain(name), ok, "{name}");
        }
    }
}
