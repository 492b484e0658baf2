//! The SMTP client: one connection to one next hop, able to carry several
//! messages in turn. Greeting, EHLO (HELO when EHLO is refused), STARTTLS,
//! AUTH (only over TLS), then per message MAIL/RCPT/DATA, pipelined when the
//! server offers PIPELINING (RFC 2920). Every wait has the RFC 5321 4.5.3.2
//! timeout of its stage. Nothing a server sends can panic the client: replies are
//! framed and bounded here, and capabilities are read with smtp-proto's
//! `EhloResponse`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::ServerName;
use smtp_proto::{
    EhloResponse, AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_DSN, EXT_PIPELINING, EXT_SIZE,
    EXT_SMTP_UTF8, EXT_START_TLS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls::ClientTls;
use super::Error;
use crate::envelope::{Address, MailParams, Recipient, Ret};
use crate::smtp::reply::Reply;

/// Client timeouts, from `[delivery.timeouts]` (RFC 5321 4.5.3.2 minimums
/// by default).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Initial 220.
    pub greeting: Duration,
    /// EHLO, STARTTLS, AUTH, MAIL, RSET.
    pub mail: Duration,
    /// Each RCPT.
    pub rcpt: Duration,
    /// DATA until 354.
    pub data_init: Duration,
    /// Each block of message data written.
    pub data_block: Duration,
    /// The reply to the final dot.
    pub final_dot: Duration,
}

impl From<&crate::config::DeliveryTimeouts> for Timeouts {
    fn from(t: &crate::config::DeliveryTimeouts) -> Timeouts {
        Timeouts {
            connect: t.connect.0,
            greeting: t.greeting.0,
            mail: t.command.0,
            rcpt: t.command.0,
            data_init: t.data.0,
            data_block: t.data_block.0,
            final_dot: t.data_end.0,
        }
    }
}

/// How TLS is used on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsUse {
    /// TLS from the first byte, verified (`smtps://`).
    Implicit,
    /// STARTTLS required, verified.
    Required,
    /// STARTTLS when offered, verified (a smart host we send credentials to).
    OfferedVerified,
    /// STARTTLS when offered, any certificate (MX hosts).
    Opportunistic,
    /// No STARTTLS: the retry after an opportunistic handshake failed.
    Plain,
}

/// One next-hop address to connect to.
#[derive(Debug, Clone)]
pub struct Hop<'a> {
    /// The host name (SNI and certificate name) or address literal.
    pub host: &'a str,
    /// Where to connect.
    pub addr: SocketAddr,
    /// TLS policy.
    pub tls: TlsUse,
    /// AUTH user and password.
    pub credentials: Option<&'a (String, String)>,
    /// The config for pinned certificates, used instead of the verified
    /// one when the hop has `tls_fingerprint`.
    pub pinned: Option<Arc<rustls::ClientConfig>>,
}

/// One message to send.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Reverse-path.
    pub sender: &'a Address,
    /// MAIL parameters from the original transaction.
    pub params: &'a MailParams,
    /// The recipients of this transaction.
    pub recipients: Vec<&'a Recipient>,
    /// The message, CRLF line ends, not dot-stuffed.
    pub message: &'a [u8],
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Largest reply accepted (all lines together).
const MAX_REPLY: usize = 64 * 1024;

/// An open SMTP connection, past EHLO (and TLS and AUTH where they apply).
pub struct Client {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    /// Kept from message to message: see [`DataBlocks`].
    block: Vec<u8>,
    caps: EhloResponse<String>,
    timeouts: Timeouts,
    /// The address connected to.
    pub peer: SocketAddr,
    /// The host name connected to.
    pub host: String,
    /// TLS version in use, e.g. "TLSv1.3".
    pub tls: Option<&'static str>,
    /// The MTA-STS outcome of the connection, for the attempt's log record
    /// (MX delivery only).
    pub mta_sts: Option<String>,
    broken: bool,
}

