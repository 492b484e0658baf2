//! Capture sinks: small SMTP servers that record what arrives and answer as a
//! test says (accept, 4xx or 5xx at RCPT, 4xx greeting, drop mid-DATA, stall,
//! answer slowly, reset TLS mid-handshake), with optional STARTTLS and AUTH.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How the sink answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// 250 to everything.
    Accept,
    /// 451 to every RCPT.
    TempFail,
    /// 451 to the first `n` RCPTs, then accept.
    TempFailFirst(usize),
    /// 550 5.1.1 to every RCPT.
    Reject,
    /// 421 instead of the greeting.
    Greeting421,
    /// 451 to every MAIL.
    MailTempFail,
    /// Closes the connection in the middle of the message data.
    DropMidData,
    /// Takes the whole message and never answers the final dot.
    Stall,
    /// Waits this many milliseconds before every reply, greeting included.
    Slow(u64),
    /// Offers STARTTLS, says 220, reads the start of the client's handshake
    /// and closes the connection.
    TlsReset,
}

/// One message as received.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The MAIL FROM line, as sent.
    pub mail: String,
    /// The reverse-path.
    pub from: String,
    /// RCPT TO lines, as sent.
    pub rcpt_lines: Vec<String>,
    /// Forward-paths.
    pub rcpts: Vec<String>,
    /// Content, dot-unstuffed, CRLF.
    pub data: Vec<u8>,
    /// Received over TLS.
    pub tls: bool,
    /// The AUTH user, if any.
    pub auth: Option<String>,
}

/// Sink options.
#[derive(Clone)]
pub struct Options {
    /// Answers.
    pub behavior: Behavior,
    /// STARTTLS with this acceptor.
    pub tls: Option<TlsAcceptor>,
    /// AUTH PLAIN/LOGIN with these credentials (offered only over TLS unless
    /// `auth_in_clear`).
    pub auth: Option<(String, String)>,
    /// Offer AUTH before TLS too (to check that the client does not use it).
    pub auth_in_clear: bool,
    /// Advertise only PIPELINING and SIZE 2000 (no 8BITMIME, SMTPUTF8, DSN).
    pub minimal: bool,
    /// Offer STARTTLS, say 220, then break the handshake.
    pub broken_tls: bool,
}

impl Options {
    /// A plain sink with this behavior.
    pub fn new(behavior: Behavior) -> Options {
        Options {
            behavior,
            tls: None,
            auth: None,
            auth_in_clear: false,
            minimal: false,
            broken_tls: false,
        }
    }
}

/// A running sink.
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    messages: Arc<Mutex<Vec<Captured>>>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// MAIL commands seen (including refused transactions).
    pub transactions: Arc<AtomicUsize>,
    /// AUTH commands seen.
    pub auth_attempts: Arc<AtomicUsize>,
    /// The accept loop; [`Sink::stop`] ends it.
    accepting: Option<tokio::task::JoinHandle<()>>,
}

impl Sink {
    /// Starts a sink on `ip:0`.
    pub async fn start(ip: &str, opts: Options) -> Sink {
        Sink::start_on(format!("{ip}:0").parse().unwrap(), opts).await
    }

    /// Starts a sink on an exact address.
    pub async fn start_on(addr: SocketAddr, opts: Options) -> Sink {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = Sink {
            addr,
            messages: Arc::default(),
            connections: Arc::default(),
            transactions: Arc::default(),
            auth_attempts: Arc::default(),
            accepting: None,
        };
        let shared = Shared {
            opts,
            messages: sink.messages.clone(),
            transactions: sink.transactions.clone(),
            auth_attempts: sink.auth_attempts.clone(),
            rcpt_count: Arc::default(),
        };
        let conns = sink.connections.clone();
        let mut sink = sink;
        sink.accepting = Some(tokio::spawn(async move {
            // Its sessions end with it: dropping the set aborts them.
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                sessions.spawn(async move {
                    let _ = session(Box::new(stream), shared).await;
                });
                while sessions.try_join_next().is_some() {}
            }
        }));
        sink
    }

    /// Goes down as a host does: stops listening and closes its open
    /// connections.
    pub async fn stop(&mut self) {
        if let Some(task) = self.accepting.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// The messages received so far.
    pub fn messages(&self) -> Vec<Captured> {
        self.messages.lock().unwrap().clone()
    }

    /// The forward-paths of every message received so far, sorted.
    pub fn recipients(&self) -> Vec<String> {
        let mut rcpts: Vec<String> = self.messages().into_iter().flat_map(|m| m.rcpts).collect();
        rcpts.sort();
        rcpts
    }

    /// Waits until at least `n` messages arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Captured> {
        let got = super::eventually(timeout, || {
            let m = self.messages();
            (m.len() >= n).then_some(m)
        })
        .await;
        got.unwrap_or_else(|| {
            panic!(
                "sink {}: expected {n} message(s) within {timeout:?}, got {}",
                self.addr,
                self.messages().len()
            )
        })
    }
}

