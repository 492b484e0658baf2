//! Where one recipient goes: the plugin route hook first, then the per-domain
//! route table, then the smart host, then MX lookup of the recipient's domain.
//! A pool names several smart hosts; which one takes a message is the
//! scheduler's choice (see `delivery::pools`).

use std::fmt;

use crate::config::DeliveryConfig;
use crate::envelope::Recipient;
use crate::policy::Route;
use crate::smtp::reply::Reply;

/// A configured next hop: MX lookup, a smart host URL, or a pool.
#[derive(Clone, PartialEq, Eq)]
pub enum NextHop {
    /// MX lookup: of the recipient's domain, or of the given one.
    Mx(Option<String>),
    /// A smart host.
    Smarthost(SmartHost),
    /// A pool of smart hosts (`[delivery.pools.NAME]`).
    Pool(String),
}

/// `smtp://[user:password@]host[:port]` or `smtps://...`.
#[derive(Clone, PartialEq, Eq)]
pub struct SmartHost {
    /// `smtps://`: TLS from the first byte (RFC 8314).
    pub implicit_tls: bool,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port (default 25 for `smtp://`, 465 for `smtps://`).
    pub port: u16,
    /// AUTH credentials; only ever sent over TLS.
    pub credentials: Option<(String, String)>,
}

// Credentials stay out of logs and debug output.
impl fmt::Debug for SmartHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for SmartHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.implicit_tls { "smtps" } else { "smtp" };
        let user = match &self.credentials {
            Some((u, _)) => format!("{u}@"),
            None => String::new(),
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://{user}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NextHop::Mx(None) => f.write_str("mx"),
            NextHop::Mx(Some(d)) => write!(f, "mx:{d}"),
            NextHop::Smarthost(s) => write!(f, "{s}"),
            NextHop::Pool(p) => write!(f, "pool:{p}"),
        }
    }
}

impl NextHop {
    /// Parses `mx`, `mx:domain`, `smtp://...`, `smtps://...` or `pool:NAME`.
    pub fn parse(s: &str) -> Result<NextHop, String> {
        if s == "mx" {
            return Ok(NextHop::Mx(None));
        }
        if let Some(name) = s.strip_prefix("pool:") {
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(format!("{s:?}: expected pool:NAME"));
            }
            return Ok(NextHop::Pool(name.to_string()));
        }
        if let Some(domain) = s.strip_prefix("mx:") {
            if domain.is_empty() || domain.contains(['@', '/', ' ']) {
                return Err(format!("{s:?}: expected mx:domain"));
            }
            return Ok(NextHop::Mx(Some(domain.to_ascii_lowercase())));
        }
        SmartHost::parse(s).map(NextHop::Smarthost)
    }
}

impl SmartHost {
    /// Parses a smart host URL.
    pub fn parse(url: &str) -> Result<SmartHost, String> {
        let bad = |why: &str| {
            format!("{url:?}: {why} (expected smtp://[user:password@]host[:port] or smtps://...)")
        };
        let (implicit_tls, rest) = if let Some(r) = url.strip_prefix("smtps://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("smtp://") {
            (false, r)
        } else {
            return Err(bad("unknown scheme"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("a path is not allowed"));
        }
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hp)) => {
                let (u, p) = userinfo
                    .split_once(':')
                    .ok_or_else(|| bad("credentials need user:password"))?;
                (Some((percent_decode(u)?, percent_decode(p)?)), hp)
            }
            None => (None, rest),
        };
        let default_port = if implicit_tls { 465 } else { 25 };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("junk after ]")),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (hostport.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(SmartHost {
            implicit_tls,
            host,
            port,
            credentials,
        })
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("credentials in {s:?} are not UTF-8"))
}

/// A destination: the unit that has its own queue, connection limit and backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where to.
    pub via: Via,
    /// Refuse to send without verified TLS.
    pub require_tls: bool,
    /// SHA-256 fingerprints of which the next hop's certificate must be
    /// one: TLS is mandatory, a mismatch defers.
    pub pins: Vec<[u8; 32]>,
}