impl Client {
    /// Connects and runs the dialogue up to the first MAIL.
    pub async fn connect(
        hop: &Hop<'_>,
        helo_name: &str,
        tls: &ClientTls,
        timeouts: Timeouts,
    ) -> Result<Client, Error> {
        let tcp = match tokio::time::timeout(timeouts.connect, TcpStream::connect(hop.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    addr: hop.addr,
                    source,
                })
            }
            Err(_) => return Err(Error::Timeout { stage: "connect" }),
        };
        let _ = tcp.set_nodelay(true);
        let mut client = Client {
            io: Box::new(tcp),
            buf: Vec::new(),
            block: Vec::new(),
            caps: EhloResponse::default(),
            timeouts,
            peer: hop.addr,
            host: hop.host.to_string(),
            tls: None,
            mta_sts: None,
            broken: false,
        };
        let verified = hop.pinned.clone().unwrap_or_else(|| tls.verified.clone());
        if hop.tls == TlsUse::Implicit {
            client.start_tls(hop, verified.clone()).await?;
        }
        let greeting = client.read_reply(timeouts.greeting, "greeting").await?;
        if greeting.code != 220 {
            return Err(Error::Rejected {
                stage: "greeting",
                reply: greeting,
            });
        }
        client.ehlo(helo_name).await?;
        if client.tls.is_none() {
            let offered = client.has(EXT_START_TLS);
            match (hop.tls, offered) {
                (TlsUse::Required, false) => {
                    return Err(Error::Tls(format!(
                        "{} does not offer STARTTLS and TLS is required",
                        hop.host
                    )))
                }
                (TlsUse::Required | TlsUse::OfferedVerified, true) => {
                    client.starttls(hop, verified, helo_name).await?
                }
                (TlsUse::Opportunistic, true) => {
                    client
                        .starttls(hop, tls.opportunistic.clone(), helo_name)
                        .await?
                }
                _ => {}
            }
        }
        if let Some(creds) = hop.credentials {
            if client.tls.is_none() {
                return Err(Error::Tls(format!(
                    "{} offers no TLS; credentials are only sent over TLS",
                    hop.host
                )));
            }
            client.auth(creds).await?;
        }
        Ok(client)
    }

    fn has(&self, ext: u32) -> bool {
        self.caps.capabilities & ext != 0
    }

    /// The server accepts DSN parameters (RFC 3461).
    pub fn supports_dsn(&self) -> bool {
        self.has(EXT_DSN)
    }

    /// The connection can carry another message.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    async fn ehlo(&mut self, name: &str) -> Result<(), Error> {
        self.write(format!("EHLO {name}\r\n").as_bytes(), "EHLO")
            .await?;
        let raw = self.read_raw(self.timeouts.mail, "EHLO").await?;
        let reply = parse_reply(&raw).map_err(|e| self.fail(e))?;
        if reply.code == 250 {
            self.caps = EhloResponse::parse(&mut raw.iter()).unwrap_or_default();
            return Ok(());
        }
        // RFC 5321 3.2: a server that refuses EHLO may still take HELO.
        if reply.code >= 500 {
            self.write(format!("HELO {name}\r\n").as_bytes(), "HELO")
                .await?;
            let reply = self.read_reply(self.timeouts.mail, "HELO").await?;
            if reply.code == 250 {
                self.caps = EhloResponse::default();
                return Ok(());
            }
            return Err(Error::Rejected {
                stage: "HELO",
                reply,
            });
        }
        Err(Error::Rejected {
            stage: "EHLO",
            reply,
        })
    }

    async fn starttls(
        &mut self,
        hop: &Hop<'_>,
        config: Arc<rustls::ClientConfig>,
        helo_name: &str,
    ) -> Result<(), Error> {
        self.write(b"STARTTLS\r\n", "STARTTLS").await?;
        let reply = self.read_reply(self.timeouts.mail, "STARTTLS").await?;
        if reply.code != 220 {
            if hop.tls == TlsUse::Opportunistic {
                return Ok(());
            }
            return Err(Error::Rejected {
                stage: "STARTTLS",
                reply,
            });
        }
        // Anything the server sent after its 220 was not protected by TLS:
        // discard it rather than read it as a reply (the CVE-2011-0411 class).
        self.buf.clear();
        self.start_tls(hop, config).await?;
        self.ehlo(helo_name).await
    }

    async fn start_tls(
        &mut self,
        hop: &Hop<'_>,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<(), Error> {
        let host = hop.host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| Error::Tls(format!("{host}: not a valid server name: {e}")))?;
        let io = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        let connector = TlsConnector::from(config);
        let stream = match tokio::time::timeout(self.timeouts.mail, connector.connect(name, io))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.broken = true;
                let mut why = format!("handshake with {host}: {e}");
                if why.contains("CaUsedAsEndEntity") {
                    why.push_str(
                            "; the server presents a CA certificate as its own (as `openssl req -x509` makes): \
                             instead of tls_ca, pin it with tls_fingerprint = [\"sha256:...\"] \
                             (`openssl x509 -noout -fingerprint -sha256 -in CERT` prints it)",
                        );
                }
                return Err(Error::Tls(why));
            }
            Err(_) => {
                self.broken = true;
                return Err(Error::Timeout {
                    stage: "TLS handshake",
                });
            }
        };
        self.tls = match stream.get_ref().1.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
            Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
            _ => Some("TLS"),
        };
        self.io = Box::new(stream);
        Ok(())
    }

    async fn auth(&mut self, (user, password): &(String, String)) -> Result<(), Error> {
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let reply = if self.caps.auth_mechanisms & AUTH_PLAIN != 0 {
            let token = b64(format!("\0{user}\0{password}").as_bytes());
            self.write(format!("AUTH PLAIN {token}\r\n").as_bytes(), "AUTH")
                .await?;
            self.read_reply(self.timeouts.mail, "AUTH").await?
        } else if self.caps.auth_mechanisms & AUTH_LOGIN != 0 {
            self.write(b"AUTH LOGIN\r\n", "AUTH").await?;
            let mut reply = self.read_reply(self.timeouts.mail, "AUTH").await?;
            for secret in [user.as_bytes(), password.as_bytes()] {
                if reply.code != 334 {
                    break;
                }
                self.write(format!("{}\r\n", b64(secret)).as_bytes(), "AUTH")
                    .await?;
                reply = self.read_reply(self.timeouts.mail, "AUTH").await?;
            }
            reply
        } else {
            return Err(Error::Rejected {
                stage: "AUTH",
                reply: Reply::new(
                    454,
                    "4.7.0",
                    format!("{} offers neither AUTH PLAIN nor LOGIN", self.host),
                ),
            });
        };
        if reply.code == 235 {
            return Ok(());
        }
        // Like Postfix's smtp_sasl_auth_soft_bounce: refused credentials are a
        // configuration problem to fix, not a reason to bounce the mail.
        Err(Error::Rejected {
            stage: "AUTH",
            reply: Reply::new(454, "4.7.0", format!("authentication refused: {reply}")),
        })
    }

    /// Sends one message. `Ok` holds one outcome per recipient (in order);
    /// `Err` applies to every recipient (MAIL refused, connection lost, a
    /// capability the message needs is missing).
    pub async fn send(&mut self, msg: &Outgoing<'_>) -> Result<Vec<Result<Reply, Error>>, Error> {
        let eight_bit = !msg.message.is_ascii();
        if self.has(EXT_SIZE) && self.caps.size > 0 && msg.message.len() > self.caps.size {
            return Err(Error::Unsupported(Reply::new(
                552,
                "5.3.4",
                format!(
                    "message size {} exceeds the limit of {} ({})",
                    msg.message.len(),
                    self.host,
                    self.caps.size
                ),
            )));
        }
        let utf8 = self.has(EXT_SMTP_UTF8);
        let no_utf8 = |what: &str| {
            Error::Unsupported(Reply::new(
                553,
                "5.6.7",
                format!("{what} needs SMTPUTF8, which the next hop does not support"),
            ))
        };
        if msg.sender.is_utf8() && !utf8 {
            return Err(no_utf8("the sender address"));
        }
        if !clean(msg.sender.as_str()) {
            return Err(Error::Unsupported(Reply::BAD_SENDER));
        }
        let dsn = self.supports_dsn();
        let mut mail = format!("MAIL FROM:<{}>", msg.sender);
        if self.has(EXT_SIZE) {
            mail.push_str(&format!(" SIZE={}", msg.message.len()));
        }
        if eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        let any_utf8 = msg.sender.is_utf8() || msg.recipients.iter().any(|r| r.address.is_utf8());
        if utf8 && (msg.params.smtputf8 || any_utf8) {
            mail.push_str(" SMTPUTF8");
        }
        if dsn {
            match msg.params.ret {
                Some(Ret::Full) => mail.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => mail.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &msg.params.envid {
                mail.push_str(&format!(" ENVID={}", xtext(envid)));
            }
        }
        mail.push_str("\r\n");

        let mut outcomes: Vec<Option<Result<Reply, Error>>> = Vec::new();
        let mut commands: Vec<(usize, String)> = Vec::new();
        for (i, r) in msg.recipients.iter().enumerate() {
            if r.address.is_utf8() && !utf8 {
                outcomes.push(Some(Err(no_utf8("the recipient address"))));
                continue;
            }
            if !clean(r.address.as_str()) {
                outcomes.push(Some(Err(Error::Unsupported(Reply::BAD_RECIPIENT))));
                continue;
            }
            outcomes.push(None);
            let mut rcpt = format!("RCPT TO:<{}>", r.address);
            if dsn {
                if let Some(n) = &r.notify {
                    let mut list = Vec::new();
                    if n.never {
                        list.push("NEVER");
                    } else {
                        if n.success {
                            list.push("SUCCESS");
                        }
                        if n.failure {
                            list.push("FAILURE");
                        }
                        if n.delay {
                            list.push("DELAY");
                        }
                    }
                    if !list.is_empty() {
                        rcpt.push_str(&format!(" NOTIFY={}", list.join(",")));
                    }
                }
                if let Some(orcpt) = r.orcpt.as_deref().filter(|o| clean(o)) {
                    let full = super::bounce::orcpt_with_type(orcpt);
                    let (kind, addr) = full.split_once(';').unwrap_or(("rfc822", &full));
                    rcpt.push_str(&format!(" ORCPT={kind};{}", xtext(addr)));
                }
            }
            rcpt.push_str("\r\n");
            commands.push((i, rcpt));
        }
        if commands.is_empty() {
            return Ok(outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| Err(no_utf8("?"))))
                .collect());
        }

        // Checked after the addresses: a recipient that needs SMTPUTF8 gets
        // 5.6.7, the more precise reason, even when the content is 8-bit too.
        // Turning 8-bit content into 7-bit would mean re-encoding MIME parts,
        // which can break signatures: refuse instead, as RFC 6152 allows.
        if eight_bit && !self.has(EXT_8BIT_MIME) {
            let host = self.host.clone();
            return Ok(outcomes
                .into_iter()
                .map(|o| {
                    o.unwrap_or_else(|| {
                        Err(Error::Unsupported(Reply::new(
                            554,
                            "5.6.3",
                            format!("{host} does not support 8BITMIME and the message has 8-bit content"),
                        )))
                    })
                })
                .collect());
        }
        let pipelined = self.has(EXT_PIPELINING);
        let mut accepted = Vec::new();
        let mut data_reply = None;
        let mail_reply;
        if pipelined {
            let mut batch = mail.into_bytes();
            for (_, c) in &commands {
                batch.extend_from_slice(c.as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.write(&batch, "MAIL").await?;
            mail_reply = self.read_reply(self.timeouts.mail, "MAIL").await?;
            for (i, _) in &commands {
                let reply = self.read_reply(self.timeouts.rcpt, "RCPT").await?;
                self.rcpt_outcome(&mut outcomes, &mut accepted, *i, &mail_reply, reply);
            }
            data_reply = Some(self.read_reply(self.timeouts.data_init, "DATA").await?);
        } else {
            self.write(mail.as_bytes(), "MAIL").await?;
            mail_reply = self.read_reply(self.timeouts.mail, "MAIL").await?;
            if mail_reply.code == 250 {
                for (i, c) in &commands {
                    self.write(c.as_bytes(), "RCPT").await?;
                    let reply = self.read_reply(self.timeouts.rcpt, "RCPT").await?;
                    self.rcpt_outcome(&mut outcomes, &mut accepted, *i, &mail_reply, reply);
                }
                if !accepted.is_empty() {
                    self.write(b"DATA\r\n", "DATA").await?;
                    data_reply = Some(self.read_reply(self.timeouts.data_init, "DATA").await?);
                }
            }
        }
        if mail_reply.code != 250 {
            if data_reply.as_ref().is_some_and(|r| r.code == 354) {
                self.write(b".\r\n", "end of data").await?;
                self.read_reply(self.timeouts.final_dot, "end of data")
                    .await?;
            }
            self.rset().await;
            return Err(Error::Rejected {
                stage: "MAIL",
                reply: mail_reply,
            });
        }
        match data_reply {
            Some(reply) if reply.code == 354 => {
                if accepted.is_empty() {
                    // A server that said 354 with no recipient: end the empty message.
                    self.write(b".\r\n", "end of data").await?;
                    self.read_reply(self.timeouts.final_dot, "end of data")
                        .await?;
                    self.rset().await;
                } else {
                    let mut blocks = DataBlocks::new(msg.message);
                    let mut scratch = std::mem::take(&mut self.block);
                    while let Some(block) = blocks.next(&mut scratch) {
                        self.write_timed(block, self.timeouts.data_block, "data block")
                            .await?;
                    }
                    self.block = scratch;
                    let reply = self
                        .read_reply(self.timeouts.final_dot, "end of data")
                        .await?;
                    for i in &accepted {
                        outcomes[*i] = Some(if reply.code == 250 {
                            Ok(reply.clone())
                        } else {
                            Err(Error::Rejected {
                                stage: "end of data",
                                reply: reply.clone(),
                            })
                        });
                    }
                }
            }
            Some(reply) => {
                for i in &accepted {
                    outcomes[*i] = Some(Err(Error::Rejected {
                        stage: "DATA",
                        reply: reply.clone(),
                    }));
                }
                self.rset().await;
            }
            None => self.rset().await,
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Err(Error::Protocol("no reply for this recipient".into())))
            })
            .collect())
    }

    fn rcpt_outcome(
        &self,
        outcomes: &mut [Option<Result<Reply, Error>>],
        accepted: &mut Vec<usize>,
        i: usize,
        mail_reply: &Reply,
        reply: Reply,
    ) {
        if mail_reply.code != 250 {
            return;
        }
        if reply.code == 250 || reply.code == 251 {
            accepted.push(i);
        } else {
            outcomes[i] = Some(Err(Error::Rejected {
                stage: "RCPT",
                reply,
            }));
        }
    }

    async fn rset(&mut self) {
        if self.write(b"RSET\r\n", "RSET").await.is_err() {
            return;
        }
        match self.read_reply(self.timeouts.mail, "RSET").await {
            Ok(r) if r.code == 250 => {}
            _ => self.broken = true,
        }
    }

    /// Says QUIT and closes; errors do not matter any more.
    pub async fn quit(mut self) {
        if self.broken {
            return;
        }
        if self.write(b"QUIT\r\n", "QUIT").await.is_ok() {
            let wait = self.timeouts.mail.min(Duration::from_secs(10));
            let _ = self.read_reply(wait, "QUIT").await;
        }
        let _ = self.io.shutdown().await;
    }

    fn fail(&mut self, e: Error) -> Error {
        self.broken = true;
        e
    }

    async fn write(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), Error> {
        self.write_timed(bytes, self.timeouts.mail, stage).await
    }

    async fn write_timed(
        &mut self,
        bytes: &[u8],
        timeout: Duration,
        stage: &'static str,
    ) -> Result<(), Error> {
        let io = &mut self.io;
        let result = tokio::time::timeout(timeout, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(self.fail(Error::Io { stage, source })),
            Err(_) => Err(self.fail(Error::Timeout { stage })),
        }
    }

    async fn read_reply(&mut self, timeout: Duration, stage: &'static str) -> Result<Reply, Error> {
        let raw = self.read_raw(timeout, stage).await?;
        parse_reply(&raw).map_err(|e| self.fail(e))
    }

    /// Reads one whole (possibly multi-line) reply.
    async fn read_raw(&mut self, timeout: Duration, stage: &'static str) -> Result<Vec<u8>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match reply_end(&self.buf) {
                Ok(Some(end)) => return Ok(self.buf.drain(..end).collect()),
                Ok(None) => {}
                Err(e) => return Err(self.fail(e)),
            }
            if self.buf.len() > MAX_REPLY {
                return Err(self.fail(Error::Protocol(format!("reply to {stage} too long"))));
            }
            let mut chunk = [0u8; 4096];
            let n = match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) => {
                    return Err(self.fail(Error::Io {
                        stage,
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    }))
                }
                Ok(Ok(n)) => n,
                Ok(Err(source)) => return Err(self.fail(Error::Io { stage, source })),
                Err(_) => return Err(self.fail(Error::Timeout { stage })),
            };
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// No CR, LF or angle brackets: an address that could not smuggle a command.
fn clean(s: &str) -> bool {
    !s.contains(['\r', '\n', '<', '>'])
}

