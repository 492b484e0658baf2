//! MX and address lookups (hickory-resolver), with the failures sorted the way
//! delivery needs them: NXDOMAIN and a null MX are permanent (the mail bounces),
//! SERVFAIL and timeouts are temporary (the mail waits), and a domain that exists
//! without MX records (NODATA) is its own mail host (RFC 5321 5.1).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;

use super::Error;

/// One mail host of a domain, in the order to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Host name without the trailing dot.
    pub name: String,
    /// MX preference (0 for the implicit MX).
    pub preference: u16,
}

/// A resolver for the relay (delivery and the plugins' `dns` interface): the
/// given `ip:port` nameservers, or the system's when there are none.
pub fn build_resolver(nameservers: &[String], opts: ResolverOpts) -> Result<TokioResolver, String> {
    let builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("system resolver: {e}"))?
    } else {
        let mut servers = Vec::new();
        for ns in nameservers {
            let addr: SocketAddr = ns
                .parse()
                .map_err(|_| format!("nameserver {ns:?} is not ip:port"))?;
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            servers.push(NameServerConfig::new(addr.ip(), true, vec![udp, tcp]));
        }
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder
        .with_options(opts)
        .build()
        .map_err(|e| format!("resolver: {e}"))
}

/// The resolver delivery uses.
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// The system resolver, or the given `ip:port` nameservers.
    pub fn new(nameservers: &[String]) -> Result<Dns, String> {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.ndots = 0;
        let resolver = build_resolver(nameservers, opts)?;
        Ok(Dns { resolver })
    }

    /// The resolver itself, for other lookups on the same cache (message
    /// authentication).
    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// The mail hosts of `domain`, best first, equal preferences shuffled.
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<MxHost>, Error> {
        // An address literal ("[192.0.2.1]") is its own host.
        if domain.starts_with('[') {
            return Ok(vec![MxHost {
                name: domain.to_string(),
                preference: 0,
            }]);
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let records = match self.resolver.lookup(fqdn.as_str(), RecordType::MX).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            Err(e) => match classify(domain, e) {
                Lookup::NoData => Vec::new(),
                Lookup::Failed(e) => return Err(e),
            },
        };
        if records.is_empty() {
            // RFC 5321 5.1: no MX records, the domain itself is the mail host.
            return Ok(vec![MxHost {
                name: domain.trim_end_matches('.').to_string(),
                preference: 0,
            }]);
        }
        // RFC 7505: a single MX with the root as exchange means "no mail here".
        if records.len() == 1 && records[0].1.is_root() {
            return Err(Error::NullMx(domain.to_string()));
        }
        let mut hosts: Vec<MxHost> = records
            .into_iter()
            .filter(|(_, name)| !name.is_root())
            .map(|(preference, name)| MxHost {
                name: name.to_ascii().trim_end_matches('.').to_string(),
                preference,
            })
            .collect();
        hosts.shuffle(&mut rand::rng());
        // Stable sort keeps the shuffled order among equal preferences.
        hosts.sort_by_key(|h| h.preference);
        Ok(hosts)
    }

    /// The addresses of a mail host (A and AAAA), or the literal address.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, Error> {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        let literal = literal.strip_prefix("IPv6:").unwrap_or(literal);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => {
                let ips: Vec<IpAddr> = ips.iter().collect();
                if ips.is_empty() {
                    Err(Error::Dns {
                        name: host.into(),
                        message: "no A or AAAA records".into(),
                        transient: false,
                    })
                } else {
                    Ok(ips)
                }
            }
            Err(e) => match classify(host, e) {
                Lookup::NoData => Err(Error::Dns {
                    name: host.into(),
                    message: "no A or AAAA records".into(),
                    transient: false,
                }),
                Lookup::Failed(e) => Err(e),
            },
        }
    }
}

impl Dns {
    /// The TXT records of `name`, each with its strings joined; none when
    /// the name has none or does not exist. `Err` is a failed lookup.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, Error> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.lookup(fqdn.as_str(), RecordType::TXT).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) => match classify(name, e) {
                Lookup::NoData
                | Lookup::Failed(Error::Dns {
                    transient: false, ..
                }) => Ok(Vec::new()),
                Lookup::Failed(e) => Err(e),
            },
        }
    }
}

enum Lookup {
    /// The name exists but has no records of the type asked.
    NoData,
    Failed(Error),
}

fn classify(name: &str, e: NetError) -> Lookup {
    let failed = |message: String, transient| {
        Lookup::Failed(Error::Dns {
            name: name.into(),
            message,
            transient,
        })
    };
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => match nr.response_code {
            ResponseCode::NXDomain => failed("domain does not exist (NXDOMAIN)".into(), false),
            ResponseCode::NoError => Lookup::NoData,
            code => failed(format!("server answered {code}"), true),
        },
        NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain)) => {
            failed("domain does not exist (NXDOMAIN)".into(), false)
        }
        NetError::Dns(DnsError::ResponseCode(code)) => {
            failed(format!("server answered {code}"), true)
        }
        NetError::Timeout => failed("timed out".into(), true),
        other => failed(other.to_string(), true),
    }
}