/// How a [`Target`] is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// MX lookup of this domain (lowercase).
    Mx(String),
    /// A smart host.
    Smarthost(SmartHost),
    /// One host of a pool: a destination of its own (its own connections
    /// and backoff), chosen per message.
    PoolHost {
        /// The pool's name.
        pool: String,
        /// The host.
        host: SmartHost,
    },
}

impl Target {
    /// The destination's name in queues and logs (never with a password).
    pub fn key(&self) -> String {
        let tls = match (self.require_tls, self.pins.is_empty()) {
            (_, false) => " (pinned)",
            (true, true) => " (require_tls)",
            (false, true) => "",
        };
        match &self.via {
            Via::Mx(d) => format!("mx:{d}{tls}"),
            Via::Smarthost(s) => format!("{s}{tls}"),
            Via::PoolHost { pool, host } => format!("pool:{pool} {host}{tls}"),
        }
    }
}

/// What happens to a recipient, once routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send over SMTP to this destination.
    Deliver(Target),
    /// Send over SMTP to a host of this pool, which the scheduler picks.
    Pool {
        /// The pool's name.
        name: String,
        /// Refuse to send without verified TLS.
        require_tls: bool,
    },
    /// Write into this folder (below `delivery.local_folder`).
    LocalFolder(String),
    /// Drop silently; counts as delivered.
    Discard,
    /// Fail permanently with this reply.
    Reject(Reply),
}

/// A pool route: refused when the config has no such pool (a plugin's
/// route names it; the config's own routes are checked at load).
fn pool(config: &DeliveryConfig, name: String, require_tls: Option<bool>) -> Decision {
    match config.pools.get(&name) {
        Some(p) => Decision::Pool {
            require_tls: require_tls.or(p.require_tls).unwrap_or(config.require_tls),
            name,
        },
        None => Decision::Reject(Reply::new(
            554,
            "5.3.5",
            format!("route to pool {name:?}, which the relay does not have"),
        )),
    }
}

