//! Between the relay's own types and the WIT types of the bindings.

use std::net::IpAddr;

use crate::envelope::{self, Body, Envelope, SessionInfo};
use crate::plugins::bindings::types as wit;
use crate::plugins::check;
use crate::policy::{Route, Verdict};

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

/// A plugin's route, checked.
pub fn route(r: wit::Route) -> Result<Route, String> {
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
    })
}
