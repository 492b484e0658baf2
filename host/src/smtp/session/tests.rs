//! The whole dialogue over an in-memory stream: no sockets, real spool.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

use super::Session;
use crate::config::Config;
use crate::envelope::SessionInfo;
use crate::plugins::{Chain, ChainHandle};
use crate::server::{Context, Listener};

struct Client {
    reader: BufReader<ReadHalf<DuplexStream>>,
    writer: WriteHalf<DuplexStream>,
    spool: tempfile::TempDir,
    server: Relay,
}

const BASE: &str = r#"
hostname = "mx.ours.test"
[relay]
networks = ["192.0.2.0/24"]
domains = ["ours.test"]
# These sessions have no DNS of their own to check senders against.
[authentication]
spf = false
dkim = false
dmarc = false
arc = false
"#;

/// Starts a session for a client at `peer` with `extra` appended to the config.
async fn start(peer: &str, extra: &str) -> Client {
    let spool = tempfile::tempdir().unwrap();
    let text = format!(
        "{BASE}\n[spool]\npath = \"{}\"\n{extra}\n[[listener]]\naddress = \"127.0.0.1:25\"\n",
        spool.path().display()
    );
    start_with(peer, &text, spool).await
}

async fn start_with(peer: &str, text: &str, spool: tempfile::TempDir) -> Client {
    let config = Config::parse(text, Path::new("test.toml")).unwrap();
    let listener = Arc::new(Listener {
        config: config.listeners[0].clone(),
        tls: None,
    });
    let (tx, shutdown) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(
        Context::new(config, Arc::new(ChainHandle::new(Chain::empty())), shutdown).unwrap(),
    );
    connect(peer, (ctx, listener, Arc::new(tx)), spool).await
}

/// Opens another session on the same relay as `other`.
async fn connect_again(peer: &str, other: &Client) -> Client {
    connect(peer, other.server.clone(), tempfile::tempdir().unwrap()).await
}

/// The relay a test client talks to; the shutdown sender lives as long as it
/// (a dropped sender would read as a shutdown).
type Relay = (
    Arc<Context>,
    Arc<Listener>,
    Arc<tokio::sync::watch::Sender<bool>>,
);

async fn connect(peer: &str, server: Relay, spool: tempfile::TempDir) -> Client {
    let (ctx, listener) = (server.0.clone(), server.1.clone());
    let peer = peer.parse().unwrap();
    let info = SessionInfo {
        peer,
        local: "127.0.0.1:25".parse().unwrap(),
        helo: None,
        tls: None,
        auth_user: None,
        may_relay: ctx.access.trusted_network(peer.ip()),
    };
    let (client, server_io) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let mut session = Session::new(server_io, ctx, listener, info);
        if session.greet().await {
            session.run().await;
        }
    });
    let (r, w) = tokio::io::split(client);
    let mut c = Client {
        reader: BufReader::new(r),
        writer: w,
        spool,
        server,
    };
    assert!(c.reply().await.starts_with("220 mx.ours.test"));
    c
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// One whole reply (all its lines), or "" when the connection closed.
    async fn reply(&mut self) -> String {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.reply_lines())
            .await
            .expect("no reply within 10 s")
    }

    async fn reply_lines(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await.unwrap() == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Messages in the spool, each as its message bytes.
    fn spooled(&self) -> Vec<String> {
        let mut out = Vec::new();
        let dir = self.spool.path().join("queue");
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for path in names {
            let bytes = std::fs::read(&path).unwrap();
            let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
            out.push(String::from_utf8_lossy(&bytes[nl + 1..]).into_owned());
        }
        out
    }
}

#[tokio::test]
async fn ehlo_advertises_extensions_without_tls_or_auth() {
    let mut c = start("192.0.2.1:1000", "").await;
    let ehlo = c.cmd("EHLO client.test").await;
    for kw in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
    ] {
        assert!(
            ehlo.contains(&format!("250-{kw}\r\n")) || ehlo.contains(&format!("250 {kw}\r\n")),
            "{kw}: {ehlo}"
        );
    }
    assert!(
        !ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert!(c
        .cmd("HELO client.test")
        .await
        .starts_with("250 mx.ours.test"));
}

