//! A DNS server on 127.0.0.1 for test domains. Hand-rolled over UDP with
//! hickory-proto's message codec (already built as hickory-resolver's
//! dependency) rather than hickory-server: each test states exactly which names
//! answer what, including SERVFAIL and NODATA, which an authority-backed server
//! would need zone files and catalogs to fake.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

/// What a name answers (a name may have several).
#[derive(Debug, Clone)]
pub enum Answer {
    /// MX records: (preference, exchange); exchange "." is a null MX.
    Mx(Vec<(u16, String)>),
    /// Addresses (A and AAAA, by family).
    Addr(Vec<IpAddr>),
    /// One TXT record made of these character-strings (each at most 255
    /// octets; a record of several is their concatenation).
    Txt(Vec<Vec<u8>>),
    /// SERVFAIL for every type.
    ServFail,
}

/// The zone: lowercase name (no trailing dot) to answers. Names not in it are
/// NXDOMAIN; a name present without records of the type asked is NODATA.
#[derive(Default)]
struct Zone {
    names: HashMap<String, Vec<Answer>>,
    /// Queries received, by lowercase name.
    asked: HashMap<String, usize>,
    /// TTLs other than the default 60 s, by lowercase name.
    ttls: HashMap<String, u32>,
}

/// A running server.
pub struct DnsServer {
    /// Where it listens (give `addr.to_string()` to `delivery.nameservers`).
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
}

impl DnsServer {
    /// Starts a server with an empty zone.
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let z = zone.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let response = answer(&mut z.lock().unwrap(), &query);
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        DnsServer { addr, zone }
    }

    /// Adds answers for a name.
    pub fn add(&self, name: &str, answer: Answer) -> &Self {
        self.zone
            .lock()
            .unwrap()
            .names
            .entry(name.trim_end_matches('.').to_ascii_lowercase())
            .or_default()
            .push(answer);
        self
    }

    /// MX records for a domain.
    pub fn mx(&self, domain: &str, hosts: &[(u16, &str)]) -> &Self {
        self.add(
            domain,
            Answer::Mx(hosts.iter().map(|(p, h)| (*p, h.to_string())).collect()),
        )
    }

    /// Answers for `name` carry this TTL (60 s otherwise); 0 keeps
    /// resolvers from caching them, for a test that changes them.
    pub fn ttl(&self, name: &str, seconds: u32) -> &Self {
        self.zone
            .lock()
            .unwrap()
            .ttls
            .insert(name.trim_end_matches('.').to_ascii_lowercase(), seconds);
        self
    }

    /// Forgets every answer of `name` (it is NXDOMAIN again).
    pub fn remove(&self, name: &str) -> &Self {
        self.zone
            .lock()
            .unwrap()
            .names
            .remove(&name.trim_end_matches('.').to_ascii_lowercase());
        self
    }

    /// One TXT record, split into 255-octet strings as a zone file would.
    pub fn txt(&self, name: &str, record: &str) -> &Self {
        let strings = record.as_bytes().chunks(255).map(<[u8]>::to_vec).collect();
        self.add(name, Answer::Txt(strings))
    }

    /// One TXT record given as its character-strings.
    pub fn txt_strings(&self, name: &str, strings: &[&str]) -> &Self {
        self.add(
            name,
            Answer::Txt(strings.iter().map(|s| s.as_bytes().to_vec()).collect()),
        )
    }

    /// SERVFAIL for every question about `name`.
    pub fn servfail(&self, name: &str) -> &Self {
        self.add(name, Answer::ServFail)
    }

    /// How many queries for `name` arrived.
    pub fn queries(&self, name: &str) -> usize {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.zone
            .lock()
            .unwrap()
            .asked
            .get(&name)
            .copied()
            .unwrap_or(0)
    }

    /// A/AAAA records for a host.
    pub fn a(&self, host: &str, ips: &[&str]) -> &Self {
        self.add(
            host,
            Answer::Addr(ips.iter().map(|i| i.parse().unwrap()).collect()),
        )
    }
}

fn answer(zone: &mut Zone, query: &Message) -> Message {
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    let Some(q) = query.queries.first() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp;
    };
    resp.add_query(q.clone());
    let name = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    *zone.asked.entry(name.clone()).or_default() += 1;
    let ttl = zone.ttls.get(&name).copied().unwrap_or(60);
    let Some(answers) = zone.names.get(&name) else {
        resp.metadata.response_code = ResponseCode::NXDomain;
        return resp;
    };
    for a in answers {
        match a {
            Answer::ServFail => {
                resp.metadata.response_code = ResponseCode::ServFail;
                return resp;
            }
            Answer::Mx(hosts) if q.query_type == RecordType::MX => {
                for (pref, host) in hosts {
                    let exchange = if host == "." {
                        Name::root()
                    } else {
                        Name::from_ascii(format!("{host}.")).unwrap()
                    };
                    resp.add_answer(Record::from_rdata(
                        q.name.clone(),
                        ttl,
                        RData::MX(MX::new(*pref, exchange)),
                    ));
                }
            }
            Answer::Txt(strings) if q.query_type == RecordType::TXT => {
                let parts: Vec<&[u8]> = strings.iter().map(Vec::as_slice).collect();
                resp.add_answer(Record::from_rdata(
                    q.name.clone(),
                    ttl,
                    RData::TXT(TXT::from_bytes(parts)),
                ));
            }
            Answer::Addr(ips) => {
                for ip in ips {
                    let rdata = match (ip, q.query_type) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                        _ => continue,
                    };
                    resp.add_answer(Record::from_rdata(q.name.clone(), ttl, rdata));
                }
            }
            _ => {}
        }
    }
    resp
}
