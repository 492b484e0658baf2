//! MTA-STS (RFC 8461) for MX delivery: a domain's `_mta-sts` TXT record
//! says it has a policy and names its version (`id=`); the policy itself
//! comes over HTTPS from `mta-sts.DOMAIN`, resolved through the relay's own
//! resolver, and lists the MX hosts allowed and whether the rule is
//! enforced. Policies are cached for their `max_age` and fetched again when
//! the record's id changes; a fetch that fails keeps the cached policy.
//!
//! The fetch is the only HTTP the relay makes, so it is kept small: one
//! `GET /.well-known/mta-sts.txt` over HTTP/1.1 on a verified TLS
//! connection, no redirects, a time limit and a size limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::delivery::dns::Dns;

/// Longest a policy may be cached (RFC 8461 3.2: about a year).
const MAX_AGE_LIMIT: u64 = 31_557_600;
/// Largest policy body accepted (RFC 8461 3.3 suggests 64 KiB).
const MAX_BODY: usize = 64 * 1024;
/// Time for the whole fetch: resolving, connecting, TLS, the response.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries the cache holds at most; past it, expired ones are dropped first.
const MAX_CACHED: usize = 10_000;

/// What a policy asks of senders (`mode:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only to the listed MX hosts, over verified TLS.
    Enforce,
    /// Report what enforce would refuse, and deliver anyway.
    Testing,
    /// No policy (a domain withdrawing one).
    None,
}

impl Mode {
    /// The keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What it asks.
    pub mode: Mode,
    /// MX patterns, lowercase: `mx.example.com` or `*.example.com`.
    pub mx: Vec<String>,
    /// Seconds it may be cached.
    pub max_age: u64,
}

impl Policy {
    /// Parses a policy body (RFC 8461 3.2): `key: value` lines ending in
    /// CRLF or LF; unknown keys are ignored.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("not a key: value line: {line:?}"));
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value.to_string()),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {other:?}")),
                    })
                }
                "max_age" => {
                    let n: u64 = value
                        .parse()
                        .map_err(|_| format!("max_age {value:?} is not a number"))?;
                    max_age = Some(n.min(MAX_AGE_LIMIT));
                }
                "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("version is not STSv1".into());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("no mx".into());
        }
        Ok(Policy { mode, mx, max_age })
    }

    /// True when `host` matches one of the policy's MX patterns (a
    /// wildcard stands for exactly one leftmost label).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }
}

/// The policy id of a domain's `_mta-sts` TXT records: exactly one must
/// start with `v=STSv1` and carry a valid `id` (RFC 8461 3.1).
pub fn record_id(records: &[String]) -> Option<String> {
    let mut ours = records
        .iter()
        .filter(|r| r.split(';').next().is_some_and(|v| v.trim() == "v=STSv1"));
    let record = ours.next()?;
    if ours.next().is_some() {
        return None;
    }
    record.split(';').find_map(|field| {
        let (k, v) = field.trim().split_once('=')?;
        let v = v.trim();
        let valid = !v.is_empty() && v.len() <= 32 && v.chars().all(|c| c.is_ascii_alphanumeric());
        (k.trim() == "id" && valid).then(|| v.to_string())
    })
}

/// What delivery to a domain gets: its policy and where it came from.
#[derive(Debug, Clone)]
pub struct Found {
    /// The policy.
    pub policy: Arc<Policy>,
    /// "fetched", "cached", or "cached, refresh failed: ...".
    pub source: String,
}

struct Cached {
    id: String,
    policy: Arc<Policy>,
    expires: Instant,
}

/// Policies of the domains mail goes to, fetched and cached.
pub struct MtaSts {
    dns: Dns,
    tls: Arc<ClientConfig>,
    port: u16,
    cache: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for MtaSts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtaSts")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl MtaSts {
    /// Fetches over `tls` (a verifying config) on `port` (443 but in tests).
    pub fn new(dns: Dns, tls: Arc<ClientConfig>, port: u16) -> MtaSts {
        MtaSts {
            dns,
            tls,
            port,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, domain: &str) -> Option<(String, Arc<Policy>)> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(domain)
            .filter(|c| c.expires > Instant::now())
            .map(|c| (c.id.clone(), c.policy.clone()))
    }