/// RFC 3461 xtext: `+`, `=`, controls, space and non-ASCII as `+HH`.
fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// The end of the first complete reply in `buf`, if there is one.
fn reply_end(buf: &[u8]) -> Result<Option<usize>, Error> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(Error::Protocol(format!(
                "not an SMTP reply: {:?}",
                String::from_utf8_lossy(&line[..line.len().min(80)])
            )));
        }
        start += nl + 1;
        match line.get(3) {
            Some(b'-') => continue,
            None | Some(b' ') => return Ok(Some(start)),
            Some(_) => {
                return Err(Error::Protocol(format!(
                    "not an SMTP reply: {:?}",
                    String::from_utf8_lossy(&line[..line.len().min(80)])
                )))
            }
        }
    }
    Ok(None)
}

/// Parses one whole reply (as framed by [`reply_end`]) into code, enhanced
/// status (when the first line has one) and text.
fn parse_reply(raw: &[u8]) -> Result<Reply, Error> {
    let text = String::from_utf8_lossy(raw);
    let code: u16 = text
        .get(..3)
        .and_then(|c| c.parse().ok())
        .filter(|c| (200..600).contains(c))
        .ok_or_else(|| Error::Protocol(format!("bad reply code in {:?}", text.trim_end())))?;
    let mut enhanced = String::new();
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let rest = line.get(4..).unwrap_or("").trim_end();
        let rest = match rest.split_once(' ') {
            Some((esc, tail)) if is_enhanced(esc, code) => {
                if n == 0 {
                    enhanced = esc.to_string();
                }
                tail
            }
            None if is_enhanced(rest, code) => {
                if n == 0 {
                    enhanced = rest.to_string();
                }
                ""
            }
            _ => rest,
        };
        lines.push(rest.to_string());
    }
    Ok(Reply::new(code, enhanced, lines.join(" ")))
}