#[derive(Clone)]
struct Shared {
    opts: Options,
    messages: Arc<Mutex<Vec<Captured>>>,
    transactions: Arc<AtomicUsize>,
    auth_attempts: Arc<AtomicUsize>,
    rcpt_count: Arc<AtomicUsize>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn session(stream: Box<dyn Io>, sh: Shared) -> std::io::Result<()> {
    let mut conn = BufReader::new(stream);
    if sh.opts.behavior == Behavior::Greeting421 {
        conn.write_all(b"421 4.3.2 busy\r\n").await?;
        return Ok(());
    }
    let delay = match sh.opts.behavior {
        Behavior::Slow(ms) => Duration::from_millis(ms),
        _ => Duration::ZERO,
    };
    tokio::time::sleep(delay).await;
    conn.write_all(b"220 sink.test ESMTP\r\n").await?;
    let mut tls = false;
    let mut auth: Option<String> = None;
    let mut tx: Option<Captured> = None;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let mut caps = if sh.opts.minimal {
                vec!["sink.test", "PIPELINING", "SIZE 2000"]
            } else {
                vec![
                    "sink.test",
                    "PIPELINING",
                    "8BITMIME",
                    "SMTPUTF8",
                    "DSN",
                    "SIZE 52428800",
                    "ENHANCEDSTATUSCODES",
                ]
            };
            let offers_tls = sh.opts.tls.is_some()
                || sh.opts.broken_tls
                || sh.opts.behavior == Behavior::TlsReset;
            if offers_tls && !tls {
                caps.push("STARTTLS");
            }
            if sh.opts.auth.is_some() && (tls || sh.opts.auth_in_clear) {
                caps.push("AUTH PLAIN LOGIN");
            }
            let n = caps.len();
            caps.iter()
                .enumerate()
                .map(|(i, c)| format!("250{}{c}\r\n", if i + 1 == n { " " } else { "-" }))
                .collect()
        } else if upper == "STARTTLS" && sh.opts.behavior == Behavior::TlsReset {
            conn.write_all(b"220 2.0.0 go ahead\r\n").await?;
            let mut hello = [0u8; 16];
            let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut hello).await;
            return Ok(());
        } else if upper == "STARTTLS" && sh.opts.broken_tls {
            conn.write_all(b"220 2.0.0 go ahead\r\nthis is not TLS\r\n")
                .await?;
            return Ok(());
        } else if upper == "STARTTLS" && !tls {
            let Some(acceptor) = sh.opts.tls.clone() else {
                conn.write_all(b"502 5.5.1 no\r\n").await?;
                continue;
            };
            conn.write_all(b"220 2.0.0 go ahead\r\n").await?;
            let inner = conn.into_inner();
            let stream = acceptor.accept(inner).await?;
            conn = BufReader::new(Box::new(stream) as Box<dyn Io>);
            tls = true;
            continue;
        } else if upper.starts_with("AUTH PLAIN") {
            sh.auth_attempts.fetch_add(1, Ordering::SeqCst);
            let token = cmd.split_whitespace().nth(2).unwrap_or("");
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(token)
                .unwrap_or_default();
            let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
            match (&sh.opts.auth, parts.as_slice()) {
                (Some((u, p)), [_, user, pass])
                    if user == &u.as_bytes() && pass == &p.as_bytes() =>
                {
                    auth = Some(u.clone());
                    "235 2.7.0 ok\r\n".into()
                }
                _ => "535 5.7.8 bad credentials\r\n".into(),
            }
        } else if upper.starts_with("MAIL FROM:") {
            sh.transactions.fetch_add(1, Ordering::SeqCst);
            if sh.opts.auth.is_some() && auth.is_none() {
                "530 5.7.0 authentication required\r\n".into()
            } else if sh.opts.behavior == Behavior::MailTempFail {
                "451 4.3.2 not now\r\n".into()
            } else {
                tx = Some(Captured {
                    mail: cmd.clone(),
                    from: path_of(&cmd),
                    rcpt_lines: Vec::new(),
                    rcpts: Vec::new(),
                    data: Vec::new(),
                    tls,
                    auth: auth.clone(),
                });
                "250 2.1.0 ok\r\n".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            let n = sh.rcpt_count.fetch_add(1, Ordering::SeqCst);
            match (&mut tx, sh.opts.behavior) {
                (None, _) => "503 5.5.1 need MAIL\r\n".into(),
                (Some(_), Behavior::TempFail) => "451 4.3.0 try later\r\n".into(),
                (Some(_), Behavior::TempFailFirst(k)) if n < k => "451 4.3.0 try later\r\n".into(),
                (Some(_), Behavior::Reject) => "550 5.1.1 no such user here\r\n".into(),
                (Some(t), _) => {
                    t.rcpt_lines.push(cmd.clone());
                    t.rcpts.push(path_of(&cmd));
                    "250 2.1.5 ok\r\n".into()
                }
            }
        } else if upper == "DATA" {
            match &tx {
                Some(t) if !t.rcpts.is_empty() => {
                    conn.write_all(b"354 go\r\n").await?;
                    let mut data = Vec::new();
                    loop {
                        let mut l = Vec::new();
                        if conn.read_until(b'\n', &mut l).await? == 0 {
                            return Ok(());
                        }
                        if l == b".\r\n" {
                            break;
                        }
                        if sh.opts.behavior == Behavior::DropMidData && data.len() > 10 {
                            return Ok(());
                        }
                        let l = if l.starts_with(b".") { &l[1..] } else { &l[..] };
                        data.extend_from_slice(l);
                    }
                    if sh.opts.behavior == Behavior::Stall {
                        std::future::pending::<()>().await;
                    }
                    let mut t = tx.take().unwrap();
                    t.data = data;
                    sh.messages.lock().unwrap().push(t);
                    "250 2.0.0 queued\r\n".into()
                }
                _ => {
                    tx = None;
                    "554 5.5.1 no valid recipients\r\n".into()
                }
            }
        } else if upper == "RSET" {
            tx = None;
            "250 2.0.0 ok\r\n".into()
        } else if upper == "QUIT" {
            conn.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else if upper == "NOOP" {
            "250 2.0.0 ok\r\n".into()
        } else {
            "502 5.5.1 not implemented\r\n".into()
        };
        tokio::time::sleep(delay).await;
        conn.write_all(reply.as_bytes()).await?;
    }
}

/// The path between < and > in a MAIL/RCPT line.
fn path_of(line: &str) -> String {
    let start = line.find('<').map(|i| i + 1).unwrap_or(0);
    let end = line[start..]
        .find('>')
        .map(|i| start + i)
        .unwrap_or(line.len());
    line[start..end].to_string()
}

/// A CA and a server certificate for `names` signed by it, written as PEM
/// files in `dir`; returns the acceptor and the CA file (to trust as `tls_ca`).
pub fn tls_acceptor(dir: &std::path::Path, names: &[&str]) -> (TlsAcceptor, std::path::PathBuf) {
    let ca = super::tls::TestCa::new(dir);
    let cert = ca.issue(dir, "sink", names);
    let acceptor = postern::smtp::tls::acceptor(&cert.cert, &cert.key).unwrap();
    (acceptor, ca.path)
}
