//! Outbound DKIM: keys made by `postern dkim keygen`, signatures made by the
//! relay and checked by dkimpy at the sink (RSA and Ed25519 together, a
//! message with a 2,000-octet line, a subdomain, a key replaced on disk, and
//! the relay's own delivery status notifications).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::authn::{by_subject, mailauth, send_from, setup_with};
use crate::support::sink::{Behavior, Captured, Options, Sink};

/// Runs `postern dkim keygen` and returns the record's character-strings as
/// printed (each at most 255 octets).
pub(crate) fn keygen(domain: &str, selector: &str, algorithm: &str, out: &Path) -> Vec<String> {
    let run = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["dkim", "keygen", "--domain", domain, "--selector", selector])
        .args(["--algorithm", algorithm, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8(run.stdout).unwrap();
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{selector}._domainkey.{domain}. IN TXT (")))
        .unwrap_or_else(|| panic!("no record line in\n{stdout}"));
    let strings: Vec<String> = line
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(strings.iter().all(|s| s.len() <= 255), "{line}");
    strings
}

/// dkimpy's verdict on each signature of a message, asking the test DNS.
pub(crate) fn dkimpy_verify(dns_port: u16, m: &Captured) -> (usize, Vec<bool>) {
    let out = mailauth(&["dkim-verify", "--dns", &dns_port.to_string()], &m.data);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let results = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_bool().unwrap())
        .collect();
    (v["signatures"].as_u64().unwrap() as usize, results)
}

fn signature_domains(m: &Captured) -> Vec<String> {
    let text = String::from_utf8_lossy(&m.data);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .replace("\r\n\t", " ")
        .replace("\r\n ", " ");
    head.lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .map(|l| {
            let d = l
                .split(';')
                .map(str::trim)
                .find(|t| t.starts_with("d="))
                .unwrap_or("d=");
            let s = l
                .split(';')
                .map(str::trim)
                .find(|t| t.starts_with("s="))
                .unwrap_or("s=");
            format!("{}/{}", &d[2..], &s[2..])
        })
        .collect()
}

pub(crate) fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <{from}>\r\nTo: <rcpt@dest.test>\r\nSubject: {subject}\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject}@sender.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkimpy_verifies_postern_signatures() {
    let keys = tempfile::tempdir().unwrap();
    let rsa = keys.path().join("rsa.pem");
    let ed = keys.path().join("ed.pem");
    let rsa_record = keygen("sender.test", "rsa", "rsa", &rsa);
    let ed_record = keygen("sender.test", "ed", "ed25519", &ed);
    assert!(
        rsa_record.len() >= 2,
        "a 2048-bit key record spans two strings"
    );
    let dkim = format!(
        "[dkim]\n\
         [[dkim.key]]\ndomain = \"sender.test\"\nselector = \"rsa\"\nkey = \"{}\"\nsubdomains = true\n\
         [[dkim.key]]\ndomain = \"sender.test\"\nselector = \"ed\"\nkey = \"{}\"\n",
        rsa.display(),
        ed.display()
    );
    let s = setup_with("", "networks = [\"127.0.0.0/8\"]", &dkim).await;
    s.dns
        .txt_strings("rsa._domainkey.sender.test", &as_str(&rsa_record))
        .txt_strings("ed._domainkey.sender.test", &as_str(&ed_record));
    let long = "y".repeat(2000);
    for (from, subject, body) in [
        ("a@sender.test", "plain", "Hello.".to_string()),
        (
            "a@sender.test",
            "long",
            format!("before\r\n{long}\r\nafter"),
        ),
        (
            "a@news.sender.test",
            "subdomain",
            "From a subdomain.".to_string(),
        ),
        (
            "a@unsigned.test",
            "unsigned",
            "No key for this domain.".to_string(),
        ),
    ] {
        let (mail, end) = send_from(
            "127.0.0.1",
            s.relay.addr,
            "client.test",
            from,
            message(from, subject, &body),
        )
        .await;
        assert!(
            mail.starts_with("250") && end.starts_with("250"),
            "{subject}: {mail} {end}"
        );
    }
    let got = s.sink.wait_for(4, Duration::from_secs(20)).await;
    let port = s.dns.addr.port();
    for (subject, expected) in [
        ("plain", vec!["sender.test/rsa", "sender.test/ed"]),
        ("long", vec!["sender.test/rsa", "sender.test/ed"]),
        ("subdomain", vec!["sender.test/rsa"]),
        ("unsigned", vec![]),
    ] {
        let m = by_subject(&got, subject);
        let mut domains = signature_domains(m);
        domains.sort();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(domains, want, "{subject}");
        let (n, results) = dkimpy_verify(port, m);
        assert_eq!(n, expected.len(), "{subject}");
        assert!(
            results.iter().all(|ok| *ok),
            "{subject}: dkimpy says {results:?}"
        );
    }
    let long_msg = by_subject(&got, "long");
    assert!(
        long_msg.data.split(|&b| b == b'\n').all(|l| l.len() <= 999),
        "a line over 998 octets reached the sink"
    );
    let body = String::from_utf8_lossy(&long_msg.data).replace("\r\n ", "");
    assert!(body.contains(&long), "the long line's content was not kept");

    // A key replaced on disk signs the next message, no restart.
    let new = keys.path().join("rsa-new.pem");
    let new_record = keygen("sender.test", "rsa", "rsa", &new);
    std::fs::rename(&new, &rsa).unwrap();
    s.dns.remove("rsa._domainkey.sender.test");
    s.dns
        .txt_strings("rsa._domainkey.sender.test", &as_str(&new_record));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, end) = send_from(
        "127.0.0.1",
        s.relay.addr,
        "client.test",
        "a@sender.test",
        message("a@sender.test", "rekeyed", "New key."),
    )
    .await;
    assert!(end.starts_with("250"), "{end}");
    let got = s.sink.wait_for(5, Duration::from_secs(20)).await;
    let (n, results) = dkimpy_verify(port, by_subject(&got, "rekeyed"));
    assert_eq!(
        (n, results),
        (2, vec![true, true]),
        "signed with the replaced key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_own_bounces_are_signed() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("relay.pem");
    let record = keygen("relay.test", "dsn", "ed25519", &key);
    let rejecting = Sink::start("127.0.0.1", Options::new(Behavior::Reject)).await;
    let extra = format!(
        "[dkim]\n[[dkim.key]]\ndomain = \"relay.test\"\nselector = \"dsn\"\nkey = \"{}\"\n\
         [delivery.routes]\n\"dest.test\" = \"smtp://{}\"\n",
        key.display(),
        rejecting.addr
    );
    let s = setup_with("", "networks = [\"127.0.0.0/8\"]", &extra).await;
    let strings: Vec<&str> = record.iter().map(String::as_str).collect();
    s.dns.txt_strings("dsn._domainkey.relay.test", &strings);
    let (_, end) = send_from(
        "127.0.0.1",
        s.relay.addr,
        "client.test",
        "sender@elsewhere.test",
        message("sender@elsewhere.test", "bounced", "Nobody is home."),
    )
    .await;
    assert!(end.starts_with("250"), "{end}");
    let got = s.sink.wait_for(1, Duration::from_secs(30)).await;
    let dsn = got
        .iter()
        .find(|m| m.from.is_empty())
        .expect("no bounce reached the sender's side");
    assert_eq!(signature_domains(dsn), vec!["relay.test/dsn".to_string()]);
    let (n, results) = dkimpy_verify(s.dns.addr.port(), dsn);
    assert_eq!((n, results), (1, vec![true]));
}
