//! TLS hygiene inbound: TLS 1.2 at least, 1.3 only when the listener asks,
//! checked with Python's ssl module as the client.

use crate::support::inprocess::Relay;
use crate::support::run_python;
use crate::support::tls::make_cert;

/// STARTTLS from Python with TLS at most `max` ("TLSv1_2", "TLSv1_3"):
/// the version negotiated, or "refused".
fn starttls_with_max(port: u16, max: &str) -> String {
    let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.maximum_version = getattr(ssl.TLSVersion, sys.argv[2])
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=10)
s.ehlo()
try:
    s.starttls(context=ctx)
    print(s.sock.version())
except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError):
    print("refused")
"#;
    run_python(script, &[&port.to_string(), max])
        .trim()
        .to_string()
}

async fn relay(dir: &std::path::Path, min: Option<&str>) -> Relay {
    let cert = make_cert(dir);
    let min = min
        .map(|m| format!("tls_min_version = \"{m}\"\n"))
        .unwrap_or_default();
    let config = dir.join("postern.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"relay.test\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n{min}\
             [spool]\npath = \"{}\"\n[delivery]\nsmarthost = \"smtp://127.0.0.1:9\"\n",
            cert.cert.display(),
            cert.key.display(),
            dir.join("spool").display()
        ),
    )
    .unwrap();
    Relay::start_with(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_is_the_floor_and_a_listener_may_raise_it() {
    let dir = tempfile::tempdir().unwrap();
    let default = relay(dir.path(), None).await;
    let port = default.addr.port();
    let (v12, v13) = tokio::task::spawn_blocking(move || {
        (
            starttls_with_max(port, "TLSv1_2"),
            starttls_with_max(port, "TLSv1_3"),
        )
    })
    .await
    .unwrap();
    assert_eq!((v12.as_str(), v13.as_str()), ("TLSv1.2", "TLSv1.3"));

    let dir13 = tempfile::tempdir().unwrap();
    let strict = relay(dir13.path(), Some("1.3")).await;
    let port = strict.addr.port();
    let (v12, v13) = tokio::task::spawn_blocking(move || {
        (
            starttls_with_max(port, "TLSv1_2"),
            starttls_with_max(port, "TLSv1_3"),
        )
    })
    .await
    .unwrap();
    assert_eq!((v12.as_str(), v13.as_str()), ("refused", "TLSv1.3"));
}
