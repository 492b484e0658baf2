//! `postern:relay/dns`: A, AAAA, MX and TXT lookups through the relay's
//! resolver (`delivery.nameservers`, or the system's), each with its own
//! timeout so a slow server cannot hold a plugin past what the relay allows.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hickory_resolver::config::ResolverOpts;
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;

use crate::plugins::bindings::dns::{Answer, Error, Host, MxRecord, RecordType as Kind};
use crate::plugins::instance::HostState;

/// How long one lookup may take, all retries included. It does not count
/// against the plugin's hook deadline, which is re-armed after the call.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The resolver, built on first use (a relay whose plugins never look anything
/// up does not need a working resolver config).
pub struct Resolver {
    nameservers: Vec<String>,
    resolver: OnceLock<Result<TokioResolver, String>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("nameservers", &self.nameservers)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver using these `ip:port` servers, or the system's when empty.
    pub fn new(nameservers: &[String]) -> Resolver {
        Resolver {
            nameservers: nameservers.to_vec(),
            resolver: OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&TokioResolver, Error> {
        self.resolver
            .get_or_init(|| build(&self.nameservers))
            .as_ref()
            .map_err(|e| Error::Temporary(e.clone()))
    }

    /// The resolver's answer, within the lookup timeout.
    async fn ask(&self, name: &str, kind: RecordType) -> Result<Result<Lookup, NetError>, Error> {
        let name = name.trim_end_matches('.');
        if name.is_empty()
            || name.len() > 253
            || name.contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(Error::InvalidName);
        }
        let fqdn = format!("{name}.");
        let resolver = self.get()?;
        tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup(fqdn.as_str(), kind))
            .await
            .map_err(|_| Error::Temporary("timed out".into()))
    }

    async fn lookup(&self, name: &str, kind: RecordType) -> Result<Vec<RData>, Error> {
        match self.ask(name, kind).await? {
            Ok(lookup) => Ok(data(&lookup)),
            Err(e) => classify(e),
        }
    }

    /// Records with the seconds they may be kept. A name without such
    /// records, or without any, answers none, for its zone's negative-cache
    /// time.
    async fn lookup_ttl(&self, name: &str, kind: RecordType) -> Result<(Vec<RData>, u32), Error> {
        match self.ask(name, kind).await? {
            Ok(lookup) => {
                let left = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                Ok((
                    data(&lookup),
                    u32::try_from(left.as_secs()).unwrap_or(u32::MAX),
                ))
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(nr)))
                if matches!(
                    nr.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ) =>
            {
                Ok((Vec::new(), nr.negative_ttl.unwrap_or(0)))
            }
            Err(e) => classify(e).map(|records| (records, 0)),
        }
    }
}

fn data(lookup: &Lookup) -> Vec<RData> {
    lookup.answers().iter().map(|r| r.data.clone()).collect()
}

/// A record as `query` gives it: addresses, `preference exchange`, joined
/// TXT strings, names without the final dot.
fn text(r: &RData) -> Option<String> {
    Some(match r {
        RData::A(a) => a.0.to_string(),
        RData::AAAA(a) => a.0.to_string(),
        RData::MX(mx) => format!(
            "{} {}",
            mx.preference,
            mx.exchange.to_ascii().trim_end_matches('.')
        ),
        RData::TXT(txt) => txt
            .txt_data
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        RData::PTR(ptr) => ptr.0.to_ascii().trim_end_matches('.').to_string(),
        _ => return None,
    })
}

fn build(nameservers: &[String]) -> Result<TokioResolver, String> {
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    opts.ndots = 0;
    crate::delivery::dns::build_resolver(nameservers, opts)
}

/// NXDOMAIN is an answer (`not-found`); a name without records of the type is
/// an empty list; everything else may change later (`temporary`).
fn classify(e: NetError) -> Result<Vec<RData>, Error> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => match nr.response_code {
            ResponseCode::NXDomain => Err(Error::NotFound),
            ResponseCode::NoError => Ok(Vec::new()),
            code => Err(Error::Temporary(format!("server answered {code}"))),
        },
        NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain)) => Err(Error::NotFound),
        other => Err(Error::Temporary(other.to_string())),
    }
}

impl HostState {
    async fn dns(&mut self, name: &str, kind: RecordType) -> Result<Vec<RData>, Error> {
        let r = self.services.dns.lookup(name, kind).await;
        // The deadline counts guest time only: the lookup had its own timeout.
        self.host_call_done();
        r
    }
}

impl Host for HostState {
    async fn a(&mut self, name: String) -> wasmtime::Result<Result<Vec<String>, Error>> {
        Ok(self.dns(&name, RecordType::A).await.map(|rs| {
            rs.iter()
                .filter_map(|r| match r {
                    RData::A(a) => Some(a.0.to_string()),
                    _ => None,
                })
                .collect()
        }))
    }

    async fn aaaa(&mut self, name: String) -> wasmtime::Result<Result<Vec<String>, Error>> {
        Ok(self.dns(&name, RecordType::AAAA).await.map(|rs| {
            rs.iter()
                .filter_map(|r| match r {
                    RData::AAAA(a) => Some(a.0.to_string()),
                    _ => None,
                })
                .collect()
        }))
    }

    async fn mx(&mut self, name: String) -> wasmtime::Result<Result<Vec<MxRecord>, Error>> {
        Ok(self.dns(&name, RecordType::MX).await.map(|rs| {
            rs.iter()
                .filter_map(|r| match r {
                    RData::MX(mx) => Some(MxRecord {
                        preference: mx.preference,
                        exchange: mx.exchange.to_ascii().trim_end_matches('.').to_string(),
                    }),
                    _ => None,
                })
                .collect()
        }))
    }

    async fn txt(&mut self, name: String) -> wasmtime::Result<Result<Vec<String>, Error>> {
        Ok(self.dns(&name, RecordType::TXT).await.map(|rs| {
            rs.iter()
                .filter_map(|r| match r {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()
        }))
    }

    async fn query(&mut self, name: String, kind: Kind) -> wasmtime::Result<Result<Answer, Error>> {
        let kind = match kind {
            Kind::A => RecordType::A,
            Kind::Aaaa => RecordType::AAAA,
            Kind::Mx => RecordType::MX,
            Kind::Txt => RecordType::TXT,
            Kind::Ptr => RecordType::PTR,
        };
        let r = self.services.dns.lookup_ttl(&name, kind).await;
        self.host_call_done();
        Ok(r.map(|(records, ttl)| Answer {
            records: records.iter().filter_map(text).collect(),
            ttl,
        }))
    }
}
