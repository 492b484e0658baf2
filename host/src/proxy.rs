//! The PROXY protocol (HAProxy's, versions 1 and 2): a load balancer in
//! front of the relay says, before any SMTP, which client it is passing on.
//! [`parse`] does no I/O, so it is table-tested; [`read_header`] reads
//! exactly one header from a connection, byte-exact, so nothing of what
//! follows (SMTP) is consumed.
//!
//! A small parser of our own rather than a crate: the format is two pages
//! of the specification, the crates for it declare no supported Rust
//! version or are barely used, and reading exactly the header's bytes (the
//! session gets the stream untouched) is easier to prove here than around a
//! parser that wants a buffer of its own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the specification's number).
const V1_MAX: usize = 107;
/// The most address and TLV bytes a v2 header may carry here; HAProxy's
/// sends 12 (IPv4) or 36 (IPv6) plus the TLVs it is told to add.
const V2_MAX_BODY: usize = 1024;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection: the client and the address it connected to.
    Proxied {
        /// The original client.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// The proxy speaking for itself (v2 `LOCAL`, health checks) or not
    /// saying (v1 `UNKNOWN`, v2 with an unspecified family): the
    /// connection's own addresses stand.
    Local,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not a PROXY header.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A header that breaks the format.
    #[error("bad PROXY header: {0}")]
    Bad(&'static str),
    /// The connection ended or failed before the header did.
    #[error("connection ended before the PROXY header did")]
    Closed,
    /// The header did not arrive in time.
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
}

/// The outcome of parsing a buffer that starts a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// A whole header, `len` bytes long.
    Done {
        /// What it says.
        header: Header,
        /// Its length in bytes.
        len: usize,
    },
    /// More bytes are needed; at least this many in all.
    Incomplete(usize),
}

