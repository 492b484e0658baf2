//! Inbound certificates: several per listener chosen by the name the client
//! asks for (SNI), and a certificate replaced on disk served to the next
//! STARTTLS without a restart, while a session already in TLS goes on, and
//! SIGHUP taking up a certificate the config names anew.
//! Python's ssl module is the client.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::support::inprocess::Relay;
use crate::support::run_python;

/// STARTTLS as `name` (SNI; "-" for none), printing the SHA-256 of the
/// certificate the server sent; with "hold" as the last argument it then
/// waits for a line on stdin and prints the reply to NOOP in that session.
const CLIENT: &str = r#"
import hashlib, smtplib, ssl, sys
port, names = int(sys.argv[1]), sys.argv[2:]
hold = names[-1] == "hold"
if hold:
    names = names[:-1]
for name in names:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.ehlo("client.test")
    s._host = None if name == "-" else name
    s.starttls(context=ctx)
    print(hashlib.sha256(s.sock.getpeercert(binary_form=True)).hexdigest(), flush=True)
    if hold:
        sys.stdin.readline()
        print(s.noop()[0], flush=True)
    s.quit()
"#;

fn client(port: u16, names: &[&str]) -> Vec<String> {
    let port = port.to_string();
    let args: Vec<&str> = std::iter::once(port.as_str())
        .chain(names.iter().copied())
        .collect();
    run_python(CLIENT, &args)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A certificate for `names` written as `stem.pem` and `stem.key` (by
/// rename, as renewal tools do); returns the SHA-256 of its DER.
fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> String {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    for (ext, pem) in [
        ("key", ck.signing_key.serialize_pem()),
        ("pem", ck.cert.pem()),
    ] {
        let tmp = dir.join(format!(".{stem}.{ext}.new"));
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{stem}.{ext}"))).unwrap();
    }
    hex::encode(Sha256::digest(ck.cert.der()))
}

/// A session in TLS held open across a change.
struct Held {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Held {
    /// STARTTLS as `name`; returns the session and the SHA-256 of the
    /// certificate it got.
    fn open(port: u16, name: &str) -> (Held, String) {
        let mut child = Command::new("python3")
            .args(["-c", CLIENT, &port.to_string(), name, "hold"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        (Held { child, out }, line.trim().to_string())
    }

    /// The session is still there: NOOP gets its 250.
    fn goes_on(mut self) {
        self.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "250", "the session in TLS was dropped");
        assert!(self.child.wait().unwrap().success());
    }
}

fn path(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_a_replaced_one_is_served_next() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let default = write_cert(&certs, "default", &["relay.test"]);
    let a = write_cert(&certs, "a", &["mail.a.test"]);
    let b = write_cert(&certs, "b", &["*.b.test"]);
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"relay.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             tls_cert = \"certs/default.pem\"\ntls_key = \"certs/default.key\"\n\
             tls_certificates = [{{ cert = \"certs/a.pem\", key = \"certs/a.key\" }}, \
                                 {{ cert = \"{}\", key = \"{}\" }}]\n\
             [spool]\npath = \"{}\"\n[delivery]\nsmarthost = \"smtp://127.0.0.1:9\"\n",
            path(&certs, "b.pem").display(),
            path(&certs, "b.key").display(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let relay = Relay::start_with(config).await;
    let port = relay.addr.port();

    let got = tokio::task::spawn_blocking(move || {
        client(port, &["mail.a.test", "x.b.test", "other.test", "-"])
    })
    .await
    .unwrap();
    assert_eq!(got, [a.as_str(), &b, &default, &default]);

    // A session in TLS with the old certificate, held open over the change.
    let (held, got) = Held::open(port, "mail.a.test");
    assert_eq!(got, a);

    let renewed = write_cert(&certs, "a", &["mail.a.test"]);
    assert_ne!(renewed, a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = tokio::task::spawn_blocking(move || client(port, &["mail.a.test"]))
            .await
            .unwrap();
        if got == [renewed.as_str()] {
            break;
        }
        assert_eq!(got, [a.as_str()], "neither the old nor the new certificate");
        assert!(
            Instant::now() < deadline,
            "the replaced certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    held.goes_on();

    // A key that does not match its certificate is not taken: the renewed
    // pair stays in use.
    std::fs::write(
        certs.join("a.key"),
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let got = tokio::task::spawn_blocking(move || client(port, &["mail.a.test", "-"]))
        .await
        .unwrap();
    assert_eq!(got, [renewed.as_str(), &default]);
}

/// SIGHUP reloads the certificates from the files the config names now:
/// the config is changed to a new pair (files the watcher does not look
/// at, so only the signal can bring them in), the next STARTTLS gets the
/// new certificate, and a session already in TLS carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_the_certificate_the_config_names_now() {
    use crate::support::relay::{free_port, Relay as Process};
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let old = write_cert(&certs, "old", &["relay.test"]);
    let port = free_port();
    let config = |stem: &str| {
        format!(
            "hostname = \"relay.test\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\
             tls_cert = \"certs/{stem}.pem\"\ntls_key = \"certs/{stem}.key\"\n\
             [spool]\npath = \"spool\"\n[delivery]\nsmarthost = \"smtp://127.0.0.1:9\"\n"
        )
    };
    let relay = Process::start_in(dir.clone(), port, &config("old"));
    let served =
        |names: &'static [&'static str]| tokio::task::spawn_blocking(move || client(port, names));
    assert_eq!(served(&["-"]).await.unwrap(), [old.as_str()]);

    let (held, got) = Held::open(port, "-");
    assert_eq!(got, old);

    let new = write_cert(&certs, "new", &["relay.test"]);
    std::fs::write(dir.path().join("postern.toml"), config("new")).unwrap();
    // The changed config alone changes nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(served(&["-"]).await.unwrap(), [old.as_str()]);

    relay.signal(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = served(&["-"]).await.unwrap();
        if got == [new.as_str()] {
            break;
        }
        assert_eq!(
            got,
            [old.as_str()],
            "neither the old nor the new certificate"
        );
        assert!(
            Instant::now() < deadline,
            "no new certificate within 10 s of SIGHUP: {}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    held.goes_on();
}