#[tokio::test]
async fn commands_in_the_wrong_order() {
    let mut c = start("192.0.2.1:1000", "").await;
    for (cmd, expected) in [
        ("MAIL FROM:<a@client.test>", "503 5.5.1"),
        ("EHLO client.test", "250-mx.ours"),
        ("RCPT TO:<b@ours.test>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("MAIL FROM:<a@client.test>", "250 2.1.0"),
        ("MAIL FROM:<a@client.test>", "503 5.5.1"),
        ("DATA", "554 5.5.1"),
        ("RSET", "250 2.0.0"),
        ("RCPT TO:<b@ours.test>", "503 5.5.1"),
        ("VRFY b@ours.test", "252 2.5.0"),
        ("EXPN list", "502 5.5.1"),
        ("NOOP", "250 2.0.0"),
        ("HELP", "214-2.0.0"),
        ("FROB", "500 5.5.2"),
        ("MAIL FROM:<a@client.test> FROB=1", "555 5.5.4"),
        ("MAIL FROM:<a@client.test> BODY=BINARYMIME", "555 5.5.4"),
        ("MAIL FROM:<a@client.test> SIZE=999999999", "552 5.3.4"),
        ("AUTH PLAIN AGEAYg==", "502 5.5.1"),
        ("STARTTLS", "454 4.7.0"),
        ("QUIT", "221 2.0.0"),
    ] {
        let reply = c.cmd(cmd).await;
        assert!(reply.starts_with(expected), "{cmd}: {reply}");
    }
    assert_eq!(c.reply().await, "", "connection closes after QUIT");
}

#[tokio::test]
async fn relay_access_for_untrusted_and_trusted_clients() {
    for (peer, rcpt, expected) in [
        ("198.51.100.1:1", "b@ours.test", "250 2.1.5"),
        ("198.51.100.1:1", "b@OURS.TEST", "250 2.1.5"),
        ("198.51.100.1:1", "b@other.test", "554 5.7.1"),
        ("198.51.100.1:1", "b%other.test@ours.test", "554 5.7.1"),
        ("198.51.100.1:1", "other.test!b@ours.test", "554 5.7.1"),
        ("198.51.100.1:1", "\"b@other.test\"@ours.test", "554 5.7.1"),
        ("198.51.100.1:1", "@ours.test:b@other.test", "554 5.7.1"),
        ("198.51.100.1:1", "postmaster", "250 2.1.5"),
        ("198.51.100.1:1", "", "501 5.1.3"),
        ("192.0.2.9:1", "b@other.test", "250 2.1.5"),
    ] {
        let mut c = start(peer, "").await;
        c.cmd("EHLO client.test").await;
        assert!(c.cmd("MAIL FROM:<a@client.test>").await.starts_with("250"));
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert!(reply.starts_with(expected), "{peer} {rcpt}: {reply}");
    }
}

#[tokio::test]
async fn pipelined_transaction_is_answered_in_one_batch_and_spooled() {
    let mut c = start("192.0.2.1:1000", "").await;
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test> BODY=8BITMIME\r\nRCPT TO:<b@other.test>\r\nRCPT TO:<c@other.test>\r\nDATA\r\n").await;
    assert!(c.reply().await.starts_with("250-mx.ours.test"));
    for expected in ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354 "] {
        let reply = c.reply().await;
        assert!(reply.starts_with(expected), "{expected}: {reply}");
    }
    c.send(b"Subject: t\r\n\r\n..leading dot\r\nbody\r\n.\r\nQUIT\r\n")
        .await;
    let queued = c.reply().await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    assert!(c.reply().await.starts_with("221"));
    let spooled = c.spooled();
    assert_eq!(spooled.len(), 1);
    let id = queued.trim_end().rsplit(' ').next().unwrap();
    assert!(spooled[0].starts_with(
        "Received: from client.test ([192.0.2.1])\r\n\tby mx.ours.test (Postern) with ESMTP id "
    ));
    assert!(spooled[0].contains(id));
    assert!(
        spooled[0].ends_with("Subject: t\r\n\r\n.leading dot\r\nbody\r\n"),
        "{}",
        spooled[0]
    );
}

#[tokio::test]
async fn content_sent_before_354_is_refused_and_the_session_closed() {
    let mut c = start("192.0.2.1:1000", "").await;
    c.cmd("EHLO client.test").await;
    c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@other.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("554 5.5.0"));
    assert_eq!(c.reply().await, "");
    assert!(c.spooled().is_empty());
}