    /// The policy of `domain`, if it has one: cached while its id stays the
    /// same and it has not expired, else fetched; a failed fetch or TXT
    /// lookup falls back to the cached policy (RFC 8461 5.1). `None` means
    /// deliver as without MTA-STS.
    pub async fn policy(&self, domain: &str) -> Option<Found> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let cached = self.cached(&domain);
        let from_cache = |why: String| {
            cached.clone().map(|(_, policy)| Found {
                policy,
                source: why,
            })
        };
        let id = match self.dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => record_id(&records),
            Err(e) => return from_cache(format!("cached, TXT lookup failed: {e}")),
        };
        let Some(id) = id else {
            // No (valid) record: a cached policy still holds until it expires.
            return from_cache("cached, no TXT record".into());
        };
        if let Some((cached_id, policy)) = &cached {
            if *cached_id == id {
                return Some(Found {
                    policy: policy.clone(),
                    source: "cached".into(),
                });
            }
        }
        match self.fetch(&domain).await {
            Ok(policy) => {
                let policy = Arc::new(policy);
                self.store(&domain, id, policy.clone());
                Some(Found {
                    policy,
                    source: "fetched".into(),
                })
            }
            Err(e) => {
                tracing::warn!(domain = %domain, error = %e, "MTA-STS policy fetch failed");
                from_cache(format!("cached, refresh failed: {e}"))
            }
        }
    }

    fn store(&self, domain: &str, id: String, policy: Arc<Policy>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        let expires = Instant::now() + Duration::from_secs(policy.max_age);
        cache.insert(
            domain.to_string(),
            Cached {
                id,
                policy,
                expires,
            },
        );
    }

    /// `GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt`.
    async fn fetch(&self, domain: &str) -> Result<Policy, String> {
        tokio::time::timeout(FETCH_TIMEOUT, self.fetch_body(domain))
            .await
            .map_err(|_| format!("no policy within {} s", FETCH_TIMEOUT.as_secs()))?
            .and_then(|body| {
                let text = std::str::from_utf8(&body).map_err(|_| "policy is not UTF-8")?;
                Policy::parse(text)
            })
    }

    async fn fetch_body(&self, domain: &str) -> Result<Bytes, String> {
        let host = format!("mta-sts.{domain}");
        let addrs = self.dns.addresses(&host).await.map_err(|e| e.to_string())?;
        let mut last = format!("{host} has no address");
        let mut stream = None;
        for ip in addrs {
            match TcpStream::connect((ip, self.port)).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("connect to {ip}: {e}"),
            }
        }
        let stream = stream.ok_or(last)?;
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, host.as_str())
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            if status.is_redirection() {
                return Err(format!("HTTP {status}: redirects are not followed"));
            }
            if status != hyper::StatusCode::OK {
                return Err(format!("HTTP {status}"));
            }
            let plain = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("text/plain"));
            if !plain {
                return Err("policy not served as text/plain".into());
            }
            Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("policy body: {e}"))
        }
        .await;
        driver.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_or_say_why_not() {
        let ok = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n";
        assert_eq!(
            Policy::parse(ok).unwrap(),
            Policy {
                mode: Mode::Enforce,
                mx: vec!["mail.example.com".into(), "*.example.net".into()],
                max_age: 86400
            }
        );
        let lf = "version: STSv1\nmode: testing\nmx: MX.Example.com.\nmax_age: 99999999999\nextension: x\n";
        let p = Policy::parse(lf).unwrap();
        assert_eq!((p.mode, p.max_age), (Mode::Testing, MAX_AGE_LIMIT));
        assert_eq!(p.mx, ["mx.example.com"]);
        for (bad, why) in [
            ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
            (
                "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
                "version",
            ),
            ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx"),
            ("version: STSv1\nmode: enforce\nmx: a\n", "max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
                "max_age",
            ),
            ("<html>\n", "line"),
        ] {
            let err = Policy::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn mx_patterns_match_one_label_wildcards() {
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["mail.example.com".into(), "*.example.net".into()],
            max_age: 1,
        };
        for (host, allowed) in [
            ("mail.example.com", true),
            ("MAIL.example.com.", true),
            ("other.example.com", false),
            ("a.example.net", true),
            ("a.b.example.net", false),
            ("example.net", false),
        ] {
            assert_eq!(p.allows(host), allowed, "{host}");
        }
    }

    #[test]
    fn one_record_with_an_id() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (records, id) in [
            (r(&["v=STSv1; id=20240101T000000"]), Some("20240101T000000")),
            (r(&["v=spf1 -all", "v=STSv1;id=abc;"]), Some("abc")),
            (r(&["v=STSv1; id=a", "v=STSv1; id=b"]), None),
            (r(&["v=STSv1; id=not-alnum"]), None),
            (r(&["v=STSv1"]), None),
            (r(&["v=STSv10; id=a"]), None),
            (r(&[]), None),
        ] {
            assert_eq!(record_id(&records).as_deref(), id, "{records:?}");
        }
    }
}
