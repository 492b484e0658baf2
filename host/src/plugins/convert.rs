//! Between the relay's own types and the WIT types of the bindings.

use std::net::IpAddr;

use crate::authn::results::{self as authn, Policy, SpfResult, Verdict as AuthVerdict};
use crate::envelope::{self, Body, Envelope, SessionInfo};
use crate::plugins::bindings::context as ctx;
use crate::plugins::bindings::types as wit;
use crate::plugins::check;
use crate::policy::{Route, Routing, Verdict};

/// An envelope address, split at the last `@`.
pub fn address(a: &envelope::Address) -> wit::Address {
    wit::Address {
        local_part: a.local_part().to_string(),
        domain: a.domain().to_string(),
    }
}

/// An IP address as numbers.
fn ip(ip: IpAddr) -> wit::IpAddress {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            wit::IpAddress::Ipv4((a, b, c, d))
        }
        IpAddr::V6(v6) => {
            let [a, b, c, d, e, f, g, h] = v6.segments();
            wit::IpAddress::Ipv6((a, b, c, d, e, f, g, h))
        }
    }
}

/// An IP address from its numbers.
pub fn ip_addr(ip: &wit::IpAddress) -> IpAddr {
    match *ip {
        wit::IpAddress::Ipv4((a, b, c, d)) => std::net::Ipv4Addr::new(a, b, c, d).into(),
        wit::IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
            std::net::Ipv6Addr::new(a, b, c, d, e, f, g, h).into()
        }
    }
}

/// The session facts.
pub fn session(s: &SessionInfo) -> wit::Session {
    wit::Session {
        peer_ip: ip(s.peer.ip()),
        peer_port: s.peer.port(),
        local_ip: ip(s.local.ip()),
        local_port: s.local.port(),
        helo: s.helo.clone(),
        tls: s.tls.as_ref().map(|t| wit::TlsInfo {
            version: t.version.clone(),
            cipher: t.cipher.clone(),
        }),
        auth_user: s.auth_user.clone(),
        may_relay: s.may_relay,
    }
}

/// The envelope.
pub fn envelope(e: &Envelope) -> wit::Envelope {
    wit::Envelope {
        sender: address(&e.sender),
        params: wit::MailParams {
            size: e.params.size as u64,
            body: match e.params.body {
                Body::SevenBit => wit::BodyType::SevenBit,
                Body::EightBitMime => wit::BodyType::EightBitMime,
            },
            smtputf8: e.params.smtputf8,
            envid: e.params.envid.clone(),
        },
        recipients: e.recipients.iter().map(|r| address(&r.address)).collect(),
    }
}

/// The authentication results.
pub fn authentication(r: &authn::Results) -> ctx::Authentication {
    let spf = |s: &authn::Spf| ctx::SpfCheck {
        result: match s.result {
            SpfResult::Pass => ctx::SpfResult::Pass,
            SpfResult::Fail => ctx::SpfResult::Fail,
            SpfResult::SoftFail => ctx::SpfResult::SoftFail,
            SpfResult::Neutral => ctx::SpfResult::Neutral,
            SpfResult::None => ctx::SpfResult::None,
            SpfResult::TempError => ctx::SpfResult::TempError,
            SpfResult::PermError => ctx::SpfResult::PermError,
        },
        identity: s.identity.clone(),
        domain: s.domain.clone(),
        reason: s.reason.clone(),
    };
    ctx::Authentication {
        spf_helo: r.spf_helo.as_ref().map(spf),
        spf_mail_from: r.spf_mail_from.as_ref().map(spf),
        dkim: r
            .dkim
            .iter()
            .map(|d| ctx::DkimCheck {
                result: auth_result(d.result),
                domain: d.domain.clone(),
                selector: d.selector.clone(),
                reason: d.reason.clone(),
            })
            .collect(),
        dmarc: r.dmarc.as_ref().map(|d| ctx::DmarcCheck {
            result: auth_result(d.result),
            domain: d.domain.clone(),
            policy: dmarc_policy(d.policy),
            disposition: dmarc_policy(d.disposition),
            spf_aligned: d.spf_aligned,
            dkim_aligned: d.dkim_aligned,
        }),
        arc: r.arc.as_ref().map(|a| ctx::ArcCheck {
            result: auth_result(a.result),
            sets: a.sets,
            sealer: a.sealer.clone(),
            trusted: a.trusted,
        }),
    }
}

fn auth_result(v: AuthVerdict) -> ctx::AuthResult {
    match v {
        AuthVerdict::Pass => ctx::AuthResult::Pass,
        AuthVerdict::Fail => ctx::AuthResult::Fail,
        AuthVerdict::Neutral => ctx::AuthResult::Neutral,
        AuthVerdict::None => ctx::AuthResult::None,
        AuthVerdict::TempError => ctx::AuthResult::TempError,
        AuthVerdict::PermError => ctx::AuthResult::PermError,
    }
}