#[tokio::test]
async fn smuggled_end_of_data_stays_content() {
    for smuggle in [
        &b"\n.\n"[..],
        b"\r.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r\n\0.\r\n",
        b"\r\n.\0\r\n",
    ] {
        let mut c = start("192.0.2.1:1000", "").await;
        c.cmd("EHLO client.test").await;
        c.cmd("MAIL FROM:<a@client.test>").await;
        c.cmd("RCPT TO:<b@other.test>").await;
        assert!(c.cmd("DATA").await.starts_with("354"));
        let mut msg = b"Subject: one\r\n\r\nfirst".to_vec();
        msg.extend_from_slice(smuggle);
        msg.extend_from_slice(b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@other.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n");
        c.send(&msg).await;
        let reply = c.reply().await;
        assert!(
            reply.starts_with("250 2.0.0 Ok: queued"),
            "{smuggle:?}: {reply}"
        );
        assert!(
            c.cmd("NOOP").await.starts_with("250 2.0.0 Ok"),
            "{smuggle:?}: a second message was started"
        );
        let spooled = c.spooled();
        assert_eq!(spooled.len(), 1, "{smuggle:?}");
        assert!(
            spooled[0].contains("Subject: smuggled"),
            "{smuggle:?}: {}",
            spooled[0]
        );
        // What is stored has CRLF line ends only.
        let body = spooled[0].as_bytes();
        for (i, &b) in body.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(body[i - 1], b'\r', "{smuggle:?}: bare LF stored");
            }
            if b == b'\r' {
                assert_eq!(body.get(i + 1), Some(&b'\n'), "{smuggle:?}: bare CR stored");
            }
        }
    }
}

#[tokio::test]
async fn bare_newline_reject_mode() {
    let mut c = start("192.0.2.1:1000", "[smtp]\nbare_newline = \"reject\"").await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@client.test>").await;
    c.cmd("RCPT TO:<b@other.test>").await;
    c.cmd("DATA").await;
    c.send(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("550 5.5.2"));
    // The session goes on in step: the next transaction works.
    c.cmd("MAIL FROM:<a@client.test>").await;
    c.cmd("RCPT TO:<b@other.test>").await;
    c.send(b"BDAT 14 LAST\r\nSubject: y\r\n\r\n").await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: queued"));
    assert_eq!(c.spooled().len(), 1);
}

#[tokio::test]
async fn bdat_chunks_make_one_message() {
    let mut c = start("192.0.2.1:1000", "").await;
    c.cmd("EHLO client.test").await;
    // BDAT without a transaction: the chunk is still read, then refused.
    c.send(b"BDAT 5\r\nhello").await;
    assert!(c.reply().await.starts_with("503 5.5.1"));
    c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@other.test>\r\nBDAT 11\r\nSubject: x\r")
        .await;
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("250 2.0.0 11 octets"));
    c.send(b"BDAT 10\r\n\n\r\n.\r\nQUIT").await;
    assert!(c.reply().await.starts_with("250 2.0.0 10 octets"));
    assert!(
        c.cmd("DATA").await.starts_with("503 5.5.1"),
        "DATA in the middle of BDAT"
    );
    c.send(b"BDAT 8 LAST\r\nline\r\n\r\n").await;
    assert!(c.reply().await.starts_with("250 2.0.0 Ok: queued"));
    let spooled = c.spooled();
    assert_eq!(spooled.len(), 1);
    assert!(
        spooled[0].ends_with("Subject: x\r\n\r\n.\r\nQUITline\r\n\r\n"),
        "{:?}",
        spooled[0]
    );
}