/// Turns the route hook's answer and the config into a decision.
pub fn decide(config: &DeliveryConfig, route: Route, rcpt: &Recipient) -> Decision {
    let domain = rcpt
        .address
        .domain()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let pins = |list: &[String]| -> Vec<[u8; 32]> {
        list.iter()
            .filter_map(|f| super::tls::parse_fingerprint(f).ok())
            .collect()
    };
    let target = |via: Via, require_tls: Option<bool>| Target {
        via,
        require_tls: require_tls.unwrap_or(config.require_tls),
        pins: Vec::new(),
    };
    match route {
        Route::Default => {
            let (hop, tls, pinned) = match config.routes.get(&domain) {
                Some(entry) => (
                    NextHop::parse(entry.next_hop()).ok(),
                    entry.require_tls(),
                    pins(entry.tls_fingerprint()),
                ),
                None => (
                    config
                        .smarthost
                        .as_deref()
                        .and_then(|s| NextHop::parse(s).ok()),
                    None,
                    pins(&config.tls_fingerprint),
                ),
            };
            let (hop, pinned) = match hop {
                Some(NextHop::Mx(Some(d))) => (Via::Mx(d), pinned),
                Some(NextHop::Smarthost(s)) => (Via::Smarthost(s), pinned),
                Some(NextHop::Pool(name)) => return pool(config, name, tls),
                // The smart host's pins are for the smart host only.
                Some(NextHop::Mx(None)) | None => (Via::Mx(domain), Vec::new()),
            };
            Decision::Deliver(Target {
                pins: pinned,
                ..target(hop, tls)
            })
        }
        Route::Pool(name) => pool(config, name, None),
        Route::Mx(d) => Decision::Deliver(target(
            Via::Mx(d.trim_end_matches('.').to_ascii_lowercase()),
            None,
        )),
        Route::Smarthost(url) => match SmartHost::parse(&url) {
            Ok(s) => Decision::Deliver(target(Via::Smarthost(s), None)),
            Err(e) => Decision::Reject(Reply::new(
                554,
                "5.3.5",
                format!("route hook gave a bad smart host: {e}"),
            )),
        },
        Route::LocalFolder(dir) => Decision::LocalFolder(dir),
        Route::Discard => Decision::Discard,
        Route::Reject(reply) => Decision::Reject(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_next_hops() {
        let sh = |tls, host: &str, port, creds: Option<(&str, &str)>| {
            Ok(NextHop::Smarthost(SmartHost {
                implicit_tls: tls,
                host: host.into(),
                port,
                credentials: creds.map(|(u, p)| (u.into(), p.into())),
            }))
        };
        for (input, expected) in [
            ("mx", Ok(NextHop::Mx(None))),
            (
                "mx:Example.ORG",
                Ok(NextHop::Mx(Some("example.org".into()))),
            ),
            ("smtp://relay.test", sh(false, "relay.test", 25, None)),
            ("smtps://relay.test", sh(true, "relay.test", 465, None)),
            ("smtp://127.0.0.1:2626", sh(false, "127.0.0.1", 2626, None)),
            ("smtp://[::1]:26/", sh(false, "::1", 26, None)),
            (
                "smtps://u%40x:p%3Ass@relay.test:465",
                sh(true, "relay.test", 465, Some(("u@x", "p:ss"))),
            ),
        ] {
            assert_eq!(NextHop::parse(input), expected, "{input}");
        }
        for bad in [
            "",
            "ftp://x",
            "smtp://",
            "smtp://h:port",
            "smtp://h/path",
            "smtp://user@h",
            "mx:",
            "smtp://u:%zz@h",
        ] {
            assert!(NextHop::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_never_displayed() {
        let NextHop::Smarthost(s) = NextHop::parse("smtp://user:secret@h:25").unwrap() else {
            panic!("not a smart host");
        };
        assert_eq!(format!("{s} {s:?}"), "smtp://user@h:25 smtp://user@h:25");
    }

    #[test]
    fn decisions() {
        use crate::config::{RouteEntry, RouteTable};
        let mut config = DeliveryConfig::default();
        config.routes.insert(
            "special.test".into(),
            RouteEntry::NextHop("smtp://10.0.0.1:2525".into()),
        );
        config.routes.insert(
            "secure.test".into(),
            RouteEntry::Table(RouteTable {
                next_hop: "mx".into(),
                require_tls: Some(true),
                tls_fingerprint: Vec::new(),
            }),
        );
        let rcpt = |a: &str| Recipient::new(a);
        let plain = |via| {
            Decision::Deliver(Target {
                via,
                require_tls: false,
                pins: Vec::new(),
            })
        };
        assert_eq!(
            decide(&config, Route::Default, &rcpt("a@Other.Test.")),
            plain(Via::Mx("other.test".into()))
        );
        let Decision::Deliver(Target {
            via: Via::Smarthost(s),
            ..
        }) = decide(&config, Route::Default, &rcpt("a@special.test"))
        else {
            panic!("route table not used");
        };
        assert_eq!(s.port, 2525);
        assert_eq!(
            decide(&config, Route::Default, &rcpt("a@secure.test")),
            Decision::Deliver(Target {
                via: Via::Mx("secure.test".into()),
                require_tls: true,
                pins: Vec::new(),
            })
        );
        config.smarthost = Some("smtp://hub.test".into());
        assert_eq!(
            decide(&config, Route::Default, &rcpt("a@x.test")),
            plain(Via::Smarthost(SmartHost::parse("smtp://hub.test").unwrap()))
        );
        assert_eq!(
            decide(&config, Route::Mx("y.test".into()), &rcpt("a@x.test")),
            plain(Via::Mx("y.test".into()))
        );
        assert_eq!(
            decide(&config, Route::Discard, &rcpt("a@x.test")),
            Decision::Discard
        );
    }
}