fn dmarc_policy(p: Policy) -> ctx::DmarcPolicy {
    match p {
        Policy::None => ctx::DmarcPolicy::None,
        Policy::Quarantine => ctx::DmarcPolicy::Quarantine,
        Policy::Reject => ctx::DmarcPolicy::Reject,
    }
}

/// A plugin's verdict, checked.
pub fn verdict(v: wit::Verdict) -> Result<Verdict, String> {
    Ok(match v {
        wit::Verdict::Continue => Verdict::Continue,
        wit::Verdict::Accept => Verdict::Accept,
        wit::Verdict::Reject(r) => Verdict::Reject(check::reply(&r, &[5])?),
        wit::Verdict::Tempfail(r) => Verdict::Tempfail(check::reply(&r, &[4])?),
        wit::Verdict::Disconnect(r) => Verdict::Disconnect(check::reply(&r, &[4, 5])?),
    })
}

/// A plugin's route and sender, checked.
pub fn routing(r: wit::Routing) -> Result<Routing, String> {
    let sender = match r.sender {
        None => None,
        // The null sender is allowed: a forward that must not bounce back.
        Some(a) if a.local_part.is_empty() && a.domain.is_empty() => {
            Some(envelope::Address::null())
        }
        Some(a) if check::address(&a.local_part, &a.domain) => {
            Some(envelope::Address(format!("{}@{}", a.local_part, a.domain)))
        }
        Some(a) => {
            return Err(format!(
                "route sender {:?}@{:?}: not an address",
                a.local_part, a.domain
            ))
        }
    };
    Ok(Routing {
        route: route(r.route)?,
        sender,
    })
}

/// A plugin's route, checked.
fn route(r: wit::Route) -> Result<Route, String> {
    Ok(match r {
        wit::Route::Default => Route::Default,
        wit::Route::Mx(domain) => {
            if !check::address("x", &domain) {
                return Err(format!("mx route to {domain:?}: not a domain"));
            }
            Route::Mx(domain)
        }
        wit::Route::Smarthost(url) => {
            let ok = (url.starts_with("smtp://") || url.starts_with("smtps://"))
                && !url.chars().any(|c| c.is_control() || c.is_whitespace());
            if !ok {
                return Err(format!(
                    "smarthost route {url:?}: expected smtp://host:port or smtps://host:port"
                ));
            }
            Route::Smarthost(url)
        }
        wit::Route::LocalFolder(folder) => {
            if !check::folder(&folder) {
                return Err(format!(
                    "local-folder route {folder:?}: must be a relative path without `..`"
                ));
            }
            Route::LocalFolder(folder)
        }
        wit::Route::Discard => Route::Discard,
        wit::Route::Reject(r) => Route::Reject(check::reply(&r, &[5])?),
        wit::Route::Pool(name) => {
            if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(format!("pool route {name:?}: not a pool name"));
            }
            Route::Pool(name)
        }
    })
}

/// The answers of a `postern:relay@0.1.0` plugin in 0.2.0 terms: the same
/// shapes, generated twice.
pub mod v0_1 {
    use crate::config::HookName;
    use crate::plugins::bindings::types as wit;
    use crate::plugins::bindings::v0_1::types as old;

    /// A hook `init` named.
    pub fn hook(h: old::Hook) -> HookName {
        match h {
            old::Hook::Connect => HookName::Connect,
            old::Hook::MailFrom => HookName::MailFrom,
            old::Hook::Rcpt => HookName::Rcpt,
            old::Hook::Data => HookName::Data,
            old::Hook::Route => HookName::Route,
        }
    }

    fn reply(r: old::Reply) -> wit::Reply {
        wit::Reply {
            code: r.code,
            enhanced: r.enhanced,
            text: r.text,
        }
    }

    /// A verdict.
    pub fn verdict(v: old::Verdict) -> wit::Verdict {
        match v {
            old::Verdict::Continue => wit::Verdict::Continue,
            old::Verdict::Accept => wit::Verdict::Accept,
            old::Verdict::Reject(r) => wit::Verdict::Reject(reply(r)),
            old::Verdict::Tempfail(r) => wit::Verdict::Tempfail(reply(r)),
            old::Verdict::Disconnect(r) => wit::Verdict::Disconnect(reply(r)),
        }
    }

    /// A route (with the message's own sender, which 0.1.0 cannot change).
    pub fn route(r: old::Route) -> wit::Routing {
        let route = match r {
            old::Route::Default => wit::Route::Default,
            old::Route::Mx(d) => wit::Route::Mx(d),
            old::Route::Smarthost(u) => wit::Route::Smarthost(u),
            old::Route::LocalFolder(f) => wit::Route::LocalFolder(f),
            old::Route::Discard => wit::Route::Discard,
            old::Route::Reject(r) => wit::Route::Reject(reply(r)),
        };
        wit::Routing {
            route,
            sender: None,
        }
    }
}
