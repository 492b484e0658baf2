//! Message authentication on the way in: SPF (checked against pyspf), DKIM
//! (mail signed by dkimpy), DMARC with Public Suffix List alignment, ARC
//! with trusted sealers, and the one `Authentication-Results:` header.

#[allow(dead_code, clippy::duplicate_mod)]
#[path = "support/plugins.rs"]
mod kit;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::TcpSocket;

use postern::authn::spf::Checker;

use crate::support::dns::DnsServer;
use crate::support::inprocess::Relay;
use crate::support::sink::{Behavior, Captured, Options, Sink};
use crate::support::smtp::Raw;

/// Runs the dkimpy/pyspf helper with `args`, feeding `input`.
pub fn mailauth(args: &[&str], input: &[u8]) -> Vec<u8> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clients/mailauth.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mailauth.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A DKIM key made with openssl: the file dkimpy signs with and the `p=`
/// of its DNS record.
pub struct TestKey {
    /// Base64 of the public key as DKIM publishes it.
    pub public: String,
    /// The file dkimpy signs with: the PEM key, or for Ed25519 the base64
    /// of its 32-octet seed.
    pub dkimpy: PathBuf,
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Generates an `rsa` (2048-bit) or `ed25519` key in `dir`.
pub fn make_key(dir: &Path, name: &str, algorithm: &str) -> TestKey {
    let pem = dir.join(format!("{name}.pem"));
    let p = pem.to_str().unwrap();
    match algorithm {
        "rsa" => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            p,
        ]),
        _ => openssl(&["genpkey", "-algorithm", "ED25519", "-out", p]),
    };
    let public_der = openssl(&["pkey", "-in", p, "-pubout", "-outform", "DER"]);
    let (public, dkimpy) = if algorithm == "rsa" {
        (b64(&public_der), pem.clone())
    } else {
        // DKIM publishes the raw 32-octet key (RFC 8463); dkimpy signs with
        // the raw seed. Both are the DER encodings' last 32 octets.
        let private_der = openssl(&["pkey", "-in", p, "-outform", "DER"]);
        let seed = dir.join(format!("{name}.seed"));
        std::fs::write(&seed, b64(&private_der[private_der.len() - 32..])).unwrap();
        (b64(&public_der[public_der.len() - 32..]), seed)
    };
    TestKey { public, dkimpy }
}

/// The DKIM key record for `key`.
pub fn key_record(key: &TestKey, algorithm: &str) -> String {
    format!("v=DKIM1; k={algorithm}; p={}", key.public)
}

/// A relay that checks everything, delivering to a sink; the client at
/// 127.0.0.2 is not in `relay.networks`.
pub struct Setup {
    pub dns: DnsServer,
    pub sink: Sink,
    pub relay: Relay,
    pub dir: tempfile::TempDir,
}

/// Starts DNS, a sink and a relay with `[authentication]` body `auth` and
/// `relay` added to the `[relay]` table.
pub async fn setup(auth: &str, relay: &str) -> Setup {
    setup_with(auth, relay, "").await
}

/// As [`setup`], with `extra` tables at the end of the config.
pub async fn setup_with(auth: &str, relay: &str, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1", Options::new(Behavior::Accept)).await;
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"relay.test\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [spool]\npath = \"{}\"\n\
             [relay]\ndomains = [\"dest.test\"]\n{relay}\n\
             [delivery]\nsmarthost = \"smtp://{}\"\nnameservers = [\"{}\"]\n\
             [authentication]\n{auth}\n{extra}\n",
            dir.path().join("spool").display(),
            sink.addr,
            dns.addr
        ),
    )
    .unwrap();
    let relay = Relay::start_with(config).await;
    Setup {
        dns,
        sink,
        relay,
        dir,
    }
}

