//! A minimal blocking SMTP client for tests that need exact bytes on the wire.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A raw SMTP connection.
pub struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    /// Connects and reads the banner.
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Raw::connect_stream(stream)
    }

    /// Reads the banner on a connected stream.
    pub fn connect_stream(stream: TcpStream) -> Raw {
        let mut raw = Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let banner = raw.reply();
        assert!(banner.starts_with("220 "), "{banner}");
        raw
    }

    /// Sends bytes as they are.
    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads one whole reply; "" when the server closed the connection.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return all,
                Ok(_) => {}
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// Sends one command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// True once the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}

/// Sends one message with DATA and returns the final reply.
pub fn send_message(addr: SocketAddr, from: &str, to: &[&str], body: &str) -> String {
    let mut c = Raw::connect(addr);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    if !r.starts_with("250") {
        return r;
    }
    for rcpt in to {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        if !r.starts_with("250") {
            return r;
        }
    }
    let r = c.cmd("DATA");
    if !r.starts_with("354") {
        return r;
    }
    c.send(body.as_bytes());
    c.send(b".\r\n");
    let reply = c.reply();
    c.cmd("QUIT");
    reply
}

/// The queue id from a `250 2.0.0 Ok: queued as ID` reply.
pub fn queue_id(reply: &str) -> String {
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    reply.trim_end().rsplit(' ').next().unwrap().to_string()
}

/// Sends `n` messages of `size` bytes from a@origin.test to b@dest.test
/// with Postfix's smtp-source over `sessions` sessions; panics if it fails.
pub fn smtp_source(addr: SocketAddr, n: usize, sessions: usize, size: usize) {
    let out = std::process::Command::new("smtp-source")
        .args([
            "-s",
            &sessions.to_string(),
            "-m",
            &n.to_string(),
            "-l",
            &size.to_string(),
        ])
        .args(["-f", "a@origin.test", "-t", "b@dest.test"])
        .arg(addr.to_string())
        .output()
        .expect("smtp-source (Debian package postfix) is installed");
    assert!(
        out.status.success(),
        "smtp-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