#[tokio::test]
async fn size_recipient_loop_and_error_limits() {
    let mut c = start(
        "192.0.2.1:1000",
        "[limits]\nmax_message_size = 2000\nmax_recipients = 2\nmax_received_headers = 3\nmax_errors = 6\nmax_line_length = 1000",
    )
    .await;
    c.cmd("EHLO client.test").await;
    assert!(c
        .cmd("MAIL FROM:<a@client.test> SIZE=2001")
        .await
        .starts_with("552 5.3.4"));
    c.cmd("MAIL FROM:<a@client.test>").await;
    c.cmd("RCPT TO:<b@other.test>").await;
    c.cmd("RCPT TO:<c@other.test>").await;
    assert!(c
        .cmd("RCPT TO:<d@other.test>")
        .await
        .starts_with("452 4.5.3"));
    c.cmd("DATA").await;
    let big = format!("{}\r\n", "x".repeat(900)).repeat(3);
    c.send(format!("Subject: big\r\n\r\n{big}.\r\n").as_bytes())
        .await;
    assert!(c.reply().await.starts_with("552 5.3.4"));
    c.cmd("MAIL FROM:<a@client.test>").await;
    c.cmd("RCPT TO:<b@other.test>").await;
    c.cmd("DATA").await;
    c.send(format!("Subject: long\r\n\r\n{}\r\n.\r\n", "y".repeat(1001)).as_bytes())
        .await;
    assert!(c.reply().await.starts_with("552 5.3.4"));
    c.cmd("MAIL FROM:<a@client.test>").await;
    c.cmd("RCPT TO:<b@other.test>").await;
    c.cmd("DATA").await;
    c.send(b"Received: a\r\nReceived: b\r\nReceived: c\r\nReceived: d\r\n\r\nloop\r\n.\r\n")
        .await;
    let reply = c.reply().await;
    assert!(reply.starts_with("554 5.4.6"), "{reply}");
    assert!(c.spooled().is_empty());
    // That was the 5th error; the 6th closes the session.
    let reply = c.cmd("FROB").await;
    assert!(reply.starts_with("500 5.5.2"), "{reply}");
    assert!(c.reply().await.starts_with("421 4.7.0"));
    assert_eq!(c.reply().await, "");
}

#[tokio::test]
async fn long_command_line_is_refused_and_the_session_goes_on() {
    let mut c = start("192.0.2.1:1000", "").await;
    let long = format!("NOOP {}\r\n", "a".repeat(10_000));
    c.send(long.as_bytes()).await;
    assert!(c.reply().await.starts_with("500 5.5.6"));
    assert!(c.cmd("NOOP").await.starts_with("250"));
}

#[tokio::test]
async fn auth_needs_tls_and_submission_needs_auth() {
    let hash = crate::auth::hash_password("secret");
    let spool = tempfile::tempdir().unwrap();
    let text = format!(
        "{BASE}\n[spool]\npath = \"{}\"\n[[user]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n[[listener]]\naddress = \"127.0.0.1:587\"\nmode = \"submission\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        spool.path().display()
    );
    let mut c = start_with("192.0.2.1:1000", &text, spool).await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(!ehlo.contains("AUTH"), "AUTH offered in clear text: {ehlo}");
    assert!(c
        .cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==")
        .await
        .starts_with("538 5.7.11"));
    assert!(c
        .cmd("MAIL FROM:<alice@ours.test>")
        .await
        .starts_with("530 5.7.0"));
}

#[tokio::test]
async fn messages_beyond_the_memory_budget_get_452_and_the_session_goes_on() {
    // 128 KiB for all messages in flight together.
    let mut a = start(
        "192.0.2.1:1000",
        "[limits]\nmax_message_memory = 131072\nmax_message_size = 131072",
    )
    .await;
    let mut b = connect_again("192.0.2.2:1000", &a).await;
    let line = format!("{}\r\n", "z".repeat(998));
    for c in [&mut a, &mut b] {
        c.cmd("EHLO client.test").await;
        c.cmd("MAIL FROM:<a@client.test>").await;
        c.cmd("RCPT TO:<b@other.test>").await;
        assert!(c.cmd("DATA").await.starts_with("354"));
    }
    // A holds 100 KB without finishing; B's message finds no memory left.
    a.send(format!("Subject: a\r\n\r\n{}", line.repeat(100)).as_bytes())
        .await;
    let memory = a.server.0.message_memory.clone();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while memory.available_permits() >= 64 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("A's message takes the memory");
    b.send(format!("Subject: b\r\n\r\n{}.\r\n", line.repeat(40)).as_bytes())
        .await;
    assert!(b.reply().await.starts_with("452 4.3.1"));
    a.send(b".\r\n").await;
    assert!(a.reply().await.starts_with("250 2.0.0 Ok: queued"));
    // A's memory was given back: B's retry fits.
    b.cmd("MAIL FROM:<a@client.test>").await;
    b.cmd("RCPT TO:<b@other.test>").await;
    b.cmd("DATA").await;
    b.send(format!("Subject: b\r\n\r\n{}.\r\n", line.repeat(40)).as_bytes())
        .await;
    assert!(b.reply().await.starts_with("250 2.0.0 Ok: queued"));
}