/// `class.subject.detail` whose class matches the reply code's first digit.
fn is_enhanced(s: &str, code: u16) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts[0] == (code / 100).to_string()
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Largest block of message data written under one timeout.
const DATA_BLOCK: usize = 64 * 1024;

/// A message as DATA carries it (RFC 5321 4.5.2): a dot added to each line
/// that starts with one, CRLF after a last line without one, and ".\r\n" to
/// end, handed out in blocks of at most [`DATA_BLOCK`] bytes. Runs of that
/// size with no line to stuff are lent straight from the message; the rest
/// (short runs, the added dots, the end) is copied into a scratch buffer
/// that the connection keeps, so no message is ever copied whole.
struct DataBlocks<'a> {
    message: &'a [u8],
    /// How much of the message has been handed out.
    pos: usize,
    /// Where the next line starting with a dot starts.
    next_dot: Option<usize>,
    dots: memchr::memmem::FindIter<'a, 'static>,
    ended: bool,
}

impl<'a> DataBlocks<'a> {
    fn new(message: &'a [u8]) -> DataBlocks<'a> {
        let mut dots = memchr::memmem::find_iter(message, b"\r\n.");
        let next_dot = match message.first() {
            Some(b'.') => Some(0),
            _ => dots.next().map(|p| p + 2),
        };
        DataBlocks {
            message,
            pos: 0,
            next_dot,
            dots,
            ended: false,
        }
    }

    /// The next block, or `None` once the end of data was handed out.
    fn next<'r>(&'r mut self, scratch: &'r mut Vec<u8>) -> Option<&'r [u8]> {
        if self.ended {
            return None;
        }
        scratch.clear();
        loop {
            if self.next_dot == Some(self.pos) {
                if scratch.len() == DATA_BLOCK {
                    break;
                }
                scratch.push(b'.');
                self.next_dot = self.dots.next().map(|p| p + 2);
            }
            let run = &self.message[self.pos..self.next_dot.unwrap_or(self.message.len())];
            if run.is_empty() {
                let open_line = !self.message.is_empty() && !self.message.ends_with(b"\r\n");
                let end: &[u8] = if open_line { b"\r\n.\r\n" } else { b".\r\n" };
                if scratch.len() + end.len() <= DATA_BLOCK {
                    scratch.extend_from_slice(end);
                    self.ended = true;
                }
                break;
            }
            if scratch.is_empty() && run.len() >= DATA_BLOCK {
                self.pos += DATA_BLOCK;
                return Some(&run[..DATA_BLOCK]);
            }
            let take = run.len().min(DATA_BLOCK - scratch.len());
            scratch.extend_from_slice(&run[..take]);
            self.pos += take;
            if scratch.len() == DATA_BLOCK {
                break;
            }
        }
        Some(&scratch[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All the blocks of a message, joined, and how many there were.
    fn encoded(message: &[u8]) -> (Vec<u8>, usize) {
        let mut blocks = DataBlocks::new(message);
        let mut scratch = Vec::new();
        let (mut out, mut n) = (Vec::new(), 0);
        while let Some(block) = blocks.next(&mut scratch) {
            assert!(!block.is_empty() && block.len() <= DATA_BLOCK);
            out.extend_from_slice(block);
            n += 1;
        }
        (out, n)
    }

    /// Dot-stuffing as RFC 5321 4.5.2 states it, a line at a time.
    fn stuffed_line_by_line(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        while !rest.is_empty() {
            let (line, next) = match crate::smtp::codec::find_crlf(rest) {
                Some(p) => (&rest[..p], &rest[p + 2..]),
                None => (rest, &rest[rest.len()..]),
            };
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
            rest = next;
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    #[test]
    fn data_encoding() {
        let long = "x".repeat(2000);
        for (input, expected) in [
            ("", ".\r\n".to_string()),
            ("a\r\n", "a\r\n.\r\n".into()),
            ("a", "a\r\n.\r\n".into()),
            (".\r\n", "..\r\n.\r\n".into()),
            (".", "..\r\n.\r\n".into()),
            ("a\r\n.b\r\n..\r\n", "a\r\n..b\r\n...\r\n.\r\n".into()),
            ("a\r\n.", "a\r\n..\r\n.\r\n".into()),
            (long.as_str(), format!("{long}\r\n.\r\n")),
        ] {
            let (out, _) = encoded(input.as_bytes());
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{input:?}");
        }
    }

    /// Around and across block boundaries: lent runs, copied runs, dots at
    /// a block's last and first byte, and an end that needs a block of its own.
    #[test]
    fn data_blocks_agree_with_line_by_line_stuffing() {
        let block = DATA_BLOCK;
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for len in [
            block - 5,
            block - 4,
            block - 3,
            block - 1,
            block,
            block + 1,
            3 * block + 7,
        ] {
            let mut m = vec![b'x'; len];
            m.extend_from_slice(b"\r\n");
            cases.push(m.clone());
            m.truncate(len);
            cases.push(m);
        }
        for at in [block - 3, block - 2, block - 1, block, block + 1] {
            let mut m = vec![b'x'; 2 * block];
            m[at - 2..at].copy_from_slice(b"\r\n");
            m[at] = b'.';
            m.extend_from_slice(b"\r\n");
            cases.push(m);
        }
        // Every line a dot: nothing can be lent.
        cases.push(b".\r\n".repeat(block / 2));
        cases.push(b"..\r\n.a\r\n".repeat(block / 3));
        for m in &cases {
            let (out, n) = encoded(m);
            assert!(
                out == stuffed_line_by_line(m),
                "message of {} bytes",
                m.len()
            );
            assert_eq!(n, out.len().div_ceil(block).max(1), "blocks are filled");
        }
    }

    #[test]
    fn reply_framing_and_parsing() {
        for (input, end) in [
            (&b"250 ok\r\n"[..], Some(8)),
            (b"250-a\r\n250 b\r\nextra", Some(14)),
            (b"250-a\r\n", None),
            (b"250", None),
            (b"220\r\n", Some(5)),
        ] {
            assert_eq!(
                reply_end(input).unwrap(),
                end,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        for bad in [&b"hello\r\n"[..], b"25\r\n", b"250x\r\n", b"\r\n"] {
            assert!(
                reply_end(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for (input, code, enhanced, text) in [
            ("250 2.1.5 Ok\r\n", 250, "2.1.5", "Ok"),
            ("451 Try later\r\n", 451, "", "Try later"),
            (
                "550-5.1.1 No such\r\n550 5.1.1 user\r\n",
                550,
                "5.1.1",
                "No such user",
            ),
            (
                "550 4.1.1 class mismatch\r\n",
                550,
                "",
                "4.1.1 class mismatch",
            ),
            ("220\r\n", 220, "", ""),
        ] {
            let r = parse_reply(input.as_bytes()).unwrap();
            assert_eq!(
                (r.code, r.enhanced.as_ref(), r.text()),
                (code, enhanced, text),
                "{input:?}"
            );
        }
        assert!(parse_reply(b"999 what\r\n").is_err());
    }

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
    }
}