/// Parses the header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parse, Error> {
    if buf.is_empty() {
        return Ok(Parse::Incomplete(8));
    }
    if b"PROXY "[..buf.len().min(6)] == buf[..buf.len().min(6)] {
        return parse_v1(buf);
    }
    if V2_SIGNATURE[..buf.len().min(12)] == buf[..buf.len().min(12)] {
        return parse_v2(buf);
    }
    Err(Error::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parse, Error> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(Error::Bad("v1 line longer than 107 bytes"));
        }
        return Ok(Parse::Incomplete(buf.len() + 1));
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(Error::Bad("v1 line longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| Error::Bad("v1 line not ASCII"))?;
    let mut words = line.split(' ');
    words.next(); // "PROXY"
    let family = words.next().ok_or(Error::Bad("v1 without a family"))?;
    if family == "UNKNOWN" {
        // The rest of the line is to be ignored (the specification).
        return Ok(Parse::Done {
            header: Header::Local,
            len,
        });
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(Error::Bad("v1 family is not TCP4, TCP6 or UNKNOWN")),
    };
    let mut field = || words.next().ok_or(Error::Bad("v1 line has too few fields"));
    let (src, dst, sport, dport) = (field()?, field()?, field()?, field()?);
    if words.next().is_some() {
        return Err(Error::Bad("v1 line has too many fields"));
    }
    let ip = |s: &str| -> Result<IpAddr, Error> {
        let ip: IpAddr = s.parse().map_err(|_| Error::Bad("v1 address"))?;
        if ip.is_ipv6() != v6 {
            return Err(Error::Bad("v1 address of the wrong family"));
        }
        Ok(ip)
    };
    // Decimal without leading zeros or signs, as the specification writes them.
    let port = |s: &str| -> Result<u16, Error> {
        if s.is_empty()
            || (s.len() > 1 && s.starts_with('0'))
            || !s.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(Error::Bad("v1 port"));
        }
        s.parse().map_err(|_| Error::Bad("v1 port"))
    };
    Ok(Parse::Done {
        header: Header::Proxied {
            source: SocketAddr::new(ip(src)?, port(sport)?),
            destination: SocketAddr::new(ip(dst)?, port(dport)?),
        },
        len,
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parse, Error> {
    if buf.len() < 16 {
        return Ok(Parse::Incomplete(16));
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(Error::Bad("v2 version is not 2"));
    }
    let local = match version_command & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Error::Bad("v2 command is not LOCAL or PROXY")),
    };
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if body > V2_MAX_BODY {
        return Err(Error::Bad("v2 header longer than 1024 bytes"));
    }
    let len = 16 + body;
    if buf.len() < len {
        return Ok(Parse::Incomplete(len));
    }
    let addresses = &buf[16..len];
    if local {
        return Ok(Parse::Done {
            header: Header::Local,
            len,
        });
    }
    let header = match buf[13] {
        // AF_UNSPEC: the connection's own addresses.
        0x00 => Header::Local,
        // TCP over IPv4.
        0x11 => {
            let a = addresses
                .get(..12)
                .ok_or(Error::Bad("v2 IPv4 addresses cut short"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        // TCP over IPv6.
        0x21 => {
            let a = addresses
                .get(..36)
                .ok_or(Error::Bad("v2 IPv6 addresses cut short"))?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        _ => return Err(Error::Bad("v2 family is not TCP over IPv4 or IPv6")),
    };
    Ok(Parse::Done { header, len })
}

/// Reads one header from the start of a connection within `timeout`,
/// never reading a byte past it.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Header, Error> {
    let read = async {
        let mut buf = Vec::with_capacity(64);
        loop {
            let want = match parse(&buf)? {
                Parse::Done { header, .. } => return Ok(header),
                Parse::Incomplete(n) => n,
            };
            // A v1 line's end is not known in advance: one byte at a time
            // (at most 107); v2 says its length, read whole.
            let start = buf.len();
            buf.resize(want.max(start + 1), 0);
            stream
                .read_exact(&mut buf[start..])
                .await
                .map_err(|_| Error::Closed)?;
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn proxied(src: &str, dst: &str) -> Header {
        Header::Proxied {
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        }
    }

    #[test]
    fn v1_lines() {
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(100));
        for (input, expected) in [
            (
                &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO"[..],
                Ok(Parse::Done {
                    header: proxied("192.0.2.1:56324", "198.51.100.2:25"),
                    len: 44,
                }),
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n",
                Ok(Parse::Done {
                    header: proxied("[2001:db8::1]:4000", "[2001:db8::2]:25"),
                    len: 44,
                }),
            ),
            (
                b"PROXY UNKNOWN\r\n",
                Ok(Parse::Done {
                    header: Header::Local,
                    len: 15,
                }),
            ),
            (
                b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
                Ok(Parse::Done {
                    header: Header::Local,
                    len: 35,
                }),
            ),
            (b"PROXY TCP4 192.0.2.1", Ok(Parse::Incomplete(21))),
            (b"PRO", Ok(Parse::Incomplete(4))),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
                Err(Error::Bad("v1 line has too few fields")),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
                Err(Error::Bad("v1 line has too many fields")),
            ),
            (
                b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
                Err(Error::Bad("v1 address of the wrong family")),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
                Err(Error::Bad("v1 port")),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 025 2\r\n",
                Err(Error::Bad("v1 port")),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 +25 2\r\n",
                Err(Error::Bad("v1 port")),
            ),
            (
                b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
                Err(Error::Bad("v1 family is not TCP4, TCP6 or UNKNOWN")),
            ),
            (
                long.as_bytes(),
                Err(Error::Bad("v1 line longer than 107 bytes")),
            ),
            (b"EHLO client\r\n", Err(Error::NotProxy)),
            (b"proxy TCP4", Err(Error::NotProxy)),
        ] {
            assert_eq!(
                parse(input),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn v2_headers() {
        let ipv4 = [192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0, 25];
        let mut ipv6 = [0u8; 36];
        ipv6[..2].copy_from_slice(&[0x20, 0x01]);
        ipv6[15] = 1;
        ipv6[16..18].copy_from_slice(&[0x20, 0x01]);
        ipv6[31] = 2;
        ipv6[32..].copy_from_slice(&[0x0f, 0xa0, 0, 25]);
        let with_tlv = [&ipv4[..], &[0x04, 0x00, 0x01, 0xaa]].concat();
        for (input, expected) in [
            (
                v2(1, 0x11, &ipv4),
                Ok(Parse::Done {
                    header: proxied("192.0.2.1:56324", "198.51.100.2:25"),
                    len: 28,
                }),
            ),
            (
                v2(1, 0x21, &ipv6),
                Ok(Parse::Done {
                    header: proxied("[2001::1]:4000", "[2001::2]:25"),
                    len: 52,
                }),
            ),
            (
                v2(1, 0x11, &with_tlv),
                Ok(Parse::Done {
                    header: proxied("192.0.2.1:56324", "198.51.100.2:25"),
                    len: 32,
                }),
            ),
            (
                v2(0, 0x00, &[]),
                Ok(Parse::Done {
                    header: Header::Local,
                    len: 16,
                }),
            ),
            // LOCAL ignores whatever addresses follow.
            (
                v2(0, 0x11, &ipv4),
                Ok(Parse::Done {
                    header: Header::Local,
                    len: 28,
                }),
            ),
            (
                v2(1, 0x00, &[]),
                Ok(Parse::Done {
                    header: Header::Local,
                    len: 16,
                }),
            ),
            (
                v2(1, 0x11, &ipv4[..8]),
                Err(Error::Bad("v2 IPv4 addresses cut short")),
            ),
            (
                v2(1, 0x12, &ipv4),
                Err(Error::Bad("v2 family is not TCP over IPv4 or IPv6")),
            ),
            (
                v2(2, 0x11, &ipv4),
                Err(Error::Bad("v2 command is not LOCAL or PROXY")),
            ),
            (
                v2(1, 0x11, &[0u8; 1025]),
                Err(Error::Bad("v2 header longer than 1024 bytes")),
            ),
            (v2(1, 0x11, &ipv4)[..20].to_vec(), Ok(Parse::Incomplete(28))),
            (V2_SIGNATURE[..5].to_vec(), Ok(Parse::Incomplete(16))),
        ] {
            assert_eq!(parse(&input), expected, "{input:02x?}");
        }
        let mut v1_version = v2(1, 0x11, &ipv4);
        v1_version[12] = 0x11;
        assert_eq!(parse(&v1_version), Err(Error::Bad("v2 version is not 2")));
    }

    /// The reader takes the header's bytes and not one more.
    #[tokio::test]
    async fn reading_stops_at_the_header() {
        for header in [
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n".to_vec(),
            v2(1, 0x11, &[192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0, 25]),
        ] {
            let (mut client, mut server) = tokio::io::duplex(256);
            tokio::io::AsyncWriteExt::write_all(
                &mut client,
                &[&header[..], b"EHLO x\r\n"].concat(),
            )
            .await
            .unwrap();
            let got = read_header(&mut server, Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(got, proxied("192.0.2.1:56324", "198.51.100.2:25"));
            let mut rest = [0u8; 8];
            server.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"EHLO x\r\n");
        }
        let (_client, mut server) = tokio::io::duplex(64);
        assert_eq!(
            read_header(&mut server, Duration::from_millis(50)).await,
            Err(Error::Timeout(Duration::from_millis(50)))
        );
    }
}