/// One transaction from the client address `local`: the MAIL FROM reply,
/// and the reply to the end of data when MAIL was accepted.
pub async fn send_from(
    local: &str,
    relay: SocketAddr,
    helo: &str,
    from: &str,
    message: Vec<u8>,
) -> (String, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(relay).await.unwrap().into_std().unwrap();
    let (helo, from) = (helo.to_string(), from.to_string());
    tokio::task::spawn_blocking(move || {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut c = Raw::connect_stream(stream);
        assert!(c.cmd(&format!("EHLO {helo}")).starts_with("250"));
        let mail = c.cmd(&format!("MAIL FROM:<{from}>"));
        if !mail.starts_with("250") {
            return (mail, String::new());
        }
        assert!(c.cmd("RCPT TO:<rcpt@dest.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        let mut data = message;
        if !data.ends_with(b"\r\n") {
            data.extend_from_slice(b"\r\n");
        }
        c.send(&data);
        c.send(b".\r\n");
        let end = c.reply();
        c.cmd("QUIT");
        (mail, end)
    })
    .await
    .unwrap()
}

/// The header section of a captured message, as text.
pub fn headers(m: &Captured) -> String {
    let text = String::from_utf8_lossy(&m.data);
    text.split("\r\n\r\n").next().unwrap_or("").to_string()
}

/// The captured message whose Subject is `subject`.
pub fn by_subject<'a>(messages: &'a [Captured], subject: &str) -> &'a Captured {
    let needle = format!("Subject: {subject}\r\n");
    messages
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains(&needle))
        .unwrap_or_else(|| panic!("no message {subject:?} at the sink"))
}

