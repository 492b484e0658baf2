//! Relay core end to end: the real binary, real TCP and TLS, and clients
//! written by others (Python's smtplib, swaks).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::support::relay::{base_config, free_port, Relay, NO_DELIVERY};
use crate::support::smtp::{queue_id, send_message, Raw};
use crate::support::tls::make_cert;
use crate::support::{is_root, mount_tmpfs, Unmount};

fn fixture(path: &str) -> String {
    format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn postern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_postern"))
}

/// `postern passwd` reads a password on stdin and prints its hash.
fn passwd(password: &str) -> String {
    let mut child = postern()
        .arg("passwd")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    hash
}

fn python(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(fixture("clients/smtplib_client.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "smtplib client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tls_listener(dir: &Path, port: u16, tls: &str, mode: &str) -> String {
    let cert = make_cert(dir);
    format!(
        "[[listener]]\naddress = \"127.0.0.1:{port}\"\nmode = \"{mode}\"\ntls = \"{tls}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.cert.display(),
        cert.key.display()
    )
}

#[test]
fn smtplib_starttls_auth_smtputf8_and_8bitmime() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let cert = make_cert(dir.path());
    let hash = passwd("correct horse");
    let config = format!(
        r#"hostname = "mx.ours.test"
[[listener]]
address = "127.0.0.1:{port}"
tls_cert = "cert.pem"
tls_key = "key.pem"
[spool]
path = "spool"
[relay]
domains = ["ours.test"]
[smtp]
received_auth_user = true
{NO_DELIVERY}
[[user]]
name = "alice"
password_hash = "{hash}"
"#
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let out = python(&[
        "starttls",
        &port.to_string(),
        cert.cert.to_str().unwrap(),
        "alice",
        "correct horse",
    ]);
    let plain: Vec<String> = serde_json::from_value(out["plain_features"].clone()).unwrap();
    let tls: Vec<String> = serde_json::from_value(out["tls_features"].clone()).unwrap();
    assert!(
        plain.contains(&"starttls".into()) && !plain.contains(&"auth".into()),
        "{plain:?}"
    );
    assert!(
        tls.contains(&"auth".into()) && !tls.contains(&"starttls".into()),
        "{tls:?}"
    );
    for kw in [
        "pipelining",
        "size",
        "8bitmime",
        "smtputf8",
        "enhancedstatuscodes",
        "chunking",
    ] {
        assert!(tls.contains(&kw.to_string()), "{kw} missing: {tls:?}");
    }
    assert_eq!(out["starttls"], 220);
    assert_eq!(out["bad_login"], 535);
    assert_eq!(out["login"], 235);
    assert_eq!(out["eightbit_refused"], serde_json::json!({}));

    let spooled = relay.spooled();
    assert_eq!(spooled.len(), 2, "{spooled:?}");
    let utf8 = &spooled[0];
    assert_eq!(utf8.meta["envelope"]["sender"], "grüße@client.test");
    assert_eq!(
        utf8.meta["envelope"]["recipients"][0]["address"],
        "δοκιμή@other.test"
    );
    assert_eq!(utf8.meta["envelope"]["params"]["smtputf8"], true);
    let text = String::from_utf8(utf8.message.clone()).unwrap();
    assert!(text.contains("with UTF8ESMTPSA id"), "{text}");
    assert!(text.contains("(using TLSv1.3 with cipher"), "{text}");
    assert!(text.contains("(authenticated as alice)"), "{text}");
    let eight = &spooled[1];
    assert_eq!(eight.meta["envelope"]["params"]["body"], "eightbitmime");
    assert!(String::from_utf8(eight.message.clone())
        .unwrap()
        .ends_with("Smörgåsbord\r\n"));
}

#[test]
fn smtplib_over_implicit_tls() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let config = base_config(port, "").replace(
        &format!("[[listener]]\naddress = \"127.0.0.1:{port}\"\n"),
        &tls_listener(dir.path(), port, "implicit", "relay"),
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let out = python(&[
        "implicit",
        &port.to_string(),
        dir.path().join("cert.pem").to_str().unwrap(),
    ]);
    let features: Vec<String> = serde_json::from_value(out["features"].clone()).unwrap();
    assert!(
        !features.contains(&"starttls".into()),
        "STARTTLS offered inside TLS: {features:?}"
    );
    assert_eq!(out["cipher"], "TLSv1.3");
    assert_eq!(out["refused"], serde_json::json!({}));
    assert_eq!(relay.spooled().len(), 1);
}

fn swaks(relay: &Relay, args: &[&str]) -> String {
    let out = Command::new("swaks")
        .args([
            "--server",
            &relay.addr().to_string(),
            "--helo",
            "client.test",
            "--timeout",
            "20",
        ])
        .args(args)
        .output()
        .expect("swaks (Debian package swaks) is installed");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn swaks_pipelining_and_starttls() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let config = base_config(port, "").replace(
        &format!("[[listener]]\naddress = \"127.0.0.1:{port}\"\n"),
        &tls_listener(dir.path(), port, "starttls", "relay"),
    );
    let relay = Relay::start_in(dir.clone(), port, &config);
    let piped = swaks(
        &relay,
        &[
            "--pipeline",
            "--from",
            "a@client.test",
            "--to",
            "b@other.test,c@other.test",
        ],
    );
    assert!(piped.contains("<-  250 2.0.0 Ok: queued as"), "{piped}");
    // All three replies to the pipelined group came after all three commands went out.
    let (sent, answered) = (
        piped.find(" -> DATA").unwrap(),
        piped.find("<-  250 2.1.0").unwrap(),
    );
    assert!(sent < answered, "{piped}");
    let tls = swaks(
        &relay,
        &["--tls", "--from", "a@client.test", "--to", "b@other.test"],
    );
    assert!(tls.contains("TLS started"), "{tls}");
    assert!(tls.contains("250 2.0.0 Ok: queued as"), "{tls}");
    let denied = swaks(
        &relay,
        &[
            "--from",
            "a@client.test",
            "--to",
            "b@other.test",
            "--quit-after",
            "RCPT",
        ],
    );
    assert!(
        denied.contains("250 2.1.5"),
        "127.0.0.0/8 is trusted: {denied}"
    );
    let spooled = relay.spooled();
    assert_eq!(spooled.len(), 2);
    assert_eq!(
        spooled[0].meta["envelope"]["recipients"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(String::from_utf8_lossy(&spooled[1].message).contains("with ESMTPS id"));
}

/// Byte sequences that some servers read as an end of data. None of them may
/// end a message here.
pub(crate) const SMUGGLING: &[(&str, &[u8])] = &[
    ("lf-dot-lf", b"\n.\n"),
    ("cr-dot-cr", b"\r.\r"),
    ("lf-dot-crlf", b"\n.\r\n"),
    ("crlf-dot-lf", b"\r\n.\n"),
    ("cr-dot-crlf", b"\r.\r\n"),
    ("crlf-dot-cr", b"\r\n.\r"),
    ("crlf-nul-dot-crlf", b"\r\n\0.\r\n"),
    ("crlf-dot-nul-crlf", b"\r\n.\0\r\n"),
];

pub(crate) fn smuggled_message(seq: &[u8]) -> Vec<u8> {
    let mut m =
        b"From: a@client.test\r\nTo: b@other.test\r\nSubject: first\r\n\r\nfirst part".to_vec();
    m.extend_from_slice(seq);
    m.extend_from_slice(b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@other.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n");
    m
}

fn assert_one_message_with_smuggled_text(relay: &Relay, name: &str) {
    let spooled = relay.spooled();
    assert_eq!(
        spooled.len(),
        1,
        "{name}: {} messages spooled",
        spooled.len()
    );
    let msg = &spooled[0].message;
    assert!(
        String::from_utf8_lossy(msg).contains("Subject: smuggled"),
        "{name}"
    );
    assert_eq!(
        spooled[0].meta["envelope"]["recipients"][0]["address"], "b@other.test",
        "{name}"
    );
    for (i, &b) in msg.iter().enumerate() {
        assert!(b != b'\n' || msg[i - 1] == b'\r', "{name}: bare LF stored");
        assert!(
            b != b'\r' || msg.get(i + 1) == Some(&b'\n'),
            "{name}: bare CR stored"
        );
    }
}

#[test]
fn swaks_smuggling_sequences_in_data_never_end_the_message() {
    for (name, seq) in SMUGGLING {
        let relay = Relay::start("");
        let file = relay.dir.path().join(format!("{name}.eml"));
        // With --no-data-fixup swaks sends the file byte for byte, the real end included.
        let mut raw = smuggled_message(seq);
        raw.extend_from_slice(b".\r\n");
        std::fs::write(&file, raw).unwrap();
        let data = format!("@{}", file.display());
        let out = swaks(
            &relay,
            &[
                "--from",
                "a@client.test",
                "--to",
                "b@other.test",
                "--no-data-fixup",
                "--data",
                &data,
            ],
        );
        assert_eq!(out.matches("Ok: queued as").count(), 1, "{name}: {out}");
        assert_one_message_with_smuggled_text(&relay, name);
    }
}

#[test]
fn smuggling_sequences_in_bdat_chunks_stay_content() {
    for (name, seq) in SMUGGLING {
        let relay = Relay::start("");
        let msg = smuggled_message(seq);
        let mut c = Raw::connect(relay.addr());
        assert!(c.cmd("EHLO client.test").contains("CHUNKING"));
        // Split the message in the middle of the sequence, so the chunk
        // boundary falls inside it.
        let cut = msg.windows(seq.len()).position(|w| w == *seq).unwrap() + seq.len() / 2;
        let mut wire = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@other.test>\r\n".to_vec();
        wire.extend_from_slice(format!("BDAT {}\r\n", cut).as_bytes());
        wire.extend_from_slice(&msg[..cut]);
        wire.extend_from_slice(format!("BDAT {} LAST\r\n", msg.len() - cut).as_bytes());
        wire.extend_from_slice(&msg[cut..]);
        c.send(&wire);
        for expected in [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0",
            "250 2.0.0 Ok: queued",
        ] {
            let reply = c.reply();
            assert!(reply.starts_with(expected), "{name}: {reply}");
        }
        assert!(c.cmd("NOOP").starts_with("250 2.0.0 Ok"), "{name}");
        assert_one_message_with_smuggled_text(&relay, name);
    }
}

#[test]
fn bare_newline_reject_mode_refuses_after_the_end() {
    let relay = Relay::start("[smtp]\nbare_newline = \"reject\"\n");
    let reply = send_message(
        relay.addr(),
        "a@client.test",
        &["b@other.test"],
        "Subject: x\r\n\r\nbare\nlf\r\n",
    );
    assert!(reply.starts_with("550 5.5.2"), "{reply}");
    let reply = send_message(
        relay.addr(),
        "a@client.test",
        &["b@other.test"],
        "Subject: x\r\n\r\nclean\r\n",
    );
    queue_id(&reply);
    assert_eq!(relay.spooled().len(), 1);
}

#[test]
fn commands_pipelined_after_starttls_are_discarded() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let port = free_port();
    let config = base_config(port, "").replace(
        &format!("[[listener]]\naddress = \"127.0.0.1:{port}\"\n"),
        &tls_listener(dir.path(), port, "starttls", "relay"),
    );
    let _relay = Relay::start_in(dir.clone(), port, &config);
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut plain = Raw::connect_stream(tcp.try_clone().unwrap());
    plain.cmd("EHLO client.test");
    // The injected command rides in the same packet as STARTTLS.
    plain.send(b"STARTTLS\r\nMAIL FROM:<injected@client.test>\r\n");
    assert!(plain.reply().starts_with("220 2.0.0"));
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(dir.path().join("cert.pem")).unwrap();
    use rustls_pki_types::pem::PemObject;
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("250 2.1.0") {
        let n = std::io::Read::read(&mut tls, &mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    // First the EHLO reply, then exactly one MAIL reply: the injected MAIL was
    // never answered (a second would be 503 nested MAIL).
    assert!(text.starts_with("250-mx.ours.test"), "{text}");
    assert_eq!(text.matches("250 2.1.0").count(), 1, "{text}");
    assert!(!text.contains("503"), "{text}");
}

#[test]
fn ipv6_listener_and_connection_limit_per_client_but_not_for_relay_networks() {
    let port = free_port();
    let v6 = free_port();
    let relay = Relay::start_in(
        Arc::new(tempfile::tempdir().unwrap()),
        port,
        &base_config(
            port,
            &format!("[limits]\nmax_connections_per_client = 2\n[[listener]]\naddress = \"[::1]:{v6}\"\n[listener.authentication]\nspf = false\n"),
        ),
    );
    let addr6: SocketAddr = format!("[::1]:{v6}").parse().unwrap();
    let mut c6 = Raw::connect(addr6);
    assert!(c6.cmd("EHLO client.test").contains("[::1]"));
    // ::1 is not in relay.networks: relaying is refused, local domain accepted.
    c6.cmd("MAIL FROM:<a@client.test>");
    assert!(c6
        .cmd("RCPT TO:<b@other.test>")
        .starts_with("554 5.7.1 Relay access denied"));
    assert!(c6.cmd("RCPT TO:<b@ours.test>").starts_with("250"));

    // ::1 is held to two sessions: c6 and one more.
    let _b = Raw::connect(addr6);
    let mut third = TcpStream::connect(addr6).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut third, &mut reply).unwrap();
    assert!(reply.starts_with("421 4.7.0"), "{reply}");
    // 127.0.0.1 is in relay.networks: not held by the per-client limit.
    let trusted: Vec<Raw> = (0..4).map(|_| Raw::connect(relay.addr())).collect();
    assert_eq!(trusted.len(), 4);
}

#[test]
fn sigterm_lets_transactions_finish_and_turns_idle_sessions_away() {
    let mut relay = Relay::start("");
    let mut busy = Raw::connect(relay.addr());
    busy.cmd("EHLO client.test");
    busy.cmd("MAIL FROM:<a@client.test>");
    busy.cmd("RCPT TO:<b@other.test>");
    assert!(busy.cmd("DATA").starts_with("354"));
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let mut idle = Raw::connect(relay.addr());
    idle.cmd("EHLO client.test");
    relay.signal(15);
    assert!(idle.reply().starts_with("421 4.3.2"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect(relay.addr()).is_err(),
        "still accepting after SIGTERM"
    );
    busy.send(b"second half\r\n.\r\n");
    let id = queue_id(&busy.reply());
    assert!(busy.cmd("QUIT").starts_with("221") || busy.closed());
    assert_eq!(relay.wait_exit(Duration::from_secs(20)), Some(0));
    let spooled = relay.spooled();
    assert_eq!(spooled.len(), 1);
    assert_eq!(spooled[0].id, id);
    assert!(String::from_utf8_lossy(&spooled[0].message).ends_with("first half\r\nsecond half\r\n"));
}

#[test]
fn a_second_relay_on_the_same_spool_refuses_to_start() {
    let relay = Relay::start("");
    let config = relay.dir.path().join("second.toml");
    std::fs::write(&config, base_config(free_port(), "")).unwrap();
    let out = postern()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another postern process"), "{err}");
}

#[test]
fn config_errors_name_the_key_and_config_goes_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, base_config(2525, "[limits]\nmax_mesage_size = 10\n")).unwrap();
    for args in [
        vec!["--config", bad.to_str().unwrap(), "check"],
        vec!["check", "--config", bad.to_str().unwrap()],
    ] {
        let out = postern().args(&args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("max_mesage_size") && err.contains("bad.toml"),
            "{err}"
        );
    }
    let good = dir.path().join("good.toml");
    std::fs::write(&good, base_config(2525, "")).unwrap();
    let out = postern()
        .args(["check", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn disk_full_gives_452_and_no_false_250() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let spool = dir.path().join("spool");
    if !is_root() {
        eprintln!(
            "disk_full_gives_452_and_no_false_250 needs root to mount a small tmpfs; not run"
        );
        return;
    }
    assert!(
        mount_tmpfs(&spool, "256k"),
        "mounting a tmpfs as root failed"
    );
    let _unmount = Unmount(spool.clone());
    let port = free_port();
    let relay = Relay::start_in(dir.clone(), port, &base_config(port, ""));
    let big = format!(
        "Subject: big\r\n\r\n{}",
        format!("{}\r\n", "x".repeat(998)).repeat(400)
    );
    let reply = send_message(relay.addr(), "a@client.test", &["b@other.test"], &big);
    assert!(reply.starts_with("452 4.3.1"), "{reply}");
    assert!(relay.spooled().is_empty());
    assert!(
        std::fs::read_dir(spool.join("queue"))
            .unwrap()
            .next()
            .is_none(),
        "debris left in the spool"
    );
    // The relay is still up and takes what fits.
    queue_id(&send_message(
        relay.addr(),
        "a@client.test",
        &["b@other.test"],
        "Subject: small\r\n\r\nok\r\n",
    ));
    assert_eq!(relay.spooled().len(), 1);
}

/// Postfix's own load tools on both sides: smtp-source sends, Postern queues and
/// delivers, smtp-sink receives. Every message must arrive and the spool empty.
#[test]
fn smtp_source_through_postern_to_smtp_sink() {
    let sink_port = free_port();
    let counts = tempfile::NamedTempFile::new().unwrap();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut sink = Command::new("smtp-sink");
    sink.arg("-c");
    if root {
        // smtp-sink refuses to run as root without dropping privileges.
        sink.args(["-u", "nobody"]);
    }
    let mut sink = sink
        .args([format!("127.0.0.1:{sink_port}"), "128".into()])
        .stdout(counts.reopen().unwrap())
        .spawn()
        .expect("smtp-sink (Debian package postfix) is installed");
    // Mail for sink.test goes to the sink; everything else stays queued.
    let relay = Relay::start(&format!(
        "[delivery.routes]\n\"sink.test\" = \"smtp://127.0.0.1:{sink_port}\"\n"
    ));
    let out = Command::new("smtp-source")
        .args([
            "-s",
            "10",
            "-m",
            "300",
            "-l",
            "2048",
            "-f",
            "a@source.test",
            "-t",
            "b@sink.test",
        ])
        .arg(relay.addr().to_string())
        .output()
        .expect("smtp-source (Debian package postfix) is installed");
    assert!(
        out.status.success(),
        "smtp-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let delivered = |text: &str| {
        text.split(['\r', '\n'])
            .filter_map(|l| l.split("mesg=").nth(1))
            .filter_map(|n| n.trim().parse::<usize>().ok())
            .max()
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = delivered(&std::fs::read_to_string(counts.path()).unwrap_or_default());
        if got >= 300 && relay.spooled().is_empty() {
            assert_eq!(got, 300, "messages arrived more than once");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sink got {got} of 300; log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = sink.kill();
    let _ = sink.wait();
}