fn message(from: &str, subject: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "{extra_headers}From: <{from}>\r\nTo: <rcpt@dest.test>\r\nSubject: {subject}\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{subject}@test>\r\n\r\nHello.\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_spf_result_is_written_and_forged_results_are_removed() {
    let s = setup("", "").await;
    s.dns
        .txt("pass.test", "v=spf1 ip4:127.0.0.2 -all")
        .txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("softfail.test", "v=spf1 ~all")
        .txt("neutral.test", "v=spf1 ?all")
        .a("none.test", &["127.0.0.2"])
        .txt("permerror.test", "v=spf1 include:missing.test -all")
        .servfail("temperror.test")
        .txt("client.test", "v=spf1 ip4:127.0.0.0/24 -all");
    let results = [
        "pass",
        "fail",
        "softfail",
        "neutral",
        "none",
        "permerror",
        "temperror",
    ];
    let forged = "Authentication-Results: relay.test; spf=pass smtp.mailfrom=forged@evil.test\r\n\
                  Authentication-Results: RELAY.TEST (sure);\r\n\tdkim=pass header.d=evil.test\r\n\
                  Authentication-Results: upstream.test; spf=fail smtp.mailfrom=kept@up.test\r\n";
    for r in results {
        let from = format!("a@{r}.test");
        let (mail, end) = send_from(
            "127.0.0.2",
            s.relay.addr,
            "client.test",
            &from,
            message(&from, r, forged),
        )
        .await;
        assert!(mail.starts_with("250"), "{r}: {mail}");
        assert!(end.starts_with("250"), "{r}: {end}");
    }
    let got = s
        .sink
        .wait_for(results.len(), Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), results.len());
    for r in results {
        let h = headers(by_subject(&got, r));
        assert!(
            h.contains(&format!("\tspf={r} (relay.test: "))
                && h.contains(&format!("smtp.mailfrom=a@{r}.test")),
            "{r}: SPF result missing in\n{h}"
        );
        assert!(
            h.contains("\tspf=pass (relay.test: ") && h.contains("smtp.helo=client.test"),
            "{r}: HELO result missing in\n{h}"
        );
        assert_eq!(
            h.to_ascii_lowercase()
                .matches("authentication-results: relay.test")
                .count(),
            1,
            "{r}: one header with our authserv-id, ours:\n{h}"
        );
        assert!(
            !h.contains("forged@evil.test") && !h.contains("evil.test"),
            "{r}: forged results kept:\n{h}"
        );
        assert!(
            h.contains(
                "Authentication-Results: upstream.test; spf=fail smtp.mailfrom=kept@up.test"
            ),
            "{r}: another server's results must stay:\n{h}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_spf_fail_refuses_mail_from_with_5_7_23() {
    let s = setup("reject_spf_fail = true", "").await;
    s.dns
        .txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("softfail.test", "v=spf1 ip4:192.0.2.1 ~all");
    let (mail, _) = send_from(
        "127.0.0.2",
        s.relay.addr,
        "client.test",
        "a@fail.test",
        Vec::new(),
    )
    .await;
    assert!(mail.starts_with("550 5.7.23"), "{mail}");
    let (mail, end) = send_from(
        "127.0.0.2",
        s.relay.addr,
        "client.test",
        "a@softfail.test",
        message("a@softfail.test", "soft", ""),
    )
    .await;
    assert!(
        mail.starts_with("250") && end.starts_with("250"),
        "{mail} {end}"
    );
    // Clients that may relay are ours to sign for, not to check.
    let trusted = setup("reject_spf_fail = true", "networks = [\"127.0.0.0/8\"]").await;
    trusted.dns.txt("fail.test", "v=spf1 ip4:192.0.2.1 -all");
    let (mail, end) = send_from(
        "127.0.0.2",
        trusted.relay.addr,
        "client.test",
        "a@fail.test",
        message("a@fail.test", "trusted", ""),
    )
    .await;
    assert!(
        mail.starts_with("250") && end.starts_with("250"),
        "{mail} {end}"
    );
}

/// The SPF table: records, then (client ip, sender, expected verdict).
fn spf_table(dns: &DnsServer) -> Vec<(&'static str, &'static str, &'static str)> {
    dns.txt("ip4.test", "v=spf1 ip4:127.0.0.0/24 -all")
        .txt("ip4-out.test", "v=spf1 ip4:127.0.1.0/24 -all")
        .txt("ip6.test", "v=spf1 ip6:2001:db8::/32 -all")
        .txt("a.test", "v=spf1 a -all")
        .a("a.test", &["127.0.0.5"])
        .txt("a-cidr.test", "v=spf1 a:host.a-cidr.test/24 -all")
        .a("host.a-cidr.test", &["127.0.0.200"])
        .txt("mx.test", "v=spf1 mx -all")
        .mx("mx.test", &[(10, "mx1.mx.test"), (20, "mx2.mx.test")])
        .a("mx1.mx.test", &["192.0.2.7"])
        .a("mx2.mx.test", &["127.0.0.7"])
        .txt("include.test", "v=spf1 include:inc.include.test -all")
        .txt("inc.include.test", "v=spf1 ip4:127.0.0.8 -all")
        .txt("include-missing.test", "v=spf1 include:nowhere.test ~all")
        .txt("redirect.test", "v=spf1 redirect=target.redirect.test")
        .txt("target.redirect.test", "v=spf1 ?all")
        .txt("exists.test", "v=spf1 exists:%{i}._ip.exists.test -all")
        .a("127.0.0.10._ip.exists.test", &["127.0.0.2"])
        .txt("softall.test", "v=spf1 ip4:192.0.2.1 ~all")
        .txt("neutralall.test", "v=spf1 ip4:192.0.2.1 ?all")
        .txt(
            "void3.test",
            "v=spf1 a:v1.void3.test a:v2.void3.test a:v3.void3.test ip4:127.0.0.0/8 -all",
        )
        .txt(
            "void2.test",
            "v=spf1 a:v1.void2.test a:v2.void2.test ip4:127.0.0.0/8 -all",
        )
        .txt(
            "eleven.test",
            "v=spf1 include:l1.test include:l2.test include:l3.test include:l4.test \
             include:l5.test include:l6.test include:l7.test include:l8.test include:l9.test \
             include:l10.test include:l11.test ip4:127.0.0.0/8 -all",
        )
        .txt(
            "ten.test",
            "v=spf1 include:l1.test include:l2.test include:l3.test include:l4.test \
             include:l5.test include:l6.test include:l7.test include:l8.test include:l9.test \
             include:l10.test ip4:127.0.0.0/8 -all",
        )
        .txt("twice.test", "v=spf1 -all")
        .txt("twice.test", "v=spf1 +all")
        .txt("syntax.test", "v=spf1 ip4:300.1.1.1 -all")
        .txt_strings("split.test", &["v=spf1 ip4:127.0.0.11", " -all"])
        .servfail("servfail.test")
        .a("norecord.test", &["127.0.0.1"]);
    for i in 1..=11 {
        dns.txt(&format!("l{i}.test"), "v=spf1 ip4:192.0.2.99 ?all");
    }
    vec![
        ("127.0.0.9", "u@ip4.test", "pass"),
        ("127.0.0.9", "u@ip4-out.test", "fail"),
        ("2001:db8::5", "u@ip6.test", "pass"),
        ("2001:db9::5", "u@ip6.test", "fail"),
        ("127.0.0.5", "u@a.test", "pass"),
        ("127.0.0.99", "u@a-cidr.test", "pass"),
        ("127.0.0.7", "u@mx.test", "pass"),
        ("127.0.0.8", "u@mx.test", "fail"),
        ("127.0.0.8", "u@include.test", "pass"),
        ("127.0.0.8", "u@include-missing.test", "permerror"),
        ("127.0.0.8", "u@redirect.test", "neutral"),
        ("127.0.0.10", "u@exists.test", "pass"),
        ("127.0.0.11", "u@exists.test", "fail"),
        ("127.0.0.8", "u@softall.test", "softfail"),
        ("127.0.0.8", "u@neutralall.test", "neutral"),
        ("127.0.0.8", "u@void3.test", "permerror"),
        ("127.0.0.8", "u@void2.test", "pass"),
        ("127.0.0.8", "u@eleven.test", "permerror"),
        ("127.0.0.8", "u@ten.test", "pass"),
        ("127.0.0.8", "u@twice.test", "permerror"),
        ("127.0.0.8", "u@syntax.test", "permerror"),
        ("127.0.0.11", "u@split.test", "pass"),
        ("127.0.0.8", "u@servfail.test", "temperror"),
        ("127.0.0.8", "u@norecord.test", "none"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_verdicts_agree_with_pyspf() {
    let dns = DnsServer::start().await;
    let table = spf_table(&dns);
    let resolver = postern::delivery::dns::Dns::new(&[dns.addr.to_string()]).unwrap();
    let checker = Checker::new(resolver.resolver().clone(), "relay.test");
    let mut ours = Vec::new();
    for (ip, sender, _) in &table {
        let domain = sender.rsplit_once('@').unwrap().1;
        let o = checker
            .check_host(ip.parse().unwrap(), domain, sender, "client.test")
            .await;
        ours.push(o.result.as_str().to_string());
    }
    let cases: Vec<serde_json::Value> = table
        .iter()
        .map(|(ip, sender, _)| serde_json::json!({"ip": ip, "sender": sender, "helo": "client.test"}))
        .collect();
    let port = dns.addr.port().to_string();
    let input = serde_json::to_vec(&cases).unwrap();
    let pyspf: Vec<String> = tokio::task::spawn_blocking(move || {
        serde_json::from_slice(&mailauth(&["spf", "--dns", &port], &input)).unwrap()
    })
    .await
    .unwrap();
    for (i, (ip, sender, expected)) in table.iter().enumerate() {
        assert_eq!(
            (ours[i].as_str(), pyspf[i].as_str()),
            (*expected, *expected),
            "{sender} from {ip}: postern {} / pyspf {}",
            ours[i],
            pyspf[i]
        );
    }
    assert!(table.len() >= 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_signed_by_dkimpy_verifies_and_aligns() {
    let s = setup("", "").await;
    let rsa = make_key(s.dir.path(), "rsa", "rsa");
    let ed = make_key(s.dir.path(), "ed", "ed25519");
    s.dns
        .txt("rsa._domainkey.signer.test", &key_record(&rsa, "rsa"))
        .txt("ed._domainkey.signer.test", &key_record(&ed, "ed25519"))
        .txt("_dmarc.signer.test", "v=DMARC1; p=reject")
        .txt("bounces.test", "v=spf1 -all");
    let original = message("a@signer.test", "signed", "");
    let sign = |key: &TestKey, selector: &str, alg: &str, m: &[u8]| {
        mailauth(
            &[
                "dkim-sign",
                "--key",
                key.dkimpy.to_str().unwrap(),
                "--domain",
                "signer.test",
                "--selector",
                selector,
                "--algorithm",
                alg,
            ],
            m,
        )
    };
    let once = sign(&rsa, "rsa", "rsa", &original);
    let twice = sign(&ed, "ed", "ed25519", &once);
    let tampered = String::from_utf8(twice.clone())
        .unwrap()
        .replace("Subject: signed", "Subject: tampered")
        .into_bytes();
    for m in [twice, tampered] {
        let (mail, end) = send_from(
            "127.0.0.2",
            s.relay.addr,
            "client.test",
            "x@bounces.test",
            m,
        )
        .await;
        assert!(
            mail.starts_with("250") && end.starts_with("250"),
            "{mail} {end}"
        );
    }
    let got = s.sink.wait_for(2, Duration::from_secs(20)).await;
    let good = headers(by_subject(&got, "signed"));
    for needle in [
        "\tdkim=pass header.d=signer.test header.s=rsa",
        "\tdkim=pass header.d=signer.test header.s=ed",
        "\tdmarc=pass header.from=signer.test policy.dmarc=reject",
        "\tspf=fail (relay.test: ",
    ] {
        assert!(good.contains(needle), "missing {needle:?} in\n{good}");
    }
    let bad = headers(by_subject(&got, "tampered"));
    for needle in [
        "header.s=rsa",
        "header.s=ed",
        "\tdmarc=fail header.from=signer.test policy.dmarc=reject",
    ] {
        assert!(bad.contains(needle), "missing {needle:?} in\n{bad}");
    }
    assert!(!bad.contains("dkim=pass"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_aligns_by_public_suffix_and_is_enforced_when_asked() {
    let s = setup("dmarc_enforce = true", "").await;
    s.dns
        .txt("bounce.example.co.uk", "v=spf1 ip4:127.0.0.2 -all")
        .txt("_dmarc.example.co.uk", "v=DMARC1; p=reject")
        .txt("other.co.uk", "v=spf1 ip4:127.0.0.2 -all")
        .txt("bounce.strict.co.uk", "v=spf1 ip4:127.0.0.2 -all")
        .txt("_dmarc.strict.co.uk", "v=DMARC1; p=quarantine; aspf=s");
    // Relaxed: the MAIL FROM domain shares the organizational domain of From:.
    let (_, end) = send_from(
        "127.0.0.2",
        s.relay.addr,
        "client.test",
        "x@bounce.example.co.uk",
        message("a@example.co.uk", "relaxed", ""),
    )
    .await;
    assert!(end.starts_with("250"), "{end}");
    // co.uk is a public suffix: other.co.uk is not aligned with
    // example.co.uk, whatever their last two labels say; p=reject applies.
    let (_, end) = send_from(
        "127.0.0.2",
        s.relay.addr,
        "client.test",
        "x@other.co.uk",
        message("a@example.co.uk", "unaligned", ""),
    )
    .await;
    assert!(end.starts_with("550 5.7.1"), "{end}");
    // Strict SPF alignment fails the subdomain; p=quarantine holds it.
    let (_, end) = send_from(
        "127.0.0.2",
        s.relay.addr,
        "client.test",
        "x@bounce.strict.co.uk",
        message("a@strict.co.uk", "strict", ""),
    )
    .await;
    assert!(end.starts_with("250"), "{end}");
    let got = s.sink.wait_for(1, Duration::from_secs(20)).await;
    let h = headers(by_subject(&got, "relaxed"));
    assert!(
        h.contains("\tdmarc=pass header.from=example.co.uk policy.dmarc=reject"),
        "{h}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.sink.messages().len(),
        1,
        "the quarantined message was delivered"
    );
    let held: Vec<String> = s
        .relay
        .spooled()
        .iter()
        .map(|id| std::fs::read_to_string(s.relay.spool.join("queue").join(id)).unwrap())
        .filter(|m| m.contains("Subject: strict"))
        .collect();
    assert_eq!(held.len(), 1, "the quarantined message is not in the spool");
    let meta = held[0].lines().next().unwrap();
    assert!(
        meta.contains("\"hold\"") && meta.contains("DMARC policy of strict.co.uk is quarantine"),
        "{meta}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arc_chain_from_a_trusted_sealer_vouches_for_a_dmarc_failure() {
    let s = setup(
        "dmarc_enforce = true\ntrusted_arc_sealers = [\"forwarder.test\"]",
        "",
    )
    .await;
    let key = make_key(s.dir.path(), "arc", "rsa");
    let other = make_key(s.dir.path(), "other", "rsa");
    s.dns
        .txt("arc._domainkey.forwarder.test", &key_record(&key, "rsa"))
        .txt("arc._domainkey.stranger.test", &key_record(&other, "rsa"))
        .txt("_dmarc.example.co.uk", "v=DMARC1; p=reject")
        .txt("list.test", "v=spf1 ip4:127.0.0.2 -all");
    let seal = |key: &TestKey, domain: &str, subject: &str| {
        let m = message(
            "a@example.co.uk",
            subject,
            &format!(
                "Authentication-Results: {domain}; spf=pass smtp.mailfrom=a@example.co.uk\r\n"
            ),
        );
        mailauth(
            &[
                "arc-sign",
                "--key",
                key.dkimpy.to_str().unwrap(),
                "--domain",
                domain,
                "--selector",
                "arc",
                "--authserv-id",
                domain,
            ],
            &m,
        )
    };
    let trusted = seal(&key, "forwarder.test", "forwarded");
    let stranger = seal(&other, "stranger.test", "stranger");
    let (_, end) = send_from(
        "127.0.0.2",
        s.relay.addr,
        "list.test",
        "x@list.test",
        trusted,
    )
    .await;
    assert!(end.starts_with("250"), "{end}");
    let (_, end) = send_from(
        "127.0.0.2",
        s.relay.addr,
        "list.test",
        "x@list.test",
        stranger,
    )
    .await;
    assert!(
        end.starts_with("550 5.7.1"),
        "an untrusted sealer vouches for nothing: {end}"
    );
    let got = s.sink.wait_for(1, Duration::from_secs(20)).await;
    let h = headers(by_subject(&got, "forwarded"));
    assert!(
        h.contains("\tarc=pass (sealed by forwarder.test) smtp.remote-ip=127.0.0.2"),
        "{h}"
    );
    assert!(h.contains("\tdmarc=fail header.from=example.co.uk"), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reads_the_results_and_rejects_a_dmarc_failure() -> anyhow::Result<()> {
    use kit::queue_id;
    let dns = DnsServer::start().await;
    dns.txt("b.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("_dmarc.b.test", "v=DMARC1; p=none")
        .txt("client.test", "v=spf1 ~all")
        .txt("other.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("_dmarc.victim.test", "v=DMARC1; p=reject");
    // dmarc_enforce is off: a refusal can only come from the plugin.
    let chain = format!(
        "[delivery]\nnameservers = [\"{}\"]\n\
         [[plugin]]\nname = \"kit\"\npath = \"testkit.wasm\"\ngrants = [\"kv\"]\n\
         [plugin.config]\nshow_authentication = true\nreject_dmarc_fail = true\n",
        dns.addr
    );
    // An outsider, so the relay checks it.
    let relay = kit::Relay::start_with(&chain, false).await?;

    let (mut c, _) = relay.client().await?;
    let r = c
        .send(
            "a@b.test",
            &["c@local.test"],
            "From: a@b.test\nTo: c@local.test\nSubject: aligned\n\nhi\n",
        )
        .await?;
    assert_eq!(r.code, 250, "{r:?}");
    let (_, spooled) = relay.spooled(&queue_id(&r).expect("queue id"))?;
    assert!(
        spooled.contains(
            "X-Testkit-Authentication: mail-from-spf=pass; spf=pass:b.test; \
             helo=softfail:client.test; dmarc=pass:b.test:p=none:disposition=none; \
             arc=none:sets=0:trusted=false\r\n"
        ),
        "{spooled}"
    );

    let (mut c, _) = relay.client().await?;
    let r = c
        .send(
            "x@other.test",
            &["c@local.test"],
            "From: a@victim.test\nTo: c@local.test\nSubject: spoofed\n\nhi\n",
        )
        .await?;
    assert_eq!(r.code, 550, "{r:?}");
    assert!(
        r.text
            .contains("5.7.1 testkit refuses a DMARC failure of victim.test (p=reject)"),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arc_sets_sealed_by_the_relay_validate_with_dkimpy() {
    let keys = tempfile::tempdir().unwrap();
    let ours = make_key(keys.path(), "seal", "rsa");
    let theirs = make_key(keys.path(), "forwarder", "rsa");
    let s = setup_with(
        "arc_seal = true\ntrusted_arc_sealers = [\"forwarder.test\"]",
        "",
        &format!(
            "[authentication.arc_sealer]\ndomain = \"relay.test\"\nselector = \"arc\"\nkey = \"{}\"\n",
            keys.path().join("seal.pem").display()
        ),
    )
    .await;
    s.dns
        .txt("arc._domainkey.relay.test", &key_record(&ours, "rsa"))
        .txt("arc._domainkey.forwarder.test", &key_record(&theirs, "rsa"))
        .txt("list.test", "v=spf1 ip4:127.0.0.2 -all");
    // A first hop, and one after a forwarder that sealed already.
    let forwarded = mailauth(
        &[
            "arc-sign",
            "--key",
            theirs.dkimpy.to_str().unwrap(),
            "--domain",
            "forwarder.test",
            "--selector",
            "arc",
            "--authserv-id",
            "forwarder.test",
        ],
        &message(
            "a@list.test",
            "second-hop",
            "Authentication-Results: forwarder.test; spf=pass smtp.mailfrom=a@list.test\r\n",
        ),
    );
    for m in [message("a@list.test", "first-hop", ""), forwarded] {
        let (_, end) = send_from("127.0.0.2", s.relay.addr, "list.test", "x@list.test", m).await;
        assert!(end.starts_with("250"), "{end}");
    }
    let got = s.sink.wait_for(2, Duration::from_secs(20)).await;
    let port = s.dns.addr.port().to_string();
    for (subject, instance) in [("first-hop", "i=1"), ("second-hop", "i=2")] {
        let m = by_subject(&got, subject);
        let h = headers(m);
        assert!(h.contains(&format!("ARC-Seal: {instance};")), "{h}");
        assert!(h.contains("d=relay.test"), "{h}");
        assert!(h.contains("ARC-Authentication-Results: "), "{h}");
        let out: serde_json::Value =
            serde_json::from_slice(&mailauth(&["arc-verify", "--dns", &port], &m.data)).unwrap();
        assert_eq!(out["cv"], "pass", "{subject}: {out}\n{h}");
        let sets = if instance == "i=1" { 1 } else { 2 };
        assert_eq!(out["sets"], sets, "{subject}: {out}");
    }

    // The sealing key replaced on disk (by rename) seals the next message,
    // no restart: only the new key is published now.
    let renewed = make_key(keys.path(), "seal-new", "rsa");
    std::fs::rename(
        keys.path().join("seal-new.pem"),
        keys.path().join("seal.pem"),
    )
    .unwrap();
    s.dns
        .remove("arc._domainkey.relay.test")
        .txt("arc._domainkey.relay.test", &key_record(&renewed, "rsa"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let m = message("a@list.test", "resealed", "");
    let (_, end) = send_from("127.0.0.2", s.relay.addr, "list.test", "x@list.test", m).await;
    assert!(end.starts_with("250"), "{end}");
    let got = s.sink.wait_for(3, Duration::from_secs(20)).await;
    let m = by_subject(&got, "resealed");
    let out: serde_json::Value =
        serde_json::from_slice(&mailauth(&["arc-verify", "--dns", &port], &m.data)).unwrap();
    assert_eq!(
        out["cv"],
        "pass",
        "sealed with the replaced key: {out}\n{}",
        headers(m)
    );
}
